"""``pin_memory=True`` on the CPU path: the ring's batch buffers page-locked.

Without CUDA (this machine) the loader warns as torch's ``DataLoader`` does and
serves unpinned batches. Its set-up path runs against a recording stand-in of
``torch.cuda.cudart()`` and CUDA events: the ring is registered once (its
address and size), unregistered before it is unmapped (also when the user
holds batches past ``close()``), a dropped batch's slot is written again only
after the event recorded at its release has passed (a non-blocking copy from it
may still run), and copies handed out past ``keep`` come from torch's pinned
allocator. ``@pytest.mark.gpu``: the same on a real GPU, with asynchronous copies.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np
import pytest
import torch

import zarrdali.cpu.pinning
import zarrdali.cpu.ring
from storefactory import VarSpec
from test_loader_oracle import loader_for
from zarrdali.cpu.ring import BatchRing, SlotLayout

LAYOUT = SlotLayout.of([(4, 2, 3, 8, 8), (4, 1, 3, 8, 8)], np.float32)


@pytest.fixture
def store(make_store):
    return make_store(VarSpec("a", shape=(12, 16, 16), chunks=(1, 8, 8)))


def copied(batch: dict) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in batch.items()}


# -- no CUDA: a warning, batches as usual ------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_cuda_pin_memory_warns_and_serves_unpinned(store):
    with pytest.warns(UserWarning, match=r"pin_memory=True but CUDA is not available") as got:
        loader = loader_for(store, ["a"], batch_size=4, pin_memory=True)
    assert got[0].filename.endswith("test_loader_oracle.py")  # the caller (loader_for)
    with loader, loader_for(store, ["a"], batch_size=4) as plain:
        assert loader.pin_memory is False
        for a, b in zip(loader, plain, strict=True):
            assert not a["input"].is_pinned()
            for key in a:
                np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


def test_pin_memory_is_for_the_cpu_path_only(store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        with loader_for(store, ["a"], batch_size=4, pin_memory=False) as loader:
            assert loader.pin_memory is False


# -- a recording stand-in for CUDA ---------------------------------------------------------
class FakeCudart:
    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.registered: dict[int, int] = {}
        self.rings: list[BatchRing] = []

    def cudaHostRegister(self, address: int, nbytes: int, flags: int) -> int:
        self.log.append(("register", address, nbytes, flags))
        self.registered[address] = nbytes
        return 0

    def cudaHostUnregister(self, address: int) -> int:
        mapped = [r.mapped for r in self.rings if r.views.address == address]
        self.log.append(("unregister", address, mapped))
        del self.registered[address]
        return 0


class FakeEvent:
    made: ClassVar[list[FakeEvent]] = []

    def __init__(self) -> None:
        self.recorded = self.synchronized = False
        FakeEvent.made.append(self)

    def record(self) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        self.synchronized = True


@pytest.fixture
def fake_cuda(monkeypatch):
    cudart = FakeCudart()
    FakeEvent.made = []
    copies: list[torch.Tensor] = []

    def pinned_copy(array):
        out = torch.from_numpy(array.copy())
        copies.append(out)
        return out

    monkeypatch.setattr(zarrdali.cpu.pinning, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(zarrdali.cpu.pinning, "pinned_copy", pinned_copy)
    real_init = BatchRing.__init__

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        cudart.rings.append(self)

    monkeypatch.setattr(BatchRing, "__init__", init)
    cudart.copies = copies
    return cudart


@pytest.mark.parametrize("shared", [False, True])
def test_a_released_slot_is_written_again_only_after_its_fence(fake_cuda, shared):
    ring = BatchRing(LAYOUT, 3, shared=shared, pin=True)
    assert fake_cuda.log == [("register", ring.views.address, ring.nbytes, 0)]
    first = ring.take()
    batch = ring.hand_out(first, 4)  # the user copies it with non_blocking=True...
    del batch  # ...and drops it: a fence on the stream, not passed yet
    assert len(FakeEvent.made) == 1 and FakeEvent.made[0].recorded
    assert not FakeEvent.made[0].synchronized
    taken = [ring.take() for _ in range(3)]  # the free slots, the released one last
    assert taken[-1] == first
    assert FakeEvent.made[0].synchronized  # passed before the slot was handed to a writer
    ring.close()
    assert fake_cuda.log[-1] == ("unregister", ring.views.address, [True])  # then unmapped
    assert not ring.mapped and fake_cuda.registered == {}


def test_batches_held_past_close_keep_the_registration_until_dropped(fake_cuda):
    ring = BatchRing(LAYOUT, 3, shared=True, pin=True)
    batch = ring.hand_out(ring.take(), 4)
    ring.close()
    assert fake_cuda.registered  # the user's batch is still pinned memory
    del batch
    assert fake_cuda.registered == {} and not ring.mapped
    assert fake_cuda.log[-1][0] == "unregister" and fake_cuda.log[-1][2] == [True]


def test_copies_past_keep_come_from_torchs_pinned_allocator(fake_cuda):
    ring = BatchRing(LAYOUT, 4, shared=False, keep=2, pin=True)
    held = [ring.hand_out(ring.take(), 4) for _ in range(3)]
    assert ring.copies == 1 and len(fake_cuda.copies) == 2  # input and target of one batch
    assert all(isinstance(a, torch.Tensor) for a in held[2])
    held.clear()
    ring.close()


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "workers"])
def test_loader_pins_its_ring_and_serves_the_same_batches(store, fake_cuda, workers):
    kw = dict(batch_size=4, workers=workers)
    with loader_for(store, ["a"], pin_memory=True, **kw) as loader:
        assert loader.pin_memory is True
        with loader_for(store, ["a"], **kw) as plain:
            got = [copied(b) for b in loader]  # each batch dropped at once
            want = [copied(b) for b in plain]
        ring = loader._ring
        assert fake_cuda.log[0] == ("register", ring.views.address, ring.nbytes, 0)
        assert len(got) == len(want) == len(loader)
        for a, b in zip(got, want, strict=True):
            for key in b:
                np.testing.assert_array_equal(a[key], b[key])
        # every batch dropped left a fence; those whose slots were reused were passed
        assert ring.copies == 0 and len(FakeEvent.made) == len(got)
        reused = len(FakeEvent.made) - len(ring._fences)
        assert sum(e.synchronized for e in FakeEvent.made) == reused
        assert sum(1 for _ in loader) == len(loader)  # a second epoch on the same ring
    assert [entry[0] for entry in fake_cuda.log] == ["register", "unregister"]


# -- on a GPU ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "workers"])
def test_pinned_batches_copy_asynchronously_and_are_not_overwritten(store, workers):
    """Each batch is copied with ``non_blocking=True`` and dropped at once; the
    device copies equal the batches of an unpinned loader (a slot written again
    before its copy finished would show up here)."""
    kw = dict(batch_size=4, workers=workers)
    with loader_for(store, ["a"], pin_memory=True, **kw) as loader:
        on_device = []
        for batch in loader:
            assert batch["input"].is_pinned()
            on_device.append(batch["input"].to("cuda", non_blocking=True))
            del batch
        torch.cuda.synchronize()
    with loader_for(store, ["a"], **kw) as plain:
        for got, batch in zip(on_device, plain, strict=True):
            np.testing.assert_array_equal(got.cpu().numpy(), batch["input"].numpy())
