"""``zarrdali index``: tiling and sampling indexes against an independent computation,
and ``ZarrLoader(index=...)`` serving exactly the indexed samples."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from zarr.codecs import ZstdCodec

from test_loader_oracle import Oracle, check_batches, loader_for, run_epochs
from zarrdali.errors import ConfigError, StoreNotFoundError, VariableNotFoundError
from zarrdali.prep.index import build_index
from zarrdali.prep.sample_index import load_sample_index, read_index
from zarrdali.prep.sampling import SamplingSpec
from zarrdali.prep.tiling import TilingSpec
from zarrdali.store.open import load_layouts, open_group

NT, NY, NX = 14, 24, 36


def precip_field(nt: int = NT, ny: int = NY, nx: int = NX, seed: int = 0) -> np.ndarray:
    """Rain-like values (many zeros, heavy tail) with NaN regions (radar outages)."""
    rng = np.random.default_rng(seed)
    rain = rng.gamma(0.6, 2.0, size=(nt, ny, nx)) * (rng.random((nt, ny, nx)) < 0.5)
    rain[:, :, :] *= 1 + np.arange(nx)[None, None, :] / 6  # intensity varies across tiles
    rain[2:6, 0:10, 0:14] = np.nan
    rain[8, 12:, 20:] = np.nan
    rain[:, 5, 30] = np.nan
    return rain.astype(np.float32)


def write_precip(path: Path, data: np.ndarray | None = None, extra: bool = True) -> Path:
    data = precip_field() if data is None else data
    group = zarr.open_group(path, mode="w", zarr_format=3)
    arr = group.create_array(
        "precip",
        shape=data.shape,
        dtype="float32",
        chunks=(1, 6, 6),
        shards=(2, data.shape[1], data.shape[2]),
        compressors=ZstdCodec(),
        fill_value=np.float32("nan"),
        dimension_names=["time", "y", "x"],
    )
    arr[:] = data
    if extra:  # a second variable, complete, on levels
        z = group.create_array(
            "z",
            shape=(data.shape[0], 2, *data.shape[1:]),
            dtype="float32",
            chunks=(1, 2, 12, 12),
            fill_value=np.float32("nan"),
            dimension_names=["time", "level", "y", "x"],
        )
        z[:] = np.arange(z.size, dtype=np.float32).reshape(z.shape)
    return path


def brute_force(stores, variables, agg_var, how, spec: TilingSpec):
    """Independent restatement: loop over every window and tile."""
    group = zarr.open_group(stores, mode="r")
    data = {v: group[v][...] for v in {*variables, agg_var}}
    nt, ny, nx = data[agg_var].shape[0], data[agg_var].shape[-2], data[agg_var].shape[-1]
    h, w = spec.tile
    span = (spec.n_frames - 1) * spec.frame_step + 1
    sy, sx = spec.stride

    def starts(n, t, s):
        out = list(range(0, n - t + 1, s))
        if spec.cover_edges and out[-1] + t < n:
            out.append(n - t)
        return out

    rows = []
    for t0 in range(0, nt - span + 1, spec.time_stride):
        frames = slice(t0, t0 + span, spec.frame_step)
        for y0, x0 in itertools.product(starts(ny, h, sy), starts(nx, w, sx)):
            cut = (frames, Ellipsis, slice(y0, y0 + h), slice(x0, x0 + w))
            windows = [data[v][cut] for v in variables]
            valid = sum(int((~np.isnan(a)).sum()) for a in windows)
            total = sum(a.size for a in windows)
            a = data[agg_var][cut].astype(np.float64)
            with np.errstate(all="ignore"):
                ok = a[~np.isnan(a)]
                value = {
                    "mean": ok.mean() if ok.size else np.nan,
                    "sum": ok.sum() if ok.size else np.nan,
                    "max": ok.max() if ok.size else np.nan,
                }[how]
            rows.append((t0, y0, x0, valid / total, value))
    return pd.DataFrame(rows, columns=["t0", "y0", "x0", "valid_fraction", "aggregate"])


@pytest.mark.parametrize(
    "variables,how,spec",
    [
        (["precip"], "mean", TilingSpec(n_frames=3, tile=(8, 8))),
        (
            ["precip", "z"],
            "max",
            TilingSpec(n_frames=2, tile=(10, 7), frame_step=2, time_stride=3, tile_stride=(5, 9)),
        ),
        (["precip"], "sum", TilingSpec(n_frames=1, tile=(24, 36))),
    ],
)
def test_tiling_index_equals_brute_force(tmp_path, variables, how, spec):
    store = write_precip(tmp_path / "radar.zarr")
    res = build_index(
        store, variables, spec, aggregate_variable="precip", aggregate=how, out_dir=tmp_path / "idx"
    )
    want = brute_force(store, variables, "precip", how, spec)
    got = res.tiling.sort_values(["t0", "y0", "x0"]).reset_index(drop=True)
    want = want.sort_values(["t0", "y0", "x0"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[["t0", "y0", "x0"]], want[["t0", "y0", "x0"]])
    np.testing.assert_allclose(got["valid_fraction"], want["valid_fraction"], rtol=1e-12)
    np.testing.assert_allclose(got["aggregate"], want["aggregate"], rtol=1e-9)
    assert (got["valid_fraction"] < 1).any()  # the NaN regions show
    # written, named as the design proposes, and read back with the parameters
    assert res.tiling_id.startswith("radar.")
    for ext in ("parquet", "csv"):
        path = res.paths[f"tiling.{ext}"]
        assert path.name == f"{res.tiling_id}.samples.{ext}"
        table, params = read_index(path)
        assert params["tiling_id"] == res.tiling_id and params["variables"] == variables
        np.testing.assert_array_equal(table[["t0", "y0", "x0"]], res.tiling[["t0", "y0", "x0"]])


def test_default_ids_follow_the_design(tmp_path):
    store = write_precip(tmp_path / "radar.zarr")
    res = build_index(
        store,
        ["precip"],
        TilingSpec(n_frames=4, tile=(8, 8)),
        sampling=SamplingSpec(),
        out_dir=tmp_path,
    )
    assert res.tiling_id == "radar.8x8.4"
    assert res.sampling_id.startswith("radar.8x8.4.s")
    assert (tmp_path / f"{res.sampling_id}.samples.parquet").exists()
    assert (tmp_path / f"{res.sampling_id}.samples.json").exists()


def _tiled(tmp_path, sampling: SamplingSpec, n_frames=2, tile=(6, 6)):
    store = write_precip(tmp_path / "radar.zarr")
    res = build_index(
        store,
        ["precip"],
        TilingSpec(n_frames=n_frames, tile=tile),
        sampling=sampling,
        out_dir=tmp_path / "idx",
    )
    return store, res


def test_missing_filter_and_bins(tmp_path):
    edges = (0.0, 1.0, 2.0, 4.0, 100.0)
    _, res = _tiled(tmp_path, SamplingSpec(max_missing=0.05, bins=edges))
    tiling, sampled = res.tiling, res.sampling
    kept = tiling[(1 - tiling["valid_fraction"]) <= 0.05]
    assert 0 < len(kept) < len(tiling)  # the NaN regions drop some tiles
    assert len(sampled) == len(kept)  # no quota: every kept tile
    want_bins = np.digitize(sampled["aggregate"], edges[1:-1])  # independent binning
    np.testing.assert_array_equal(sampled["bin"], want_bins)
    assert (sampled["valid_fraction"] >= 0.95).all()


def test_quota_follows_requested_proportions(tmp_path):
    quota = (6, 12, 24)
    _, res = _tiled(tmp_path, SamplingSpec(max_missing=0.2, bins=(0, 1.5, 2.5, 50), quota=quota))
    counts = res.sampling["bin"].value_counts().sort_index().tolist()
    available = (
        pd.cut(
            res.tiling[(1 - res.tiling["valid_fraction"]) <= 0.2]["aggregate"],
            [0, 1.5, 2.5, 50],
            right=False,
        )
        .value_counts(sort=False)
        .tolist()
    )
    assert counts == [min(q, a) for q, a in zip(quota, available, strict=True)]
    assert counts == list(quota)  # this field has enough tiles in every bin
    assert not res.sampling.duplicated(["t0", "y0", "x0"]).any()


def test_accept_probability_per_bin(tmp_path):
    accept = (0.25, 1.0)
    _, res = _tiled(
        tmp_path,
        SamplingSpec(max_missing=1.0, bins=(0, 1.8, 50), accept=accept, seed=3),
        n_frames=1,
        tile=(3, 3),
    )
    before = res.tiling["aggregate"].notna()
    pool = np.clip(np.digitize(res.tiling[before]["aggregate"], [1.8]), 0, 1)
    got = res.sampling["bin"].value_counts()
    n0 = int((pool == 0).sum())
    assert got[1] == int((pool == 1).sum())  # probability 1 keeps every tile
    # binomial(n0, 0.25): within 5 standard deviations
    assert abs(got[0] - 0.25 * n0) < 5 * np.sqrt(n0 * 0.25 * 0.75)


def test_loader_serves_exactly_the_index_across_ranks(tmp_path):
    store, res = _tiled(
        tmp_path, SamplingSpec(max_missing=0.1, bins=(0, 1.5, 2.5, 50), quota=(8, 8, 8))
    )
    path = res.paths["sampling.parquet"]
    want = set(map(tuple, res.sampling[["t0", "y0", "x0"]].to_numpy().tolist()))
    assert len(want) == 24
    oracle = Oracle(store, ["precip"])
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            loader = loader_for(
                store,
                ["precip"],
                index=path,
                tile=(6, 6),
                input_steps=1,
                target_steps=1,
                batch_size=5,
                rank=rank,
                world_size=2,
            )
            batches = run_epochs(loader, [epoch])[epoch]
            check_batches(batches, oracle, input_steps=1, target_steps=1, tile=(6, 6))
            seen.append([tuple(r) for b in batches for r in b["index"].tolist()])
            loader.close()
        assert len(seen[0]) == len(seen[1]) == 12
        assert set(seen[0]).isdisjoint(seen[1])
        assert set(seen[0]) | set(seen[1]) == want
    # CSV carries the same samples (parameters from the sidecar JSON)
    group, name = open_group(store)
    from zarrdali.sampling.epochs import SampleSpec

    spec = SampleSpec(input_steps=1, target_steps=1, tile=(6, 6))
    table = load_sample_index(
        res.paths["sampling.csv"], name, load_layouts(group, name, ["precip"]), spec
    )
    assert set(map(tuple, table.rows.tolist())) == want


def test_loader_with_weights_is_deterministic(tmp_path):
    store, res = _tiled(tmp_path, SamplingSpec(max_missing=0.1, bins=3, balance_weights=True))
    path = res.paths["sampling.parquet"]
    assert "weight" in res.sampling
    rows = set(map(tuple, res.sampling[["t0", "y0", "x0"]].to_numpy().tolist()))
    kw = dict(index=path, tile=(6, 6), input_steps=2, target_steps=0, batch_size=16)
    a = run_epochs(loader_for(store, ["precip"], **kw), [0, 1])
    b = run_epochs(loader_for(store, ["precip"], **kw), [0, 1])
    served = {e: [tuple(r) for x in a[e] for r in x["index"].tolist()] for e in a}
    assert served[0] == [tuple(r) for x in b[0] for r in x["index"].tolist()]
    assert served[0] != served[1]
    assert set(served[0]) <= rows and len(served[0]) == len(rows)


def test_index_mismatch_is_refused(tmp_path):
    store, res = _tiled(tmp_path, SamplingSpec(max_missing=1.0))
    path = res.paths["sampling.parquet"]
    with pytest.raises(ConfigError, match="frames"):
        loader_for(store, ["precip"], index=path, tile=(6, 6), input_steps=3, target_steps=0)
    with pytest.raises(ConfigError, match="variables"):
        loader_for(store, ["precip", "z"], index=path, tile=(6, 6), input_steps=2, target_steps=0)
    with pytest.raises(ConfigError, match="tile"):
        loader_for(store, ["precip"], index=path, tile=(8, 8), input_steps=2, target_steps=0)
    other = write_precip(tmp_path / "other.zarr", precip_field(nt=NT + 2))
    with pytest.raises(ConfigError, match="shape"):
        loader_for(other, ["precip"], index=path, tile=(6, 6), input_steps=2, target_steps=0)
    with pytest.raises(StoreNotFoundError):
        loader_for(
            store, ["precip"], index=tmp_path / "nope.parquet", input_steps=2, target_steps=0
        )


def test_index_bad_input(tmp_path):
    store = write_precip(tmp_path / "radar.zarr")
    out = tmp_path / "idx"
    with pytest.raises(ConfigError, match="larger than the field"):
        build_index(store, ["precip"], TilingSpec(n_frames=1, tile=(NY + 1, 4)), out_dir=out)
    with pytest.raises(ConfigError, match="spans"):
        build_index(store, ["precip"], TilingSpec(n_frames=NT + 1, tile=(4, 4)), out_dir=out)
    with pytest.raises(VariableNotFoundError):
        build_index(store, ["rain"], TilingSpec(n_frames=1, tile=(4, 4)), out_dir=out)
    with pytest.raises(ConfigError, match="quota"):
        SamplingSpec(quota=3, accept=0.5)
    assert not out.exists()  # refused before any work
