"""The GPU feed with real CUDA streams and events (skipped without a GPU).

``test_feed_ring.py`` checks the ordering logic with fake streams; this runs the
same protocol through CuPy: batches written on the prefetch threads' streams
with enough kernels to take a while, copied on the feed stream as DALI does,
every copy holding its own batch, the ring never growing.
"""

from __future__ import annotations

import faulthandler

import numpy as np
import pytest

from zarrdali.backends.gpu.feed import CudaFeed, ring_size

pytestmark = pytest.mark.gpu

faulthandler.enable()

SHAPE = (8, 3, 4, 128, 128)


def slow_load(n_batches: int, kernels: int = 30):
    import cupy as cp

    def load(k: int, out_for=None, stream=None):
        b = SHAPE[0] if k < n_batches - 1 else 3
        out = out_for((b, *SHAPE[1:]), np.float32)
        with stream:  # all of it on the thread's stream, nothing synchronized
            tmp = cp.full(out.shape, -1.0, dtype=np.float32)
            for _ in range(kernels):
                tmp = tmp * np.float32(1.0)
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
            with feed.stream:  # DALI's copy, enqueued on the stream it was given
                copies.append(window.copy())
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
