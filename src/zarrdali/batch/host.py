"""Chunks on the host: preads of local files and numcodecs decoding, in reused
per-thread buffers. The CPU path's readers, and the GPU path's host fallback.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import crc32c
import numpy as np

from zarrdali.batch.locate import ChunkLocations
from zarrdali.batch.plan import (
    natural_coords,
)
from zarrdali.errors import ChunkError
from zarrdali.io.openfiles import OpenFiles
from zarrdali.io.ranges import CoalescedReads, coalesce_arrays
from zarrdali.store.open import ArrayLayout


class _Scratch(threading.local):
    """Per-thread buffers, grown on demand and reused for every chunk."""

    def __init__(self) -> None:
        self.encoded = np.empty(0, dtype=np.uint8)
        self.encoded_view = memoryview(self.encoded)
        self.encoded_address = self.encoded.ctypes.data  # (ctypes.data costs a microsecond)
        self.decoded = np.empty(0, dtype=np.uint8)

    def encoded_buffer(self, nbytes: int) -> memoryview:
        if self.encoded.nbytes < nbytes:
            self.encoded = np.empty(nbytes, dtype=np.uint8)
            self.encoded_view = memoryview(self.encoded)
            self.encoded_address = self.encoded.ctypes.data
        return self.encoded_view[:nbytes]

    def decoded_array(self, shape: tuple[int, ...], nbytes: int, dtype: np.dtype) -> np.ndarray:
        return self.decoded_bytes(nbytes).view(dtype).reshape(shape)

    def decoded_bytes(self, nbytes: int) -> np.ndarray:
        if self.decoded.nbytes < nbytes:
            self.decoded = np.empty(nbytes, dtype=np.uint8)
        return self.decoded[:nbytes]


class PosixReader:
    """Reads byte ranges of a local store's files with ``os.pread``.

    Each read lands in a thread-local buffer reused for the next read of the
    same thread, so reading allocates nothing per chunk; each thread keeps up to
    ``max_open_files`` files open (a shard is read many times an epoch).
    :meth:`close` closes them all.
    """

    def __init__(
        self, store_name: str, *, max_gap: int = 64 * 1024, max_open_files: int = 64
    ) -> None:
        self._store = store_name
        self.max_gap = max_gap
        self.max_open_files = max_open_files
        self._scratch = _Scratch()
        self._files = OpenFiles(max_open_files)

    def close(self) -> None:
        """Close every thread's files (call once the threads are done reading)."""
        self._files.close()

    def reads(
        self, locations: ChunkLocations, which: np.ndarray | None = None
    ) -> tuple[CoalescedReads, np.ndarray]:
        """The coalesced reads of every chunk stored in a file (or of those of
        them ``which`` marks), and for each position of ``reads.order`` the chunk it is."""
        present = locations.present if which is None else locations.present & which
        present = np.flatnonzero(present)
        reads = coalesce_arrays(
            locations.file[present],
            locations.offset[present],
            locations.nbytes[present],
            self.max_gap,
        )
        return reads, present[reads.order]

    def pread(self, path: str, start: int, nbytes: int, array: str, key: str) -> memoryview:
        """``nbytes`` at ``start`` of ``path``, valid until this thread's next read."""
        buf = self._scratch.encoded_buffer(nbytes)
        try:
            got = os.preadv(self._files.fd(path), [buf], start)
        except OSError as err:
            raise ChunkError(
                f"cannot read bytes {start}..{start + nbytes}: {err}",
                store=self._store,
                array=array,
                key=key,
            ) from err
        if got != nbytes:
            raise ChunkError(
                f"file is truncated: wanted {nbytes} bytes at {start}, got {got}",
                store=self._store,
                array=array,
                key=key,
            )
        return buf

    def address(self) -> int:
        """Where this thread's read buffer starts (what :meth:`pread` returned)."""
        return self._scratch.encoded_address

    def read_chunks(
        self, layouts: Sequence[ArrayLayout], locations: ChunkLocations
    ) -> list[bytes | None]:
        """Encoded bytes of every fast-path chunk (copies; None: missing or not fast)."""
        reads, chunk_of = self.reads(locations)
        out: list[bytes | None] = [None] * len(locations.file)
        offsets = locations.offset.tolist()
        sizes = locations.nbytes.tolist()
        for r in range(len(reads)):
            lo, hi = int(reads.bounds[r]), int(reads.bounds[r + 1])
            f, start = int(reads.file[r]), int(reads.start[r])
            array = layouts[locations.file_var[f]].name
            buf = self.pread(
                locations.paths[f], start, int(reads.nbytes[r]), array, locations.keys[f]
            )
            for i in chunk_of[lo:hi].tolist():
                out[i] = bytes(buf[offsets[i] - start : offsets[i] - start + sizes[i]])
        return out


class NumcodecsDecoder:
    """Decodes chunk bytes with numcodecs' decompressors (thread-safe)."""

    def __init__(self, store_name: str) -> None:
        self._store = store_name
        self._scratch = _Scratch()

    def decode(
        self,
        layout: ArrayLayout,
        coords: Sequence[int],
        data: memoryview | None,
        out: np.ndarray | None = None,
        needed: int | None = None,
    ) -> np.ndarray:
        """The decoded chunk at grid ``coords`` (full chunk shape, stored byte order).

        Decodes into ``out`` when given, else into this thread's scratch (valid
        until the thread decodes its next chunk). A missing chunk is the fill value.
        With ``needed``, only the first ``needed`` bytes are guaranteed: streaming
        compressors stop there and the rest of the array is left as it was.
        ``coords`` (``(t, level, y, x)`` or the array's own) only name the chunk in errors.
        """
        codec = layout.codec
        if out is None:
            dtype = codec.stored_dtype(layout.dtype)
            out = self._scratch.decoded_array(layout.chunk_shape, layout.chunk_nbytes, dtype)
        if data is None:
            out[...] = layout.fill_value
            return out
        if codec.has_crc32c:
            data, stored = data[:-4], int.from_bytes(data[-4:], "little")
            if crc32c.crc32c(data) != stored:
                raise ChunkError(
                    "crc32c checksum mismatch in the chunk",
                    store=self._store,
                    array=layout.name,
                    key=describe_chunk(layout, coords),
                )
        try:
            codec.decode_into(data, out.reshape(-1).view(np.uint8), needed)
        except ChunkError:
            raise
        except Exception as err:  # numcodecs raises RuntimeError/ValueError of its own
            raise ChunkError(
                f"cannot decode {codec.compressor} chunk: {err}",
                store=self._store,
                array=layout.name,
                key=describe_chunk(layout, coords),
            ) from err
        return out

    def scratch_bytes(self, nbytes: int) -> np.ndarray:
        """This thread's decode scratch as ``nbytes`` bytes (what :meth:`decode`
        returns without ``out`` lives there too)."""
        return self._scratch.decoded_bytes(nbytes)


def describe_chunk(layout: ArrayLayout, coords4: Sequence[int]) -> str:
    """The chunk's key (and inner position in its shard), from ``(t, level, y, x)``."""
    return layout.describe_chunk(natural_coords(layout, coords4))
