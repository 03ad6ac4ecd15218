"""Shared fixtures: synthetic stores under ``tmp_path`` and the ``gpu`` marker."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Read in-process by default: spawning worker processes costs about a
# second per epoch. test_workers.py covers worker processes explicitly.
os.environ.setdefault("ZARRDALI_WORKERS", "0")

sys.path.insert(0, str(Path(__file__).parent))  # make `storefactory` importable

from storefactory import VarSpec, write_store

CORRUPT_INPUT = "corrupt_input"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA GPU with CuPy, kvikIO and nvCOMP (skipped elsewhere)"
    )
    config.addinivalue_line(
        "markers",
        f"{CORRUPT_INPUT}: feeds corrupt chunks to the decode path (on a GPU: undefined "
        "behaviour in nvCOMP, a sticky device fault); runs last, and in a process of its own "
        "in benchmarks/gpu_verify.py",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run ``corrupt_input`` tests after all others (a device fault they might
    cause is sticky for the process); skip ``@pytest.mark.gpu`` tests unless the
    GPU path has all it needs."""
    corrupt = [item for item in items if item.get_closest_marker(CORRUPT_INPUT) is not None]
    if corrupt:
        rest = [item for item in items if item.get_closest_marker(CORRUPT_INPUT) is None]
        items[:] = rest + corrupt
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    from zarrdali.gpu import missing_gpu_requirements

    missing = missing_gpu_requirements()
    if not missing:
        return
    skip = pytest.mark.skip(reason="GPU path unavailable: needs " + "; ".join(missing))
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def make_store(tmp_path: Path) -> Callable[..., Path]:
    """``make_store(*specs, name="store.zarr")`` writes a Zarr v3 group under tmp_path."""
    counter = {"n": 0}

    def make(*specs: VarSpec, name: str | None = None) -> Path:
        counter["n"] += 1
        path = tmp_path / (name or f"store{counter['n']}.zarr")
        return write_store(path, specs)

    return make


@pytest.fixture(scope="session")
def packed_store(tmp_path_factory) -> Path:
    """A CF-packed satellite-style store written by xarray (xarray_stores.py)."""
    import warnings

    from xarray_stores import write_packed_store

    with warnings.catch_warnings():  # offset_only: packed without a _FillValue, on purpose
        warnings.simplefilter("ignore")
        return write_packed_store(tmp_path_factory.mktemp("packed") / "sat.zarr")


@pytest.fixture(scope="session")
def wb2_store(tmp_path_factory) -> Path:
    """A WeatherBench2-layout store written by xarray (xarray_stores.py)."""
    from xarray_stores import write_wb2_store

    return write_wb2_store(tmp_path_factory.mktemp("wb2") / "wb2.zarr")
