"""The contract every path keeps (batch/backend.py), one test class for all of them.

As zarr-python's ``StoreTests`` hold each store to the same tests, each path
here runs the same assertions: the CPU backend in this process and with worker
processes, and the GPU backend on its CPU stand-in (fake CuPy whose kernels are
their numpy twins, the GPU path's DALI graph run on the CPU). They serve the
same batches bit for bit, equal to zarr-python's read at ``batch["index"]``;
they save and resume state alike; they close alike; a damaged chunk is a
``ChunkError`` naming the array and chunk on every path. The loader reaches
every one of them only through the :class:`~zarrdali.batch.backend.Backend`
protocol.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fakegpu
import zarrdali
from storefactory import VarSpec, corrupt_chunk
from test_loader_oracle import Oracle, check_batches, run_epochs, to_numpy
from zarrdali.batch.backend import Backend, EpochRequest, PathTraits

VARS = [
    VarSpec("a", shape=(14, 21, 33), chunks=(2, 8, 8), shards=(4, 16, 16)),
    VarSpec("b", shape=(14, 21, 33), chunks=(1, 21, 33), dtype="int16"),
]
STATS = {"a": (0.5, 2.0), "b": (1.0, 3.0)}
KW = dict(
    input_steps=2,
    target_steps=1,
    tile=(8, 8),
    batch_size=6,
    shuffle=True,
    seed=3,
    num_threads=2,
)
PATHS = ["cpu-in-process", "cpu-workers", "gpu-stand-in"]


@pytest.fixture
def store(make_store):
    return make_store(*VARS)


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """How to make a loader on one path (the GPU stand-in installed for that test)."""
    name = request.param
    if name == "gpu-stand-in":
        from zarrdali.gpu import GpuBackend, feed

        fakegpu.install(monkeypatch)
        monkeypatch.setattr(GpuBackend, "dali_device", "cpu")  # DALI's graph, on the CPU
        monkeypatch.setattr(GpuBackend, "dali_device_id", lambda self: None)
        # DALI on the CPU takes host arrays: the stand-in's "device" arrays, stripped
        # of their CUDA array interface (which would send DALI to a GPU)
        monkeypatch.setattr(feed, "hand_over", lambda array, stream: np.asarray(array))
    return name


def make_loader(path: str, store, **kw) -> zarrdali.ZarrLoader:
    options = {**KW, **kw}
    if path == "gpu-stand-in":
        options.update(device="cuda")
    else:
        options.update(device="cpu", workers=2 if path == "cpu-workers" else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stand-in's "host decode" notices
        return zarrdali.ZarrLoader(store, ["a", "b"], **options)


def reference(store, epochs=(0, 1), **kw) -> dict[int, list[dict]]:
    with make_loader("cpu-in-process", store, **kw) as loader:
        return run_epochs(loader, list(epochs))


def assert_same(got: dict[int, list[dict]], want: dict[int, list[dict]]) -> None:
    assert got.keys() == want.keys()
    for e in want:
        assert len(got[e]) == len(want[e]) > 0
        for g, w in zip(got[e], want[e], strict=True):
            assert g.keys() == w.keys()
            for key in w:
                assert g[key].dtype == w[key].dtype, (e, key)
                assert g[key].shape == w[key].shape, (e, key)
                assert g[key].tobytes() == w[key].tobytes(), (e, key)


class TestBackendContract:
    def test_the_backend_keeps_the_protocol_and_declares_its_path(self, path, store):
        with make_loader(path, store) as loader:
            backend = loader.backend
            assert isinstance(backend, Backend)
            assert isinstance(backend.traits, PathTraits)
            assert backend.traits is loader.traits
            assert backend.traits.device == loader.device
            # the CPU path hands host batches over itself; the GPU path through DALI
            assert backend.traits.host_batches == (loader.device == "cpu")
            assert backend.traits.uses_dali == (loader.device == "cuda")

    def test_batches_equal_the_zarr_oracle_and_every_other_path(self, path, store):
        want = reference(store)
        with make_loader(path, store) as loader:
            got = run_epochs(loader, [0, 1])
        assert_same(got, want)
        assert [b["index"].tolist() for b in got[0]] != [b["index"].tolist() for b in got[1]]
        check_batches(got[0], Oracle(store, ["a", "b"]), input_steps=2, target_steps=1, tile=(8, 8))

    def test_finishing_is_the_same_on_every_path(self, path, store):
        kw = dict(normalize=STATS, augment=("flip", "rot90"))
        want = reference(store, **kw)
        with make_loader(path, store, **kw) as loader:
            got = run_epochs(loader, [0, 1])
        assert_same(got, want)
        assert "augment" in got[0][0]

    def test_state_and_resume(self, path, store):
        want = reference(store, epochs=(1,))[1]
        with make_loader(path, store) as loader:
            loader.set_epoch(1)
            it = iter(loader)
            first = [to_numpy(next(it)) for _ in range(2)]
            state = loader.state_dict()
            del it
        assert state["epoch"] == 1 and state["batches_served"] == 2
        with make_loader(path, store) as resumed:
            resumed.load_state_dict(state)
            rest = [to_numpy(b) for b in resumed]
        assert_same({1: first + rest}, {1: want})

    def test_close_releases_and_refuses_to_iterate(self, path, store):
        loader = make_loader(path, store)
        next(iter(loader))
        loader.close()
        loader.close()  # idempotent
        with pytest.raises(zarrdali.LoaderClosedError):
            iter(loader)

    def test_a_damaged_chunk_is_a_chunk_error_naming_it(self, path, make_store):
        # With a crc32c checksum, as damage is told on every path: nvCOMP given a
        # corrupt zstd frame is undefined behaviour, so the GPU path checks the
        # checksum on the device first (without one, the CPU path alone can tell).
        store = make_store(
            VARS[0], VarSpec("b", shape=(14, 21, 33), chunks=(1, 21, 33), checksum=True)
        )
        key = "c/0/0/0"  # b's first chunk: one time step, the whole field
        corrupt_chunk(store, "b", key)
        with (
            make_loader(path, store, shuffle=False) as loader,
            pytest.raises(zarrdali.ChunkError) as info,
        ):
            for _ in loader:
                pass
        assert info.value.array == "b" and info.value.key == key
        assert str(store) in str(info.value)


def test_the_loader_opens_epochs_only_through_the_contract(store, monkeypatch):
    """A backend that keeps the protocol and nothing else serves an epoch: the
    loader hands it one EpochRequest per epoch and iterates what it builds."""
    requests: list[EpochRequest] = []
    with make_loader("cpu-in-process", store) as loader:
        inner = loader.backend

        class Recording:
            traits, remote, whole_window = inner.traits, inner.remote, inner.whole_window

            def load_batch(self, layouts, plan, **device_args):
                return inner.load_batch(layouts, plan, **device_args)

            def hold_static(self, static):
                return None

            def open_epoch(self, request, run):
                requests.append(request)
                inner.open_epoch(request, run)

            def probe(self, layouts):
                inner.probe(layouts)

            def stats(self):
                return inner.stats()

            def close(self):
                inner.close()

        recording = Recording()
        assert isinstance(recording, Backend)
        loader.backend = recording
        loader.set_epoch(1)
        n = sum(1 for _ in loader)
    assert n == len(requests[0].plan) and len(requests) == 1
    request = requests[0]
    assert request.epoch == 1 and request.start == 0 and request.n == n
    assert request.batch_size == KW["batch_size"] and request.tile_hw == (8, 8)
