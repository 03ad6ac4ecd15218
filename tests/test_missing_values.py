"""Missing values (``masks``, ``nan_fill``), on both paths, against oracles.

A value is invalid when it is NaN or equal to its variable's ``_FillValue`` /
``missing_value`` (compared in its stored dtype); chunks never written read as
the array's fill value and follow the same rule. Checked here:

* the loader on the CPU path (worker processes and in-process, augmentations on
  and off, plain and sharded): ``input_mask``/``target_mask`` equal what xarray
  masks (``~isnan`` of the CF-decoded variables) at ``batch["index"]``, the
  frames equal zarr-python's values normalized in float32 with the invalid ones
  replaced by ``nan_fill``, and static tiles and timestamps equal their oracle
  as they do without these options;
* the GPU path's finishing gather (``zarrdali_gather_finish``): its numpy twin
  and its own CUDA source compiled as host C++ equal the CPU path's finish bit
  for bit (values and masks); the GPU engine on the CPU stand-in of CuPy
  (``fakegpu``) and on a GPU (``-m gpu``) likewise; the whole GPU path of the
  loader (feed, gather, DALI slicing, flips and turns of the masks, names)
  on the stand-in with DALI on the CPU equals the CPU path's batches bit for
  bit, and on a GPU (``-m gpu``) too;
* the constructor's checks of both options and of the attributes.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

import fakegpu
from storefactory import VarSpec, add_coordinate, add_static, chunk_files, chunk_key, delete_chunks
from test_gpu_backend import _HOST_LOAD, _HOST_SHIM, NT, NX, NY, SAMPLES, _described_batch, _spec
from test_loader_oracle import loader_for, run_epochs
from test_static_time import StaticOracle, check_static_and_time, xarray_times
from zarrdali import ConfigError
from zarrdali.batch.finish import Finish
from zarrdali.batch.plan import plan_batch
from zarrdali.cpu.backend import CpuBackend
from zarrdali.gpu.describe import GatherFinish, finish_tables, gather_reference
from zarrdali.gpu.kernels import finish_source, gather_block, gather_grid_y
from zarrdali.sampling.augment import apply_augmentations
from zarrdali.store.missing import check_missing_options, variable_missing_values
from zarrdali.store.open import load_layouts, open_group

FILL16 = -32768


def missing_store_specs(sharded: bool) -> list[VarSpec]:
    """A float32 field with NaN patches whose unwritten chunks read as NaN; an
    int16 satellite-like field marking gaps with ``_FillValue`` -32768 (also its
    fill value: unwritten chunks are gaps), big-endian, with levels; a float64
    field with a ``missing_value`` list and a fill value (0) that is data."""
    shards = (4, 16, 16) if sharded else None
    return [
        _spec(
            "sst",
            shards=shards,
            nan_box=(0, 6, 2, 12, 3, 30),
            fill_value=np.nan,
            written_time=(0, 10),
        ),
        _spec(
            "ir",
            shape=(NT, 2, NY, NX),
            chunks=(2, 1, 8, 8),
            shards=(4, 2, 16, 16) if sharded else None,
            dtype="int16",
            endian="big",
            fill_value=FILL16,
            attrs={"_FillValue": FILL16},
            nan_box=(2, 8, 5, 15, 0, 9),
            written_time=(0, 9),
        ),
        _spec(
            "q",
            dtype="float64",
            compressor="gzip",
            attrs={"missing_value": [1000.0, 3000.0]},
            nan_box=(7, 9, 5, 12, 0, 33),
            written_time=(0, 11),
        ),
    ]


STATS = {"sst": (290.0, 10.0), "ir": ([200.0, -100.0], [50.0, 25.0]), "q": (3.0, 7.0)}
CHANNEL_STATS = (
    np.array([290.0, 200.0, -100.0, 3.0], np.float32),
    np.array([10.0, 50.0, 25.0, 7.0], np.float32),
)


# -- the finish itself: CPU pieces, the GPU kernel's twin, its source as host C++ -----------
_HOST_FINISH_MAIN = (
    _HOST_LOAD
    + r"""
// argv: directory, n_tiles, n_l, n_y, n_x, h, w, out_size, grid_y, block x,
//       normalize, fill_missing, nan_fill, write_mask, block y
int main(int argc, char** argv) {
    if (argc != 16) return 1;
    std::string dir = argv[1];
    int n_tiles = std::atoi(argv[2]), n_l = std::atoi(argv[3]), n_y = std::atoi(argv[4]);
    int n_x = std::atoi(argv[5]), h = std::atoi(argv[6]), w = std::atoi(argv[7]);
    long out_size = std::atol(argv[8]);
    unsigned int gy = std::atoi(argv[9]), tbx = std::atoi(argv[10]);
    int normalize = std::atoi(argv[11]), fill_missing = std::atoi(argv[12]);
    float nan_fill = std::strtof(argv[13], nullptr);
    int write_mask = std::atoi(argv[14]);
    unsigned int tby = std::atoi(argv[15]);
    auto decoded = load<unsigned char>((dir + "/decoded").c_str());
    auto tiles = load<long long>((dir + "/tiles").c_str());
    auto tile_chunks = load<int>((dir + "/tile_chunks").c_str());
    auto slots = load<long long>((dir + "/chunk_slots").c_str());
    auto variables = load<long long>((dir + "/variables").c_str());
    auto levels = load<long long>((dir + "/levels").c_str());
    auto finish = load<long long>((dir + "/finish").c_str());
    auto stats = load<float>((dir + "/stats").c_str());
    std::vector<float> out(out_size);
    std::vector<unsigned char> mask(out_size, 7);
    gridDim = {(unsigned int)n_tiles, gy, 1};
    blockDim = {tbx, tby, 1};
    for (unsigned int bx = 0; bx < gridDim.x; ++bx)
        for (unsigned int by = 0; by < gridDim.y; ++by)
            for (unsigned int ty = 0; ty < blockDim.y; ++ty)
            for (unsigned int tx = 0; tx < blockDim.x; ++tx) {
                blockIdx = {bx, by, 0};
                threadIdx = {tx, ty, 0};
                zarrdali_gather_finish(decoded.data(), tiles.data(), tile_chunks.data(),
                                       slots.data(), variables.data(), levels.data(),
                                       finish.data(),
                                       stats.data(), n_tiles, n_l, n_y, n_x, h, w, normalize,
                                       fill_missing, nan_fill, write_mask, out.data(),
                                       mask.data());
            }
    FILE* f = std::fopen((dir + "/out").c_str(), "wb");
    std::fwrite(out.data(), sizeof(float), out.size(), f);
    std::fclose(f);
    f = std::fopen((dir + "/mask").c_str(), "wb");
    std::fwrite(mask.data(), 1, mask.size(), f);
    std::fclose(f);
    return 0;
}
"""
)


@pytest.fixture(scope="module")
def host_finish_kernel(tmp_path_factory):
    """``run(decoded, gather, finish) -> (out, mask)``: ``zarrdali_gather_finish``'s
    CUDA source compiled as host C++, run block by block, thread by thread (None
    without g++)."""
    compiler = shutil.which("g++")
    if compiler is None:
        return None
    root = tmp_path_factory.mktemp("host_finish")
    source = root / "finish.cpp"
    source.write_text(_HOST_SHIM + "#include <string>\n" + finish_source() + _HOST_FINISH_MAIN)
    binary = root / "finish"
    subprocess.run(
        [compiler, "-O1", "-fno-strict-aliasing", "-o", str(binary), str(source)], check=True
    )

    def run(decoded: np.ndarray, gather, finish: GatherFinish):
        work = root / "run"
        work.mkdir(exist_ok=True)
        decoded.tofile(work / "decoded")
        names = ("tiles", "tile_chunks", "chunk_slots", "variables", "levels")
        for name, array in zip(names, gather.arrays, strict=True):
            np.ascontiguousarray(array).tofile(work / name)
        finish.variables.tofile(work / "finish")
        finish.stats.tofile(work / "stats")
        _, n_l, n_y, n_x = gather.tile_chunks.shape
        h, w = gather.out_shape[-2:]
        size = int(np.prod(gather.out_shape))
        bx, by = gather_block(w)
        args = [gather.n_tiles, n_l, n_y, n_x, h, w, size]
        args += [gather_grid_y(gather.max_tile_elements // w, w)]
        args += [bx, int(finish.normalize), int(finish.nan_fill is not None)]
        args += [repr(0.0 if finish.nan_fill is None else finish.nan_fill), int(finish.masks), by]
        subprocess.run([str(binary), str(work), *map(str, args)], check=True)
        out = np.fromfile(work / "out", dtype=np.float32).reshape(gather.out_shape)
        mask = np.fromfile(work / "mask", dtype=np.uint8).reshape(gather.out_shape)
        return out, (mask if finish.masks else None)

    return run


def _layouts_and_plan(store, names, samples=SAMPLES):
    group, name = open_group(store)
    layouts = load_layouts(group, name, names)
    plan = plan_batch(layouts, samples, n_frames=3, frame_step=2, tile_hw=(8, 8))
    return group, name, layouts, plan


def _finish(layouts, store_name, normalize: bool, nan_fill, masks: bool) -> Finish:
    missing = check_missing_options(nan_fill, masks, layouts, store_name)
    mean, std = CHANNEL_STATS if normalize else (None, None)
    if missing is None:
        return Finish(mean, std)
    return Finish(mean, std, nan_fill=missing.nan_fill, missing=missing.per_channel)


def _cpu_finished(group, name, layouts, plan, finish: Finish):
    """The CPU backend's batch (one window) finished as ``finish`` says, and its mask."""
    mask = np.full(plan.out_shape, 7, dtype=bool) if finish.checks else None
    if mask is not None:
        mask.view(np.uint8)[...] = 7  # poison: every element must be written
        finish = Finish(
            finish.mean, finish.std, None, finish.nan_fill, finish.missing, mask_arrays=(mask,)
        )
    backend = CpuBackend(group, name, 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = backend.load_batch(layouts, plan, finish=finish)
    finally:
        backend.close()
    return out, mask


FINISHES = {  # normalize, nan_fill, masks
    "masks": (True, None, True),
    "fill": (True, 0.0, False),
    "fill+masks": (True, -1.5, True),
    "raw+fill+masks": (False, 123.0, True),
    "normalize-only": (True, None, False),
}


@pytest.mark.parametrize("how", list(FINISHES))
@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_finishing_gather_equals_the_cpu_finish(make_store, sharded, how, host_finish_kernel):
    store = make_store(*missing_store_specs(sharded))
    group, name, layouts, plan = _layouts_and_plan(store, ["sst", "ir", "q"])
    normalize, nan_fill, masks = FINISHES[how]
    finish = _finish(layouts, name, normalize, nan_fill, masks)
    want, want_mask = _cpu_finished(group, name, layouts, plan, finish)
    assert want.dtype == np.float32
    if masks:  # every channel has gaps in these samples (and valid values)
        assert want_mask.view(np.uint8).max() == 1
        assert not want_mask.all(axis=(0, 1, 3, 4)).any() and want_mask.any(axis=(0, 1, 3, 4)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoded, gather = _described_batch(group, name, layouts, plan)
    tables = finish_tables(layouts, finish, masks=masks)
    runs = [("twin", gather_reference(decoded, gather, tables))]
    if host_finish_kernel is not None:
        runs.append(("kernel source", host_finish_kernel(decoded, gather, tables)))
    for what, (got, got_mask) in runs:
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes(), what
        if masks:
            assert got_mask.tobytes() == want_mask.view(np.uint8).tobytes(), what
        else:
            assert got_mask is None, what


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_finishing_kernel_compiles_with_nvcc(tmp_path):
    path = tmp_path / "finish.cu"
    path.write_text(finish_source())
    subprocess.run(
        ["nvcc", "-c", "-arch=sm_90", "-Werror", "all-warnings", "-o", "/dev/null", str(path)],
        check=True,
    )


# -- the GPU engine: load_batch(finish=...) on the stand-in and on a GPU -------------------
@pytest.fixture(params=["fake", pytest.param("cuda", marks=pytest.mark.gpu)])
def cupy_module(request, monkeypatch):
    if request.param == "fake":
        yield fakegpu.install(monkeypatch).cupy
        return
    import cupy

    yield cupy


@pytest.mark.parametrize("how", ["fill+masks", "raw+fill+masks", "normalize-only"])
def test_gpu_engine_finishes_as_the_cpu_path(make_store, cupy_module, how):
    from zarrdali.gpu import GpuBackend

    store = make_store(*missing_store_specs(sharded=True))
    group, name, layouts, plan = _layouts_and_plan(store, ["sst", "ir", "q"])
    normalize, nan_fill, masks = FINISHES[how]
    finish = _finish(layouts, name, normalize, nan_fill, masks)
    want, want_mask = _cpu_finished(group, name, layouts, plan, finish)
    backend = GpuBackend(group, name, num_threads=2)
    try:
        mask = cupy_module.full(plan.out_shape, 7, dtype=cupy_module.uint8) if masks else None
        if mask is not None:
            finish = Finish(
                finish.mean, finish.std, None, finish.nan_fill, finish.missing, mask_arrays=(mask,)
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = backend.load_batch(layouts, plan, finish=finish)
        assert got.dtype == np.float32 and got.get().tobytes() == want.tobytes()
        if masks:
            assert mask.get().tobytes() == want_mask.view(np.uint8).tobytes()
            with pytest.raises(ValueError, match="mask must be"):  # float32, not uint8
                bad = Finish(finish.mean, finish.std, None, 0.0, finish.missing, mask_arrays=(got,))
                backend.load_batch(layouts, plan, finish=bad)
    finally:
        backend.close()


# -- the loader: CPU path against xarray and zarr-python ---------------------------------
def make_missing_store(make_store, sharded: bool):
    """The missing-values store, with a static field and a CF time coordinate."""
    store = make_store(*missing_store_specs(sharded))
    add_static(store, "lsm", (NY, NX), shards=(16, 16) if sharded else None)
    add_coordinate(
        store,
        "time",
        np.arange(NT, dtype=np.int64) * 6,
        {"units": "hours since 2020-01-01", "calendar": "standard"},
    )
    return store


class MaskOracle:
    """Valid values as xarray sees them (CF-decoded: the missing values and the
    unwritten chunks' fill values become NaN), and zarr-python's stored values."""

    def __init__(self, store, variables) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = xr.open_zarr(store, consolidated=False, mask_and_scale=True)
            self.valid = {v: ~np.isnan(ds[v].values) for v in variables}
        group = zarr.open_group(store, mode="r")
        self.stored = {v: np.asarray(group[v][...]) for v in variables}
        self.variables = list(variables)

    def window(self, t0, y0, x0, n_frames, frame_step, hw, what):
        h, w = hw
        frames = slice(t0, t0 + (n_frames - 1) * frame_step + 1, frame_step)
        parts = []
        for v in self.variables:
            a = getattr(self, what)[v][frames, ..., y0 : y0 + h, x0 : x0 + w]
            parts.append(a[:, None] if a.ndim == 3 else a)
        return np.concatenate(parts, axis=1)


LOADER_STATS = {**STATS, "lsm": (0.5, 2.0)}


def _all_options(augment) -> dict:
    return dict(
        frame_step=2,
        batch_size=16,
        normalize=LOADER_STATS,
        augment=augment,
        static=["lsm"],
        masks=True,
        nan_fill=0.0,
    )


def check_missing(
    batches, oracle: MaskOracle, *, nan_fill, masks, stats, n_in=2, n_frames=3, decode_cf=True
):
    """Valid values are the stored ones normalized; missing ones ``nan_fill``, else
    NaN (CF decoding, the default) or the stored ones (``decode_cf=False``)."""
    mean, std = (np.asarray(s, np.float32).reshape(1, -1, 1, 1) for s in stats)
    n_invalid = 0
    for k, batch in enumerate(batches):
        for i, (t0, y0, x0) in enumerate(batch["index"].tolist()):
            where = f"batch {k} sample {i} index {(t0, y0, x0)}"
            valid = oracle.window(t0, y0, x0, n_frames, 2, (8, 8), "valid")
            values = oracle.window(t0, y0, x0, n_frames, 2, (8, 8), "stored")
            want = (values.astype(np.float32) - mean) / std
            if nan_fill is not None:
                want[~valid] = np.float32(nan_fill)
            elif decode_cf:
                want[~valid] = np.nan
            if "augment" in batch:
                want = apply_augmentations(want, batch["augment"][i])
                valid = apply_augmentations(valid, batch["augment"][i])
            got = np.concatenate([batch["input"][i], batch["target"][i]])
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6, err_msg=where)
            if nan_fill is not None:
                assert not np.isnan(got).any(), where
                assert (got[~valid] == np.float32(nan_fill)).all(), where
            if masks:
                got_mask = np.concatenate([batch["input_mask"][i], batch["target_mask"][i]])
                assert got_mask.dtype == bool
                np.testing.assert_array_equal(got_mask, valid, err_msg=where)
                assert batch["input_mask"].shape == batch["input"].shape
            n_invalid += int((~valid).sum())
    assert n_invalid > 0  # the batches held missing values


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "workers"])
@pytest.mark.parametrize("augment", [(), ("flip", "rot90")], ids=["plain-tiles", "augmented"])
@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_masks_fills_static_and_times_equal_the_oracles(make_store, sharded, augment, workers):
    store = make_missing_store(make_store, sharded)
    variables = ["sst", "ir", "q"]
    kw = {**_all_options(augment), "nan_fill": -3.0, "workers": workers}
    with loader_for(store, variables, **kw) as loader:
        batches = run_epochs(loader, [0, 1])
    assert set(batches[0][0]) >= {"input_mask", "target_mask", "static", "time", "index"}
    oracle = MaskOracle(store, variables)
    for epoch in (0, 1):
        check_missing(batches[epoch], oracle, nan_fill=-3.0, masks=True, stats=CHANNEL_STATS)
        check_static_and_time(
            batches[epoch],
            StaticOracle(store, ["lsm"], LOADER_STATS),
            xarray_times(store),
            hw=(8, 8),
            n_frames=3,
            frame_step=2,
        )


@pytest.mark.parametrize("decode_cf", [True, False], ids=["decoded", "stored"])
@pytest.mark.parametrize("nan_fill,masks", [(0.0, False), (None, True), (None, False)])
def test_each_option_alone(make_store, nan_fill, masks, decode_cf):
    """Each option alone, with CF decoding (missing values served as NaN where
    not filled) and without (stored values where not filled)."""
    store = make_missing_store(make_store, sharded=True)
    variables = ["sst", "ir", "q"]
    kw = dict(frame_step=2, normalize=STATS, nan_fill=nan_fill, masks=masks, time=False)
    with loader_for(store, variables, decode_cf=decode_cf, **kw) as loader:
        batches = run_epochs(loader, [0])[0]
    assert ("input_mask" in batches[0]) == masks and ("target_mask" in batches[0]) == masks
    check_missing(
        batches,
        MaskOracle(store, variables),
        nan_fill=nan_fill,
        masks=masks,
        stats=CHANNEL_STATS,
        decode_cf=decode_cf,
    )
    if nan_fill is None:  # NaNs stay, masks beside them
        assert any(np.isnan(b["input"]).any() for b in batches)


# -- the loader's GPU path: on the stand-in with DALI on the CPU, and on a GPU ---------------
def _same_batches(got: dict, want: dict) -> None:
    for e in want:
        assert len(got[e]) == len(want[e])
        for g, w in zip(got[e], want[e], strict=True):
            assert g.keys() == w.keys()
            for key in w:
                assert g[key].dtype == w[key].dtype, key
                assert g[key].tobytes() == w[key].tobytes(), (e, key)


@pytest.mark.parametrize("augment", [(), ("flip", "rot90")], ids=["plain-tiles", "augmented"])
def test_gpu_path_on_the_stand_in_equals_the_cpu_path(make_store, monkeypatch, augment):
    """The GPU backend on fake CuPy (gather kernels as their numpy twins), its
    CUDA feed with both arrays of a batch in one ring buffer, and the GPU path's
    DALI graph run on the CPU (slicing input and target out of the window and
    its mask, flips and quarter turns of both, uint8 masks seen as bool)."""
    from zarrdali.gpu import GpuBackend

    store = make_missing_store(make_store, sharded=True)
    variables = ["sst", "ir", "q"]
    kw = _all_options(augment)
    with loader_for(store, variables, **kw) as cpu_loader:
        want = run_epochs(cpu_loader, [0, 1])
    from zarrdali.gpu import feed

    cuda = fakegpu.install(monkeypatch)
    monkeypatch.setattr(GpuBackend, "dali_device", "cpu")  # DALI's graph, on the CPU
    monkeypatch.setattr(GpuBackend, "dali_device_id", lambda self: None)
    # DALI on the CPU takes host arrays: the stand-in's "device" arrays are, once
    # stripped of their CUDA array interface (which would send DALI to a GPU)
    monkeypatch.setattr(feed, "hand_over", lambda array, stream: np.asarray(array))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with loader_for(store, variables, device="cuda", **kw) as gpu_loader:
            assert isinstance(gpu_loader.backend, GpuBackend)
            got = run_epochs(gpu_loader, [0, 1])
    assert set(cuda.launches) >= {"zarrdali_gather_finish"} and "zarrdali_gather" not in set(
        cuda.launches
    )
    _same_batches(got, want)
    check_missing(
        got[0], MaskOracle(store, variables), nan_fill=0.0, masks=True, stats=CHANNEL_STATS
    )


@pytest.mark.gpu
@pytest.mark.parametrize("augment", [(), ("flip", "rot90")], ids=["plain-tiles", "augmented"])
def test_cuda_masks_fills_static_and_times_equal_the_cpu_path(make_store, augment):
    store = make_missing_store(make_store, sharded=True)
    variables = ["sst", "ir", "q"]
    kw = _all_options(augment)
    with loader_for(store, variables, device="cuda", **kw) as cuda_loader:
        first = next(iter(cuda_loader))
        assert first["input_mask"].is_cuda and first["input_mask"].dtype.is_floating_point is False
        assert str(first["input_mask"].dtype) == "torch.bool"
        del first
        got = run_epochs(cuda_loader, [0, 1])
    with loader_for(store, variables, device="cpu", **kw) as cpu_loader:
        want = run_epochs(cpu_loader, [0, 1])
    _same_batches(got, want)
    check_missing(
        got[0], MaskOracle(store, variables), nan_fill=0.0, masks=True, stats=CHANNEL_STATS
    )


# -- the constructor's checks ----------------------------------------------------------------
def test_options_are_checked_in_the_constructor(make_store):
    store = make_store(_spec("a"), _spec("n", dtype="int16"))
    for bad in (float("nan"), float("inf"), 1e39, "0", True):
        with pytest.raises(ConfigError, match="nan_fill must be"):
            loader_for(store, ["a"], nan_fill=bad)
    for bad in (1, "yes", None):
        with pytest.raises(ConfigError, match="masks must be True or False"):
            loader_for(store, ["a"], masks=bad)
    # an integer store without fill attributes cannot be missing: masks all True
    with loader_for(store, ["n"], masks=True, nan_fill=0.0) as loader:
        batches = run_epochs(loader, [0])[0]
    assert all(b["input_mask"].all() and b["target_mask"].all() for b in batches)
    with loader_for(store, ["n"]) as plain:
        for got, want in zip(batches, run_epochs(plain, [0])[0], strict=True):
            assert got["input"].tobytes() == want["input"].tobytes()


@pytest.mark.parametrize(
    "attrs,says",
    [
        ({"_FillValue": 40000}, r"_FillValue attribute 40000 .*'n' .*out of the range of int16"),
        ({"missing_value": 1.5}, r"missing_value attribute 1.5 .*not a whole number"),
        ({"_FillValue": "lots"}, r"_FillValue attribute 'lots' .*not a number"),
        ({"missing_value": [1, 2, 3, 4, 5]}, r"5 distinct missing values"),
    ],
)
def test_bad_missing_value_attributes_are_named(make_store, attrs, says):
    store = make_store(_spec("n", dtype="int16", attrs=attrs))
    with pytest.raises(ConfigError, match=says):
        loader_for(store, ["n"], masks=True)
    with pytest.raises(ConfigError, match=says):  # CF decoding reads them too
        loader_for(store, ["n"])
    # serving stored values without masks or nan_fill, they are not read
    with loader_for(store, ["n"], decode_cf=False) as loader:
        assert loader.missing is None


def test_missing_values_decode_as_xarray_writes_them(tmp_path):
    """xarray writes a float variable's _FillValue to Zarr as a base64 double."""
    ds = xr.Dataset(
        {
            "f": (("time", "y", "x"), np.zeros((2, 3, 4), np.float32)),
            "i": (("time", "y", "x"), np.zeros((2, 3, 4), np.int16)),
        }
    )
    ds["f"].encoding["_FillValue"] = -999.0
    ds["i"].encoding["_FillValue"] = -1
    ds["i"].attrs["missing_value"] = [-2, -1]
    path = tmp_path / "x.zarr"
    ds.to_zarr(path, zarr_format=3, consolidated=False)
    group, name = open_group(path)
    f, i = load_layouts(group, name, ["f", "i"])
    assert isinstance(f.attrs["_FillValue"], str)  # base64, as xarray writes it
    assert variable_missing_values(f, name).tolist() == [-999.0]
    assert variable_missing_values(i, name).tolist() == [-2, -1]
    assert variable_missing_values(i, name).dtype == np.int16


def test_unwritten_chunks_follow_the_fill_value(make_store):
    """A fill value that is data (0, no attribute) is valid; NaN or the
    _FillValue is not: an unwritten chunk is masked whole. Time steps from 4 on
    are never written, nor is the first chunk (t 0-1, y 0-7, x 0-7)."""
    store = make_store(
        _spec("zero", written_time=(0, 4)),
        _spec("nan", fill_value=np.nan, written_time=(0, 4)),
        _spec("flag", dtype="int16", fill_value=-9, attrs={"_FillValue": -9}, written_time=(0, 4)),
    )
    for name in ("zero", "nan", "flag"):
        first = chunk_files(store, name)[0]
        assert first.parts[-3:] == ("0", "0", "0")
        delete_chunks(store, name, [chunk_key(store, name, first)])
    kw = dict(input_steps=1, target_steps=0, tile=(8, 8), batch_size=4, masks=True, time=False)
    for name, fill_is_data in (("zero", True), ("nan", False), ("flag", False)):
        with loader_for(store, [name], **kw) as loader:
            batches = run_epochs(loader, [0])[0]
        for batch in batches:
            index, masks = batch["index"].tolist(), batch["input_mask"]
            for (t0, y0, x0), mask in zip(index, masks, strict=True):
                written = t0 < 4 and not (t0 < 2 and (y0, x0) == (0, 0))
                assert bool(mask.all()) == (fill_is_data or written), (name, t0, y0, x0)
