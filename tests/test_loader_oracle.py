"""ZarrLoader on the CPU path against an oracle: zarr-python (and xarray) reading
the same store at ``batch["index"]``.

Every batch of every epoch is checked, bit for bit: for ``(t0, y0, x0)`` the
frames are ``arr[t0 + f * frame_step, (levels), y0 : y0 + H, x0 : x0 + W]``
stacked as channels and cast to float32.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import zarr

import zarrdali
from storefactory import (
    COMPRESSORS,
    VarSpec,
    chunk_files,
    chunk_key,
    delete_chunks,
    open_arrays,
    shard_index,
)

DATA_DIR = Path(__file__).parents[2] / "shared" / "data"
ERA_INTERIM = DATA_DIR / "eraint_uvz.nc"

NT, NY, NX = 20, 21, 33  # 21 x 33 with 8 x 8 chunks/tiles: edge chunks and edge tiles


# -- helpers ----------------------------------------------------------------
def to_numpy(batch: dict) -> dict[str, np.ndarray]:
    return {k: v.cpu().numpy() for k, v in batch.items()}


def run_epochs(loader: zarrdali.ZarrLoader, epochs: Sequence[int]) -> dict[int, list[dict]]:
    """All batches of the given epochs, as numpy."""
    out = {}
    for e in epochs:
        loader.set_epoch(e)
        out[e] = [to_numpy(b) for b in loader]
    return out


class Oracle:
    """Expected windows, read from the store by zarr-python.

    ``mode="full"`` reads each variable once and slices in numpy; ``"sliced"``
    asks zarr-python for exactly the window of each sample.
    """

    def __init__(self, store, variables: Sequence[str], mode: str = "full") -> None:
        self.variables = list(variables)
        self.mode = mode
        if mode == "full":
            self.arrays = open_arrays(store, variables)
        else:
            group = zarr.open_group(store, mode="r")
            self.arrays = {v: group[v] for v in variables}
        first = self.arrays[self.variables[0]]
        self.nt, self.ny, self.nx = first.shape[0], first.shape[-2], first.shape[-1]

    def window(self, t0, y0, x0, n_frames, frame_step, hw) -> np.ndarray:
        """``[n_frames, C, H, W]`` float32."""
        h, w = hw
        span = (n_frames - 1) * frame_step + 1
        channels = []
        for v in self.variables:
            key = (slice(t0, t0 + span, frame_step), Ellipsis, slice(y0, y0 + h), slice(x0, x0 + w))
            a = np.asarray(self.arrays[v][key])
            if a.ndim == 3:
                a = a[:, None]
            channels.append(a)
        return np.concatenate(channels, axis=1).astype(np.float32)


def check_batches(
    batches: list[dict],
    oracle: Oracle,
    *,
    input_steps: int,
    target_steps: int,
    tile: tuple[int, int] | None,
    frame_step: int = 1,
    normalize: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Every sample of every batch equals the oracle's window at its index."""
    hw = tile or (oracle.ny, oracle.nx)
    n_frames = input_steps + target_steps
    n_channels = None
    for k, batch in enumerate(batches):
        index = batch["index"]
        assert index.dtype == np.int64 and index.ndim == 2 and index.shape[1] == 3
        b = len(index)
        assert batch["input"].dtype == np.float32
        if n_channels is None:
            n_channels = batch["input"].shape[2]
        assert batch["input"].shape == (b, input_steps, n_channels, *hw)
        if target_steps:
            assert batch["target"].dtype == np.float32
            assert batch["target"].shape == (b, target_steps, n_channels, *hw)
        else:
            assert "target" not in batch
        for i, (t0, y0, x0) in enumerate(index.tolist()):
            expected = oracle.window(t0, y0, x0, n_frames, frame_step, hw)
            assert expected.shape[1] == n_channels
            got = batch["input"][i]
            if target_steps:
                got = np.concatenate([got, batch["target"][i]], axis=0)
            where = f"batch {k} sample {i} index {(t0, y0, x0)}"
            if normalize is None:
                np.testing.assert_array_equal(got, expected, err_msg=where)
            else:
                mean, std = (np.asarray(s, np.float32).reshape(1, -1, 1, 1) for s in normalize)
                want = (expected - mean) / std
                np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6, err_msg=where)


def tile_starts(size: int, tile: int, stride: int, cover_edges: bool) -> list[int]:
    """Independent re-statement of the documented tiling (for the set of candidates)."""
    starts = list(range(0, size - tile + 1, stride))
    if cover_edges and starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def candidate_set(nt, ny, nx, *, n_frames, frame_step=1, time_stride=1, tile, cover_edges=True):
    span = (n_frames - 1) * frame_step + 1
    h, w = tile or (ny, nx)
    return {
        (t, y, x)
        for t in range(0, nt - span + 1, time_stride)
        for y in tile_starts(ny, h, h, cover_edges)
        for x in tile_starts(nx, w, w, cover_edges)
    }


def served(batches: list[dict]) -> list[tuple[int, int, int]]:
    return [tuple(row) for b in batches for row in b["index"].tolist()]


def loader_for(store, variables, **kw) -> zarrdali.ZarrLoader:
    kw.setdefault("input_steps", 2)
    kw.setdefault("target_steps", 1)
    kw.setdefault("tile", (8, 8))
    kw.setdefault("batch_size", 24)
    kw.setdefault("shuffle", True)
    kw.setdefault("seed", 7)
    kw.setdefault("device", "cpu")
    kw.setdefault("num_threads", 2)
    return zarrdali.ZarrLoader(store, variables, **kw)


def check_loader(store, variables, *, epochs=(0, 1), oracle_mode="full", **kw) -> dict:
    """Run ``epochs`` of a loader and check every batch against the oracle."""
    loader = loader_for(store, variables, **kw)
    results = run_epochs(loader, epochs)
    oracle = Oracle(store, variables, mode=oracle_mode)
    for batches in results.values():
        assert len(batches) == len(loader)
        check_batches(
            batches,
            oracle,
            input_steps=loader.spec.input_steps,
            target_steps=loader.spec.target_steps,
            tile=loader.spec.tile,
            frame_step=loader.spec.frame_step,
            normalize=loader.stats,
        )
    loader.close()
    return results


def plain(name="x", **kw) -> VarSpec:
    kw.setdefault("shape", (NT, NY, NX))
    levels = tuple(kw["shape"][1:-2])  # one level chunk holds all levels unless given
    kw.setdefault("chunks", (4, *levels, 8, 8))
    return VarSpec(name, **kw)


def sharded(name="x", **kw) -> VarSpec:
    kw.setdefault("shape", (NT, NY, NX))
    levels = tuple(kw["shape"][1:-2])
    kw.setdefault("chunks", (2, *levels, 8, 8))
    kw.setdefault("shards", (4, *levels, 16, 16))
    return VarSpec(name, **kw)


LAYOUTS = {"plain": plain, "sharded": sharded}


# -- layouts, byte orders and codecs --------------------------------------
@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("endian", ["little", "big"])
@pytest.mark.parametrize("layout", ["plain", "sharded"])
def test_every_codec_layout_and_byteorder(make_store, layout, endian, compressor):
    store = make_store(LAYOUTS[layout](endian=endian, compressor=compressor))
    results = check_loader(store, ["x"], epochs=(0, 1))
    # shuffled epochs differ in order but serve the same samples
    assert served(results[0]) != served(results[1])
    assert sorted(served(results[0])) == sorted(served(results[1]))


@pytest.mark.parametrize(
    "var",
    [
        pytest.param(plain(checksum=True), id="plain-zstd-crc32c"),
        pytest.param(plain(compressor="none", checksum=True, endian="big"), id="plain-crc32c"),
        pytest.param(sharded(checksum=True, compressor="gzip"), id="sharded-inner-crc32c"),
        pytest.param(sharded(index_location="start"), id="index-start"),
        pytest.param(
            sharded(index_endian="big", index_crc32c=False, endian="big"), id="index-big-nocrc"
        ),
        pytest.param(
            sharded(index_location="start", index_endian="big", compressor="lz4", checksum=True),
            id="index-start-big-lz4-crc32c",
        ),
    ],
)
def test_checksums_and_shard_index_layouts(make_store, var):
    store = make_store(var)
    layout = zarrdali.ZarrLoader(store, ["x"], device="cpu").layouts[0]
    assert layout.fast_path  # these chains are the fast path's, not the fallback's
    check_loader(store, ["x"], epochs=(0, 1))


def test_store_given_as_zarr_group(make_store):
    store = make_store(sharded(endian="big"), plain("y", dtype="int16"))
    group = zarr.open_group(store, mode="r")
    results = check_loader(group, ["y", "x"], epochs=(0,))
    # same batches as from the path
    by_path = run_epochs(loader_for(store, ["y", "x"]), [0])[0]
    for got, want in zip(results[0], by_path, strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("layout", ["plain", "sharded"])
@pytest.mark.parametrize("endian", ["little", "big"])
def test_int16(make_store, layout, endian):
    store = make_store(LAYOUTS[layout](dtype="int16", endian=endian, fill_value=-7))
    results = check_loader(store, ["x"], epochs=(0, 3))
    values = np.concatenate([b["input"].ravel() for b in results[0]])
    assert values.min() < 0 < values.max()  # signed values survive the cast


@pytest.mark.parametrize("layout", ["plain", "sharded"])
def test_levels_give_one_channel_per_level(make_store, layout):
    if layout == "plain":
        var = plain("q", shape=(NT, 3, NY, NX), chunks=(4, 2, 8, 8), endian="big")
    else:
        var = sharded("q", shape=(NT, 3, NY, NX), chunks=(2, 2, 8, 8), shards=(4, 2, 16, 16))
    store = make_store(var, plain("t2m", seed=1))
    results = check_loader(store, ["t2m", "q"], epochs=(0, 1))
    assert results[0][0]["input"].shape[2] == 4  # t2m + 3 levels of q
    # channels are in variable order, levels in order: check one by hand too
    arrays = open_arrays(store, ["t2m", "q"])
    t0, y0, x0 = results[0][0]["index"][0].tolist()
    got = results[0][0]["input"][0]
    np.testing.assert_array_equal(got[0, 0], arrays["t2m"][t0, y0 : y0 + 8, x0 : x0 + 8])
    for lev in range(3):
        np.testing.assert_array_equal(
            got[1, 1 + lev], arrays["q"][t0 + 1, lev, y0 : y0 + 8, x0 : x0 + 8]
        )


def test_multiple_variables_with_different_dtypes(make_store):
    store = make_store(
        plain("a", endian="big", compressor="gzip", seed=1),
        sharded("b", dtype="int16", compressor="blosc", fill_value=3, seed=2),
        plain("c", shape=(NT, 2, NY, NX), chunks=(4, 1, 8, 8), compressor="lz4", seed=3),
        sharded("d", dtype="int16", endian="big", compressor="none", seed=4),
    )
    results = check_loader(store, ["d", "a", "c", "b"], epochs=(0, 1), batch_size=20)
    assert results[0][0]["input"].shape[2] == 5


# -- values: NaN, missing chunks, fill values -------------------------------
@pytest.mark.parametrize("layout", ["plain", "sharded"])
def test_nans_survive(make_store, layout):
    store = make_store(LAYOUTS[layout](nan_box=(3, 9, 5, 14, 10, 30), fill_value=np.nan))
    results = check_loader(store, ["x"], epochs=(0,))
    inputs = np.concatenate([b["input"].ravel() for b in results[0]])
    assert np.isnan(inputs).any() and np.isfinite(inputs).any()


def test_missing_chunks_plain_read_as_fill_value(make_store):
    # only steps 0..11 are written: chunks of steps 12.. never exist
    store = make_store(
        plain(written_time=(0, 12), fill_value=-999.0), plain("n", fill_value=np.nan)
    )
    # and a few chunk files removed by hand, including an edge chunk
    delete_chunks(store, "x", ["c/0/0/0", "c/1/2/4", "c/2/1/1"])
    delete_chunks(store, "n", ["c/0/0/0", "c/3/2/4"])
    assert not (store / "x" / "c" / "3").exists()
    results = check_loader(store, ["x", "n"], epochs=(0, 1))
    inputs = np.concatenate([b["input"][:, :, 0].ravel() for b in results[0]])
    assert (inputs == -999.0).any()
    assert np.isnan(np.concatenate([b["input"][:, :, 1].ravel() for b in results[0]])).any()


def test_missing_chunks_sharded_read_as_fill_value(make_store):
    # steps 0..5 written: shard 1 (steps 4..7) is partial, so some inner chunks of
    # a stored shard are never written (empty index entries); shards 2.. don't exist
    store = make_store(
        sharded(written_time=(0, 6), fill_value=-5.5),
        sharded("i", dtype="int16", fill_value=42, endian="big"),
    )
    index = shard_index(store, "x", "c/1/0/0")
    assert (index == np.uint64(2**64 - 1)).any()
    assert not (store / "x" / "c" / "2").exists()
    delete_chunks(store, "i", ["c/0/1/1", "c/3/0/2"])  # whole shard files gone
    results = check_loader(store, ["x", "i"], epochs=(0, 1))
    x = np.concatenate([b["input"][:, :, 0].ravel() for b in results[0]])
    i = np.concatenate([b["input"][:, :, 1].ravel() for b in results[0]])
    assert (x == -5.5).any() and (i == 42).any()


# -- sampling geometry -------------------------------------------------------
@pytest.mark.parametrize("cover_edges", [True, False])
def test_edge_tiles(make_store, cover_edges):
    store = make_store(plain())
    results = check_loader(store, ["x"], epochs=(0,), cover_edges=cover_edges)
    got = set(served(results[0]))
    assert got == candidate_set(NT, NY, NX, n_frames=3, tile=(8, 8), cover_edges=cover_edges)
    ys = {y for _, y, _ in got}
    xs = {x for _, _, x in got}
    if cover_edges:
        assert NY - 8 in ys and NX - 8 in xs  # flush with the far edge
    else:
        assert max(ys) + 8 < NY and max(xs) + 8 < NX


def test_tile_none_is_whole_field(make_store):
    store = make_store(sharded(compressor="gzip"), plain("y", shape=(NT, 2, NY, NX), seed=5))
    results = check_loader(store, ["x", "y"], tile=None, batch_size=4, epochs=(0, 1))
    batch = results[0][0]
    assert batch["input"].shape[-2:] == (NY, NX)
    assert set(served(results[0])) == {(t, 0, 0) for t in range(NT - 2)}


def test_frame_step_and_time_stride(make_store):
    store = make_store(plain(shape=(32, NY, NX)))
    results = check_loader(
        store, ["x"], input_steps=3, target_steps=2, frame_step=3, time_stride=2, epochs=(0, 1)
    )
    span = (5 - 1) * 3 + 1
    t0s = {t for t, _, _ in served(results[0])}
    assert t0s == set(range(0, 32 - span + 1, 2))


def test_frame_step_sliced_oracle(make_store):
    """The same with zarr-python asked for each window (strided slice) directly."""
    store = make_store(sharded(endian="big", shape=(24, NY, NX)))
    check_loader(
        store,
        ["x"],
        input_steps=2,
        target_steps=2,
        frame_step=2,
        tile=(10, 12),
        batch_size=32,
        epochs=(2,),
        oracle_mode="sliced",
    )


def test_random_tile_sampling(make_store):
    store = make_store(plain(compressor="blosc"))
    results = check_loader(store, ["x"], tile_sampling="random", epochs=(0, 1, 2))
    n_t0 = NT - 2
    n_tiles = len(tile_starts(NY, 8, 8, True)) * len(tile_starts(NX, 8, 8, True))
    offsets = []
    for batches in results.values():
        samples = served(batches)
        assert len(samples) == n_t0 * n_tiles
        assert Counter(t for t, _, _ in samples) == dict.fromkeys(range(n_t0), n_tiles)
        assert all(0 <= y <= NY - 8 and 0 <= x <= NX - 8 for _, y, x in samples)
        offsets.append(sorted(samples))
    assert offsets[0] != offsets[1]  # new offsets each epoch
    # offsets off the regular grid do occur
    grid = set(tile_starts(NY, 8, 8, True))
    assert any(y not in grid for _, y, _ in offsets[0])


def test_target_steps_zero_has_no_target(make_store):
    store = make_store(plain())
    results = check_loader(store, ["x"], input_steps=3, target_steps=0, epochs=(0,))
    assert all("target" not in b for b in results[0])
    assert set(results[0][0]) == {"input", "index"}


# -- normalization -----------------------------------------------------------
def test_normalize_given_per_variable_and_per_level(make_store):
    store = make_store(
        plain("a", seed=1),
        sharded("q", shape=(NT, 3, NY, NX), chunks=(2, 3, 8, 8), shards=(4, 3, 16, 16)),
        plain("i", dtype="int16", endian="big"),
    )
    normalize = {
        "a": (9000.0, 250.0),
        "q": ([100.0, 200.0, -300.0], [2.0, 40.0, 0.5]),
        "i": (-3, 7),
    }
    loader = loader_for(store, ["a", "q", "i"], normalize=normalize)
    np.testing.assert_array_equal(
        loader.stats[0], np.float32([9000, 100, 200, -300, -3])
    )  # channel order
    np.testing.assert_array_equal(loader.stats[1], np.float32([250, 2, 40, 0.5, 7]))
    check_loader(store, ["a", "q", "i"], normalize=normalize, epochs=(0, 1))


def test_normalize_from_store_stats(make_store):
    store = make_store(
        plain("a", attrs={"stats": {"mean": 9500.0, "std": 5000.0}}),
        plain(
            "q",
            shape=(NT, 2, NY, NX),
            chunks=(4, 1, 8, 8),
            attrs={"stats": {"mean": [1.0, 2.0], "std": [3.0, 4.0], "min": 0}},
        ),
    )
    loader = loader_for(store, ["a", "q"], normalize="store")
    np.testing.assert_array_equal(loader.stats[0], np.float32([9500, 1, 2]))
    np.testing.assert_array_equal(loader.stats[1], np.float32([5000, 3, 4]))
    check_loader(store, ["a", "q"], normalize="store", epochs=(0,))


# -- epochs, resume, ranks -------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_epoch_serves_every_candidate_once(make_store, batch_size):
    store = make_store(plain(shape=(8, NY, NX)))
    loader = loader_for(store, ["x"], batch_size=batch_size)
    candidates = candidate_set(8, NY, NX, n_frames=3, tile=(8, 8))
    for e in (0, 1):
        loader.set_epoch(e)
        batches = [to_numpy(b) for b in loader]
        assert len(batches) == len(loader) == -(-len(candidates) // batch_size)
        samples = served(batches)
        assert len(samples) == len(set(samples)) == len(candidates)
        assert set(samples) == candidates
        assert all(len(b["index"]) == batch_size for b in batches[:-1])


def test_drop_last(make_store):
    store = make_store(plain(shape=(8, NY, NX)))
    loader = loader_for(store, ["x"], batch_size=7, drop_last=True)
    candidates = candidate_set(8, NY, NX, n_frames=3, tile=(8, 8))
    batches = run_epochs(loader, [0])[0]
    assert len(batches) == len(loader) == len(candidates) // 7
    assert all(len(b["index"]) == 7 for b in batches)
    samples = served(batches)
    assert len(set(samples)) == len(samples) and set(samples) <= candidates


@pytest.mark.parametrize("stop_after", [1, 5])
def test_state_dict_resumes_mid_epoch(make_store, stop_after):
    store = make_store(sharded(compressor="zstd", endian="big"))
    kw = {"batch_size": 16, "seed": 3}
    reference = run_epochs(loader_for(store, ["x"], **kw), [2])[2]
    assert len(reference) > stop_after + 2

    first = loader_for(store, ["x"], **kw)
    first.set_epoch(2)
    it = iter(first)
    head = [to_numpy(next(it)) for _ in range(stop_after)]
    state = first.state_dict()
    it.close()
    first.close()
    assert state["epoch"] == 2 and state["batches_served"] == stop_after

    fresh = loader_for(store, ["x"], **kw)
    fresh.load_state_dict(state)
    tail = [to_numpy(b) for b in fresh]
    assert len(head) + len(tail) == len(reference)
    for got, want in zip(head + tail, reference, strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # and the next epoch is whole again
    fresh.set_epoch(3)
    assert sum(1 for _ in fresh) == len(fresh)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_samples_and_equal_batches(make_store, world_size):
    store = make_store(plain(shape=(10, NY, NX)))
    candidates = candidate_set(10, NY, NX, n_frames=3, tile=(8, 8))
    oracle = Oracle(store, ["x"])
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world_size):
            loader = loader_for(store, ["x"], batch_size=10, rank=rank, world_size=world_size)
            batches = run_epochs(loader, [epoch])[epoch]
            assert len(batches) == len(loader)
            check_batches(batches, oracle, input_steps=2, target_steps=1, tile=(8, 8))
            per_rank.append(served(batches))
            loader.close()
        counts = {len(s) for s in per_rank}
        assert counts == {len(candidates) // world_size}
        union = [s for samples in per_rank for s in samples]
        assert len(union) == len(set(union))  # disjoint
        assert set(union) <= candidates


# -- the zarr-python fallback ------------------------------------------------
@pytest.mark.parametrize("unsupported", ["transpose", "delta"])
@pytest.mark.parametrize("layout", ["plain", "sharded"])
def test_unsupported_chain_falls_back_with_one_warning(make_store, layout, unsupported):
    dtype = "int16" if unsupported == "delta" else "float32"
    store = make_store(
        LAYOUTS[layout](
            "slow", shape=(8, NY, NX), unsupported=unsupported, dtype=dtype, endian="big"
        ),
        plain("fast", shape=(8, NY, NX), seed=2),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_loader(store, ["fast", "slow"], epochs=(0, 1))
    fallback = [w for w in caught if "read through zarr-python" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in fallback]
    assert issubclass(fallback[0].category, UserWarning)
    assert "'slow'" in str(fallback[0].message)


# -- xarray as the oracle ------------------------------------------------------
def test_xarray_oracle(make_store):
    xr = pytest.importorskip("xarray")
    store = make_store(
        plain("t2m", endian="big", fill_value=np.nan, nan_box=(0, 4, 0, 5, 0, 5)),
        sharded("q", shape=(NT, 3, NY, NX), chunks=(2, 2, 8, 8), shards=(4, 2, 16, 16)),
        plain("i", dtype="int16", fill_value=-1, written_time=(0, 12)),
    )
    variables = ["q", "t2m", "i"]
    loader = loader_for(store, variables, input_steps=1, target_steps=2, frame_step=2)
    batches = run_epochs(loader, [0])[0]
    ds = xr.open_zarr(store, consolidated=False, mask_and_scale=False).load()
    for batch in batches:
        for i, (t0, y0, x0) in enumerate(batch["index"].tolist()):
            window = ds.isel(
                time=slice(t0, t0 + 5, 2), y=slice(y0, y0 + 8), x=slice(x0, x0 + 8)
            ).load()
            channels = [window[v].values for v in variables]
            channels = [c if c.ndim == 4 else c[:, None] for c in channels]
            expected = np.concatenate(channels, axis=1).astype(np.float32)
            got = np.concatenate([batch["input"][i], batch["target"][i]], axis=0)
            np.testing.assert_array_equal(got, expected)


@pytest.mark.skipif(not ERA_INTERIM.exists(), reason=f"real data file {ERA_INTERIM} is absent")
@pytest.mark.parametrize("decode_cf", [True, False], ids=["decoded", "stored"])
def test_real_era_interim_data(tmp_path, decode_cf):
    """ERA-Interim u/v/z on pressure levels, converted to Zarr v3 with xarray: u
    and v packed int16 as the file holds them. Its time axis is named ``month``
    (monthly means), which ``dims`` names; the oracle is xarray's view, decoded
    (the default) or stored (``decode_cf=False``)."""
    xr = pytest.importorskip("xarray")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-conforming _FillValue for int16 in the file
        src = xr.open_dataset(ERA_INTERIM, mask_and_scale=False)
        sub = src.isel(latitude=slice(0, 70), longitude=slice(0, 100)).load()
    src.close()
    assert sub["u"].dims == ("month", "level", "latitude", "longitude")
    for name in sub.variables:
        sub[name].encoding = {}
        sub[name].attrs.pop("_FillValue", None)  # NaN fill for int16 cannot be written
    # z as float32 physical values that keep the file's scale_factor/add_offset (xarray
    # keeps attributes through the arithmetic): xarray unpacks it once more, in float32
    # (zarrdali/store/cf.py); u and v stay packed int16, unpacked in float64
    z = sub["z"]
    z_phys = (z.astype("float64") * z.attrs["scale_factor"] + z.attrs["add_offset"]).astype(
        "float32"
    )
    sub["z"] = z_phys.assign_attrs(units=z.attrs["units"])
    encoding = {
        "u": {"chunks": (1, 2, 16, 16)},
        "v": {"chunks": (1, 3, 32, 32)},
        "z": {"chunks": (1, 2, 16, 16), "shards": (2, 2, 32, 32)},
    }
    path = tmp_path / "eraint.zarr"
    sub.to_zarr(path, mode="w", zarr_format=3, consolidated=False, encoding=encoding)

    variables = ["z", "u", "v"]
    with pytest.raises(zarrdali.ConfigError, match=r"'month' is none of time"):
        loader_for(path, variables)
    loader = loader_for(
        path,
        variables,
        input_steps=1,
        target_steps=1,
        tile=(16, 24),
        batch_size=4,
        num_threads=2,
        dims={"time": "month"},
        decode_cf=decode_cf,
    )
    assert loader.num_channels == 9
    assert loader.channels == [f"{v}@{p}" for v in variables for p in (200, 500, 850)]
    ds = xr.open_zarr(path, consolidated=False, mask_and_scale=decode_cf)
    assert ds["u"].dtype == (np.float64 if decode_cf else np.int16)
    assert ds["z"].dtype == np.float32
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = [to_numpy(b) for b in loader]
        assert len(batches) == len(loader)
        samples = served(batches)
        assert set(samples) == candidate_set(2, 70, 100, n_frames=2, tile=(16, 24))
        for batch in batches:
            for i, (t0, y0, x0) in enumerate(batch["index"].tolist()):
                window = ds.isel(
                    month=slice(t0, t0 + 2),
                    latitude=slice(y0, y0 + 16),
                    longitude=slice(x0, x0 + 24),
                )
                expected = np.concatenate([window[v].values for v in variables], axis=1)
                expected = expected.astype(np.float32)
                np.testing.assert_array_equal(batch["input"][i], expected[:1])
                np.testing.assert_array_equal(batch["target"][i], expected[1:])


# -- the GPU path against the same oracle (skipped without a GPU) ----------------
@pytest.mark.gpu
def test_gpu_path_matches_oracle(make_store):
    store = make_store(sharded(endian="little", compressor="zstd"), plain("y", compressor="lz4"))
    check_loader(store, ["x", "y"], device="cuda", epochs=(0, 1))


def test_stored_files_sanity(make_store):
    """The factory writes what the tests above assume (edge chunks, shard files)."""
    store = make_store(plain(), sharded("s"))
    keys = {chunk_key(store, "x", f) for f in chunk_files(store, "x")}
    assert "c/4/2/4" in keys  # last time chunk, edge chunk in y and x
    assert len(keys) == 5 * 3 * 5
    skeys = {chunk_key(store, "s", f) for f in chunk_files(store, "s")}
    assert skeys == {f"c/{t}/{y}/{x}" for t in range(5) for y in range(2) for x in range(3)}


# -- chunks decoded straight into the batch ----------------------------------
@pytest.mark.parametrize(
    "specs",
    [
        [sharded(chunks=(1, 8, 8), shards=(2, 16, 16))],
        [sharded(shape=(NT, 3, NY, NX), chunks=(1, 3, 8, 8), shards=(2, 3, 16, 16))],
        [sharded(shape=(NT, 4, NY, NX), chunks=(1, 2, 8, 8), shards=(2, 4, 16, 16))],
        [sharded(chunks=(1, 8, 8), shards=(2, 16, 16), endian="big")],
        [
            sharded("a", chunks=(1, 8, 8), shards=(2, 16, 16)),
            sharded("b", chunks=(1, 8, 8), shards=(2, 16, 16), dtype="int16"),
        ],
        [plain(chunks=(1, 8, 8), compressor="lz4")],
    ],
    ids=["one-level", "levels-whole", "levels-split", "big-endian", "mixed-dtypes", "plain-lz4"],
)
@pytest.mark.parametrize("tile", [(8, 8), (16, 16)])
def test_chunks_decoded_in_place_equal_the_oracle(make_store, specs, tile):
    """Tiles aligned with t=1 inner chunks: whole chunks go straight into the batch
    where their bytes are the batch's (same dtype, native order); the rest are copied."""
    from zarrdali.batch.plan import chunk_shape4, plan_batch
    from zarrdali.cpu.backend import decodes_in_place

    store = make_store(*specs)
    names = [s.name for s in specs]
    results = check_loader(store, names, tile=tile, cover_edges=True)
    # which chunks went straight in, for one batch: the rule, checked independently
    loader = loader_for(store, names, tile=tile)
    samples = results[0][0]["index"]
    plan = plan_batch(loader.layouts, samples, n_frames=3, frame_step=1, tile_hw=tile)
    order, bounds = plan.piece_order
    direct = decodes_in_place(loader.layouts, plan, plan.pieces[order], bounds)
    same_bytes = [
        s.dtype == np.result_type(*[t.dtype for t in specs]) and s.endian == "little" for s in specs
    ]
    for i in np.flatnonzero(direct):
        v = plan.chunk_var[i]
        (k,) = np.flatnonzero(plan.piece_chunk == i)  # exactly one piece
        assert same_bytes[v]
        assert tuple(plan.piece_extent[k]) == chunk_shape4(loader.layouts[v])[1:]
        assert plan.piece_dst[k][4] == 0 and plan.piece_extent[k][2] == tile[1], "whole rows"
    # 8-wide chunks span whole rows of an 8-wide tile only
    assert direct.any() == (any(same_bytes) and tile == (8, 8))
    loader.close()
