"""One line: the Python and the versions of the packages CI's legs differ in."""

from __future__ import annotations

import importlib.metadata as md
import platform

PACKAGES = [
    "zarr",
    "numcodecs",
    "numpy",
    "xarray",
    "dask",
    "pandas",
    "icechunk",
    "obstore",
    "nvidia-dali-cuda130",
    "torch",
    "zarrs",
]


def version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"


print(f"Python {platform.python_version()}", *(f"{p} {version(p)}" for p in PACKAGES), sep=", ")
