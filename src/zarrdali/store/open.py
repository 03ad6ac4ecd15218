"""Open a Zarr v3 store and describe its arrays for the planner and readers.

zarr-python opens the group; each array's metadata is read from its
``zarr.json`` as the Zarr v3 specification defines it (:mod:`zarrdali.store.metadata`).
What the rest of zarrdali needs is reduced to a small frozen
:class:`ArrayLayout` per variable, so that planning stays pure and backends do
not depend on zarr-python's object model.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from zarrdali.errors import (
    ConfigError,
    MetadataError,
    StoreAccessError,
    StoreNotFoundError,
    StoreUnavailableError,
    UnknownCodecError,
    VariableNotFoundError,
)
from zarrdali.io import remote
from zarrdali.io.remote import redact_options, redact_url
from zarrdali.store.codecs import ChunkCodec, ShardLayout, parse_chunk_codecs, parse_sharding
from zarrdali.store.dims import dimension_axes
from zarrdali.store.metadata import (
    available_memory,
    local_directory,
    node_key,
    read_array_metadata,
    read_document,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArrayLayout:
    """One variable of the store: shape, chunking and how its chunks are encoded.

    ``chunk_shape`` is the *read* granularity: the inner chunk of a sharded
    array, the chunk otherwise. ``shard`` is None for unsharded arrays.
    ``codec`` is None when the fast path cannot decode this array's chunks: then
    the array is read through zarr-python. ``directory`` is the array's folder
    when the store is on a local filesystem; ``key_prefix`` its path inside the
    store (remote stores are read by key, on both paths; None: zarrdali does not
    read the store's bytes itself).
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    fill_value: object
    dims: tuple[str, ...]
    codec: ChunkCodec | None
    shard: ShardLayout | None
    shard_shape: tuple[int, ...] | None
    directory: Path | None
    encode_key: Callable[[tuple[int, ...]], str]
    attrs: dict
    key_prefix: str | None = None
    # The stored axis of time, (level,) y and x (dims.py); () for the stored order
    # (time, [level,] y, x).
    axes: tuple[int, ...] = ()
    # The store levels served, in channel order (None: every level, in store order).
    levels: tuple[int, ...] | None = None

    @property
    def roles(self) -> tuple[int, ...]:
        """The stored axis of time, (level,) y and x."""
        return self.axes or tuple(range(len(self.shape)))

    @cached_property
    def transposed(self) -> bool:
        """Whether the stored order is not (time, [level,] y, x)."""
        return self.roles != tuple(range(len(self.shape)))

    @property
    def has_levels(self) -> bool:
        return len(self.shape) == 4

    @property
    def n_time(self) -> int:
        return self.shape[self.roles[0]]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(ny, nx)``: the field's rows and columns."""
        return self.shape[self.roles[-2]], self.shape[self.roles[-1]]

    @property
    def level_size(self) -> int:
        """Levels the store holds (1 without a level axis)."""
        return self.shape[self.roles[1]] if self.has_levels else 1

    @property
    def n_levels(self) -> int:
        """Channels this variable contributes: 1, or one per level served."""
        return len(self.levels) if self.levels is not None else self.level_size

    @property
    def time_dim(self) -> str:
        return self.dims[self.roles[0]]

    @property
    def level_dim(self) -> str | None:
        return self.dims[self.roles[1]] if self.has_levels else None

    def canonical(self, values: Sequence[int]) -> tuple[int, int, int, int]:
        """Per-axis ``values`` (stored order) as ``(t, level, y, x)``; level 1 without one."""
        r = self.roles
        if self.has_levels:
            return values[r[0]], values[r[1]], values[r[2]], values[r[3]]
        return values[r[0]], 1, values[r[1]], values[r[2]]

    def stored(self, coords4: Sequence[int]) -> tuple[int, ...]:
        """``(t, level, y, x)`` coordinates in the array's own (stored) order."""
        t, level, y, x = (int(c) for c in coords4)
        by_role = (t, level, y, x) if self.has_levels else (t, y, x)
        out = [0] * len(self.shape)
        for axis, value in zip(self.roles, by_role, strict=True):
            out[axis] = value
        return tuple(out)

    @cached_property
    def element_strides4(self) -> tuple[int, int, int, int]:
        """Elements between neighbours of a decoded chunk along ``(t, level, y, x)``
        (its stored C order; 0 along a level axis it does not have)."""
        strides = [1] * len(self.chunk_shape)
        for axis in range(len(self.chunk_shape) - 2, -1, -1):
            strides[axis] = strides[axis + 1] * self.chunk_shape[axis + 1]
        t, level, y, x = self.canonical(strides)
        return t, level if self.has_levels else 0, y, x

    def chunk_view4(self, decoded: np.ndarray) -> np.ndarray:
        """A decoded chunk (its elements, stored order) viewed as ``(t, level, y, x)``."""
        chunk = decoded.reshape(self.chunk_shape)
        if self.transposed:
            chunk = chunk.transpose(self.roles)
        return chunk if self.has_levels else chunk[:, None]

    @property
    def fast_path(self) -> bool:
        return self.codec is not None and (
            self.directory is not None or self.key_prefix is not None
        )

    @property
    def local(self) -> bool:
        return self.directory is not None

    @cached_property
    def chunk_nbytes(self) -> int:
        return int(np.prod(self.chunk_shape)) * self.dtype.itemsize

    def storage_coords(self, chunk: tuple[int, ...]) -> tuple[int, ...]:
        """Grid coordinates of the object holding ``chunk`` (its shard when sharded)."""
        if self.shard is None:
            return chunk
        return tuple(c // n for c, n in zip(chunk, self.shard.chunks_per_shard, strict=True))

    def storage_key(self, chunk: tuple[int, ...]) -> str:
        """The store key of the object holding ``chunk`` (its shard when sharded)."""
        return self.encode_key(self.storage_coords(chunk))

    def describe_chunk(self, chunk: tuple[int, ...]) -> str:
        key = self.storage_key(chunk)
        if self.shard is None:
            return key
        return f"{key} (inner chunk {tuple(chunk)})"


# Files xarray reads that zarrdali does not: `zarrdali prepare` converts them.
_CONVERTIBLE = {
    ".nc": "NetCDF",
    ".nc4": "NetCDF",
    ".netcdf": "NetCDF",
    ".cdf": "NetCDF",
    ".h5": "HDF5",
    ".hdf5": "HDF5",
    ".he5": "HDF5",
    ".grib": "GRIB",
    ".grb": "GRIB",
    ".grib2": "GRIB",
    ".grb2": "GRIB",
}


def _convert_hint(name: str, any_file: bool = False) -> str:
    """How to turn a NetCDF/HDF5/GRIB file (or any file) into a Zarr v3 store."""
    suffix = Path(name.rstrip("/")).suffix.lower()
    kind = _CONVERTIBLE.get(suffix)
    if kind is None and not any_file:
        return ""
    what = f"a {kind} file" if kind else "a file xarray opens"
    out = str(Path(name.rstrip("/")).with_suffix(".zarr").name)
    return f" For {what}, convert it once with `zarrdali prepare {name} {out}`."


def open_group(
    store: str | os.PathLike | zarr.Group | Any,
    storage_options: Mapping[str, Any] | None = None,
    *,
    request_timeout: float | None = None,
    max_in_flight: int = 64,
) -> tuple[zarr.Group, str]:
    """Open ``store`` read-only; returns the group and a name for messages.

    ``store`` is a local path, a URL (``s3://``, ``gs://``, ``https://``, ...;
    ``storage_options`` go to obstore or fsspec), a ``zarr.Group``, a zarr
    ``Store`` (an Icechunk session's store, an ``FsspecStore``, ...) or an
    obstore store. A remote group's store is a
    :class:`~zarrdali.io.bounded.BoundedStore`: every read zarr-python
    makes of it (this one first) is a request of zarrdali's engine, answered
    within ``request_timeout`` seconds (default 60) or failed with a named
    error: :class:`StoreNotFoundError` (no group there), :class:`StoreAccessError`
    (credentials refused), :class:`~zarrdali.errors.StoreUnavailableError`
    (unreachable, refused, DNS or TLS failure, no answer).
    """
    from zarr.storage import LocalStore

    from zarrdali.io.connect import bounded_store

    if isinstance(store, zarr.Group):
        name = str(store.store_path)
        if isinstance(store.store, LocalStore):
            return store, name
        # The same group (its metadata is in hand) over a bounded view of its store.
        from zarr.core.group import AsyncGroup
        from zarr.storage import StorePath

        bounded = bounded_store(
            store.store, name, max_in_flight=max_in_flight, request_timeout=request_timeout
        )
        path = StorePath(bounded, store.path)
        return zarr.Group(AsyncGroup(metadata=store.metadata, store_path=path)), name
    if isinstance(store, (str, os.PathLike)) and not remote.is_url(os.fspath(store)):
        name = os.path.expanduser(os.fspath(store))
        path = Path(name.removeprefix("file://"))
        if not path.exists():
            raise StoreNotFoundError(
                f"Zarr store {name!r} does not exist. Check the path, or create the sample "
                f"data with `zarrdali sample-data DIR`.{_convert_hint(name)}"
            )
        if path.is_file():
            raise StoreNotFoundError(
                f"{name!r} is a file, not a Zarr store (a directory).{_convert_hint(name, True)}"
            )
        return _open_zarr_group(name, name, zarr_format=None), name
    target = remote.zarr_store_for(store, storage_options)
    name = remote.redact_url(store) if isinstance(store, str) else remote.store_label(target)
    if isinstance(target, LocalStore):
        return _open_zarr_group(target, name, zarr_format=None), name
    bounded = bounded_store(
        target, name, max_in_flight=max_in_flight, request_timeout=request_timeout
    )
    try:
        return _open_zarr_group(bounded, name, zarr_format=3), name
    except StoreNotFoundError:
        # No Zarr v3 group: a v2 one (opened, and its arrays refused by name
        # later), or nothing (the v2 keys are asked for only to tell).
        if read_document(bounded, ".zgroup") is None:
            raise
        return _open_zarr_group(bounded, name, zarr_format=2), name


def _open_zarr_group(target: Any, name: str, zarr_format: int | None) -> zarr.Group:
    """``zarr.open_group(target, mode="r")``, its errors named (see :func:`open_group`)."""
    try:
        return zarr.open_group(target, mode="r", zarr_format=zarr_format)
    except (StoreAccessError, StoreUnavailableError):
        raise
    except (
        FileNotFoundError,
        zarr.errors.GroupNotFoundError,
        zarr.errors.ContainsArrayError,
        KeyError,
    ) as err:
        if isinstance(err, zarr.errors.ContainsArrayError):
            raise StoreNotFoundError(
                f"{name!r} is a Zarr array, not a group: pass the group that holds the variables."
            ) from err
        hint = " (the bucket does not exist)" if _bucket_missing(target, err) else ""
        what = "zarr.json" if zarr_format == 3 else "Zarr metadata"
        raise StoreNotFoundError(
            f"{name!r} is not a Zarr group{hint}: it has no {what} at its root. Check the "
            f"URL or path (and the bucket and prefix).{_convert_hint(name)}"
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MetadataError(
            f"the group's zarr.json is not valid JSON: {err}", store=name, array=""
        ) from err
    except Exception as err:
        if remote.is_access_error(err):
            raise StoreAccessError(
                f"access to store {name!r} was refused: {remote.describe_failure(err)}. Check "
                f"the credentials (storage_options or the environment) and the permissions."
            ) from err
        raise MetadataError(
            f"zarr-python cannot open the group: {remote.short_message(err)}",
            store=name,
            array="",
        ) from err


def _bucket_missing(target: Any, err: BaseException) -> bool:
    """Whether a store that holds no group lacks its bucket (zarr-python does not
    say; S3 answers NoSuchBucket), asked through the engine when it has one."""
    if "NoSuchBucket" in str(err):
        return True
    from zarrdali.io.bounded import BoundedStore

    if not isinstance(target, BoundedStore):
        return False
    inner = getattr(target.inner, "store", None)  # an ObjectStore's obstore client
    if not type(inner).__module__.startswith("obstore"):
        return False
    import obstore
    from zarr.core.sync import sync

    probe = lambda: obstore.get_range_async(inner, "zarr.json", start=0, length=1)  # noqa: E731
    try:
        sync(target.source.request("zarr.json", probe))  # GET: a 404 with a body
    except Exception as found:  # the answer is in the message; any other failure: unknown
        return "NoSuchBucket" in str(found)
    return False


def describe_array(
    group: zarr.Group, name: str, store_name: str, dims: Mapping[str, str] | None = None
) -> ArrayLayout | None:
    """The :class:`ArrayLayout` of array ``name`` of ``group``, from its ``zarr.json``
    (None: the group has no such array). Raises :class:`MetadataError` for
    metadata that is invalid, unsupported, or more than this machine can hold.
    With ``dims`` (see :mod:`zarrdali.store.dims`; ``{}``: names as they come) its time,
    level, y and x axes are found by name; without, it is not a variable (its
    axes are left as stored)."""
    zstore = group.store
    try:
        meta = read_array_metadata(zstore, group.path, name, store_name)
    except (MetadataError, StoreAccessError, StoreUnavailableError):
        raise
    except Exception as err:  # the store's own errors (remote stores)
        if remote.is_access_error(err):
            raise StoreAccessError(
                f"access to store {store_name!r} was refused reading the metadata of "
                f"{name!r}: {remote.describe_failure(err)}. Check the credentials "
                f"(storage_options or the environment) and the permissions."
            ) from err
        raise MetadataError(
            f"cannot read zarr.json: {remote.short_message(err)}", store=store_name, array=name
        ) from err
    if meta is None:
        return None

    def fail(message: str) -> MetadataError:
        return MetadataError(message, store=store_name, array=name)

    shard: ShardLayout | None = None
    shard_shape: tuple[int, ...] | None = None
    codecs = meta.codecs
    if len(codecs) == 1 and codecs[0].name == "sharding_indexed":
        shard_shape = meta.chunk_shape
        chunk_shape, shard, codec = parse_sharding(codecs[0], shard_shape, fail)
        if shard is None:
            codec = None
    else:
        codec = parse_chunk_codecs(codecs)
        chunk_shape = meta.chunk_shape
    if codec is None:
        _check_zarr_python_reads(group, name, store_name)
    names = meta.dimension_names or (None,) * len(meta.shape)
    axes: tuple[int, ...] = ()
    if dims is not None:
        axes = dimension_axes(
            meta.dimension_names, len(meta.shape), array=name, store=store_name, overrides=dims
        )
    layout = ArrayLayout(
        name=name,
        shape=meta.shape,
        dtype=meta.dtype,
        chunk_shape=chunk_shape,
        fill_value=meta.fill_value,
        dims=tuple(d if d is not None else f"dim_{i}" for i, d in enumerate(names)),
        codec=codec,
        shard=shard,
        shard_shape=shard_shape,
        directory=local_directory(zstore, group.path, name),
        encode_key=meta.encode_key,
        attrs=meta.attributes,
        key_prefix=node_key(group.path, name, ""),
        axes=axes if axes != tuple(range(len(meta.shape))) else (),
    )
    check_fits(layout, store_name)
    return layout


def _check_zarr_python_reads(group: zarr.Group, name: str, store_name: str) -> None:
    """An array the fast path does not decode is read by zarr-python: it must open it."""
    try:
        group[name]
    except Exception as err:
        kinds = {cls.__name__ for cls in type(err).__mro__}
        cls = UnknownCodecError if "UnknownCodecError" in kinds else MetadataError
        raise cls(
            f"zarr-python cannot open the array, which zarrdali reads through it: "
            f"{remote.short_message(err)}{_newer_zarr_hint(err)}",
            store=store_name,
            array=name,
        ) from err


# Codecs zarrdali reads through zarr-python, and the release that brought them.
_NEWER_CODECS = {"scale_offset": "3.2", "cast_value": "3.2"}


def _newer_zarr_hint(err: Exception) -> str:
    text = str(err)
    named = [codec for codec in _NEWER_CODECS if codec in text]
    if not named:
        return ""
    version = _NEWER_CODECS[named[0]]
    extra = " and the cast-value-rs package" if "cast_value" in named else ""
    return (
        f" (the {named[0]!r} codec needs zarr-python >= {version}, which needs Python >= "
        f"3.12{extra}; zarr-python {zarr.__version__} is installed)"
    )


# A shard index is read whole and kept per shard a batch touches: past 4 GiB
# (268 million inner chunks per shard) a store is hostile, whatever the memory.
MAX_SHARD_INDEX_BYTES = 1 << 32


def check_fits(layout: ArrayLayout, store_name: str, memory: int | None = None) -> None:
    """Refuse, before anything is allocated, an array whose chunk or table of
    storage objects would not fit in a quarter of this machine's memory, or whose
    shard index is larger than that or than ``MAX_SHARD_INDEX_BYTES``."""
    memory = available_memory() if memory is None else memory
    bound = memory // 4
    problems = []
    chunk = math.prod(layout.chunk_shape) * layout.dtype.itemsize
    if chunk > bound:
        problems.append(
            f"one chunk of shape {layout.chunk_shape} decodes to {chunk:,} bytes, more than "
            f"a quarter of this machine's {memory:,} bytes of memory"
        )
    if layout.shard_shape is not None:
        inner = math.prod(
            s // c for s, c in zip(layout.shard_shape, layout.chunk_shape, strict=True)
        )
        limit = min(bound, MAX_SHARD_INDEX_BYTES)
        if inner * 16 > limit:
            problems.append(
                f"a shard of {inner:,} inner chunks has a {inner * 16:,}-byte index, more "
                f"than the {limit:,} bytes zarrdali allows one"
            )
    outer = layout.shard_shape or layout.chunk_shape
    objects = math.prod(-(-s // c) for s, c in zip(layout.shape, outer, strict=True))
    if objects * 8 > bound:  # the chunk locator keeps a slot number per storage object
        problems.append(
            f"its grid of {objects:,} storage objects needs a {objects * 8:,}-byte table, "
            f"more than a quarter of this machine's {memory:,} bytes of memory"
        )
    if problems:
        raise MetadataError(
            f"{'; '.join(problems)}. Rechunk the store (`zarrdali prepare`) to smaller "
            f"chunks and shards.",
            store=store_name,
            array=layout.name,
        )


# Bytes a candidate sample costs while an epoch is planned: the [N, 3] int64
# samples, the coordinates they are made from, the shuffled order and the rank's share.
PLAN_BYTES_PER_SAMPLE = 96


def check_plan_fits(
    store_name: str,
    layouts: Sequence[ArrayLayout],
    n_samples: int,
    batch_nbytes: int,
    batches_in_flight: int,
    memory: int | None = None,
) -> None:
    """Refuse, before planning, an epoch of ``n_samples`` or batches of
    ``batch_nbytes`` (``batches_in_flight`` at a time) that this machine cannot hold."""
    memory = available_memory() if memory is None else memory
    names = [layout.name for layout in layouts]
    plan = n_samples * PLAN_BYTES_PER_SAMPLE
    if plan > memory // 2:
        raise MetadataError(
            f"the store's time axis ({layouts[0].n_time:,} steps) and grid give "
            f"{n_samples:,} candidate samples, whose epoch plan needs about {plan:,} bytes: "
            f"more than half of this machine's {memory:,} bytes of memory. Serve a subset "
            f"(index=, a sample table) or use a larger time_stride or tile_stride.",
            store=store_name,
            array=names[0],
        )
    held = batch_nbytes * batches_in_flight
    if held > memory // 2:
        raise MetadataError(
            f"one batch of {names} is {batch_nbytes:,} bytes and {batches_in_flight} are in "
            f"flight ({held:,} bytes): more than half of this machine's {memory:,} bytes of "
            f"memory. Use a tile (tile=(H, W)), a smaller batch_size or fewer variables.",
            store=store_name,
            array=names[0],
        )


def _not_found(group: zarr.Group, store_name: str, missing: list[str], what: str) -> Exception:
    try:
        available = str(sorted(k for k, _ in group.arrays()))
    except Exception:  # listing unsupported (HTTP): say so rather than fail again
        available = "unknown (the store cannot be listed)"
    return VariableNotFoundError(
        f"{what} {missing} not found in store {store_name!r}. Arrays it holds: {available}."
    )


def find_arrays(
    group: zarr.Group, store_name: str, names: Sequence[str], what: str = "Variable(s)"
) -> dict[str, zarr.Array]:
    """The arrays ``names`` of ``group``; a :class:`VariableNotFoundError` listing
    the missing ones (and what the store holds) if any is not there."""
    arrays, missing = {}, []
    for v in names:  # by key: stores served over plain HTTP cannot list
        try:
            node = group[v]
        except KeyError:
            node = None
        if isinstance(node, zarr.Array):
            arrays[v] = node
        else:
            missing.append(v)
    if missing:
        raise _not_found(group, store_name, missing, what)
    return arrays


def load_layouts(
    group: zarr.Group,
    store_name: str,
    variables: Sequence[str],
    dims: Mapping[str, str] | None = None,
) -> list[ArrayLayout]:
    """Describe the requested variables, their axes found by name (``dims``:
    role -> dimension name where the store names them otherwise), checking
    they can be stacked as channels."""
    if isinstance(variables, str):
        variables = [variables]
    if not variables:
        raise ConfigError("`variables` is empty: name at least one array of the store.")
    found, missing = {}, []
    for v in variables:  # by key: stores served over plain HTTP cannot list
        if v in found:
            continue
        layout = describe_array(group, v, store_name, dims or {})
        if layout is None:
            missing.append(v)
        else:
            found[v] = layout
    if missing:
        raise _not_found(group, store_name, missing, "Variable(s)")
    layouts = [found[v] for v in variables]
    first = layouts[0]
    for layout in layouts[1:]:
        if layout.n_time != first.n_time:
            raise ConfigError(
                f"Variables have different time axes in {store_name!r}: "
                f"{first.name!r} has {first.n_time} steps, {layout.name!r} has "
                f"{layout.n_time}. Select variables that share a time axis."
            )
        if layout.grid_shape != first.grid_shape:
            raise ConfigError(
                f"Variables have different grids in {store_name!r}: {first.name!r} is "
                f"{first.grid_shape}, {layout.name!r} is {layout.grid_shape}. "
                f"Regrid them to one grid first."
            )
    return layouts


@dataclass(frozen=True)
class StoreRef:
    """How to (re)open a store: all a worker process needs, picklable.

    ``store`` is a path, a URL or a picklable zarr/obstore store object. Its
    ``repr`` shows the storage options redacted (:func:`redact_options`).
    """

    store: Any
    storage_options: Mapping[str, Any] | None = None
    cache_dir: str | None = None
    cache_bytes: int | None = None
    max_in_flight: int = 64
    request_timeout: float | None = None

    def __repr__(self) -> str:
        store = redact_url(self.store) if isinstance(self.store, str) else self.store
        return (
            f"StoreRef(store={store!r}, storage_options="
            f"{redact_options(self.storage_options)!r}, cache_dir={self.cache_dir!r}, "
            f"cache_bytes={self.cache_bytes!r}, max_in_flight={self.max_in_flight!r}, "
            f"request_timeout={self.request_timeout!r})"
        )

    def open(self):
        """``(group, name, source)``: the group, a name for messages, its byte source."""
        group, name = self.open_group()
        return group, name, self.make_source(group, name)

    def open_group(self):
        """``(group, name)``: the store's root group and a name for messages."""
        return open_group(
            self.store,
            self.storage_options,
            request_timeout=self.request_timeout,
            max_in_flight=self.max_in_flight,
        )

    def make_source(self, group, name: str):
        """A new byte source of the opened store (its owner closes it)."""
        from zarrdali.io.connect import make_source

        return make_source(
            group,
            name,
            max_in_flight=self.max_in_flight,
            cache_dir=self.cache_dir,
            cache_bytes=self.cache_bytes,
            request_timeout=self.request_timeout,
        )
