"""Command line: ``zarrdali sample-data`` here; each other command registers its own
arguments from its module (``bench/cli.py``, ...) so commands stay independent."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from .sample_data import SampleDataSpec, write_sample_data

    spec = SampleDataSpec(
        n_time=args.n_time,
        n_lat=args.n_lat,
        n_lon=args.n_lon,
        variables=tuple(args.variables),
        seed=args.seed,
    )
    for path in write_sample_data(args.directory, spec, progress=not args.quiet):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zarrdali", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample-data", help="write the ERA5-like sample stores (plain, sharded)")
    p.add_argument("directory", type=Path)
    p.add_argument("--n-time", type=int, default=240, help="hourly steps (default 240)")
    p.add_argument("--n-lat", type=int, default=361)
    p.add_argument("--n-lon", type=int, default=720)
    p.add_argument("--variables", nargs="+", default=["t2m", "u10", "v10", "msl"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_sample_data)

    from .bench.cli import register as register_bench

    register_bench(sub)
    from .prep.cli import register as register_prep

    register_prep(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given, for the records
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
