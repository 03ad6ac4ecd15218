"""One batch loaded by a backend: planned, read, decoded and assembled.

:func:`load_frames` gives the frames as a pipeline or the user takes them;
:func:`load_into` writes them, finished, into given host arrays (a ring slot).
Both paths call these: the CPU path in its threads and worker processes, the
GPU path from its feed (with the feed's buffer and stream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from zarrdali.batch.backend import batch_dtype
from zarrdali.batch.finish import Finish
from zarrdali.batch.plan import plan_batch
from zarrdali.batch.static import RingStaticTiles
from zarrdali.sampling.epochs import SampleSpec
from zarrdali.store.open import ArrayLayout
from zarrdali.trace import annotate


def load_frames(
    backend: Any,
    layouts: Sequence[ArrayLayout],
    spec: SampleSpec,
    tile_hw: tuple[int, int],
    samples: np.ndarray,
    split: bool = True,
    *,
    out_for: Callable[..., Any] | None = None,
    stream: Any = None,
    before_write: Callable[[], None] | None = None,
    outs: Sequence[np.ndarray] | None = None,
    finish: Finish | None = None,
    rows: np.ndarray | None = None,
    masks: bool = False,
) -> tuple[Any, ...]:
    """The frames of ``samples`` as the pipeline takes them.

    ``(input, target)``, assembled apart so DALI need not slice them, when
    ``split`` and the spec has target steps; else ``(window,)``.

    A device source (the GPU feed) passes ``out_for(shape, *dtypes)``, called
    once the batch is planned, for the buffer(s) to assemble the window in (one
    array per dtype, in one buffer of its ring), and
    ``stream``, on which the backend enqueues all the batch's device work
    without synchronizing, and ``before_write``, which the backend calls just
    before it enqueues the first write of that buffer. With ``finish`` (the GPU
    path's: no flags) the window is float32, finished in the gather, and with
    ``masks`` its uint8 mask is assembled beside it and returned after
    it: ``(window, mask)``. A host source passes
    ``outs`` (one array per frame output, assembled in place) and ``finish``
    (cast, normalize, augment while assembling; see
    :mod:`zarrdali.batch.finish`), and with ``rows`` the rows of ``outs``
    (a whole batch) that ``samples`` (a part of it) go to.
    """
    with annotate("zarrdali.plan"):
        read_plan = plan_batch(
            layouts,
            samples,
            n_frames=spec.n_frames,
            frame_step=spec.frame_step,
            tile_hw=tile_hw,
            frame_split=spec.input_steps if split and spec.target_steps else None,
        )
    device_args: dict[str, Any] = {}
    mask_arrays: tuple[Any, ...] = ()
    if out_for is not None:
        if finish is None:
            device_args["out"] = out_for(read_plan.out_shape, batch_dtype(layouts))
        elif masks:
            device_args["out"], mask = out_for(read_plan.out_shape, np.float32, np.uint8)
            mask_arrays = (mask,)
            finish = replace(finish, mask_arrays=mask_arrays)
        else:
            device_args["out"] = out_for(read_plan.out_shape, np.float32)
    if stream is not None:
        device_args["stream"] = stream
    if before_write is not None:
        device_args["before_write"] = before_write
    if outs is not None:
        device_args["out"] = outs
    if finish is not None:
        device_args["finish"] = finish
    if rows is not None:
        device_args["rows"] = rows
    with annotate("zarrdali.load"):
        frames = backend.load_batch(layouts, read_plan, **device_args)
    return ((frames,) if read_plan.frame_split is None else tuple(frames)) + mask_arrays


def load_into(
    backend: Any,
    layouts: Sequence[ArrayLayout],
    spec: SampleSpec,
    tile_hw: tuple[int, int],
    samples: np.ndarray,
    outs: Sequence[np.ndarray],
    finish: Finish | None,
    *,
    rows: np.ndarray | None = None,
    static: RingStaticTiles | None = None,
) -> None:
    """The CPU path's load of ``samples`` into a ring slot's arrays ``outs`` (see
    :class:`~zarrdali.cpu.feed.BatchLayout`): the frames, finished by ``finish``
    (their masks too, where the slot has them), then the static tiles with the
    same flags. With ``rows``, ``samples`` are that part of the batch whose
    arrays ``outs`` are."""
    n_frames = 1 + bool(spec.target_steps)
    n_static = int(static is not None)
    masks = outs[n_frames + n_static :]
    if masks:  # one per frame output, written where each piece lands
        finish = replace(finish, mask_arrays=tuple(masks))
    load_frames(
        backend,
        layouts,
        spec,
        tile_hw,
        samples,
        outs=outs[:n_frames],
        finish=finish,
        rows=rows,
    )
    if static is not None:
        flags = None if finish is None else finish.flags
        if flags is not None and rows is not None:
            flags = flags[rows]
        static.write(outs[n_frames], samples, flags, rows)
