"""A store rewritten in place (same files, same inodes, shorter) while a loader reads it.

Another process rewriting a shard under a training job is not the loader's
fault, but it must not kill the job: the loader serves the bytes it read
(old or new values) or raises a ``ChunkError`` naming the chunk. With the
default ``pread`` reads that holds; a memory map of a file that shrinks faults
(SIGBUS) when its lost pages are touched, which is why ``memory_map=True`` is
opt-in (the last test shows it). Run in subprocesses: SIGBUS kills.
"""

from __future__ import annotations

import signal

import pytest

CHILD = r"""
import sys
from pathlib import Path

import numpy as np
import zarr

import zarrdali
from storefactory import VarSpec, chunk_files, write_store

root, how = Path(sys.argv[1]), sys.argv[2]
options = {"memory_map": True} if sys.argv[3] == "maps" else {}  # else the default
spec = VarSpec("t2m", shape=(16, 64, 64), chunks=(1, 32, 32), shards=(4, 64, 64), seed=1)
store = write_store(root / "store.zarr", [spec])
old = zarr.open_group(store, mode="r")["t2m"][...]
# The replacement: the same layout with constant values (much smaller shards).
new_store = write_store(root / "new.zarr", [spec])
zarr.open_group(new_store, mode="r+")["t2m"][...] = 7.0
new = np.full_like(old, 7.0)

loader = zarrdali.ZarrLoader(store, ["t2m"], tile=(32, 32), batch_size=8, device="cpu",
                             workers=0, **options)
plan = loader.epoch_plan(0)
loader.load_batch(plan.batch(0))  # shard indexes cached (and files mapped, with maps)
for shard, replacement in zip(chunk_files(store, "t2m"), chunk_files(new_store, "t2m")):
    with open(shard, "r+b") as f:  # in place: same inode, shorter
        if how == "truncate":
            f.truncate(f.seek(0, 2) // 3)
        else:
            data = replacement.read_bytes()
            f.write(data)
            f.truncate(len(data))
served = errors = 0
for k in range(len(plan)):
    samples = plan.batch(k)
    try:
        got = loader.load_batch(samples)
    except zarrdali.ChunkError as err:
        assert err.array == "t2m" and err.key.startswith("c/"), err
        errors += 1
        continue
    for i, (t0, y0, x0) in enumerate(samples.tolist()):
        window = got[i, :, 0]
        olds = old[t0 : t0 + 1, y0 : y0 + 32, x0 : x0 + 32]
        news = new[t0 : t0 + 1, y0 : y0 + 32, x0 : x0 + 32]
        assert np.array_equal(window, olds) or np.array_equal(window, news), (t0, y0, x0)
    served += 1
loader.close()
print(f"served {served} errors {errors}")
"""


@pytest.mark.time_limit(180)
@pytest.mark.parametrize("how", ["truncate", "rewrite"])
def test_a_store_rewritten_in_place_never_kills_the_loader(tmp_path, python_child, how):
    done = python_child(CHILD, str(tmp_path), how, "default")
    assert done.returncode == 0, f"killed or failed ({done.returncode}): {done.stderr[-2000:]}"
    served, errors = (int(w) for w in done.stdout.split()[1::2])
    assert errors > 0, "a shrunken shard is a named error, not silently old bytes"
    assert served + errors == 8  # 16 steps x 4 tiles / 8


@pytest.mark.time_limit(180)
def test_memory_maps_opted_in_die_of_a_file_that_shrinks(tmp_path, python_child):
    """Why maps are not the default: the kernel kills the reader (SIGBUS)."""
    done = python_child(CHILD, str(tmp_path), "truncate", "maps")
    assert done.returncode == -signal.SIGBUS, (done.returncode, done.stdout, done.stderr[-500:])
