"""``zarrdali stats``: per-variable (and per-level) statistics, in one dask pass.

Results go into each array's attributes under ``"stats"`` (what
``ZarrLoader(normalize="store")`` reads): a scalar per statistic for
``(time, y, x)`` arrays, one value per level for ``(time, level, y, x)`` arrays.
Static fields (``static=``: ``(y, x)`` or ``(level, y, x)`` arrays, the
loader's ``static`` option) get the same, per level for ``(level, y, x)``.

Statistics are of the values the loader serves by default: xarray's
``mask_and_scale`` view (``scale_factor``/``add_offset`` applied), with the
missing values (``_FillValue``, ``missing_value``, NaN) left out and counted by
``nan_fraction``. ``raw=True`` computes them on the stored values instead (for a
loader reading with ``decode_cf=False``), missing values still left out. The
attribute says which: ``"decoded": true`` or ``false``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr

from zarrdali.errors import ConfigError, MetadataError, StoreNotFoundError, VariableNotFoundError
from zarrdali.prep._dask import progress
from zarrdali.prep.cf_attributes import decode_variable, zarr_cf_attrs
from zarrdali.store.open import open_group

# Blocks smaller than this are merged along time: fewer, larger dask tasks.
_TARGET_BLOCK_BYTES = 32 * 2**20


def _open_rw(store: str | os.PathLike) -> zarr.Group:
    name = os.fspath(store)
    if "://" not in name:
        name = os.path.expanduser(name)
        open_group(name)  # read-only first: a missing store, or a file, named with a hint
    try:
        return zarr.open_group(name, mode="r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError) as err:
        raise StoreNotFoundError(f"{name!r} is not a Zarr group: {err}") from err


def data_variables(group: zarr.Group) -> list[str]:
    """Arrays shaped like loader inputs: (time, y, x) or (time, level, y, x)."""
    return sorted(name for name, arr in group.arrays() if arr.ndim in (3, 4))


def _dims(arr: zarr.Array) -> tuple[str, ...]:
    return tuple(arr.metadata.dimension_names or (f"dim_{i}" for i in range(arr.ndim)))


def _as_dask(arr: zarr.Array) -> da.Array:
    """The array as dask, in blocks of whole shards (or chunks), merged along time."""
    block = list(arr.shards or arr.chunks)
    step_bytes = int(np.prod(block[1:])) * arr.dtype.itemsize
    while block[0] < arr.shape[0] and block[0] * step_bytes < _TARGET_BLOCK_BYTES:
        block[0] *= 2
    block[0] = min(block[0], arr.shape[0])
    return da.from_zarr(arr, chunks=tuple(block))


def _values(store: str, name: str, arr: zarr.Array, raw: bool) -> da.Array:
    """The array as xarray decodes it (``raw``: masked but not scaled), lazily."""
    try:
        attrs = zarr_cf_attrs(arr.attrs.asdict(), np.dtype(arr.dtype))
    except ValueError as err:
        raise MetadataError(
            f"{store!r}, array {name!r}: bad missing-value attribute: {err}"
        ) from err
    var = xr.Variable(_dims(arr), _as_dask(arr), attrs)
    return decode_variable(name, var, scale=not raw).data


def _reductions(x: da.Array, quantiles: Sequence[float], level_axis: int | None) -> dict[str, Any]:
    """Lazy statistics of ``x``, reduced over every axis but ``level_axis``."""
    axes = tuple(a for a in range(x.ndim) if a != level_axis)
    xf = x.astype(np.float64)  # float64 accumulation: float32 sums lose digits
    out: dict[str, Any] = {
        "mean": da.nanmean(xf, axis=axes),
        "std": da.nanstd(xf, axis=axes),  # dask combines per-block moments (stable)
        "min": da.nanmin(xf, axis=axes),
        "max": da.nanmax(xf, axis=axes),
        "nan_fraction": da.isnan(xf).mean(axis=axes),
    }
    if quantiles:
        # dask merges per-block percentiles: approximate, but in the same pass.
        if level_axis is None:
            levels = [xf]
        else:
            levels = [da.take(xf, i, axis=level_axis) for i in range(x.shape[level_axis])]
        out["quantiles"] = []
        for level in levels:
            flat = level.ravel()
            flat = flat[~da.isnan(flat)]
            out["quantiles"].append(da.percentile(flat, [100 * q for q in quantiles]))
    return out


def _to_attr(value: np.ndarray, per_level: bool) -> float | list[float]:
    arr = np.asarray(value, dtype=np.float64)
    values = [None if not np.isfinite(v) else float(v) for v in arr.ravel()]
    return values if per_level else values[0]


def compute_stats(
    store: str | os.PathLike,
    variables: Sequence[str] | None = None,
    *,
    quantiles: Sequence[float] = (),
    write: bool = True,
    show_progress: bool = False,
    static: Sequence[str] = (),
    raw: bool = False,
) -> dict[str, dict[str, Any]]:
    """Mean, std, min, max and NaN fraction (and quantiles) of ``variables``.

    Of xarray's decoded values, missing values left out (``raw``: of the stored
    values, missing values left out); see the module docstring. All statistics
    of all variables are computed in one ``dask.compute`` so each chunk is read
    once. With ``write`` they are stored in ``attrs["stats"]``.
    """
    group = _open_rw(store)
    available = data_variables(group)
    variables = list(variables) if variables else available
    missing = [v for v in variables if v not in available]
    if missing:
        raise VariableNotFoundError(
            f"Variable(s) {missing} not found in {os.fspath(store)!r} (or not shaped "
            f"(time, [level,] y, x)). Arrays it holds: {available}."
        )
    time_dims = {_dims(group[v])[0] for v in available if v not in static}
    not_static = [
        v
        for v in static
        if v not in group or group[v].ndim not in (2, 3) or time_dims & set(_dims(group[v]))
    ]
    if not_static:
        raise VariableNotFoundError(
            f"static array(s) {not_static} not found in {os.fspath(store)!r} (or not shaped "
            f"(y, x) or (level, y, x) without a time axis {sorted(time_dims)})."
        )
    bad_q = [q for q in quantiles if not 0.0 <= q <= 1.0]
    if bad_q:
        raise ConfigError(f"quantiles must lie in [0, 1], got {bad_q}.")
    # the level axis: 1 of (time, level, y, x), 0 of a static (level, y, x)
    level_axis = {v: 1 if group[v].ndim == 4 else None for v in variables}
    level_axis.update({v: 0 if group[v].ndim == 3 else None for v in static})
    name = os.fspath(store)
    lazy = {
        v: _reductions(_values(name, v, group[v], raw), list(quantiles), axis)
        for v, axis in level_axis.items()
    }
    with warnings.catch_warnings(), progress(show_progress):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN levels give NaN
        (computed,) = dask.compute(lazy)
    results: dict[str, dict[str, Any]] = {}
    for v, axis in level_axis.items():
        per_level = axis is not None
        stats = {k: _to_attr(computed[v][k], per_level) for k in computed[v] if k != "quantiles"}
        stats["count"] = int(np.prod(group[v].shape))
        stats["decoded"] = not raw  # the loader checks it against its decode_cf
        if quantiles:
            table = np.asarray(computed[v]["quantiles"])  # [level, q]
            stats["quantiles"] = {
                str(q): _to_attr(table[:, j], per_level) for j, q in enumerate(quantiles)
            }
        results[v] = stats
        if write:
            group[v].attrs["stats"] = stats
    return results
