"""The whole GPU verification in one command, within a hard time budget.

    python benchmarks/gpu_verify.py --out OUT --require-gpu --commit HASH \
        --stack-check .stack/pN/gpu_stack_check.py

Steps, ordered by what they prove (a later step is worth less if an earlier
one failed, and a run cut short keeps the most important results), each in its
own process group with its own timeout, every one run whatever happened to the
one before but the import check; the timeouts add up to the budget (default 560 s):

    imports       every zarrdali module, the GPU test modules and what the steps
                  import lazily (tqdm, PyYAML, toolz, cloudpickle, fsspec,
                  psutil, dask.array, obstore, torch; the GPU stack with
                  --require-gpu): what is missing is listed with its pip name,
                  and no other step runs (seconds, not the budget)          30 s
    stack-check   ``gpu_stack_check.py`` (CuPy, kvikIO, nvCOMP's Python and C
                  APIs, DALI fed by CuPy): the stack itself, before our code   35 s
    pytest-gpu    ``pytest -m "gpu and not corrupt_input" -v`` with
                  faulthandler (and ``--timeout`` where pytest-timeout is
                  installed): the engine bit for bit against the CPU backend, the
                  feed on real streams, the loader against zarr-python on plain,
                  sharded, gzip, blosc (host), big-endian int16 and missing-chunk
                  stores, resume, ranks, 20 epochs and 50 loaders with the pool
                  total and threads flat, the collector at random points in a
                  thread of its own throughout (junit XML). It fails when no
                  test ran                                                  140 s
    decode        ``decode_gpu.py`` at batch 64, zstd, 64 KiB and 1 MiB chunks:
                  nvCOMP's C API alone, zarrdali read + decode + gather, with
                  the GPU cache warm, numcodecs on all cores                   35 s
    decode-lz4    the same on LZ4 (64 KiB), with DALI's fn.decoders.inflate    20 s
    sample-data   the embedded sample data (both layouts), unless already there 35 s
    bench-b64     ``zarrdali bench`` on the sharded store, batch 64:
                  zarrdali[cuda], the torch DataLoader over xarray and
                  zarrdali[cpu], each on every core                          70 s
    small-batch   batches of 8 (4 + 2 frames of 128 x 128, every variable) on
                  device="cuda": ms per batch back to back through DALI, and
                  ``load_batch`` alone; the host time of each NVTX range of the
                  engine (describe, read, decode, gather, check) at 8 and 64  25 s
    bench-wait    batch 64 with a simulated 5 ms training step: the wait       30 s
    bench-b256    as bench-b64 at batch 256                                    70 s
    bench-b8      as bench-b64 at batch 8                                      25 s
    remote-gpu    the GPU backend on the sharded store served by a local HTTP
                  server (ranges): read="pinned" and read="kvikio" (kvikIO's
                  remote file), every batch equal to the CPU backend's on the
                  local copy, samples/s of each                              20 s
    pytest-gpu-corrupt  ``pytest -m "gpu and corrupt_input"``: the tests that
                  feed corrupt chunks to the device path (nvCOMP's headers make
                  corrupt input undefined behaviour, and a device fault is
                  sticky), last, in a process of their own; fails when none ran 25 s

``--steps`` also knows ``bench-wait-1`` and ``bench-wait-20`` (1 and 20 ms
steps), not run by default.

A step gets at most its own timeout and what is left of ``--budget-s``; a step
that outlives it gets SIGABRT (faulthandler prints every thread's stack into
the log), then its whole process group SIGKILL. ``summary.json`` is rewritten
after every step, with the figures so far and the goals they meet or miss (by
how much): a run cut short still leaves its part; a pytest step cut short
keeps the results of the tests that finished (read from its ``-v`` lines).
Without a GPU (or with ``--dry-run``) the GPU steps are skipped with the
reason; ``--require-gpu`` makes a missing GPU an error. Exit status: 0 when no
step failed or timed out.

Output (``--out``; at most 8 files, as a device run returns at most 8):

    provenance.json  GPU, driver, CUDA, nvCOMP (version, alignments), package
                     versions, commit, tree hash, command, date
    summary.json     every step (command, status, seconds, why), the figures, the goals
    verify.log       the output of every step, one after the other
    pytest-gpu.xml   junit XML of the GPU tests (the corruption tests' stays in
                     the scratch folder; their counts are in summary.json)
    bench.json       the bench runs' JSON, by run
    bench.md         the bench runs' tables, with the system header
    decode.json      the decode benchmarks (zstd and LZ4), by run
    remote.json      the remote GPU readers against the local HTTP server

The other files of a bench run (plots) stay in a scratch folder under /tmp.
Needs no network; run it from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import http.server
import importlib.util
import json
import os
import posixpath
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FILES = 8
PACKAGES = (
    "zarrdali",
    "nvidia-dali-cuda130",
    "nvidia-dali-cuda120",
    "cupy-cuda13x",
    "cupy-cuda12x",
    "kvikio-cu13",
    "kvikio-cu12",
    "libkvikio-cu13",
    "nvidia-nvcomp-cu13",
    "nvidia-nvcomp-cu12",
    "nvidia-libnvcomp-cu13",
    "nvidia-libnvcomp-cu12",
    "torch",
    "zarr",
    "numcodecs",
    "numpy",
    "xarray",
    "dask",
    "nvtx",
    "obstore",
    "pytest",
    "pytest-timeout",
    "psutil",
    "matplotlib",
)
ENV_KEYS = ("PYTHONPATH", "CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "ZARRDALI_WORKERS")


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: float
    needs_gpu: bool = False
    # filled in when run
    status: str = "pending"  # passed, failed, timeout, skipped, not run, planned
    returncode: int | None = None
    seconds: float = 0.0
    limit_s: float | None = None
    why: str = ""
    rehearsable: bool = False  # has a CPU variant for --rehearse-on-cpu

    def to_json(self) -> dict:
        out = asdict(self)
        out["command"] = shlex.join(self.command)
        return out


# -- running steps ---------------------------------------------------------------
def _no_core_dumps() -> None:  # in the child, before exec: SIGABRT leaves no core file
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_step(step: Step, log: Path, deadline: float, env: dict[str, str], cwd: Path) -> Step:
    """Run one step with its timeout capped by the deadline; never raises for the
    step's own failure. Its output is appended to ``log``."""
    left = deadline - time.monotonic()
    if left < 5:
        step.status, step.why = "not run", f"time budget spent ({max(left, 0):.0f} s left)"
        return step
    limit = min(step.timeout_s, left)
    step.limit_s = round(limit, 1)
    start = time.monotonic()
    with open(log, "a") as f:
        f.write(f"\n===== {step.name}: {shlex.join(step.command)} (limit {limit:.0f} s)\n")
        f.flush()
        try:
            proc = subprocess.Popen(
                step.command,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group: killed as a whole
                preexec_fn=_no_core_dumps,
            )
        except OSError as err:
            step.status, step.why = "failed", f"could not start: {err}"
            f.write(f"===== {step.name}: {step.why}\n")
            return step
        try:
            step.returncode = proc.wait(timeout=limit)
            step.status = "passed" if step.returncode == 0 else "failed"
            if step.returncode:
                step.why = f"exit status {step.returncode}"
        except subprocess.TimeoutExpired:
            step.status, step.why = "timeout", f"still running after {limit:.0f} s"
            _stop(proc)
            step.returncode = proc.returncode
        step.seconds = round(time.monotonic() - start, 1)
        f.write(f"===== {step.name}: {step.status} in {step.seconds} s {step.why}\n")
    return step


def _stop(proc: subprocess.Popen) -> None:
    """SIGABRT to the step (faulthandler dumps its threads), then SIGKILL to its group."""
    try:
        proc.send_signal(signal.SIGABRT)
        proc.wait(timeout=5)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its workers too (DALI, DataLoader)
    proc.wait()


# -- provenance ------------------------------------------------------------------
_GPU_PROBE = r"""
import json
from zarrdali.gpu import missing_gpu_requirements, gpu_description
out = {"missing": missing_gpu_requirements(), "nvidia_smi": gpu_description()}
if not out["missing"]:
    import cupy
    rt = cupy.cuda.runtime
    p = rt.getDeviceProperties(0)
    name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
    out.update(device=name, compute_capability=f"{p['major']}.{p['minor']}",
               memory_bytes=int(p["totalGlobalMem"]), devices=rt.getDeviceCount(),
               cuda_runtime=rt.runtimeGetVersion(), cuda_driver=rt.driverGetVersion())
    try:
        from zarrdali.gpu import kvikio_io_mode
        out["kvikio_io_mode"] = kvikio_io_mode()
    except Exception as err:
        out["kvikio_io_mode"] = f"unknown ({type(err).__name__}: {err})"
try:  # host calls, no device: what the engine packs payloads by
    from nvidia import libnvcomp
    from zarrdali.gpu.decode import nvcomp_capi
    out["nvcomp"] = {"version": libnvcomp.__version__,
                     "decompress_alignments": nvcomp_capi().alignments}
except Exception as err:
    out["nvcomp"] = f"unavailable ({type(err).__name__}: {err})"
print("GPU-PROBE " + json.dumps(out))
"""


def probe_gpu(env: dict[str, str], timeout_s: float = 90) -> dict:
    """What the GPU path finds here, asked in a child process (this one never
    creates a CUDA context, which would count in the steps' GPU memory)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _GPU_PROBE],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"missing": [f"an answer from the GPU probe within {timeout_s:.0f} s"]}
    for line in done.stdout.splitlines():
        if line.startswith("GPU-PROBE "):
            return json.loads(line[len("GPU-PROBE ") :])
    return {"missing": [f"a working GPU probe (exit {done.returncode}: {done.stderr[-500:]})"]}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def tree_hash(root: Path = REPO) -> str:
    """sha256 over the code that ran (src, tests, benchmarks/*.py, pyproject.toml):
    compare it with a checkout when the copy here had no git history."""
    h = hashlib.sha256()
    files = [root / "pyproject.toml", *sorted((root / "benchmarks").glob("*.py"))]
    for sub in ("src", "tests"):
        files += sorted(p for p in (root / sub).rglob("*.py") if "__pycache__" not in p.parts)
    for path in files:
        if path.is_file():
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def provenance(args: argparse.Namespace, gpu: dict, argv: list[str]) -> dict:
    commit = args.commit or os.environ.get("ZARRDALI_COMMIT") or _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *argv]),
        "cwd": os.getcwd(),
        "commit": commit,
        "commit_source": "--commit"
        if args.commit
        else ("ZARRDALI_COMMIT" if os.environ.get("ZARRDALI_COMMIT") else "git"),
        "worktree_dirty": None if dirty is None else bool(dirty),
        "tree_sha256": tree_hash(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "host": os.uname().nodename,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "versions": {d: v for d in PACKAGES if (v := _version(d))},
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "budget_s": args.budget_s,
        "tiny": args.tiny,
        "dry_run": args.dry_run,
        "rehearse_on_cpu": args.rehearse_on_cpu,
    }


# -- the steps -----------------------------------------------------------------------
# (name, timeout s): the default run, in order. Their sum stays under the default
# budget, so that each step gets its whole timeout even if all before it used theirs.
DEFAULT_STEPS = (
    ("imports", 30),
    ("stack-check", 35),
    ("pytest-gpu", 140),
    ("decode", 35),
    ("decode-lz4", 20),
    ("sample-data", 35),
    ("bench-b64", 70),
    ("small-batch", 25),
    ("bench-wait", 30),
    ("bench-b256", 70),
    ("bench-b8", 25),
    ("remote-gpu", 20),
    ("pytest-gpu-corrupt", 25),  # last, in a process of its own: see CORRUPT_MARKER
)
EXTRA_STEPS = (("bench-wait-1", 30), ("bench-wait-20", 30))
DEFAULT_BUDGET_S = 560.0
# Tests that feed corrupt input to the device decoder (nvCOMP: undefined
# behaviour, and a device fault is sticky for the process): the GPU suite runs
# without them, and they run last, in a pytest process of their own.
CORRUPT_MARKER = "corrupt_input"
SHARDED = "era5_sharded.zarr"


def find_stack_check(explicit: str | None = None, root: Path = REPO) -> Path | None:
    """``gpu_stack_check.py``: given, else where ``gpu_pack.py pack`` put it (the
    last part of ``.stack/``), else beside the checkout (``../shared/tools``)."""
    if explicit:
        return Path(explicit)
    found = sorted(root.glob(".stack/p*/gpu_stack_check.py"))
    found += [root.parent / "shared" / "tools" / "gpu_stack_check.py"]
    found += [root / "shared" / "tools" / "gpu_stack_check.py"]
    return next((p for p in found if p.is_file()), None)


def plan_steps(args: argparse.Namespace, out: Path, scratch: Path) -> list[Step]:
    py = sys.executable
    data = Path(args.data_dir)
    tiny = args.tiny
    cpu = args.rehearse_on_cpu
    timeouts = dict(DEFAULT_STEPS + EXTRA_STEPS)
    steps: dict[str, Step] = {}

    imports = [py, "-X", "faulthandler", str(Path(__file__).resolve()), "--probe-imports"]
    imports += ["--probe-json", str(scratch / "imports.json")]
    imports += ["--require-gpu"] if args.require_gpu else []
    steps["imports"] = Step("imports", imports, timeouts["imports"])

    checker = find_stack_check(args.stack_check)
    stack = [py, str(checker)] if checker else [py, "-c", "raise SystemExit(2)"]
    steps["stack-check"] = Step("stack-check", stack, timeouts["stack-check"], needs_gpu=True)
    if checker is None:
        steps["stack-check"].why = "gpu_stack_check.py not found: pass --stack-check PATH"

    timeout_plugin = importlib.util.find_spec("pytest_timeout") is not None
    files = gpu_test_files()
    for name, select, junit in (
        ("pytest-gpu", f"gpu and not {CORRUPT_MARKER}", out / "pytest-gpu.xml"),
        ("pytest-gpu-corrupt", f"gpu and {CORRUPT_MARKER}", scratch / "pytest-gpu-corrupt.xml"),
    ):
        cmd = pytest_command(py, select, junit, files, timeout_plugin=timeout_plugin)
        steps[name] = Step(name, cmd, timeouts[name], needs_gpu=True)

    size = ["--time-steps", "4", "--batches", "2", "--repeats", "1", "--batch-size", "4"]
    size = size if tiny else ["--batch-size", "64", "--batches", "6", "--repeats", "3"]
    decode = [py, "benchmarks/decode_gpu.py", *size, "--out", str(scratch / "decode-zstd.json")]
    steps["decode"] = Step("decode", decode + shlex.split(args.decode_args), timeouts["decode"])
    steps["decode"].needs_gpu = True
    # LZ4: nvCOMP's C API against DALI's fn.decoders.inflate (64 KiB chunks)
    lz4 = [py, "benchmarks/decode_gpu.py", "--codec", "lz4", "--chunks", "64k", *size]
    lz4 += ["--out", str(scratch / "decode-lz4.json")]
    steps["decode-lz4"] = Step("decode-lz4", lz4, timeouts["decode-lz4"], needs_gpu=True)

    sample = ["--n-time", "12", "--n-lat", "33", "--n-lon", "40"] if tiny else []
    cmd = [py, "-m", "zarrdali", "sample-data", str(data), "-q", *sample]
    steps["sample-data"] = Step("sample-data", cmd, timeouts["sample-data"])

    bench = [py, "-m", "zarrdali", "bench", str(data / SHARDED), "-q", "--loaders"]
    ours = ["zarrdali-cpu" if cpu else "zarrdali-cuda"]
    # the torch DataLoader over xarray and the CPU path, each on every core
    peers = [] if cpu and tiny else ["torch-xarray"] + ([] if cpu else ["zarrdali-cpu"])
    shape = ["--tile", "8", "8", "--batches", "3", "--warmup", "1", "--epochs", "1"]
    shape = shape if tiny else ["--batches", "12", "--warmup", "3", "--epochs", "2"]
    for name, loaders, extra in (
        ("bench-b64", ours + peers, ["--batch-size", "64"]),
        ("bench-b256", ours + peers, ["--batch-size", "256"]),
        ("bench-b8", ours + peers, ["--batch-size", "8"]),
        ("bench-wait", ours, ["--batch-size", "64", "--step-ms", "5"]),
        ("bench-wait-1", ours, ["--batch-size", "64", "--step-ms", "1"]),
        ("bench-wait-20", ours, ["--batch-size", "64", "--step-ms", "20"]),
    ):
        cmd = [*bench, *loaders, *shape, *extra, "--out", str(scratch / name)]
        steps[name] = Step(name, cmd, timeouts[name], needs_gpu=True, rehearsable=True)

    probe = [py, "-X", "faulthandler", str(Path(__file__).resolve()), "--data-dir", str(data)]
    probe += ["--probe-device", "cpu" if cpu else "cuda"]
    small = [*probe, "--probe-small-batch", "--probe-json", str(scratch / "small-batch.json")]
    small += ["--probe-batches", "5", "--probe-warmup", "2", "--probe-tile", "8"] if tiny else []
    steps["small-batch"] = Step(
        "small-batch", small, timeouts["small-batch"], needs_gpu=True, rehearsable=True
    )
    remote = [*probe, "--probe-remote", "--probe-json", str(out / "remote.json")]
    remote += ["--probe-batches", "3", "--probe-warmup", "1", "--probe-tile", "8"] if tiny else []
    steps["remote-gpu"] = Step(
        "remote-gpu", remote, timeouts["remote-gpu"], needs_gpu=True, rehearsable=True
    )

    names = [name for name, _ in DEFAULT_STEPS]
    if args.steps:
        names = args.steps.split(",")
        unknown = sorted(set(names) - set(steps))
        if unknown:
            raise SystemExit(f"unknown step(s) {unknown}; steps: {list(steps)}")
    return [steps[name] for name in names]


def pytest_command(
    py: str, select: str, junit: Path, files: list[str], *, timeout_plugin: bool
) -> list[str]:
    """``pytest -m SELECT -v`` over ``files`` with faulthandler and junit XML.

    Where pytest-timeout is installed its entry point has loaded it already:
    ``--timeout`` alone turns it on (``-p pytest_timeout`` would register it a
    second time, under another name, and pytest would stop at start-up with
    ``ValueError: Plugin already registered``, running no test)."""
    cmd = [py, "-X", "faulthandler", "-m", "pytest", "-m", select, "-p", "no:cacheprovider"]
    cmd += ["-o", "faulthandler_timeout=90", "-v", "-rfEs", "--tb=short"]
    if timeout_plugin:
        cmd += ["--timeout", "100"]  # a hung test fails, the rest run
    return [*cmd, "--junitxml", str(junit), *files]


def gpu_test_files(root: Path = REPO) -> list[str]:
    """The test files with GPU tests: collecting only them needs none of the
    CPU-only tests' packages (netCDF4, moto) on the GPU machine."""
    files = sorted((root / "tests").glob("test_*.py"))
    return [str(f.relative_to(root)) for f in files if "mark.gpu" in f.read_text()]


def _sample_data_present(data: Path) -> bool:
    return (data / "era5_plain.zarr" / "zarr.json").is_file() and (
        data / SHARDED / "zarr.json"
    ).is_file()


# -- collecting results ---------------------------------------------------------------
def junit_summary(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        return {"error": f"unreadable junit XML: {err}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    counts["skipped"] = sum(int(s.get("skipped", 0)) for s in suites)
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["failed_tests"] = failed[:30]
    return counts


_PYTEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def pytest_progress(log_text: str) -> dict:
    """What a ``pytest -v`` run cut short got done: counts by outcome, the
    failed tests, and the last test that reported (the next one hung)."""
    counts: dict[str, int] = {}
    failed, last = [], None
    for line in log_text.splitlines():
        match = _PYTEST_LINE.match(line.strip())
        if match:
            test, outcome = match.groups()
            counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
            last = test
            if outcome in ("FAILED", "ERROR"):
                failed.append(test)
    return {"counts": counts, "failed_tests": failed[:30], "last_reported": last}


def _step_log(log: Path, name: str) -> str:
    """The part of ``verify.log`` written by step ``name`` (its last run: from
    the line ``run_step`` opens it with, ``===== name: command (limit N s)``)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    opened = list(re.finditer(rf"^===== {re.escape(name)}: .*\(limit \d+ s\)$", text, re.M))
    return text[opened[-1].start() :] if opened else ""


def bench_figures(payload: dict) -> list[dict]:
    """The rows of one bench run, reduced to the figures the goals are stated in."""
    rows = []
    for r in payload.get("results", []):
        s = r["summary"]
        rows.append(
            {
                "store": r["store_label"],
                "loader": s["name"],
                "status": s["status"],
                "error": s.get("error") or None,
                "samples_per_s": (s.get("samples_per_s") or {}).get("median"),
                "decoded_gb_per_s": (s.get("decoded_gb_per_s") or {}).get("median"),
                "wait_fraction": (s.get("wait_fraction") or {}).get("median"),
                "peak_gpu_gb": s.get("peak_gpu_gb"),
                "gpu_in_use_gb": s.get("peak_gpu_used_gb"),
                "note": s.get("note"),
            }
        )
    return rows


def merge_bench(out: Path, scratch: Path, names: list[str]) -> dict:
    """bench.json (by run) and bench.md (every table) in ``out``; key figures back."""
    merged, tables, figures = {}, [], {}
    for name in names:
        path = scratch / name / "bench.json"
        if not path.is_file():
            continue
        payload = json.loads(path.read_text())
        merged[name] = payload
        figures[name] = bench_figures(payload)
        md = scratch / name / "bench.md"
        if md.is_file():
            tables.append(f"## {name}: `{payload.get('command')}`\n\n{md.read_text()}")
    if merged:
        (out / "bench.json").write_text(json.dumps(merged, indent=2, default=str) + "\n")
        (out / "bench.md").write_text("\n\n".join(tables))
    return figures


def merge_decode(out: Path, scratch: Path) -> dict:
    """decode.json (the zstd and LZ4 runs) in ``out``; rows reduced to GB/s by section."""
    merged, figures = {}, {}
    for name in ("decode-zstd", "decode-lz4"):
        path = scratch / f"{name}.json"
        if not path.is_file():
            continue
        payload = json.loads(path.read_text())
        merged[name] = payload
        for row in payload.get("results", []):
            key = f"{row.get('section')}: {row['name']}"
            rate = (row.get("decoded_gb_per_s") or {}).get("median")
            figures[key] = {"status": row["status"], "gb_per_s": rate, "note": row.get("note")}
    if merged:
        (out / "decode.json").write_text(json.dumps(merged, indent=2, default=str) + "\n")
    return figures


# -- the goals -------------------------------------------------------------------------
def _row(rows: list[dict] | None, loader: str) -> dict | None:
    return next((r for r in rows or [] if r["loader"] == loader and r["status"] == "ok"), None)


def _goal(name: str, value: float | None, target: float, at_least: bool, unit: str, **kw) -> dict:
    goal = {"goal": name, "target": target, "unit": unit, "value": value, **kw}
    if value is None:
        goal["met"], goal["missed_by"] = None, "not measured"
    else:
        goal["met"] = value >= target if at_least else value <= target
        if not goal["met"]:
            goal["missed_by"] = f"{value / target:.2f}x the target" if target else "n/a"
    return goal


def tests_run(tests: dict | None) -> int | None:
    """Tests that ran (passed, failed or in error: not skipped) by a pytest
    step's figures (junit counts, or the ``-v`` lines of a run cut short); None
    when the step left neither."""
    if not tests:
        return None
    if "tests" in tests:
        return int(tests["tests"]) - int(tests.get("skipped", 0))
    if "counts" in tests:
        counts = tests["counts"]
        return sum(counts.get(k, 0) for k in ("passed", "failed", "error", "xfail", "xpass"))
    return None


def tests_failed(tests: dict | None) -> int | None:
    if not tests:
        return None
    if "failures" in tests:
        return int(tests["failures"]) + int(tests["errors"])
    if "counts" in tests:
        return tests["counts"].get("failed", 0) + tests["counts"].get("error", 0)
    return None


def _speedup(rows: list[dict] | None) -> tuple[float | None, dict | None]:
    ours, peer = _row(rows, "zarrdali[cuda]"), _row(rows, "torch DataLoader + xarray")
    if ours and peer and peer["samples_per_s"]:
        return ours["samples_per_s"] / peer["samples_per_s"], ours
    return None, ours


def evaluate_goals(figures: dict) -> list[dict]:
    """The issue's figures, from what the steps measured so far."""
    goals = []
    for batch in (64, 256):
        speedup, ours = _speedup(figures.get(f"bench-b{batch}"))
        goals.append(_goal(f"zarrdali[cuda] / torch DataLoader + xarray, batch {batch}, sharded",
                           speedup, 10.0, True, "x", stretch=20.0))  # fmt: skip
        goals.append(_goal(f"zarrdali[cuda] decoded GB/s, batch {batch}, sharded",
                           ours and ours["decoded_gb_per_s"], 30.0, True, "GB/s"))  # fmt: skip
    decode = figures.get("decode") or {}
    warm = [v["gb_per_s"] for k, v in decode.items() if "warm-cache" in k and v["gb_per_s"]]
    goals.append(_goal("zarrdali-gpu with the GPU cache warm (decode_gpu.py, best row)",
                       max(warm) if warm else None, 60.0, True, "GB/s"))  # fmt: skip
    capi = decode.get("zstd, 64k chunks: nvcomp-capi") or {}
    goals.append(_goal("nvCOMP C API, zstd, 64 KiB chunks", capi.get("gb_per_s"), 60.0, True,
                       "GB/s"))  # fmt: skip
    small = figures.get("small-batch") or {}
    worst = (small.get("goal") or {}).get("worst_back_to_back_ms")
    goals.append(_goal("ms per batch of 8, back to back through DALI", worst, 2.0, False, "ms"))
    wait = _row(figures.get("bench-wait"), "zarrdali[cuda]")
    goals.append(_goal("share of a 5 ms step spent waiting, batch 64", wait and
                       wait["wait_fraction"], 0.05, False, "fraction"))  # fmt: skip
    remote = figures.get("remote-gpu") or {}
    rows = [remote.get(r) for r in ("pinned", "kvikio") if isinstance(remote.get(r), dict)]
    equal = [r.get("equal") for r in rows if r.get("status") == "ok"]
    goals.append({"goal": "remote GPU readers equal the CPU backend (value: the faster)",
                  "met": all(equal) if equal else None, "readers_ok": len(equal),
                  "value": remote.get("faster")})  # fmt: skip
    # The GPU tests: how many ran (zero is a failure, not a pass), how many failed.
    failed, any_ran = None, False
    for step in ("pytest-gpu", "pytest-gpu-corrupt"):
        tests = figures.get(step)
        ran = tests_run(tests)
        if tests is not None or step == "pytest-gpu":
            goals.append(_goal(f"{step}: tests run (not skipped)", ran, 1, True, "tests"))
        bad = tests_failed(tests)
        if bad is not None:
            failed = (failed or 0) + bad
        any_ran = any_ran or bool(ran)
    goal = _goal("GPU tests failed or in error", failed, 0, False, "tests")
    if not any_ran:  # nothing ran: no failure counted is no pass
        goal.update(met=False if failed is not None else None, missed_by="no GPU test ran")
    goals.append(goal)
    return goals


def write_summary(out: Path, steps: list[Step], figures: dict, started: float) -> dict:
    summary = {
        "seconds": round(time.monotonic() - started, 1),
        "ok": not any(s.status in ("failed", "timeout") for s in steps),
        "steps": [s.to_json() for s in steps],
        "figures": figures,
        "goals": evaluate_goals(figures),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def collect(step: Step, out: Path, scratch: Path, log: Path, figures: dict, names: list) -> None:
    """The figures of ``step`` (and of the merged outputs it adds to)."""
    if step.name in ("pytest-gpu", "pytest-gpu-corrupt"):
        junit = (out if step.name == "pytest-gpu" else scratch) / f"{step.name}.xml"
        tests = junit_summary(junit)
        if tests is None or step.status == "timeout":  # cut short: the -v lines
            tests = pytest_progress(_step_log(log, step.name))
        figures[step.name] = tests
        if step.status == "passed" and not tests_run(tests):  # zero tests is no pass
            step.status = "failed"
            step.why = "no test ran (none collected, all skipped, or pytest stopped at start-up)"
    elif step.name == "imports":
        path = scratch / "imports.json"
        figures["imports"] = json.loads(path.read_text()) if path.is_file() else None
    elif step.name == "stack-check":
        lines = [ln for ln in _step_log(log, "stack-check").splitlines()]
        figures["stack-check"] = [ln for ln in lines if ln.startswith(("ok  ", "FAIL"))]
    elif step.name.startswith("decode"):
        figures["decode"] = merge_decode(out, scratch)
    elif step.name == "small-batch" and (scratch / "small-batch.json").is_file():
        figures["small-batch"] = json.loads((scratch / "small-batch.json").read_text())
    elif step.name == "remote-gpu" and (out / "remote.json").is_file():
        figures["remote-gpu"] = json.loads((out / "remote.json").read_text())
    elif step.name.startswith("bench-"):
        figures.update(merge_bench(out, scratch, names))


# -- the import check (the first step) ------------------------------------------------------
# What the steps import besides every zarrdali module (whose own imports are
# found by importing it): the packages its functions import lazily on the
# verification's paths, and the GPU stack. A package missing on the GPU host
# then fails in seconds, with its name, instead of one step after another.
HOST_IMPORTS = (
    "numpy", "zarr", "numcodecs", "crc32c", "zstandard", "xarray", "pandas",
    "dask", "dask.array", "fsspec", "yaml", "toolz", "cloudpickle", "tqdm", "psutil",
    "obstore", "torch", "pytest",
)  # fmt: skip
GPU_IMPORTS = (
    "cupy", "cupyx", "kvikio", "nvidia.libnvcomp", "nvidia.nvcomp", "nvidia.dali",
    "nvidia.dali.plugin.pytorch",
)  # fmt: skip
# pip names where they differ from the module's (for gpu_pack.py pack --extra)
PIP_NAMES = {
    "yaml": "pyyaml",
    "cupy": "cupy-cuda13x",
    "cupyx": "cupy-cuda13x",
    "kvikio": "kvikio-cu13",
    "nvidia.libnvcomp": "nvidia-libnvcomp-cu13",
    "nvidia.nvcomp": "nvidia-nvcomp-cu13",
    "nvidia.dali": "nvidia-dali-cuda130",
    "google_crc32c": "google-crc32c",
    "dateutil": "python-dateutil",
}


def _missing_name(err: ModuleNotFoundError, wanted: str) -> str:
    """The module an import failed for: the top package, or ``nvidia.<x>``
    (a namespace package shared by several wheels)."""
    name = err.name or wanted
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "nvidia" and len(parts) > 1 else parts[0]


def probe_imports(args: argparse.Namespace) -> int:
    """Import every zarrdali module, the GPU test modules and what the steps
    import lazily (``HOST_IMPORTS``, and ``GPU_IMPORTS`` with ``--require-gpu``);
    list what is missing, with the pip names to add to the pack. Exit 1 if
    anything required is missing or broken."""
    import importlib
    import traceback

    missing: dict[str, list[str]] = {}  # module not found -> what needed it
    broken: dict[str, str] = {}  # module -> error (found, but its import raised)
    optional: dict[str, list[str]] = {}

    def attempt(module: str, into: dict[str, list[str]]) -> None:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            into.setdefault(_missing_name(err, module), []).append(module)
        except Exception as err:  # an installed package that cannot load (a .so, a driver)
            broken[module] = f"{type(err).__name__}: {err}"
            traceback.print_exc(limit=2)

    spec = importlib.util.find_spec("zarrdali")
    root = Path(next(iter(spec.submodule_search_locations)))
    for path in sorted(root.rglob("*.py")):  # from the files: a package may fail to import
        parts = ("zarrdali", *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__main__":  # `python -m zarrdali`: runs the CLI
            continue
        attempt(".".join(parts[:-1] if parts[-1] == "__init__" else parts), missing)
    for module in HOST_IMPORTS:
        attempt(module, missing)
    for module in GPU_IMPORTS:
        attempt(module, missing if args.require_gpu else optional)
    tests = REPO / "tests"
    sys.path.insert(0, str(tests))
    for name in ("conftest", *(Path(f).stem for f in gpu_test_files())):
        attempt(name, missing)
    pip = sorted({PIP_NAMES.get(m, m.replace("_", "-")) for m in missing})
    result = {
        "ok": not missing and not broken,
        "missing": missing,
        "broken": broken,
        "optional_missing": optional,
        "pip": pip,
        "python": sys.version.split()[0],
    }
    for name, needed_by in sorted(missing.items()):
        print(f"MISSING {name} (pip: {PIP_NAMES.get(name, name.replace('_', '-'))}), needed by "
              + ", ".join(needed_by[:6]) + (" ..." if len(needed_by) > 6 else ""))  # fmt: skip
    for module, err in sorted(broken.items()):
        print(f"BROKEN  {module}: {err}")
    for name in sorted(optional):
        print(f"absent  {name} (the GPU path's; required with --require-gpu)")
    if pip:
        print("add them to the pack: python3 ../shared/tools/gpu_pack.py pack .stack --extra "
              + " ".join(pip))  # fmt: skip
    print(f"imports: {'ok' if result['ok'] else 'FAILED'}", flush=True)
    if args.probe_json:
        Path(args.probe_json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


# -- the probes (each run as a step of its own) -------------------------------------------
VARIABLES_NDIM = 3
REFERENCE = dict(input_steps=4, target_steps=2, shuffle=True)  # the reference sample spec


def _sync(device: str):
    if device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def _ms_stats(seconds: list[float]) -> dict:
    import statistics

    ms = sorted(s * 1e3 for s in seconds)
    return {
        "median_ms": statistics.median(ms),
        "p90_ms": ms[int(0.9 * (len(ms) - 1))],
        "max_ms": ms[-1],
        "n": len(ms),
    }


def _variables(store: Path) -> list[str]:
    import zarr

    group = zarr.open_group(store, mode="r")
    return sorted(name for name, arr in group.arrays() if arr.ndim >= VARIABLES_NDIM)


class StageTimes:
    """Host time spent in each of zarrdali's NVTX ranges (``zarrdali.trace``),
    per thread, summed: put in the place of the ranges for this process. Without
    a profiler (Nsight Systems is not on the H200 host's PATH) this is what
    says where a batch's time goes; ``zarrdali.check`` includes the host's one
    wait for the device (the batch's decode and gather)."""

    def __init__(self) -> None:
        import threading

        from zarrdali import trace

        self._lock = threading.Lock()
        self._local = threading.local()
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        for name in trace._COLORS:
            trace._ranges[name] = _TimedRange(self, name)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            self.counts[name] = self.counts.get(name, 0) + 1

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()
            self.counts.clear()

    def per_batch_ms(self, batches: int) -> dict[str, float]:
        with self._lock:
            return {k: round(v * 1e3 / batches, 4) for k, v in sorted(self.seconds.items())}


class _TimedRange:
    def __init__(self, times: StageTimes, name: str) -> None:
        self._times, self._name = times, name

    def __enter__(self) -> None:
        stack = getattr(self._times._local, "stack", None)
        if stack is None:
            stack = self._times._local.stack = []
        stack.append(time.perf_counter())

    def __exit__(self, *exc: object) -> None:
        self._times.add(self._name, time.perf_counter() - self._times._local.stack.pop())


def probe_small_batch(args: argparse.Namespace) -> int:
    """Batches of 8 of the reference spec: ms per batch through DALI and
    ``load_batch`` alone; then the engine's stages per batch at 8 and 64."""
    import zarrdali

    device, sync = args.probe_device, _sync(args.probe_device)
    times = StageTimes()
    tile = (args.probe_tile, args.probe_tile)
    results: dict = {}
    data = Path(args.data_dir)
    for label in ("sharded", "plain"):
        store = data / f"era5_{label}.zarr"
        variables = _variables(store)
        kw = dict(REFERENCE, tile=tile, batch_size=8, device=device, workers=0)
        with zarrdali.ZarrLoader(str(store), variables, **kw) as loader:
            n = min(args.probe_batches, len(loader) - args.probe_warmup)
            it = iter(loader)
            for _ in range(args.probe_warmup):
                next(it)
            sync()
            per_batch = []
            t0 = time.perf_counter()
            for _ in range(n):
                t = time.perf_counter()
                batch = next(it)
                sync()
                per_batch.append(time.perf_counter() - t)
            total = time.perf_counter() - t0
            assert batch["input"].shape[1:] == (4, len(variables), *tile)
            it.close()
            plan = loader.epoch_plan()
            direct = []
            times.reset()
            for k in range(args.probe_warmup + n):
                if k == args.probe_warmup:
                    times.reset()
                t = time.perf_counter()
                loader.load_batch(plan.batch(k))  # plan + read + decode + gather, synchronized
                sync()
                direct.append(time.perf_counter() - t)
            stages8 = times.per_batch_ms(n)
        results[label] = {
            "loader_per_batch": _ms_stats(per_batch),
            "loader_back_to_back_ms": total / n * 1e3,
            "load_batch_alone": _ms_stats(direct[args.probe_warmup :]),
            "stages_ms_per_batch_8": stages8,
            "batches": n,
            "device": device,
        }
        kw = dict(REFERENCE, tile=tile, batch_size=64, device=device, workers=0)
        with zarrdali.ZarrLoader(str(store), variables, **kw) as loader:
            plan = loader.epoch_plan()
            m = min(args.probe_batches, len(loader))
            loader.load_batch(plan.batch(0))
            sync()
            times.reset()
            t = time.perf_counter()
            for k in range(m):
                loader.load_batch(plan.batch(k % len(loader)))
            sync()
            results[label]["load_batch_64_ms"] = (time.perf_counter() - t) / m * 1e3
            results[label]["stages_ms_per_batch_64"] = times.per_batch_ms(m)
        print(label, json.dumps(results[label]), flush=True)
    worst = max(r["loader_back_to_back_ms"] for r in results.values())
    results["goal"] = {"at_most_ms": 2.0, "worst_back_to_back_ms": worst, "met": worst <= 2.0}
    Path(args.probe_json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


# -- a local HTTP server with byte ranges (for the remote readers) ------------------------
class RangeRequestHandler(http.server.BaseHTTPRequestHandler):
    """GET and HEAD of the files under the server's ``root``, with a single
    ``Range: bytes=a-b`` / ``a-`` / ``-n`` (206, ``Content-Range``); 404 for
    anything else, 416 past the end. What obstore's HTTP store and kvikIO's
    remote file (libcurl) ask of an object store over HTTP."""

    protocol_version = "HTTP/1.1"
    server: RangeHTTPServer

    def log_message(self, *args: object) -> None:  # quiet: counted instead
        pass

    def _file(self) -> Path | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        parts = [p for p in posixpath.normpath(path).split("/") if p not in ("", ".", "..")]
        file = self.server.root.joinpath(*parts)
        return file if file.is_file() else None

    def _range(self, size: int) -> tuple[int, int] | str | None:
        header = self.headers.get("Range")
        if not header:
            return None
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
        if not match or not (match[1] or match[2]):
            return "bad"
        if not match[1]:
            return max(size - int(match[2]), 0), size
        start = int(match[1])
        end = int(match[2]) + 1 if match[2] else size
        return "bad" if start >= size else (start, min(end, size))

    def _reply(self, body: bool) -> None:
        self.server.count(self.command)
        file = self._file()
        if file is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = file.stat().st_size
        span = self._range(size)
        if span == "bad":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = (0, size) if span is None else span
        self.send_response(200 if span is None else 206)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if span is not None:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if body:
            with open(file, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
            self.wfile.write(data)
            self.server.count("bytes", len(data))

    def do_GET(self) -> None:
        self._reply(body=True)

    def do_HEAD(self) -> None:
        self._reply(body=False)


class RangeHTTPServer(http.server.ThreadingHTTPServer):
    """Serves ``root`` on 127.0.0.1 (a free port) from a thread; ``with`` starts
    and stops it. ``counts``: requests by method, and bytes sent."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        import threading

        super().__init__(("127.0.0.1", 0), RangeRequestHandler)
        self.root = Path(root)
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + n

    def __enter__(self) -> RangeHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(10)


def probe_remote(args: argparse.Namespace) -> int:
    """The GPU backend on the sharded store over HTTP (a local range server):
    ``read="pinned"`` and ``read="kvikio"``, every batch equal to the CPU
    backend's on the local copy, samples/s of each; remote.json."""
    import zarrdali
    from zarrdali.batch.plan import plan_batch
    from zarrdali.cpu.backend import CpuBackend
    from zarrdali.store.open import load_layouts, open_group

    local = Path(args.data_dir) / SHARDED
    variables = _variables(local)
    tile = (args.probe_tile, args.probe_tile)
    spec = dict(REFERENCE, tile=tile, batch_size=8)
    loader = zarrdali.ZarrLoader(str(local), variables, **spec, device="cpu", workers=0)
    plan, n_batches = loader.epoch_plan(), len(loader)
    loader.close()
    n_frames = spec["input_steps"] + spec["target_steps"]
    batches = [plan.batch(k % n_batches) for k in range(args.probe_warmup + args.probe_batches)]
    lgroup, lname = open_group(str(local))
    llayouts = load_layouts(lgroup, lname, variables)
    cpu = CpuBackend(lgroup, lname, 4)
    try:
        want = [
            cpu.load_batch(llayouts, plan_batch(llayouts, b, n_frames=n_frames, frame_step=1,
                                                tile_hw=tile))
            for b in batches
        ]  # fmt: skip
    finally:
        cpu.close()
    result: dict = {"store": SHARDED, "variables": variables, "spec": {**spec, "tile": tile}}
    with RangeHTTPServer(Path(args.data_dir)) as server:
        url = f"{server.url}/{SHARDED}"
        result["url"] = url
        for read in ("pinned", "kvikio"):
            before = dict(server.counts)
            row = _remote_reader_row(args, url, read, variables, batches, want, n_frames, tile)
            row["server"] = {k: v - before.get(k, 0) for k, v in server.counts.items()}
            result[read] = row
            print(read, json.dumps(row), flush=True)
    ok = {r: result[r] for r in ("pinned", "kvikio") if result[r].get("status") == "ok"}
    result["faster"] = max(ok, key=lambda r: ok[r]["samples_per_s"]) if ok else None
    result["equal"] = all(r["equal"] for r in ok.values()) if ok else None
    Path(args.probe_json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["equal"] is not False else 1


def _remote_reader_row(args, url, read, variables, batches, want, n_frames, tile) -> dict:
    """One reader of the remote probe: equal to ``want``, samples/s (no DALI)."""
    import numpy as np

    from zarrdali.batch.plan import plan_batch
    from zarrdali.store.open import load_layouts, open_group

    group, name = open_group(url)
    layouts = load_layouts(group, name, variables)
    if args.probe_device == "cpu":  # the rehearsal: the server and the source, on the CPU
        from zarrdali.cpu.backend import CpuBackend

        if read != "pinned":
            return {"status": "skipped", "reason": "the CPU rehearsal reads through the source"}
        backend, to_host = CpuBackend(group, name, 4), np.asarray
    else:
        from zarrdali.gpu import backend as gpu_backend

        missing = gpu_backend.missing_gpu_requirements()
        if missing:
            return {"status": "skipped", "reason": "no GPU path here: " + "; ".join(missing)}
        try:
            backend = gpu_backend.GpuBackend(group, name, read=read)
        except Exception as err:  # e.g. kvikIO built without remote-file support
            return {"status": "skipped", "reason": f"{type(err).__name__}: {err}"}
        to_host = _to_host
    try:
        equal, seconds, samples = True, 0.0, 0
        for k, (b, expected) in enumerate(zip(batches, want, strict=True)):
            bplan = plan_batch(layouts, b, n_frames=n_frames, frame_step=1, tile_hw=tile)
            t = time.perf_counter()
            got = backend.load_batch(layouts, bplan)  # its own stream, synchronized
            if k >= args.probe_warmup:
                seconds += time.perf_counter() - t
                samples += len(b)
            equal &= to_host(got).tobytes() == np.asarray(expected).tobytes()
        mode = getattr(backend, "read_mode", "source")
    finally:
        backend.close()
    return {
        "status": "ok",
        "read": mode,
        "equal": bool(equal),
        "samples_per_s": samples / seconds if seconds else None,
        "batches": len(batches) - args.probe_warmup,
    }


def _to_host(array):
    return array.get() if hasattr(array, "get") else array


# -- main ---------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, help="output folder (at most 8 files land there)")
    p.add_argument(
        "--budget-s", type=float, default=DEFAULT_BUDGET_S,
        help=f"all steps together ({DEFAULT_BUDGET_S:.0f})",
    )  # fmt: skip
    p.add_argument(
        "--data-dir",
        default=os.path.join(tempfile.gettempdir(), "zarrdali-verify", "sample-data"),
        help="sample data (written there when missing)",
    )
    p.add_argument("--commit", help="the commit being verified (where the copy has no .git)")
    p.add_argument(
        "--stack-check", help="gpu_stack_check.py (default: .stack/p*/, ../shared/tools/)"
    )
    p.add_argument("--steps", help="comma-separated steps, e.g. bench-b64,decode (also bench-b8)")
    p.add_argument("--decode-args", default="", help="more arguments for decode_gpu.py (zstd)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the CI smoke test)")
    p.add_argument("--dry-run", action="store_true", help="plan and write provenance only")
    p.add_argument("--require-gpu", action="store_true", help="no GPU is an error, not a skip")
    p.add_argument(
        "--rehearse-on-cpu",
        action="store_true",
        help="run the small-batch, bench and remote steps on the CPU path (checks the script)",
    )
    p.add_argument("--scratch", type=Path, help="folder for raw bench output (default: temp)")
    # the probes, each run by its step in its own process
    p.add_argument("--probe-imports", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe-small-batch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe-remote", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe-json", help=argparse.SUPPRESS)
    p.add_argument("--probe-device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--probe-batches", type=int, default=40, help=argparse.SUPPRESS)
    p.add_argument("--probe-warmup", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--probe-tile", type=int, default=128, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (args.probe_small_batch or args.probe_remote or args.probe_imports) and not args.out:
        p.error("--out is required")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.probe_imports:
        return probe_imports(args)
    if args.probe_small_batch:
        return probe_small_batch(args)
    if args.probe_remote:
        return probe_remote(args)
    started = time.monotonic()
    deadline = started + args.budget_s
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="zarrdali-verify-"))
    scratch.mkdir(parents=True, exist_ok=True)
    log = out / "verify.log"
    log.write_text(f"# {shlex.join([sys.executable, __file__, *argv])}\n")
    env = dict(os.environ, PYTHONFAULTHANDLER="1", PYTHONUNBUFFERED="1")
    src = str(REPO / "src")
    if src not in env.get("PYTHONPATH", "").split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), src) if p)

    gpu = {"missing": ["a GPU probe (skipped: --dry-run)"]} if args.dry_run else probe_gpu(env)
    steps = plan_steps(args, out, scratch)
    meta = provenance(args, gpu, [__file__, *argv])
    checker = find_stack_check(args.stack_check)
    meta["stack_check"] = str(checker) if checker else None
    meta["steps"] = [{"name": s.name, "timeout_s": s.timeout_s} for s in steps]
    (out / "provenance.json").write_text(json.dumps(meta, indent=2) + "\n")
    missing = gpu.get("missing") or []
    print(f"zarrdali GPU verification: GPU {gpu.get('device') or gpu.get('nvidia_smi', 'none')}")
    if missing:
        print("  no GPU path here: needs " + "; ".join(missing))
    planned = sum(s.timeout_s for s in steps)
    if planned > args.budget_s:
        print(
            f"  note: the steps' timeouts add up to {planned:.0f} s > budget {args.budget_s:.0f} s"
        )

    figures: dict = {}
    bench_names = [s.name for s in steps if s.name.startswith("bench-")]
    stopped = ""  # why the steps after a failed import check do not run
    for step in steps:
        if args.dry_run:
            step.status, step.why = "planned", "; ".join(w for w in ("--dry-run", step.why) if w)
        elif stopped:
            step.status, step.why = "not run", stopped
        elif step.needs_gpu and args.rehearse_on_cpu and not step.rehearsable:
            step.status, step.why = "skipped", "--rehearse-on-cpu: this step needs the GPU"
        elif step.needs_gpu and missing and not args.rehearse_on_cpu:
            step.status = "failed" if args.require_gpu else "skipped"
            step.why = "no GPU here: the GPU path needs " + "; ".join(missing)
        elif step.name == "sample-data" and _sample_data_present(Path(args.data_dir)):
            step.status, step.why = "passed", f"already in {args.data_dir}"
        elif step.why:  # known not to run (e.g. the stack check was not found)
            step.status = "failed"
        else:
            print(f"  {step.name} ...", flush=True)
            run_step(step, log, deadline, env, REPO)
            collect(step, out, scratch, log, figures, bench_names)
            if step.name == "imports" and step.status != "passed":
                found = figures.get("imports") or {}
                what = ", ".join(sorted(found.get("missing", {})) + sorted(found.get("broken", {})))
                stopped = f"the import check failed ({what or step.why}): see verify.log"
                for name, needed_by in sorted(found.get("missing", {}).items()):
                    pip = PIP_NAMES.get(name, name.replace("_", "-"))
                    print(f"  MISSING {name} (pip: {pip}), needed by {', '.join(needed_by[:4])}")
                if found.get("pip"):
                    print("  add to the pack: python3 ../shared/tools/gpu_pack.py pack .stack "
                          "--extra " + " ".join(found["pip"]))  # fmt: skip
        print(f"  {step.name}: {step.status} {step.why}".rstrip(), flush=True)
        write_summary(out, steps, figures, started)  # a run cut short still leaves its part
    summary = write_summary(out, steps, figures, started)
    for goal in summary["goals"]:
        if goal.get("met") is not None:
            mark = "met   " if goal["met"] else "MISSED"
            print(f"  goal {mark} {goal['goal']}: {goal.get('value')}")
    files = sorted(p.name for p in out.iterdir())
    if len(files) > MAX_FILES:
        print(f"warning: {len(files)} files in {out} (a device run returns {MAX_FILES})")
    print(f"done in {summary['seconds']} s: {'ok' if summary['ok'] else 'FAILURES'}; {files}")
    print(f"scratch (plots, raw bench output): {scratch}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
