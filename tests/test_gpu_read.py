"""The read stage's host side and the engine's buffer lifetimes, without a GPU.

* :func:`io_mode` says ``"gds"`` only when kvikIO does not prefer its
  compatibility mode *and* the cuFile driver reports GDS (a fake ``kvikio``
  module of the 26.x API: ``defaults.get/set``, ``is_compat_mode_preferred``,
  ``cufile_driver.get("is_gds_available")``); ``read="auto"`` follows it;
  :func:`configure_kvikio` sets the pool size, task size and GDS threshold
  unless a ``KVIKIO_*`` variable says otherwise.
* The pinned reader's preads land every coalesced read at its staging offset
  (numpy memory standing in for pinned memory), with per-thread descriptors,
  and a short file raises :class:`ChunkError` naming array and key.
* :class:`InFlight` and :class:`GuardedBuffers` release buffers only after
  their events, with fake events.

kvikIO's own reads and the host-to-device copy run in
``tests/test_gpu_engine.py`` (CPU stand-ins, and ``-m gpu``).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fakegpu
from storefactory import VarSpec, chunk_files, chunk_key
from zarrdali.batch.locate import ChunkLocator
from zarrdali.batch.plan import plan_batch
from zarrdali.errors import ChunkError
from zarrdali.gpu import read as gpu_read
from zarrdali.gpu.describe import describe_batch
from zarrdali.gpu.lifetimes import GuardedBuffers, InFlight
from zarrdali.store.open import load_layouts, open_group


def _kvikio(monkeypatch, compat, gds):
    modules = fakegpu.fake_kvikio(compat=compat, gds=gds)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["kvikio"]


@pytest.mark.parametrize(
    ("compat", "gds", "mode"),
    [(True, False, "posix"), (True, True, "posix"), (False, True, "gds"), (False, False, "posix"),
     (False, None, "posix")],
)  # fmt: skip
def test_io_mode(monkeypatch, compat, gds, mode):
    _kvikio(monkeypatch, compat, gds)
    assert gpu_read.io_mode() == mode
    details = gpu_read.io_details()
    assert details["mode"] == mode and details["compat_mode_preferred"] == compat
    assert details["gds_available"] == bool(gds)
    assert gpu_read.resolve_read_mode("auto", mode) == ("kvikio" if mode == "gds" else "pinned")
    assert gpu_read.resolve_read_mode("kvikio", mode) == "kvikio"
    with pytest.raises(ValueError, match="read must be"):
        gpu_read.resolve_read_mode("mmap", mode)


def test_configure_kvikio(monkeypatch):
    kvikio = _kvikio(monkeypatch, True, False)
    for name in ("KVIKIO_NTHREADS", "KVIKIO_TASK_SIZE", "KVIKIO_GDS_THRESHOLD"):
        monkeypatch.delenv(name, raising=False)
    got = gpu_read.configure_kvikio(16)
    assert got == {"num_threads": 16, "task_size": 1 << 20, "gds_threshold": 0}
    assert kvikio.settings["num_threads"] == 16
    monkeypatch.setenv("KVIKIO_NTHREADS", "3")
    monkeypatch.setenv("KVIKIO_GDS_THRESHOLD", "4096")
    kvikio.settings.update(num_threads=3, gds_threshold=4096)  # what kvikIO read from them
    got = gpu_read.configure_kvikio(32, task_size=2 << 20, gds_threshold=0)
    assert got == {"num_threads": 3, "task_size": 2 << 20, "gds_threshold": 4096}


def _staged(make_store, **kw):
    store = make_store(
        VarSpec("a", shape=(12, 21, 33), chunks=(2, 8, 8), shards=(4, 16, 16), **kw),
        VarSpec("b", shape=(12, 21, 33), chunks=(2, 8, 8), compressor="lz4", checksum=True),
    )
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["a", "b"])
    samples = np.array([[0, 0, 0], [3, 13, 25], [5, 7, 5]], dtype=np.int64)
    plan = plan_batch(layouts, samples, n_frames=3, frame_step=2, tile_hw=(8, 8))
    locations = ChunkLocator(name, layouts).locate(plan)
    desc = describe_batch(layouts, plan, locations, store_name=name)
    return store, name, layouts, locations, desc


def test_pread_into_places_every_read(make_store):
    _, name, _, locations, desc = _staged(make_store)
    s = desc.staging
    host = np.full(s.raw_nbytes, 0xEE, dtype=np.uint8)
    files = gpu_read.OpenFiles(max_open=2)  # fewer than the files: descriptors get closed
    with ThreadPoolExecutor(3) as pool:

        def run(tasks):
            for future in [pool.submit(t) for t in tasks]:
                future.result()

        gpu_read.pread_into(
            host,
            s,
            locations.paths,
            files,
            run,
            5,
            lambda m, f: ChunkError(m, store=name, array="?", key="?"),
        )
    files.close()
    for f, start, n, dst in zip(s.read_file, s.read_start, s.read_nbytes, s.read_dst, strict=True):
        with open(locations.paths[f], "rb") as fh:
            fh.seek(start)
            assert host[dst : dst + n].tobytes() == fh.read(n)


def test_pinned_reader_names_a_truncated_file(make_store, monkeypatch):
    cuda = fakegpu.install(monkeypatch)
    store, name, layouts, locations, desc = _staged(make_store)
    path = chunk_files(store, "b")[0]
    path.write_bytes(path.read_bytes()[:-6])  # still long enough for describe_batch
    s = desc.staging
    with ThreadPoolExecutor(2) as pool:
        reader = gpu_read.PinnedReader(
            name, gpu_read.OpenFiles(), pool, 4, alloc_pinned=cuda.cupyx.empty_pinned
        )
        staging = cuda.cupy.empty(s.total_nbytes, dtype=np.uint8)
        with pytest.raises(ChunkError, match="truncated") as info:
            reader.read(layouts, locations, s, staging, cuda.cupy.cuda.Stream())
        reader.close()
    assert info.value.array == "b" and info.value.key == chunk_key(store, "b", path)


def test_pinned_reader_copies_once(make_store, monkeypatch):
    cuda = fakegpu.install(monkeypatch)
    _, name, layouts, locations, desc = _staged(make_store)
    s = desc.staging
    counted = []
    with ThreadPoolExecutor(2) as pool:
        reader = gpu_read.PinnedReader(
            name,
            gpu_read.OpenFiles(),
            pool,
            4,
            alloc_pinned=cuda.cupyx.empty_pinned,
            on_read=lambda n, b: counted.append(("read", n, b)),
            on_copy=lambda b: counted.append(("copy", b)),
        )
        staging = cuda.cupy.empty(s.total_nbytes, dtype=np.uint8)
        stream = cuda.cupy.cuda.Stream()
        reader.read(layouts, locations, s, staging, stream)
        reader.read(layouts, locations, s, staging, stream)
        reader.close()
    assert cuda.copies == [(1, s.raw_nbytes)] * 2  # one host-to-device copy per batch
    assert counted[0] == ("read", s.n_reads, int(s.read_nbytes.sum()))
    assert cuda.pinned == 2  # the two buffers of the ring, made once
    for f, start, n, dst in zip(s.read_file, s.read_start, s.read_nbytes, s.read_dst, strict=True):
        with open(locations.paths[f], "rb") as fh:
            fh.seek(start)
            assert np.asarray(staging)[dst : dst + n].tobytes() == fh.read(n)


# -- lifetimes --------------------------------------------------------------------------
class Event:
    def __init__(self) -> None:
        self.done = False
        self.waited = 0

    def synchronize(self) -> None:
        self.waited += 1
        self.done = True


def test_in_flight_releases_in_order_after_events():
    finished = []
    ring = InFlight(max_entries=2)
    events = [Event() for _ in range(4)]
    ring.push(events[0], ["a"], lambda: finished.append(0))
    ring.push(events[1], ["b"], lambda: finished.append(1))
    assert ring.retire() == 0 and len(ring) == 2
    events[1].done = True
    assert ring.retire() == 0  # the oldest blocks the rest
    events[0].done = True
    assert ring.retire() == 2 and finished == [0, 1]
    ring.push(events[2], ["c"], lambda: finished.append(2))
    ring.push(events[3], ["d"], lambda: finished.append(3))
    ring.push(Event(), ["e"])  # past max_entries: the host waits for the oldest
    assert events[2].waited == 1 and finished == [0, 1, 2] and len(ring) == 2
    ring.drain()
    assert finished == [0, 1, 2, 3] and len(ring) == 0


def test_guarded_buffers_wait_and_grow():
    made = []

    def alloc(n):
        made.append(n)
        return np.zeros(n, dtype=np.uint8)

    ring = GuardedBuffers(alloc, n=2)
    k0, b0 = ring.acquire(1000)
    e0 = Event()
    ring.release(k0, e0)
    k1, b1 = ring.acquire(500)
    assert k1 != k0 and e0.waited == 0
    ring.release(k1, Event())
    k2, b2 = ring.acquire(900)  # buffer 0 again: waits for its event, reuses it
    assert k2 == k0 and b2 is b0 and e0.waited == 1
    ring.release(k2, None)
    _, b3 = ring.acquire(5000)  # buffer 1, too small: replaced
    assert b3 is not b1 and b3.nbytes >= 5000 and len(made) == 3
    ring.close()
