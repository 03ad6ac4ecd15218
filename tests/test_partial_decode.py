"""Partial decoding: a chunk is decoded only as far as a batch reads from it.

The codec level: ``ChunkCodec.decode_into(..., needed=n)`` fills at least the
first ``n`` bytes, exactly as a whole decode would. The loader level: batches
are the same with and without it, and ``partial_decode=False`` checks whole
chunks, so damage past the bytes a batch reads is caught only then.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numcodecs.blosc
import numcodecs.lz4
import numcodecs.zstd
import numpy as np
import pytest
import zstandard

import zarrdali
from storefactory import VarSpec, open_arrays
from zarrdali.errors import ChunkError
from zarrdali.store import codecs
from zarrdali.store.codecs import ChunkCodec

RAW = np.random.default_rng(7).normal(size=(300, 300)).astype("<f4")  # 360 kB: 3 zstd blocks
NBYTES = RAW.nbytes


def encode(compressor: str, raw: bytes) -> bytes:
    if compressor == "zstd":
        return numcodecs.zstd.compress(raw)
    if compressor == "gzip":
        return gzip.compress(raw)
    if compressor == "lz4":
        return numcodecs.lz4.compress(raw)
    if compressor == "blosc":
        return numcodecs.blosc.compress(raw, b"zstd", 5, numcodecs.blosc.SHUFFLE)
    return raw


def poisoned() -> np.ndarray:
    """An output buffer whose stale bytes show wherever the decoder did not write."""
    return np.full(NBYTES, 0xAB, dtype=np.uint8)


@pytest.mark.parametrize("compressor", ["zstd", "gzip", "none", "lz4", "blosc"])
@pytest.mark.parametrize("needed", [1, 4, 1000, 131_072, 131_073, NBYTES - 1, NBYTES, None])
def test_prefix_equals_the_whole_decode(compressor, needed):
    codec = ChunkCodec(compressor=compressor, byteorder="<")
    raw = RAW.tobytes()
    out = poisoned()
    codec.decode_into(memoryview(encode(compressor, raw)), out, needed)
    n = NBYTES if needed is None else needed
    assert out[:n].tobytes() == raw[:n]
    if not codec.decodes_partially(needed, NBYTES):
        assert out.tobytes() == raw  # decoded whole


@pytest.mark.parametrize("compressor", ["zstd", "gzip", "none"])
def test_streaming_compressors_stop_after_the_prefix(compressor):
    codec = ChunkCodec(compressor=compressor, byteorder="<")
    assert codec.streams
    out = poisoned()
    codec.decode_into(memoryview(encode(compressor, RAW.tobytes())), out, 1000)
    assert np.all(out[1000:] == 0xAB), "decoded past the bytes asked for"


@pytest.mark.parametrize("compressor", ["zstd", "gzip", "none"])
def test_a_prefix_skipping_too_little_is_decoded_whole(compressor):
    codec = ChunkCodec(compressor=compressor, byteorder="<")
    needed = NBYTES - codecs.MIN_PARTIAL_SKIP + 1
    assert not codec.decodes_partially(needed, NBYTES)
    assert codec.decodes_partially(needed - 1, NBYTES)
    out = poisoned()
    codec.decode_into(memoryview(encode(compressor, RAW.tobytes())), out, needed)
    assert out.tobytes() == RAW.tobytes()


def test_zstd_frame_without_a_declared_size():
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(RAW.tobytes())
    assert codecs.zstd_content_size(memoryview(frame)) is None
    out = poisoned()
    ChunkCodec(compressor="zstd", byteorder="<").decode_into(memoryview(frame), out, 5000)
    assert out[:5000].tobytes() == RAW.tobytes()[:5000]


@pytest.mark.parametrize("compressor", ["zstd", "gzip"])
def test_a_stream_ending_inside_the_prefix_is_an_error(compressor):
    data = encode(compressor, RAW.tobytes())
    # gzip keeps its trailer, so the size it declares still matches
    trailer = data[-8:] if compressor == "gzip" else b""
    data = data[: len(data) // 4] + trailer
    codec = ChunkCodec(compressor=compressor, byteorder="<")
    assert codec.decodes_partially(NBYTES // 2, NBYTES)
    with pytest.raises((ValueError, zstandard.ZstdError, zlib.error)):
        codec.decode_into(memoryview(data), poisoned(), NBYTES // 2)


@pytest.mark.parametrize("compressor", ["zstd", "gzip", "none"])
def test_a_wrong_declared_size_is_an_error_even_for_a_prefix(compressor):
    data = encode(compressor, RAW[:-1].tobytes())  # one row short
    codec = ChunkCodec(compressor=compressor, byteorder="<")
    with pytest.raises((ValueError, zlib.error)):
        codec.decode_into(memoryview(data), poisoned(), 1000)


def test_without_zstandard_zstd_chunks_are_decoded_whole(monkeypatch):
    monkeypatch.setattr(codecs, "zstandard", None)
    codec = ChunkCodec(compressor="zstd", byteorder="<")
    assert not codec.streams
    out = poisoned()
    codec.decode_into(memoryview(encode("zstd", RAW.tobytes())), out, 1000)
    assert out.tobytes() == RAW.tobytes()


# -- the loader -------------------------------------------------------------
FIELD = (3, 256, 256)  # field-sized chunks: 256 kB decoded, two zstd blocks


@pytest.mark.parametrize("compressor", ["zstd", "gzip", "none", "lz4"])
def test_batches_equal_with_and_without_partial_decode(make_store, compressor):
    store = make_store(
        VarSpec("a", shape=FIELD, chunks=(1, 256, 256), compressor=compressor),
        VarSpec("b", shape=FIELD, chunks=(1, 128, 256), compressor=compressor, endian="big"),
    )
    arrays = open_arrays(store, ["a", "b"])
    samples = np.array([(0, 0, 0), (1, 17, 100), (0, 240, 240), (1, 0, 200)], dtype=np.int64)
    batches = []
    for partial in (True, False):
        ld = zarrdali.ZarrLoader(
            store, ["a", "b"], input_steps=2, tile=(16, 16), device="cpu", workers=0,
            partial_decode=partial,
        )  # fmt: skip
        batches.append(ld.load_batch(samples))
        ld.close()
    np.testing.assert_array_equal(batches[0], batches[1])
    for i, (t0, y0, x0) in enumerate(samples.tolist()):
        want = np.stack([arrays[v][t0 : t0 + 2, y0 : y0 + 16, x0 : x0 + 16] for v in "ab"], 1)
        np.testing.assert_array_equal(batches[0][i], want)


def damage_the_tail(path: Path, compressor: str) -> None:
    """Garble bytes near the end of a chunk's stream (gzip: before its trailer)."""
    raw = bytearray(path.read_bytes())
    end = len(raw) - (8 if compressor == "gzip" else 0)
    raw[end - 64 : end] = bytes(64)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("compressor", ["zstd", "gzip"])
def test_damage_past_the_prefix_is_caught_by_whole_chunk_decoding(make_store, compressor):
    store = make_store(VarSpec("a", shape=FIELD, chunks=(1, 256, 256), compressor=compressor))
    want = open_arrays(store, ["a"])["a"][1, :16, :16]
    damage_the_tail(store / "a" / "c/1/0/0", compressor)
    top_left = np.array([(1, 0, 0)], dtype=np.int64)  # reads the first 16 rows only
    kw = dict(input_steps=1, tile=(16, 16), device="cpu", workers=0)

    partial = zarrdali.ZarrLoader(store, "a", **kw)
    np.testing.assert_array_equal(partial.load_batch(top_left)[0, 0, 0], want)
    partial.close()

    whole = zarrdali.ZarrLoader(store, "a", partial_decode=False, **kw)
    with pytest.raises(ChunkError) as info:
        whole.load_batch(top_left)
    whole.close()
    assert info.value.array == "a" and info.value.key == "c/1/0/0"


def test_the_benchmark_counts_the_bytes_partial_decoding_skips(make_store):
    from zarrdali.bench.runners import _decoded_nbytes

    store = make_store(VarSpec("a", shape=FIELD, chunks=(1, 256, 256)))
    batches = [np.array([(0, 0, 0), (1, 8, 8)]), np.array([(2, 240, 0)])]
    counted = {}
    for partial in (True, False):
        ld = zarrdali.ZarrLoader(
            store, "a", tile=(16, 16), device="cpu", workers=0, partial_decode=partial
        )
        counted[partial] = _decoded_nbytes(ld, batches)
        ld.close()
    chunk = 256 * 256 * 4
    assert counted[False] == (3 * chunk, 3 * chunk)
    whole, decoded = counted[True]
    # the first batch's two chunks end after rows 16 and 24; the last one is read near its end
    assert whole == 3 * chunk
    assert decoded == (15 * 256 + 16) * 4 + (23 * 256 + 24) * 4 + chunk
