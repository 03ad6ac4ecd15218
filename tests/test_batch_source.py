"""A DALI epoch (gpu/epoch.py) takes its batch source from its backend and uses it as is.

``ZarrLoader`` does not test the device: it asks the backend to open the epoch,
and a backend whose batches go through DALI says where DALI runs, whether a
batch is one window, and builds the epoch's source. Here fake
backends (a CPU backend underneath) bring their own sources: a recording one,
and the GPU path's :class:`CudaFeed` over fake CUDA streams, run through a real
(CPU) DALI pipeline whose feeding is recorded as the copy DALI would enqueue on
the feed stream. That checks, with DALI's own call order, that a ring buffer
is written again only after DALI's copy of the batch it held.
"""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest
from nvidia.dali.pipeline import Pipeline

import zarrdali
from fakecuda import FakeDevice, check_reuse_order
from storefactory import VarSpec
from test_loader_oracle import loader_for, to_numpy
from zarrdali.gpu.epoch import open_dali_epoch
from zarrdali.gpu.feed import CudaFeed, ring_size
from zarrdali.gpu.prefetch import BatchPrefetcher

VARS = [
    VarSpec("a", shape=(20, 21, 33), chunks=(1, 21, 33)),
    VarSpec("b", shape=(20, 21, 33), chunks=(2, 8, 8), shards=(4, 16, 16), dtype="int16"),
]
KW = dict(batch_size=5, augment=("flip", "rot90"), normalize={"a": (0.5, 2.0), "b": (1.0, 3.0)})


class RecordingSource:
    """A batch source of a backend's own: every call recorded."""

    cuda_stream = None

    def __init__(self, load, n_batches: int, depth: int, log: list) -> None:
        self._inner = BatchPrefetcher(load, n_batches, depth=depth, workers=2)
        self.log = log
        log.append(("created", n_batches, depth))

    def get(self, k: int):
        self.log.append(("get", k))
        return self._inner.get(k)

    def close(self) -> None:
        self.log.append(("close",))
        self._inner.close()


class DaliEpochs:
    """Epochs through a DALI pipeline (on the CPU here): what GpuBackend does."""

    finishes_in_gather = False
    remote = False

    @property
    def traits(self):
        return self.inner.traits

    def hold_static(self, static):
        return None

    def open_epoch(self, request, run) -> None:
        open_dali_epoch(self, request, run)


class OwnSourceBackend(DaliEpochs):
    """A CPU backend that builds its epochs' sources itself."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.device, self.dali_device, self.whole_window = "cpu", "cpu", False
        self.log: list = []
        self.sources: list[weakref.ref] = []

    def dali_device_id(self):
        return None

    def load_batch(self, layouts, plan, **device_args):
        assert not device_args  # a host source passes no buffer, no stream
        return self.inner.load_batch(layouts, plan)

    def batch_source(self, load, n_batches, *, depth, batch_size):
        source = RecordingSource(load, n_batches, depth, self.log)
        self.sources.append(weakref.ref(source))
        return source

    def close(self) -> None:
        self.inner.close()


class FakeCudaBackend(DaliEpochs):
    """The GPU path's shape on the CPU: one window per batch, assembled into the
    feed's ring buffer, its "gather" enqueued on the stream it is given."""

    device, dali_device, whole_window = "cpu", "cpu", True

    def __init__(self, inner, cuda: FakeDevice) -> None:
        self.inner, self.cuda = inner, cuda
        self.feeds: list[CudaFeed] = []

    def dali_device_id(self):
        return None

    def load_batch(self, layouts, plan, *, out=None, stream=None, before_write=None):
        window = self.inner.load_batch(layouts, plan)
        assert plan.frame_split is None and out is not None and stream is not None
        assert out.shape == window.shape and out.dtype == window.dtype
        before_write()  # the feed's wait for DALI's copy of the buffer's previous batch
        out[...] = window
        stream.enqueue("write", self.cuda.buffer_id(out))
        return out

    def batch_source(self, load, n_batches, *, depth, batch_size):
        feed = CudaFeed(load, n_batches, depth=depth, batch_size=batch_size, cuda=self.cuda)
        self.feeds.append(feed)
        return feed

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def store(make_store):
    return make_store(*VARS)


def epochs_of(loader, epochs=(0, 1)) -> list[list[dict]]:
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out.append([to_numpy(b) for b in loader])
    return out


def assert_same(got: list[list[dict]], want: list[list[dict]]) -> None:
    assert len(got) == len(want)
    for g_epoch, w_epoch in zip(got, want, strict=True):
        assert len(g_epoch) == len(w_epoch)
        for g, w in zip(g_epoch, w_epoch, strict=True):
            assert g.keys() == w.keys()
            for key in w:
                np.testing.assert_array_equal(g[key], w[key])


def test_the_loader_uses_the_source_its_backend_builds(store):
    with loader_for(store, ["a", "b"], workers=0, **KW) as plain:
        want = epochs_of(plain)
    loader = loader_for(store, ["a", "b"], workers=0, **KW)
    backend = loader.backend = OwnSourceBackend(loader.backend)
    try:
        got = epochs_of(loader)
        n = len(loader)
        assert_same(got, want)
        log = backend.log
        # one source per epoch, built with the epoch's size and the loader's depth,
        # asked in order, closed when its epoch ended
        assert log.count(("close",)) == 2
        first = log[: log.index(("close",)) + 1]
        gets = [("get", k) for k in range(n)]
        assert first == [("created", n, loader.prefetch), *gets, ("close",)]
        gc.collect()
        assert all(ref() is None for ref in backend.sources)
    finally:
        loader.close()


def test_a_resumed_epoch_asks_its_source_for_the_rest(store):
    loader = loader_for(store, ["a", "b"], workers=0, **KW)
    backend = loader.backend = OwnSourceBackend(loader.backend)
    try:
        it = iter(loader)
        for _ in range(3):
            next(it)
        state = loader.state_dict()
        it.close()
        backend.log.clear()
        loader.load_state_dict(state)
        rest = sum(1 for _ in loader)
        assert rest == len(loader) - 3
        assert backend.log[0] == ("created", len(loader) - 3, loader.prefetch)
        assert [e for e in backend.log if e[0] == "get"] == [("get", k) for k in range(rest)]
    finally:
        loader.close()


@pytest.mark.parametrize("prefetch", [1, 3])
def test_cuda_feed_through_a_dali_pipeline_orders_reuse_after_dali_copies(
    store, monkeypatch, prefetch
):
    """The feed under DALI's real calls: a batch is fed (DALI's copy, recorded on
    the feed stream) before DALI asks for the next one, so each buffer's next
    write is ordered after the copy of its last batch; the batches are the CPU
    path's, bit for bit (the pipeline slices the window into input and target)."""
    with loader_for(store, ["a", "b"], workers=0, prefetch=prefetch, **KW) as plain:
        want = epochs_of(plain)
    device = FakeDevice()
    loader = loader_for(store, ["a", "b"], workers=0, prefetch=prefetch, **KW)
    backend = loader.backend = FakeCudaBackend(loader.backend, device)
    feed_input = Pipeline._feed_input
    fed: list[int] = []

    def feeding(pipe, name, data, *args, **kwargs):
        if isinstance(data, np.ndarray) and data.ndim == 5:  # the window of the batch
            feed = backend.feeds[-1]
            feed.stream.enqueue("copy", device.buffer_id(data))
            fed.append(device.buffer_id(data))
        return feed_input(pipe, name, data, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "_feed_input", feeding)
    try:
        got = epochs_of(loader)
    finally:
        loader.close()
    assert_same(got, want)
    assert len(fed) == sum(len(e) for e in want)
    assert check_reuse_order(device) == len(fed)
    for feed in backend.feeds:
        assert feed.ring.allocations <= ring_size(prefetch)
    # every epoch's feed closed: streams synchronized, buffers released
    assert all(feed.stream is None for feed in backend.feeds)
    assert all(s.buffer is None for feed in backend.feeds for s in feed.ring.slots)
    assert not [t for t in threading.enumerate() if t.name.startswith("zarrdali-prefetch")]


def test_an_epoch_broken_off_closes_the_cuda_feed(store):
    device = FakeDevice()
    loader = loader_for(store, ["a", "b"], workers=0, **KW)
    backend = loader.backend = FakeCudaBackend(loader.backend, device)
    try:
        for k, _ in enumerate(loader):
            if k == 1:
                break
        (feed,) = backend.feeds
        assert feed.stream is None
        synced = {i for kind, i in device.log if kind == "stream synchronized"}
        created = {i for kind, i in device.log if kind == "stream created"}
        assert synced == created
        with pytest.raises(zarrdali.LoaderClosedError):
            feed.get(2)
    finally:
        loader.close()


def test_the_gpu_backend_fills_the_source_role():
    import inspect

    from zarrdali.gpu import GpuBackend
    from zarrdali.gpu.epoch import CudaSourceRole

    assert issubclass(GpuBackend, CudaSourceRole)
    params = inspect.signature(GpuBackend.load_batch).parameters
    assert params["out"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["stream"].kind is inspect.Parameter.KEYWORD_ONLY
