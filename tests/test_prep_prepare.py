"""``zarrdali prepare``: the prepared store equals the source, is read by the loader's
fast path, resumes after an interruption, and refuses bad input before any work."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from test_loader_oracle import check_loader, loader_for
from test_prep_index import precip_field
from test_user_stores import batches_of, check_against_xarray
from zarrdali.errors import ConfigError, StoreNotFoundError, VariableNotFoundError, ZarrDaliError
from zarrdali.prep.prepare import PROGRESS_FILE, prepare, verify
from zarrdali.store.open import load_layouts, open_group

# the checkout's ../shared/data (a worktree's is further up)
DATA_DIR = next(
    (p / "shared" / "data" for p in Path(__file__).parents if (p / "shared" / "data").is_dir()),
    Path(__file__).parents[2] / "shared" / "data",
)
ERA_INTERIM = DATA_DIR / "eraint_uvz.nc"


def require_era_interim() -> None:
    if not ERA_INTERIM.exists():
        pytest.skip(f"real data absent: {ERA_INTERIM}")


def open_raw(path) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if str(path).endswith(".zarr"):
            return xr.open_zarr(
                path, mask_and_scale=False, decode_times=False, consolidated=False
            ).load()
        return xr.open_dataset(path, mask_and_scale=False, decode_times=False).load()


def assert_same(src, dst, rename=None) -> None:
    a = open_raw(src).rename(rename or {})
    b = open_raw(dst)
    b.attrs.pop("zarrdali_prepare")
    for v in a.variables:
        a[v].attrs.pop("_FillValue", None)
        b[v].attrs.pop("_FillValue", None)
    xr.testing.assert_identical(a, b)


def write_precip_nc(path: Path, nt: int = 14) -> Path:
    data = precip_field(nt=nt)
    ds = xr.Dataset(
        {
            "rr": (("time", "y", "x"), data, {"units": "mm h-1", "long_name": "rain rate"}),
            "mask": (("y", "x"), (np.arange(data[0].size) % 3 == 0).reshape(data.shape[1:])),
        },
        coords={
            "time": ("time", np.arange(nt) * 5.0, {"units": "minutes since 2020-01-01"}),
            "y": np.arange(data.shape[1]) * 1000.0,
            "x": np.arange(data.shape[2]) * 1000.0,
        },
        attrs={"title": "synthetic radar"},
    )
    ds["rr"].encoding["_FillValue"] = np.float32(np.nan)
    ds.to_netcdf(path)
    return path


def test_real_data_roundtrip_and_loader(tmp_path):
    require_era_interim()
    dst = prepare(ERA_INTERIM, tmp_path / "era.zarr", tile=(64, 64), progress=False)
    assert_same(ERA_INTERIM, dst)
    assert not (dst / PROGRESS_FILE).exists()
    group, name = open_group(dst)
    month = {"time": "month"}  # ERA-Interim's time axis is named "month"
    layouts = load_layouts(group, name, ["u", "v", "z"], dims=month)
    assert all(layout.fast_path and layout.shard is not None for layout in layouts)
    assert layouts[0].chunk_shape == (1, 3, 64, 64)
    # the loader on the prepared store serves what xarray decodes from the NetCDF
    kw = dict(input_steps=1, target_steps=1, tile=(64, 64), batch_size=8)
    with loader_for(dst, ["u", "z"], dims=month, **kw) as loader:
        batches = batches_of(loader)
    source = decoded(ERA_INTERIM).rename(month="time")
    check_against_xarray(batches, source, ["u", "z"], **kw_of(kw))


def kw_of(kw: dict) -> dict:
    return {k: kw[k] for k in ("input_steps", "target_steps", "tile")}


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_synthetic_precip_roundtrip(tmp_path, codec):
    src = write_precip_nc(tmp_path / "radar.nc")
    dst = prepare(
        src,
        tmp_path / "radar.zarr",
        tile=(8, 12),
        shard_steps=2,
        codec=codec,
        shards_per_region=1,
        progress=False,
    )
    assert_same(src, dst)
    arr = zarr.open_group(dst)["rr"]
    assert arr.chunks == (1, 8, 12) and arr.shards == (2, 24, 36)
    assert np.isnan(arr.fill_value)
    group, name = open_group(dst)
    assert load_layouts(group, name, ["rr"])[0].fast_path
    check_loader(dst, ["rr"], input_steps=2, target_steps=1, tile=(8, 12), epochs=(0,))


def test_zarr_v2_source_with_selection_and_rename(tmp_path):
    src = write_precip_nc(tmp_path / "radar.nc")
    v2 = tmp_path / "radar_v2.zarr"
    xr.open_dataset(src).to_zarr(v2, zarr_format=2, consolidated=True)
    dst = prepare(
        v2,
        tmp_path / "out.zarr",
        variables=["rr"],
        rename={"rr": "precip"},
        tile=(12, 12),
        progress=False,
    )
    out = open_raw(dst)
    assert set(out.data_vars) == {"precip"}
    np.testing.assert_array_equal(out["precip"].values, open_raw(v2)["rr"].values)
    assert out["precip"].attrs["units"] == "mm h-1"


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_interrupted_prepare_resumes_to_the_same_store(tmp_path):
    src = write_precip_nc(tmp_path / "radar.nc", nt=16)
    kw = dict(tile=(8, 12), shard_steps=2, shards_per_region=1, progress=False)
    whole = prepare(src, tmp_path / "whole.zarr", **kw)

    class Killed(Exception):
        pass

    def kill_after_3(i, region):
        if i == 2:
            raise Killed

    dst = tmp_path / "resumed.zarr"
    with pytest.raises(Killed):
        prepare(src, dst, on_region=kill_after_3, **kw)
    assert (dst / PROGRESS_FILE).exists()  # visibly unfinished
    xr.open_zarr(dst, consolidated=False)  # and still a readable store
    with pytest.raises(ConfigError, match="resume"):
        prepare(src, dst, **kw)
    with pytest.raises(ConfigError, match="other settings"):
        prepare(src, dst, resume=True, **{**kw, "tile": (12, 12)})
    written = []
    prepare(src, dst, resume=True, on_region=lambda i, r: written.append(r), **kw)
    assert written == [(t, t + 2) for t in range(6, 16, 2)]  # finished regions not redone
    assert _tree(dst) == _tree(whole)
    with pytest.raises(ConfigError, match="no interrupted prepare"):
        prepare(src, dst, resume=True, **kw)


def test_bad_input_refused_before_work(tmp_path):
    src = write_precip_nc(tmp_path / "radar.nc")
    dst = tmp_path / "out.zarr"
    with pytest.raises(VariableNotFoundError, match="nope"):
        prepare(src, dst, variables=["nope"], progress=False)
    with pytest.raises(ConfigError, match="larger than the field"):
        prepare(src, dst, tile=(25, 8), progress=False)
    with pytest.raises(ConfigError, match="multiple of time_chunk"):
        prepare(src, dst, time_chunk=2, shard_steps=3, progress=False)
    with pytest.raises(ConfigError, match="multiple of the inner chunk"):
        prepare(src, dst, tile=(8, 8), shard=(12, 16), progress=False)
    with pytest.raises(ConfigError, match="lz4"):
        prepare(src, dst, codec="blosc", progress=False)
    with pytest.raises(StoreNotFoundError):
        prepare(tmp_path / "missing.nc", dst, progress=False)
    assert not dst.exists()
    dst.mkdir()
    with pytest.raises(ConfigError, match="exists"):
        prepare(src, dst, progress=False)
    prepare(src, dst, overwrite=True, tile=(8, 8), progress=False)
    assert_same(src, dst)


# --- CF-packed sources: the output decodes as the source decodes -------------------


def write_packed_nc(path: Path, nt: int = 10, scale_type: type = np.float64) -> Path:
    """Satellite-style brightness temperatures packed as int16 (``scale_factor``,
    ``add_offset``, ``_FillValue``) with missing pixels, a float variable whose
    ``_FillValue`` is a number (not NaN), times with units and a calendar, and a
    packed static field."""
    rng = np.random.default_rng(7)
    ny, nx = 18, 32
    tb = 200.0 + 100.0 * rng.random((nt, ny, nx))
    tb[rng.random(tb.shape) < 0.08] = np.nan  # scattered dropouts
    tb[1, :6, :9] = np.nan  # a swath gap
    rr = precip_field(nt=nt, ny=ny, nx=nx)
    grid = ("time", "lat", "lon")
    time_attrs = {"units": "minutes since 2024-07-01", "calendar": "standard"}
    ds = xr.Dataset(
        {
            "tb": (grid, tb, {"units": "K", "long_name": "brightness temperature"}),
            "rr": (grid, rr, {"units": "mm h-1"}),
            "elev": (("lat", "lon"), 3000 * rng.random((ny, nx)), {"units": "m"}),
        },
        coords={
            "time": ("time", np.arange(nt) * 15, time_attrs),
            "lat": ("lat", np.linspace(-9, 9, ny), {"units": "degrees_north"}),
            "lon": ("lon", np.linspace(100, 125, nx), {"units": "degrees_east"}),
        },
    )
    ds["tb"].encoding = {
        "dtype": "int16",
        "scale_factor": scale_type(0.01),
        "add_offset": scale_type(250.0),
        "_FillValue": np.int16(-32768),
    }
    ds["rr"].encoding = {"dtype": "float32", "_FillValue": np.float32(-999.0)}
    ds["elev"].encoding = {"dtype": "int16", "scale_factor": 0.1, "_FillValue": np.int16(-1)}
    ds["time"].encoding = {"dtype": "int32"}
    ds.to_netcdf(path)
    return path


def decoded(path) -> xr.Dataset:
    """What users see: xarray's default decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if str(path).endswith(".zarr"):
            return xr.open_zarr(path, consolidated=False).load()
        return xr.open_dataset(path).load()


def test_packed_source_roundtrip_keeps_missing_values(tmp_path):
    src = write_packed_nc(tmp_path / "tb.nc")
    dst = prepare(src, tmp_path / "tb.zarr", tile=(9, 16), shard_steps=4, progress=False)
    want, got = decoded(src), decoded(dst)
    n_missing = int(np.isnan(want["tb"].values).sum())
    assert n_missing > 100 and int(np.isnan(got["tb"].values).sum()) == n_missing
    for v in ("tb", "rr", "elev"):
        assert got[v].dtype == want[v].dtype  # float64 scale_factor: float64 both sides
        np.testing.assert_array_equal(got[v].values, want[v].values)  # NaNs in the same places
        assert got[v].attrs["units"] == want[v].attrs["units"]
    np.testing.assert_array_equal(got["time"].values, want["time"].values)  # decoded datetimes
    # stored values and CF attributes as they were, the Zarr fill value the CF one
    raw_src, raw_dst = open_raw(src), open_raw(dst)
    np.testing.assert_array_equal(raw_dst["tb"].values, raw_src["tb"].values)
    assert raw_dst["tb"].dtype == np.int16
    group = zarr.open_group(dst, mode="r")
    attrs = group["tb"].attrs.asdict()
    assert (attrs["_FillValue"], attrs["scale_factor"], attrs["add_offset"]) == (
        -32768,
        0.01,
        250.0,
    )
    assert group["tb"].fill_value == -32768  # a chunk never written reads as missing
    assert group["rr"].fill_value == -999.0 and group["elev"].fill_value == -1
    assert group["time"].attrs["calendar"] == "standard"
    assert group["time"].attrs["units"] == "minutes since 2024-07-01"
    # the loader serves float32 of what xarray decodes from the source, NaN where missing
    kw = dict(input_steps=2, target_steps=1, tile=(9, 16), batch_size=4)
    with loader_for(dst, ["tb", "rr"], **kw) as loader:
        batches = batches_of(loader)
    check_against_xarray(batches, want, ["tb", "rr"], **kw_of(kw))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_unpacked_roundtrip(tmp_path, dtype):
    src = write_packed_nc(tmp_path / "tb.nc")
    kw = {} if dtype == "float32" else {"unpack_dtype": dtype}  # float32 by default
    dst = prepare(src, tmp_path / "tb.zarr", tile=(9, 16), unpack=True, progress=False, **kw)
    want, got = decoded(src), decoded(dst)
    group = zarr.open_group(dst, mode="r")
    for v in ("tb", "rr", "elev"):
        assert group[v].dtype == np.dtype(dtype)
        assert not {"scale_factor", "add_offset", "missing_value"} & set(group[v].attrs)
        assert np.isnan(group[v].fill_value)
        # the source's decoded values cast to the output's dtype, NaN where missing
        np.testing.assert_array_equal(got[v].values, want[v].values.astype(dtype))
        assert got[v].attrs["units"] == want[v].attrs["units"]
    assert np.isnan(got["tb"].values).sum() > 100
    assert np.isnan(got["rr"].values).sum() == np.isnan(want["rr"].values).sum() > 0
    np.testing.assert_array_equal(got["time"].values, want["time"].values)
    assert group["time"].attrs["calendar"] == "standard"
    with pytest.raises(ConfigError, match="float dtype"):
        prepare(src, tmp_path / "x.zarr", unpack=True, unpack_dtype="int16", progress=False)


def test_float32_packing_decodes_within_float32_rounding(tmp_path):
    """float32 scale_factor/add_offset: xarray decodes the NetCDF in float32, the
    Zarr copy (JSON numbers) in float64. The stored integers are the same; the
    decoded values differ by float32 rounding, which the verification allows."""
    src = write_packed_nc(tmp_path / "tb.nc", scale_type=np.float32)
    dst = prepare(src, tmp_path / "tb.zarr", tile=(9, 16), progress=False)
    np.testing.assert_array_equal(open_raw(dst)["tb"].values, open_raw(src)["tb"].values)
    want, got = decoded(src)["tb"].values, decoded(dst)["tb"].values
    assert (want.dtype, got.dtype) == (np.float32, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    differ = want != got.astype(np.float32)
    valid = ~np.isnan(want)
    assert differ[valid].any()  # float32 arithmetic rounds differently...
    np.testing.assert_allclose(
        got[valid], want[valid], rtol=2 * np.finfo(np.float32).eps
    )  # ...by an ulp


def test_fill_value_and_missing_value_both_kept(tmp_path):
    src = tmp_path / "mv.nc"
    data = np.arange(2 * 6 * 8, dtype=np.int16).reshape(2, 6, 8)
    data[0, 0, :3] = -1  # _FillValue
    data[1, 2, :2] = 9999  # missing_value
    attrs = {"_FillValue": np.int16(-1), "missing_value": np.int16(9999)}
    xr.Dataset({"v": (("time", "y", "x"), data, attrs)}, coords={"time": [0, 1]}).to_netcdf(src)
    dst = prepare(src, tmp_path / "mv.zarr", tile=(6, 8), progress=False)
    attrs = zarr.open_group(dst, mode="r")["v"].attrs
    assert (attrs["_FillValue"], attrs["missing_value"]) == (-1, 9999)
    got = decoded(dst)["v"].values
    assert np.isnan(got).sum() == 5
    np.testing.assert_array_equal(got, decoded(src)["v"].values)


def test_verification_fails_on_lost_fill_value(tmp_path, monkeypatch):
    """The old corruption: the output lost ``_FillValue``, so the source's missing
    values became valid numbers, and a comparison of stored values passed."""
    import zarrdali.prep.prepare as prep

    src = write_packed_nc(tmp_path / "tb.nc")
    good = prepare(src, tmp_path / "good.zarr", tile=(9, 16), progress=False)
    assert verify(src, good) > 0
    # a store written without _FillValue (stored values unchanged) against its source
    group = zarr.open_group(good, mode="r+")
    del group["tb"].attrs["_FillValue"]
    np.testing.assert_array_equal(open_raw(good)["tb"].values, open_raw(src)["tb"].values)
    with pytest.raises(
        ZarrDaliError, match=r"'tb' \(time=0\).* missing values of the source are valid"
    ):
        verify(src, good)
    # and prepare itself refuses to finish such a store
    for_writing = prep._for_writing

    def lose_fill_values(ds, unpack):
        out = for_writing(ds, unpack)
        out["tb"].attrs.pop("_FillValue")
        return out

    monkeypatch.setattr(prep, "_for_writing", lose_fill_values)
    with pytest.raises(ZarrDaliError, match="Verification failed: 'tb'"):
        prepare(src, tmp_path / "bad.zarr", tile=(9, 16), progress=False)
    assert (tmp_path / "bad.zarr" / PROGRESS_FILE).exists()  # visibly unfinished


def test_verification_catches_changed_values_and_units(tmp_path):
    src = write_packed_nc(tmp_path / "tb.nc")
    dst = prepare(src, tmp_path / "tb.zarr", tile=(9, 16), progress=False)
    group = zarr.open_group(dst, mode="r+")
    group["rr"][0, 3, 4] = group["rr"][0, 3, 4] + 1
    with pytest.raises(ZarrDaliError, match=r"'rr' \(time=0\).*1 values differ"):
        verify(src, dst, variables=["rr"])
    group["rr"][0, 3, 4] = group["rr"][0, 3, 4] - 1
    assert verify(src, dst, variables=["rr"]) > 0
    group["time"].attrs["units"] = "hours since 2024-07-01"
    with pytest.raises(ZarrDaliError, match="'time'"):
        verify(src, dst, variables=["rr"])
