"""``zarrdali prepare SRC DST``: any xarray-readable source to a loader-friendly,
sharded Zarr v3 store, on dask, resumable.

Order of work, chosen so an interruption never leaves a store that looks
complete: (1) everything is validated; (2) metadata, coordinates and attributes
are written (``to_zarr(compute=False)``) together with a progress file
``.zarrdali-prepare.json`` in DST; (3) shard-aligned time regions are written one
after the other with ``dask.array.store``, each recorded in the progress file
once written (a region interrupted midway is simply written again); (4) a
sample of regions is compared with the source; (5) the progress file is removed.

Values are copied as stored and every attribute with them: xarray's Zarr writer
carries ``scale_factor``, ``add_offset``, ``_FillValue``, ``missing_value``,
``units`` and ``calendar`` (of coordinates too) as it writes them for Zarr v3
(``_FillValue`` of a floating variable as a base64 double), and the arrays'
``fill_value`` is the CF missing value, so a chunk never written reads as
missing. ``unpack`` writes instead what xarray decodes (missing values NaN,
scale and offset applied) as float32 (or ``unpack_dtype``).

The verification compares what users see: xarray's decoded views of source and
output (the same missing values, the same values; see :func:`compare_decoded`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from tqdm.auto import tqdm

from zarrdali.errors import ConfigError, StoreNotFoundError, VariableNotFoundError, ZarrDaliError
from zarrdali.io import remote
from zarrdali.prep._dask import connect
from zarrdali.prep.cf_attributes import decode_variable, drop_nonconforming_fills, zarr_fill_value
from zarrdali.prep.layout import Layout, field_step_bytes, plan_layout

log = logging.getLogger(__name__)

PROGRESS_FILE = ".zarrdali-prepare.json"


def open_source(src: str | os.PathLike, storage_options: Mapping | None = None) -> xr.Dataset:
    """Open ``src`` lazily (no dask yet): NetCDF, Zarr v2/v3, GRIB; a path or a URL.

    Stored values, CF attributes as attributes (``mask_and_scale=False``, times
    undecoded): what ``prepare`` copies. A Zarr URL is read with obstore where
    installed (``storage_options`` as for ``ZarrLoader``), else fsspec.
    """
    name = os.fspath(src)
    is_url = "://" in name
    if not is_url and not Path(name).exists():
        raise StoreNotFoundError(f"Source {name!r} does not exist.")
    raw = {"mask_and_scale": False, "decode_times": False, "decode_timedelta": False}
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


def _unpack_dtype(unpack: bool, unpack_dtype: str | np.dtype) -> np.dtype | None:
    if not unpack:
        return None
    try:
        dtype = np.dtype(unpack_dtype)
    except TypeError as err:
        raise ConfigError(f"unpack_dtype {unpack_dtype!r} is not a dtype.") from err
    if dtype.kind != "f":
        raise ConfigError(f"unpack_dtype must be a float dtype (float32, float64), got {dtype}.")
    return dtype


def _for_writing(ds: xr.Dataset, unpack: np.dtype | None) -> xr.Dataset:
    """The dataset ``prepare`` writes, from the raw-opened source.

    Stored values with their CF attributes as attributes, which xarray's Zarr
    writer carries over as they are (the source's storage encoding, its chunks
    and compression, is dropped). With ``unpack``, data variables are decoded
    as xarray decodes them (the attributes decoding consumes are dropped) and
    the floating ones are cast to ``unpack``; coordinates stay as stored.
    """
    out = ds.copy()
    for name, var in out.variables.items():
        var.encoding = {}
        drop_nonconforming_fills(str(name), var)
    if unpack is None:
        return out
    for name in list(out.data_vars):
        decoded = decode_variable(str(name), out[name].variable)
        if decoded.dtype.kind == "f":
            decoded = decoded.astype(unpack)
        out[name] = decoded
    return out


def _fingerprint(src: str, names: list[str], ds: xr.Dataset, layout: Layout) -> str:
    text = json.dumps(
        {
            "src": src,
            "variables": names,
            "shapes": {v: list(ds[v].shape) for v in names},
            "dtypes": {v: str(ds[v].dtype) for v in names},  # unpack or not
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


def decoded_views(source: xr.Dataset, output: xr.Dataset) -> tuple[xr.Dataset, xr.Dataset]:
    """Both raw-opened datasets as ``xarray.open_dataset``/``open_zarr`` show them.

    Times are decoded where xarray can decode the source's (else both stay numbers).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xr.SerializationWarning)
        try:
            return xr.decode_cf(source), xr.decode_cf(output)
        except (ValueError, TypeError, OverflowError):
            kw = {"decode_times": False, "decode_timedelta": False}
            return xr.decode_cf(source, **kw), xr.decode_cf(output, **kw)


def compare_decoded(want: np.ndarray, got: np.ndarray, add_offset: float = 0.0) -> str | None:
    """Why a decoded output differs from the decoded source, or None where it does not.

    The missing values (NaN) must be the same. The values must be equal once the
    source's are cast to the output's dtype (exact for copied values and for
    ``unpack``), except where the two sides decode in different float precisions:
    a source whose ``scale_factor``/``add_offset`` are float32 decodes in float32
    while zarr.json's JSON numbers decode in float64; there they may differ by the
    float32 rounding of ``stored * scale_factor + add_offset``, at most
    ``eps * (2 |value| + |add_offset|)`` of the coarser type (one stored step of
    any sensibly packed variable is far larger).
    """
    if want.shape != got.shape:
        return f"shape {want.shape} != {got.shape}"
    if want.dtype.kind not in "fc" or got.dtype.kind not in "fc":
        if want.dtype.kind in "mM" and got.dtype.kind in "mM":
            want, got = want.astype("datetime64[ns]"), got.astype("datetime64[ns]")
        same = np.array_equal(want, got, equal_nan=want.dtype.kind in "fcmM")
        return None if same else f"{int(np.count_nonzero(want != got))} values differ"
    lost = np.isnan(want) & ~np.isnan(got)
    gained = ~np.isnan(want) & np.isnan(got)
    if lost.any() or gained.any():
        return (
            f"{int(lost.sum())} missing values of the source are valid numbers in the "
            f"output and {int(gained.sum())} valid values are missing"
        )
    valid = ~np.isnan(want)
    a, b = want[valid], got[valid]
    same = a.astype(b.dtype) == b
    if not same.all() and want.dtype != got.dtype:
        coarse = max(want.dtype, got.dtype, key=lambda d: np.finfo(d).eps)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        bound = np.finfo(coarse).eps * (2 * np.abs(b64) + abs(float(add_offset)))
        same |= np.abs(a64 - b64) <= bound
    if same.all():
        return None
    worst = float(np.max(np.abs(a[~same].astype(np.float64) - b[~same].astype(np.float64))))
    return f"{int((~same).sum())} values differ (by up to {worst:.6g})"


def _verify(
    source: xr.Dataset,
    dst: Destination,
    names: list[str],
    time_dim: str,
    n: int,
    seed: int = 0,
) -> int:
    """Compare xarray's decoded views of ``n`` random time steps of every variable,
    of the static variables and of the coordinates; returns the checks made."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # consolidated metadata absent
        output = xr.open_zarr(
            dst.target, consolidated=False, chunks=None, mask_and_scale=False,
            decode_times=False, decode_timedelta=False,
        )  # fmt: skip
    shared = [v for v in output.data_vars if v in source.data_vars]
    src, out = decoded_views(source[shared], output[shared])
    n_time = src.sizes[time_dim]
    rng = np.random.default_rng(seed)
    steps = sorted({0, n_time - 1, *rng.integers(0, n_time, size=max(n - 2, 0)).tolist()})
    checks: list[tuple[str, str, dict[str, int]]] = [
        (v, f"{time_dim}={t}", {time_dim: t}) for v in names for t in (steps[:n] if n else [])
    ]
    checks += [
        (str(v), "everywhere", {})
        for v in out.variables
        if v in out.coords or time_dim not in out[v].dims
    ]
    for v, where, index in checks:
        offset = source[v].attrs.get("add_offset", 0.0)
        want = src[v].transpose(*out[v].dims).isel(index)
        problem = compare_decoded(
            np.asarray(want.values), np.asarray(out[v].isel(index).values),
            np.asarray(offset, dtype=np.float64).ravel()[0],
        )  # fmt: skip
        for attr in ("units", "calendar"):
            if problem is None and src[v].attrs.get(attr) != out[v].attrs.get(attr):
                problem = f"{attr} {src[v].attrs.get(attr)!r} became {out[v].attrs.get(attr)!r}"
        if problem is not None:
            raise ZarrDaliError(
                f"Verification failed: {v!r} ({where}) differs between the source and "
                f"{dst.name!r} as xarray decodes them: {problem}. Re-run with overwrite=True."
            )
    return len(checks)


def verify(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    variables: Sequence[str] | None = None,
    rename: Mapping[str, str] | None = None,
    time_dim: str | None = None,
    steps: int = 4,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    dst_storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Compare a written store with its source as xarray decodes both (what
    ``prepare`` does at its end): ``steps`` time steps of every variable, the
    static variables and the coordinates. Raises :class:`ZarrDaliError` naming the
    variable and what differs; returns the number of comparisons made.
    """
    target = Destination(
        dst, storage_options if dst_storage_options is None else dst_storage_options
    )
    source = open_source(src, storage_options)
    ds, names = _select(source, variables, rename)
    tdim, names = _time_dim(ds, names, time_dim)
    return _verify(ds, target, names, tdim, steps, seed)


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
    unpack_dtype: str | np.dtype = "float32",
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
    interruption). ``unpack`` writes xarray's decoded values (missing values NaN,
    scale and offset applied) as ``unpack_dtype`` instead of the stored ones.
    Returns the destination's path (or URL).
    """
    dst = Destination(dst, storage_options if dst_storage_options is None else dst_storage_options)
    src_name = os.fspath(src)
    out_dtype = _unpack_dtype(unpack, unpack_dtype)
    source = open_source(src, storage_options)
    ds, names = _select(source, variables, rename)
    tdim, names = _time_dim(ds, names, time_dim)
    ds = ds.assign({v: ds[v].transpose(tdim, ...) for v in names})
    ds = _for_writing(ds, out_dtype)
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

    # Variables without a time axis (coordinates, masks) are small: load and write once.
    for name in list(ds.variables):
        if tdim not in ds[name].dims:
            ds[name] = ds[name].load()
    # to_zarr's `encoding` replaces a variable's encoding (it is not merged): the
    # CF attributes stay attributes, which xarray writes as they are.
    encoding: dict[str, dict[str, Any]] = {str(v): {} for v in ds.data_vars}
    for v in names:
        n_lev = ds[v].shape[1] if ds[v].ndim == 4 else None
        encoding[v] = {
            "chunks": layout.chunks(n_lev),
            "shards": layout.shards(n_lev),
            "compressors": layout.compressors(),
        }
    for v, enc in encoding.items():
        fill = zarr_fill_value(ds[v].variable)
        if fill is not None:
            enc["fill_value"] = fill
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
    # (scale_factor, ...), which would re-encode stored values. The values are
    # those xarray's writer would store: no variable carries a CF encoding.
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
    checks = _verify(_select(source, variables, rename)[0], dst, names, tdim, verify)
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
