"""Stores as users write them (xarray, CF-packed, other dimension orders, levels)
served as ``xarray.open_zarr`` shows them.

The oracle of every batch is xarray's decoded view of the same store at
``batch["index"]`` (:func:`xarray_stores.xarray_window`): equal NaN positions
and equal float32 values, bit for bit (zarrdali unpacks in float64 as xarray
does, then rounds once). Checked on the CPU path, in-process and in worker
processes, with normalization, ``nan_fill`` and masks, augmentation; the GPU
path's CPU stand-in is checked in ``test_user_stores_gpu.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

import zarrdali
from xarray_stores import LEVELS_HPA, write_ordered_store, xarray_window
from zarrdali import ConfigError
from zarrdali.batch.plan import plan_batch


def open_xarray(store) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_zarr(store, consolidated=False)


def batches_of(loader, epochs=(0,)) -> list[dict]:
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out += [{k: v.numpy().copy() for k, v in b.items()} for b in loader]
    return out


def check_against_xarray(
    batches,
    ds,
    variables,
    *,
    input_steps,
    target_steps,
    tile,
    stats=None,
    nan_fill=None,
    masks=False,
):
    n = 0
    for batch in batches:
        frames = batch["input"]
        if target_steps:
            frames = np.concatenate([frames, batch["target"]], axis=1)
        for i, (t0, y0, x0) in enumerate(batch["index"].tolist()):
            want = xarray_window(
                ds, variables, t0, y0, x0, n_frames=input_steps + target_steps, tile=tile
            )
            valid = ~np.isnan(want)
            if stats is not None:
                mean, std = (np.asarray(s, np.float32)[:, None, None] for s in stats)
                want = (want - mean) / std
            if nan_fill is not None:
                want = np.where(valid, want, np.float32(nan_fill))
            np.testing.assert_array_equal(frames[i], want)
            if masks:
                got = batch["input_mask"][i]
                if target_steps:
                    got = np.concatenate([got, batch["target_mask"][i]])
                np.testing.assert_array_equal(got, valid)
            n += 1
    assert n > 0


# -- CF decoding --------------------------------------------------------------------------
PACKED = ["ir", "cloud", "count", "offset_only", "radiance"]


@pytest.mark.parametrize("workers", [0, 1])
def test_packed_store_is_served_as_xarray_decodes_it(packed_store, workers):
    ds = open_xarray(packed_store)
    assert ds["ir"].dtype == np.float64 and int(ds["ir"].isnull().sum()) > 0
    with zarrdali.ZarrLoader(
        packed_store,
        PACKED,
        input_steps=2,
        target_steps=1,
        tile=(8, 8),
        batch_size=16,
        shuffle=True,
        device="cpu",
        workers=workers,
    ) as loader:
        batches = batches_of(loader, (0, 1))
    check_against_xarray(batches, ds, PACKED, input_steps=2, target_steps=1, tile=(8, 8))
    served = np.concatenate([b["input"] for b in batches])
    assert np.isnan(served).any() and np.nanmax(served[:, :, 0]) > 250  # kelvin, not counts


def test_packed_store_with_normalize_nan_fill_masks_and_augment(packed_store):
    ds = open_xarray(packed_store)
    stats = {
        "ir": (280.0, 20.0),
        "cloud": (0.5, 0.3),
        "count": (50.0, 30.0),
        "offset_only": (1e5, 600.0),
        "radiance": (60000.0, 2000.0),
    }
    with zarrdali.ZarrLoader(
        packed_store,
        PACKED,
        input_steps=2,
        target_steps=1,
        tile=(8, 8),
        batch_size=16,
        shuffle=True,
        device="cpu",
        normalize=stats,
        nan_fill=0.0,
        masks=True,
    ) as loader:
        batches = batches_of(loader)
    check_against_xarray(
        batches,
        ds,
        PACKED,
        input_steps=2,
        target_steps=1,
        tile=(8, 8),
        stats=list(zip(*stats.values(), strict=True)),
        nan_fill=0.0,
        masks=True,
    )


def test_decode_cf_false_serves_stored_values(packed_store):
    import zarr

    group = zarr.open_group(packed_store, mode="r")
    with zarrdali.ZarrLoader(
        packed_store,
        ["ir"],
        input_steps=1,
        tile=(8, 8),
        batch_size=8,
        device="cpu",
        decode_cf=False,
    ) as loader:
        batch = next(iter(loader))
    for i, (t0, y0, x0) in enumerate(batch["index"].tolist()):
        raw = group["ir"][t0, y0 : y0 + 8, x0 : x0 + 8]
        np.testing.assert_array_equal(batch["input"][i, 0, 0].numpy(), raw.astype(np.float32))


def test_unsigned_attribute_reads_the_bits_as_unsigned(tmp_path):
    """``_Unsigned = "true"`` on a signed variable (netCDF-3 bytes): as xarray."""
    data = np.arange(-100, 100, dtype=np.int8)[:96].reshape(1, 8, 12).repeat(3, axis=0)
    ds = xr.Dataset({"b": (("time", "y", "x"), data)}, coords={"time": np.arange(3)})
    ds["b"].attrs.update(_Unsigned="true", scale_factor=2.0)
    ds["b"].encoding.update(_FillValue=-1)
    ds.to_zarr(tmp_path / "u.zarr", zarr_format=3, consolidated=False)
    decoded = open_xarray(tmp_path / "u.zarr")
    assert float(decoded["b"].max()) > 255  # unsigned, scaled
    with zarrdali.ZarrLoader(
        tmp_path / "u.zarr", ["b"], tile=(8, 12), batch_size=3, device="cpu"
    ) as loader:
        batch = next(iter(loader))
    check_against_xarray(
        [{k: v.numpy() for k, v in batch.items()}],
        decoded,
        ["b"],
        input_steps=1,
        target_steps=0,
        tile=(8, 12),
    )


def test_bad_packing_attribute_is_named(tmp_path):
    ds = xr.Dataset({"v": (("time", "y", "x"), np.zeros((2, 4, 4), "f4"))})
    ds["v"].attrs["scale_factor"] = "ten"
    ds.to_zarr(tmp_path / "bad.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(ConfigError, match=r"scale_factor.*'v'.*decode_cf=False"):
        zarrdali.ZarrLoader(tmp_path / "bad.zarr", ["v"], device="cpu")
    with zarrdali.ZarrLoader(tmp_path / "bad.zarr", ["v"], device="cpu", decode_cf=False):
        pass


def test_store_stats_must_be_of_the_values_served(packed_store, tmp_path):
    import shutil

    import zarr

    store = shutil.copytree(packed_store, tmp_path / "s.zarr")
    group = zarr.open_group(store, mode="r+")
    group["ir"].attrs["stats"] = {"mean": -3000.0, "std": 900.0}  # of the stored counts
    group["cloud"].attrs["stats"] = {"mean": 0.5, "std": 0.3, "decoded": True}
    with pytest.raises(ConfigError, match=r"'ir'.*stored values.*zarrdali stats"):
        zarrdali.ZarrLoader(store, ["ir"], device="cpu", normalize="store")
    with pytest.raises(ConfigError, match=r"'cloud'.*CF-decoded.*decode_cf=False"):
        zarrdali.ZarrLoader(store, ["cloud"], device="cpu", normalize="store", decode_cf=False)
    group["ir"].attrs["stats"] = {"mean": 280.0, "std": 20.0, "decoded": True}
    with zarrdali.ZarrLoader(store, ["ir", "cloud"], device="cpu", normalize="store") as loader:
        np.testing.assert_array_equal(loader.stats[0], np.float32([280.0, 0.5]))


# -- dimensions by name ---------------------------------------------------------------------
ORDERS = [("lat", "lon", "time"), ("time", "lon", "lat"), ("lon", "time", "lat")]


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_other_dimension_orders_are_served_by_name(tmp_path, order, sharded):
    shards = {"time": 4, "lat": 16, "lon": 16, "level": 3} if sharded else None
    store = write_ordered_store(tmp_path / "o.zarr", order, shards=shards)
    ds = open_xarray(store)
    variables = ["a", "b", "c"]
    with zarrdali.ZarrLoader(
        store,
        variables,
        input_steps=2,
        target_steps=1,
        tile=(8, 8),
        batch_size=12,
        shuffle=True,
        device="cpu",
        augment=("flip", "rot90"),
    ) as loader:
        assert loader.layouts[0].grid_shape == (18, 22)
        batches = batches_of(loader, (0, 1))
    for batch in batches:  # undo the augmentation: compare the untransformed views
        for i, (tr, fr, fc) in enumerate(batch["augment"].tolist()):
            for key in ("input", "target"):
                x = batch[key][i]
                if fc:
                    x = x[..., ::-1]
                if fr:
                    x = x[..., ::-1, :]
                if tr:
                    x = x.swapaxes(-1, -2)
                batch[key][i] = x
    check_against_xarray(batches, ds, variables, input_steps=2, target_steps=1, tile=(8, 8))


@pytest.mark.parametrize("order", ORDERS[:2], ids=["-".join(o) for o in ORDERS[:2]])
def test_other_orders_in_worker_processes(tmp_path, order):
    store = write_ordered_store(tmp_path / "o.zarr", order)
    ds = open_xarray(store)
    with zarrdali.ZarrLoader(
        store,
        ["a", "c"],
        input_steps=3,
        tile=(6, 10),
        batch_size=8,
        shuffle=True,
        device="cpu",
        workers=2,
    ) as loader:
        batches = batches_of(loader)
    check_against_xarray(batches, ds, ["a", "c"], input_steps=3, target_steps=0, tile=(6, 10))


def test_unknown_dimension_names_are_refused_or_named_by_dims(tmp_path):
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {"v": (("step", "rows", "member"), rng.random((5, 6, 7)).astype("f4"))},
    )
    ds.to_zarr(tmp_path / "u.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(ConfigError, match=r"'v'.*\('step', 'rows', 'member'\).*'step' is none"):
        zarrdali.ZarrLoader(tmp_path / "u.zarr", ["v"], device="cpu")
    with pytest.raises(ConfigError, match=r"dims= names x='lon'"):
        zarrdali.ZarrLoader(
            tmp_path / "u.zarr", ["v"], device="cpu", dims={"time": "step", "x": "lon"}
        )
    with zarrdali.ZarrLoader(
        tmp_path / "u.zarr",
        ["v"],
        device="cpu",
        dims={"time": "step", "x": "member"},
        tile=(3, 4),
        batch_size=4,
    ) as loader:
        batch = next(iter(loader))
    want = ds["v"].transpose("step", "rows", "member").values
    for i, (t0, y0, x0) in enumerate(batch["index"].tolist()):
        np.testing.assert_array_equal(
            batch["input"][i, 0, 0].numpy(), want[t0, y0 : y0 + 3, x0 : x0 + 4]
        )


def test_arrays_without_names_keep_the_positional_rule(tmp_path):
    """No dimension names (or xarray's placeholders): (time, y, x) by position."""
    import zarr

    values = np.random.default_rng(1).random((6, 10, 12)).astype("f4")
    group = zarr.open_group(tmp_path / "p.zarr", mode="w", zarr_format=3)
    group.create_array("p", data=values, chunks=(2, 5, 6))
    group.create_array(
        "q", data=values + 1, chunks=(2, 5, 6), dimension_names=["dim_0", "dim_1", "dim_2"]
    )
    with zarrdali.ZarrLoader(
        tmp_path / "p.zarr", ["p", "q"], tile=(5, 6), batch_size=4, device="cpu"
    ) as loader:
        assert [lay.roles for lay in loader.layouts] == [(0, 1, 2)] * 2
        batch = next(iter(loader))
    t0, y0, x0 = batch["index"][0].tolist()
    window = values[t0, y0 : y0 + 5, x0 : x0 + 6]
    np.testing.assert_array_equal(batch["input"][0, 0].numpy(), np.stack([window, window + 1]))


# -- pressure levels -------------------------------------------------------------------------
WB2_VARIABLES = [
    "2m_temperature",
    ("temperature", [850, 500]),
    ("geopotential", 500),
    ("specific_humidity", [1000, 925, 850, 300]),
    "u_component_of_wind",
    "mean_sea_level_pressure",
]


@pytest.mark.parametrize("workers", [0, 2])
def test_levels_chosen_by_value_in_the_order_asked(wb2_store, workers):
    ds = open_xarray(wb2_store)
    with zarrdali.ZarrLoader(
        wb2_store,
        WB2_VARIABLES,
        input_steps=2,
        target_steps=1,
        tile=(8, 8),
        batch_size=6,
        shuffle=True,
        device="cpu",
        workers=workers,
        static=["land_sea_mask"],
    ) as loader:
        assert loader.channels == [
            "2m_temperature",
            "temperature@850",
            "temperature@500",
            "geopotential@500",
            "specific_humidity@1000",
            "specific_humidity@925",
            "specific_humidity@850",
            "specific_humidity@300",
            *[f"u_component_of_wind@{p}" for p in LEVELS_HPA],
            "mean_sea_level_pressure",
        ]
        assert loader.num_channels == len(loader.channels)
        batches = batches_of(loader, (0, 1))
    check_against_xarray(batches, ds, WB2_VARIABLES, input_steps=2, target_steps=1, tile=(8, 8))
    lsm = ds["land_sea_mask"].values
    for batch in batches:
        for i, (_, y0, x0) in enumerate(batch["index"].tolist()):
            np.testing.assert_array_equal(batch["static"][i, 0], lsm[y0 : y0 + 8, x0 : x0 + 8])


def test_levels_by_index_and_their_names_without_a_coordinate(wb2_store):
    ds = open_xarray(wb2_store)
    variables = [("temperature", {"isel": [-1, 0]}), ("geopotential", {"sel": [1000]})]
    with zarrdali.ZarrLoader(
        wb2_store, variables, tile=(8, 8), batch_size=4, device="cpu"
    ) as loader:
        assert loader.channels == ["temperature@1000", "temperature@50", "geopotential@1000"]
        batches = batches_of(loader)
    by_value = [("temperature", [1000, 50]), ("geopotential", [1000])]
    check_against_xarray(batches, ds, by_value, input_steps=1, target_steps=0, tile=(8, 8))


def test_only_the_chosen_levels_chunks_are_read(wb2_store):
    """``specific_humidity`` holds one level per chunk: 4 of its 13 level chunks
    are read per frame; ``temperature`` (all levels in a chunk) reads its one."""
    with zarrdali.ZarrLoader(
        wb2_store, WB2_VARIABLES, tile=(8, 8), batch_size=2, device="cpu"
    ) as loader:
        layouts = loader.layouts
        samples = np.array([[0, 0, 0], [3, 8, 16]])
        plan = plan_batch(layouts, samples, n_frames=1, frame_step=1, tile_hw=(8, 8))
    q = [lay.name for lay in layouts].index("specific_humidity")
    levels_read = sorted(set(plan.chunk_coords[plan.chunk_var == q][:, 1].tolist()))
    assert levels_read == sorted(LEVELS_HPA.index(p) for p in (1000, 925, 850, 300))
    t = [lay.name for lay in layouts].index("temperature")
    assert set(plan.chunk_coords[plan.chunk_var == t][:, 1].tolist()) == {0}


def test_store_stats_of_chosen_levels(wb2_store, tmp_path):
    import shutil

    import zarr

    store = shutil.copytree(wb2_store, tmp_path / "s.zarr")
    group = zarr.open_group(store, mode="r+")
    means = [float(p) for p in range(len(LEVELS_HPA))]
    group["temperature"].attrs["stats"] = {
        "mean": means,
        "std": [2.0] * len(means),
        "decoded": True,
    }
    group["2m_temperature"].attrs["stats"] = {"mean": 280.0, "std": 10.0, "decoded": True}
    with zarrdali.ZarrLoader(
        store, ["2m_temperature", ("temperature", [850, 50])], device="cpu", normalize="store"
    ) as loader:
        mean, std = loader.stats
    np.testing.assert_array_equal(mean, np.float32([280.0, LEVELS_HPA.index(850), 0.0]))
    np.testing.assert_array_equal(std, np.float32([10.0, 2.0, 2.0]))


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        ([("temperature", [123])], r"level 123 is not in the level coordinate 'level'.*50, 100"),
        ([("temperature", [500, 500])], r"name a level twice"),
        ([("temperature", {"isel": [13]})], r"outside its 13 levels"),
        ([("2m_temperature", [500])], r"has no level axis"),
        ([("temperature", {"index": [1]})], r"\{'sel': values\} or \{'isel': indices\}"),
        ({"temperature": [500]}, r"not a mapping"),
    ],
)
def test_bad_level_choices_are_named(wb2_store, variables, says):
    with pytest.raises(ConfigError, match=says):
        zarrdali.ZarrLoader(wb2_store, variables, device="cpu")


def test_tiling_index_counts_what_xarray_decodes(packed_store, tmp_path):
    """``zarrdali index`` works in the values the loader serves: a packed store's
    fill values are missing data, in any dimension order."""
    from zarrdali.prep.index import build_index
    from zarrdali.prep.tiling import TilingSpec

    ds = open_xarray(packed_store)
    result = build_index(
        packed_store, ["ir"], TilingSpec(n_frames=2, tile=(8, 8)), out_dir=tmp_path / "idx"
    )
    table = result.tiling
    assert (table["valid_fraction"] < 1).any()
    ir = ds["ir"].values
    for t0, y0, x0, fraction in table[["t0", "y0", "x0", "valid_fraction"]].itertuples(index=False):
        window = ir[t0 : t0 + 2, y0 : y0 + 8, x0 : x0 + 8]
        assert fraction == pytest.approx((~np.isnan(window)).mean()), (t0, y0, x0)


# -- zarr-python >= 3.2: scale_offset and cast_value codecs, rectilinear grids ---------------
ZARR_32 = tuple(int(p) for p in __import__("zarr").__version__.split(".")[:2]) >= (3, 2)


def _write_scale_offset_store(path, *, cast: bool, sharded: bool):
    import zarr
    from zarr.codecs import CastValue, ScaleOffset

    rng = np.random.default_rng(2)
    data = (250 + 30 * rng.random((6, 16, 16))).astype("float32")
    data[1, 2:5, 3:9] = np.nan
    filters = [ScaleOffset(offset=250, scale=100)]
    if cast:
        scalar_map = {"encode": [("NaN", -32768)], "decode": [(-32768, "NaN")]}
        filters.append(CastValue(data_type="int16", scalar_map=scalar_map))
    group = zarr.open_group(path, mode="w")
    array = group.create_array(
        "bt",
        shape=data.shape,
        dtype="float32",
        chunks=(1, 8, 8),
        shards=(2, 16, 16) if sharded else None,
        filters=filters,
        fill_value=np.nan,
        dimension_names=["time", "lat", "lon"],
    )
    array[...] = data
    return path


@pytest.mark.skipif(not ZARR_32, reason="scale_offset and cast_value need zarr-python >= 3.2")
@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
@pytest.mark.parametrize("cast", [False, True], ids=["scale_offset", "scale_offset+cast_value"])
def test_zarr_32_value_codecs_are_read_on_the_cpu_path(tmp_path, cast, sharded):
    if cast:
        pytest.importorskip("cast_value_rs")
    store = _write_scale_offset_store(tmp_path / "so.zarr", cast=cast, sharded=sharded)
    ds = open_xarray(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read through zarr-python: said once
        with zarrdali.ZarrLoader(
            store,
            ["bt"],
            input_steps=2,
            tile=(8, 8),
            batch_size=8,
            shuffle=True,
            device="cpu",
            masks=True,
        ) as loader:
            batches = batches_of(loader, (0, 1))
    check_against_xarray(
        batches, ds, ["bt"], input_steps=2, target_steps=0, tile=(8, 8), masks=True
    )
    assert any(np.isnan(b["input"]).any() for b in batches)


@pytest.mark.skipif(ZARR_32, reason="zarr-python < 3.2 does not know the codec")
def test_zarr_32_codecs_on_older_zarr_name_the_version_needed(tmp_path):
    import json

    import zarr

    group = zarr.open_group(tmp_path / "so.zarr", mode="w", zarr_format=3)
    group.create_array(
        "bt",
        shape=(2, 4, 4),
        dtype="float32",
        chunks=(1, 4, 4),
        dimension_names=["time", "lat", "lon"],
    )
    meta_path = tmp_path / "so.zarr" / "bt" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"].insert(0, {"name": "scale_offset", "configuration": {"offset": 1, "scale": 2}})
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        zarrdali.UnknownCodecError,
        match=r"'scale_offset' codec needs zarr-python"
        r" >= 3.2.*'bt'",
    ):
        zarrdali.ZarrLoader(tmp_path / "so.zarr", ["bt"], device="cpu")


def _with_chunk_grid(tmp_path, chunk_grid):
    import json

    import zarr

    values = np.random.default_rng(4).random((6, 10, 12)).astype("f4")
    group = zarr.open_group(tmp_path / "r.zarr", mode="w", zarr_format=3)
    group.create_array("r", data=values, chunks=(2, 5, 6), dimension_names=["time", "y", "x"])
    meta_path = tmp_path / "r.zarr" / "r" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["chunk_grid"] = chunk_grid
    meta_path.write_text(json.dumps(meta))
    return tmp_path / "r.zarr", values


def test_rectilinear_grids_of_one_chunk_size_are_read(tmp_path):
    grid = {
        "name": "rectilinear",
        "configuration": {"kind": "inline", "chunk_shapes": [[[2, 3]], [5, 5], 6]},
    }
    store, values = _with_chunk_grid(tmp_path, grid)
    with zarrdali.ZarrLoader(store, ["r"], tile=(5, 6), batch_size=4, device="cpu") as loader:
        assert loader.layouts[0].chunk_shape == (2, 5, 6)
        batch = next(iter(loader))
    for i, (t0, y0, x0) in enumerate(batch["index"].tolist()):
        np.testing.assert_array_equal(
            batch["input"][i, 0, 0].numpy(), values[t0, y0 : y0 + 5, x0 : x0 + 6]
        )


def test_rectilinear_grids_of_varying_chunks_are_refused(tmp_path):
    grid = {
        "name": "rectilinear",
        "configuration": {"kind": "inline", "chunk_shapes": [[2, 4], [5, 5], [6, 6]]},
    }
    store, _ = _with_chunk_grid(tmp_path, grid)
    with pytest.raises(
        zarrdali.MetadataError,
        match=r"varying sizes along dimension 0 \(\[2, 4\]\).*regular.*array 'r'",
    ):
        zarrdali.ZarrLoader(store, ["r"], device="cpu")
