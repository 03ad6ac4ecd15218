"""Property tests for ``zarrdali.chunkplan.plan_batch``: simulate the plan with numpy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zarrdali.chunkplan import BatchReadPlan, channel_offsets, plan_batch
from zarrdali.store import ArrayLayout

FILL = -1  # arrays hold values >= 0, so padding that leaks into the output shows


def make_layout(name: str, shape: tuple[int, ...], chunk_shape: tuple[int, ...]) -> ArrayLayout:
    dims = ("time", "level", "y", "x") if len(shape) == 4 else ("time", "y", "x")
    return ArrayLayout(
        name=name,
        shape=shape,
        dtype=np.dtype("int64"),
        chunk_shape=chunk_shape,
        fill_value=FILL,
        dims=dims,
        codec=None,
        shard=None,
        shard_shape=None,
        directory=None,
        encode_key=lambda c: "c/" + "/".join(map(str, c)),
        attrs={},
    )


@st.composite
def cases(draw):
    n_frames = draw(st.integers(1, 4))
    frame_step = draw(st.integers(1, 3))
    span = (n_frames - 1) * frame_step + 1
    n_time = draw(st.integers(span, span + 8))
    ny = draw(st.integers(1, 20))
    nx = draw(st.integers(1, 20))
    h = draw(st.integers(1, ny))
    w = draw(st.integers(1, nx))
    layouts = []
    for v in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            n_levels = draw(st.integers(1, 4))
            shape = (n_time, n_levels, ny, nx)
        else:
            shape = (n_time, ny, nx)
        # chunks from 1 cell up to a bit more than the axis (one partial chunk)
        chunk_shape = tuple(draw(st.integers(1, n + 2)) for n in shape)
        layouts.append(make_layout(f"v{v}", shape, chunk_shape))
    b = draw(st.integers(1, 5))
    samples = np.array(
        [
            (
                draw(st.integers(0, n_time - span)),
                draw(st.integers(0, ny - h)),
                draw(st.integers(0, nx - w)),
            )
            for _ in range(b)
        ],
        dtype=np.int64,
    ).reshape(b, 3)
    seed = draw(st.integers(0, 2**32 - 1))
    return layouts, samples, n_frames, frame_step, (h, w), seed


def decode(layout: ArrayLayout, array: np.ndarray, coords: tuple[int, ...]) -> np.ndarray:
    """The chunk at ``coords``, padded with FILL to the full chunk shape like a real chunk."""
    cs = layout.chunk_shape
    assert len(coords) == len(cs)
    n_chunks = [-(-n // c) for n, c in zip(layout.shape, cs, strict=True)]
    assert all(0 <= c < n for c, n in zip(coords, n_chunks, strict=True)), coords
    sel = tuple(slice(c * k, (c + 1) * k) for c, k in zip(coords, cs, strict=True))
    part = array[sel]
    chunk = np.full(cs, FILL, dtype=array.dtype)
    chunk[tuple(slice(0, n) for n in part.shape)] = part
    return chunk


def expected_batch(layouts, arrays, samples, n_frames, frame_step, tile_hw) -> np.ndarray:
    h, w = tile_hw
    out = []
    for t0, y0, x0 in samples.tolist():
        frames = []
        for f in range(n_frames):
            t = t0 + f * frame_step
            chans = []
            for layout, a in zip(layouts, arrays, strict=True):
                if len(layout.shape) == 4:
                    chans.append(a[t, :, y0 : y0 + h, x0 : x0 + w])
                else:
                    chans.append(a[t, None, y0 : y0 + h, x0 : x0 + w])
            frames.append(np.concatenate(chans, axis=0))
        out.append(np.stack(frames))
    return np.stack(out)


def needed_chunks(layouts, samples, n_frames, frame_step, tile_hw) -> set:
    """The chunks a batch touches, computed independently of the planner."""
    h, w = tile_hw
    need = set()
    for t0, y0, x0 in samples.tolist():
        for v, layout in enumerate(layouts):
            cs = layout.chunk_shape
            ys = range(y0 // cs[-2], (y0 + h - 1) // cs[-2] + 1)
            xs = range(x0 // cs[-1], (x0 + w - 1) // cs[-1] + 1)
            for f in range(n_frames):
                ct = (t0 + f * frame_step) // cs[0]
                if len(layout.shape) == 4:
                    ls = range(0, (layout.shape[1] - 1) // cs[1] + 1)
                    need.update(
                        (v, (ct, cl, cy, cx)) for cl, cy, cx in itertools.product(ls, ys, xs)
                    )
                else:
                    need.update((v, (ct, cy, cx)) for cy, cx in itertools.product(ys, xs))
    return need


def simulate(plan: BatchReadPlan, layouts, arrays, dtype=np.int64):
    decoded = [decode(layouts[c.var], arrays[c.var], c.coords) for c in plan.chunks]
    out = np.full(plan.out_shape, -7, dtype=dtype)
    writes = np.zeros(plan.out_shape, dtype=np.int64)
    for copy in plan.copies:
        assert 0 <= copy.chunk < len(decoded)
        piece = decoded[copy.chunk][copy.src]
        assert piece.size > 0, copy  # no empty copies
        assert out[copy.dst].shape == piece.shape, copy
        out[copy.dst] = piece
        writes[copy.dst] += 1
    return out, writes


@settings(max_examples=300, deadline=None)
@given(case=cases())
def test_plan_assembles_the_batch(case):
    layouts, samples, n_frames, frame_step, tile_hw, seed = case
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 1_000_000, size=lay.shape, dtype=np.int64) for lay in layouts]
    plan = plan_batch(layouts, samples, n_frames=n_frames, frame_step=frame_step, tile_hw=tile_hw)

    n_channels = sum(lay.n_levels for lay in layouts)
    assert plan.out_shape == (len(samples), n_frames, n_channels, *tile_hw)
    np.testing.assert_array_equal(plan.samples, samples)
    assert plan.samples.dtype == np.int64

    out, writes = simulate(plan, layouts, arrays)
    assert np.all(writes == 1), "every output element is written exactly once"
    want = expected_batch(layouts, arrays, samples, n_frames, frame_step, tile_hw)
    np.testing.assert_array_equal(out, want)

    keys = [(c.var, c.coords) for c in plan.chunks]
    assert len(set(keys)) == len(keys), "a chunk is listed twice"
    assert {c.chunk for c in plan.copies} == set(range(len(plan.chunks))), "unused chunk"
    assert set(keys) == needed_chunks(layouts, samples, n_frames, frame_step, tile_hw)
    assert plan.decoded_nbytes(layouts) == sum(layouts[c.var].chunk_nbytes for c in plan.chunks)


@settings(max_examples=30, deadline=None)
@given(case=cases())
def test_duplicate_samples_share_chunks(case):
    layouts, samples, n_frames, frame_step, tile_hw, _ = case
    once = plan_batch(layouts, samples, n_frames=n_frames, frame_step=frame_step, tile_hw=tile_hw)
    twice = plan_batch(
        layouts,
        np.concatenate([samples, samples]),
        n_frames=n_frames,
        frame_step=frame_step,
        tile_hw=tile_hw,
    )
    assert twice.chunks == once.chunks
    assert len(twice.copies) == 2 * len(once.copies)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=5))
def test_channel_offsets(sizes):
    layouts = [
        make_layout(
            f"v{i}", (2, n, 3, 3) if n > 1 else (2, 3, 3), (1, 1, 1, 1)[: 4 if n > 1 else 3]
        )
        for i, n in enumerate(sizes)
    ]
    assert channel_offsets(layouts) == [sum(sizes[:i]) for i in range(len(sizes))]


@settings(max_examples=100, deadline=None)
@given(case=cases(), data=st.data())
def test_split_plan_assembles_input_and_target_apart(case, data):
    layouts, samples, n_frames, frame_step, tile_hw, seed = case
    if n_frames < 2:
        return
    split = data.draw(st.integers(1, n_frames - 1))
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 1_000_000, size=lay.shape, dtype=np.int64) for lay in layouts]
    kw = dict(n_frames=n_frames, frame_step=frame_step, tile_hw=tile_hw)
    whole = plan_batch(layouts, samples, **kw)
    plan = plan_batch(layouts, samples, **kw, frame_split=split)

    assert plan.chunks == whole.chunks, "splitting the output changes no read"
    b, t, *rest = whole.out_shape
    assert plan.out_shapes == [(b, split, *rest), (b, t - split, *rest)]
    decoded = [decode(layouts[c.var], arrays[c.var], c.coords) for c in plan.chunks]
    outs = [np.full(shape, -7, dtype=np.int64) for shape in plan.out_shapes]
    writes = [np.zeros(shape, dtype=np.int64) for shape in plan.out_shapes]
    for copy in plan.copies:
        outs[copy.out][copy.dst] = decoded[copy.chunk][copy.src]
        writes[copy.out][copy.dst] += 1
    assert all(np.all(w == 1) for w in writes), "every output element is written exactly once"
    want = expected_batch(layouts, arrays, samples, n_frames, frame_step, tile_hw)
    np.testing.assert_array_equal(outs[0], want[:, :split])
    np.testing.assert_array_equal(outs[1], want[:, split:])


@pytest.mark.parametrize("split", [0, 3, -1])
def test_frame_split_outside_the_window_is_refused(split):
    layouts = [make_layout("a", (10, 8, 8), (2, 4, 4))]
    samples = np.array([[0, 0, 0]])
    with pytest.raises(ValueError, match="frame_split"):
        plan_batch(layouts, samples, n_frames=3, frame_step=1, tile_hw=(4, 4), frame_split=split)


@settings(max_examples=200, deadline=None)
@given(case=cases(), split=st.booleans())
def test_needed_prefix_ends_at_the_last_element_copied(case, split):
    layouts, samples, n_frames, frame_step, tile_hw, seed = case
    frame_split = n_frames // 2 if split and n_frames > 1 else None
    plan = plan_batch(
        layouts,
        samples,
        n_frames=n_frames,
        frame_step=frame_step,
        tile_hw=tile_hw,
        frame_split=frame_split,
    )
    needed = plan.needed_nbytes(layouts)
    assert len(needed) == len(plan.chunks)
    read = [np.zeros(layouts[c.var].chunk_shape, dtype=bool) for c in plan.chunks]
    for copy in plan.copies:
        read[copy.chunk][copy.src] = True
    for i, chunk in enumerate(plan.chunks):
        itemsize = layouts[chunk.var].dtype.itemsize
        assert needed[i] % itemsize == 0
        flat = read[i].reshape(-1)
        n = needed[i] // itemsize
        assert 0 < n <= flat.size
        assert flat[n - 1], "the prefix ends on an element some copy reads"
        assert not flat[n:].any(), "a copy reads past the prefix"

    # Poisoning every chunk past its prefix changes nothing in the batch.
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 1_000_000, size=lay.shape, dtype=np.int64) for lay in layouts]
    decoded = []
    for i, chunk in enumerate(plan.chunks):
        d = decode(layouts[chunk.var], arrays[chunk.var], chunk.coords)
        d.reshape(-1)[needed[i] // d.itemsize :] = -9
        decoded.append(d)
    outputs = [np.full(shape, -7, dtype=np.int64) for shape in plan.out_shapes]
    for copy in plan.copies:
        outputs[copy.out][copy.dst] = decoded[copy.chunk][copy.src]
    want = expected_batch(layouts, arrays, samples, n_frames, frame_step, tile_hw)
    got = outputs[0] if frame_split is None else np.concatenate(outputs, axis=1)
    np.testing.assert_array_equal(got, want)
