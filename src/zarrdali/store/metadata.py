"""Zarr v3 array metadata as the specification defines it, read from ``zarr.json``.

zarrdali reads each array's ``zarr.json`` document itself (through the store:
a local file, or the zarr ``Store``'s ``get`` for remote and Icechunk stores)
instead of zarr-python's in-memory metadata objects: the specification is the
stable contract, while zarr-python's classes change between minor releases
(``BytesCodec.endian`` became a plain string in 3.4). zarr-python still opens
the group, lists its arrays and reads the arrays zarrdali does not decode.

Every error names the store and the array (:class:`~zarrdali.errors.MetadataError`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zarrdali.errors import MetadataError, UnknownDataTypeError

# The Zarr v3 core data types zarrdali serves (numbers; samples are cast to float32).
DATA_TYPES: dict[str, str] = {
    "bool": "bool",
    "int8": "i1",
    "int16": "i2",
    "int32": "i4",
    "int64": "i8",
    "uint8": "u1",
    "uint16": "u2",
    "uint32": "u4",
    "uint64": "u8",
    "float16": "f2",
    "float32": "f4",
    "float64": "f8",
}
_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


@dataclass(frozen=True)
class CodecSpec:
    """One entry of a ``codecs`` list: its name and configuration."""

    name: str
    configuration: Mapping[str, Any]


@dataclass(frozen=True)
class ArrayMetadata:
    """What zarrdali uses of one array's ``zarr.json``."""

    shape: tuple[int, ...]
    dtype: np.dtype  # native byte order; the stored order is the bytes codec's
    chunk_shape: tuple[int, ...]  # the chunk grid's (the shard, when sharded)
    encode_key: Callable[[tuple[int, ...]], str]
    fill_value: bool | int | float
    codecs: tuple[CodecSpec, ...]
    dimension_names: tuple[str | None, ...] | None
    attributes: dict


class _Fail:
    """Raises :class:`MetadataError` naming the store and the array."""

    def __init__(self, store: str, array: str) -> None:
        self.store, self.array = store, array

    def __call__(self, message: str, cls: type[MetadataError] = MetadataError) -> MetadataError:
        return cls(message, store=self.store, array=self.array)


def parse_array_metadata(doc: object, store: str, array: str) -> ArrayMetadata:
    """Validate and reduce a parsed ``zarr.json`` of an array."""
    fail = _Fail(store, array)
    if not isinstance(doc, dict):
        raise fail(f"zarr.json holds a JSON {type(doc).__name__}, not an object")
    if doc.get("zarr_format") != 3:
        raise fail(
            f"zarr.json says zarr_format {doc.get('zarr_format')!r}; zarrdali reads Zarr v3. "
            f"Convert the store with `zarrdali prepare`."
        )
    if doc.get("node_type") != "array":
        raise fail(f"zarr.json describes a {doc.get('node_type')!r}, not an array")
    shape = _int_tuple(doc.get("shape"), "shape", fail, minimum=0)
    dtype = parse_data_type(doc.get("data_type"), fail)
    chunk_shape = _regular_grid(doc.get("chunk_grid"), len(shape), fail, shape)
    encode_key = _chunk_key_encoding(doc.get("chunk_key_encoding"), fail)
    fill = parse_fill_value(doc.get("fill_value"), dtype, fail)
    codecs = parse_codec_list(doc.get("codecs"), "codecs", fail)
    if doc.get("storage_transformers"):
        raise fail("storage transformers are not supported")
    names = doc.get("dimension_names")
    if names is not None:
        if not isinstance(names, list) or len(names) != len(shape):
            raise fail(f"dimension_names {names!r} do not match the {len(shape)} dimensions")
        if not all(n is None or isinstance(n, str) for n in names):
            raise fail(f"dimension_names {names!r} must be strings or null")
        names = tuple(names)
    attrs = doc.get("attributes") or {}
    if not isinstance(attrs, dict):
        raise fail(f"attributes must be a JSON object, got {type(attrs).__name__}")
    return ArrayMetadata(
        shape=shape,
        dtype=dtype,
        chunk_shape=chunk_shape,
        encode_key=encode_key,
        fill_value=fill,
        codecs=codecs,
        dimension_names=names,
        attributes=attrs,
    )


def _int_tuple(value: object, what: str, fail: _Fail, *, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise fail(f"{what} must be a list of integers, got {value!r}")
    if any(v < minimum for v in value):
        raise fail(f"{what} {value} has a size below {minimum}")
    return tuple(value)


def _named(value: object, what: str, fail: _Fail) -> tuple[str, dict]:
    """``{"name": ..., "configuration": {...}}`` (or a bare name) as (name, configuration)."""
    if isinstance(value, str):
        return value, {}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise fail(f"{what} must be an object with a name, got {value!r}")
    config = value.get("configuration") or {}
    if not isinstance(config, dict):
        raise fail(f"the configuration of {what} {value['name']!r} must be an object")
    return value["name"], config


def parse_data_type(value: object, fail: _Fail) -> np.dtype:
    name, _ = _named(value, "data_type", fail)
    if name not in DATA_TYPES:
        raise fail(
            f"data type {name!r} is not a Zarr v3 numeric type zarrdali serves "
            f"({', '.join(DATA_TYPES)})",
            UnknownDataTypeError,
        )
    return np.dtype(DATA_TYPES[name])


def _regular_grid(
    value: object, ndim: int, fail: _Fail, shape: tuple[int, ...] = ()
) -> tuple[int, ...]:
    name, config = _named(value, "chunk_grid", fail)
    if name == "rectilinear":
        return _rectilinear_as_regular(config, shape, fail)
    if name != "regular":
        raise fail(
            f"chunk grid {name!r} is not supported (only 'regular'); rechunk the store "
            f"with `zarrdali prepare`"
        )
    chunks = _int_tuple(config.get("chunk_shape"), "chunk_shape", fail, minimum=1)
    if len(chunks) != ndim:
        raise fail(f"chunk_shape {list(chunks)} has {len(chunks)} dimensions, the array {ndim}")
    return chunks


def _rectilinear_as_regular(
    config: Mapping, shape: tuple[int, ...], fail: _Fail
) -> tuple[int, ...]:
    """A rectilinear grid (zarr-python >= 3.2) whose chunks are regular after all
    (along each dimension chunks of one size that tile it), as that regular
    chunk shape. Other grids are refused: zarrdali plans each batch with chunk
    arithmetic (chunk = index // size) on the host and in the GPU gather, which
    variable sizes break."""
    sizes = config.get("chunk_shapes")
    if config.get("kind", "inline") != "inline" or not isinstance(sizes, list):
        raise fail(f"rectilinear chunk grid {dict(config)!r} is not one zarrdali reads")
    if len(sizes) != len(shape):
        raise fail(f"rectilinear chunk_shapes has {len(sizes)} dimensions, the array {len(shape)}")
    chunks = []
    for axis, (spec, n) in enumerate(zip(sizes, shape, strict=True)):
        if isinstance(spec, int) and not isinstance(spec, bool):
            edges = [spec] * max(1, -(-n // spec)) if spec > 0 else []
        elif isinstance(spec, list):
            edges = []
            for item in spec:  # a size, or [size, repeats] (run-length encoded)
                if isinstance(item, list) and len(item) == 2:
                    edges += [item[0]] * item[1]
                else:
                    edges.append(item)
        else:
            edges = []
        if not edges or not all(isinstance(e, int) and e >= 1 for e in edges):
            raise fail(f"rectilinear chunk sizes {spec!r} of dimension {axis} are not sizes")
        # a smaller last chunk is stored at its own size, not padded as a regular
        # grid's edge chunk is: only chunks all of one size, tiling the axis, read alike
        if not all(e == edges[0] for e in edges) or sum(edges) != n:
            raise fail(
                f"its rectilinear chunk grid has chunks of varying sizes along dimension "
                f"{axis} ({edges[:8]}{'...' if len(edges) > 8 else ''}): zarrdali plans every "
                f"batch's reads with chunk arithmetic on a regular grid (on the host and in the "
                f"GPU gather), which variable-sized chunks break. Rechunk the store to regular "
                f"chunks (`zarrdali prepare`)"
            )
        chunks.append(edges[0])
    return tuple(chunks)


def _chunk_key_encoding(value: object, fail: _Fail) -> Callable[[tuple[int, ...]], str]:
    name, config = _named(value, "chunk_key_encoding", fail)
    if name not in ("default", "v2"):
        raise fail(f"chunk key encoding {name!r} is not supported ('default' or 'v2')")
    separator = config.get("separator", "/" if name == "default" else ".")
    if separator not in ("/", "."):
        raise fail(f"chunk key separator {separator!r} must be '/' or '.'")
    if name == "default":
        return lambda coords: separator.join(["c", *map(str, coords)])
    return lambda coords: separator.join(map(str, coords)) if coords else "0"


def parse_fill_value(value: object, dtype: np.dtype, fail: _Fail) -> bool | int | float:
    """The fill value as a Python scalar, from the specification's JSON encodings."""
    bad = fail(f"fill_value {value!r} is not a valid {dtype} value")
    if value is None:  # not allowed by the spec; zarr-python reads it as zero
        return np.zeros((), dtype=dtype).item()
    if dtype.kind == "b":
        if not isinstance(value, bool):
            raise bad
        return value
    if dtype.kind in "iu":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if isinstance(value, float) and not value.is_integer():
            raise bad
        info = np.iinfo(dtype)
        if not info.min <= int(value) <= info.max:
            raise bad
        return int(value)
    if isinstance(value, str) and value in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[value]
    if isinstance(value, str) and value.startswith("0x"):  # the value's bits, big-endian
        digits = value[2:]
        if len(digits) != 2 * dtype.itemsize:
            raise bad
        try:
            raw = bytes.fromhex(digits)
        except ValueError:
            raise bad from None
        return np.frombuffer(raw, dtype=dtype.newbyteorder(">"))[0].item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    return float(np.array(value, dtype=dtype))


def parse_codec_list(value: object, what: str, fail: _Fail) -> tuple[CodecSpec, ...]:
    if not isinstance(value, list) or not value:
        raise fail(f"{what} must be a non-empty list of codecs, got {value!r}")
    return tuple(CodecSpec(*_named(v, f"codec in {what}", fail)) for v in value)


# -- reading the documents -----------------------------------------------------


def _local_root(zstore: Any) -> Path | None:
    from zarr.storage import LocalStore

    return Path(zstore.root) if isinstance(zstore, LocalStore) else None


def read_document(zstore: Any, key: str) -> bytes | None:
    """The bytes of ``key`` in a zarr store (None: no such object)."""
    root = _local_root(zstore)
    if root is not None:
        try:
            return (root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buf = sync(zstore.get(key, default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def node_key(group_path: str, name: str, document: str = "zarr.json") -> str:
    """The store key of ``document`` of node ``name`` in the group at ``group_path``."""
    parts = [p for p in (group_path.strip("/"), name.strip("/"), document) if p]
    return "/".join(parts)


def read_array_metadata(
    zstore: Any, group_path: str, name: str, store: str
) -> ArrayMetadata | None:
    """The metadata of array ``name`` of the group; None if there is no Zarr v3 node.

    Raises :class:`MetadataError` for a document that is not valid JSON or
    not a valid array (a group of that name, a Zarr v2 array, ...).
    """
    raw = read_document(zstore, node_key(group_path, name))
    fail = _Fail(store, name)
    if raw is None:
        if read_document(zstore, node_key(group_path, name, ".zarray")) is not None:
            raise fail(
                f"array {name!r} is Zarr format 2; zarrdali reads Zarr v3. Convert it "
                f"with `zarrdali prepare`."
            )
        return None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise fail(f"zarr.json is not valid JSON: {err}") from err
    if isinstance(doc, dict) and doc.get("node_type") == "group":
        return None
    return parse_array_metadata(doc, store, name)


def local_directory(zstore: Any, group_path: str, name: str) -> Path | None:
    """The array's folder when the store is a local directory."""
    root = _local_root(zstore)
    return None if root is None else root / node_key(group_path, name, "")


def available_memory() -> int:
    """Bytes of memory this process may use: physical memory, or the cgroup's limit."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume plenty
        total = 1 << 50
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total
