"""Index files (Parquet and CSV, with their parameters) and what the loader reads.

An index is a table with columns ``t0, y0, x0`` (and optionally ``weight``,
``valid_fraction``, ``aggregate``, ``bin``). Its parameters (store shapes,
variables, window, tile, how it was sampled) are recorded twice: in a sidecar
``<name>.json`` next to the files and, for Parquet, in the file's schema
metadata, so a Parquet file moved alone still carries them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from zarrdali.errors import ConfigError, StoreNotFoundError
from zarrdali.sampling.epochs import SampleSpec, SampleTable
from zarrdali.store.open import ArrayLayout

_META_KEY = b"zarrdali"
_SUFFIXES = (".parquet", ".csv")


def sidecar_path(path: str | os.PathLike) -> Path:
    """``x.samples.parquet`` / ``x.samples.csv`` -> ``x.samples.json``."""
    path = Path(path)
    return path.with_suffix(".json") if path.suffix in _SUFFIXES else Path(f"{path}.json")


def write_index(
    table: pd.DataFrame, params: dict[str, Any], directory: str | os.PathLike, name: str
) -> dict[str, Path]:
    """Write ``{name}.samples.parquet``, ``.csv`` and ``.json``; returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {ext[1:]: directory / f"{name}.samples{ext}" for ext in (*_SUFFIXES, ".json")}
    text = json.dumps(params, indent=2, sort_keys=True)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), _META_KEY: text})
    pq.write_table(arrow, paths["parquet"])
    table.to_csv(paths["csv"], index=False)
    paths["json"].write_text(text + "\n")
    return paths


def read_index(path: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The table and recorded parameters of an index file (Parquet or CSV)."""
    path = Path(path)
    if not path.exists():
        raise StoreNotFoundError(f"Sample index {str(path)!r} does not exist.")
    params: dict[str, Any] | None = None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        arrow = pq.read_table(path)
        meta = arrow.schema.metadata or {}
        if _META_KEY in meta:
            params = json.loads(meta[_META_KEY])
        table = arrow.to_pandas()
    elif path.suffix == ".csv":
        table = pd.read_csv(path)
    else:
        raise ConfigError(f"Sample index {str(path)!r}: expected a .parquet or .csv file.")
    side = sidecar_path(path)
    if params is None and side.exists():
        params = json.loads(side.read_text())
    if params is None:
        raise ConfigError(
            f"Sample index {str(path)!r} has no recorded parameters (no Parquet metadata and "
            f"no {side.name}): rebuild it with `zarrdali index`."
        )
    missing = [c for c in ("t0", "y0", "x0") if c not in table.columns]
    if missing:
        raise ConfigError(f"Sample index {str(path)!r} lacks column(s) {missing}.")
    return table, params


def check_matches(
    params: dict[str, Any],
    source: str,
    variables: Sequence[str],
    shapes: dict[str, Sequence[int]],
    n_frames: int,
    frame_step: int,
) -> None:
    """Refuse an index built for another store shape, variable set or window."""
    if sorted(params["variables"]) != sorted(variables):
        raise ConfigError(
            f"{source} was built for variables {params['variables']} but the loader reads "
            f"{list(variables)}; build an index for these variables."
        )
    for name, shape in shapes.items():
        recorded = params["shapes"].get(name)
        if recorded is None or list(recorded) != list(shape):
            raise ConfigError(
                f"{source} was built for {name!r} of shape {recorded} but the store's is "
                f"{tuple(shape)}: the index does not match this store."
            )
    if (params["n_frames"], params["frame_step"]) != (n_frames, frame_step):
        raise ConfigError(
            f"{source} was built for windows of {params['n_frames']} frames every "
            f"{params['frame_step']} step(s) but the loader asks for {n_frames} frames "
            f"(input_steps + target_steps) every {frame_step}; rebuild the index."
        )


def load_sample_index(
    path: str | os.PathLike, store_name: str, layouts: list[ArrayLayout], spec: SampleSpec
) -> SampleTable:
    """The samples an index file lists, after checking it was built for this store."""
    source = f"Sample index {os.fspath(path)!r}"
    table, params = read_index(path)
    check_matches(
        params,
        source,
        [layout.name for layout in layouts],
        {layout.name: layout.shape for layout in layouts},
        spec.n_frames,
        spec.frame_step,
    )
    if len(table) == 0:
        raise ConfigError(f"{source} lists no samples (for store {store_name!r}).")
    rows = table[["t0", "y0", "x0"]].to_numpy(dtype=np.int64)
    weights = table["weight"].to_numpy(dtype=np.float64) if "weight" in table else None
    return SampleTable(rows, tile_hw=tuple(params["tile"]), weights=weights, source=source)
