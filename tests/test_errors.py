"""Clear errors: configuration problems are raised by the constructor before any
chunk is read; corrupted chunks raise ``ChunkError`` naming the array and key."""

from __future__ import annotations

import re

import numpy as np
import pytest
import zarr

import zarrdali
from storefactory import (
    VarSpec,
    chunk_files,
    chunk_key,
    corrupt_chunk,
    corrupt_inside_shard,
    shard_index,
)
from zarrdali import (
    BackendUnavailableError,
    ChunkError,
    ConfigError,
    StoreNotFoundError,
    VariableNotFoundError,
    ZarrDaliError,
)

NT, NY, NX = 12, 21, 33


@pytest.fixture
def no_chunk_reads(monkeypatch):
    """Any attempt to read or decode a chunk fails the test."""
    from zarrdali.batch import fallback
    from zarrdali.cpu import backend as cpu

    def forbidden(*args, **kwargs):
        raise AssertionError("a chunk was read before the configuration error was raised")

    targets = [
        (zarrdali.ZarrLoader, ("load_batch",)),
        (cpu.CpuBackend, ("load_batch",)),
        (cpu.PosixReader, ("pread", "read_chunks")),
        (cpu.NumcodecsDecoder, ("decode", "decode_one")),
        (fallback.ZarrPythonChunkSource, ("read_decoded",)),
    ]
    for cls, names in targets:
        for name in names:
            if hasattr(cls, name):
                monkeypatch.setattr(cls, name, forbidden)


@pytest.fixture
def store(make_store):
    return make_store(
        VarSpec("t2m", shape=(NT, NY, NX), chunks=(4, 8, 8)),
        VarSpec("q", shape=(NT, 3, NY, NX), chunks=(4, 3, 8, 8)),
        VarSpec("short", shape=(NT - 4, NY, NX), chunks=(4, 8, 8)),
    )


def loader(store, variables=("t2m",), **kw):
    kw.setdefault("device", "cpu")
    return zarrdali.ZarrLoader(store, list(variables), **kw)


def iterate(ld: zarrdali.ZarrLoader) -> int:
    return sum(1 for _ in ld)


# -- configuration errors, before any read ---------------------------------
def test_missing_store_path(tmp_path, no_chunk_reads):
    path = tmp_path / "nowhere" / "era5.zarr"
    with pytest.raises(StoreNotFoundError, match=re.escape(str(path))) as info:
        loader(path)
    assert isinstance(info.value, FileNotFoundError)  # ordinary handlers work


def test_directory_that_is_not_a_group(tmp_path, no_chunk_reads):
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(StoreNotFoundError, match=re.escape("empty.zarr")):
        loader(empty)


def test_path_to_an_array_not_a_group(store, no_chunk_reads):
    """An array is not a group: the store-not-found error, naming the path."""
    with pytest.raises(StoreNotFoundError, match=re.escape(str(store / "t2m"))):
        loader(store / "t2m", ["t2m"])


def test_unknown_variable_lists_existing_arrays(store, no_chunk_reads):
    with pytest.raises(VariableNotFoundError) as info:
        loader(store, ["t2m", "sst"])
    message = str(info.value)
    assert "sst" in message
    for name in ("q", "short", "t2m"):
        assert repr(name) in message
    assert isinstance(info.value, KeyError)


def test_variables_with_different_time_axes(store, no_chunk_reads):
    with pytest.raises(ConfigError) as info:
        loader(store, ["t2m", "short"])
    message = str(info.value)
    assert "'t2m'" in message and "'short'" in message
    assert str(NT) in message and str(NT - 4) in message
    assert "time" in message


def test_window_longer_than_time_axis(store, no_chunk_reads):
    with pytest.raises(ConfigError, match=rf"spans 13 time steps.*has {NT}"):
        loader(store, input_steps=10, target_steps=3)
    # via frame_step: 3 frames every 6 steps span 13 > 12
    with pytest.raises(ConfigError, match="spans 13"):
        loader(store, input_steps=2, target_steps=1, frame_step=6)


@pytest.mark.parametrize("tile", [(22, 8), (8, 34), (40, 40)])
def test_tile_larger_than_field(store, tile, no_chunk_reads):
    with pytest.raises(ConfigError) as info:
        loader(store, tile=tile)
    message = str(info.value)
    assert str(tile) in message and f"({NY}, {NX})" in message


@pytest.mark.parametrize("batch_size", [0, -3])
def test_batch_size_below_one(store, batch_size, no_chunk_reads):
    with pytest.raises(ConfigError, match=rf"batch_size.*{batch_size}"):
        loader(store, batch_size=batch_size)


def test_all_configuration_errors_are_zarrdali_errors(store, no_chunk_reads):
    for kwargs in (
        {"variables": ["nope"]},
        {"input_steps": 0},
        {"target_steps": -1},
        {"tile": (0, 4)},
        {"tile_sampling": "spiral"},
        {"normalize": "store"},  # no stats in the store
        {"normalize": {"t2m": (0.0, 0.0)}},  # std must be > 0
        {"device": "tpu"},
        {"rank": 2, "world_size": 2},
    ):
        variables = kwargs.pop("variables", ["t2m"])
        with pytest.raises(ZarrDaliError):
            loader(store, variables, **kwargs)


def test_zarr_v2_store_is_refused(tmp_path, no_chunk_reads):
    group = zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2)
    group.create_array("t2m", shape=(NT, NY, NX), chunks=(4, 8, 8), dtype="f4")
    with pytest.raises(ConfigError, match=r"'t2m'.*format 2"):
        loader(tmp_path / "v2.zarr")


def test_cuda_unavailable(store, no_chunk_reads):
    from zarrdali.gpu import missing_gpu_requirements

    missing = missing_gpu_requirements()
    if not missing:
        pytest.skip("this machine has everything the GPU path needs")
    with pytest.raises(BackendUnavailableError) as info:
        loader(store, device="cuda")
    message = str(info.value)
    for item in missing:
        assert item in message
    assert "device='cpu'" in message  # says how to get going anyway


# -- corrupted chunks, during iteration -------------------------------------
def corrupted_loader(store, name, **kw):
    kw.setdefault("tile", (8, 8))
    kw.setdefault("batch_size", 16)
    return loader(store, [name], **kw)


@pytest.mark.parametrize(
    ("compressor", "checksum"),
    [
        ("zstd", False),
        ("gzip", False),
        ("blosc", False),
        ("lz4", False),
        ("none", False),
        ("none", True),
        ("zstd", True),
    ],
)
def test_corrupted_chunk(make_store, compressor, checksum):
    store = make_store(
        VarSpec(
            "t2m", shape=(NT, NY, NX), chunks=(4, 8, 8), compressor=compressor, checksum=checksum
        )
    )
    key = "c/1/2/3"
    assert (store / "t2m" / key).exists()
    corrupt_chunk(store, "t2m", key, nbytes=100)  # 100 != 4 * 8 * 8 * 4 raw bytes
    ld = corrupted_loader(store, "t2m", shuffle=True)
    with pytest.raises(ChunkError) as info:
        iterate(ld)
    err = info.value
    assert err.array == "t2m" and err.key == key
    message = str(err)
    assert "'t2m'" in message and repr(key) in message and str(store) in message
    if checksum:
        assert "crc32c" in message


def test_truncated_chunk_file(make_store):
    store = make_store(VarSpec("t2m", shape=(NT, NY, NX), chunks=(4, 8, 8), compressor="none"))
    path = store / "t2m" / "c/0/0/0"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ChunkError, match=r"'t2m'.*'c/0/0/0'"):
        iterate(corrupted_loader(store, "t2m"))


SHARDED = {"shape": (NT, NY, NX), "chunks": (2, 8, 8), "shards": (4, 16, 16)}


@pytest.mark.parametrize("compressor", ["zstd", "gzip", "blosc", "lz4"])
def test_corrupted_bytes_inside_shard(make_store, compressor):
    store = make_store(VarSpec("w", compressor=compressor, **SHARDED))
    key = "c/1/1/0"  # steps 4..7, y 16..20 (edge), x 0..15
    first = corrupt_inside_shard(store, "w", key)
    # the corrupted inner chunk, in array chunk coordinates
    local = np.unravel_index(first, (2, 2, 2))
    inner = tuple(int(s * n + c) for s, n, c in zip((1, 1, 0), (2, 2, 2), local, strict=True))
    with pytest.raises(ChunkError) as info:
        iterate(corrupted_loader(store, "w"))
    err = info.value
    assert err.array == "w"
    assert err.key.startswith(key)
    assert str(inner) in err.key  # names the inner chunk too
    assert "'w'" in str(err) and key in str(err)


def test_corrupted_inner_chunk_with_checksum(make_store):
    store = make_store(VarSpec("w", compressor="none", checksum=True, **SHARDED))
    key = "c/0/0/1"
    corrupt_inside_shard(store, "w", key)
    with pytest.raises(ChunkError, match=r"crc32c.*'w'.*c/0/0/1") as info:
        iterate(corrupted_loader(store, "w"))
    assert info.value.key.startswith(key)


def test_corrupted_shard_index(make_store):
    store = make_store(VarSpec("w", compressor="zstd", **SHARDED))
    key = "c/2/0/2"
    path = store / "w" / key
    raw = bytearray(path.read_bytes())
    index = shard_index(store, "w", key)
    assert (index[0] != np.uint64(2**64 - 1)).all()  # first inner chunk is stored
    start = len(raw) - (len(index) * 16 + 4)
    raw[start : start + 16] = bytes(16)  # its index entry, crc32c left as it was
    path.write_bytes(bytes(raw))
    with pytest.raises(ChunkError, match=r"index.*'w'.*'c/2/0/2'") as info:
        iterate(corrupted_loader(store, "w"))
    assert info.value.key == key


def test_truncated_shard(make_store):
    store = make_store(VarSpec("w", compressor="zstd", **SHARDED))
    key = "c/0/1/1"
    path = store / "w" / key
    path.write_bytes(path.read_bytes()[:10])  # smaller than its own index
    with pytest.raises(ChunkError, match=r"'w'.*'c/0/1/1'"):
        iterate(corrupted_loader(store, "w"))


def test_corrupted_chunk_among_several_variables(make_store):
    """The error names the variable whose chunk is bad, not another one."""
    store = make_store(
        VarSpec("a", shape=(NT, NY, NX), chunks=(4, 8, 8)),
        VarSpec("b", compressor="gzip", **SHARDED),
    )
    keys = [chunk_key(store, "b", f) for f in chunk_files(store, "b")]
    assert "c/2/1/2" in keys
    corrupt_inside_shard(store, "b", "c/2/1/2")
    assert shard_index(store, "b", "c/2/1/2").shape == (8, 2)
    with pytest.raises(ChunkError) as info:
        iterate(loader(store, ["a", "b"], tile=(8, 8), batch_size=16))
    assert info.value.array == "b" and info.value.key.startswith("c/2/1/2")


@pytest.mark.parametrize("unsupported", ["transpose", "delta"])
def test_corrupted_chunk_read_through_fallback(make_store, unsupported):
    """Chunks read through zarr-python are chunks too: a bad one is a ChunkError."""
    store = make_store(
        VarSpec(
            "slow", shape=(NT, NY, NX), chunks=(4, 8, 8), dtype="int16", unsupported=unsupported
        )
    )
    key = "c/1/0/1"
    corrupt_chunk(store, "slow", key)
    with pytest.warns(UserWarning, match="zarr-python"), pytest.raises(ChunkError) as info:
        iterate(corrupted_loader(store, "slow"))
    assert info.value.array == "slow"
    assert key in str(info.value)


def test_failed_batch_returns_only_when_no_task_still_writes():
    """A chunk error must not return while other decode tasks still write into the
    batch's ring slot: the loader unmaps it next (the write was a segfault)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from zarrdali.batch.backend import finish_all

    wrote = threading.Event()
    started = threading.Event()

    def fails() -> None:
        started.wait(5)
        raise ChunkError("bad bytes", store="s", array="u", key="c/0/0/0")

    def writes_slowly() -> None:
        started.set()
        time.sleep(0.3)
        wrote.set()

    def queued() -> None:
        time.sleep(0.1)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(fails), pool.submit(writes_slowly), pool.submit(queued)]
        with pytest.raises(ChunkError, match="c/0/0/0"):
            finish_all(futures)
        assert wrote.is_set()
        assert all(f.done() for f in futures)  # cancelled or finished, none running
