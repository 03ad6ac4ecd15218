"""The two paths, cpu and gpu: the one place that picks a backend for a device."""

from __future__ import annotations

import logging

from zarrdali.batch.backend import Backend, ChunkDecoder, Locator, PathTraits
from zarrdali.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Backend", "ChunkDecoder", "Locator", "make_backend"]


def make_backend(
    device: str,
    group,
    store_name: str,
    num_threads: int | None = None,
    partial_decode: bool = True,
    source=None,
    memory_map: bool = False,
    **gpu_options,
) -> Backend:
    """The backend for ``device`` ("cpu" or "cuda"); GPU imports happen only here.

    ``partial_decode`` and ``memory_map`` are the CPU backend's: nvCOMP decodes
    whole chunks, and the GPU backend reads local files with kvikIO or preads.
    ``gpu_options`` go to :class:`~zarrdali.gpu.GpuBackend` (``read``,
    ``decode``, ``cache``, ``cache_budget``, ...); ``None`` values are its
    defaults. Given for ``device="cpu"``, they are an error.

    ``source`` (a :class:`~zarrdali.io.sources.ByteSource`) is where the
    backend reads bytes from (default: derived from the group's store); the
    backend owns it and closes it. The GPU backend reads local files itself
    (preads or kvikIO) and remote stores through the source.
    """
    options = {k: v for k, v in gpu_options.items() if v is not None}
    if device == "cpu":
        if options:
            from zarrdali.errors import ConfigError

            raise ConfigError(
                f"{', '.join(f'{k}={v!r}' for k, v in options.items())} "
                f"{'is' if len(options) == 1 else 'are'} for device='cuda' only; "
                f"drop {'it' if len(options) == 1 else 'them'} or pass device='cuda'."
            )
        from zarrdali.cpu.backend import CpuBackend

        return CpuBackend(
            group, store_name, num_threads, partial_decode, source=source, memory_map=memory_map
        )
    if device == "cuda":
        from zarrdali.gpu import GpuBackend

        return GpuBackend(group, store_name, num_threads, source=source, **options)
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def resolve_device(device: str) -> str:
    if device in ("cpu", "cuda"):
        return device
    if device == "auto":
        from zarrdali.gpu import missing_gpu_requirements

        missing = missing_gpu_requirements()
        if missing:
            log.info("zarrdali: using the CPU path (GPU path needs: %s)", "; ".join(missing))
            return "cpu"
        return "cuda"
    raise ConfigError(f"device must be 'cuda', 'cpu' or 'auto', got {device!r}.")


def traits_of(device: str) -> PathTraits:
    """What the path of ``device`` ("cpu" or "cuda") declares, before a backend is made."""
    if device == "cpu":
        from zarrdali.cpu.backend import CPU_TRAITS

        return CPU_TRAITS
    if device == "cuda":
        from zarrdali.gpu.epoch import GPU_TRAITS

        return GPU_TRAITS
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
