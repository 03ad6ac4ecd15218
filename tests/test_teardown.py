"""Every epoch's resources are released explicitly, never by the garbage collector.

With the collector disabled, nothing of an epoch (on the CPU path its feed:
ring of batch buffers, threads or worker processes, and its iterator; on the
GPU path also the DALI pipeline, source and iterator) may be alive once it has
ended: exhausted, broken off, failed while loading, or interrupted by an error
in the loop body. A finalizer left for the collector is what crashed the GPU
path (issue 11): the collector runs it at a random point, in a random thread.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest

import zarrdali
import zarrdali.loader
from storefactory import VarSpec, corrupt_chunk
from test_loader_oracle import loader_for
from zarrdali import ChunkError, LoaderClosedError
from zarrdali.batch.epoch import EpochRun
from zarrdali.gpu.prefetch import BatchPrefetcher

VARS = [
    VarSpec("a", shape=(20, 21, 33), chunks=(1, 21, 33)),
    VarSpec("b", shape=(20, 21, 33), chunks=(2, 8, 8), shards=(4, 16, 16), dtype="int16"),
]
PARTS = ("batches", "pipeline", "feed", "source", "source_handle")


@pytest.fixture
def store(make_store):
    return make_store(*VARS)


@pytest.fixture
def no_collector():
    """The garbage collector off: only reference counting frees anything."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def epochs(monkeypatch):
    """Weak references to every epoch's run and parts, taken as it is closed."""
    seen: list[dict[str, weakref.ref]] = []

    class Recorded(EpochRun):
        def close(self, because: str = "the epoch ended") -> None:
            if not self.closed:
                refs = {"run": weakref.ref(self)}
                for name in PARTS:
                    part = getattr(self, name)
                    if part is not None:
                        refs[name] = weakref.ref(part)
                seen.append(refs)
            super().close(because)

    monkeypatch.setattr(zarrdali.loader, "EpochRun", Recorded)
    return seen


def _tasks() -> int:
    """OS threads of this process (DALI's executor threads are not Python's;
    a CPU pipeline of these tests runs 5)."""
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0


def _threads() -> set[int]:
    return {t.ident for t in threading.enumerate()}


def _warm(loader: zarrdali.ZarrLoader) -> tuple[set[int], int]:
    """Run one epoch so the loader's own threads (its backend's) exist; the
    threads alive then are where every later epoch must leave the count."""
    for _ in loader:
        pass
    return _threads(), _tasks()


def _assert_dead(refs: dict[str, weakref.ref], *, but=()) -> None:
    """Nothing of the epoch is alive, except the detached handle DALI's graph
    (reference cycles of plain Python objects) may still hold."""
    handle = refs.get("source_handle", lambda: None)()
    if handle is not None:
        assert handle._source is None and handle._samples_of is None
    alive = [n for n, ref in refs.items() if ref() is not None]
    alive = [n for n in alive if n not in ("source_handle", *but)]
    assert alive == [], f"alive after the epoch: {alive}"


def _assert_released(epochs: list, baseline: tuple[set[int], int], *, expect=("feed",)):
    assert epochs, "no epoch was closed"
    refs = epochs[-1]
    for name in expect:
        assert name in refs, f"the epoch had no {name} to check"
    _assert_dead(refs)
    threads, tasks = baseline
    assert _threads() == threads
    assert not [t.name for t in threading.enumerate() if t.name.startswith("zarrdali-prefetch")]
    # A joined Python thread can still be leaving the OS's list: allow the two
    # prefetch threads.
    assert _tasks() <= tasks + 2


# -- the ways an epoch ends ---------------------------------------------------
def test_finished_epoch_leaves_nothing_alive(store, no_collector, epochs):
    loader = loader_for(store, ["a", "b"], batch_size=8)
    baseline = _warm(loader)
    n = sum(1 for _ in loader)
    assert n == len(loader)
    _assert_released(epochs, baseline, expect=("feed", "batches"))
    loader.close()


def test_epoch_broken_off_after_two_batches_leaves_nothing_alive(store, no_collector, epochs):
    loader = loader_for(store, ["a", "b"], batch_size=4, augment=("flip", "rot90"))
    baseline = _warm(loader)
    for k, _ in enumerate(loader):
        if k == 1:
            break
    assert loader.state_dict()["batches_served"] == 2
    _assert_released(epochs, baseline, expect=("feed", "batches"))
    loader.close()


def test_explicitly_closed_iterator_leaves_nothing_alive(store, no_collector, epochs):
    loader = loader_for(store, ["a", "b"], batch_size=4)
    baseline = _warm(loader)
    it = iter(loader)
    next(it)
    next(it)
    it.close()
    _assert_released(epochs, baseline, expect=("feed", "batches"))
    loader.close()


@pytest.mark.parametrize("key", ["c/0/0/0", "c/3/0/0"], ids=["first-batch", "fourth-batch"])
def test_failed_loading_leaves_nothing_alive(make_store, no_collector, epochs, key):
    store = make_store(*VARS)
    loader = loader_for(store, ["a"], batch_size=4, shuffle=False)
    baseline = _warm(loader)
    corrupt_chunk(store, "a", key)
    with pytest.raises(ChunkError) as info:
        for _ in loader:
            pass
    assert info.value.key == key
    # The error is still held here (as a handler may keep it): its traceback
    # names the frames it passed through but holds none of the epoch's objects.
    assert any(entry.name == "load_batch" for entry in info.traceback)
    _assert_released(epochs, baseline)
    loader.close()


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_error_in_the_loop_body_leaves_nothing_alive(store, no_collector, epochs, error):
    loader = loader_for(store, ["a", "b"], batch_size=4)
    baseline = _warm(loader)

    def train():
        for k, _ in enumerate(loader):
            if k == 2:
                raise error("in the training step")

    with pytest.raises(error):
        train()
    _assert_released(epochs, baseline, expect=("feed", "batches"))
    loader.close()


def test_failed_load_in_a_prefetch_thread_leaves_no_reference_cycle(no_collector):
    def load(k: int):
        if k == 1:
            raise OSError("disk went away")
        return k

    prefetcher = BatchPrefetcher(load, 4, depth=2, workers=2)
    assert prefetcher.get(0) == 0
    with pytest.raises(OSError, match="disk went away"):
        prefetcher.get(1)
    prefetcher.close()
    prefetcher.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        prefetcher.get(2)
    assert not [t for t in threading.enumerate() if t.name.startswith("zarrdali-prefetch")]
    ref = weakref.ref(prefetcher)
    del prefetcher
    assert ref() is None


# -- worker processes -----------------------------------------------------------
def test_worker_processes_end_with_their_epoch_unless_persistent(store, no_collector, epochs):
    loader = loader_for(store, ["a", "b"], workers=2, batch_size=4, persistent_workers=False)
    for k, _ in enumerate(loader):
        if k == 1:
            break
    assert multiprocessing.active_children() == []
    _assert_dead(epochs[-1])
    for _ in loader:
        assert len(multiprocessing.active_children()) == 2
    assert multiprocessing.active_children() == []
    loader.close()


def test_persistent_workers_outlive_the_epoch_not_the_loader(store, no_collector, epochs):
    """The epoch's feed and iterator go with the epoch; the processes stay for the
    next epoch and end with close()."""
    loader = loader_for(store, ["a", "b"], workers=2, batch_size=4)
    for k, _ in enumerate(loader):
        if k == 1:
            break
    _assert_dead(epochs[-1])
    pids = {p.pid for p in multiprocessing.active_children()}
    assert len(pids) == 2
    assert sum(1 for _ in loader) == len(loader)
    _assert_dead(epochs[-1])
    assert {p.pid for p in multiprocessing.active_children()} == pids
    loader.close()
    assert multiprocessing.active_children() == []


def test_workers_end_and_buffers_go_even_while_something_holds_the_feed(store, monkeypatch):
    """Release does not wait for the last reference: a traceback or a user's
    variable may hold the feed object longer; its processes end. The loader's
    ring of batch buffers outlives its epochs and close(): it is unmapped once
    the batches handed out are dropped."""
    held = []

    class Holding(EpochRun):
        def close(self, because: str = "the epoch ended") -> None:
            if self.feed is not None:
                held.append(self.feed)
            super().close(because)

    monkeypatch.setattr(zarrdali.loader, "EpochRun", Holding)
    loader = loader_for(store, ["a", "b"], workers=2, batch_size=4, persistent_workers=False)
    kept = []
    for k, batch in enumerate(loader):
        kept.append(batch)
        if k == 1:
            break
    assert len(held) == 1
    assert multiprocessing.active_children() == []
    ring = held[0].ring
    assert ring is loader._ring
    assert ring.leased == 2 and ring.mapped  # the batches the user holds stay valid
    first = kept[0]["input"].clone()
    del batch
    kept.pop(0)
    assert ring.leased == 1 and ring.mapped
    loader.close()
    assert ring.mapped  # the batch still held stays valid after close()
    np.testing.assert_array_equal(kept[0]["input"].shape, (4, 2, 2, 8, 8))
    kept.clear()
    assert ring.leased == 0 and not ring.mapped
    assert first.shape[0] == 4


@pytest.mark.parametrize("persistent", [True, False])
def test_a_failed_part_ends_the_epoch_and_keeps_healthy_workers(
    make_store, no_collector, epochs, persistent
):
    store = make_store(*VARS)
    corrupt_chunk(store, "a", "c/3/0/0")
    loader = loader_for(
        store, ["a"], workers=2, batch_size=4, shuffle=False, persistent_workers=persistent
    )
    with pytest.raises(ChunkError):
        for _ in loader:
            pass
    _assert_dead(epochs[-1])
    assert len(multiprocessing.active_children()) == (2 if persistent else 0)
    with pytest.raises(ChunkError):  # the next epoch: the same workers, the same error
        for _ in loader:
            pass
    loader.close()
    assert multiprocessing.active_children() == []


# -- the loader's lifetime ------------------------------------------------------
def test_context_manager_releases_the_epoch_and_the_backend(store, no_collector, epochs):
    before = _threads()
    with loader_for(store, ["a", "b"], batch_size=4) as loader:
        it = iter(loader)
        next(it)  # an epoch left open inside the block
        assert any(t.name.startswith("zarrdali-io") for t in threading.enumerate())
    _assert_dead(epochs[-1], but=("run",))
    # the backend's threads are gone too; zarr-python's own may have started
    assert not [t.name for t in threading.enumerate() if t.name.startswith("zarrdali")]
    assert {t.ident for t in threading.enumerate() if t.name.startswith("zarrdali")} <= before
    with pytest.raises(LoaderClosedError, match=r"ZarrLoader\(.*\) was closed"):
        next(it)


def test_closed_loader_refuses_to_iterate(store):
    loader = loader_for(store, ["a"], batch_size=4)
    loader.close()
    loader.close()  # idempotent
    with pytest.raises(LoaderClosedError, match=r"^ZarrLoader\(.*\) is closed: ") as info:
        iter(loader)
    assert isinstance(info.value, zarrdali.ZarrDaliError)


def test_a_new_epoch_closes_the_one_left_open(store, no_collector, epochs):
    loader = loader_for(store, ["a", "b"], batch_size=4)
    first = iter(loader)
    next(first)
    second = iter(loader)
    next(second)  # the first epoch's pipeline and threads are released here
    assert len(epochs) == 1
    _assert_dead(epochs[0], but=("run",))
    with pytest.raises(LoaderClosedError, match="a new epoch of the same loader started"):
        next(first)
    assert sum(1 for _ in second) == len(loader) - 1
    loader.close()


def test_dropped_loader_and_epoch_are_freed_without_the_collector(store, no_collector, epochs):
    loader = loader_for(store, ["a", "b"], batch_size=4)
    it = iter(loader)
    next(it)
    ref = weakref.ref(loader)
    del loader, it  # no reference cycle: reference counting frees them at once
    assert ref() is None
    _assert_dead(epochs[-1])


def test_open_loader_at_interpreter_exit_is_closed_quietly(store, tmp_path: Path):
    script = tmp_path / "leave_open.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import gc
            import zarrdali

            gc.disable()
            close = zarrdali.ZarrLoader.close

            def traced_close(self):
                print("closing", self.batch_size, flush=True)
                close(self)

            zarrdali.ZarrLoader.close = traced_close
            loader = zarrdali.ZarrLoader({str(store)!r}, ["a", "b"], input_steps=2,
                                         tile=(8, 8), batch_size=4, device="cpu", workers=0)
            closed = zarrdali.ZarrLoader({str(store)!r}, ["a"], batch_size=3,
                                         device="cpu", workers=0)
            closed.close()
            it = iter(loader)
            next(it)
            print("leaving", flush=True)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    # the open loader is closed once by the exit hook, the closed one not again
    assert done.stdout.split("\n")[:3] == ["closing 3", "leaving", "closing 4"]
    assert "Exception" not in done.stderr and "Error" not in done.stderr, done.stderr
