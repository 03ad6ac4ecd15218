"""A WeatherBench2-layout sample store, at reduced size: the whole-field workload's data.

Global models (GraphCast, FourCastNet, Pangu-style) train on WeatherBench2's
ERA5 stores: pressure-level variables ``(time, level, latitude, longitude)``
with one chunk per time step holding every level of the whole field, surface
variables ``(time, latitude, longitude)`` one field per chunk, 6-hourly,
13 pressure levels, WeatherBench2's variable names. This store has that layout
on WeatherBench2's 1.5-degree grid (121 x 240, poles included) and is written
the way those stores are: with xarray (and dask, a block of steps at a time),
with dimension names, coordinates (times decoded by xarray, levels in hPa) and
CF attributes, zarr-python's default compressor (Zarr v3: zstd).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# WeatherBench2's 13 pressure levels (hPa)
LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
# name: (long name, units, value at 1000 hPa, at 50 hPa, equator-pole contrast, wave, noise)
LEVEL_VARIABLES: dict[str, tuple[str, str, float, float, float, float, float]] = {
    "geopotential": ("Geopotential", "m**2 s**-2", 1000.0, 200000.0, 4000.0, 1500.0, 30.0),
    "temperature": ("Temperature", "K", 288.0, 210.0, 30.0, 4.0, 0.5),
    "u_component_of_wind": ("U component of wind", "m s**-1", 2.0, 25.0, 15.0, 10.0, 1.5),
    "v_component_of_wind": ("V component of wind", "m s**-1", 0.0, 0.0, 3.0, 10.0, 1.5),
    "specific_humidity": ("Specific humidity", "kg kg**-1", 0.010, 3e-6, 0.008, 0.002, 2e-4),
}
SURFACE_VARIABLES: dict[str, tuple[str, str, float, float, float, float, float]] = {
    "2m_temperature": ("2 metre temperature", "K", 288.0, 288.0, 40.0, 5.0, 0.8),
    "10m_u_component_of_wind": ("10 metre U wind component", "m s**-1", 0.0, 0.0, 8.0, 6.0, 1.2),
    "10m_v_component_of_wind": ("10 metre V wind component", "m s**-1", 0.0, 0.0, 2.0, 6.0, 1.2),
    "mean_sea_level_pressure": ("Mean sea level pressure", "Pa", 101325.0, 101325.0, 1500.0,
                                1200.0, 40.0),
}  # fmt: skip
WB2_STORE = "wb2_era5_240x121.zarr"


@dataclass(frozen=True)
class WB2SampleSpec:
    n_time: int = 56  # two weeks of 6-hourly steps
    n_lat: int = 121  # WeatherBench2's 1.5-degree grid, poles included
    n_lon: int = 240
    levels: tuple[int, ...] = LEVELS
    level_variables: tuple[str, ...] = tuple(LEVEL_VARIABLES)
    surface_variables: tuple[str, ...] = tuple(SURFACE_VARIABLES)
    time_block: int = 8  # steps generated and written per dask task
    seed: int = 0

    @property
    def variables(self) -> tuple[str, ...]:
        return self.level_variables + self.surface_variables

    def step_nbytes(self) -> int:
        """Decoded bytes of one time step of every variable (float32)."""
        channels = len(self.level_variables) * len(self.levels) + len(self.surface_variables)
        return channels * self.n_lat * self.n_lon * 4


def _field_block(spec: WB2SampleSpec, name: str, t0: int, n: int, levels: bool) -> np.ndarray:
    """``n`` steps from ``t0`` of one variable: [n, (level,) lat, lon] float32, deterministic."""
    table = LEVEL_VARIABLES if levels else SURFACE_VARIABLES
    _, _, bottom, top, contrast, wave, noise = table[name]
    index = spec.variables.index(name)
    rng = np.random.default_rng([spec.seed, index, t0])
    lev = np.array(spec.levels if levels else [1000], dtype=np.float64)
    # log-pressure interpolation between the 1000 and 50 hPa values
    frac = (np.log(1000.0) - np.log(lev)) / (np.log(1000.0) - np.log(50.0))
    mean = (bottom + (top - bottom) * frac)[None, :, None, None]
    lat = np.deg2rad(np.linspace(-90, 90, spec.n_lat))[None, None, :, None]
    lon = np.deg2rad(np.linspace(0, 360, spec.n_lon, endpoint=False))[None, None, None, :]
    hours = 6.0 * np.arange(t0, t0 + n, dtype=np.float64)[:, None, None, None]
    field = (
        mean
        + contrast * (np.cos(lat) ** 2 - 0.5)
        + wave * np.sin(5 * lon - 2 * np.pi * hours / 96.0) * np.sin(2 * lat) ** 2
        + noise * rng.standard_normal((n, len(lev), spec.n_lat, spec.n_lon))
    )
    # ERA5 comes from GRIB fields packed in 16 bits: 65536 values between each
    # field's minimum and maximum (which is what makes its float32 compress).
    low = field.min(axis=(2, 3), keepdims=True)
    step = (field.max(axis=(2, 3), keepdims=True) - low) / 65535
    field = (low + np.round((field - low) / step) * step).astype(np.float32)
    return field if levels else field[:, 0]


def wb2_dataset(spec: WB2SampleSpec | None = None):
    """The store's contents as a lazy (dask) xarray Dataset, chunked as it is stored."""
    import dask.array as da
    import pandas as pd
    import xarray as xr

    spec = spec or WB2SampleSpec()
    starts = list(range(0, spec.n_time, spec.time_block))
    sizes = [min(spec.time_block, spec.n_time - s) for s in starts]
    data_vars = {}
    for name in spec.variables:
        levels = name in spec.level_variables
        long_name, units, *_ = (LEVEL_VARIABLES if levels else SURFACE_VARIABLES)[name]
        shape = (len(spec.levels),) if levels else ()
        blocks = [
            da.from_delayed(
                _delayed_block(spec, name, s, n, levels),
                shape=(n, *shape, spec.n_lat, spec.n_lon),
                dtype=np.float32,
            )
            for s, n in zip(starts, sizes, strict=True)
        ]
        dims = ("time", "level", "latitude", "longitude") if levels else (
            "time", "latitude", "longitude")  # fmt: skip
        attrs = {"long_name": long_name, "units": units}
        data_vars[name] = (dims, da.concatenate(blocks), attrs)
    coords = {
        "time": ("time", pd.date_range("2020-01-01", periods=spec.n_time, freq="6h"),
                 {"long_name": "time"}),
        "level": ("level", np.array(spec.levels, dtype=np.int64),
                  {"long_name": "pressure_level", "units": "millibar"}),
        "latitude": ("latitude", np.linspace(-90, 90, spec.n_lat),
                     {"long_name": "latitude", "units": "degrees_north"}),
        "longitude": ("longitude", np.linspace(0, 360, spec.n_lon, endpoint=False),
                      {"long_name": "longitude", "units": "degrees_east"}),
    }  # fmt: skip
    return xr.Dataset(data_vars, coords=coords)


def _delayed_block(spec: WB2SampleSpec, name: str, t0: int, n: int, levels: bool):
    import dask

    return dask.delayed(_field_block, pure=True)(spec, name, t0, n, levels)


def write_wb2_sample(
    directory: str | Path, spec: WB2SampleSpec | None = None, *, progress: bool = True
) -> Path:
    """Write the store into ``directory`` (replacing one there); returns its path.

    Chunks as WeatherBench2's: one time step per chunk, every level of the
    whole field in it.
    """
    import contextlib
    import warnings

    spec = spec or WB2SampleSpec()
    path = Path(directory) / WB2_STORE
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = wb2_dataset(spec)
    encoding = {
        name: {"chunks": (1, *ds[name].shape[1:])} for name in spec.variables
    }  # the whole field, all levels, per time step
    bar: contextlib.AbstractContextManager = contextlib.nullcontext()
    if progress:
        from dask.diagnostics import ProgressBar

        bar = ProgressBar()
    with bar, warnings.catch_warnings():
        # xarray consolidates metadata by default, as WeatherBench2's stores are;
        # zarr-python warns that Zarr v3 has no such thing in its specification.
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        ds.to_zarr(path, mode="w", zarr_format=3, encoding=encoding)
    return path


def wb2_sample_exists(directory: str | Path) -> bool:
    return (Path(directory) / WB2_STORE / "zarr.json").exists()
