"""A short, file-name-safe id for a dataset from its path or URL."""

from __future__ import annotations

import re


def dataset_id_of(name: str) -> str:
    """``/data/radar_dk.zarr`` -> ``radar_dk``; ``s3://b/era5.zarr/`` -> ``era5``."""
    stem = name.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".zarr", ".nc", ".nc4", ".grib", ".grib2", ".h5"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem) or "dataset"
