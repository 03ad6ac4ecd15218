"""Open a Zarr v3 store and describe its arrays for the planner and readers.

Metadata comes from zarr-python. What the rest of zarrdali needs is reduced to a
small frozen :class:`ArrayLayout` per variable, so that planning stays pure and
backends do not depend on zarr-python's object model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ShardingCodec
from zarr.storage import LocalStore

from . import remote
from .codecs import ChunkCodec, ShardLayout, parse_chunk_codecs, parse_sharding
from .errors import ConfigError, StoreAccessError, StoreNotFoundError, VariableNotFoundError

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

    @property
    def n_levels(self) -> int:
        """Channels this variable contributes: 1, or the size of its level axis."""
        return self.shape[1] if len(self.shape) == 4 else 1

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


def open_group(
    store: str | os.PathLike | zarr.Group | Any,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[zarr.Group, str]:
    """Open ``store`` read-only; returns the group and a name for messages.

    ``store`` is a local path, a URL (``s3://``, ``gs://``, ``https://``, ...;
    ``storage_options`` go to obstore or fsspec), a ``zarr.Group``, a zarr
    ``Store`` (an Icechunk session's store, an ``FsspecStore``, ...) or an
    obstore store.
    """
    if isinstance(store, zarr.Group):
        return store, str(store.store_path)
    if isinstance(store, (str, os.PathLike)) and not remote.is_url(os.fspath(store)):
        name = os.fspath(store)
        if not Path(name.removeprefix("file://")).exists():
            raise StoreNotFoundError(
                f"Zarr store {name!r} does not exist. Check the path, or create the sample "
                f"data with `zarrdali sample-data DIR`."
            )
        target: Any = name
    else:
        target = remote.zarr_store_for(store, storage_options)
        name = remote.redact_url(store) if isinstance(store, str) else remote.store_label(target)
    try:
        group = zarr.open_group(target, mode="r")
    except (
        FileNotFoundError,
        zarr.errors.GroupNotFoundError,
        zarr.errors.ContainsArrayError,
        KeyError,
    ) as err:
        missing_bucket = "NoSuchBucket" in str(err) or remote.bucket_missing(target)
        hint = " (the bucket does not exist)" if missing_bucket else ""
        raise StoreNotFoundError(
            f"{name!r} is not a Zarr group{hint}: {remote.short_message(err)}"
        ) from err
    except Exception as err:
        if remote.is_access_error(err):
            raise StoreAccessError(
                f"access to store {name!r} was refused: {remote.short_message(err)}. Check "
                f"the credentials (storage_options or the environment) and the permissions."
            ) from err
        raise
    return group, name


def _local_directory(array: zarr.Array) -> Path | None:
    store = array.store_path.store
    if isinstance(store, LocalStore):
        return Path(store.root) / array.path
    return None


def describe_array(array: zarr.Array, name: str) -> ArrayLayout:
    """Reduce a zarr-python array to the :class:`ArrayLayout` zarrdali reads."""
    meta = array.metadata
    if meta.zarr_format != 3:
        raise ConfigError(
            f"Array {name!r} is Zarr format {meta.zarr_format}; zarrdali reads Zarr v3. "
            f"Convert it with `zarrdali prepare`."
        )
    shape = tuple(int(s) for s in array.shape)
    outer = tuple(int(c) for c in meta.chunk_grid.chunk_shape)
    codecs = tuple(meta.codecs)
    shard: ShardLayout | None = None
    shard_shape: tuple[int, ...] | None = None
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        shard, codec = parse_sharding(codecs[0], outer)
        chunk_shape = tuple(int(c) for c in codecs[0].chunk_shape)
        shard_shape = outer
        if shard is None:
            codec = None
    else:
        codec = parse_chunk_codecs(codecs)
        chunk_shape = outer
    dims = tuple(meta.dimension_names or (f"dim_{i}" for i in range(len(shape))))
    fill = meta.fill_value
    return ArrayLayout(
        name=name,
        shape=shape,
        dtype=np.dtype(array.dtype).newbyteorder("="),
        chunk_shape=chunk_shape,
        fill_value=fill.item() if hasattr(fill, "item") else fill,
        dims=dims,
        codec=codec,
        shard=shard,
        shard_shape=shard_shape,
        directory=_local_directory(array),
        encode_key=meta.encode_chunk_key,
        attrs=dict(array.attrs),
        key_prefix=array.path,
    )


def load_layouts(group: zarr.Group, store_name: str, variables: Sequence[str]) -> list[ArrayLayout]:
    """Describe the requested variables, checking they can be stacked as channels."""
    if isinstance(variables, str):
        variables = [variables]
    if not variables:
        raise ConfigError("`variables` is empty: name at least one array of the store.")
    arrays, missing = {}, []
    for v in variables:  # by key: stores served over plain HTTP cannot list
        try:
            node = group[v]
        except KeyError:
            node = None
        if isinstance(node, zarr.Array):
            arrays[v] = node
        else:
            missing.append(v)
    if missing:
        try:
            available = str(sorted(k for k, _ in group.arrays()))
        except Exception:  # listing unsupported (HTTP): say so rather than fail again
            available = "unknown (the store cannot be listed)"
        raise VariableNotFoundError(
            f"Variable(s) {missing} not found in store {store_name!r}. "
            f"Arrays it holds: {available}."
        )
    layouts = [describe_array(arrays[v], v) for v in variables]
    for layout in layouts:
        if len(layout.shape) not in (3, 4):
            raise ConfigError(
                f"Variable {layout.name!r} in {store_name!r} has dims {layout.dims} "
                f"(shape {layout.shape}); expected (time, y, x) or (time, level, y, x)."
            )
    first = layouts[0]
    for layout in layouts[1:]:
        if layout.shape[0] != first.shape[0]:
            raise ConfigError(
                f"Variables have different time axes in {store_name!r}: "
                f"{first.name!r} has {first.shape[0]} steps, {layout.name!r} has "
                f"{layout.shape[0]}. Select variables that share a time axis."
            )
        if layout.shape[-2:] != first.shape[-2:]:
            raise ConfigError(
                f"Variables have different grids in {store_name!r}: {first.name!r} is "
                f"{first.shape[-2:]}, {layout.name!r} is {layout.shape[-2:]}. "
                f"Regrid them to one grid first."
            )
    return layouts
