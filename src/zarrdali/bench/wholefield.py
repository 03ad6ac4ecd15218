"""The whole-field workload of ``zarrdali bench --workload whole-field``.

Global models (GraphCast, FourCastNet, Pangu-style) read whole fields with every
pressure level, a few samples per batch. This workload times that on the
WeatherBench2-layout sample store (:mod:`zarrdali.sample_wb2`: five
``(time, level, latitude, longitude)`` variables chunked one step with all
levels per chunk, and surface variables), with ``tile=None``, every variable
and level as channels, 2 input steps and 1 target step (GraphCast's), at
batch sizes 1, 2 and 4, for the rows a user of such a model compares:

- zarrdali[cpu] (worker processes, the CPU path),
- the numcodecs decode ceiling from the files (pread + decode of the chunks
  each batch touches, all threads, nothing assembled),
- TensorStore (zarr3 driver, no cache, one read per sample and variable),
- a torch DataLoader over xarray (one ``isel`` per sample and variable).

The rows are the shared benchmark's runners (``bench/runners.py``), run by
:func:`zarrdali.bench.main.run_bench`, so they are timed as every other row.
Besides samples/s this workload reports GB/s: the decoded bytes of the
samples served per second (samples/s x the float32 bytes of one sample, its
``input`` and ``target`` fields), the same measure for every row; the table's
"decoded GB/s" column is the bytes of the chunks a loader decoded (zarrdali and
the ceiling decode a chunk two samples of a batch share once).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from zarrdali.bench.spec import BenchSpec
from zarrdali.sample_wb2 import WB2_STORE, WB2SampleSpec, wb2_sample_exists, write_wb2_sample

WORKLOAD = "whole-field"
# Rows of this workload (names of bench.main.LOADERS), the first two compared with the rest.
LOADERS = ("zarrdali-cpu", "file-ceiling", "tensorstore", "torch-xarray")
ZARRDALI, CEILING, TENSORSTORE = "zarrdali[cpu]", "numcodecs ceiling from files", "TensorStore"

# What differs from the tile workload's defaults (bench/cli.py DEFAULTS).
DEFAULTS: dict[str, object] = {
    "input_steps": 2,
    "target_steps": 1,
    "tile": None,
    "batch_size": [1, 2, 4],
    "samples": 24,  # timed samples per epoch at each batch size (at least 8 batches)
    "warmup": 4,  # untimed batches per epoch
    "out": "bench-out/whole-field",
}


def sample_nbytes(spec: BenchSpec, channels: int, field: tuple[int, int]) -> int:
    """Decoded float32 bytes of one sample: every frame, channel and point."""
    return spec.n_frames * channels * field[0] * field[1] * 4


def ensure_store(data_dir: str | Path, progress: bool = True) -> str:
    """The WeatherBench2-layout sample store in ``data_dir``, written on first use."""
    data_dir = Path(data_dir)
    if not wb2_sample_exists(data_dir):
        print(f"writing the WeatherBench2-layout sample store to {data_dir} (once)",
              file=sys.stderr)  # fmt: skip
        write_wb2_sample(data_dir, WB2SampleSpec(), progress=progress)
    return str(data_dir / WB2_STORE)


def whole_field_rows(payload: dict, spec: BenchSpec, channels: int, field: tuple[int, int]):
    """Per batch size and row: samples/s and GB/s of samples served, and zarrdali's
    ratios to the ceiling and to TensorStore (samples/s, the same work)."""
    per_sample = sample_nbytes(spec, channels, field)
    table = []
    for row in payload["results"]:
        s = row["summary"]
        rate = s["samples_per_s"]["median"] if s["status"] == "ok" else None
        table.append(
            {
                "batch_size": row["batch_size"],
                "loader": s["name"],
                "status": s["status"],
                "samples_per_s": rate,
                "samples_per_s_range": [s["samples_per_s"]["min"], s["samples_per_s"]["max"]],
                "gb_per_s": None if rate is None else rate * per_sample / 1e9,
                # robust where the machine is shared: what a sample costs, not how
                # much of the machine the loader got
                "cpu_ms_per_sample": (s.get("cpu_ms_per_sample") or {}).get("median"),
                "peak_rss_gb": s.get("peak_rss_gb"),
                "note": s["note"] if s["status"] == "ok" else s["error"],
            }
        )
    ratios = {}
    for b in dict.fromkeys(r["batch_size"] for r in table):
        here = {r["loader"]: r["samples_per_s"] for r in table if r["batch_size"] == b}
        ours = here.get(ZARRDALI)
        for name, rate in here.items():
            if ours and rate and name != ZARRDALI and name.startswith((CEILING, TENSORSTORE)):
                ratios[f"batch {b}: {ZARRDALI} / {name}"] = ours / rate
    return table, ratios, per_sample


def markdown(table: list[dict], ratios: dict[str, float], per_sample: int, header: str) -> str:
    lines = [
        header,
        "",
        f"whole fields, every level; one sample = {per_sample / 1e6:.1f} MB decoded (float32)",
        "",
        "| batch | loader | samples/s median (min–max) | GB/s (samples served) "
        "| CPU ms/sample | peak memory GB | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        rate = gb = cpu = mem = "–"
        if r["samples_per_s"] is not None:
            lo, hi = r["samples_per_s_range"]
            rate = f"{r['samples_per_s']:.2f} ({lo:.2f}–{hi:.2f})"
            gb = f"{r['gb_per_s']:.2f}"
            cpu = "–" if r["cpu_ms_per_sample"] is None else f"{r['cpu_ms_per_sample']:.1f}"
            mem = "–" if r["peak_rss_gb"] is None else f"{r['peak_rss_gb']:.2f}"
        note = f"{r['status']}: {r['note']}" if r["status"] != "ok" else r["note"]
        cells = [str(r["batch_size"]), r["loader"], rate, gb, cpu, mem, note.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {name}: {value:.2f}x" for name, value in ratios.items()]
    return "\n".join(lines)


def run_whole_field(
    store: str,
    variables: list[str] | None,
    batch_sizes: list[int],
    out_dir: str | Path,
    *,
    loaders: list[str] | None = None,
    input_steps: int = 2,
    target_steps: int = 1,
    samples: int = 24,
    batches: int | None = None,
    warmup: int | None = 4,
    epochs: int = 3,
    threads: int | None = None,
    seed: int = 0,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Run the workload on ``store``; writes bench.json, bench.md, the plot and
    whole_field.md (and .json) into ``out_dir``. Returns the bench payload with
    ``whole_field`` (rows), ``whole_field_ratios`` and ``whole_field_table``."""
    import json

    import zarr

    from zarrdali.bench.main import run_bench
    from zarrdali.bench.report import header_text

    group = zarr.open_group(store, mode="r")
    if not variables:
        variables = sorted(v for v, arr in group.arrays() if arr.ndim >= 3)
    shapes = [group[v].shape for v in variables]
    channels = sum(1 if len(shape) == 3 else shape[1] for shape in shapes)
    field = (int(shapes[0][-2]), int(shapes[0][-1]))
    base = BenchSpec(
        store=store,
        variables=tuple(variables),
        input_steps=input_steps,
        target_steps=target_steps,
        tile=None,
        epochs=epochs,
        seed=seed,
        num_threads=threads,
    )
    specs = [base.at_batch_size(b, samples, batches, warmup) for b in batch_sizes]
    label = Path(store).name
    payload = run_bench(
        [(label, store)], specs, list(loaders or LOADERS), out_dir,
        progress=progress, command=command,
    )  # fmt: skip
    table, ratios, per_sample = whole_field_rows(payload, specs[0], channels, field)
    text = markdown(table, ratios, per_sample, header_text(payload["system"]))
    out = Path(out_dir)
    (out / "whole_field.md").write_text(text + "\n")
    record = {
        "workload": WORKLOAD,
        "command": command,
        "store": label,
        "channels": channels,
        "field": list(field),
        "sample_bytes": per_sample,
        "rows": table,
        "ratios": ratios,
    }
    (out / "whole_field.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    payload.update(whole_field=table, whole_field_ratios=ratios, whole_field_table=text)
    return payload


def cmd_whole_field(args: argparse.Namespace) -> int:
    """``zarrdali bench --workload whole-field``: its defaults, then --config, then flags."""
    from zarrdali.bench.options import DEFAULTS as TILE_DEFAULTS
    from zarrdali.bench.options import load_config
    from zarrdali.io.remote import redact_argv

    o = {**TILE_DEFAULTS, **DEFAULTS}
    try:
        if args.config:
            o.update(load_config(args.config))
    except (OSError, ValueError) as err:
        print(f"zarrdali bench: {err}", file=sys.stderr)
        return 2
    o.update({k: v for k, v in vars(args).items() if k in o and v is not None})
    if o["tile"] is not None:
        print("zarrdali bench: --workload whole-field reads whole fields; drop --tile",
              file=sys.stderr)  # fmt: skip
        return 2
    if o.get("device") == "cuda" or o.get("storage_options") or o.get("cold"):
        print("zarrdali bench: --workload whole-field runs the CPU rows on a local store "
              "(no --device cuda, --storage-options or --cold yet)", file=sys.stderr)  # fmt: skip
        return 2
    store = str(o["store"]) if o["store"] else ensure_store(o["data_dir"], not args.quiet)
    sizes = o["batch_size"]
    sizes = [int(b) for b in (sizes if isinstance(sizes, (list, tuple)) else [sizes])]
    argv = getattr(args, "argv", sys.argv[1:])
    payload = run_whole_field(
        store,
        o["variables"],
        sizes,
        o["out"],
        loaders=o["loaders"],
        input_steps=o["input_steps"],
        target_steps=o["target_steps"],
        samples=o["samples"],
        batches=o["batches"],
        warmup=o["warmup"],
        epochs=o["epochs"],
        threads=o["threads"],
        seed=o["seed"],
        progress=not args.quiet,
        command=shlex.join(["zarrdali", *redact_argv(argv)]),
    )
    print(payload["whole_field_table"])
    print(f"results in {o['out']}/ (whole_field.md, whole_field.json, bench.json, bench.md)")
    return 0
