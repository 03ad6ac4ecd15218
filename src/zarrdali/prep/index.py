"""``zarrdali index``: write the tiling index and, from it, the sampling index.

Named as the MLCast design proposes: ``{tiling_id}.samples.*`` with
``tiling_id = f"{dataset_id}.{tile_size}.{n_time_window}"`` and
``{sampling_id}.samples.*`` with ``sampling_id = f"{tiling_id}.{tag}"``, ``tag``
naming the sampling parameters (a short hash unless given).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from zarrdali.errors import ConfigError
from zarrdali.prep.dataset_ids import dataset_id_of
from zarrdali.prep.sample_index import write_index
from zarrdali.prep.sampling import SamplingSpec, sampling_table
from zarrdali.prep.tiling import TilingSpec, tiling_table
from zarrdali.store.open import load_layouts, open_group


@dataclass(frozen=True)
class IndexResult:
    tiling_id: str
    sampling_id: str | None
    tiling: pd.DataFrame
    sampling: pd.DataFrame | None
    paths: dict[str, Path]  # "tiling.parquet", "sampling.csv", ...


def tiling_id_of(dataset_id: str, spec: TilingSpec) -> str:
    h, w = spec.tile
    ident = f"{dataset_id}.{h}x{w}.{spec.n_frames}"
    # only non-default choices lengthen the id, so the common case reads as in the design
    if spec.frame_step != 1:
        ident += f".fs{spec.frame_step}"
    if spec.time_stride != 1:
        ident += f".ts{spec.time_stride}"
    if spec.stride != spec.tile:
        ident += f".st{spec.stride[0]}x{spec.stride[1]}"
    return ident


def sampling_tag(spec: SamplingSpec) -> str:
    text = json.dumps(spec.to_dict(), sort_keys=True)
    return "s" + hashlib.sha1(text.encode()).hexdigest()[:8]


def decoded_arrays(group, layouts) -> list:
    """Each layout's array as xarray decodes it (what the loader serves by
    default: CF-unpacked, missing values NaN), ``(time, [level,] y, x)``, dask."""
    import warnings

    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated metadata, v3
        ds = xr.open_zarr(group.store, group=group.path or None, consolidated=False)
    return [ds[lay.name].transpose(*(lay.dims[axis] for axis in lay.roles)).data for lay in layouts]


def build_index(
    store: str | os.PathLike,
    variables: Sequence[str],
    tiling: TilingSpec,
    *,
    aggregate_variable: str | None = None,
    aggregate: str = "mean",
    sampling: SamplingSpec | None = None,
    out_dir: str | os.PathLike | None = None,
    dataset_id: str | None = None,
    sampling_name: str | None = None,
    show_progress: bool = False,
) -> IndexResult:
    """Compute and write the tiling index (and the sampling index when ``sampling``)."""
    group, store_name = open_group(store)
    variables = list(variables)
    aggregate_variable = aggregate_variable or variables[0]
    all_layouts = load_layouts(group, store_name, [*variables, aggregate_variable], {})
    layouts = all_layouts[: len(variables)]  # the aggregate variable is read, not indexed
    first = layouts[0]
    tiling.origins(first.n_time, *first.grid_shape)  # validate before work
    dataset_id = dataset_id or dataset_id_of(store_name)
    out_dir = Path(out_dir) if out_dir is not None else Path(store_name).parent / "indexes"
    params = {
        "kind": "tiling",
        "store": store_name,
        "dataset_id": dataset_id,
        "variables": variables,
        "shapes": {layout.name: list(layout.shape) for layout in layouts},
        "aggregate": {"variable": aggregate_variable, "how": aggregate},
        **tiling.to_dict(),
    }
    tid = tiling_id_of(dataset_id, tiling)
    params["tiling_id"] = tid
    served = decoded_arrays(group, all_layouts)  # the values the loader serves
    table = tiling_table(served[:-1], served[-1], aggregate, tiling, show_progress)
    paths = {f"tiling.{k}": v for k, v in write_index(table, params, out_dir, tid).items()}
    sampled, sid = None, None
    if sampling is not None:
        sampled, edges = sampling_table(table, sampling)
        sid = f"{tid}.{sampling_name or sampling_tag(sampling)}"
        if "/" in sid:
            raise ConfigError(f"sampling name must not contain '/': {sampling_name!r}.")
        s_params = {
            **params,
            "kind": "sampling",
            "sampling_id": sid,
            "sampling": sampling.to_dict(),
            "bin_edges": edges,
            "rows_before_sampling": len(table),
        }
        written = write_index(sampled, s_params, out_dir, sid)
        paths.update({f"sampling.{k}": v for k, v in written.items()})
    return IndexResult(tid, sid, table, sampled, paths)
