"""Property tests for the pure epoch planning in ``zarrdali.sampling.epochs``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from zarrdali.errors import ConfigError
from zarrdali.sampling.epochs import EpochPlan, SampleGrid, Sampler, SampleSpec, tile_origins

FAST = settings(max_examples=100, deadline=None)


@st.composite
def grids(draw, sampling: str = "grid", cover_edges: bool | None = None) -> SampleGrid:
    """A valid SampleGrid of a small store."""
    input_steps = draw(st.integers(1, 4))
    target_steps = draw(st.integers(0, 3))
    frame_step = draw(st.integers(1, 3))
    time_stride = draw(st.integers(1, 4))
    span = (input_steps + target_steps - 1) * frame_step + 1
    n_time = draw(st.integers(span, span + 20))
    ny = draw(st.integers(1, 24))
    nx = draw(st.integers(1, 24))
    if draw(st.booleans()):
        tile = (draw(st.integers(1, ny)), draw(st.integers(1, nx)))
        stride = draw(st.none() | st.tuples(st.integers(1, 12), st.integers(1, 12)))
    else:
        tile, stride = None, None
    if cover_edges is None:
        cover_edges = draw(st.booleans())
    spec = SampleSpec(
        input_steps=input_steps,
        target_steps=target_steps,
        frame_step=frame_step,
        time_stride=time_stride,
        tile=tile,
        tile_stride=stride,
        tile_sampling=sampling,
        cover_edges=cover_edges,
    )
    return SampleGrid(spec, n_time, ny, nx)


def _rows(a: np.ndarray) -> list[tuple[int, ...]]:
    return [tuple(r) for r in a.tolist()]


def _all_batches(plan: EpochPlan) -> np.ndarray:
    if len(plan) == 0:
        return np.empty((0, 3), dtype=np.int64)
    return np.concatenate([plan.batch(k) for k in range(len(plan))])


# -- tile_origins -------------------------------------------------------------


@FAST
@given(
    size=st.integers(1, 200),
    data=st.data(),
    cover_edges=st.booleans(),
)
def test_tile_origins_in_range_and_strided(size, data, cover_edges):
    tile = data.draw(st.integers(1, size))
    stride = data.draw(st.integers(1, size + 3))
    starts = tile_origins(size, tile, stride, cover_edges)
    assert starts.dtype == np.int64
    assert len(starts) >= 1
    assert starts[0] == 0
    assert np.all(starts >= 0)
    assert np.all(starts + tile <= size)
    assert np.all(np.diff(starts) > 0)
    regular = np.arange(0, size - tile + 1, stride)
    np.testing.assert_array_equal(starts[: len(regular)], regular)
    if cover_edges:
        assert starts[-1] + tile == size
        assert len(starts) - len(regular) in (0, 1)
    else:
        assert len(starts) == len(regular)


@FAST
@given(size=st.integers(1, 200), data=st.data())
def test_tile_origins_cover_every_cell(size, data):
    tile = data.draw(st.integers(1, size))
    stride = data.draw(st.integers(1, tile))  # no gaps between tiles
    covered = np.zeros(size, dtype=np.int64)
    for s in tile_origins(size, tile, stride, True):
        covered[s : s + tile] += 1
    assert np.all(covered >= 1)


# -- SampleGrid ---------------------------------------------------------------


@FAST
@given(grid=grids(), seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 1000))
def test_grid_windows_and_tiles_in_bounds(grid, seed, epoch):
    spec = grid.spec
    s = grid.samples(seed, epoch)
    assert s.shape == (len(grid), 3)
    assert s.dtype == np.int64
    h, w = grid.tile_hw
    t0, y0, x0 = s.T
    assert np.all(t0 >= 0)
    assert np.all(t0 + spec.window_span <= grid.n_time)
    # the last frame is the last store step the window touches
    assert np.all(t0 + (spec.n_frames - 1) * spec.frame_step < grid.n_time)
    assert np.all((y0 >= 0) & (y0 + h <= grid.ny))
    assert np.all((x0 >= 0) & (x0 + w <= grid.nx))
    # t0 follows time_stride, starting at 0, as far as a window fits
    assert np.all(t0 % spec.time_stride == 0)
    expected_t0 = np.arange(0, grid.n_time - spec.window_span + 1, spec.time_stride)
    np.testing.assert_array_equal(np.unique(t0), expected_t0)
    np.testing.assert_array_equal(grid.t0s, expected_t0)
    assert len(grid) == len(expected_t0) * grid.tiles_per_step


@FAST
@given(grid=grids(cover_edges=True), seed=st.integers(0, 100))
def test_grid_tiles_of_one_step_cover_field(grid, seed):
    spec = grid.spec
    h, w = grid.tile_hw
    sy, sx = spec.tile_stride or (h, w)
    assume(sy <= h and sx <= w)  # a stride longer than the tile leaves gaps by design
    s = grid.samples(seed, 0)
    first = s[s[:, 0] == s[0, 0]]
    assert len(first) == grid.tiles_per_step
    covered = np.zeros((grid.ny, grid.nx), dtype=np.int64)
    for _, y0, x0 in first.tolist():
        covered[y0 : y0 + h, x0 : x0 + w] += 1
    assert np.all(covered >= 1)


@FAST
@given(grid=grids(), seed=st.integers(0, 100), e1=st.integers(0, 50), e2=st.integers(0, 50))
def test_grid_tiling_same_set_every_epoch(grid, seed, e1, e2):
    a, b = grid.samples(seed, e1), grid.samples(seed, e2)
    np.testing.assert_array_equal(a, b)
    assert len(set(_rows(a))) == len(a)  # no duplicate candidates


@FAST
@given(grid=grids(sampling="random"), seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 100))
def test_random_tiles_in_range_and_deterministic(grid, seed, epoch):
    h, w = grid.tile_hw
    a = grid.samples(seed, epoch)
    np.testing.assert_array_equal(a, grid.samples(seed, epoch))
    assert np.all((a[:, 1] >= 0) & (a[:, 1] <= grid.ny - h))
    assert np.all((a[:, 2] >= 0) & (a[:, 2] <= grid.nx - w))
    # one sample per (t0, tile slot), same t0 layout as grid tiling
    np.testing.assert_array_equal(a[:, 0], np.repeat(grid.t0s, grid.tiles_per_step))


@FAST
@given(seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 100), delta=st.integers(1, 100))
def test_random_tiles_differ_across_epochs(seed, epoch, delta):
    # enough samples and offsets that a repeat is astronomically unlikely
    spec = SampleSpec(input_steps=1, tile=(4, 4), tile_sampling="random")
    grid = SampleGrid(spec, n_time=20, ny=64, nx=64)
    a = grid.samples(seed, epoch)
    b = grid.samples(seed, epoch + delta)
    np.testing.assert_array_equal(a[:, 0], b[:, 0])
    assert not np.array_equal(a[:, 1:], b[:, 1:])
    c = grid.samples(seed + 1, epoch)
    assert not np.array_equal(a[:, 1:], c[:, 1:])


# -- Sampler / EpochPlan ------------------------------------------------------


@st.composite
def sampler_cases(draw, world_size: int | None = None):
    grid = draw(grids())
    n = len(grid)
    ws = world_size if world_size is not None else draw(st.integers(1, 6))
    assume(n // ws >= 1)
    per_rank = n // ws
    drop_last = draw(st.booleans())
    batch_size = draw(st.integers(1, per_rank if drop_last else per_rank + 3))
    shuffle = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    epoch = draw(st.integers(0, 1000))
    return grid, ws, batch_size, shuffle, seed, drop_last, epoch


def _plans(grid, ws, batch_size, shuffle, seed, drop_last, epoch):
    cands = grid.samples(seed, epoch)
    return [
        Sampler(batch_size, shuffle, seed, drop_last, r, ws).epoch_plan(cands, epoch)
        for r in range(ws)
    ]


@FAST
@given(case=sampler_cases(world_size=1))
def test_single_rank_epoch_is_permutation_of_candidates(case):
    grid, ws, batch_size, shuffle, seed, _, epoch = case
    (plan,) = _plans(grid, ws, batch_size, shuffle, seed, False, epoch)
    served = _all_batches(plan)
    cands = grid.samples(seed, epoch)
    assert len(served) == len(cands)
    assert sorted(_rows(served)) == sorted(_rows(cands))
    assert len(set(_rows(served))) == len(served)
    # every batch but the last is full
    sizes = [len(plan.batch(k)) for k in range(len(plan))]
    assert all(s == batch_size for s in sizes[:-1])
    assert 1 <= sizes[-1] <= batch_size


@FAST
@given(case=sampler_cases())
def test_ranks_disjoint_and_nearly_complete(case):
    grid, ws, batch_size, shuffle, seed, drop_last, epoch = case
    plans = _plans(grid, ws, batch_size, shuffle, seed, drop_last, epoch)
    cands = grid.samples(seed, epoch)
    per_rank = len(cands) // ws
    # before batching: equal shares, disjoint, missing at most ws - 1
    for p in plans:
        assert len(p.samples) == per_rank
        assert p.epoch == epoch
    union = [row for p in plans for row in _rows(p.samples)]
    assert len(set(union)) == len(union)
    assert set(union) <= set(_rows(cands))
    assert len(cands) - len(union) <= ws - 1
    # every rank runs the same number of batches
    n_batches = {len(p) for p in plans}
    assert len(n_batches) == 1
    expected = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
    assert n_batches == {expected}
    # what is actually served: no duplicates across ranks, all batches full with drop_last
    served = [row for p in plans for row in _rows(_all_batches(p))]
    assert len(set(served)) == len(served)
    if drop_last:
        assert all(len(p.batch(k)) == batch_size for p in plans for k in range(len(p)))
    else:
        assert len(served) == len(union)


@FAST
@given(case=sampler_cases())
def test_same_seed_and_epoch_same_order(case):
    grid, ws, batch_size, shuffle, seed, drop_last, epoch = case
    a = _plans(grid, ws, batch_size, shuffle, seed, drop_last, epoch)
    b = _plans(grid, ws, batch_size, shuffle, seed, drop_last, epoch)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa.samples, pb.samples)


@FAST
@given(
    n=st.integers(20, 500),
    seed=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 1000),
    delta=st.integers(1, 1000),
    ws=st.integers(1, 4),
)
def test_different_epoch_different_order(n, seed, epoch, delta, ws):
    cands = np.stack([np.arange(n), np.zeros(n), np.zeros(n)], axis=1).astype(np.int64)
    for rank in range(ws):
        s = Sampler(1, shuffle=True, seed=seed, rank=rank, world_size=ws)
        a = s.epoch_plan(cands, epoch).samples
        b = s.epoch_plan(cands, epoch + delta).samples
        # a rank's share of n >= 20 is the same in the same order with odds < 1e-6
        assert not np.array_equal(a, b)
    # the whole epoch order changes too
    s = Sampler(1, shuffle=True, seed=seed)
    assert not np.array_equal(
        s.epoch_plan(cands, epoch).samples, s.epoch_plan(cands, epoch + delta).samples
    )


@FAST
@given(case=sampler_cases())
def test_no_shuffle_is_natural_order(case):
    grid, ws, batch_size, _, seed, drop_last, epoch = case
    plans = _plans(grid, ws, batch_size, False, seed, drop_last, epoch)
    cands = grid.samples(seed, epoch)
    per_rank = len(cands) // ws
    for r, p in enumerate(plans):
        np.testing.assert_array_equal(p.samples, cands[r : per_rank * ws : ws])
    if ws == 1 and grid.spec.tile_sampling == "grid":
        # natural order is lexicographic in (t0, y0, x0)
        rows = _rows(plans[0].samples)
        assert rows == sorted(rows)


@FAST
@given(case=sampler_cases(), data=st.data())
def test_resume_serves_the_rest_of_the_epoch(case, data):
    grid, ws, batch_size, shuffle, seed, drop_last, epoch = case
    rank = data.draw(st.integers(0, ws - 1))
    sampler = Sampler(batch_size, shuffle, seed, drop_last, rank, ws)
    full = sampler.epoch_plan(grid.samples(seed, epoch), epoch)
    k = data.draw(st.integers(0, len(full)))
    uninterrupted = [full.batch(j) for j in range(len(full))]
    # a fresh process: new grid and sampler, same configuration
    grid2 = SampleGrid(grid.spec, grid.n_time, grid.ny, grid.nx)
    sampler2 = Sampler(batch_size, shuffle, seed, drop_last, rank, ws)
    resumed = sampler2.epoch_plan(grid2.samples(seed, epoch), epoch)
    assert len(resumed) == len(full)
    rest = [resumed.batch(j) for j in range(k, len(resumed))]
    assert len(rest) == len(uninterrupted) - k
    for a, b in zip(rest, uninterrupted[k:], strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(IndexError):
        resumed.batch(len(resumed))
    with pytest.raises(IndexError):
        resumed.batch(-1)


# -- invalid configurations ---------------------------------------------------


@FAST
@given(span_extra=st.integers(1, 10), input_steps=st.integers(1, 5), frame_step=st.integers(1, 3))
def test_window_longer_than_time_axis(span_extra, input_steps, frame_step):
    spec = SampleSpec(input_steps=input_steps, target_steps=1, frame_step=frame_step)
    n_time = spec.window_span - span_extra
    assume(n_time >= 0)
    with pytest.raises(ConfigError):
        SampleGrid(spec, n_time, 8, 8)


@FAST
@given(ny=st.integers(1, 30), nx=st.integers(1, 30), dy=st.integers(0, 5), dx=st.integers(0, 5))
def test_tile_larger_than_field(ny, nx, dy, dx):
    assume(dy > 0 or dx > 0)
    spec = SampleSpec(input_steps=1, tile=(ny + dy, nx + dx))
    with pytest.raises(ConfigError):
        SampleGrid(spec, 4, ny, nx)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_steps": 0},
        {"input_steps": -1},
        {"input_steps": 1, "target_steps": -1},
        {"input_steps": 1, "frame_step": 0},
        {"input_steps": 1, "frame_step": -2},
        {"input_steps": 1, "time_stride": 0},
        {"input_steps": 1, "time_stride": -1},
        {"input_steps": 1, "tile": (0, 4)},
        {"input_steps": 1, "tile": (4, -1)},
        {"input_steps": 1, "tile": (4, 4), "tile_stride": (0, 1)},
        {"input_steps": 1, "tile": (4, 4), "tile_stride": (1, -1)},
        {"input_steps": 1, "tile_sampling": "poisson"},
    ],
)
def test_invalid_spec(kwargs):
    with pytest.raises(ConfigError):
        SampleSpec(**kwargs)


@FAST
@given(batch_size=st.integers(-5, 0))
def test_batch_size_below_one(batch_size):
    with pytest.raises(ConfigError):
        Sampler(batch_size)


@FAST
@given(world_size=st.integers(-3, 8), rank=st.integers(-3, 10))
def test_rank_out_of_range(world_size, rank):
    if world_size >= 1 and 0 <= rank < world_size:
        Sampler(1, rank=rank, world_size=world_size)
    else:
        with pytest.raises(ConfigError):
            Sampler(1, rank=rank, world_size=world_size)


@FAST
@given(n=st.integers(0, 30), ws=st.integers(1, 8), batch_size=st.integers(1, 10))
def test_too_few_samples_for_ranks(n, ws, batch_size):
    cands = np.zeros((n, 3), dtype=np.int64)
    for drop_last in (False, True):
        per_rank = n // ws
        ok = per_rank >= 1 and (not drop_last or per_rank >= batch_size)
        s = Sampler(batch_size, drop_last=drop_last, world_size=ws)
        if ok:
            assert len(s.epoch_plan(cands, 0)) >= 1
        else:
            with pytest.raises(ConfigError):
                s.epoch_plan(cands, 0)
