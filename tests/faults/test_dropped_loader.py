"""A loader dropped without ``close()`` frees what it holds, at once, without the collector.

Its batch ring (a ``memfd`` and its maps: hundreds of MB at the README's
reference batch), its threads, its files and its worker processes go as soon as
reference counting frees the loader (a ``weakref.finalize``; a loader holds no
reference cycle). 40 loaders are made, each serves batches, and is dropped, in
one process with the collector off: descriptors, maps, threads, children and
the resident memory come back to where they were after the first few.
"""

from __future__ import annotations

import json

import pytest

from storefactory import VarSpec, write_store

PROGRAM = r"""
import gc, json, os, sys, threading, multiprocessing
import torch  # first, as a training script does (a first import inside a call
              # keeps that call's frames until the collector runs)
import zarrdali

def fds():
    out = []
    for f in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{f}"))
        except OSError:
            pass
    return out

def snapshot():
    maps = [line for line in open("/proc/self/maps") if "zarrdali" in line]
    rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {
        "fds": len(fds()),
        "memfds": sum("zarrdali" in f for f in fds()),
        "maps": len(maps),
        # OS threads but zarr-python's own (its event loop and its executor's,
        # made on demand up to a bound)
        "tasks": len(os.listdir("/proc/self/task")) - sum(
            t.name == "zarr_io" or t.name.startswith("asyncio_") for t in threading.enumerate()
        ),
        "zarrdali_threads": [t.name for t in threading.enumerate() if "zarrdali" in t.name],
        "children": len(multiprocessing.active_children()),
        "rss_mb": rss / 2**20,
    }

def one(store, k):
    workers = 1 if k % 10 == 9 else 0  # 4 of 40 with a worker process
    loader = zarrdali.ZarrLoader(store, ["a"], input_steps=4, target_steps=2, tile=(64, 64),
                                 batch_size=8, device="cpu", workers=workers)
    ring_mb = 0
    if k % 2:  # an epoch broken off, its iterator dropped with the loader
        it = iter(loader)
        batch = next(it)
        ring_mb = loader._ring.nbytes / 2**20
        del batch
        ref = __import__("weakref").ref(loader)
        del loader, it
    else:  # whole epochs
        for _ in range(2):
            for batch in loader:
                pass
        ring_mb = loader._ring.nbytes / 2**20
        del batch
        ref = __import__("weakref").ref(loader)
        del loader
    assert ref() is None, "the loader was not freed by reference counting"
    return ring_mb

def main():
    gc.disable()
    store = sys.argv[1]
    snaps = []
    ring_mb = 0.0
    for k in range(40):
        ring_mb = max(ring_mb, one(store, k))
        if k in (9, 39):  # after a warm-up that made each kind once
            snaps.append(snapshot())
    print(json.dumps({"warm": snaps[0], "end": snaps[1], "ring_mb": ring_mb}))

if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("dropped") / "store.zarr"
    return write_store(path, [VarSpec("a", shape=(16, 64, 64), chunks=(1, 64, 64))])


@pytest.mark.time_limit(150)
def test_forty_dropped_loaders_leave_nothing_behind(store, tmp_path, python_child):
    script = tmp_path / "drop.py"
    script.write_text(PROGRAM)
    done = python_child(f"exec(open({str(script)!r}).read())", str(store), timeout=140)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    warm, end = result["warm"], result["end"]
    assert end["memfds"] == 0 and end["maps"] == 0, end  # no ring is left mapped
    assert end["fds"] == warm["fds"], (warm, end)
    assert end["zarrdali_threads"] == [] and end["children"] == 0, end
    assert end["tasks"] <= warm["tasks"], (warm, end)
    # 30 loaders more than at the warm-up: growth under the size of 2 rings
    assert result["ring_mb"] > 1.0
    assert end["rss_mb"] - warm["rss_mb"] < 2 * result["ring_mb"], (warm, end, result)
