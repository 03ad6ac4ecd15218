"""From a NetCDF file to a trained step: prepare -> stats -> index -> loader.

    python examples/prepare_and_train.py                 # writes a synthetic radar NetCDF
    python examples/prepare_and_train.py --src FILE.nc --variable rr

Needs a NetCDF library for xarray: pip install 'zarrdali[netcdf]' (netCDF4).

The same with the command line:

    zarrdali prepare radar.nc radar.zarr --tile 32x32
    zarrdali stats radar.zarr
    zarrdali index radar.zarr --variables rr --window 4 --tile 32x32 \
        --max-missing 0.1 --bins 5 --weights
"""

from __future__ import annotations

import argparse
import tempfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

import zarrdali
from zarrdali.prep.index import build_index
from zarrdali.prep.prepare import prepare
from zarrdali.prep.sampling import SamplingSpec
from zarrdali.prep.stats import compute_stats
from zarrdali.prep.tiling import TilingSpec

INPUT_STEPS, TARGET_STEPS, TILE = 3, 1, (32, 32)


def synthetic_radar(path: Path, nt: int = 48, ny: int = 96, nx: int = 128) -> Path:
    """Moving rain cells with a radar outage (NaN) and an unobserved corner."""
    yy, xx = np.mgrid[0:ny, 0:nx]
    rain = np.zeros((nt, ny, nx), np.float32)
    for t in range(nt):
        for k, (cy, cx, r) in enumerate([(30, 20, 12), (60, 80, 20), (20, 100, 8)]):
            d2 = (yy - cy - 0.3 * t) ** 2 + (xx - (cx + 1.5 * t * (k + 1)) % nx) ** 2
            rain[t] += (8.0 / (k + 1)) * np.exp(-d2 / (2 * r**2))
    rain[10:14] = np.nan  # outage
    rain[:, :20, :24] = np.nan  # outside radar range
    ds = xr.Dataset(
        {"rr": (("time", "y", "x"), rain, {"units": "mm h-1", "long_name": "rain rate"})},
        coords={"time": ("time", np.arange(nt) * 5.0, {"units": "minutes since 2024-06-01"})},
    )
    ds["rr"].encoding["_FillValue"] = np.float32(np.nan)
    ds.to_netcdf(path)
    return path


def main() -> None:
    if not any(find_spec(name) for name in ("netCDF4", "h5netcdf", "scipy")):
        raise SystemExit(
            "this example reads and writes NetCDF: pip install 'zarrdali[netcdf]' (netCDF4)"
        )
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", type=Path, help="a NetCDF file (default: synthetic radar)")
    parser.add_argument("--variable", default="rr")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="zarrdali-prep-"))
    work.mkdir(parents=True, exist_ok=True)
    src = args.src or synthetic_radar(work / "radar.nc")

    # 1. prepare: sharded Zarr v3, inner chunks = the training tile, zstd
    store = work / "radar.zarr"
    if not store.exists():  # a rerun with --workdir reuses it
        prepare(src, store, variables=[args.variable], tile=TILE)
    # 2. stats into the store's attributes (normalize="store" reads them)
    stats = compute_stats(store, [args.variable])
    print("stats:", {k: stats[args.variable][k] for k in ("mean", "std", "nan_fraction")})
    # 3. tiling index, then drop tiles with >10% missing and weight bins of mean rain
    result = build_index(
        store,
        [args.variable],
        TilingSpec(n_frames=INPUT_STEPS + TARGET_STEPS, tile=TILE, tile_stride=(16, 16)),
        sampling=SamplingSpec(max_missing=0.1, bins=5, balance_weights=True),
        out_dir=work / "indexes",
    )
    print(f"tiling {result.tiling_id}: {len(result.tiling)} tiles; "
          f"sampling {result.sampling_id}: {len(result.sampling)} kept")  # fmt: skip
    # 4. the loader serves exactly the sampled tiles, weighted by bin
    loader = zarrdali.ZarrLoader(
        store,
        [args.variable],
        input_steps=INPUT_STEPS,
        target_steps=TARGET_STEPS,
        tile=TILE,
        batch_size=8,
        shuffle=True,
        device="cpu",
        normalize="store",
        index=result.paths["sampling.parquet"],
        workers=0,
    )
    model = nn.Conv2d(INPUT_STEPS, TARGET_STEPS, 3, padding=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step, batch in enumerate(loader):
        x = torch.nan_to_num(batch["input"][:, :, 0])  # [B, T, H, W]: frames as channels
        y = torch.nan_to_num(batch["target"][:, :, 0])
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")
        if step == 4:
            break
    loader.close()
    print("work directory:", work)


if __name__ == "__main__":
    main()
