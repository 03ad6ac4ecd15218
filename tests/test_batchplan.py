"""Property tests for ``zarrdali.batch.plan.plan_batch``: simulate the array plan
with numpy, and check it against the object plan it replaced (tests/reference_plan.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_plan
from zarrdali.batch.plan import BatchPlan, channel_offsets, chunk_shape4, plan_batch
from zarrdali.store.open import ArrayLayout

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


def chunks_of(plan: BatchPlan, layouts) -> list[tuple[int, tuple[int, ...]]]:
    """The plan's chunks as (variable, coordinates in the array's own dimensions)."""
    return [
        (int(plan.chunk_var[i]), plan.chunk_coords_of(layouts, i)) for i in range(plan.n_chunks)
    ]


def copies_of(plan: BatchPlan) -> list[tuple[int, tuple, tuple, int]]:
    """The plan's pieces as (chunk row, source index into the 4-D chunk, destination
    index into its output, output)."""
    out = []
    for k in range(plan.n_pieces):
        t, sl, sy, sx = plan.piece_src[k].tolist()
        b, f, c, dy, dx = plan.piece_dst[k].tolist()
        el, ey, ex = plan.piece_extent[k].tolist()
        src = (t, slice(sl, sl + el), slice(sy, sy + ey), slice(sx, sx + ex))
        dst = (b, f, slice(c, c + el), slice(dy, dy + ey), slice(dx, dx + ex))
        out.append((int(plan.piece_chunk[k]), src, dst, int(plan.piece_out[k])))
    return out


def decoded_chunks(plan: BatchPlan, layouts, arrays) -> list[np.ndarray]:
    """Every chunk of the plan decoded, as ``(t, level, y, x)`` arrays."""
    return [
        decode(layouts[v], arrays[v], coords).reshape(chunk_shape4(layouts[v]))
        for v, coords in chunks_of(plan, layouts)
    ]


def simulate(plan: BatchPlan, layouts, arrays, dtype=np.int64):
    decoded = decoded_chunks(plan, layouts, arrays)
    outs = [np.full(shape, -7, dtype=dtype) for shape in plan.out_shapes]
    writes = [np.zeros(shape, dtype=np.int64) for shape in plan.out_shapes]
    for chunk, src, dst, o in copies_of(plan):
        assert 0 <= chunk < len(decoded)
        piece = decoded[chunk][src]
        assert piece.size > 0, (chunk, src, dst)  # no empty copies
        assert outs[o][dst].shape == piece.shape, (chunk, src, dst)
        outs[o][dst] = piece
        writes[o][dst] += 1
    return outs, writes


def canonical(chunks, copies) -> tuple[list, list]:
    """A plan as sorted (chunk, src, dst, out) tuples keyed by chunk identity, so
    plans that list chunks in different orders compare equal."""

    def norm(index) -> tuple:
        return tuple((i.start, i.stop) if isinstance(i, slice) else i for i in index)

    return sorted(chunks), sorted((chunks[c], norm(s), norm(d), o) for c, s, d, o in copies)


def reference_canonical(ref, layouts) -> tuple[list, list]:
    """The object plan in the array plan's terms: 4-D sources (a level axis of one)."""
    chunks = [(c.var, c.coords) for c in ref.chunks]
    copies = []
    for copy in ref.copies:
        src, dst = copy.src, copy.dst
        if len(layouts[ref.chunks[copy.chunk].var].shape) == 3:
            src = (src[0], slice(0, 1), *src[1:])
            dst = (*dst[:2], slice(dst[2], dst[2] + 1), *dst[3:])
        copies.append((copy.chunk, src, dst, copy.out))
    return canonical(chunks, copies)


@settings(max_examples=300, deadline=None)
@given(case=cases(), data=st.data())
def test_array_plan_equals_the_object_plan(case, data):
    layouts, samples, n_frames, frame_step, tile_hw, _ = case
    split = data.draw(st.one_of(st.none(), st.integers(1, max(1, n_frames - 1))))
    if split is not None and n_frames < 2:
        split = None
    kw = dict(n_frames=n_frames, frame_step=frame_step, tile_hw=tile_hw, frame_split=split)
    plan = plan_batch(layouts, samples, **kw)
    ref = reference_plan.plan_batch(layouts, samples, **kw)
    assert plan.out_shape == ref.out_shape and plan.out_shapes == ref.out_shapes
    assert canonical(chunks_of(plan, layouts), copies_of(plan)) == reference_canonical(ref, layouts)
    ref_chunks = [(c.var, c.coords) for c in ref.chunks]
    ref_needed = dict(zip(ref_chunks, ref.needed_nbytes(layouts), strict=True))
    needed = plan.needed_nbytes(layouts).tolist()
    assert dict(zip(chunks_of(plan, layouts), needed, strict=True)) == ref_needed


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

    (out,), (writes,) = simulate(plan, layouts, arrays)
    assert np.all(writes == 1), "every output element is written exactly once"
    want = expected_batch(layouts, arrays, samples, n_frames, frame_step, tile_hw)
    np.testing.assert_array_equal(out, want)

    keys = chunks_of(plan, layouts)
    assert len(set(keys)) == len(keys), "a chunk is listed twice"
    assert set(plan.piece_chunk.tolist()) == set(range(plan.n_chunks)), "unused chunk"
    assert set(keys) == needed_chunks(layouts, samples, n_frames, frame_step, tile_hw)
    assert plan.decoded_nbytes(layouts) == sum(layouts[v].chunk_nbytes for v, _ in keys)
    order, bounds = plan.piece_order
    for i in range(plan.n_chunks):
        assert set(plan.piece_chunk[order[bounds[i] : bounds[i + 1]]].tolist()) == {i}


@settings(max_examples=200, deadline=None)
@given(case=cases())
def test_tiles_locate_every_element(case):
    """The tile table alone (what the GPU gather reads) finds every element's chunk."""
    layouts, samples, n_frames, frame_step, tile_hw, seed = case
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 1_000_000, size=lay.shape, dtype=np.int64) for lay in layouts]
    plan = plan_batch(layouts, samples, n_frames=n_frames, frame_step=frame_step, tile_hw=tile_hw)
    decoded = decoded_chunks(plan, layouts, arrays)
    offsets = channel_offsets(layouts)
    h, w = tile_hw
    out = np.full(plan.out_shape, -7, dtype=np.int64)
    assert len(plan.tile_var) == len(layouts) * len(samples) * n_frames
    for j in range(len(plan.tile_var)):
        v, b = int(plan.tile_var[j]), int(plan.tile_b[j])
        _, cl, cy, cx = chunk_shape4(layouts[v])
        y0, x0 = samples[b, 1], samples[b, 2]
        for level in range(layouts[v].n_levels):
            for y in range(h):
                for x in range(w):
                    li = level // cl
                    yi = (y0 + y) // cy - y0 // cy
                    xi = (x0 + x) // cx - x0 // cx
                    chunk = plan.tile_chunks[j, li, yi, xi]
                    assert chunk >= 0
                    value = decoded[chunk][plan.tile_t[j], level % cl, (y0 + y) % cy, (x0 + x) % cx]
                    out[b, plan.tile_frame[j], offsets[v] + level, y, x] = value
    want = expected_batch(layouts, arrays, samples, n_frames, frame_step, tile_hw)
    np.testing.assert_array_equal(out, want)


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
    assert chunks_of(twice, layouts) == chunks_of(once, layouts)
    assert twice.n_pieces == 2 * once.n_pieces


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

    assert chunks_of(plan, layouts) == chunks_of(whole, layouts), "splitting changes no read"
    b, t, *rest = whole.out_shape
    assert plan.out_shapes == [(b, split, *rest), (b, t - split, *rest)]
    outs, writes = simulate(plan, layouts, arrays)
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
    assert len(needed) == plan.n_chunks
    chunk_vars = plan.chunk_var.tolist()
    read = [np.zeros(chunk_shape4(layouts[v]), dtype=bool) for v in chunk_vars]
    for chunk, src, _, _ in copies_of(plan):
        read[chunk][src] = True
    for i, v in enumerate(chunk_vars):
        itemsize = layouts[v].dtype.itemsize
        assert needed[i] % itemsize == 0
        flat = read[i].reshape(-1)
        n = needed[i] // itemsize
        assert 0 < n <= flat.size
        assert flat[n - 1], "the prefix ends on an element some copy reads"
        assert not flat[n:].any(), "a copy reads past the prefix"

    # Poisoning every chunk past its prefix changes nothing in the batch.
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 1_000_000, size=lay.shape, dtype=np.int64) for lay in layouts]
    decoded = decoded_chunks(plan, layouts, arrays)
    for i, d in enumerate(decoded):
        d.reshape(-1)[needed[i] // d.itemsize :] = -9
    outputs = [np.full(shape, -7, dtype=np.int64) for shape in plan.out_shapes]
    for chunk, src, dst, o in copies_of(plan):
        outputs[o][dst] = decoded[chunk][src]
    want = expected_batch(layouts, arrays, samples, n_frames, frame_step, tile_hw)
    got = outputs[0] if frame_split is None else np.concatenate(outputs, axis=1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "sample", [(8, 0, 0), (-1, 0, 0), (0, 5, 0), (0, 0, 5), (0, -1, 0), (0, 0, -2)]
)
def test_samples_outside_the_store_are_refused(sample):
    """A key past an axis would silently name another chunk (or another variable's)."""
    layouts = [make_layout("a", (10, 8, 8), (2, 4, 4)), make_layout("b", (10, 8, 8), (2, 4, 4))]
    with pytest.raises(ValueError, match=r"does not fit"):
        plan_batch(layouts, np.array([sample]), n_frames=2, frame_step=2, tile_hw=(4, 4))
    plan_batch(layouts, np.array([[6, 4, 4]]), n_frames=2, frame_step=2, tile_hw=(4, 4))
