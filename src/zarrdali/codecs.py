"""Understand a Zarr v3 codec chain well enough to decode chunks ourselves.

The fast paths (CPU and GPU) decode chunk bytes without zarr-python. They accept
the chains Earth-science stores actually use: ``bytes`` (either endianness),
then at most one compressor (zstd, gzip, blosc, lz4), then optionally crc32c.
Anything else returns ``None`` and the array is read through zarr-python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numcodecs
import numpy as np
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    GzipCodec,
    ShardingCodec,
    ZstdCodec,
)

Compressor = Literal["none", "zstd", "gzip", "blosc", "lz4"]


@dataclass(frozen=True)
class ChunkCodec:
    """How the bytes of one (inner) chunk turn into an array."""

    compressor: Compressor
    byteorder: Literal["<", ">", "|"]
    has_crc32c: bool = False

    def numcodecs_decoder(self) -> numcodecs.abc.Codec | None:
        """A numcodecs codec that decompresses the payload (None: raw bytes)."""
        return {
            "none": None,
            "zstd": numcodecs.Zstd(),
            "gzip": numcodecs.GZip(),
            "blosc": numcodecs.Blosc(),
            "lz4": numcodecs.LZ4(),
        }[self.compressor]

    def stored_dtype(self, dtype: np.dtype) -> np.dtype:
        """The dtype of the decoded bytes, with the on-disk byte order."""
        return dtype if dtype.itemsize == 1 else dtype.newbyteorder(self.byteorder)


@dataclass(frozen=True)
class ShardLayout:
    """Where inner chunks live inside a shard file."""

    chunks_per_shard: tuple[int, ...]
    index_location: Literal["start", "end"]
    index_byteorder: Literal["<", ">"]
    index_has_crc32c: bool

    @property
    def index_nbytes(self) -> int:
        n = int(np.prod(self.chunks_per_shard)) * 16
        return n + (4 if self.index_has_crc32c else 0)


def _compressor_name(codec: object) -> Compressor | None:
    if isinstance(codec, ZstdCodec):
        return "zstd"
    if isinstance(codec, GzipCodec):
        return "gzip"
    if isinstance(codec, BloscCodec):
        return "blosc"
    # numcodecs codecs wrapped for zarr v3 carry an id such as "numcodecs.lz4"
    codec_id = getattr(codec, "codec_name", None) or getattr(codec, "codec_id", None)
    if codec_id in ("numcodecs.lz4", "lz4"):
        return "lz4"
    if codec_id in ("numcodecs.zstd",):
        return "zstd"
    return None


def _byteorder(codec: BytesCodec) -> Literal["<", ">", "|"]:
    if codec.endian is None:
        return "|"
    return "<" if codec.endian.value == "little" else ">"


def parse_chunk_codecs(codecs: tuple[object, ...]) -> ChunkCodec | None:
    """Parse an ``[bytes, compressor?, crc32c?]`` chain; None if unsupported."""
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return None  # array->array codecs (transpose, ...) or another serializer
    rest = list(codecs[1:])
    has_crc = bool(rest) and isinstance(rest[-1], Crc32cCodec)
    if has_crc:
        rest.pop()
    if len(rest) > 1:
        return None
    compressor: Compressor | None = "none" if not rest else _compressor_name(rest[0])
    if compressor is None:
        return None
    return ChunkCodec(compressor=compressor, byteorder=_byteorder(codecs[0]), has_crc32c=has_crc)


def parse_sharding(
    codec: ShardingCodec, shard_shape: tuple[int, ...]
) -> tuple[ShardLayout | None, ChunkCodec | None]:
    """Parse a sharding codec: the shard index layout and the inner chain."""
    inner = tuple(codec.chunk_shape)
    chunks_per_shard = tuple(s // c for s, c in zip(shard_shape, inner, strict=True))
    index_codecs = tuple(codec.index_codecs)
    ok_index = (
        len(index_codecs) in (1, 2)
        and isinstance(index_codecs[0], BytesCodec)
        and (len(index_codecs) == 1 or isinstance(index_codecs[1], Crc32cCodec))
    )
    if not ok_index:
        return None, None
    order = _byteorder(index_codecs[0])
    layout = ShardLayout(
        chunks_per_shard=chunks_per_shard,
        index_location=codec.index_location.value,
        index_byteorder="<" if order == "|" else order,
        index_has_crc32c=len(index_codecs) == 2,
    )
    return layout, parse_chunk_codecs(tuple(codec.codecs))
