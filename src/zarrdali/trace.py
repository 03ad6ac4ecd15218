"""NVTX ranges that name the loader's stages on an Nsight Systems timeline.

``with annotate("zarrdali.plan"):`` marks one stage of one batch, in the thread
that runs it: ``zarrdali.plan`` (the batch's read plan, host), ``zarrdali.slot``
(waiting for a free device buffer of the GPU feed's ring), ``zarrdali.load``
(read, decode and assemble; the GPU backend nests ``zarrdali.describe``, ``zarrdali.read``,
``zarrdali.decode``, ``zarrdali.gather`` and ``zarrdali.check`` (the one status
read-back per batch) inside), ``zarrdali.hand_over``
(DALI's callback ordering its copy after the batch). Under
``nsys profile --trace=cuda,nvtx`` the prefetch threads' ranges and their
streams' kernels line up against DALI's and the training loop's.

The ``nvtx`` package (a dependency of DALI) is imported on first use; without
it every range is a no-op. With it but no profiler attached, ``nvtx`` itself
makes each range a no-op (about 0.1 µs).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

# ARGB colours of the stages (nvtx takes ints without matplotlib).
_COLORS = {
    "zarrdali.plan": 0xFF4C72B0,
    "zarrdali.slot": 0xFF8C8C8C,
    "zarrdali.load": 0xFF55A868,
    "zarrdali.describe": 0xFF64B5CD,
    "zarrdali.read": 0xFFDD8452,
    "zarrdali.decode": 0xFFC44E52,
    "zarrdali.gather": 0xFF8172B3,
    "zarrdali.check": 0xFF937860,
    "zarrdali.hand_over": 0xFFCCB974,
}

_ranges: dict[str, Any] = {}
_lock = threading.Lock()
_NO_RANGE = contextlib.nullcontext()


def _make(name: str) -> Any:
    try:
        import nvtx
    except ImportError:  # optional: ranges are only for profiling
        return _NO_RANGE
    return nvtx.annotate(name, color=_COLORS.get(name, 0xFF4C72B0))


def annotate(name: str) -> Any:
    """A reusable context manager: an NVTX range ``name`` (a no-op without ``nvtx``).

    One object per name, made once; entering it from several threads at once is
    fine (NVTX ranges are per thread, the object holds only the attributes).
    """
    ranges = _ranges.get(name)
    if ranges is None:
        with _lock:
            ranges = _ranges.get(name)
            if ranges is None:
                ranges = _ranges[name] = _make(name)
    return ranges
