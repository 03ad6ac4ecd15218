"""The GPU engine: reads, nvCOMP decode, one gather kernel, fed to DALI.

Its stages sit in their own modules, beside the CPU backend's
(:mod:`zarrdali.cpu.backend`):

- :mod:`.describe`: the batch's device work as numpy arrays (staging, decoded
  slots, decode groups, gather tables), computed on the host without a GPU;
- :mod:`.upload`: those tables in one host-to-device copy per batch;
- :mod:`.read`: compressed bytes into device staging: kvikIO, or preads into
  pinned memory and one host-to-device copy; kvikIO's settings and GDS mode;
- :mod:`.decode`: nvCOMP's batched C API through ctypes, one call per codec
  per batch, with a per-batch status check (the Python API as fallback);
- :mod:`.gather`: the launches of the pack and gather kernels, whose CUDA
  sources are in :mod:`.kernels` (compiled by NVRTC on first use);
- :mod:`.cache`: the GPU chunk cache (compressed chunks kept on the device);
- :mod:`.lifetimes`: in-flight buffers released by events, never by the collector;
- :mod:`.backend`: :class:`GpuBackend`, which runs the stages for a batch;
- :mod:`.feed`: :class:`CudaFeed`, side streams and events handing batches to DALI;
- :mod:`.pipeline`: the DALI pipeline (slicing, flips, turns) and its source;
- :mod:`.epoch`: one epoch (feed, pipeline, iterator) and what a backend
  offers to run it (:class:`~zarrdali.gpu.epoch.CudaSourceRole`);
- :mod:`.static`: static fields in device memory.

Importing this package never touches a GPU: CuPy, kvikIO and nvCOMP are
imported inside functions.
"""

from __future__ import annotations

from zarrdali.gpu.backend import (
    GpuBackend,
    TransferCounter,
    gpu_description,
    kvikio_io_mode,
    missing_gpu_requirements,
    warn_host_decode_once,
)
from zarrdali.gpu.read import configure_kvikio, io_details, io_mode

__all__ = [
    "GpuBackend",
    "TransferCounter",
    "configure_kvikio",
    "gpu_description",
    "io_details",
    "io_mode",
    "kvikio_io_mode",
    "missing_gpu_requirements",
    "warn_host_decode_once",
]
