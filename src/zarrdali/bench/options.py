"""The bench's options: their defaults, and a TOML file that may set them.

Shared by ``zarrdali bench`` (bench/cli.py) and the whole-field workload.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = Path(os.environ.get("ZARRDALI_DATA", "sample-data"))


# Defaults of the options a --config file may also set; flags given override both.
DEFAULTS: dict[str, object] = {
    "store": None,
    "data_dir": str(DEFAULT_DATA_DIR),
    "device": None,
    "loaders": None,
    "variables": None,
    "input_steps": 4,
    "target_steps": 2,
    "tile": [128, 128],
    "batch_size": [8, 64],
    "samples": 512,
    "batches": None,
    "epochs": 3,
    "warmup": None,
    "threads": None,
    "seed": 0,
    "step_ms": 0.0,
    "cold": False,
    "storage_options": None,
    "out": "bench-out",
    "all": False,
    "workload": "tiles",  # or "whole-field" (bench/wholefield.py: its own defaults)
    "placement": "both",  # "grid", "chunk-grid" or "both" (see bench/spec.py)
}


def load_config(path: str | Path) -> dict:
    """Options from a TOML file (keys as the flags, ``-`` or ``_``); unknown keys are errors."""
    import tomllib

    with open(path, "rb") as f:
        raw = tomllib.load(f)
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}"
        )
    if isinstance(values.get("tile"), str) and values["tile"].lower() == "none":
        values["tile"] = None  # TOML has no null: tile = "none" asks for the whole field
    return values
