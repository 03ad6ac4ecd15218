"""The GPU feed with real CUDA streams and events (skipped without a GPU).

``test_feed_ring.py`` checks the ordering logic with fake streams; this runs the
same protocol through CuPy: batches "decoded" on the prefetch threads' streams
with enough kernels to take a while, written into the ring buffer after
``before_write``, copied on the feed stream as DALI does, every copy holding
its own batch, the ring never growing; what DALI reads of the batch names the
feed stream; streams given by a backend are reused by the next epoch.
"""

from __future__ import annotations

import faulthandler

import numpy as np
import pytest

from zarrdali.gpu.feed import CudaFeed, ring_size

pytestmark = pytest.mark.gpu

faulthandler.enable()

SHAPE = (8, 3, 4, 128, 128)


def slow_load(n_batches: int, kernels: int = 30):
    import cupy as cp

    def load(k: int, out_for=None, stream=None, before_write=None):
        b = SHAPE[0] if k < n_batches - 1 else 3
        out = out_for((b, *SHAPE[1:]), np.float32)
        with stream:  # all of it on the thread's stream, nothing synchronized
            tmp = cp.full(out.shape, -1.0, dtype=np.float32)
            for _ in range(kernels):  # the "read and decode"
                tmp = tmp * np.float32(1.0)
            before_write()
            out[...] = tmp + np.float32(k + 1)
        return (out,), np.full((b, 3), k)

    return load


@pytest.mark.parametrize("depth", [1, 3])
def test_every_copy_on_the_feed_stream_holds_its_batch(depth):
    import cupy as cp

    n = 40
    feed = CudaFeed(slow_load(n), n, depth=depth, batch_size=SHAPE[0])
    copies = []
    try:
        for k in range(n):
            (window,), samples = feed.get(k)
            assert (samples == k).all()
            # DALI reads this on its own thread, where no stream is current
            assert window.__cuda_array_interface__["stream"] == feed.stream.ptr
            with feed.stream:  # DALI's copy, enqueued on the stream it was given
                copies.append(window.array.copy())
        assert feed.ring.allocations <= ring_size(depth)
    finally:
        feed.close()
    cp.cuda.Device().synchronize()
    for k, c in enumerate(copies):
        assert float(c.min()) == float(c.max()) == k, f"batch {k} copied from another batch"


def test_close_mid_epoch_releases_the_ring():
    import cupy as cp

    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    before = pool.used_bytes()
    feed = CudaFeed(slow_load(30), 30, depth=2, batch_size=SHAPE[0])
    for k in range(5):
        feed.get(k)
    feed.close()
    feed.close()
    assert feed.stream is None
    assert all(s.buffer is None and s.ready is None for s in feed.ring.slots)
    assert pool.used_bytes() <= before


def test_backend_streams_are_reused_by_the_next_epoch():
    import cupy as cp

    from zarrdali.gpu.feed import FeedStreams

    streams = FeedStreams(cp)
    pool = cp.get_default_memory_pool()
    totals = []
    try:
        for _ in range(4):
            feed = CudaFeed(slow_load(12), 12, depth=2, batch_size=SHAPE[0], streams=streams)
            for k in range(12):
                feed.get(k)
            feed.close()
            cp.cuda.Device().synchronize()
            totals.append(pool.total_bytes())
        assert streams.made <= 3  # the feed stream and one per loading thread
        assert totals[-1] <= totals[1], totals  # the ring's blocks reused under the same streams
    finally:
        streams.close()
