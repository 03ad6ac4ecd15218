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
    from zarrdali.prep.prepare import prepare

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
    from zarrdali.prep.stats import compute_stats

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
    from zarrdali.prep.index import build_index
    from zarrdali.prep.sampling import SamplingSpec, as_ints, parse_per_bin
    from zarrdali.prep.tiling import TilingSpec

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
    p = sub.add_parser(
        "prepare",
        help="convert or rechunk a dataset into a loader-friendly sharded Zarr v3 store",
        description="Copies any dataset xarray opens (NetCDF, Zarr v2/v3, GRIB with cfgrib) "
        "into a sharded Zarr v3 store that zarrdali reads fast: one time step per inner "
        "chunk, tile-sized inner chunks, shards of about --shard-mb, zstd (or lz4, both "
        "decodable on the GPU). Runs on dask (the local scheduler, or a dask.distributed "
        "cluster with --scheduler), shard-aligned region by region; an interrupted run "
        "finishes with --resume; a sample of time steps is compared with the source at the "
        "end. Values are copied as stored (no CF masking or scaling) unless --unpack. "
        "NetCDF sources need a NetCDF library: pip install 'zarrdali[netcdf]'.",
    )
    p.add_argument(
        "src", help="source dataset (anything xarray opens: NetCDF, Zarr, GRIB), path or URL"
    )
    p.add_argument("dst", help="destination store: a local path or a URL (s3://, gs://, ...)")
    p.add_argument(
        "--storage-options",
        type=json.loads,
        metavar="JSON",
        help="credentials and endpoint for URLs, as JSON (obstore's or fsspec's names)",
    )
    p.add_argument(
        "--dst-storage-options",
        type=json.loads,
        metavar="JSON",
        help="the same for dst (default: those of --storage-options)",
    )
    p.add_argument("--variables", nargs="+", help="data variables to copy (default: all of them)")
    p.add_argument(
        "--rename",
        nargs="*",
        default=[],
        metavar="OLD=NEW",
        help="rename variables or dimensions in the destination",
    )
    p.add_argument(
        "--time-dim", help="name of the time dimension (default: 'time', else the first one)"
    )
    p.add_argument(
        "--tile", type=_pair, metavar="HxW", help="inner chunk, e.g. 128x128 (default 128x128)"
    )
    p.add_argument("--time-chunk", type=int, default=1, help="time steps per inner chunk")
    p.add_argument(
        "--shard-steps",
        type=int,
        help="time steps per shard (default: as many as fit --shard-mb)",
    )
    p.add_argument(
        "--shard",
        type=_pair,
        metavar="HxW",
        help="spatial extent of a shard (default: the whole field, padded to the tile)",
    )
    p.add_argument(
        "--shard-mb", type=float, default=64.0, help="target size of a shard, uncompressed MB"
    )
    p.add_argument(
        "--codec", choices=["zstd", "lz4"], default="zstd", help="compressor of the inner chunks"
    )
    p.add_argument("--level", type=int, default=3, help="zstd compression level")
    p.add_argument(
        "--unpack",
        action="store_true",
        help="write xarray's decoded values (missing values NaN, scale/offset applied) "
        "instead of the stored ones, CF-packed or not (default: the stored values and "
        "their CF attributes)",
    )
    p.add_argument(
        "--unpack-dtype",
        default="float32",
        choices=["float32", "float64"],
        help="dtype of the unpacked variables (float32 is what the loader serves)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument(
        "--resume", action="store_true", help="finish an interrupted prepare of the same source"
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="dask.distributed scheduler to run on (default: an active client, else "
        "dask's local scheduler)",
    )
    p.add_argument(
        "--verify",
        type=int,
        default=4,
        help="time steps compared at the end, as xarray decodes source and output (0: none)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser(
        "stats",
        help="per-variable mean, std, min, max and NaN fraction into the store's attributes",
        description="Computes each variable's (and each level's) mean, standard deviation, "
        "minimum, maximum and NaN fraction in one dask pass, writes them to the array's "
        "'stats' attribute (ZarrLoader(normalize='store') uses them) and prints them as "
        "JSON. Statistics are of the values the loader serves: CF-decoded by default, "
        "the stored ones with --raw (for decode_cf=False).",
    )
    p.add_argument("store", help="Zarr v3 store: a path or a URL")
    p.add_argument(
        "--variables", nargs="+", help="variables (default: every array with a time axis)"
    )
    p.add_argument(
        "--static",
        nargs="+",
        help="static fields to include too: (y, x) or (level, y, x) arrays such as lsm",
    )
    p.add_argument(
        "--quantiles",
        nargs="*",
        type=float,
        default=[],
        metavar="Q",
        help="quantiles to add, in [0, 1], e.g. 0.01 0.99 (default: none)",
    )
    p.add_argument(
        "--raw",
        action="store_true",
        help="statistics of the stored values (for decode_cf=False), not of xarray's "
        "decoded ones (scale_factor/add_offset applied); missing values are left out either way",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser(
        "index",
        help="tiling and sampling indexes of the windows worth training on (Parquet + CSV)",
        description="Writes the tiling index (every candidate window of --window frames and "
        "--tile grid points, with its fraction of valid values and an aggregate of one "
        "variable) and, unless --tiling-only, the sampling index drawn from it: tiles with "
        "more than --max-missing missing values dropped, the aggregate's distribution "
        "balanced over --bins (a --quota per bin, an --accept probability per bin, or "
        "--weights). ZarrLoader(index='...samples.parquet') serves exactly its samples.",
    )
    p.add_argument("store", help="Zarr v3 store: a path or a URL")
    p.add_argument("--variables", nargs="+", required=True, help="variables of a sample")
    p.add_argument(
        "--window",
        type=int,
        required=True,
        help="frames per sample: input steps + target steps",
    )
    p.add_argument(
        "--tile", type=_pair, required=True, metavar="HxW", help="spatial tile, e.g. 128x128"
    )
    p.add_argument("--frame-step", type=int, default=1, help="store time steps between frames")
    p.add_argument("--time-stride", type=int, default=1, help="time steps between window starts")
    p.add_argument(
        "--tile-stride",
        type=_pair,
        metavar="HxW",
        help="grid points between tile origins (default: the tile, no overlap)",
    )
    p.add_argument(
        "--no-cover-edges",
        action="store_true",
        help="leave out the last row and column of tiles where the field is not a "
        "multiple of the tile (default: they are shifted back to cover the edges)",
    )
    p.add_argument(
        "--aggregate-variable",
        help="variable whose aggregate is recorded per tile (default: the first)",
    )
    p.add_argument(
        "--aggregate",
        choices=["mean", "sum", "max"],
        default="mean",
        help="aggregate of that variable over a window",
    )
    p.add_argument(
        "--tiling-only", action="store_true", help="write the tiling index only, no sampling"
    )
    p.add_argument(
        "--max-missing",
        type=float,
        default=0.0,
        help="drop windows whose fraction of missing values is above this, in [0, 1]",
    )
    p.add_argument(
        "--bins",
        default="10",
        help="bins of the aggregate: a number of equal-width bins, or edges 'e0,e1,...'",
    )
    p.add_argument(
        "--quota", help="windows kept per bin: 'N' or 'N0,N1,...' (default: all of them)"
    )
    p.add_argument("--accept", help="probability of keeping a window, per bin: 'p' or 'p0,p1,...'")
    p.add_argument(
        "--weights",
        action="store_true",
        help="weight each window 1 / its bin's size, so the loader draws every bin alike",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --quota and --accept draws")
    p.add_argument("--out", type=Path, help="output folder (default: indexes/ beside the store)")
    p.add_argument(
        "--dataset-id",
        help="name of the dataset in the index file names (default: from the store's name)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_index)
