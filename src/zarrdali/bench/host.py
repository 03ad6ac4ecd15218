"""Host time per batch: what a batch costs the CPU before any data is read.

``zarrdali bench-host`` times, for each store, the stages both paths run on the
host for every batch: **plan** (samples → chunks and pieces, numpy), **locate**
(chunks → files, offsets, sizes, from the cached shard-index tables), for
the CPU path **map** (the batch's files memory-mapped, or found mapped) and
**describe** (the work lists of the CPU path's read/decode/copy loops, or the
GPU path's staging, slots and gather description). Reading, decoding and
gathering are not included: this is the overhead the GPU path pays while the
GPU waits, and it needs no GPU to measure. The first pass over the batches
also reads the shard indexes (reported as *cold locate*); the timed passes
find them cached.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zarrdali.batch.plan import plan_batch
from zarrdali.loader import ZarrLoader


@dataclass
class HostTimes:
    """Seconds per batch of each stage (one entry per timed batch)."""

    store: str
    batch_size: int
    batches: int
    chunks_per_batch: float = 0.0
    pieces_per_batch: float = 0.0
    cold_locate_s: float = 0.0
    stages: dict[str, list[float]] = field(default_factory=dict)
    locator_stats: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float]]:
        """Median, 10th and 90th percentile of each stage and of each path's total, in ms."""
        rows = {}
        series = dict(self.stages)
        for path in ("cpu", "gpu"):
            parts = ["plan", "locate", *(["map-cpu"] if path == "cpu" else []), f"describe-{path}"]
            if all(p in series for p in parts):
                per_batch = zip(*(series[p] for p in parts), strict=True)
                series[f"total-{path}"] = [sum(x) for x in per_batch]
        for name, values in series.items():
            ms = np.array(values) * 1e3
            rows[name] = {
                "median_ms": float(np.median(ms)),
                "p10_ms": float(np.percentile(ms, 10)),
                "p90_ms": float(np.percentile(ms, 90)),
            }
        return rows


def _gpu_describer(loader: ZarrLoader) -> Callable | None:
    """The GPU path's host description of a batch, if it can be computed here (numpy only)."""
    try:
        from zarrdali.gpu.describe import describe_batch
    except ImportError:
        return None

    def describe(plan, locations):
        return describe_batch(loader.layouts, plan, locations, store_name=loader.store_name)

    return describe


def time_host(
    store: str,
    variables: Sequence[str],
    *,
    input_steps: int = 4,
    target_steps: int = 2,
    tile: tuple[int, int] = (128, 128),
    batch_size: int = 64,
    batches: int = 50,
    rounds: int = 3,
    seed: int = 0,
) -> HostTimes:
    """Time plan, locate and describe for ``batches`` batches, ``rounds`` times each."""
    loader = ZarrLoader(
        store,
        list(variables),
        input_steps=input_steps,
        target_steps=target_steps,
        tile=tile,
        batch_size=batch_size,
        shuffle=True,
        seed=seed,
        device="cpu",
        workers=0,
    )
    try:
        epoch = loader.epoch_plan(0)
        samples = [epoch.batch(k) for k in range(min(batches, len(epoch)))]
        layouts = loader.layouts
        locator = loader.backend.locator(layouts)
        describe_gpu = _gpu_describer(loader)
        spec = loader.spec
        result = HostTimes(store, batch_size, len(samples))

        def plan_of(s: np.ndarray, split: bool):
            return plan_batch(
                layouts,
                s,
                n_frames=spec.n_frames,
                frame_step=spec.frame_step,
                tile_hw=loader.candidates.tile_hw,
                frame_split=spec.input_steps if split and spec.target_steps else None,
            )

        t = time.perf_counter()
        for s in samples:  # cold: reads every shard index once
            locator.locate(plan_of(s, True))
        result.cold_locate_s = time.perf_counter() - t
        stages: dict[str, list[float]] = {
            "plan": [],
            "locate": [],
            "map-cpu": [],
            "describe-cpu": [],
        }
        if describe_gpu is not None:
            stages["describe-gpu"] = []
        chunks, pieces = [], []
        for _ in range(rounds):
            for s in samples:
                t0 = time.perf_counter()
                plan = plan_of(s, True)
                t1 = time.perf_counter()
                locations = locator.locate(plan)
                t2 = time.perf_counter()
                lease = loader.backend.lease(layouts, locations)  # the files' maps
                t3 = time.perf_counter()
                loader.backend.describe(layouts, plan, locations, lease)
                if lease is not None:
                    lease.release()
                t4 = time.perf_counter()
                stages["plan"].append(t1 - t0)
                stages["locate"].append(t2 - t1)
                stages["map-cpu"].append(t3 - t2)
                stages["describe-cpu"].append(t4 - t3)
                if describe_gpu is not None:  # the GPU path plans the window unsplit
                    window = plan_of(s, False)
                    window_locations = locator.locate(window)
                    t5 = time.perf_counter()
                    describe_gpu(window, window_locations)
                    stages["describe-gpu"].append(time.perf_counter() - t5)
                chunks.append(plan.n_chunks)
                pieces.append(plan.n_pieces)
        result.stages = stages
        result.chunks_per_batch = statistics.mean(chunks)
        result.pieces_per_batch = statistics.mean(pieces)
        result.locator_stats = locator.stats()
        return result
    finally:
        loader.close()


def format_table(results: Sequence[HostTimes]) -> str:
    lines = [
        "| store | chunks/batch | pieces/batch | stage | median ms | p10–p90 ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        name = Path(r.store).name
        for stage, row in r.summary().items():
            lines.append(
                f"| {name} | {r.chunks_per_batch:.0f} | {r.pieces_per_batch:.0f} | {stage} | "
                f"{row['median_ms']:.3f} | {row['p10_ms']:.3f}–{row['p90_ms']:.3f} |"
            )
        lines.append(
            f"| {name} | | | cold locate, first pass (shard indexes read) | "
            f"{r.cold_locate_s / max(r.batches, 1) * 1e3:.3f} per batch | |"
        )
    return "\n".join(lines)


def run_host_bench(
    stores: Sequence[tuple[str, str]], variables: Sequence[str], out: str | Path, **kw
) -> dict:
    """Time every store, write ``host.json`` and ``host.md`` to ``out``; returns the payload."""
    results = [time_host(path, variables, **kw) for _, path in stores]
    from zarrdali.bench.report import _git_commit

    payload = {
        "command": shlex.join(["zarrdali", *sys.argv[1:]]),
        "commit": _git_commit(),
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "numpy": np.__version__,
        },
        "settings": {"variables": list(variables), **kw},
        "stores": [
            {
                "store": r.store,
                "batches": r.batches,
                "chunks_per_batch": r.chunks_per_batch,
                "pieces_per_batch": r.pieces_per_batch,
                "cold_locate_s": r.cold_locate_s,
                "locator": r.locator_stats,
                "summary": r.summary(),
            }
            for r in results
        ],
        "table": format_table(results),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host.json").write_text(json.dumps(payload, indent=2))
    (out / "host.md").write_text(payload["table"] + "\n")
    return payload
