"""Users' stores on the GPU path: CF-packed values, other dimension orders and
chosen levels, bit for bit as the CPU path (which equals xarray's decoded
view: ``test_user_stores.py``).

* the finishing gather kernel's own CUDA source, compiled as host C++, and its
  numpy twin unpack, stride and pick levels as the CPU finish does;
* the loader's whole GPU path on the CPU stand-in of CuPy (``fakegpu``) with
  DALI's graph on the CPU, and on a GPU (``-m gpu``).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest

import fakegpu
from test_gpu_backend import _emulate_device_decode, _fill_host_region
from test_loader_oracle import run_epochs
from test_missing_values import _same_batches, host_finish_kernel  # noqa: F401  (fixture)
from test_user_stores import WB2_VARIABLES, open_xarray
from xarray_stores import write_ordered_store, xarray_window
from zarrdali import ZarrLoader
from zarrdali.batch.finish import finish_of
from zarrdali.batch.locate import ChunkLocator
from zarrdali.batch.plan import plan_batch
from zarrdali.cpu.backend import CpuBackend
from zarrdali.gpu.describe import describe_batch, finish_tables, gather_reference

PACKED = ["ir", "cloud", "count", "offset_only", "radiance"]
SAMPLES = np.array([[0, 0, 0], [3, 8, 16], [7, 12, 4], [8, 5, 9]])


def _loader_kw(**kw):
    base = dict(input_steps=2, target_steps=1, tile=(8, 8), batch_size=8, shuffle=True, seed=3)
    return {**base, **kw}


def _on_the_stand_in(monkeypatch):
    """The GPU backend on fake CuPy, DALI's graph on the CPU (as test_missing_values)."""
    from zarrdali.gpu import GpuBackend, feed

    cuda = fakegpu.install(monkeypatch)
    monkeypatch.setattr(GpuBackend, "dali_device", "cpu")
    monkeypatch.setattr(GpuBackend, "dali_device_id", lambda self: None)
    monkeypatch.setattr(feed, "hand_over", lambda array, stream: np.asarray(array))
    return cuda


CASES = {
    "packed": (
        PACKED,
        dict(
            normalize={
                "ir": (280.0, 20.0),
                "cloud": (0.5, 0.3),
                "count": (50.0, 30.0),
                "offset_only": (1e5, 600.0),
                "radiance": (60000.0, 2000.0),
            }
        ),
    ),
    "packed+fill+masks": (PACKED, dict(nan_fill=-2.0, masks=True, augment=("flip", "rot90"))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_store_on_the_stand_in_equals_the_cpu_path(packed_store, monkeypatch, case):
    variables, kw = CASES[case]
    with ZarrLoader(packed_store, variables, device="cpu", **_loader_kw(**kw)) as cpu_loader:
        want = run_epochs(cpu_loader, [0, 1])
    cuda = _on_the_stand_in(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ZarrLoader(packed_store, variables, device="cuda", **_loader_kw(**kw)) as loader:
            got = run_epochs(loader, [0, 1])
    assert "zarrdali_gather_finish" in cuda.launches
    _same_batches(got, want)
    assert any(np.isnan(b["input"]).any() for b in got[0]) == ("nan_fill" not in kw)


@pytest.mark.parametrize("order", [("lat", "lon", "time"), ("time", "lon", "lat")])
def test_other_orders_on_the_stand_in_equal_xarray(tmp_path, monkeypatch, order):
    shards = {"time": 4, "lat": 16, "lon": 16, "level": 3}
    store = write_ordered_store(tmp_path / "o.zarr", order, shards=shards)
    ds = open_xarray(store)
    _on_the_stand_in(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ZarrLoader(store, ["a", "c", "b"], device="cuda", **_loader_kw()) as loader:
            batches = run_epochs(loader, [0])[0]
    for batch in batches:
        frames = np.concatenate([batch["input"], batch["target"]], axis=1)
        for i, (t0, y0, x0) in enumerate(batch["index"].tolist()):
            want = xarray_window(ds, ["a", "c", "b"], t0, y0, x0, n_frames=3, tile=(8, 8))
            np.testing.assert_array_equal(frames[i], want)


def test_chosen_levels_on_the_stand_in_equal_the_cpu_path(wb2_store, monkeypatch):
    kw = _loader_kw(static=["land_sea_mask"], masks=True)
    with ZarrLoader(wb2_store, WB2_VARIABLES, device="cpu", **kw) as cpu_loader:
        want = run_epochs(cpu_loader, [0])
    _on_the_stand_in(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ZarrLoader(wb2_store, WB2_VARIABLES, device="cuda", **kw) as loader:
            got = run_epochs(loader, [0])
    _same_batches(got, want)


@pytest.mark.parametrize("store_kind", ["packed", "ordered", "levels"])
def test_finishing_kernel_source_unpacks_strides_and_picks_levels(
    store_kind,
    tmp_path,
    packed_store,
    wb2_store,
    host_finish_kernel,  # noqa: F811  (the fixture imported above)
):
    """The kernel's CUDA source as host C++, its numpy twin and the CPU finish:
    the same bits (values and masks) on each kind of users' store."""
    if host_finish_kernel is None:
        pytest.skip("no g++")
    if store_kind == "packed":
        store, variables = packed_store, PACKED
    elif store_kind == "ordered":
        store = write_ordered_store(
            tmp_path / "o.zarr",
            ("lon", "time", "lat"),
            shards={"time": 4, "lat": 16, "lon": 16, "level": 3},
        )
        variables = ["a", "c"]
    else:
        store, variables = wb2_store, WB2_VARIABLES
    with ZarrLoader(store, variables, device="cpu", masks=True, nan_fill=None) as loader:
        layouts, name, group = loader.layouts, loader.store_name, loader.group
        finish = finish_of(None, None, loader.missing, loader.packing)
    plan = plan_batch(layouts, SAMPLES % [7, 8, 8], n_frames=2, frame_step=1, tile_hw=(8, 8))
    masks = np.zeros(plan.out_shape, dtype=bool)
    backend = CpuBackend(group, name, 1)
    try:
        want = backend.load_batch(layouts, plan, finish=replace(finish, mask_arrays=(masks,)))
    finally:
        backend.close()
    locations = ChunkLocator(name, layouts).locate(plan)
    desc = describe_batch(layouts, plan, locations, store_name=name)
    decoded = _emulate_device_decode(locations, desc)
    _fill_host_region(group, name, layouts, plan, locations, desc, decoded)
    tables = finish_tables(layouts, finish, masks=True)
    twin, twin_mask = gather_reference(decoded, desc.gather, tables)
    assert twin.tobytes() == want.tobytes()
    np.testing.assert_array_equal(twin_mask.astype(bool), masks)
    out, mask = host_finish_kernel(decoded, desc.gather, tables)
    assert out.tobytes() == want.tobytes()
    np.testing.assert_array_equal(mask.astype(bool), masks)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_packed_store_on_a_gpu_equals_the_cpu_path(packed_store, case):
    variables, kw = CASES[case]
    with ZarrLoader(packed_store, variables, device="cpu", **_loader_kw(**kw)) as cpu_loader:
        want = run_epochs(cpu_loader, [0, 1])
    with ZarrLoader(packed_store, variables, device="cuda", **_loader_kw(**kw)) as loader:
        got = run_epochs(loader, [0, 1])
    _same_batches(got, want)


@pytest.mark.gpu
def test_chosen_levels_and_orders_on_a_gpu_equal_the_cpu_path(wb2_store, tmp_path):
    store = write_ordered_store(
        tmp_path / "o.zarr",
        ("lat", "lon", "time"),
        shards={"time": 4, "lat": 16, "lon": 16, "level": 3},
    )
    for where, variables in ((wb2_store, WB2_VARIABLES), (store, ["a", "c", "b"])):
        kw = _loader_kw(masks=True)
        with ZarrLoader(where, variables, device="cpu", **kw) as cpu_loader:
            want = run_epochs(cpu_loader, [0])
        with ZarrLoader(where, variables, device="cuda", **kw) as loader:
            got = run_epochs(loader, [0])
        _same_batches(got, want)


@pytest.mark.parametrize("cast", [False, True], ids=["scale_offset", "scale_offset+cast_value"])
def test_zarr_32_value_codecs_on_the_stand_in_equal_the_cpu_path(tmp_path, monkeypatch, cast):
    from test_user_stores import ZARR_32, _write_scale_offset_store

    if not ZARR_32:
        pytest.skip("scale_offset and cast_value need zarr-python >= 3.2")
    if cast:
        pytest.importorskip("cast_value_rs")
    store = _write_scale_offset_store(tmp_path / "so.zarr", cast=cast, sharded=True)
    kw = _loader_kw(target_steps=0, masks=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ZarrLoader(store, ["bt"], device="cpu", **kw) as cpu_loader:
            want = run_epochs(cpu_loader, [0])
        _on_the_stand_in(monkeypatch)
        with ZarrLoader(store, ["bt"], device="cuda", **kw) as loader:
            got = run_epochs(loader, [0])
    _same_batches(got, want)
