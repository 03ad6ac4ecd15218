"""Understand a Zarr v3 codec chain well enough to decode chunks ourselves.

The fast paths (CPU and GPU) decode chunk bytes without zarr-python, from the
codecs of an array's ``zarr.json`` (:mod:`zarrdali.store.metadata`). They accept
the chains Earth-science stores actually use: ``bytes`` (either endianness),
then at most one compressor (zstd, gzip, blosc, lz4), then optionally crc32c.
Anything else returns ``None`` and the array is read through zarr-python.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numcodecs
import numcodecs.blosc
import numcodecs.lz4
import numcodecs.zstd
import numpy as np

from zarrdali.store.metadata import CodecSpec, parse_codec_list

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


# Codec names as zarr-python 3.1 to 3.4 write them (the spec's, and numcodecs' own
# codecs wrapped for Zarr v3, "numcodecs.<id>").
_COMPRESSORS: dict[str, Compressor] = {
    "zstd": "zstd",
    "numcodecs.zstd": "zstd",
    "gzip": "gzip",
    "numcodecs.gzip": "gzip",
    "blosc": "blosc",
    "numcodecs.blosc": "blosc",
    "lz4": "lz4",
    "numcodecs.lz4": "lz4",
}


def _byteorder(codec: CodecSpec) -> Literal["<", ">", "|"]:
    endian = codec.configuration.get("endian")
    return {"little": "<", "big": ">"}.get(endian, "|")


def parse_chunk_codecs(codecs: Sequence[CodecSpec]) -> ChunkCodec | None:
    """Parse an ``[bytes, compressor?, crc32c?]`` chain; None if unsupported."""
    if not codecs or codecs[0].name != "bytes":
        return None  # array->array codecs (transpose, ...) or another serializer
    if codecs[0].configuration.get("endian") not in (None, "little", "big"):
        return None
    rest = list(codecs[1:])
    has_crc = bool(rest) and rest[-1].name == "crc32c"
    if has_crc:
        rest.pop()
    if len(rest) > 1:
        return None
    compressor = "none" if not rest else _COMPRESSORS.get(rest[0].name)
    if compressor is None:
        return None
    return ChunkCodec(compressor=compressor, byteorder=_byteorder(codecs[0]), has_crc32c=has_crc)


def parse_sharding(
    codec: CodecSpec, shard_shape: tuple[int, ...], fail: Callable[[str], Exception]
) -> tuple[tuple[int, ...], ShardLayout | None, ChunkCodec | None]:
    """Parse a ``sharding_indexed`` codec: the inner chunk shape, the shard index
    layout and the inner chain (None, None where the fast path cannot read them).
    ``fail(message)`` makes the error for a configuration the spec does not allow."""
    config = codec.configuration
    inner = config.get("chunk_shape")
    if (
        not isinstance(inner, list)
        or len(inner) != len(shard_shape)
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in inner)
    ):
        raise fail(f"sharding chunk_shape {inner!r} must be {len(shard_shape)} integers >= 1")
    inner = tuple(inner)
    if any(s % c for s, c in zip(shard_shape, inner, strict=True)):
        raise fail(
            f"the sharding codec's chunk_shape {list(inner)} does not divide the shard "
            f"shape {list(shard_shape)}"
        )
    chunks_per_shard = tuple(s // c for s, c in zip(shard_shape, inner, strict=True))
    location = config.get("index_location", "end")
    if location not in ("start", "end"):
        raise fail(f"sharding index_location {location!r} must be 'start' or 'end'")
    inner_codecs = parse_codec_list(config.get("codecs"), "the sharding codecs", fail)
    index_codecs = parse_codec_list(config.get("index_codecs"), "the sharding index_codecs", fail)
    names = [c.name for c in index_codecs]
    if names not in (["bytes"], ["bytes", "crc32c"]):
        return inner, None, None
    order = _byteorder(index_codecs[0])
    layout = ShardLayout(
        chunks_per_shard=chunks_per_shard,
        index_location=location,
        index_byteorder="<" if order == "|" else order,
        index_has_crc32c=len(index_codecs) == 2,
    )
    return inner, layout, parse_chunk_codecs(inner_codecs)
