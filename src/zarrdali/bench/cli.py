"""``zarrdali bench``: its command-line arguments."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_DATA_DIR = Path(os.environ.get("ZARRDALI_DATA", "sample-data"))


def _ensure_sample_data(directory: Path) -> list[tuple[str, str]]:
    from ..sample_data import PLAIN, SHARDED, sample_data_exists, write_sample_data

    if not sample_data_exists(directory):
        print(f"writing the sample data to {directory} (once)", file=sys.stderr)
        write_sample_data(directory)
    return [("plain", str(directory / PLAIN)), ("sharded", str(directory / SHARDED))]


def _cmd_bench(args: argparse.Namespace) -> int:
    from .main import LOADERS, run_bench
    from .spec import BenchSpec

    if args.store:
        stores = [(Path(args.store).name, args.store)]
    else:
        stores = _ensure_sample_data(Path(args.data_dir))
    loaders = args.loaders or list(LOADERS)
    if args.device:
        loaders = [
            n for n in loaders if not n.startswith("zarrdali-") or n == f"zarrdali-{args.device}"
        ]
    variables = args.variables
    if not variables:
        import zarr

        group = zarr.open_group(stores[0][1], mode="r")
        variables = [name for name, arr in group.arrays() if arr.ndim >= 3]
    spec = BenchSpec(
        store=stores[0][1],
        variables=tuple(variables),
        input_steps=args.input_steps,
        target_steps=args.target_steps,
        tile=None if args.tile is None else tuple(args.tile),
        batch_size=args.batch_size,
        batches=args.batches,
        epochs=args.epochs,
        warmup_batches=args.warmup,
        seed=args.seed,
        num_threads=args.threads,
    )
    payload = run_bench(stores, spec, loaders, args.out, progress=not args.quiet)
    print(payload["table"])
    for name, value in payload["ratios"].items():
        print(f"{name}: {value:.2f}x")
    print(
        f"results in {args.out}/ (bench.json, bench.md"
        + (", throughput.png)" if payload["plot"] else ")")
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="compare loaders on one store (default: the sample data)")
    p.add_argument("store", nargs="?", help="Zarr v3 store; default: sample data, both layouts")
    p.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        help="where the sample data lives or is written (default ./sample-data)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="only this zarrdali path")
    p.add_argument("--loaders", nargs="+", help="subset of loaders to run")
    p.add_argument("--variables", nargs="+")
    p.add_argument("--input-steps", type=int, default=4)
    p.add_argument("--target-steps", type=int, default=2)
    p.add_argument("--tile", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=40, help="timed batches per epoch")
    p.add_argument("--epochs", type=int, default=3, help="repeats (median and spread)")
    p.add_argument("--warmup", type=int, default=4, help="untimed batches per epoch")
    p.add_argument("--threads", type=int, help="zarrdali threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_bench)
