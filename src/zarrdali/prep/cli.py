"""Command line of the preparation stages: ``prepare``, ``stats``, ``index``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pair(text: str) -> tuple[int, int]:
    parts = [int(v) for v in text.replace("x", ",").split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected HxW, got {text!r}")
    return parts[0], parts[1]


def _rename(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--rename expects OLD=NEW, got {item!r}")
        out[old] = new
    return out


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare

    path = prepare(
        args.src,
        args.dst,
        variables=args.variables,
        rename=_rename(args.rename),
        time_dim=args.time_dim,
        tile=args.tile,
        time_chunk=args.time_chunk,
        shard_steps=args.shard_steps,
        shard=args.shard,
        shard_mb=args.shard_mb,
        codec=args.codec,
        level=args.level,
        unpack=args.unpack,
        unpack_dtype=args.unpack_dtype,
        overwrite=args.overwrite,
        resume=args.resume,
        scheduler=args.scheduler,
        verify=args.verify,
        progress=not args.quiet,
        storage_options=args.storage_options,
        dst_storage_options=args.dst_storage_options,
    )
    print(path)
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from .stats import compute_stats

    stats = compute_stats(
        args.store,
        args.variables,
        quantiles=args.quantiles,
        show_progress=not args.quiet,
        static=args.static or (),
        raw=args.raw,
    )
    print(json.dumps(stats, indent=2))
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from .index import build_index
    from .sampling import SamplingSpec, as_ints, parse_per_bin
    from .tiling import TilingSpec

    tiling = TilingSpec(
        n_frames=args.window,
        tile=args.tile,
        frame_step=args.frame_step,
        time_stride=args.time_stride,
        tile_stride=args.tile_stride,
        cover_edges=not args.no_cover_edges,
    )
    sampling = None
    if not args.tiling_only:
        bins = parse_per_bin(args.bins)
        sampling = SamplingSpec(
            max_missing=args.max_missing,
            bins=int(bins) if isinstance(bins, float) else bins,
            quota=as_ints(parse_per_bin(args.quota)),
            accept=parse_per_bin(args.accept),
            balance_weights=args.weights,
            seed=args.seed,
        )
    result = build_index(
        args.store,
        args.variables,
        tiling,
        aggregate_variable=args.aggregate_variable,
        aggregate=args.aggregate,
        sampling=sampling,
        out_dir=args.out,
        dataset_id=args.dataset_id,
        show_progress=not args.quiet,
    )
    for key, path in sorted(result.paths.items()):
        print(f"{key}: {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="convert/rechunk a source into sharded Zarr v3 (dask)")
    p.add_argument("src", help="anything xarray opens: NetCDF, Zarr v2/v3, GRIB; path or URL")
    p.add_argument("dst", help="local path or URL (s3://, gs://, ...)")
    p.add_argument(
        "--storage-options",
        type=json.loads,
        help="JSON: credentials/endpoint for URLs (obstore's or fsspec's names)",
    )
    p.add_argument("--dst-storage-options", type=json.loads, help="JSON, for dst (default: as src)")
    p.add_argument("--variables", nargs="+", help="default: all data variables")
    p.add_argument("--rename", nargs="*", default=[], metavar="OLD=NEW")
    p.add_argument("--time-dim", help="default: 'time', else the first dim")
    p.add_argument("--tile", type=_pair, help="inner chunk HxW (default 128x128)")
    p.add_argument("--time-chunk", type=int, default=1, help="steps per inner chunk")
    p.add_argument("--shard-steps", type=int, help="steps per shard (default: ~shard-mb)")
    p.add_argument("--shard", type=_pair, help="shard HxW (default: the padded field)")
    p.add_argument("--shard-mb", type=float, default=64.0)
    p.add_argument("--codec", choices=["zstd", "lz4"], default="zstd")
    p.add_argument("--level", type=int, default=3, help="zstd level")
    p.add_argument(
        "--unpack",
        action="store_true",
        help="write xarray's decoded values (missing values NaN, scale/offset applied) "
        "instead of the stored ones, CF-packed or not",
    )
    p.add_argument(
        "--unpack-dtype",
        default="float32",
        choices=["float32", "float64"],
        help="dtype of the unpacked variables (default float32, what the loader serves)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true", help="finish an interrupted prepare")
    p.add_argument("--scheduler", help="dask.distributed scheduler address")
    p.add_argument(
        "--verify",
        type=int,
        default=4,
        help="time steps compared at the end, as xarray decodes source and output",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("stats", help="mean/std/min/max/NaN fraction into the store's attrs")
    p.add_argument("store")
    p.add_argument("--variables", nargs="+")
    p.add_argument("--static", nargs="+", help="static fields too: (y, x) or (level, y, x) arrays")
    p.add_argument("--quantiles", nargs="*", type=float, default=[])
    p.add_argument(
        "--raw",
        action="store_true",
        help="statistics of the stored values (for decode_cf=False), not of xarray's "
        "decoded ones (scale_factor/add_offset applied); missing values are left out either way",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("index", help="tiling and sampling indexes (Parquet + CSV)")
    p.add_argument("store")
    p.add_argument("--variables", nargs="+", required=True)
    p.add_argument("--window", type=int, required=True, help="frames: input + target steps")
    p.add_argument("--tile", type=_pair, required=True)
    p.add_argument("--frame-step", type=int, default=1)
    p.add_argument("--time-stride", type=int, default=1)
    p.add_argument("--tile-stride", type=_pair)
    p.add_argument("--no-cover-edges", action="store_true")
    p.add_argument("--aggregate-variable", help="default: the first variable")
    p.add_argument("--aggregate", choices=["mean", "sum", "max"], default="mean")
    p.add_argument("--tiling-only", action="store_true")
    p.add_argument("--max-missing", type=float, default=0.0)
    p.add_argument("--bins", default="10", help="number of bins, or edges 'e0,e1,...'")
    p.add_argument("--quota", help="rows per bin: 'N' or 'N0,N1,...'")
    p.add_argument("--accept", help="acceptance probability per bin: 'p' or 'p0,p1,...'")
    p.add_argument("--weights", action="store_true", help="weight rows 1/bin size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="default: STORE's directory /indexes")
    p.add_argument("--dataset-id")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_index)
