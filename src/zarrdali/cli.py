"""The ``zarrdali`` command (also ``python -m zarrdali``).

``sample-data`` is defined here; every other command registers its own arguments
from its module (``bench/cli.py``, ``prep/cli.py``) so commands stay
independent. :func:`main` turns a user's mistake into one line on stderr (the
traceback with ``-v``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

DESCRIPTION = """\
zarrdali: a training data loader for Earth-science arrays in Zarr v3.

Write the sample data and compare zarrdali with the usual loaders on it
(`zarrdali bench`), convert your own data to a loader-friendly store
(`zarrdali prepare`), compute normalization statistics (`zarrdali stats`) and
sample indexes (`zarrdali index`). `zarrdali COMMAND --help` describes each
command's options."""

EPILOG = """\
examples:
  zarrdali bench                              benchmark the loaders on the sample data
  zarrdali prepare era5.nc era5.zarr --tile 128x128
  zarrdali stats era5.zarr
  zarrdali index radar.zarr --variables rr --window 4 --tile 128x128 --max-missing 0.1

In Python: zarrdali.ZarrLoader(store, variables, ...); help(zarrdali.ZarrLoader)
lists its arguments."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, where the help does not name it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS, []):
            return text
        return super()._get_help_string(action)


class TopHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """``zarrdali --help``: its description and examples as written."""


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from zarrdali.sample_data import SampleDataSpec, write_sample_data

    spec = SampleDataSpec(
        n_time=args.n_time,
        n_lat=args.n_lat,
        n_lon=args.n_lon,
        variables=tuple(args.variables),
        seed=args.seed,
    )
    for path in write_sample_data(args.directory.expanduser(), spec, progress=not args.quiet):
        print(path)
    return 0


def _version() -> str:
    from zarrdali import __version__

    return __version__


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """``-v`` on a command too (``zarrdali bench -v``), without overriding the top level's."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logging, and the full traceback of an error",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zarrdali", description=DESCRIPTION, epilog=EPILOG, formatter_class=TopHelpFormatter
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and the full traceback of an error",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "sample-data",
        help="write the ERA5-like sample stores (plain and sharded layouts)",
        description="Writes the embedded sample dataset, an ERA5-like global grid of "
        "t2m, u10, v10 and msl (hourly, float32, zstd) with two static fields (lsm, "
        "orography), in two layouts: era5_plain.zarr (one chunk per field) and "
        "era5_sharded.zarr (128x128 inner chunks in day-long shards, as `zarrdali "
        "prepare` writes). About 1 GB at the default size.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("directory", type=Path, help="folder to write the two stores into")
    p.add_argument("--n-time", type=int, default=240, help="hourly time steps")
    p.add_argument("--n-lat", type=int, default=361, help="latitudes (0.5 degree grid: 361)")
    p.add_argument("--n-lon", type=int, default=720, help="longitudes (0.5 degree grid: 720)")
    p.add_argument(
        "--variables",
        nargs="+",
        default=["t2m", "u10", "v10", "msl"],
        help="variables to write, among t2m, u10, v10, msl",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic noise")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sample_data)

    from zarrdali.bench.cli import register as register_bench

    register_bench(sub)
    from zarrdali.prep.cli import register as register_prep

    register_prep(sub)
    for command in sub.choices.values():
        add_verbose(command)
        command.formatter_class = HelpFormatter
    return parser


def error_line(err: BaseException) -> str:
    """One line for the user: the error's type and its whole message."""
    message = " ".join(str(err).split())  # one line, nothing left out
    if isinstance(err, ModuleNotFoundError) and err.name:
        message += " (a package this command needs is not installed)"
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the ``zarrdali`` command line; returns the exit status.

    A zarrdali error, a missing file or a bad value prints one line on stderr
    (``zarrdali: error: ...``) and returns 1; ``-v`` shows the traceback too.
    """
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given, for the records
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("zarrdali: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else " (-v for the traceback)"
        print(f"zarrdali {args.command}: error: {error_line(err)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
