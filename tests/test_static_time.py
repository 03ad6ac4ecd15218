"""Static fields (``batch["static"]``) and timestamps (``batch["time"]``) against
the oracle: zarr-python reading the static arrays and xarray decoding the time
coordinate, at ``batch["index"]``, with and without flips and quarter turns,
plain and sharded stores, in-process and in worker processes; the GPU
path's device cut against the host cut on the CPU stand-in of CuPy; and the
constructor's errors.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

import fakegpu
from storefactory import VarSpec, add_coordinate, add_static
from test_loader_oracle import Oracle, check_batches, loader_for, run_epochs
from zarrdali import ConfigError, VariableNotFoundError
from zarrdali.batch.static import StaticFields
from zarrdali.gpu.pipeline import BatchSource
from zarrdali.gpu.static import DeviceStaticFields
from zarrdali.sampling.augment import apply_augmentations, draw_augmentations
from zarrdali.sampling.times import NAT, decode_times

NT, NY, NX = 20, 21, 33
HOUR = 3_600_000_000_000  # ns
STATS = {
    "a": (1000.0, 500.0),
    "b": ([5.0, -2.0], [3.0, 4.0]),
    "lsm": (0.5, 2.0),
    "oro": (
        [10.0, 20.0],
        [100.0, 50.0],
    ),
}


def make_era_store(make_store, sharded: bool):
    """Two variables (one with levels), a 2-D and a (level, y, x) static field,
    and a CF time coordinate (6-hourly, standard calendar)."""
    shards = (4, 16, 16) if sharded else None
    store = make_store(
        VarSpec("a", shape=(NT, NY, NX), chunks=(2, 8, 8), shards=shards),
        VarSpec(
            "b",
            shape=(NT, 2, NY, NX),
            chunks=(2, 1, 8, 8),
            shards=(4, 2, 16, 16) if sharded else None,
            dtype="int16",
        ),
    )
    add_static(store, "lsm", (NY, NX), shards=(16, 16) if sharded else None)
    add_static(store, "oro", (2, NY, NX), chunks=(1, 8, 8), dtype="float64", seed=3)
    add_coordinate(
        store,
        "time",
        np.arange(NT, dtype=np.int64) * 6 + 3,
        {"units": "hours since 2021-12-31 00:00:00", "calendar": "gregorian"},
    )
    return store


class StaticOracle:
    """zarr-python's static arrays, normalized in float32 as the variables are."""

    def __init__(self, store, names, stats=None) -> None:
        group = zarr.open_group(store, mode="r")
        planes = []
        for name in names:
            values = np.asarray(group[name][...]).astype(np.float32)
            values = values.reshape(-1, NY, NX)
            if stats is not None:
                mean, std = (np.asarray(s, np.float32).reshape(-1, 1, 1) for s in stats[name])
                values = (values - mean) / std
            planes.append(values)
        self.field = np.concatenate(planes)

    def tile(self, y0, x0, hw, flags=None) -> np.ndarray:
        h, w = hw
        t = self.field[:, y0 : y0 + h, x0 : x0 + w]
        return t if flags is None else apply_augmentations(t, flags)


def xarray_times(store) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = xr.open_zarr(store, consolidated=False)
        return ds["time"].values.astype("datetime64[ns]").view(np.int64)


def check_static_and_time(batches, static_oracle, times, *, hw, n_frames, frame_step):
    for k, batch in enumerate(batches):
        b = len(batch["index"])
        assert batch["static"].dtype == np.float32
        assert batch["static"].shape == (b, static_oracle.field.shape[0], *hw)
        assert batch["time"].dtype == np.int64 and batch["time"].shape == (b, n_frames)
        for i, (t0, y0, x0) in enumerate(batch["index"].tolist()):
            flags = batch["augment"][i] if "augment" in batch else None
            where = f"batch {k} sample {i} index {(t0, y0, x0)}"
            want = static_oracle.tile(y0, x0, hw, flags)
            assert batch["static"][i].tobytes() == np.ascontiguousarray(want).tobytes(), where
            frames = t0 + frame_step * np.arange(n_frames)
            np.testing.assert_array_equal(batch["time"][i], times[frames], err_msg=where)


@pytest.mark.parametrize("augment", [(), ("flip", "rot90")], ids=["plain-tiles", "augmented"])
@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_static_tiles_and_times_equal_the_oracle(make_store, sharded, augment):
    store = make_era_store(make_store, sharded)
    kw = dict(
        input_steps=2,
        target_steps=1,
        frame_step=2,
        batch_size=6,
        shuffle=True,
        normalize=STATS,
        augment=augment,
        static=["lsm", "oro"],
    )
    with loader_for(store, ["a", "b"], **kw) as loader:
        batches = run_epochs(loader, [0, 1])
    static_oracle = StaticOracle(store, ["lsm", "oro"], STATS)
    times = xarray_times(store)
    assert times[0] == np.datetime64("2021-12-31T03:00", "ns").view(np.int64)
    seen = set()
    for epoch in (0, 1):
        check_static_and_time(
            batches[epoch], static_oracle, times, hw=(8, 8), n_frames=3, frame_step=2
        )
        if not augment:  # the frames are what they were (augmented ones: test_augment.py)
            mean, std = (
                np.concatenate([np.atleast_1d(np.asarray(STATS[v][i], float)) for v in "ab"])
                for i in (0, 1)
            )
            check_batches(
                batches[epoch],
                Oracle(store, ["a", "b"]),
                input_steps=2,
                target_steps=1,
                tile=(8, 8),
                frame_step=2,
                normalize=(mean, std),
            )
        for batch in batches[epoch]:
            seen |= {tuple(f) for f in batch.get("augment", np.zeros((1, 3), int)).tolist()}
    assert len(seen) == (8 if augment else 1)


@pytest.mark.parametrize("batch_size", [5, 32])  # whole batches per worker; two parts
def test_static_and_time_from_worker_processes(make_store, batch_size):
    store = make_era_store(make_store, sharded=True)
    kw = dict(
        input_steps=2,
        target_steps=1,
        batch_size=batch_size,
        augment=("flip", "rot90"),
        static=["oro", "lsm"],
        workers=2,
    )
    with loader_for(store, ["a"], **kw) as loader:
        batches = run_epochs(loader, [1])[1]
    check_static_and_time(
        batches,
        StaticOracle(store, ["oro", "lsm"]),
        xarray_times(store),
        hw=(8, 8),
        n_frames=3,
        frame_step=1,
    )


def test_store_statistics_and_whole_field_tiles(make_store):
    store = make_era_store(make_store, sharded=False)
    group = zarr.open_group(store, mode="r+")
    stats = {"a": (3.0, 2.0), "lsm": (-1.5, 0.25)}
    for name, (mean, std) in stats.items():
        group[name].attrs["stats"] = {"mean": mean, "std": std}
    with loader_for(store, ["a"], tile=None, normalize="store", static="lsm") as loader:
        batches = run_epochs(loader, [0])[0]
    check_static_and_time(
        batches,
        StaticOracle(store, ["lsm"], stats),
        xarray_times(store),
        hw=(NY, NX),
        n_frames=3,
        frame_step=1,
    )


def test_without_the_options_batches_are_as_before(make_store):
    store = make_era_store(make_store, sharded=False)
    with loader_for(store, ["a"], time=False) as loader:
        batch = run_epochs(loader, [0])[0][0]
    assert set(batch) == {"input", "target", "index"}
    plain = make_store(VarSpec("a", shape=(NT, NY, NX)))  # no time coordinate
    with loader_for(plain, ["a"]) as loader:
        assert set(run_epochs(loader, [0])[0][0]) == {"input", "target", "index"}


# -- timestamps: CF decoding -------------------------------------------------------------
def test_cf_times_decode_as_xarray_does():
    values = np.array([0, 6, 30, 8766], dtype=np.int32)
    attrs = {"units": "hours since 1999-12-31 18:00", "calendar": "proleptic_gregorian"}
    got = decode_times(values, attrs, "t")
    want = xr.decode_cf(xr.Dataset({"t": ("t", values, attrs)}))["t"].values
    np.testing.assert_array_equal(got, want.astype("datetime64[ns]").view(np.int64))
    assert got[1] == np.datetime64("2000-01-01T00:00", "ns").view(np.int64)


def test_noleap_calendar_counts_in_its_own_calendar():
    # 30 years of 365 days from 1970 to 2000 in the noleap calendar
    got = decode_times(
        np.array([0, 59.5]), {"units": "days since 2000-01-01", "calendar": "noleap"}, "t"
    )
    day = 24 * HOUR
    np.testing.assert_array_equal(got, [30 * 365 * day, 30 * 365 * day + 59 * day + 12 * HOUR])


def test_raw_values_without_units_and_fill_values_as_nat():
    np.testing.assert_array_equal(decode_times(np.array([3, 5], "u2"), {}, "t"), [3, 5])
    np.testing.assert_array_equal(decode_times(np.array([3.0, 5.0]), {}, "t"), [3, 5])
    with pytest.raises(ConfigError, match="not whole numbers"):
        decode_times(np.array([3.5]), {}, "t")
    dates = np.array(["2020-01-01T06", "NaT"], dtype="datetime64[h]")
    np.testing.assert_array_equal(
        decode_times(dates, {}, "t"), [np.datetime64("2020-01-01T06", "ns").view(np.int64), NAT]
    )
    fill = {"units": "seconds since 1970-01-01", "_FillValue": -1}
    np.testing.assert_array_equal(decode_times(np.array([7, -1]), fill, "t"), [7 * 10**9, NAT])


def test_time_coordinate_errors(make_store):
    store = make_store(VarSpec("a", shape=(NT, NY, NX)))
    with pytest.raises(ConfigError, match="no coordinate array named like the time dimension"):
        loader_for(store, ["a"], time=True)
    add_coordinate(store, "time", np.arange(NT), {"units": "metres"})
    with pytest.raises(ConfigError, match="not CF time units"):
        loader_for(store, ["a"])
    short = make_store(VarSpec("a", shape=(NT, NY, NX)))
    add_coordinate(short, "time", np.arange(NT - 1))
    with pytest.raises(ConfigError, match=r"has shape \(19,\) but 'a' has 20 time steps"):
        loader_for(short, ["a"])
    with loader_for(short, ["a"], time=False) as loader:  # the way out the message names
        assert loader.times is None


# -- static fields: errors -----------------------------------------------------------------
def test_static_field_errors(make_store):
    store = make_store(VarSpec("a", shape=(NT, NY, NX)), VarSpec("b", shape=(NT, NY, NX)))
    add_static(store, "lsm", (NY, NX))
    add_static(store, "coarse", (10, 16))
    add_static(store, "clim", (NT, NY, NX), dims=["time", "y", "x"])
    add_static(store, "cube", (2, 3, NY, NX), dims=["a", "level", "y", "x"])
    with pytest.raises(ConfigError, match=r"'clim' .* has a time axis \('time'\)"):
        loader_for(store, ["a"], static=["lsm", "clim"])
    with pytest.raises(ConfigError, match=r"a static field is \(y, x\) or \(level, y, x\)"):
        loader_for(store, ["a"], static=["cube"])
    with pytest.raises(VariableNotFoundError, match=r"static variable\(s\) \['nope'\] not found"):
        loader_for(store, ["a"], static=["lsm", "nope"])
    with pytest.raises(ConfigError, match=r"'coarse' .* is \(10, 16\) but the variables' grid"):
        loader_for(store, ["a"], static=["coarse"])
    with pytest.raises(ConfigError, match="listed twice"):
        loader_for(store, ["a", "b"], static=["b"])
    with pytest.raises(ConfigError, match=r"normalize has no \(mean, std\) .*\['lsm'\]"):
        loader_for(store, ["a"], static=["lsm"], normalize={"a": (0.0, 1.0)})
    zarr.open_group(store, mode="r+")["a"].attrs["stats"] = {"mean": 0.0, "std": 1.0}
    with pytest.raises(ConfigError, match="normalize='store' but array 'lsm'"):
        loader_for(store, ["a"], static=["lsm"], normalize="store")


# -- the cut itself, host and device -----------------------------------------------------
def _random_static(seed=0, shape=(3, NY, NX)) -> StaticFields:
    field = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    field[1, 2:5, 3:9] = np.nan  # NaNs are copied as they are
    return StaticFields(("s",), field)


def _samples(n=40, hw=(8, 8), seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            np.zeros(n, np.int64),
            rng.integers(0, NY - hw[0] + 1, n),
            rng.integers(0, NX - hw[1] + 1, n),
        ],
        axis=1,
    )


def test_cut_tiles_is_numpy_slicing_and_apply_augmentations():
    static = _random_static()
    samples = _samples()
    flags = draw_augmentations(("flip", "rot90"), len(samples), 0, 0, 0)
    got = static.tiles(samples, flags, (8, 8))
    assert got.shape == (len(samples), 3, 8, 8) and got.flags.c_contiguous
    for i, (_, y0, x0) in enumerate(samples.tolist()):
        want = apply_augmentations(static.field[:, y0 : y0 + 8, x0 : x0 + 8], flags[i])
        assert got[i].tobytes() == np.ascontiguousarray(want).tobytes()
    samples = _samples(hw=(8, 12))
    flip_only = draw_augmentations(("flip",), len(samples), 0, 0, 0)
    rect = static.tiles(samples, flip_only, (8, 12))
    for i, (_, y0, x0) in enumerate(samples.tolist()):
        want = apply_augmentations(static.field[:, y0 : y0 + 8, x0 : x0 + 12], flip_only[i])
        assert rect[i].tobytes() == np.ascontiguousarray(want).tobytes()


def test_device_cut_equals_the_host_cut_bit_for_bit(monkeypatch):
    """On the CPU stand-in of CuPy (two devices): uploaded to the loader's device,
    cut there on the feed stream, handed to DALI naming that stream."""
    from zarrdali.gpu.feed import FedArray

    cuda = fakegpu.install(monkeypatch, n_devices=2)
    import cupy

    static = _random_static(seed=4)
    device = DeviceStaticFields(static, device_id=1)
    assert device._field.device.id == 1
    with cupy.cuda.Device(1):
        stream = cupy.cuda.Stream(non_blocking=True)
    samples = _samples(seed=7)
    try:
        for augment in [(), ("flip",), ("flip", "rot90")]:
            flags = draw_augmentations(augment, len(samples), 1, 2, 3) if augment else None
            got = device.tiles(samples, flags, (8, 8), stream)  # called on device 0's thread
            assert isinstance(got, FedArray)
            assert got.__cuda_array_interface__["stream"] == stream.ptr
            assert got.array.device.id == 1
            want = static.tiles(samples, flags, (8, 8))
            assert got.shape == want.shape and got.dtype == want.dtype
            assert np.asarray(got).tobytes() == want.tobytes()
        assert cuda.current_device() == 0  # the caller's device is left as it was
    finally:
        device.close()
    with pytest.raises(ConfigError, match="released"):
        device.tiles(samples, None, (8, 8), stream)


def test_batch_source_serves_extras_after_index_and_flags():
    """Host extras follow index and flags; device extras follow the frames."""
    samples = _samples(n=4)
    frames = (np.zeros((4, 1)),)
    seen = []

    def extra(s, f):
        seen.append((s, f))
        return np.full(len(s), 7)

    source = BatchSource(
        lambda k: (frames, samples),
        3,
        1,
        False,
        augment=("flip",),
        seed=5,
        epoch=1,
        first_batch=2,
        extras=[extra],
        device_extras=[lambda s, f: "device"],
    )
    info = type("Info", (), {"iteration": 1})()
    _, index, flags, out = source(info)
    np.testing.assert_array_equal(index, samples)
    np.testing.assert_array_equal(flags, draw_augmentations(("flip",), 4, 5, 1, 3))
    np.testing.assert_array_equal(out, [7] * 4)
    assert seen[0][1] is not None and np.array_equal(seen[0][1], flags)
    assert source.frames_only(info) == (frames[0], "device")


@pytest.mark.gpu
def test_cuda_static_and_time_equal_cpu(make_store):
    store = make_era_store(make_store, sharded=True)
    kw = dict(batch_size=6, augment=("flip", "rot90"), normalize=STATS, static=["lsm", "oro"])
    with loader_for(store, ["a", "b"], device="cuda", **kw) as cuda_loader:
        with loader_for(store, ["a", "b"], device="cpu", **kw) as cpu_loader:
            got = run_epochs(cuda_loader, [0, 1])
            want = run_epochs(cpu_loader, [0, 1])
        first = next(iter(cuda_loader))
        assert first["static"].is_cuda and first["time"].is_cuda
    for e in (0, 1):
        for g, w in zip(got[e], want[e], strict=True):
            for key in ("static", "time", "index", "augment"):
                assert g[key].tobytes() == w[key].tobytes()
