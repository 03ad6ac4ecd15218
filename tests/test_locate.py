"""``ChunkLocator``: where each chunk's bytes are, from cached numpy tables.

Checked against the files themselves (shard indexes parsed by the test, file
sizes), with missing chunks and missing shards, and under a budget so small
that every batch evicts rows: the answers must not change.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from storefactory import VarSpec, chunk_files, chunk_key, delete_chunks, shard_index
from zarrdali.batch.host import PosixReader
from zarrdali.batch.locate import ChunkLocator
from zarrdali.batch.plan import natural_coords, plan_batch
from zarrdali.store.open import load_layouts, open_group

NT, NY, NX = 12, 21, 33
SPECS = [
    VarSpec("plain", shape=(NT, NY, NX), chunks=(2, 8, 8)),
    VarSpec(
        "sharded", shape=(NT, NY, NX), chunks=(1, 8, 8), shards=(2, 16, 16), written_time=(0, 7)
    ),
    VarSpec("levels", shape=(NT, 3, NY, NX), chunks=(1, 2, 8, 8), shards=(2, 2, 16, 16)),
]


def expected_location(store: Path, layout, coords4) -> tuple[str, int, int] | None:
    """(file, offset, nbytes) of a chunk read straight from the files; None: missing."""
    coords = natural_coords(layout, coords4)
    if layout.shard is None:
        path = store / layout.name / layout.encode_key(coords)
        return (str(path), 0, path.stat().st_size) if path.exists() else None
    per = layout.shard.chunks_per_shard
    key = layout.encode_key(tuple(c // n for c, n in zip(coords, per, strict=True)))
    path = store / layout.name / key
    if not path.exists():
        return None
    inner = np.ravel_multi_index(tuple(c % n for c, n in zip(coords, per, strict=True)), per)
    off, n = (int(v) for v in shard_index(store, layout.name, key)[inner])
    return None if off == n == 2**64 - 1 else (str(path), off, n)


def check(store: Path, layouts, locator: ChunkLocator, samples: np.ndarray) -> None:
    plan = plan_batch(layouts, samples, n_frames=3, frame_step=2, tile_hw=(8, 8))
    loc = locator.locate(plan)
    for i in range(plan.n_chunks):
        layout = layouts[plan.chunk_var[i]]
        want = expected_location(store, layout, plan.chunk_coords[i])
        assert loc.fast[i]
        if want is None:
            assert loc.missing[i] and loc.file[i] == -1, (layout.name, plan.chunk_coords[i])
            continue
        assert not loc.missing[i]
        f = loc.file[i]
        got = (os.path.normpath(loc.paths[f]), int(loc.offset[i]), int(loc.nbytes[i]))
        assert got == (os.path.normpath(want[0]), want[1], want[2])
        assert loc.file_var[f] == plan.chunk_var[i]
        assert loc.keys[f] == os.path.relpath(want[0], store / layout.name)
    # files are listed once each
    assert len(set(loc.paths.tolist())) == len(loc.paths)


def batches(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        np.stack(
            [rng.integers(0, NT - 4, 5), rng.integers(0, NY - 8, 5), rng.integers(0, NX - 8, 5)],
            axis=1,
        )
        for _ in range(n)
    ]


@pytest.fixture
def store(make_store) -> Path:
    path = make_store(*SPECS)
    for name in ("plain", "sharded", "levels"):  # some chunks and a whole shard missing
        files = chunk_files(path, name)
        delete_chunks(path, name, [chunk_key(path, name, f) for f in files[1:3]])
    return path


@pytest.mark.parametrize("budget", [64 << 20, 1])
def test_locations_match_the_files(store, budget):
    """Same answers with room for everything and with a budget that evicts every batch."""
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["plain", "sharded", "levels"])
    locator = ChunkLocator(name, layouts, budget_bytes=budget)
    for samples in batches(8, seed=budget):
        check(store, layouts, locator, samples)
    stats = locator.stats()
    assert stats["objects_loaded"] >= stats["objects_cached"] > 0
    if budget == 1:
        assert stats["objects_evicted"] > 0, "a one-byte budget must evict"
        # bounded: never more rows than one batch needs (plus the initial table)
        assert stats["objects_cached"] <= 64 + 3 * 5 * 3 * 4 * 4
    else:
        assert stats["objects_evicted"] == 0


def test_rows_are_read_once(store):
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["sharded"])
    locator = ChunkLocator(name, layouts)
    samples = batches(1, seed=3)[0]
    plan = plan_batch(layouts, samples, n_frames=3, frame_step=2, tile_hw=(8, 8))
    locator.locate(plan)
    loaded = locator.stats()["objects_loaded"]
    for _ in range(3):
        locator.locate(plan)
    assert locator.stats()["objects_loaded"] == loaded, "cached rows are not read again"


def test_reader_returns_each_chunks_bytes(store):
    """Coalesced reads cut back into chunks give each chunk's own stored bytes."""
    group, name = open_group(store)
    layouts = load_layouts(group, name, ["plain", "sharded", "levels"])
    locator = ChunkLocator(name, layouts)
    plan = plan_batch(layouts, batches(1, seed=5)[0], n_frames=3, frame_step=2, tile_hw=(8, 8))
    loc = locator.locate(plan)
    encoded = PosixReader(name, max_gap=1 << 20).read_chunks(layouts, loc)
    for i, data in enumerate(encoded):
        want = expected_location(store, layouts[plan.chunk_var[i]], plan.chunk_coords[i])
        if want is None:
            assert data is None
            continue
        path, off, n = want
        assert data == Path(path).read_bytes()[off : off + n]


def test_reader_keeps_files_open_per_thread_and_closes_them(store):
    """Each thread keeps its files open between reads; threads that ended leave none
    behind once another thread reads; close() closes the rest."""
    import threading

    group, name = open_group(store)
    layouts = load_layouts(group, name, ["sharded"])
    locator = ChunkLocator(name, layouts)
    plan = plan_batch(layouts, batches(1, seed=5)[0], n_frames=3, frame_step=2, tile_hw=(8, 8))
    loc = locator.locate(plan)
    reader = PosixReader(name, max_open_files=2)

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    base = open_fds()
    for _ in range(3):  # threads that read and end
        thread = threading.Thread(target=reader.read_chunks, args=(layouts, loc))
        thread.start()
        thread.join()
        assert open_fds() - base <= 2 * 2, "dead threads' files are closed"
    reader.read_chunks(layouts, loc)
    assert 0 < open_fds() - base <= 2 * 2, "at most max_open_files per live thread"
    reader.close()
    assert open_fds() == base
