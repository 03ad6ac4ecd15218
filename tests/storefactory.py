"""Small synthetic Zarr v3 stores for the loader tests, written with zarr-python.

Every store is tiny (tens of time steps, grids like 21 x 33 with 8 x 8 chunks so
that edge chunks and edge tiles occur) and deterministic in its seed. A store is
described by a list of :class:`VarSpec`; :func:`write_store` writes it and
returns what was written so tests can also reason about it (which chunks are
missing, what the fill value is), but the oracle in the tests is always
zarr-python (or xarray) reading the store back.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    GzipCodec,
    ShardingCodec,
    TransposeCodec,
    ZstdCodec,
)

Compressor = Literal["none", "zstd", "gzip", "blosc", "lz4"]
COMPRESSORS: tuple[Compressor, ...] = ("none", "zstd", "gzip", "blosc", "lz4")

# Chains the fast path does not decode; they must go through zarr-python.
Unsupported = Literal["transpose", "delta"]


@dataclass(frozen=True)
class VarSpec:
    """One array of a synthetic store.

    ``shape`` is ``(time, y, x)`` or ``(time, level, y, x)``; ``chunks`` has the
    same rank (the inner chunk when ``shards`` is given). ``written_time``
    limits the time steps written (the rest is never written: missing chunks).
    ``nan_box`` is ``(t0, t1, y0, y1, x0, x1)``: a region set to the variable's
    missing marker: the first of its ``missing_value`` attribute, else its
    ``_FillValue`` attribute, else NaN (floats).
    ``checksum`` appends a crc32c codec to the (inner) chunk chain; the
    ``index_*`` fields choose the shard index layout (zarr's default: at the
    end, little-endian, with crc32c).
    """

    name: str
    shape: tuple[int, ...] = (24, 21, 33)
    chunks: tuple[int, ...] = (4, 8, 8)
    shards: tuple[int, ...] | None = None
    dtype: str = "float32"
    endian: Literal["little", "big"] = "little"
    compressor: Compressor = "zstd"
    unsupported: Unsupported | None = None
    checksum: bool = False
    index_location: Literal["start", "end"] = "end"
    index_endian: Literal["little", "big"] = "little"
    index_crc32c: bool = True
    fill_value: Any = 0
    nan_box: tuple[int, int, int, int, int, int] | None = None
    written_time: tuple[int, int] | None = None
    attrs: dict = field(default_factory=dict)
    seed: int = 0

    @property
    def dims(self) -> list[str]:
        return ["time", "level", "y", "x"] if len(self.shape) == 4 else ["time", "y", "x"]

    def but(self, **changes: Any) -> VarSpec:
        return replace(self, **changes)


def compressors_for(name: Compressor) -> list:
    """The zarr v3 compressor list for a compressor name."""
    if name == "none":
        return []
    if name == "zstd":
        return [ZstdCodec(level=3)]
    if name == "gzip":
        return [GzipCodec(level=5)]
    if name == "blosc":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    if name == "lz4":
        from zarr.codecs.numcodecs import LZ4

        with warnings.catch_warnings():  # "Numcodecs codecs are not in the spec"
            warnings.simplefilter("ignore")
            return [LZ4()]
    raise ValueError(f"unknown compressor {name!r}")


def filters_for(spec: VarSpec) -> list:
    if spec.unsupported is None:
        return []
    if spec.unsupported == "transpose":
        return [TransposeCodec(order=tuple(reversed(range(len(spec.shape)))))]
    if spec.unsupported == "delta":
        from zarr.codecs.numcodecs import Delta

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [Delta(dtype=np.dtype(spec.dtype).str)]
    raise ValueError(f"unknown unsupported chain {spec.unsupported!r}")


def synthetic_data(spec: VarSpec) -> np.ndarray:
    """Deterministic values with structure in every axis (so misplaced tiles show)."""
    rng = np.random.default_rng([spec.seed, len(spec.name), sum(map(ord, spec.name))])
    grids = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in spec.shape), indexing="ij")
    t, *rest = grids
    y, x = rest[-2], rest[-1]
    level = rest[0] if len(rest) == 3 else 0.0
    base = 1000.0 * t + 100.0 * level + 3.0 * y + 0.5 * x
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        data = base + rng.standard_normal(spec.shape)
        data = data.astype(dtype)
        if spec.nan_box is not None:
            t0, t1, y0, y1, x0, x1 = spec.nan_box
            data[t0:t1, ..., y0:y1, x0:x1] = _missing_marker(spec)
        return data
    info = np.iinfo(dtype)
    noise = rng.integers(-50, 50, size=spec.shape)
    data = np.clip((base % 20000) - 10000 + noise, info.min, info.max).astype(dtype)
    if spec.nan_box is not None:
        t0, t1, y0, y1, x0, x1 = spec.nan_box
        data[t0:t1, ..., y0:y1, x0:x1] = _missing_marker(spec)
    return data


def _missing_marker(spec: VarSpec) -> Any:
    if "missing_value" in spec.attrs:
        return np.ravel(spec.attrs["missing_value"])[0]
    return spec.attrs.get("_FillValue", np.nan)


def write_array(group: zarr.Group, spec: VarSpec) -> zarr.Array:
    compressors = compressors_for(spec.compressor) + ([Crc32cCodec()] if spec.checksum else [])
    serializer = BytesCodec(endian=spec.endian)
    chunks, shards = spec.chunks, spec.shards
    custom_index = (spec.index_location, spec.index_endian, spec.index_crc32c) != (
        "end",
        "little",
        True,
    )
    if shards is not None and custom_index:
        # spell the sharding codec out to choose its index layout
        index_codecs = [BytesCodec(endian=spec.index_endian)]
        if spec.index_crc32c:
            index_codecs.append(Crc32cCodec())
        serializer = ShardingCodec(
            chunk_shape=chunks,
            codecs=[serializer, *compressors],
            index_codecs=index_codecs,
            index_location=spec.index_location,
        )
        chunks, shards, compressors = shards, None, []
    array = group.create_array(
        spec.name,
        shape=spec.shape,
        chunks=chunks,
        shards=shards,
        dtype=spec.dtype,
        filters=filters_for(spec),
        serializer=serializer,
        compressors=compressors,
        fill_value=spec.fill_value,
        dimension_names=spec.dims,
        attributes=dict(spec.attrs),
    )
    data = synthetic_data(spec)
    if spec.written_time is None:
        array[...] = data
    else:
        t0, t1 = spec.written_time
        array[t0:t1] = data[t0:t1]
    return array


def write_store(path: str | os.PathLike, variables: Sequence[VarSpec]) -> Path:
    """Write a Zarr v3 group at ``path`` holding one array per spec."""
    path = Path(path)
    group = zarr.open_group(path, mode="w", zarr_format=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numcodecs-in-v3 warnings
        for spec in variables:
            write_array(group, spec)
    return path


def chunk_files(store: str | os.PathLike, array: str) -> list[Path]:
    """Every stored object of ``array`` (chunk or shard files), sorted."""
    root = Path(store) / array / "c"
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file())


def chunk_key(store: str | os.PathLike, array: str, file: Path) -> str:
    """The store key of a chunk file relative to its array (e.g. ``c/0/1/2``)."""
    return Path(file).relative_to(Path(store) / array).as_posix()


def delete_chunks(store: str | os.PathLike, array: str, keys: Sequence[str]) -> None:
    """Remove chunk (or shard) objects, e.g. ``["c/1/0/0"]``: they read as fill value."""
    for key in keys:
        (Path(store) / array / key).unlink()


def corrupt_chunk(
    store: str | os.PathLike, array: str, key: str, nbytes: int | None = None
) -> None:
    """Replace a chunk object's bytes with ``nbytes`` of garbage (default: as many
    as it had; an uncompressed chunk then still decodes, to garbage values)."""
    path = Path(store) / array / key
    size = path.stat().st_size if nbytes is None else nbytes
    garbage = np.random.default_rng(1234).integers(0, 256, size=size, dtype=np.uint8)
    path.write_bytes(garbage.tobytes())


def shard_index(store: str | os.PathLike, array: str, key: str) -> np.ndarray:
    """The ``(offset, nbytes)`` table of a shard written with the default layout
    (index at the end, little-endian, crc32c)."""
    group = zarr.open_group(store, mode="r")
    codec = group[array].metadata.codecs[0]
    n_inner = int(np.prod(np.asarray(group[array].metadata.chunk_grid.chunk_shape)))
    n_inner //= int(np.prod(np.asarray(codec.chunk_shape)))
    raw = (Path(store) / array / key).read_bytes()
    index_nbytes = n_inner * 16 + 4
    return np.frombuffer(raw[-index_nbytes:-4], dtype="<u8").reshape(n_inner, 2)


def corrupt_inside_shard(store: str | os.PathLike, array: str, key: str) -> int:
    """Overwrite the bytes of the first stored inner chunk of a shard (index kept
    intact) with garbage; returns the flat position of that inner chunk."""
    index = shard_index(store, array, key)
    empty = np.uint64(2**64 - 1)
    written = [i for i, (off, n) in enumerate(index) if off != empty and n > 0]
    first = written[0]
    off, n = (int(v) for v in index[first])
    path = Path(store) / array / key
    raw = bytearray(path.read_bytes())
    raw[off : off + n] = np.random.default_rng(99).integers(0, 256, n, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    return first


def open_arrays(
    store: str | os.PathLike | zarr.Group, variables: Sequence[str]
) -> dict[str, np.ndarray]:
    """The oracle: each variable read in full by zarr-python."""
    group = store if isinstance(store, zarr.Group) else zarr.open_group(store, mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {v: np.asarray(group[v][...]) for v in variables}


def add_static(
    store: str | os.PathLike,
    name: str,
    shape: tuple[int, ...],
    *,
    chunks: tuple[int, ...] | None = None,
    shards: tuple[int, ...] | None = None,
    dtype: str = "float32",
    dims: Sequence[str] | None = None,
    attrs: dict | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Write a time-invariant array (``(y, x)`` or ``(level, y, x)``); returns its values."""
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    grids = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    values = 50.0 * grids[0] + 7.0 * grids[-2] - 2.0 * grids[-1] + rng.standard_normal(shape)
    values = values.astype(dtype)
    if dims is None:
        dims = ["level", "y", "x"][-len(shape) :]
    group = zarr.open_group(store, mode="r+")
    array = group.create_array(
        name,
        shape=shape,
        chunks=chunks or tuple(min(n, 8) for n in shape),
        shards=shards,
        dtype=dtype,
        compressors=[ZstdCodec(level=3)],
        dimension_names=list(dims),
        attributes=dict(attrs or {}),
    )
    array[...] = values
    return values


def add_coordinate(
    store: str | os.PathLike, name: str, values: np.ndarray, attrs: dict | None = None
) -> None:
    """Write a 1-D coordinate array named ``name`` along the dimension ``name``."""
    values = np.asarray(values)
    group = zarr.open_group(store, mode="r+")
    array = group.create_array(
        name,
        shape=values.shape,
        chunks=values.shape,
        dtype=values.dtype,
        dimension_names=[name],
        attributes=dict(attrs or {}),
    )
    array[...] = values
