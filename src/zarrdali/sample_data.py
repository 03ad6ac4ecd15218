"""The embedded default dataset: an ERA5-like store written in two layouts.

Smooth global fields on a regular lat/lon grid with a daily cycle, travelling
synoptic waves and noise, float32, zstd. ``plain`` has one chunk per (time,
variable) field, as many reanalysis stores do; ``sharded`` has tile-sized inner
chunks grouped into day-long shards, the layout ``zarrdali prepare`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.codecs import ZstdCodec

# name: (long name, units, mean, equator-pole contrast, daily amplitude, wave amplitude, noise)
VARIABLES: dict[str, tuple[str, str, float, float, float, float, float]] = {
    "t2m": ("2 metre temperature", "K", 288.0, 40.0, 6.0, 5.0, 0.8),
    "u10": ("10 metre U wind component", "m s**-1", 0.0, 8.0, 1.5, 6.0, 1.2),
    "v10": ("10 metre V wind component", "m s**-1", 0.0, 2.0, 1.0, 6.0, 1.2),
    "msl": ("Mean sea level pressure", "Pa", 101325.0, 1500.0, 80.0, 1200.0, 40.0),
}
PLAIN, SHARDED = "era5_plain.zarr", "era5_sharded.zarr"
# Static (time-invariant) fields, for ZarrLoader(static=...): name: (long name, units)
STATIC: dict[str, tuple[str, str]] = {
    "lsm": ("Land-sea mask", "(0 - 1)"),
    "orography": ("Surface height above mean sea level", "m"),
}


@dataclass(frozen=True)
class SampleDataSpec:
    n_time: int = 240  # ten days of hourly steps
    n_lat: int = 361  # 0.5 degree global grid, like ERA5 at reduced resolution
    n_lon: int = 720
    variables: tuple[str, ...] = tuple(VARIABLES)
    inner_chunk: tuple[int, int] = (128, 128)  # sharded layout: tile-sized inner chunks
    shard_steps: int = 24  # sharded layout: one day of steps per shard file
    seed: int = 0


def _fields(spec: SampleDataSpec, name: str, t: np.ndarray, rng) -> np.ndarray:
    """Fields of one variable for hours ``t``: [len(t), n_lat, n_lon] float32."""
    _, _, mean, contrast, daily, wave, noise = VARIABLES[name]
    lat = np.deg2rad(np.linspace(90, -90, spec.n_lat))[None, :, None]
    lon = np.deg2rad(np.linspace(0, 360, spec.n_lon, endpoint=False))[None, None, :]
    hours = t[:, None, None].astype(np.float64)
    local_solar = 2 * np.pi * hours / 24.0 + lon  # daily cycle follows the sun
    field = (
        mean
        + contrast * (np.cos(lat) ** 2 - 0.5)
        + daily * np.cos(lat) * np.cos(local_solar - np.pi)
        + wave * np.sin(6 * lon - 2 * np.pi * hours / 120.0) * np.sin(2 * lat) ** 2
    )
    field = field + noise * rng.standard_normal(field.shape)
    # Quantize to 1/64 of a unit (exact in float32) as real archives do; helps zstd.
    return (np.round(field * 64) / 64).astype(np.float32)


def _static_fields(spec: SampleDataSpec) -> dict[str, np.ndarray]:
    """Smooth synthetic continents (1 on land) and their heights, [n_lat, n_lon] float32."""
    lat = np.deg2rad(np.linspace(90, -90, spec.n_lat))[:, None]
    lon = np.deg2rad(np.linspace(0, 360, spec.n_lon, endpoint=False))[None, :]
    relief = np.sin(2 * lon) * np.cos(lat) + 0.6 * np.sin(3 * lat + lon) - 0.2
    land = relief > 0
    height = np.where(land, 2500.0 * relief * np.cos(lat) ** 2, 0.0)
    return {"lsm": land.astype(np.float32), "orography": np.round(height).astype(np.float32)}


def _write_static(group: zarr.Group, spec: SampleDataSpec) -> None:
    for name, values in _static_fields(spec).items():
        long_name, units = STATIC[name]
        arr = group.create_array(
            name,
            shape=values.shape,
            dtype=values.dtype,
            chunks=values.shape,
            compressors=ZstdCodec(level=3),
            dimension_names=["latitude", "longitude"],
        )
        arr[...] = values
        arr.attrs.update({"long_name": long_name, "units": units})


def _write_coords(group: zarr.Group, spec: SampleDataSpec) -> None:
    coords = {
        "time": (
            np.arange(spec.n_time, dtype=np.int64),
            {
                "units": "hours since 2020-01-01 00:00:00",
                "calendar": "proleptic_gregorian",
                "standard_name": "time",
            },
        ),
        "latitude": (
            np.linspace(90, -90, spec.n_lat),
            {"units": "degrees_north", "standard_name": "latitude"},
        ),
        "longitude": (
            np.linspace(0, 360, spec.n_lon, endpoint=False),
            {"units": "degrees_east", "standard_name": "longitude"},
        ),
    }
    for name, (values, attrs) in coords.items():
        arr = group.create_array(
            name,
            shape=values.shape,
            dtype=values.dtype,
            chunks=values.shape,
            dimension_names=[name],
        )
        arr[:] = values
        arr.attrs.update(attrs)


def _create_layout(path: Path, spec: SampleDataSpec, sharded: bool) -> zarr.Group:
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.attrs.update(
        {
            "title": "zarrdali ERA5-like sample data",
            "Conventions": "CF-1.8",
            "layout": "sharded" if sharded else "plain",
        }
    )
    _write_coords(group, spec)
    _write_static(group, spec)
    shape = (spec.n_time, spec.n_lat, spec.n_lon)
    for name in spec.variables:
        long_name, units, *_ = VARIABLES[name]
        if sharded:
            cy, cx = spec.inner_chunk
            shards = (spec.shard_steps, -(-spec.n_lat // cy) * cy, -(-spec.n_lon // cx) * cx)
            kwargs = {"chunks": (1, cy, cx), "shards": shards}
        else:
            kwargs = {"chunks": (1, spec.n_lat, spec.n_lon)}
        arr = group.create_array(
            name,
            shape=shape,
            dtype="float32",
            compressors=ZstdCodec(level=3),
            fill_value=np.float32("nan"),
            dimension_names=["time", "latitude", "longitude"],
            **kwargs,
        )
        arr.attrs.update({"long_name": long_name, "units": units})
    return group


def write_sample_data(
    directory: str | Path, spec: SampleDataSpec | None = None, *, progress: bool = True
) -> tuple[Path, Path]:
    """Write the plain and sharded sample stores into ``directory``; returns their paths."""
    spec = spec or SampleDataSpec()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / PLAIN, directory / SHARDED
    groups = [_create_layout(p, spec, sharded=i == 1) for i, p in enumerate(paths)]
    block = spec.shard_steps  # write whole shards at once
    steps = range(0, spec.n_time, block)
    total = len(steps) * len(spec.variables)
    with tqdm(total=total, desc="sample data", unit="block", disable=not progress) as bar:
        for v, name in enumerate(spec.variables):
            rng = np.random.default_rng([spec.seed, v])
            for t0 in steps:
                t = np.arange(t0, min(t0 + block, spec.n_time))
                data = _fields(spec, name, t, rng)
                for group in groups:
                    group[name][t0 : t0 + len(t)] = data
                bar.update()
    return paths


def sample_data_exists(directory: str | Path) -> bool:
    directory = Path(directory)
    return all((directory / name / "zarr.json").exists() for name in (PLAIN, SHARDED))
