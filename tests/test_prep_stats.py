"""``zarrdali stats``: statistics equal numpy's on the same data and feed normalize="store"."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from storefactory import VarSpec
from test_loader_oracle import check_loader
from zarrdali.errors import ConfigError, StoreNotFoundError, VariableNotFoundError
from zarrdali.prep.stats import compute_stats

PRECIP = VarSpec(
    "precip",
    shape=(12, 21, 33),
    chunks=(2, 8, 8),
    shards=(4, 16, 16),
    fill_value=float("nan"),
    nan_box=(0, 5, 2, 12, 3, 20),
    seed=3,
)
LEVELS = VarSpec("z", shape=(12, 3, 21, 33), chunks=(3, 3, 8, 8), seed=4)


def _numpy_stats(a: np.ndarray, axes: tuple[int, ...]) -> dict[str, np.ndarray]:
    a = a.astype(np.float64)
    return {
        "mean": np.nanmean(a, axis=axes),
        "std": np.nanstd(a, axis=axes),
        "min": np.nanmin(a, axis=axes),
        "max": np.nanmax(a, axis=axes),
        "nan_fraction": np.isnan(a).mean(axis=axes),
    }


def test_stats_equal_numpy(make_store):
    store = make_store(PRECIP, LEVELS)
    result = compute_stats(store, quantiles=[0.1, 0.5, 0.9])
    group = zarr.open_group(store, mode="r")
    precip = group["precip"][...]
    assert np.isnan(precip).any()  # the NaN box is there
    for name, axes in (("precip", (0, 1, 2)), ("z", (0, 2, 3))):
        data = group[name][...]
        want = _numpy_stats(data, axes)
        stored = group[name].attrs["stats"]
        assert stored == result[name]
        for key, value in want.items():
            np.testing.assert_allclose(stored[key], value, rtol=1e-10, err_msg=f"{name}.{key}")
        per_level = data.ndim == 4
        assert isinstance(stored["mean"], list) == per_level
        # approximate (merged per block), but between min and max and close to numpy's
        for q, got in stored["quantiles"].items():
            exact = np.nanquantile(data.astype(np.float64), float(q), axis=axes)
            spread = np.nanmax(data, axis=axes) - np.nanmin(data, axis=axes)
            np.testing.assert_allclose(got, exact, atol=0.1 * np.max(spread))


def test_stats_real_data(tmp_path):
    """ERA-Interim is CF-packed int16: statistics of the decoded values."""
    from test_prep_prepare import ERA_INTERIM, require_era_interim

    require_era_interim()
    import xarray as xr

    from zarrdali.prep.prepare import prepare

    dst = prepare(ERA_INTERIM, tmp_path / "era.zarr", tile=(64, 64), progress=False)
    result = compute_stats(dst, ["u", "z"])
    src = xr.open_dataset(ERA_INTERIM)
    for name in ("u", "z"):
        want = _numpy_stats(src[name].values, (0, 2, 3))
        for key in ("mean", "std", "min", "max"):
            np.testing.assert_allclose(result[name][key], want[key], rtol=1e-10)
        assert len(result[name]["mean"]) == 3  # one per level
        assert result[name]["decoded"] is True


def write_packed_zarr(path, nt: int = 9, ny: int = 14, nx: int = 22):
    """A CF-packed Zarr v3 store written with xarray as users write one: int16 with
    ``scale_factor``, ``add_offset`` and ``_FillValue``, missing values, a level
    variable packed per the whole array, dimension names and coordinates."""
    import xarray as xr

    rng = np.random.default_rng(11)
    tb = 180.0 + 140.0 * rng.random((nt, ny, nx))
    tb[rng.random(tb.shape) < 0.1] = np.nan
    tb[2, :5, :7] = np.nan
    t = np.stack([200 + 10 * k + 5 * rng.random((nt, ny, nx)) for k in range(3)], axis=1)
    t[0, 1] = np.nan  # level 1 of a whole step missing
    rr = np.where(rng.random((nt, ny, nx)) < 0.2, np.nan, rng.random((nt, ny, nx)))
    ds = xr.Dataset(
        {"tb": (("time", "lat", "lon"), tb, {"units": "K"}),
         "t": (("time", "level", "lat", "lon"), t, {"units": "K"}),
         "rr": (("time", "lat", "lon"), rr.astype(np.float32), {"units": "mm h-1"})},
        coords={"time": np.arange(nt), "level": [850, 500, 250],
                "lat": np.linspace(-6, 6, ny), "lon": np.linspace(0, 21, nx)},
    )  # fmt: skip
    packed = {"dtype": "int16", "scale_factor": 0.005, "add_offset": 250.0, "_FillValue": -32768}
    ds.to_zarr(
        path, zarr_format=3, consolidated=False,
        encoding={"tb": {**packed, "chunks": (2, 7, 11)}, "t": {**packed, "chunks": (1, 3, 7, 11)},
                  "rr": {"_FillValue": np.float32(-999.0)}},  # base64 in zarr.json
    )  # fmt: skip
    return path


def test_stats_of_cf_packed_store_are_of_decoded_values(tmp_path):
    import xarray as xr

    store = write_packed_zarr(tmp_path / "packed.zarr")
    result = compute_stats(store, quantiles=[0.5])
    ds = xr.open_zarr(store, consolidated=False)  # the loader's default view
    raw = xr.open_zarr(store, consolidated=False, mask_and_scale=False)
    group = zarr.open_group(store, mode="r")
    assert (raw["rr"].values == -999).any()
    rr = _numpy_stats(ds["rr"].values, (0, 1, 2))
    for key in ("mean", "min", "nan_fraction"):
        np.testing.assert_allclose(result["rr"][key], rr[key], rtol=1e-10)
    assert result["rr"]["min"] >= 0
    for name, axes in (("tb", (0, 1, 2)), ("t", (0, 2, 3))):
        values = ds[name].values
        assert np.isnan(values).any() and (raw[name].values == -32768).any()
        want = _numpy_stats(values, axes)
        for key, value in want.items():
            np.testing.assert_allclose(
                result[name][key], value, rtol=1e-10, err_msg=f"{name}.{key}"
            )
        assert np.min(result[name]["min"]) > 180  # the fill value -32768 is not data
        assert result[name]["decoded"] is True
        assert group[name].attrs["stats"] == result[name]
        np.testing.assert_allclose(
            result[name]["quantiles"]["0.5"], np.nanmedian(values, axis=axes), atol=5
        )
    assert result["t"]["nan_fraction"][1] > result["t"]["nan_fraction"][0]

    # raw: the stored integers, the fill value still left out
    stored = compute_stats(store, raw=True, write=False)
    for name, axes in (("tb", (0, 1, 2)), ("t", (0, 2, 3))):
        ints = raw[name].values.astype(np.float64)
        ints[ints == -32768] = np.nan
        want = _numpy_stats(ints, axes)
        for key, value in want.items():
            np.testing.assert_allclose(
                stored[name][key], value, rtol=1e-10, err_msg=f"{name}.{key}"
            )
        assert stored[name]["decoded"] is False
    assert group["tb"].attrs["stats"]["decoded"] is True  # write=False left it alone


def test_stats_cli_raw(tmp_path, capsys):
    import json

    from zarrdali.cli import main

    store = write_packed_zarr(tmp_path / "packed.zarr")
    assert main(["stats", str(store), "--variables", "tb", "--raw", "-q"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tb"]["decoded"] is False and printed["tb"]["min"] > -32768
    assert zarr.open_group(store, mode="r")["tb"].attrs["stats"] == printed["tb"]


def test_normalize_store_uses_stats(make_store):
    store = make_store(PRECIP.but(nan_box=None), LEVELS)
    compute_stats(store)
    results = check_loader(store, ["precip", "z"], normalize="store", epochs=(0,))
    assert results[0]


def test_stats_errors(make_store, tmp_path):
    store = make_store(PRECIP)
    with pytest.raises(VariableNotFoundError, match="nope"):
        compute_stats(store, ["nope"])
    with pytest.raises(ConfigError, match="quantiles"):
        compute_stats(store, quantiles=[50])
    with pytest.raises(StoreNotFoundError):
        compute_stats(tmp_path / "missing.zarr")
    assert "stats" not in zarr.open_group(store)["precip"].attrs


def test_static_fields_per_level_and_into_the_loader(make_store):
    from storefactory import add_static
    from test_loader_oracle import loader_for, run_epochs

    store = make_store(PRECIP.but(nan_box=None, fill_value=0), VarSpec("t2", shape=(12, 21, 33)))
    lsm = add_static(store, "lsm", (21, 33))
    oro = add_static(store, "oro", (2, 21, 33), dtype="float64", seed=2)
    result = compute_stats(store, ["precip"], static=["lsm", "oro"])
    assert set(result) == {"precip", "lsm", "oro"}
    for name, data, axes in (("lsm", lsm, (0, 1)), ("oro", oro, (1, 2))):
        want = _numpy_stats(data, axes)
        for key in ("mean", "std", "min", "max"):
            np.testing.assert_allclose(result[name][key], want[key], rtol=1e-10)
    assert isinstance(result["oro"]["mean"], list) and isinstance(result["lsm"]["mean"], float)
    with loader_for(store, ["precip"], static=["oro", "lsm"], normalize="store") as loader:
        batch = run_epochs(loader, [0])[0][0]
    field = np.concatenate([oro, lsm[None]]).astype(np.float32)
    mean = np.array([*result["oro"]["mean"], result["lsm"]["mean"]], np.float32)[:, None, None]
    std = np.array([*result["oro"]["std"], result["lsm"]["std"]], np.float32)[:, None, None]
    normalized = (field - mean) / std
    for i, (_, y0, x0) in enumerate(batch["index"].tolist()):
        np.testing.assert_array_equal(batch["static"][i], normalized[:, y0 : y0 + 8, x0 : x0 + 8])
    with pytest.raises(VariableNotFoundError, match=r"static array\(s\) \['t2'\] .* time axis"):
        compute_stats(store, static=["t2"])
