"""``ZarrLoader(index=SampleTable)``: serve exactly the listed samples."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from storefactory import VarSpec
from test_loader_oracle import Oracle, check_batches, loader_for, run_epochs
from zarrdali import ConfigError
from zarrdali.sampling.epochs import SampleTable

ROWS = np.array([[0, 0, 0], [3, 5, 7], [10, 13, 25], [15, 2, 9], [7, 8, 8], [1, 13, 0]])


@pytest.fixture
def store(make_store):
    return make_store(VarSpec("a", shape=(20, 21, 33), chunks=(2, 8, 8), shards=(4, 16, 16)))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_serves_exactly_the_listed_rows(store, workers, world_size):
    table = SampleTable(ROWS, tile_hw=(8, 8))
    served = []
    for rank in range(world_size):
        loader = loader_for(
            store,
            ["a"],
            index=table,
            batch_size=2,
            workers=workers,
            rank=rank,
            world_size=world_size,
        )
        batches = run_epochs(loader, [0])[0]
        check_batches(batches, Oracle(store, ["a"]), input_steps=2, target_steps=1, tile=(8, 8))
        served.append([tuple(r) for b in batches for r in b["index"].tolist()])
    assert len({len(s) for s in served}) == 1  # equal shares
    flat = [r for s in served for r in s]
    assert len(flat) == len(set(flat)) == len(ROWS) // world_size * world_size
    assert set(flat) <= {tuple(r) for r in ROWS.tolist()}


def test_weights_draw_in_proportion_and_are_deterministic(store):
    weights = np.array([0, 1, 1, 2, 0, 0], dtype=float)
    table = SampleTable(ROWS, tile_hw=(8, 8), weights=weights, samples_per_epoch=400)
    a = table.samples(seed=3, epoch=1)
    np.testing.assert_array_equal(a, table.samples(seed=3, epoch=1))
    assert not np.array_equal(a, table.samples(seed=3, epoch=2))
    counts = Counter(tuple(r) for r in a.tolist())
    assert set(counts) == {(3, 5, 7), (10, 13, 25), (15, 2, 9)}  # zero weight: never
    assert 0.4 < counts[(15, 2, 9)] / 400 < 0.6  # weight 2 of 4
    loader = loader_for(store, ["a"], index=table, batch_size=50, shuffle=False)
    assert len(loader) == 8


def test_rows_outside_the_store_are_refused(store):
    table = SampleTable(np.array([[0, 0, 0], [19, 0, 0]]), tile_hw=(8, 8), source="idx.csv")
    with pytest.raises(ConfigError, match=r"idx\.csv.*outside the store"):
        loader_for(store, ["a"], index=table)


def test_tile_mismatch_is_refused(store):
    table = SampleTable(ROWS, tile_hw=(4, 4), source="idx.csv")
    with pytest.raises(ConfigError, match="tile"):
        loader_for(store, ["a"], index=table, tile=(8, 8))
