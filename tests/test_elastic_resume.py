"""Elastic resume: a state saved at one world size resumes at another.

The ranks of a job step in lockstep (as under DDP), so a state says how many
batches every rank served. Resumed at another world size, the new ranks serve
the rest of that epoch once, in equally many batches each, deterministically;
later epochs are whole epochs at the new world size. Checked on the plan
(hypothesis, chains of world sizes) and end to end on loaders (2 -> 3 and
4 -> 1 ranks mid-epoch, in-process and in worker processes, augmentation draws
numbered through the epoch), plus the refusal of states saved for other samples.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from storefactory import VarSpec
from test_loader_oracle import Oracle, check_batches, loader_for, to_numpy
from zarrdali import ConfigError
from zarrdali.sampling.epochs import Sampler, Segment

NT, NY, NX = 12, 21, 33


# -- the plan ------------------------------------------------------------------------------
def _serve(n, batch_size, drop_last, shuffle, world_size, resumed, batches=None):
    """What every rank serves of epoch 3 after ``resumed``: its first ``batches``
    batches (all by default). Returns the served positions and each rank's
    batch sizes."""
    candidates = np.repeat(np.arange(n, dtype=np.int64)[:, None], 3, axis=1)
    served, sizes = [], []
    for rank in range(world_size):
        sampler = Sampler(batch_size, shuffle, 11, drop_last, rank, world_size)
        plan = sampler.epoch_plan(candidates, 3, resumed)
        k = len(plan) if batches is None else min(batches, len(plan))
        rank_batches = [plan.batch(i)[:, 0] for i in range(k)]
        sizes.append([len(b) for b in (plan.batch(i) for i in range(len(plan)))])
        served += [int(s) for b in rank_batches for s in b]
    return served, sizes


def _epoch(n, batch_size, drop_last, shuffle, world_size):
    return _serve(n, batch_size, drop_last, shuffle, world_size, ())[0]


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 120),
    batch_size=st.integers(1, 9),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    chain=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 12)), min_size=1, max_size=3),
    final_world=st.integers(1, 6),
)
def test_every_sample_once_in_lockstep_across_world_sizes(
    n, batch_size, drop_last, shuffle, chain, final_world
):
    worlds = [w for w, _ in chain] + [final_world]
    # a loader whose whole epoch cannot give every rank a batch is refused (plan.py)
    assume(all(n // w > 0 and not (drop_last and n // w < batch_size) for w in worlds))
    while chain and chain[0][1] == 0:  # nothing served yet: a fresh start at the next size
        chain = chain[1:]
    epoch = _epoch(n, batch_size, drop_last, shuffle, chain[0][0] if chain else final_world)
    served: list[int] = []
    resumed: list[Segment] = []
    rest = set(epoch)  # not served yet
    for world, batches in [*chain, (final_world, None)]:
        # the whole segment, had it run to its end, and what it served
        whole, sizes = _serve(n, batch_size, drop_last, shuffle, world, resumed)
        part, _ = _serve(n, batch_size, drop_last, shuffle, world, resumed, batches)
        assert len({len(s) for s in sizes}) == 1, sizes  # same batch count on every rank
        assert all(1 <= b <= batch_size for s in sizes for b in s)
        assert len(whole) == len(set(whole)) and set(whole) <= rest
        left_out = len(rest) - len(whole)
        if not resumed:
            assert left_out == 0  # the epoch itself
        elif drop_last:
            assert left_out < world * batch_size
        elif batch_size > 1 and len(rest) >= world:
            assert left_out == 0  # the rest served exactly once
        else:
            assert left_out < world
        served += part
        rest = set(whole) - set(part)
        if batches is not None:
            resumed.append(Segment(world, batches))
            sampler = Sampler(batch_size, shuffle, 11, drop_last, 0, 1)
            assert sorted(sampler.rest_of_epoch(n, 3, resumed).tolist()) == sorted(rest)
    assert len(served) == len(set(served)) and set(served) <= set(epoch)  # no sample twice
    # deterministic
    assert _serve(n, batch_size, drop_last, shuffle, final_world, resumed)[0] == part


def test_a_segment_that_served_nothing_is_a_fresh_start_at_the_new_size():
    candidates = np.repeat(np.arange(50)[:, None], 3, axis=1)
    for rank in range(3):
        sampler = Sampler(4, True, 1, False, rank, 3)
        fresh = sampler.epoch_plan(candidates, 2)
        resumed = sampler.epoch_plan(candidates, 2, [Segment(2, 0)])
        np.testing.assert_array_equal(fresh.samples, resumed.samples)
        assert len(fresh) == len(resumed)


def test_first_segment_matches_the_regular_epoch():
    """The layout used to compute what an epoch served is the regular plan's."""
    candidates = np.repeat(np.arange(103)[:, None], 3, axis=1)
    for drop_last in (False, True):
        for world in (1, 2, 4):
            samplers = [Sampler(5, True, 2, drop_last, r, world) for r in range(world)]
            plans = [s.epoch_plan(candidates, 0) for s in samplers]
            for b in range(len(plans[0]) + 1):
                served = {int(x) for p in plans for k in range(b) for x in p.batch(k)[:, 0]}
                every = {int(x) for p in plans for k in range(len(p)) for x in p.batch(k)[:, 0]}
                rest = samplers[0].rest_of_epoch(103, 0, [Segment(world, b)])
                assert sorted(rest.tolist()) == sorted(every - served)


# -- loaders end to end --------------------------------------------------------------------
@pytest.fixture
def store(make_store):
    return make_store(VarSpec("x", shape=(NT, NY, NX), chunks=(2, 8, 8), shards=(4, 16, 16)))


KW = dict(batch_size=4, seed=5, shuffle=True)  # 10 t0 x 12 tiles = 120 samples


def _indexes(batches) -> list[tuple[int, int, int]]:
    return [tuple(r) for b in batches for r in b["index"].tolist()]


def _run_ranks(store, world_size, epoch, state=None, stop_after=None, **kw):
    """Every rank's batches of ``epoch`` (resumed from ``state``), and rank 0's state."""
    per_rank, saved = [], None
    for rank in range(world_size):
        with loader_for(store, ["x"], rank=rank, world_size=world_size, **KW, **kw) as loader:
            if state is None:
                loader.set_epoch(epoch)
            else:
                loader.load_state_dict(state)
            batches = []
            it = iter(loader)
            for batch in it:
                batches.append(to_numpy(batch))
                if stop_after is not None and len(batches) == stop_after:
                    break
            if rank == 0:
                saved = loader.state_dict()
            it.close()
        per_rank.append(batches)
    return per_rank, saved


@pytest.mark.parametrize(("old", "new", "stop_after"), [(2, 3, 5), (4, 1, 3)])
def test_resume_at_another_world_size_serves_the_rest_once(store, old, new, stop_after):
    epoch_full, _ = _run_ranks(store, old, 2)
    everything = [s for rank in epoch_full for s in _indexes(rank)]
    head, state = _run_ranks(store, old, 2, stop_after=stop_after)
    assert state["batches_served"] == stop_after and state["world_size"] == old
    served = [s for rank in head for s in _indexes(rank)]
    tail, after = _run_ranks(store, new, 2, state=state)
    assert len({len(rank) for rank in tail}) == 1  # lockstep: same batch count everywhere
    resumed = [s for rank in tail for s in _indexes(rank)]
    assert Counter(resumed) == Counter(set(everything) - set(served))  # the rest, each once
    assert not set(resumed) & set(served)
    assert after["segments"] == [[old, stop_after]] and after["world_size"] == new
    check_batches(
        [b for rank in tail for b in rank],
        Oracle(store, ["x"]),
        input_steps=2,
        target_steps=1,
        tile=(8, 8),
    )
    again, _ = _run_ranks(store, new, 2, state=state)  # a second run: the same batches
    for got_rank, want_rank in zip(again, tail, strict=True):
        assert len(got_rank) == len(want_rank)
        for got, want in zip(got_rank, want_rank, strict=True):
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    # the next epoch is a whole epoch at the new world size
    next_epoch, _ = _run_ranks(store, new, 3)
    with loader_for(store, ["x"], rank=0, world_size=new, **KW) as fresh:
        fresh.set_epoch(3)
        assert _indexes(next_epoch[0]) == _indexes(to_numpy(b) for b in fresh)


def test_resumed_twice_and_in_worker_processes(store):
    """2 ranks -> 3 ranks -> 1 rank (the last reading in worker processes)."""
    full, _ = _run_ranks(store, 2, 1)
    everything = {s for rank in full for s in _indexes(rank)}
    first, state = _run_ranks(store, 2, 1, stop_after=4)
    second, state = _run_ranks(store, 3, 1, state=state, stop_after=3)
    assert state["segments"] == [[2, 4]] and state["batches_served"] == 3
    third, state = _run_ranks(store, 1, 1, state=state, workers=2)
    parts = [[s for rank in part for s in _indexes(rank)] for part in (first, second, third)]
    union = [s for part in parts for s in part]
    assert len(union) == len(set(union)) and set(union) == everything
    assert state["segments"] == [[2, 4], [3, 3]]


def test_a_state_saved_before_the_resumed_epoch_starts_says_the_same(store):
    _, state = _run_ranks(store, 2, 1, stop_after=3)
    with loader_for(store, ["x"], rank=1, world_size=3, **KW) as loader:
        loader.load_state_dict(state)
        again = loader.state_dict()
        direct = [to_numpy(b) for b in loader]
    assert again["segments"] == [[2, 3]] and again["batches_served"] == 0
    with loader_for(store, ["x"], rank=1, world_size=3, **KW) as loader:
        loader.load_state_dict(again)
        assert _indexes(to_numpy(b) for b in loader) == _indexes(direct)


def test_same_world_size_resumes_as_before(store):
    full, _ = _run_ranks(store, 2, 0)
    _, state = _run_ranks(store, 2, 0, stop_after=2)
    tail, _ = _run_ranks(store, 2, 0, state=state)
    for rank in range(2):
        assert _indexes(tail[rank]) == _indexes(full[rank][2:])


# -- refused states ------------------------------------------------------------------------
def _state(store, **kw) -> dict:
    with loader_for(store, ["x"], **{**KW, **kw}) as loader:
        loader.set_epoch(1)
        it = iter(loader)
        next(it)
        state = loader.state_dict()
        it.close()
    return state


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"seed": 6}, r"sampling seed: state 5, loader 6"),
        ({"input_steps": 3}, r"spec input_steps: state 2, loader 3"),
        ({"tile": (8, 4)}, r"spec tile: state \[8, 8\], loader \[8, 4\]"),
        ({"drop_last": True}, r"sampling drop_last: state False, loader True"),
        ({"batch_size": 5}, r"sampling batch_size: state 4, loader 5"),
    ],
)
def test_state_for_other_samples_is_refused(store, change, says):
    state = _state(store)
    with (
        loader_for(store, ["x"], **{**KW, **change}) as other,
        pytest.raises(ConfigError, match=says),
    ):
        other.load_state_dict(state)


def test_state_from_another_store_is_refused(store, make_store):
    state = _state(store)
    other = make_store(VarSpec("x", shape=(NT + 4, NY, NX), chunks=(2, 8, 8)))
    with (
        loader_for(other, ["x"], **KW) as loader,
        pytest.raises(ConfigError, match=r"store x: state '<f4 \[12, 21, 33\] chunks"),
    ):
        loader.load_state_dict(state)


def test_state_without_fingerprint_still_loads(store):
    state = _state(store)
    old = {k: v for k, v in state.items() if k not in ("fingerprint", "segments")}
    with loader_for(store, ["x"], **KW) as loader:
        loader.load_state_dict(old)
        assert loader.state_dict()["batches_served"] == 1
    with (
        loader_for(store, ["x"], **{**KW, "seed": 9}) as loader,
        pytest.raises(ConfigError, match="seed=5"),
    ):
        loader.load_state_dict(old)


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "workers"])
def test_augmentation_draws_continue_through_the_resumed_epoch(store, workers):
    """Batch k of the rest of an epoch resumed after ``s`` batches per rank draws
    its flips and turns as batch ``s + k`` of the epoch, and its frames (cut in
    the ring by workers or threads) are the oracle's with those flags."""
    from zarrdali.sampling.augment import apply_augmentations, draw_augmentations

    augment = ("flip", "rot90")
    _, state = _run_ranks(store, 2, 1, stop_after=3, augment=augment)
    tail, _ = _run_ranks(store, 3, 1, state=state, augment=augment, workers=workers)
    oracle = Oracle(store, ["x"])
    for rank in tail:
        for k, batch in enumerate(rank):
            want = draw_augmentations(augment, len(batch["index"]), KW["seed"], 1, 3 + k)
            np.testing.assert_array_equal(batch["augment"], want)
            for i, (t0, y0, x0) in enumerate(batch["index"].tolist()):
                window = apply_augmentations(oracle.window(t0, y0, x0, 3, 1, (8, 8)), want[i])
                got = np.concatenate([batch["input"][i], batch["target"][i]])
                np.testing.assert_array_equal(got, window)
