"""Train a small next-step forecaster on the sample data.

The training loop is written once; ``--loader torch`` feeds it with the usual
torch DataLoader over xarray, ``--loader zarrdali`` with ZarrLoader. The only
line that differs is the one that builds the loader (see ``make_loader``).

    python examples/train.py                       # zarrdali, CPU path here
    python examples/train.py --loader torch        # the DataLoader it replaces
    python examples/train.py --device cuda         # GPU path, where there is one
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

import zarrdali
from zarrdali.sample_data import PLAIN, SHARDED, sample_data_exists, write_sample_data

VARIABLES = ["t2m", "u10", "v10", "msl"]
# Rough climatological mean/std of the sample data, per variable.
STATS = {"t2m": (288.0, 12.0), "u10": (0.0, 6.0), "v10": (0.0, 4.5), "msl": (101325.0, 600.0)}
INPUT_STEPS, TARGET_STEPS, TILE = 4, 1, (64, 64)


class XarrayTiles(torch.utils.data.Dataset):
    """The usual approach: index xarray per sample (random tiles, normalized)."""

    def __init__(self, store: str, seed: int = 0) -> None:
        self.store, self.ds = store, None
        ds = xr.open_zarr(store, consolidated=False)
        n_t, ny, nx = ds[VARIABLES[0]].shape
        rng = np.random.default_rng(seed)
        n = (n_t - INPUT_STEPS - TARGET_STEPS + 1) * (ny // TILE[0]) * (nx // TILE[1])
        self.index = np.stack(
            [
                rng.integers(0, n_t - INPUT_STEPS - TARGET_STEPS + 1, n),
                rng.integers(0, ny - TILE[0] + 1, n),
                rng.integers(0, nx - TILE[1] + 1, n),
            ],
            axis=1,
        )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        if self.ds is None:  # open in the worker process
            self.ds = xr.open_zarr(self.store, consolidated=False)
        t0, y0, x0 = (int(v) for v in self.index[i])
        window = self.ds[VARIABLES].isel(
            time=slice(t0, t0 + INPUT_STEPS + TARGET_STEPS),
            latitude=slice(y0, y0 + TILE[0]),
            longitude=slice(x0, x0 + TILE[1]),
        )
        x = np.stack([(window[v].values - STATS[v][0]) / STATS[v][1] for v in VARIABLES], axis=1)
        x = torch.from_numpy(x.astype(np.float32))
        return {
            "input": x[:INPUT_STEPS],
            "target": x[INPUT_STEPS:],
            "index": torch.tensor([t0, y0, x0]),
        }


def make_loader(kind: str, store: str, device: str, batch_size: int):
    if kind == "torch":
        return torch.utils.data.DataLoader(
            XarrayTiles(store), batch_size=batch_size, shuffle=True, num_workers=2
        )
    return zarrdali.ZarrLoader(
        store,
        VARIABLES,
        input_steps=INPUT_STEPS,
        target_steps=TARGET_STEPS,
        tile=TILE,
        batch_size=batch_size,
        shuffle=True,
        seed=0,
        device=device,
        normalize=STATS,
        tile_sampling="random",
    )


class NextStep(nn.Module):
    """Input frames stacked as channels → the next frame of every variable."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(INPUT_STEPS * channels, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, C, H, W]
        b, t, c, h, w = x.shape
        last = x[:, -1]
        return (last + self.net(x.reshape(b, t * c, h, w)))[:, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loader", choices=["zarrdali", "torch"], default="zarrdali")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data-dir", default="sample-data")
    parser.add_argument("--layout", choices=["plain", "sharded"], default="sharded")
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tile", type=int, default=64, help="square tile size")
    args = parser.parse_args()
    global TILE
    TILE = (args.tile, args.tile)

    if not sample_data_exists(args.data_dir):
        write_sample_data(args.data_dir)
    store = str(Path(args.data_dir) / (SHARDED if args.layout == "sharded" else PLAIN))
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = NextStep(len(VARIABLES)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    loader = make_loader(args.loader, store, args.device, args.batch_size)  # the one line
    step, epoch, start = 0, 0, time.perf_counter()
    while step < args.steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            x = batch["input"].to(device, non_blocking=True)
            y = batch["target"].to(device, non_blocking=True)
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 25 == 0 or step == 1:
                rate = step * args.batch_size / (time.perf_counter() - start)
                print(f"epoch {epoch} step {step:4d} loss {loss.item():.4f} ({rate:.0f} samples/s)")
            if step >= args.steps:
                break
        epoch += 1
    print(f"done: {step} steps in {time.perf_counter() - start:.1f} s with --loader {args.loader}")


if __name__ == "__main__":
    main()
