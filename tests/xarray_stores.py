"""Stores written by xarray the way users' data comes, and xarray's decoded view
of them as the oracle of a batch.

* :func:`write_packed_store`: a satellite-style CF-packed int16 store
  (``scale_factor``, ``add_offset``, ``_FillValue``, NaN gaps in the source).
* :func:`write_wb2_store`: a WeatherBench2-layout store at reduced size:
  ``(time, level, latitude, longitude)`` variables chunked ``(1, all levels,
  lat, lon)``, surface ``(time, latitude, longitude)`` variables, a level
  coordinate in hPa, a static land-sea mask.
* :func:`write_ordered_store`: the same fields stored in another dimension
  order (``(lat, lon, time)``, ``(time, lon, lat)``), plain or sharded.

:func:`xarray_window` is what a batch must hold: ``xr.open_zarr(store)``
(decoded, as users see it) at a sample's ``(t0, y0, x0)``, ordered ``[T, C,
H, W]`` by dimension names, levels chosen by value, float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

LEVELS_HPA = [50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000]


def _times(n: int) -> np.ndarray:
    return (np.datetime64("2020-01-01T00", "ns") + np.arange(n) * np.timedelta64(6, "h")).astype(
        "datetime64[ns]"
    )


def write_packed_store(path: Path, *, nt: int = 10, ny: int = 20, nx: int = 24) -> Path:
    """``ir`` int16 packed (scale 0.01, offset 250, _FillValue -32768) with NaN
    gaps, chunks (1, 8, 8); ``cloud`` float32 with _FillValue -999 marking gaps
    (no packing); ``count`` uint8 with scale_factor only; ``offset_only`` int32
    with add_offset only; ``radiance`` float32 with scale attributes and
    xarray's NaN _FillValue (unpacked in float32). Chunks of ``ir`` past time 8
    are never written."""
    rng = np.random.default_rng(3)
    ir = (250 + 60 * rng.random((nt, ny, nx))).astype(np.float32)
    ir[1, 2:7, 3:11] = np.nan
    ir[4, 10:, :5] = np.nan
    cloud = rng.random((nt, ny, nx)).astype(np.float32)
    cloud[2, 5:9, 5:9] = np.nan
    count = rng.integers(0, 200, (nt, ny, nx)).astype(np.float32) * 0.5
    offset_only = rng.integers(-1000, 1000, (nt, ny, nx)).astype(np.float64) + 1e5
    # float32 values that keep scale attributes (as a variable does after
    # arithmetic on a packed one): xarray unpacks them in float32
    radiance = (rng.random((nt, ny, nx)) * 3000 - 1500).astype(np.float32)
    radiance[3, :4, :4] = np.nan
    ds = xr.Dataset(
        {
            "ir": (("time", "lat", "lon"), ir),
            "cloud": (("time", "lat", "lon"), cloud),
            "count": (("time", "lat", "lon"), count),
            "offset_only": (("time", "lat", "lon"), offset_only),
            "radiance": (
                ("time", "lat", "lon"),
                radiance,
                {"scale_factor": -1.7250274674967954, "add_offset": 66825.5},
            ),
        },
        coords={
            "time": _times(nt),
            "lat": np.linspace(-10, 10, ny),
            "lon": np.linspace(0, 23, nx),
        },
    )
    encoding = {
        "ir": {
            "dtype": "int16",
            "scale_factor": 0.01,
            "add_offset": 250.0,
            "_FillValue": -32768,
            "chunks": (1, 8, 8),
        },
        "cloud": {"dtype": "float32", "_FillValue": -999.0, "chunks": (2, 10, 12)},
        "count": {"dtype": "uint8", "scale_factor": 0.5, "_FillValue": 255, "chunks": (1, 20, 24)},
        "offset_only": {"dtype": "int32", "add_offset": 1e5, "chunks": (2, 10, 24)},
    }
    ds.to_zarr(path, mode="w", zarr_format=3, encoding=encoding, consolidated=False)
    # gaps of never-written chunks: zarr's fill value (0) is decoded like any value
    for key in sorted((path / "ir" / "c").glob("9/*/*")):
        key.unlink()
    return path


def write_wb2_store(
    path: Path, *, nt: int = 8, ny: int = 16, nx: int = 24, levels: Sequence[int] = LEVELS_HPA
) -> Path:
    """WeatherBench2-like: ``temperature``, ``geopotential``, ``u_component_of_wind``
    ``(time, level, latitude, longitude)`` chunked (1, all levels, lat, lon);
    ``specific_humidity`` chunked one level per chunk; surface ``2m_temperature``
    and ``mean_sea_level_pressure``; a static ``land_sea_mask``; per-level stats."""
    rng = np.random.default_rng(5)
    nl = len(levels)
    shape4, shape3 = (nt, nl, ny, nx), (nt, ny, nx)
    dims4, dims3 = ("time", "level", "latitude", "longitude"), ("time", "latitude", "longitude")
    base = np.asarray(levels, dtype=np.float32)[None, :, None, None]
    data = {
        "temperature": (dims4, (200 + base / 10 + rng.random(shape4)).astype(np.float32)),
        "geopotential": (dims4, (1e5 - base * 50 + 100 * rng.random(shape4)).astype(np.float32)),
        "u_component_of_wind": (dims4, rng.normal(0, 10, shape4).astype(np.float32)),
        "specific_humidity": (dims4, (rng.random(shape4) * 1e-3).astype(np.float32)),
        "2m_temperature": (dims3, (280 + 10 * rng.random(shape3)).astype(np.float32)),
        "mean_sea_level_pressure": (dims3, (1e5 + 500 * rng.random(shape3)).astype(np.float32)),
        "land_sea_mask": (("latitude", "longitude"), (rng.random((ny, nx)) > 0.6).astype("f4")),
    }
    ds = xr.Dataset(
        data,
        coords={
            "time": _times(nt),
            "level": np.asarray(levels, dtype=np.int64),
            "latitude": np.linspace(90, -90, ny),
            "longitude": np.linspace(0, 360, nx, endpoint=False),
        },
    )
    encoding = {name: {"chunks": (1, nl, ny, nx)} for name in data if len(data[name][0]) == 4}
    encoding["specific_humidity"] = {"chunks": (1, 1, ny, nx)}
    for name in ("2m_temperature", "mean_sea_level_pressure"):
        encoding[name] = {"chunks": (1, ny, nx)}
    ds.to_zarr(path, mode="w", zarr_format=3, encoding=encoding, consolidated=False)
    return path


def write_ordered_store(
    path: Path,
    order: Sequence[str],
    *,
    nt: int = 9,
    ny: int = 18,
    nx: int = 22,
    chunks: dict | None = None,
    shards: dict | None = None,
) -> Path:
    """``a`` and ``b`` float32 with ``dims`` in ``order`` (a permutation of
    ``("time", "lat", "lon")``) and ``c`` with a ``level`` axis placed first:
    ``(level, *order)``; chunks and shards by dimension name."""
    rng = np.random.default_rng(11)
    chunks = chunks or {"time": 2, "lat": 8, "lon": 8, "level": 1}
    base = xr.Dataset(
        {
            "a": (("time", "lat", "lon"), rng.random((nt, ny, nx)).astype(np.float32)),
            "b": (("time", "lat", "lon"), rng.normal(size=(nt, ny, nx)).astype(np.float32)),
            "c": (("level", "time", "lat", "lon"), rng.random((3, nt, ny, nx)).astype("f4")),
        },
        coords={"time": _times(nt), "level": [500, 700, 850]},
    )
    ds = base.transpose(*order, ...)
    ds["c"] = base["c"].transpose("level", *order)
    encoding = {}
    for name in ("a", "b", "c"):
        dims = ds[name].dims
        enc = {"chunks": tuple(chunks[d] for d in dims)}
        if shards:
            enc["shards"] = tuple(shards[d] for d in dims)
        encoding[name] = enc
    ds.to_zarr(path, mode="w", zarr_format=3, encoding=encoding, consolidated=False)
    return path


ROLE_NAMES = {
    "time": ("time",),
    "level": ("level",),
    "y": ("lat", "latitude", "y"),
    "x": ("lon", "longitude", "x"),
}


def _role(ds: xr.Dataset, dims: Sequence[str], role: str) -> str | None:
    return next((d for d in dims if d in ROLE_NAMES[role]), None)


def xarray_window(
    ds: xr.Dataset,
    variables: Sequence,
    t0: int,
    y0: int,
    x0: int,
    *,
    n_frames: int,
    tile: tuple[int, int],
    frame_step: int = 1,
) -> np.ndarray:
    """``[T, C, H, W]`` float32 of xarray's (decoded) view: what a batch holds."""
    planes = []
    h, w = tile
    for item in variables:
        name, levels = (item, None) if isinstance(item, str) else item
        da = ds[name]
        t, y, x = (_role(ds, da.dims, r) for r in ("time", "y", "x"))
        lev = _role(ds, da.dims, "level")
        da = da.isel(
            {
                t: slice(t0, t0 + (n_frames - 1) * frame_step + 1, frame_step),
                y: slice(y0, y0 + h),
                x: slice(x0, x0 + w),
            }
        )
        if lev is None:
            planes.append(da.transpose(t, y, x).values[:, None])
            continue
        if levels is not None:
            da = da.sel({lev: list(np.atleast_1d(levels))})
        planes.append(da.transpose(t, lev, y, x).values)
    return np.concatenate(planes, axis=1).astype(np.float32)
