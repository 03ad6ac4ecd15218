"""Hostile metadata: the constructor refuses what cannot fit, before allocating it,
and every metadata error names the store and the array.

Each store is a tiny array written by zarr-python whose ``zarr.json`` is then
edited to say what a hostile or broken store says (no chunk of the claimed size
is ever written). The constructor runs under ``tracemalloc``: refusing must not
cost more than a few MB (numpy reports its array allocations to it).
"""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from pathlib import Path

import pytest

import zarrdali
from storefactory import VarSpec, write_store
from zarrdali.errors import ConfigError, MetadataError, UnknownCodecError

ALLOWED_PEAK = 64 << 20  # bytes the constructor may allocate before refusing


def _store(tmp_path: Path, spec: VarSpec, **edits) -> Path:
    """A store holding ``spec`` (and a good array "ok"); ``edits`` replace keys of the
    JSON document of ``spec``: ``shape``, ``chunks`` (the grid's chunk shape) and
    ``inner`` (the sharding codec's chunk shape)."""
    store = write_store(
        tmp_path / "hostile.zarr",
        [spec, VarSpec("ok", shape=(*spec.shape[:1], 16, 16), chunks=(1, 8, 8))],
    )
    path = store / spec.name / "zarr.json"
    doc = json.loads(path.read_text())
    if "shape" in edits:
        doc["shape"] = list(edits["shape"])
    if "chunks" in edits:
        doc["chunk_grid"]["configuration"]["chunk_shape"] = list(edits["chunks"])
    if "inner" in edits:
        assert doc["codecs"][0]["name"] == "sharding_indexed"
        doc["codecs"][0]["configuration"]["chunk_shape"] = list(edits["inner"])
    path.write_text(json.dumps(doc))
    return store


def _refused(store: Path, name: str, error=ConfigError, **kw) -> ConfigError:
    """Construct a loader of ``name``; it must raise ``error`` naming store and array,
    having allocated at most ALLOWED_PEAK bytes."""
    kw.setdefault("tile", (8, 8))
    tracemalloc.start()
    try:
        with pytest.raises(error) as info:
            zarrdali.ZarrLoader(store, [name], input_steps=2, device="cpu", workers=0, **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert str(store) in message, message
    assert repr(name) in message, message
    assert peak < ALLOWED_PEAK, f"allocated {peak:,} bytes before refusing"
    return info.value


def test_time_axis_of_a_trillion_steps_is_refused(tmp_path):
    store = _store(
        tmp_path, VarSpec("t", shape=(8, 16, 16), chunks=(1, 8, 8)), shape=(10**12, 16, 16)
    )
    err = _refused(store, "t")
    assert "memory" in str(err)


def test_time_axis_of_a_trillion_steps_in_long_chunks_is_refused(tmp_path):
    """Few storage objects, but a trillion candidate samples: the plan cannot fit."""
    store = _store(
        tmp_path,
        VarSpec("t", shape=(8, 16, 16), chunks=(1, 8, 8)),
        shape=(10**12, 16, 16),
        chunks=(10**6, 8, 8),
    )
    err = _refused(store, "t")
    assert "samples" in str(err)


def test_whole_field_of_a_trillion_elements_is_refused(tmp_path):
    store = _store(
        tmp_path,
        VarSpec("f", shape=(4, 16, 16), chunks=(1, 8, 8)),
        shape=(4, 10**6, 10**6),
        chunks=(1, 1000, 1000),
    )
    err = _refused(store, "f", tile=None, batch_size=1)
    assert "batch" in str(err)


def test_four_terabyte_chunk_is_refused(tmp_path):
    store = _store(
        tmp_path,
        VarSpec("c", shape=(4, 16, 16), chunks=(1, 8, 8)),
        shape=(4, 10**6, 10**6),
        chunks=(1, 10**6, 10**6),
    )
    err = _refused(store, "c", error=MetadataError)
    assert "chunk" in str(err)


def test_shard_of_two_billion_inner_chunks_is_refused(tmp_path):
    store = _store(
        tmp_path,
        VarSpec("s", shape=(2, 16, 16), chunks=(1, 4, 4), shards=(1, 8, 8)),
        shape=(2, 40_000, 50_000),
        chunks=(1, 40_000, 50_000),
        inner=(1, 1, 1),
    )
    err = _refused(store, "s", error=MetadataError)
    assert "index" in str(err)


@pytest.mark.parametrize("where", ["chunks", "inner"])
def test_chunk_dimension_zero_is_a_named_error(tmp_path, where):
    spec = VarSpec("z", shape=(8, 16, 16), chunks=(1, 4, 4), shards=(1, 8, 8))
    store = _store(tmp_path, spec, **{where: (1, 0, 8)})
    _refused(store, "z", error=MetadataError)


def test_invalid_json_in_one_array_is_a_named_error(tmp_path):
    store = _store(tmp_path, VarSpec("j", shape=(8, 16, 16), chunks=(1, 8, 8)))
    path = store / "j" / "zarr.json"
    path.write_text(path.read_text()[:-20])  # cut short
    err = _refused(store, "j", error=MetadataError)
    assert "JSON" in str(err)
    # the other array of the store is unaffected
    with zarrdali.ZarrLoader(store, ["ok"], input_steps=2, tile=(8, 8), device="cpu") as ok:
        assert len(ok) > 0


def test_invalid_json_in_the_group_names_the_store(tmp_path):
    store = _store(tmp_path, VarSpec("g", shape=(8, 16, 16), chunks=(1, 8, 8)))
    (store / "zarr.json").write_text("{not json")
    with pytest.raises(MetadataError) as info:
        zarrdali.ZarrLoader(store, ["g"], input_steps=2, tile=(8, 8), device="cpu")
    assert str(store) in str(info.value) and "JSON" in str(info.value)


def test_unknown_codec_names_the_variable(tmp_path):
    store = _store(tmp_path, VarSpec("u", shape=(8, 16, 16), chunks=(1, 8, 8)))
    path = store / "u" / "zarr.json"
    doc = json.loads(path.read_text())
    doc["codecs"].append({"name": "no-such-codec", "configuration": {}})
    path.write_text(json.dumps(doc))
    err = _refused(store, "u", error=UnknownCodecError)
    assert "no-such-codec" in str(err)


def test_unknown_data_type_names_the_variable(tmp_path):
    store = _store(tmp_path, VarSpec("d", shape=(8, 16, 16), chunks=(1, 8, 8)))
    path = store / "d" / "zarr.json"
    doc = json.loads(path.read_text())
    doc["data_type"] = "float37"
    path.write_text(json.dumps(doc))
    err = _refused(store, "d", error=MetadataError)
    assert "float37" in str(err)


def test_bounds_hold_on_machines_with_much_memory(tmp_path, monkeypatch):
    """A shard index of 32 GB is refused even with 1 TB of memory; the other bounds
    scale with memory: a 4 GB chunk passes there, and is refused with 8 GB."""
    import zarrdali.store.open as store
    from zarrdali.store.open import check_fits, load_layouts, open_group

    monkeypatch.setattr(store, "available_memory", lambda: 1 << 40)  # 1 TiB

    shard = _store(
        tmp_path,
        VarSpec("s", shape=(2, 16, 16), chunks=(1, 4, 4), shards=(1, 8, 8)),
        shape=(2, 40_000, 50_000),
        chunks=(1, 40_000, 50_000),
        inner=(1, 1, 1),
    )
    group, name = open_group(shard)
    with pytest.raises(MetadataError, match="index"):
        load_layouts(group, name, ["s"])
    ok = load_layouts(group, name, ["ok"])[0]
    big = dataclasses.replace(ok, chunk_shape=(1, 32_000, 32_000))  # 4.1 GB float32
    check_fits(big, name, memory=1 << 40)
    with pytest.raises(MetadataError, match="one chunk"):
        check_fits(big, name, memory=8 << 30)
