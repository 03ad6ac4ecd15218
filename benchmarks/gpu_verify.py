"""The whole GPU verification in one command, within a hard time budget.

    python benchmarks/gpu_verify.py --out OUT --require-gpu --commit HASH

Steps, in order, each in its own process group with its own timeout, every one
run whatever happened to the one before:

    sample-data   the embedded sample data (both layouts), unless already there
    pytest-gpu    ``pytest -m gpu`` with faulthandler (junit XML)
    small-batch   6 samples of 16×16 per batch on device="cuda": time per batch,
                  end to end (DALI, back to back) and ``load_batch`` alone
    bench-b64     ``zarrdali bench`` zarrdali[cuda] vs torch DataLoader + xarray, batch 64
    bench-b8      the same at batch 8
    bench-wait    batch 64 with a simulated 20 ms training step: the consumer's wait
    decode        ``benchmarks/decode_gpu.py`` (nvCOMP alone, zarrdali read + decode +
                  gather, numcodecs on all cores)

A step gets at most its own timeout and what is left of ``--budget-s`` (default
540 s, so that the run ends inside a 10-minute slot); a step that outlives it
gets SIGABRT (faulthandler prints every thread's stack into the log), then its
whole process group SIGKILL. Without a GPU (or with ``--dry-run``) the GPU
steps are skipped with the reason; ``--require-gpu`` makes a missing GPU an
error. Exit status: 0 when no step failed or timed out.

Output (``--out``; at most 8 files, as a device run returns at most 8):

    provenance.json  GPU, driver, CUDA, package versions, commit, tree hash, command, date
    summary.json     every step (command, status, seconds, why) and the key figures
    verify.log       the output of every step, one after the other
    pytest-gpu.xml   junit XML of the GPU tests
    bench.json       the three bench runs' JSON, by run
    bench.md         the three bench runs' tables, with the system header
    decode_gpu.json  the decode benchmark (zstd, 64 KB and 1 MB chunks)
    decode_gpu_lz4.json  the same for LZ4 (64 KB), with DALI's inflate beside nvCOMP

The other files of a bench run (plots) stay in a scratch folder under /tmp.
Needs no network; run it from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
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
    "pytest",
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
from zarrdali.backends.gpu import missing_gpu_requirements, gpu_description
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
        from zarrdali.backends.gpu import kvikio_io_mode
        out["kvikio_io_mode"] = kvikio_io_mode()
    except Exception as err:
        out["kvikio_io_mode"] = f"unknown ({type(err).__name__}: {err})"
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
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
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
def plan_steps(args: argparse.Namespace, out: Path, scratch: Path) -> list[Step]:
    py = sys.executable
    data = Path(args.data_dir)
    tiny = args.tiny
    sample = ["--n-time", "12", "--n-lat", "33", "--n-lon", "40"] if tiny else []
    cpu = args.rehearse_on_cpu
    bench = [py, "-m", "zarrdali", "bench", "--data-dir", str(data), "-q", "--loaders"]
    bench += ["zarrdali-cpu" if cpu else "zarrdali-cuda"]
    bench += [] if cpu and tiny else ["torch-xarray"]
    if tiny:
        bench += ["--tile", "8", "8", "--batches", "3", "--warmup", "1", "--epochs", "1"]
    decode = [py, "benchmarks/decode_gpu.py", "--out", str(out / "decode_gpu.json")]
    if tiny:
        decode += ["--time-steps", "4", "--batches", "2", "--repeats", "1", "--batch-size", "4"]
    decode += shlex.split(args.decode_args)
    pytest = [py, "-X", "faulthandler", "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider"]
    pytest += ["-o", "faulthandler_timeout=120", "-q", "-rfEs"]
    pytest += ["--junitxml", str(out / "pytest-gpu.xml"), *gpu_test_files()]
    steps = [
        Step("sample-data", [py, "-m", "zarrdali", "sample-data", str(data), "-q", *sample], 120),
        Step("pytest-gpu", pytest, 240, needs_gpu=True),
        Step(
            "small-batch",
            [py, "-X", "faulthandler", __file__, "--probe-small-batch"]
            + ["--data-dir", str(data), "--probe-json", str(scratch / "small-batch.json")]
            + (["--probe-batches", "5", "--probe-warmup", "2"] if tiny else [])
            + (["--probe-device", "cpu"] if cpu else []),
            60,
            needs_gpu=True,
            rehearsable=True,
        ),
    ]
    for name, extra, timeout in (
        ("bench-b64", ["--batch-size", "64"], 120),
        ("bench-b8", ["--batch-size", "8"], 75),
        ("bench-wait", ["--batch-size", "64", "--step-ms", "20"], 75),
    ):
        cmd = [*bench, *extra, "--out", str(scratch / name)]
        steps.append(Step(name, cmd, timeout, needs_gpu=True, rehearsable=True))
    steps.append(Step("decode", decode, 100, needs_gpu=True))
    # LZ4 stores: nvCOMP's C API against DALI's fn.decoders.inflate (64 KB chunks)
    lz4 = [py, "benchmarks/decode_gpu.py", "--codec", "lz4", "--chunks", "64k"]
    lz4 += ["--out", str(out / "decode_gpu_lz4.json")]
    if tiny:
        lz4 += ["--time-steps", "4", "--batches", "2", "--repeats", "1", "--batch-size", "4"]
    steps.append(Step("decode-lz4", lz4, 60, needs_gpu=True))
    if args.steps:
        wanted = args.steps.split(",")
        unknown = sorted(set(wanted) - {s.name for s in steps})
        if unknown:
            raise SystemExit(f"unknown step(s) {unknown}; steps: {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in wanted]
    return steps


def gpu_test_files(root: Path = REPO) -> list[str]:
    """The test files with GPU tests: collecting only them needs none of the
    CPU-only tests' packages (hypothesis, netCDF4) on the GPU machine."""
    files = sorted((root / "tests").glob("test_*.py"))
    return [str(f.relative_to(root)) for f in files if "mark.gpu" in f.read_text()]


def _sample_data_present(data: Path) -> bool:
    return (data / "era5_plain.zarr" / "zarr.json").is_file() and (
        data / "era5_sharded.zarr" / "zarr.json"
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


def write_summary(out: Path, steps: list[Step], figures: dict, started: float) -> dict:
    summary = {
        "seconds": round(time.monotonic() - started, 1),
        "ok": not any(s.status in ("failed", "timeout") for s in steps),
        "steps": [s.to_json() for s in steps],
        "figures": figures,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


# -- the small-batch probe (run as its own step) -----------------------------------------
def probe_small_batch(args: argparse.Namespace) -> int:
    """Time batches of 6 samples of 16×16 (4 + 2 frames, every variable)."""
    import statistics

    import zarr

    import zarrdali

    device = args.probe_device
    if device == "cuda":
        import torch

        sync = torch.cuda.synchronize
    else:

        def sync() -> None:
            pass

    def stats(seconds: list[float]) -> dict:
        ms = sorted(s * 1e3 for s in seconds)
        return {
            "median_ms": statistics.median(ms),
            "p90_ms": ms[int(0.9 * (len(ms) - 1))],
            "max_ms": ms[-1],
            "n": len(ms),
        }

    results = {}
    data = Path(args.data_dir)
    for label in ("plain", "sharded"):
        store = data / f"era5_{label}.zarr"
        group = zarr.open_group(store, mode="r")
        variables = [name for name, arr in group.arrays() if arr.ndim >= 3]
        kw = dict(input_steps=4, target_steps=2, tile=(16, 16), batch_size=6, shuffle=True)
        with zarrdali.ZarrLoader(str(store), variables, device=device, workers=0, **kw) as loader:
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
            assert batch["input"].shape[1:] == (4, len(variables), 16, 16)
            it.close()
            plan = loader.epoch_plan()
            direct = []
            for k in range(args.probe_warmup + n):
                t = time.perf_counter()
                loader.load_batch(plan.batch(k))  # plan + read + decode + gather, synchronized
                sync()
                direct.append(time.perf_counter() - t)
        results[label] = {
            "loader_per_batch": stats(per_batch),
            "loader_back_to_back_ms": total / n * 1e3,
            "load_batch_alone": stats(direct[args.probe_warmup :]),
            "batches": n,
            "device": device,
        }
        print(label, json.dumps(results[label]))
    worst = max(r["loader_back_to_back_ms"] for r in results.values())
    results["goal"] = {"at_most_ms": 2.0, "worst_back_to_back_ms": worst, "met": worst <= 2.0}
    Path(args.probe_json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


# -- main ---------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, help="output folder (at most 8 files land there)")
    p.add_argument("--budget-s", type=float, default=540.0, help="all steps together (540)")
    p.add_argument(
        "--data-dir",
        default=os.path.join(tempfile.gettempdir(), "zarrdali-verify", "sample-data"),
        help="sample data (written there when missing)",
    )
    p.add_argument("--commit", help="the commit being verified (where the copy has no .git)")
    p.add_argument("--steps", help="comma-separated subset of the steps, e.g. bench-b64,decode")
    p.add_argument("--decode-args", default="", help="more arguments for decode_gpu.py")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the CI smoke test)")
    p.add_argument("--dry-run", action="store_true", help="plan and write provenance only")
    p.add_argument("--require-gpu", action="store_true", help="no GPU is an error, not a skip")
    p.add_argument(
        "--rehearse-on-cpu",
        action="store_true",
        help="run the small-batch and bench steps on the CPU path (checks the script itself)",
    )
    p.add_argument("--scratch", type=Path, help="folder for raw bench output (default: temp)")
    # the small-batch probe, run by the small-batch step in its own process
    p.add_argument("--probe-small-batch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe-json", help=argparse.SUPPRESS)
    p.add_argument("--probe-device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--probe-batches", type=int, default=50, help=argparse.SUPPRESS)
    p.add_argument("--probe-warmup", type=int, default=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.probe_small_batch and args.out is None:
        p.error("--out is required")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.probe_small_batch:
        return probe_small_batch(args)
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
    meta = provenance(args, gpu, [__file__, *argv])
    (out / "provenance.json").write_text(json.dumps(meta, indent=2) + "\n")
    missing = gpu.get("missing") or []
    print(f"zarrdali GPU verification: GPU {gpu.get('device') or gpu.get('nvidia_smi', 'none')}")
    if missing:
        print("  no GPU path here: needs " + "; ".join(missing))

    steps = plan_steps(args, out, scratch)
    figures: dict = {}
    bench_names = [s.name for s in steps if s.name.startswith("bench-")]
    for step in steps:
        if args.dry_run:
            step.status, step.why = "planned", "--dry-run"
        elif step.needs_gpu and args.rehearse_on_cpu and not step.rehearsable:
            step.status, step.why = "skipped", "--rehearse-on-cpu: this step needs the GPU"
        elif step.needs_gpu and missing and not args.rehearse_on_cpu:
            step.status = "failed" if args.require_gpu else "skipped"
            step.why = "no GPU here: the GPU path needs " + "; ".join(missing)
        elif step.name == "sample-data" and _sample_data_present(Path(args.data_dir)):
            step.status, step.why = "passed", f"already in {args.data_dir}"
        else:
            print(f"  {step.name} ...", flush=True)
            run_step(step, log, deadline, env, REPO)
        if step.name == "pytest-gpu":
            figures["pytest-gpu"] = junit_summary(out / "pytest-gpu.xml")
        elif step.name == "small-batch" and (scratch / "small-batch.json").is_file():
            figures["small-batch"] = json.loads((scratch / "small-batch.json").read_text())
        elif step.name.startswith("bench-"):
            figures.update(merge_bench(out, scratch, bench_names))
        print(f"  {step.name}: {step.status} {step.why}".rstrip(), flush=True)
        write_summary(out, steps, figures, started)  # a run cut short still leaves its part
    summary = write_summary(out, steps, figures, started)
    files = sorted(p.name for p in out.iterdir())
    if len(files) > MAX_FILES:
        print(f"warning: {len(files)} files in {out} (a device run returns {MAX_FILES})")
    print(f"done in {summary['seconds']} s: {'ok' if summary['ok'] else 'FAILURES'}; {files}")
    print(f"scratch (plots, raw bench output): {scratch}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
