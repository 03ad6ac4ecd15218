"""The GPU engine: kvikIO reads, nvCOMP decode, one gather kernel, fed to DALI.

Its stages sit in their own modules, beside the CPU backend's:

- :mod:`.plan`: the batch's device work as numpy arrays (staging, decoded slots,
  decode groups, gather tables), computed on the host without a GPU;
- :mod:`.kernels`: the CUDA sources (pack, gather), compiled by NVRTC on first use;
- :mod:`.backend`: :class:`GpuBackend`, which reads, decodes and gathers a batch;
- :mod:`.feed`: :class:`CudaFeed`, side streams and events handing batches to DALI.

Importing this package never touches a GPU: CuPy, kvikIO and nvCOMP are
imported inside functions.
"""

from __future__ import annotations

from .backend import (
    GpuBackend,
    TransferCounter,
    configure_kvikio,
    gpu_description,
    kvikio_io_mode,
    missing_gpu_requirements,
    warn_host_decode_once,
)

__all__ = [
    "GpuBackend",
    "TransferCounter",
    "configure_kvikio",
    "gpu_description",
    "kvikio_io_mode",
    "missing_gpu_requirements",
    "warn_host_decode_once",
]
