"""Understand a Zarr v3 codec chain well enough to decode chunks ourselves.

The fast paths (CPU and GPU) decode chunk bytes without zarr-python. They accept
the chains Earth-science stores actually use: ``bytes`` (either endianness),
then at most one compressor (zstd, gzip, blosc, lz4), then optionally crc32c.
Anything else returns ``None`` and the array is read through zarr-python.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from typing import Literal

import numcodecs
import numcodecs.blosc
import numcodecs.lz4
import numcodecs.zstd
import numpy as np
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    GzipCodec,
    ShardingCodec,
    ZstdCodec,
)

try:  # streaming zstd, to stop decoding after the bytes a batch needs
    import zstandard
except ImportError:  # then zstd chunks are decoded whole, as numcodecs does
    zstandard = None

Compressor = Literal["none", "zstd", "gzip", "blosc", "lz4"]

# Partial decoding pays off only when it skips at least this much: zstd decodes
# whole blocks of up to 128 KiB, and a streaming call costs more than a plain one.
MIN_PARTIAL_SKIP = 128 * 1024


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

    @property
    def streams(self) -> bool:
        """Whether :meth:`decode_into` can stop after a prefix of the chunk."""
        if self.compressor == "zstd":
            return zstandard is not None
        return self.compressor in ("none", "gzip")

    def decodes_partially(self, needed: int | None, chunk_nbytes: int) -> bool:
        """Whether :meth:`decode_into` stops after ``needed`` of ``chunk_nbytes`` bytes."""
        return self.streams and needed is not None and chunk_nbytes - needed >= MIN_PARTIAL_SKIP

    def decode_into(self, data: memoryview, out: np.ndarray, needed: int | None = None) -> None:
        """Decompress ``data`` into the uint8 array ``out``, the whole decoded chunk.

        With ``needed``, only ``out[:needed]`` must be filled: compressors that
        stream (zstd, gzip, none) stop there when that skips at least
        ``MIN_PARTIAL_SKIP`` bytes; otherwise the whole chunk is decoded.
        Calls numcodecs' module-level decompressors directly: their codec
        wrappers cost more than decoding a small inner chunk. Those functions
        do not complain when a frame is shorter than ``out``, so the size the
        frame declares is checked first; a mismatch is a corrupt chunk.
        """
        expected = out.nbytes
        prefix = self.decodes_partially(needed, expected)
        if self.compressor == "none":
            _check_size(len(data), expected)
            n = needed if prefix else expected
            out[:n] = np.frombuffer(data, dtype=np.uint8, count=n)
        elif self.compressor == "zstd":
            _check_size(zstd_content_size(data), expected)
            if prefix:
                _zstd_prefix_into(data, out[:needed])
            else:
                numcodecs.zstd.decompress(data, out)
        elif self.compressor == "lz4":  # numcodecs prepends the size, little-endian
            _check_size(int.from_bytes(data[:4], "little"), expected)
            numcodecs.lz4.decompress(data, out)
        elif self.compressor == "blosc":  # header bytes 4..8: uncompressed size
            _check_size(int.from_bytes(data[4:8], "little"), expected)
            numcodecs.blosc.decompress(data, out)
        # gzip: the trailer holds the size modulo 2**32; a multi-member stream
        # may not match it, and is decoded whole so its real size is checked.
        elif prefix and len(data) >= 18 and _gzip_isize(data) == expected % 2**32:
            raw = zlib.decompressobj(wbits=31).decompress(data, needed)
            _check_prefix(len(raw), needed)
            out[:needed] = np.frombuffer(raw, dtype=np.uint8)
        else:
            raw = zlib.decompress(data, wbits=31)
            _check_size(len(raw), expected)
            out[:] = np.frombuffer(raw, dtype=np.uint8)

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


def _check_size(declared: int | None, expected: int) -> None:
    if declared is not None and declared != expected:
        raise ValueError(f"decodes to {declared} bytes, the chunk has {expected}")


def _check_prefix(got: int, needed: int) -> None:
    if got < needed:
        raise ValueError(f"the data ends after {got} decoded bytes, {needed} are needed")


def _gzip_isize(data: memoryview) -> int:
    """The size a gzip stream declares in its trailer (modulo 2**32)."""
    return int.from_bytes(data[-4:], "little")


class _ZstdDecompressors(threading.local):
    """One streaming decompressor per thread: they keep state between calls."""

    def __init__(self) -> None:
        self.decompressor = zstandard.ZstdDecompressor()


_zstd = _ZstdDecompressors()


def _zstd_prefix_into(data: memoryview, out: np.ndarray) -> None:
    """Decode the first ``out.nbytes`` bytes of zstd ``data`` into ``out``, then stop."""
    view, filled = memoryview(out), 0
    with _zstd.decompressor.stream_reader(data, read_across_frames=True) as reader:
        while filled < len(view):
            n = reader.readinto(view[filled:])
            if not n:
                break
            filled += n
    _check_prefix(filled, len(view))


def zstd_content_size(frame: memoryview) -> int | None:
    """Decompressed size declared in a zstd frame header (None: not declared).

    Follows RFC 8878 section 3.1.1.1; raises ValueError for a non-zstd header.
    """
    if len(frame) < 5 or bytes(frame[:4]) != b"\x28\xb5\x2f\xfd":
        raise ValueError("not a zstd frame (bad magic number)")
    descriptor = frame[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size_len = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size_len == 0:
        return None
    if len(frame) < pos + size_len:
        raise ValueError("truncated zstd frame header")
    size = int.from_bytes(frame[pos : pos + size_len], "little")
    return size + 256 if size_len == 2 else size


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
