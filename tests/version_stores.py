"""The store that each supported zarr-python line writes for the cross-version tests.

``python tests/version_stores.py`` writes it with the zarr-python of the running
interpreter into ``tests/fixtures/zarr-<version>/store.zarr``; the committed
copies (one per zarr line CI tests) are read by ``test_zarr_versions.py`` in
every environment, so a store written by zarr 3.1 is read under zarr 3.4 and
the other way round. Tiny: 8 time steps of 12 x 14 with edge chunks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from storefactory import VarSpec, synthetic_data, write_store

FIXTURES = Path(__file__).parent / "fixtures"
SHAPE, CHUNKS = (8, 12, 14), (4, 8, 8)
WRITTEN = (0, 4)  # "missing*" arrays: time steps 4.. never written

SPECS: tuple[VarSpec, ...] = (
    VarSpec("plain", shape=SHAPE, chunks=CHUNKS),
    VarSpec("sharded", shape=SHAPE, chunks=(2, 4, 4), shards=(4, 8, 8), seed=1),
    VarSpec(
        "sharded_start",
        shape=SHAPE,
        chunks=(2, 4, 4),
        shards=(4, 8, 8),
        index_location="start",
        index_endian="big",
        seed=2,
    ),
    VarSpec("gzip", shape=SHAPE, chunks=CHUNKS, compressor="gzip", seed=3),
    VarSpec("blosc", shape=SHAPE, chunks=CHUNKS, compressor="blosc", seed=4),
    VarSpec("lz4", shape=SHAPE, chunks=CHUNKS, compressor="lz4", seed=5),
    VarSpec("raw_crc", shape=SHAPE, chunks=CHUNKS, compressor="none", checksum=True, seed=6),
    VarSpec("big", shape=SHAPE, chunks=CHUNKS, endian="big", seed=7),
    VarSpec("i16", shape=SHAPE, chunks=CHUNKS, dtype="int16", fill_value=-9999, seed=8),
    VarSpec(
        "i16_big",
        shape=SHAPE,
        chunks=CHUNKS,
        dtype="int16",
        endian="big",
        compressor="gzip",
        seed=9,
    ),
    VarSpec(
        "missing",
        shape=SHAPE,
        chunks=CHUNKS,
        fill_value=float("nan"),
        written_time=WRITTEN,
        seed=10,
    ),
    VarSpec(
        "missing_sharded",
        shape=SHAPE,
        chunks=(2, 4, 4),
        shards=(4, 8, 8),
        fill_value=-1.5,
        written_time=(0, 2),
        seed=11,
    ),
    VarSpec("levels", shape=(8, 2, 12, 14), chunks=(4, 1, 8, 8), seed=12),
)


# Arrays written with zarr-python's own defaults (its default codecs, whatever this
# zarr line writes) and other chunk key encodings: create_array keywords.
EXTRA: dict[str, dict] = {
    "defaults": {},
    "dotkeys": {"chunk_key_encoding": {"name": "default", "separator": "."}},
    "v2keys": {"chunk_key_encoding": {"name": "v2", "separator": "."}},
}
EXTRA_SPECS = {
    name: VarSpec(name, shape=SHAPE, chunks=CHUNKS, seed=20 + k) for k, name in enumerate(EXTRA)
}


def all_specs() -> tuple[VarSpec, ...]:
    return (*SPECS, *EXTRA_SPECS.values())


def expected(spec: VarSpec) -> np.ndarray:
    """What the array holds: the synthetic data, the fill value where never written."""
    data = synthetic_data(spec)
    if spec.written_time is not None:
        t0, t1 = spec.written_time
        data[:t0] = spec.fill_value
        data[t1:] = spec.fill_value
    return data


def main() -> None:
    import numcodecs
    import zarr

    out = FIXTURES / f"zarr-{zarr.__version__}"
    store = write_store(out / "store.zarr", SPECS)
    group = zarr.open_group(store, mode="r+")
    for name, kwargs in EXTRA.items():
        spec = EXTRA_SPECS[name]
        array = group.create_array(
            name, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype, **kwargs
        )
        array[...] = synthetic_data(spec)
    versions = {"zarr": zarr.__version__, "numcodecs": numcodecs.__version__}
    versions["python"] = ".".join(map(str, sys.version_info[:3]))
    (out / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")
    print(f"wrote {store} with {versions}")


if __name__ == "__main__":
    main()
