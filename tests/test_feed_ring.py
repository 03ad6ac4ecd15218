"""The GPU feed's ordering, on the CPU: fake streams and events record which
operation CUDA would order before which (``fakecuda``), and the checks ask that
DALI's copy of a batch follows its gather and that a ring buffer is written
again only after DALI's copy out of it, while the batch's read and decode wait
for no copy; that the batch handed to DALI names the feed stream; that a thread
waiting for a buffer never hangs a close; that close releases events, buffers
and streams in that order after synchronizing every stream; and that streams
given by the backend are made once and reused by every epoch."""

from __future__ import annotations

import gc
import random
import threading
import time

import numpy as np
import pytest

from fakecuda import FakeDevice, check_reuse_order, happens_before
from zarrdali import LoaderClosedError
from zarrdali.gpu.feed import BufferRing, CudaFeed, FeedStreams, ring_size

SHAPE = (4, 3, 2, 8, 8)  # [B, T, C, H, W] of a full batch


def fake_load(n_batches: int, *, fail_at: int | None = None, jitter: float = 0.002, seed=0):
    """A loader's ``load(k, out_for, stream, before_write)``: plans (sleeps),
    takes the buffer, "reads and decodes" on ``stream``, then "gathers" batch k
    into the buffer on ``stream`` (and on the host, to check values)."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def load(k: int, out_for=None, stream=None, before_write=None):
        with lock:
            pause = rng.random() * jitter
        time.sleep(pause)  # planning
        b = SHAPE[0] if k < n_batches - 1 else 2  # a partial last batch
        out = out_for((b, *SHAPE[1:]), np.float32)
        stream.enqueue("decode", k)  # read and decode: nothing written to `out`
        before_write()
        stream.enqueue("write", stream.device.buffer_id(out), k)
        out[...] = k
        if k == fail_at:
            raise OSError(f"disk went away in batch {k}")
        return (out,), np.full((b, 3), k)

    return load


def run_dali_like(feed: CudaFeed, device: FakeDevice, n: int, *, consumer_s: float = 0.0):
    """What DALI's external source does with the feed: ask for batch k, then feed
    it (the copy, enqueued on the stream given as ``cuda_stream``), in order."""
    handle = feed.cuda_stream.__cuda_stream__()[1]
    assert handle == feed.stream.ptr
    for k in range(n):
        frames, samples = feed.get(k)
        (window,) = frames
        if device.cuda_array_interface:  # what DALI reads, on this thread, outside any stream
            assert window.__cuda_array_interface__["stream"] == feed.stream.ptr
        window = np.asarray(window)  # the host stand-in's values
        assert (samples == k).all()
        assert (window == k).all(), "the buffer of batch k holds another batch"
        feed.stream.enqueue("copy", device.buffer_id(window), k)
        del frames, window
        time.sleep(consumer_s)


def test_ring_size_is_depth_plus_two():
    assert [ring_size(d) for d in (1, 2, 3, 8)] == [3, 4, 5, 10]


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("consumer_s", [0.0, 0.003], ids=["fast-consumer", "slow-consumer"])
def test_dali_copies_after_the_gather_and_buffers_are_reused_after_the_copy(depth, consumer_s):
    device = FakeDevice()
    n = 30
    feed = CudaFeed(
        fake_load(n, seed=depth), n, depth=depth, batch_size=SHAPE[0], workers=2, cuda=device
    )
    try:
        run_dali_like(feed, device, n, consumer_s=consumer_s)
    finally:
        feed.close()
    assert check_reuse_order(device) == n
    writes = device.ops_with("write")
    assert sorted(op.what[2] for op in writes) == list(range(n))
    # bounded memory: the ring's buffers, each allocated once, for a full batch
    assert feed.ring.allocations <= ring_size(depth)
    assert len({op.what[1] for op in writes}) <= ring_size(depth)
    allocated = [e for e in device.log if e[0] == "buffer allocated"]
    assert len(allocated) == feed.ring.allocations


def test_copy_of_batch_k_waits_for_its_gather_on_another_stream():
    device = FakeDevice()
    feed = CudaFeed(fake_load(5), 5, depth=2, batch_size=SHAPE[0], cuda=device)
    try:
        run_dali_like(feed, device, 5)
    finally:
        feed.close()
    by_batch = {op.what[2]: op for op in device.ops_with("write")}
    for copy in device.ops_with("copy"):
        write = by_batch[copy.what[2]]
        assert write.stream != copy.stream  # gathered on a side stream, copied on the feed's
        assert happens_before(write, copy)
        assert not happens_before(copy, write)


def test_without_the_feed_events_the_check_fails():
    """The checker itself: a reuse not ordered after the copy is caught."""
    device = FakeDevice()
    gather, feed_stream = device.stream(), device.stream()
    gather.enqueue("write", 1, 0)
    ready = device.event()
    ready.record(gather)
    feed_stream.wait_event(ready)
    feed_stream.enqueue("copy", 1, 0)
    gather.enqueue("write", 1, 1)  # no wait for a "free" event recorded after the copy
    with pytest.raises(AssertionError, match="overwrite"):
        check_reuse_order(device)


def test_a_thread_waiting_for_a_buffer_is_woken_by_close():
    device = FakeDevice()
    ring = BufferRing(1, alloc=device.empty, new_event=device.event)
    ring.acquire(8, 8)
    raised: list[BaseException] = []

    def second():
        try:
            ring.acquire(8, 8)
        except BaseException as err:
            raised.append(err)

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.05)
    assert t.is_alive()  # every buffer is taken: it waits
    ring.cancel_waiters()
    t.join(5)
    assert not t.is_alive()
    assert isinstance(raised[0], LoaderClosedError)


def test_close_with_loads_waiting_for_buffers_does_not_hang():
    """A consumer that stops asking (an epoch broken off) leaves every buffer
    taken and loads waiting for one: close wakes them and joins the threads."""
    device = FakeDevice()
    feed = CudaFeed(fake_load(50, jitter=0), 50, depth=4, batch_size=SHAPE[0], cuda=device)
    feed.get(0)
    time.sleep(0.05)
    done = threading.Event()
    threading.Thread(target=lambda: (feed.close(), done.set()), daemon=True).start()
    assert done.wait(10), "close hung on a thread waiting for a buffer"
    assert not [t for t in threading.enumerate() if t.name.startswith("zarrdali-prefetch")]


def test_a_failed_load_returns_its_buffer_after_its_own_work():
    device = FakeDevice()
    feed = CudaFeed(fake_load(10, fail_at=3), 10, depth=2, batch_size=SHAPE[0], cuda=device)
    try:
        with pytest.raises(OSError, match="batch 3"):
            run_dali_like(feed, device, 10)
        failed = next(op for op in device.ops_with("write") if op.what[2] == 3)
        used = [s for s in feed.ring.slots if s.buffer is not None]
        slot = next(s for s in used if device.buffer_id(s.buffer) == failed.what[1])
        # the next writer of that buffer waits for its "free" event: after the failed work
        probe = device.stream()
        probe.wait_event(slot.free)
        assert happens_before(failed, probe.enqueue("write", failed.what[1], -1))
        assert slot in feed.ring._free
    finally:
        feed.close()


def test_close_synchronizes_then_releases_events_buffers_streams_in_order():
    device = FakeDevice()
    feed = CudaFeed(fake_load(12), 12, depth=2, batch_size=SHAPE[0], cuda=device)
    run_dali_like(feed, device, 7)  # broken off mid-epoch: loads in flight
    n_streams = sum(1 for e in device.log if e[0] == "stream created")
    gc.disable()  # only reference counting frees anything
    try:
        feed.close()
        feed.close()  # idempotent
        log = [kind for kind, _ in device.log]
    finally:
        gc.enable()
    assert log.count("stream synchronized") == n_streams
    assert log.count("event freed") == 2 * ring_size(2)
    assert log.count("buffer freed") == feed.ring.allocations
    assert log.count("stream freed") == n_streams
    # each kind of release starts after the previous one has finished
    phases = ["stream synchronized", "event freed", "buffer freed", "stream freed"]
    order = [phases.index(kind) for kind in log if kind in phases]
    assert order == sorted(order), order
    assert not [t for t in threading.enumerate() if t.name.startswith("zarrdali-prefetch")]
    with pytest.raises(LoaderClosedError):
        feed.get(7)
    with pytest.raises(LoaderClosedError):
        feed.cuda_stream.__cuda_stream__()


def test_a_batch_larger_than_the_buffers_is_refused():
    device = FakeDevice()
    ring = BufferRing(2, alloc=device.empty, new_event=device.event)
    slot = ring.acquire(100, 100)
    ring.release(slot)
    ring.acquire(10, 10)  # the other slot
    with pytest.raises(ValueError, match="does not fit"):
        ring.acquire(200, 200)
    assert len(ring._free) == 1


def test_read_and_decode_wait_for_no_copy_only_the_gather_does():
    """The wait for DALI's copy of a buffer's previous batch comes just before
    the gather: a batch's read and decode are not ordered after it (nor after
    what that copy waited for, e.g. torch's work on the legacy stream)."""
    device = FakeDevice()
    n = 24
    feed = CudaFeed(fake_load(n), n, depth=2, batch_size=SHAPE[0], workers=1, cuda=device)
    try:
        run_dali_like(feed, device, n)
    finally:
        feed.close()
    assert check_reuse_order(device) == n
    decode = {op.what[1]: op for op in device.ops_with("decode")}
    copy = {op.what[2]: op for op in device.ops_with("copy")}
    previous: dict[int, int] = {}  # buffer -> the batch it last held
    reused = 0
    for write in device.ops_with("write"):
        buf, k = write.what[1], write.what[2]
        if buf in previous:
            p = previous[buf]
            assert happens_before(copy[p], write)  # the gather waits for DALI's copy
            assert not happens_before(copy[p], decode[k])  # read and decode do not
            reused += 1
        previous[buf] = k
    assert reused >= n - ring_size(2)


def test_the_handed_over_batch_names_the_feed_stream():
    """DALI reads the batch's CUDA array interface on its own thread: it names
    the feed stream (where the batch's ready event was waited for), not the
    legacy default stream that thread has current."""
    device = FakeDevice(cuda_array_interface=True)
    feed = CudaFeed(fake_load(6), 6, depth=2, batch_size=SHAPE[0], cuda=device)
    try:
        run_dali_like(feed, device, 6)  # asserts the stream entry of each batch
    finally:
        feed.close()
    raw = device.empty(8, np.float32)  # a buffer as the feed would hand it over unwrapped
    assert raw.__cuda_array_interface__["stream"] == 1


def test_streams_are_made_once_and_reused_by_every_epoch():
    """With the backend's FeedStreams, no epoch makes streams of its own (CuPy's
    pool caches freed blocks per stream: new streams each epoch would leave each
    epoch's buffers cached under dead streams); closing a feed frees none."""
    device = FakeDevice()
    streams = FeedStreams(device)
    made = []
    for epoch in range(5):
        feed = CudaFeed(
            fake_load(9, seed=epoch), 9, depth=2, batch_size=SHAPE[0], workers=2, cuda=device,
            streams=streams,
        )  # fmt: skip
        run_dali_like(feed, device, 9 if epoch % 2 else 4)  # some epochs broken off
        assert feed.stream is streams.feed_stream()
        feed.close()
        made.append(streams.made)
    assert made[-1] == made[0] <= 3  # the feed stream and one per loading thread
    assert sum(1 for kind, _ in device.log if kind == "stream created") == streams.made
    assert not [e for e in device.log if e[0] == "stream freed"]
    synced = sum(1 for kind, _ in device.log if kind == "stream synchronized")
    gc.disable()
    try:
        streams.close()
        streams.close()
    finally:
        gc.enable()
    log = [kind for kind, _ in device.log]
    assert log.count("stream freed") == streams.made
    assert log.count("stream synchronized") == synced + streams.made
    with pytest.raises(LoaderClosedError):
        streams.lease()
