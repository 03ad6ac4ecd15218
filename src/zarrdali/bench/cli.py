"""``zarrdali bench``: its command-line arguments, optionally from a TOML file."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from zarrdali.bench.options import DEFAULT_DATA_DIR, DEFAULTS, load_config


def resolve(args: argparse.Namespace) -> dict:
    """Defaults, then the --config file, then the flags given on the command line."""
    options = dict(DEFAULTS)
    if args.config:
        options.update(load_config(args.config))
    options.update({k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None})
    return options


def _ensure_sample_data(directory: Path) -> list[tuple[str, str]]:
    from zarrdali.sample_data import PLAIN, SHARDED, sample_data_exists, write_sample_data

    if not sample_data_exists(directory):
        print(f"writing the sample data to {directory} (once)", file=sys.stderr)
        write_sample_data(directory)
    return [("plain", str(directory / PLAIN)), ("sharded", str(directory / SHARDED))]


# The bench extra's packages the command cannot do without (the peers it brings,
# TensorStore, zarrs and xbatcher, are rows that say so when missing).
REQUIRED = {"psutil": "CPU time and memory of every loader", "matplotlib": "the plots"}


def missing_requirements() -> list[str]:
    """The packages of ``REQUIRED`` this environment lacks."""
    from importlib.util import find_spec

    return [name for name in REQUIRED if find_spec(name) is None]


def bench_targets(
    stores: list[tuple[str, str]],
    placement: str,
    loaders: list[str],
    spec,
    *,
    explicit: bool = False,
) -> list:
    """What to run, as ``BenchTarget`` s: every store at ``placement``; with
    "both", every store on the grid and, where the store's chunks divide the
    tile, on the chunk grid too (without the slow torch DataLoader row unless
    the loaders were named: its ratio is on the grid rows)."""
    from zarrdali.bench.main import BASELINE_LOADER, BenchTarget

    if placement != "both":
        label = "" if placement == "grid" else ", chunk-grid tiles"
        return [BenchTarget(f"{name}{label}", path, placement) for name, path in stores]
    targets = [BenchTarget(name, path, "grid") for name, path in stores]
    grid_loaders = tuple(n for n in loaders if explicit or n != BASELINE_LOADER)
    for name, path in stores:
        if tiles_whole_chunks(path, spec):
            targets.append(
                BenchTarget(f"{name}, chunk-grid tiles", path, "chunk-grid", grid_loaders)
            )
    return targets


def tiles_whole_chunks(path: str, spec) -> bool:
    """Whether tiles on the grid of ``spec.tile`` are whole (inner) chunks of every
    variable of the store (False for a remote store or whole fields: not asked)."""
    if spec.tile is None or "://" in path:
        return False
    from zarrdali.store.open import open_group

    try:
        group, _ = open_group(path, spec.storage_options)
        chunks = [group[name].chunks[-2:] for name in spec.variables]
    except Exception:  # the bench itself reports what is wrong with the store
        return False
    return all(t % c == 0 for shape in chunks for t, c in zip(spec.tile, shape, strict=True))


def _cmd_bench(args: argparse.Namespace) -> int:
    from zarrdali.bench.main import DEFAULT_LOADERS, LOADERS, run_bench
    from zarrdali.bench.spec import BenchSpec
    from zarrdali.io.remote import redact_argv

    missing = missing_requirements()
    if missing:
        needs = ", ".join(f"{name} ({REQUIRED[name]})" for name in missing)
        print(
            f"zarrdali bench: error: the benchmark needs the 'bench' extra, missing {needs}: "
            "pip install 'zarrdali[bench]'",
            file=sys.stderr,
        )
        return 2
    try:
        o = resolve(args)
    except (OSError, ValueError) as err:
        print(f"zarrdali bench: error: {err}", file=sys.stderr)
        return 2
    if o["workload"] == "whole-field":
        from zarrdali.bench.wholefield import cmd_whole_field

        return cmd_whole_field(args)
    if o["store"] and "://" in str(o["store"]):  # a URL: Path() would fold its "//"
        stores = [(str(o["store"]).rstrip("/").rsplit("/", 1)[-1], str(o["store"]))]
    elif o["store"]:
        stores = [(Path(o["store"]).name, str(o["store"]))]
    else:
        stores = _ensure_sample_data(Path(o["data_dir"]))
    loaders = list(o["loaders"] or (LOADERS if o["all"] else DEFAULT_LOADERS))
    if o["device"]:
        loaders = [
            n
            for n in loaders
            if not n.startswith("zarrdali-") or n.startswith(f"zarrdali-{o['device']}")
        ]
    variables = o["variables"]
    if not variables:
        from zarrdali.store.open import open_group

        group, _ = open_group(stores[0][1], o["storage_options"])
        variables = [name for name, arr in group.arrays() if arr.ndim >= 3]
    sizes = o["batch_size"]
    sizes = [int(b) for b in (sizes if isinstance(sizes, (list, tuple)) else [sizes])]
    base = BenchSpec(
        store=stores[0][1],
        variables=tuple(variables),
        input_steps=o["input_steps"],
        target_steps=o["target_steps"],
        tile=None if o["tile"] is None else tuple(o["tile"]),
        epochs=o["epochs"],
        seed=o["seed"],
        num_threads=o["threads"],
        step_ms=float(o["step_ms"]),
        cold=bool(o["cold"]),
        storage_options=o["storage_options"],
    )
    specs = [base.at_batch_size(b, o["samples"], o["batches"], o["warmup"]) for b in sizes]
    argv = getattr(args, "argv", sys.argv[1:])
    command = shlex.join(["zarrdali", *redact_argv(argv)])  # no secret written
    targets = bench_targets(stores, o["placement"], loaders, base, explicit=bool(o["loaders"]))
    payload = run_bench(targets, specs, loaders, o["out"], progress=not args.quiet, command=command)
    print(payload["table"].split("\n\n- ", 1)[0])  # the verdict follows, printed below
    if o["all"] or o["loaders"]:  # every ratio the project's goals are stated in
        for name, value in payload["ratios"].items():
            print(f"{name}: {value:.2f}x")
    if payload["verdict"]:
        print("\nverdict (median samples/s):")
        for line in payload["verdict"]:
            print(f"  {line}")
    if not (o["all"] or o["loaders"]):
        print("\nevery loader and ratio: zarrdali bench --all (17 loaders, several times longer)")
    files = ["bench.json", "bench.md", *payload["plots"]]
    minutes = payload["wall_seconds"] / 60
    print(f"results in {o['out']}/ ({', '.join(files)}); the loaders ran {minutes:.1f} min")
    return 0


def _cmd_bench_host(args: argparse.Namespace) -> int:
    from zarrdali.bench.host import run_host_bench

    if args.store:
        stores = [(Path(args.store).name, args.store)]
    else:
        stores = _ensure_sample_data(Path(args.data_dir or DEFAULT_DATA_DIR))
    variables = args.variables
    if not variables:
        import zarr

        group = zarr.open_group(stores[0][1], mode="r")
        variables = [name for name, arr in group.arrays() if arr.ndim >= 3]
    payload = run_host_bench(
        stores,
        variables,
        args.out,
        input_steps=args.input_steps,
        target_steps=args.target_steps,
        tile=tuple(args.tile),
        batch_size=args.batch_size,
        batches=args.batches,
        rounds=args.rounds,
    )
    print(payload["table"])
    print(f"results in {args.out}/ (host.json, host.md)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "bench-host",
        help="host time per batch to plan, locate and describe it (no GPU needed)",
        description="Times the per-batch host work of both paths (plan, locate, describe): "
        "everything but reading, decoding and gathering, on each store. Writes host.json "
        "and host.md.",
    )
    p.add_argument(
        "store", nargs="?", help="Zarr v3 store (default: the sample data, both layouts)"
    )
    p.add_argument("--data-dir", help="where the sample data lives (default ./sample-data)")
    p.add_argument(
        "--variables", nargs="+", help="variables to load (default: every array with >= 3 dims)"
    )
    p.add_argument("--input-steps", type=int, default=4, help="history frames per sample")
    p.add_argument("--target-steps", type=int, default=2, help="forecast frames per sample")
    p.add_argument(
        "--tile",
        type=int,
        nargs=2,
        default=[128, 128],
        metavar=("H", "W"),
        help="spatial tile in grid points",
    )
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    p.add_argument("--batches", type=int, default=50, help="batches per round")
    p.add_argument("--rounds", type=int, default=3, help="timed passes over the batches")
    p.add_argument("--out", default="bench-out", help="output folder")
    p.set_defaults(func=_cmd_bench_host)

    p = sub.add_parser(
        "bench",
        help="compare zarrdali with the usual loaders on one store (default: the sample data)",
        description="Runs zarrdali and the loaders you would use instead on the same store "
        "and the same samples, epoch by epoch in turn, and prints a table and a short "
        "verdict: zarrdali's samples/s against the torch DataLoader over xarray, the "
        "fastest peer (TensorStore; --all adds zarr-python + zarrs and more) and the "
        "ceiling (reading and "
        "decoding exactly the chunks each batch needs, nothing else). Writes bench.json, "
        "bench.md and throughput.png to the output folder. Without a store it writes "
        "the sample data once (about 1 GB) and runs on both its layouts (a few minutes on "
        "2 cores); --all runs every loader and variant. Needs the bench extra: "
        "pip install 'zarrdali[bench]'. Options may also come from --config FILE.toml "
        "(keys as the flags); flags given override the file.",
    )
    p.add_argument(
        "store", nargs="?", help="Zarr v3 store (default: the sample data, both layouts)"
    )
    p.add_argument("--config", help="TOML file with any of the options below")
    p.add_argument(
        "--data-dir", help="where the sample data lives or is written (default ./sample-data)"
    )
    p.add_argument(
        "--all",
        action="store_true",
        default=None,
        help="every loader and variant (zarrdali's options, more peers and decode "
        "ceilings), and every ratio; default: zarrdali, the ceiling, TensorStore, "
        "and the torch DataLoader",
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], help="only this zarrdali path (default: both)"
    )
    p.add_argument(
        "--loaders",
        nargs="+",
        metavar="NAME",
        help="these loaders only, by name (zarrdali-cpu, zarrdali-cuda, file-ceiling, "
        "tensorstore, zarr-zarrs, torch-xarray, xbatcher, ...: an unknown name lists them)",
    )
    p.add_argument(
        "--variables", nargs="+", help="variables to load (default: every array with >= 3 dims)"
    )
    p.add_argument("--input-steps", type=int, help="history frames per sample (default 4)")
    p.add_argument("--target-steps", type=int, help="forecast frames per sample (default 2)")
    p.add_argument(
        "--tile",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="spatial tile in grid points (default 128 128)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        help="one or more batch sizes, each benchmarked in turn (default 8 64)",
    )
    p.add_argument(
        "--samples", type=int, help="timed samples per epoch at each batch size (default 512)"
    )
    p.add_argument(
        "--batches",
        type=int,
        help="timed batches per epoch at every batch size (default: from --samples, >= 8)",
    )
    p.add_argument(
        "--epochs", type=int, help="timed epochs per loader: median and spread (default 3)"
    )
    p.add_argument(
        "--warmup", type=int, help="untimed batches per epoch (default: 32 samples, >= 4)"
    )
    p.add_argument(
        "--threads",
        type=int,
        help="threads or worker processes per loader (default: one per core)",
    )
    p.add_argument("--seed", type=int, help="seed of the sample order (default 0)")
    p.add_argument(
        "--step-ms",
        type=float,
        help="simulate a training step of this many ms per batch and report the "
        "fraction of time the consumer waited for data (default 0: none)",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        default=None,
        help="drop the store's files from the page cache before each timed epoch "
        "(posix_fadvise, no root needed)",
    )
    p.add_argument(
        "--storage-options",
        type=json.loads,
        help='credentials and endpoint of a URL store, as JSON, e.g. \'{"region": "us-west-2"}\'',
    )
    p.add_argument("--out", help="output folder (default ./bench-out)")
    p.add_argument(
        "--workload",
        choices=["tiles", "whole-field"],
        help="tiles (default) or whole-field: whole fields with every level, batch 1-4, "
        "on a WeatherBench2-layout store (written into --data-dir on first use)",
    )
    p.add_argument(
        "--placement",
        choices=["grid", "chunk-grid", "both"],
        help="where tiles lie: grid (the loader's default grid, with tiles flush with "
        "the far edges), chunk-grid (only tiles that are whole inner chunks, as a "
        "tiling index gives them on a store chunked like the tile), or both (default: "
        "grid on every store, plus chunk-grid rows without the torch DataLoader on "
        "each store whose chunks divide the tile)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench)
