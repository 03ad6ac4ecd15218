"""Backends that read, decode and assemble batches: ``cpu`` and ``gpu``."""

from __future__ import annotations

from .base import Backend, ChunkDecoder, Locator

__all__ = ["Backend", "ChunkDecoder", "Locator", "make_backend"]


def make_backend(
    device: str,
    group,
    store_name: str,
    num_threads: int | None = None,
    partial_decode: bool = True,
    source=None,
) -> Backend:
    """The backend for ``device`` ("cpu" or "cuda"); GPU imports happen only here.

    ``partial_decode`` is the CPU backend's; nvCOMP decodes whole chunks.
    ``source`` (a :class:`~zarrdali.backends.sources.ByteSource`) is where the
    CPU backend reads bytes from (default: derived from the group's store); the
    GPU backend reads local files itself.
    """
    if device == "cpu":
        from .cpu import CpuBackend

        return CpuBackend(group, store_name, num_threads, partial_decode, source=source)
    if device == "cuda":
        from .gpu import GpuBackend

        return GpuBackend(group, store_name, num_threads)
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
