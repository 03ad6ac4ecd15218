"""NVTX ranges around the GPU engine's stages (``zarrdali.read``, ``zarrdali.decode``,
``zarrdali.gather``, ...), visible in Nsight Systems; a no-op when the optional
``nvtx`` package is not installed (and nearly free when no profiler is attached)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

_nvtx: Any = None
_looked = False


def annotate(name: str) -> AbstractContextManager:
    """``nvtx.annotate(name)``, or a null context without the ``nvtx`` package."""
    global _nvtx, _looked
    if not _looked:
        try:
            import nvtx
        except ImportError:
            nvtx = None
        _nvtx, _looked = nvtx, True
    return _nvtx.annotate(name) if _nvtx is not None else nullcontext()
