"""``zarrdali prepare SRC DST``: any xarray-readable source to a loader-friendly,
sharded Zarr v3 store, on dask, resumable.

Order of work, chosen so an interruption never leaves a store that looks
complete: (1) everything is validated; (2) metadata, coordinates and attributes
are written (``to_zarr(compute=False)``) together with a progress file
``.zarrdali-prepare.json`` in DST; (3) shard-aligned time regions are written one
after the other with ``to_zarr(region=...)``, each recorded in the progress file
once written (a region interrupted midway is simply written again); (4) a
sample of regions is compared with the source; (5) the progress file is removed.
Values are copied as stored (no CF masking or scaling), so fill values,
``scale_factor`` and friends keep their meaning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from tqdm.auto import tqdm

from .. import remote
from ..errors import ConfigError, StoreNotFoundError, VariableNotFoundError, ZarrDaliError
from ._dask import connect
from .layout import Layout, field_step_bytes, plan_layout

log = logging.getLogger(__name__)

PROGRESS_FILE = ".zarrdali-prepare.json"


def open_source(
    src: str | os.PathLike, unpack: bool = False, storage_options: Mapping | None = None
) -> xr.Dataset:
    """Open ``src`` lazily (no dask yet): NetCDF, Zarr v2/v3, GRIB; a path or a URL.

    Stored values by default; ``unpack`` applies fill values and scale/offset
    (packed int16 becomes floats, what a model wants to see). A Zarr URL is read
    with obstore where installed (``storage_options`` as for ``ZarrLoader``),
    else fsspec.
    """
    name = os.fspath(src)
    is_url = "://" in name
    if not is_url and not Path(name).exists():
        raise StoreNotFoundError(f"Source {name!r} does not exist.")
    raw = {"mask_and_scale": unpack, "decode_times": False, "decode_timedelta": False}
    local = Path(name)
    is_zarr = name.rstrip("/").endswith(".zarr") or (
        not is_url
        and local.is_dir()
        and any((local / f).exists() for f in ("zarr.json", ".zgroup", ".zmetadata"))
    )
    try:
        if is_zarr:
            target = remote.zarr_store_for(name, storage_options) if is_url else name
            return xr.open_zarr(target, chunks=None, consolidated=None, **raw)
        if is_url:
            import fsspec

            opened = fsspec.open(name, **dict(storage_options or {})).open()
            return xr.open_dataset(opened, engine="h5netcdf", **raw)
        return xr.open_dataset(name, chunks=None, **raw)
    except (OSError, ValueError) as err:
        raise StoreNotFoundError(f"xarray cannot open {name!r}: {err}") from err


def _select(
    ds: xr.Dataset, variables: Sequence[str] | None, rename: Mapping[str, str] | None
) -> tuple[xr.Dataset, list[str]]:
    names = list(variables) if variables else list(ds.data_vars)
    missing = [v for v in names if v not in ds.data_vars]
    if missing:
        raise VariableNotFoundError(
            f"Variable(s) {missing} not in the source. Its variables: {sorted(ds.data_vars)}."
        )
    ds = ds[names]
    rename = dict(rename or {})
    unknown = [k for k in rename if k not in names]
    if unknown:
        raise VariableNotFoundError(f"rename names {unknown}, not among the selected {names}.")
    return ds.rename(rename), [rename.get(v, v) for v in names]


def _time_dim(ds: xr.Dataset, names: list[str], time_dim: str | None) -> tuple[str, list[str]]:
    """The time dim and the variables along it (others, e.g. masks, are static)."""
    if time_dim is None:
        gridded = [v for v in names if ds[v].ndim in (3, 4)]
        if not gridded:
            raise ConfigError(f"No (time, [level,] y, x) variable among {names}.")
        time_dim = "time" if "time" in ds.dims else ds[gridded[0]].dims[0]
    names = [v for v in names if time_dim in ds[v].dims]
    if not names:
        raise ConfigError(f"No selected variable has the time dim {time_dim!r}.")
    for v in names:
        dims = ds[v].dims
        if time_dim not in dims or len(dims) not in (3, 4):
            raise ConfigError(
                f"Variable {v!r} has dims {dims}; prepare writes (time, y, x) or "
                f"(time, level, y, x) with time dim {time_dim!r} (pass time_dim=...)."
            )
    return time_dim, names


def _reset_encodings(ds: xr.Dataset) -> None:
    """Write stored values with the source's attributes, not the source's encoding.

    Raw-opened variables keep ``scale_factor``/``add_offset``/units as attributes
    (so xarray decodes the copy as it decodes the source); the source's encoding
    (its chunks, its compression, the same keys again) must not be re-applied.
    ``_FillValue`` moves from the attributes to the encoding: the Zarr fill value.
    """
    for var in ds.variables.values():
        fill = var.attrs.pop("_FillValue", None)
        var.encoding = {} if fill is None else {"_FillValue": fill}


def _fingerprint(src: str, names: list[str], ds: xr.Dataset, layout: Layout) -> str:
    text = json.dumps(
        {
            "src": src,
            "variables": names,
            "shapes": {v: list(ds[v].shape) for v in names},
            "layout": repr(layout),
        },
        sort_keys=True,
    )
    return hashlib.sha1(text.encode()).hexdigest()


class Destination:
    """Where ``prepare`` writes: a local directory, or a URL (``s3://``, ``gs://``, ...)
    opened as a writable zarr store; the progress record is a file or an object there."""

    def __init__(self, dst: str | os.PathLike, storage_options: Mapping | None = None) -> None:
        self.name = os.fspath(dst)
        self.path: Path | None = None
        self.store: Any = None
        if remote.is_url(self.name):
            self.store = remote.zarr_store_for(self.name, storage_options, read_only=False)
        else:
            self.path = Path(self.name)

    @property
    def target(self) -> Any:
        """What zarr-python and xarray open: the path or the store."""
        return self.path if self.path is not None else self.store

    def _sync(self, coro):
        from zarr.core.sync import sync

        return sync(coro)

    def exists(self) -> bool:
        if self.path is not None:
            return self.path.exists()
        return self._sync(self.store.exists("zarr.json")) or self.load_progress() is not None

    def load_progress(self) -> dict | None:
        if self.path is not None:
            file = self.path / PROGRESS_FILE
            return json.loads(file.read_text()) if file.exists() else None
        from zarr.core.buffer import default_buffer_prototype

        buf = self._sync(self.store.get(PROGRESS_FILE, default_buffer_prototype()))
        return None if buf is None else json.loads(buf.to_bytes())

    def save_progress(self, state: dict[str, Any]) -> None:
        text = json.dumps(state)
        if self.path is not None:
            tmp = self.path / (PROGRESS_FILE + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path / PROGRESS_FILE)  # atomic: never a half-written record
            return
        from zarr.core.buffer import default_buffer_prototype

        buf = default_buffer_prototype().buffer.from_bytes(text.encode())
        self._sync(self.store.set(PROGRESS_FILE, buf))  # object PUTs are atomic

    def remove_progress(self) -> None:
        if self.path is not None:
            (self.path / PROGRESS_FILE).unlink()
        else:
            self._sync(self.store.delete(PROGRESS_FILE))

    def clear(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path)
        else:
            self._sync(self.store.delete_dir(""))


def _regions(n_time: int, shard_steps: int, shards_per_region: int) -> list[tuple[int, int]]:
    step = shard_steps * shards_per_region
    return [(a, min(a + step, n_time)) for a in range(0, n_time, step)]


def _verify(
    src_ds: xr.Dataset, dst: Destination, names: list[str], time_dim: str, n: int, seed: int = 0
) -> int:
    """Compare ``n`` random time steps of every variable with the source; returns checks."""
    group = zarr.open_group(dst.target, mode="r")
    n_time = src_ds.sizes[time_dim]
    rng = np.random.default_rng(seed)
    steps = sorted({0, n_time - 1, *rng.integers(0, n_time, size=max(n - 2, 0)).tolist()})
    checks = 0
    for v in names:
        for t in steps[:n] if n else []:
            want = np.asarray(src_ds[v].isel({time_dim: t}).values)
            got = group[v][t]
            if want.shape != got.shape or not np.array_equal(want, got, equal_nan=True):
                raise ZarrDaliError(
                    f"Verification failed: {v!r} at {time_dim}={t} differs between the "
                    f"source and {dst.name!r}. Re-run with overwrite=True."
                )
            checks += 1
    return checks


def prepare(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    variables: Sequence[str] | None = None,
    rename: Mapping[str, str] | None = None,
    time_dim: str | None = None,
    tile: tuple[int, int] | None = None,
    time_chunk: int = 1,
    shard_steps: int | None = None,
    shard: tuple[int, int] | None = None,
    shard_mb: float = 64.0,
    codec: str = "zstd",
    level: int = 3,
    unpack: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    scheduler: str | None = None,
    shards_per_region: int | None = None,
    verify: int = 4,
    progress: bool = True,
    on_region: Callable[[int, tuple[int, int]], None] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    dst_storage_options: Mapping[str, Any] | None = None,
) -> Path | str:
    """Write ``src`` to ``dst`` as sharded Zarr v3; see the module docstring.

    ``src`` and ``dst`` are paths or URLs (``s3://``, ``gs://``, ...; their
    ``storage_options`` and ``dst_storage_options``, default the same, as for
    ``ZarrLoader``). ``on_region(i, (t_start, t_stop))`` is called after region
    ``i`` is recorded as done (progress hooks, and tests that simulate an
    interruption). Returns the destination's path (or URL).
    """
    dst = Destination(dst, storage_options if dst_storage_options is None else dst_storage_options)
    src_name = os.fspath(src)
    source = open_source(src, unpack, storage_options)
    ds, names = _select(source, variables, rename)
    tdim, names = _time_dim(ds, names, time_dim)
    ds = ds.assign({v: ds[v].transpose(tdim, ...) for v in names})
    n_time = ds.sizes[tdim]
    first = ds[names[0]]
    field = (first.shape[-2], first.shape[-1])
    for v in names[1:]:
        if ds[v].shape[-2:] != field:
            raise ConfigError(f"{v!r} is on a {ds[v].shape[-2:]} grid, {names[0]!r} on {field}.")
    layout = plan_layout(
        n_time,
        field,
        field_step_bytes([ds[v].shape for v in names], [ds[v].dtype for v in names]),
        tile=tile,
        time_chunk=time_chunk,
        shard_steps=shard_steps,
        shard_yx=shard,
        shard_mb=shard_mb,
        codec=codec,
        level=level,
    )
    src_id = src_name if "://" in src_name else os.path.abspath(src_name)
    fingerprint = _fingerprint(src_id, names, ds, layout)
    done = _claim_destination(dst, fingerprint, overwrite, resume)
    client = connect(scheduler)  # None: dask's local threaded scheduler

    _reset_encodings(ds)
    # Variables without a time axis (coordinates, masks) are small: load and write once.
    for name in list(ds.variables):
        if tdim not in ds[name].dims:
            ds[name] = ds[name].load()
    encoding = {}
    for v in names:
        n_lev = ds[v].shape[1] if ds[v].ndim == 4 else None
        encoding[v] = {
            "chunks": layout.chunks(n_lev),
            "shards": layout.shards(n_lev),
            "compressors": layout.compressors(),
        }
    # dask blocks of whole shards in time (whole field in space): each task writes
    # whole shard files, so parallel writes never share a file; memory per task is
    # one shard, whatever the dataset's size.
    # Only the time-dependent variables are dask; the rest, numpy, is written with
    # the metadata.
    lazy = ds.assign(
        {
            v: ds[v].chunk({tdim: layout.shard_steps, **{d: -1 for d in ds[v].dims[1:]}})
            for v in names
        }
    )
    if done is None:
        lazy.to_zarr(
            dst.target,
            mode="w",
            compute=False,
            encoding=encoding,
            zarr_format=3,
            consolidated=False,
        )
        done = []
        dst.save_progress({"fingerprint": fingerprint, "done": done})
    workers = len(client.scheduler_info()["workers"]) if client is not None else os.cpu_count()
    per_region = shards_per_region or max(1, workers or 1)
    regions = _regions(n_time, layout.shard_steps, per_region)
    # Regions are written with dask.array.store into the arrays xarray created:
    # xarray's region mode re-applies the CF encoding read back from the store
    # (scale_factor, ...), which would re-encode stored values.
    group = zarr.open_group(dst.target, mode="r+")
    data = {v: lazy[v].data for v in names}
    todo = [i for i in range(len(regions)) if list(regions[i]) not in done]
    with tqdm(total=len(regions), initial=len(regions) - len(todo), desc="prepare",
              unit="region", disable=not progress) as bar:  # fmt: skip
        for i in todo:
            a, b = regions[i]
            da.store(
                [data[v][a:b] for v in names],
                [group[v] for v in names],
                regions=[(slice(a, b),) for _ in names],
                lock=False,  # blocks are whole shards: no two tasks share a file
            )
            done.append([a, b])
            dst.save_progress({"fingerprint": fingerprint, "done": done})
            bar.update()
            if on_region is not None:
                on_region(i, (a, b))
    checks = _verify(source.rename(dict(rename or {})), dst, names, tdim, verify)
    log.info("prepare: verified %d fields of %s against %s", checks, dst.name, src_name)
    group.attrs["zarrdali_prepare"] = {"source": src_name, "fingerprint": fingerprint}
    dst.remove_progress()
    return dst.path if dst.path is not None else dst.name


def _claim_destination(
    dst: Destination, fingerprint: str, overwrite: bool, resume: bool
) -> list[list[int]] | None:
    """Regions already written (resume), or None for a fresh store; refuses otherwise."""
    if not dst.exists():
        return None
    state = dst.load_progress() if resume else None
    if state is not None:
        if state.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"{dst.name!r} holds an interrupted prepare with other settings (source, "
                f"variables or layout); resume with the same ones, or overwrite=True."
            )
        return state["done"]
    if overwrite:
        dst.clear()
        return None
    if resume:
        raise ConfigError(
            f"{dst.name!r} exists and has no interrupted prepare to resume "
            f"(it is complete or not ours); pass overwrite=True to rewrite it."
        )
    raise ConfigError(
        f"Destination {dst.name!r} exists. Pass resume=True (--resume) to finish an "
        f"interrupted prepare or overwrite=True (--overwrite) to replace it."
    )
