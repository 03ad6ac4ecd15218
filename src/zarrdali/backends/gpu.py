"""GPU backend: kvikIO reads, nvCOMP batched decode, CuPy assembly.

Importing this module never touches a GPU; asking for the backend checks what
the GPU path needs and says what is missing and how to install it.
"""

from __future__ import annotations

import importlib.util
import subprocess

from ..errors import BackendUnavailableError

_INSTALL_HINT = "pip install 'zarrdali[cuda13]' (CUDA 13 driver) or 'zarrdali[cuda12]' (CUDA 12)"


def missing_gpu_requirements() -> list[str]:
    """What the GPU path lacks on this machine (empty: all there)."""
    missing = []
    for module, package in (
        ("cupy", "CuPy"),
        ("kvikio", "kvikIO"),
        ("nvidia.nvcomp", "nvCOMP Python bindings"),
    ):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(f"{package} (module {module!r})")
    if not missing:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() < 1:
                missing.append("a CUDA GPU (none visible)")
        except Exception as err:  # no driver: CUDARuntimeError, ImportError of libcuda
            missing.append(f"a working CUDA driver ({type(err).__name__}: {err})")
    return missing


class GpuBackend:
    device = "cuda"

    def __init__(self, group, store_name: str, num_threads: int | None = None) -> None:
        missing = missing_gpu_requirements()
        if missing:
            raise BackendUnavailableError(
                "device='cuda' needs " + "; ".join(missing) + f". Install with {_INSTALL_HINT}, "
                "or pass device='cpu' to use the CPU path."
            )
        raise BackendUnavailableError(
            "The GPU read/decode path is not part of this release yet; pass device='cpu'."
        )


def gpu_description() -> str:
    """A one-line description of the GPU for benchmark headers ("none" without one)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "none"
    return out.stdout.strip().replace("\n", "; ") or "none"
