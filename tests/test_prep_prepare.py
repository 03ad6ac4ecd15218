"""``zarrdali prepare``: the prepared store equals the source, is read by the loader's
fast path, resumes after an interruption, and refuses bad input before any work."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from test_loader_oracle import check_loader
from test_prep_index import precip_field
from zarrdali.errors import ConfigError, StoreNotFoundError, VariableNotFoundError
from zarrdali.prep.prepare import PROGRESS_FILE, prepare
from zarrdali.store import load_layouts, open_group

DATA_DIR = Path(__file__).parents[2] / "shared" / "data"
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
    layouts = load_layouts(group, name, ["u", "v", "z"])
    assert all(layout.fast_path and layout.shard is not None for layout in layouts)
    assert layouts[0].chunk_shape == (1, 3, 64, 64)
    check_loader(
        dst, ["u", "z"], input_steps=1, target_steps=1, tile=(64, 64), batch_size=8, epochs=(0,)
    )


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
