"""The CPU path with worker processes (zarrdali.cpu.workers, shared batch buffers).

Workers rebuild the epoch plan from the seed, so they must serve exactly what
the in-process path serves; their errors must reach the loop with their type.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing

import numpy as np
import pytest

import zarrdali
from storefactory import VarSpec, corrupt_chunk
from test_loader_oracle import Oracle, check_batches, loader_for, run_epochs

VARS = [
    VarSpec("a", shape=(20, 21, 33), chunks=(1, 21, 33)),
    VarSpec("b", shape=(20, 21, 33), chunks=(2, 8, 8), shards=(4, 16, 16), dtype="int16"),
]


@pytest.fixture
def store(make_store):
    return make_store(*VARS)


@pytest.mark.parametrize("batch_size", [16, 32])  # whole batches per worker; two parts
def test_workers_serve_the_same_batches_as_threads(store, batch_size):
    with_workers = loader_for(store, ["a", "b"], workers=2, batch_size=batch_size)
    in_process = loader_for(store, ["a", "b"], workers=0, batch_size=batch_size)
    got = run_epochs(with_workers, [0, 3])
    want = run_epochs(in_process, [0, 3])
    oracle = Oracle(store, ["a", "b"])
    for epoch in (0, 3):
        assert len(got[epoch]) == len(want[epoch]) == len(with_workers)
        for g, w in zip(got[epoch], want[epoch], strict=True):
            for key in ("input", "target", "index"):
                np.testing.assert_array_equal(g[key], w[key])
        check_batches(got[epoch], oracle, input_steps=2, target_steps=1, tile=(8, 8))


def test_workers_resume_mid_epoch(store):
    full = loader_for(store, ["a", "b"], workers=2, batch_size=8)
    full.set_epoch(2)
    everything = [b["index"].numpy().copy() for b in full]

    first = loader_for(store, ["a", "b"], workers=2, batch_size=8)
    first.set_epoch(2)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    it.close()

    resumed = loader_for(store, ["a", "b"], workers=2, batch_size=8)
    resumed.load_state_dict(state)
    rest = [b["index"].numpy() for b in resumed]
    assert len(rest) == len(everything) - 5
    for got, want in zip(rest, everything[5:], strict=True):
        np.testing.assert_array_equal(got, want)


def test_worker_error_surfaces_as_chunk_error(store):
    corrupt_chunk(store, "a", "c/3/0/0")
    loader = loader_for(store, ["a"], workers=2, shuffle=False, batch_size=4)
    with pytest.raises(zarrdali.ChunkError) as info:
        for _ in loader:
            pass
    assert info.value.array == "a" and info.value.key == "c/3/0/0"
    assert "c/3/0/0" in str(info.value)


def test_in_process_error_keeps_type_and_traceback(store, monkeypatch):
    class InjectedReadError(OSError):
        pass

    loader = loader_for(store, ["a"], workers=0, batch_size=4)
    real = loader.backend.load_batch
    calls = {"n": 0}

    def failing(layouts, plan, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise InjectedReadError("disk went away")
        return real(layouts, plan, **kw)

    monkeypatch.setattr(loader.backend, "load_batch", failing)
    with pytest.raises(InjectedReadError, match="disk went away") as info:
        for _ in loader:
            pass
    assert any(entry.name == "failing" for entry in info.traceback)


def test_workers_are_kept_from_epoch_to_epoch_until_close(store):
    """Persistent workers (torch's ``persistent_workers=True``): a break, a new
    epoch, set_epoch and a resumed state all keep the same processes and ring;
    close() ends them."""
    loader = loader_for(store, ["a", "b"], workers=2, batch_size=4)
    for k, _ in enumerate(loader):
        if k == 2:
            break
    pids = sorted(p.pid for p in multiprocessing.active_children())
    ring = loader._ring
    assert len(pids) == 2
    state = loader.state_dict()
    for epoch in range(3):
        if epoch == 1:
            loader.set_epoch(7)
        if epoch == 2:
            loader.load_state_dict(state)
        served = sum(1 for _ in loader)
        assert served == len(loader) - (2 + 1) * (epoch == 2)
        assert sorted(p.pid for p in multiprocessing.active_children()) == pids
        assert loader._ring is ring
    loader.close()
    assert multiprocessing.active_children() == []


def test_workers_not_persistent_end_with_each_epoch(store):
    loader = loader_for(store, ["a", "b"], workers=2, batch_size=4, persistent_workers=False)
    for k, _ in enumerate(loader):
        assert len(multiprocessing.active_children()) == 2
        if k == 2:
            break
    gc.collect()
    assert multiprocessing.active_children() == []
    assert sum(1 for _ in loader) == len(loader)
    assert multiprocessing.active_children() == []
    loader.close()


def test_a_break_leaves_the_next_epoch_nothing_of_the_last(store):
    """Parts still queued when an epoch is broken off are dropped, not loaded into
    the next epoch's slots: every batch after a break equals the in-process path."""
    kw = dict(batch_size=4, prefetch=4)
    with (
        loader_for(store, ["a", "b"], workers=2, **kw) as loader,
        loader_for(store, ["a", "b"], workers=0, **kw) as reference,
    ):
        for epoch in range(3):
            for k, _ in enumerate(loader):
                if k == epoch:
                    break
            loader.set_epoch(10 + epoch)
            reference.set_epoch(10 + epoch)
            for got, want in zip(loader, reference, strict=True):
                for key in ("input", "target", "index"):
                    np.testing.assert_array_equal(got[key].numpy(), want[key].numpy())


def test_workers_normalize_and_augment_as_the_in_process_path(store):
    kw = dict(
        batch_size=8,
        augment=("flip", "rot90"),
        normalize={"a": (0.5, 2.0), "b": (1.0, 3.0)},
    )
    got = run_epochs(loader_for(store, ["a", "b"], workers=2, **kw), [1])[1]
    want = run_epochs(loader_for(store, ["a", "b"], workers=0, **kw), [1])[1]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() == {"input", "target", "index", "augment"}
        for key in w:
            np.testing.assert_array_equal(g[key], w[key])


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_held_by_the_user_are_never_written_again(store, workers):
    """The first batches are the ring's buffers themselves (no copy); once the
    user holds two, later ones come as copies, and every batch kept to the end
    of the epoch still equals the store."""
    loader = loader_for(store, ["a", "b"], workers=workers, batch_size=4)
    kept = list(loader)  # torch tensors, all held
    ring = loader._ring
    lo, hi = ring.views.address, ring.views.address + ring.nbytes
    in_ring = [lo <= b["input"].data_ptr() < hi for b in kept]
    assert in_ring[:2] == [True, True] and not any(in_ring[2:])
    assert ring.copies == len(kept) - 2
    numpy_batches = [{k: v.numpy() for k, v in b.items()} for b in kept]
    check_batches(
        numpy_batches, Oracle(store, ["a", "b"]), input_steps=2, target_steps=1, tile=(8, 8)
    )
    # dropped batches give their buffers back: the next epoch lends them again
    del kept, numpy_batches
    assert ring.leased == 0
    loader.set_epoch(1)
    it = iter(loader)
    first = next(it)
    assert lo <= first["input"].data_ptr() < hi
    it.close()
    loader.close()


def test_a_worker_error_carries_the_worker_traceback(store):
    corrupt_chunk(store, "a", "c/3/0/0")
    loader = loader_for(store, ["a"], workers=2, shuffle=False, batch_size=4)
    with pytest.raises(zarrdali.ChunkError) as info:
        for _ in loader:
            pass
    cause = info.value.__cause__
    assert type(cause).__name__ == "RemoteTraceback"
    assert "load_part" in str(cause) and "ChunkError" in str(cause)
    loader.close()


def test_time_ordered_parts_of_a_batch_assemble_it_as_loaded_whole(store):
    """A worker loads a part of a batch (samples of neighbouring times) into its
    rows of the batch: the parts together are the batch loaded whole."""
    from zarrdali.cpu.feed import Finishing
    from zarrdali.cpu.workers import time_ordered_parts

    normalize = {"a": (0.5, 2.0), "b": (1.0, 3.0)}
    loader = loader_for(store, ["a", "b"], workers=0, batch_size=16, normalize=normalize)
    loader.augment = ("flip", "rot90")
    samples = loader.epoch_plan(0).batch(1)
    finish = Finishing(loader.stats, loader.augment, 0, 0).batch(1, len(samples))
    c = loader.num_channels
    shapes = [(16, 2, c, 8, 8), (16, 1, c, 8, 8)]
    whole = [np.empty(s, np.float32) for s in shapes]
    loader._load_frames(samples, outs=whole, finish=finish)
    parted = [np.full(s, np.nan, np.float32) for s in shapes]
    parts = time_ordered_parts(samples, 3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(16))
    times = [samples[rows, 0] for rows in parts]
    assert all(a.max() <= b.min() for a, b in itertools.pairwise(times))
    for rows in parts:
        loader._load_frames(samples[rows], outs=parted, finish=finish, rows=rows)
    for w, p in zip(whole, parted, strict=True):
        np.testing.assert_array_equal(w, p)
    loader.close()


@pytest.mark.parametrize("workers", [1, 2, 4, 16])
@pytest.mark.parametrize("batch_size", [1, 8, 15, 16, 32, 64, 256])
def test_small_batches_go_whole_to_a_worker_with_more_loaded_ahead(workers, batch_size):
    """A part costs its worker a plan and a locate and the training process a
    wake-up: a batch is cut into parts of at least MIN_PART_SAMPLES samples (a
    smaller one goes whole to one worker), and enough batches are loaded ahead
    that every worker has about two parts in flight."""
    from zarrdali.cpu.epoch import MIN_PART_SAMPLES, batches_ahead, parts_per_batch

    ahead = batches_ahead(2, batch_size, workers)
    parts = parts_per_batch(workers, ahead, batch_size)
    assert 2 <= ahead <= 64 and 1 <= parts <= workers
    if parts > 1:
        assert batch_size // parts >= MIN_PART_SAMPLES
    if batch_size < 2 * MIN_PART_SAMPLES:
        assert parts == 1
    assert (ahead + 1) * parts >= min(2 * workers, 65)  # two parts per worker in flight


def test_batches_loaded_ahead_for_busy_workers_fit_in_memory():
    """The batches loaded beyond ``prefetch`` to keep workers busy never take more
    than half the machine's memory: whole fields on a 16-core machine with 8 GiB
    load ``prefetch`` ahead, not the 31 a small tile would get; tiles keep theirs."""
    from zarrdali.cpu.epoch import batches_ahead

    gib = 1 << 30
    assert batches_ahead(2, 1, 16) == 31  # small batches, many workers: deep ring
    assert batches_ahead(2, 1, 16, slot_nbytes=12 << 20, memory=8 * gib) == 31
    # an 860 MB whole-field sample: 4 GiB hold 4 slots, 2 of them the user's
    assert batches_ahead(2, 1, 16, slot_nbytes=860_000_000, memory=8 * gib) == 2
    assert batches_ahead(2, 1, 16, slot_nbytes=860_000_000, memory=16 * gib) == 7
    # never fewer than prefetch (the constructor refuses what prefetch + 2 cannot hold)
    assert batches_ahead(3, 1, 16, slot_nbytes=4 * gib, memory=8 * gib) == 3
    assert batches_ahead(5, 64, 2, slot_nbytes=4 * gib, memory=8 * gib) == 5


def test_ring_of_a_loader_with_workers_is_bounded_by_memory(store, monkeypatch):
    """The ring a loader with worker processes makes holds prefetch + 2 slots where
    the extra look-ahead would not fit, and still serves the oracle's batches."""
    import zarrdali.cpu.epoch as cpu_epoch

    free = loader_for(store, ["a", "b"], workers=2, batch_size=1, prefetch=2)
    next(iter(free))
    assert free._resources.ring.n_slots == 3 + 2  # 3 ahead: two parts per worker
    slot = free._resources.ring.layout.nbytes
    free.close()

    monkeypatch.setattr(cpu_epoch, "available_memory", lambda: 2 * 4 * slot)
    tight = loader_for(store, ["a", "b"], workers=2, batch_size=1, prefetch=2)
    got = run_epochs(tight, [1])[1]
    assert tight._resources.ring.n_slots == 2 + 2
    tight.close()
    assert len(got) == len(tight)
    check_batches(got, Oracle(store, ["a", "b"]), input_steps=2, target_steps=1, tile=(8, 8))
