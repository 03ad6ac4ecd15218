"""``benchmarks/gpu_verify.py`` on the CPU: no-GPU and dry runs, a CPU rehearsal
of its steps at tiny size, and its step runner (timeouts, failures, budget)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_verify.py"


@pytest.fixture(scope="module")
def verify():
    spec = importlib.util.spec_from_file_location("gpu_verify", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_verify"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_verify", None)


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = Path(args[args.index("--out") + 1])
    if "--scratch" not in args:  # not a new folder under /tmp per run
        args = (*args, "--scratch", str(out.parent / f"{out.name}-scratch"))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


def steps_of(out: Path) -> dict[str, dict]:
    summary = json.loads((out / "summary.json").read_text())
    return {s["name"]: s for s in summary["steps"]}


def test_without_a_gpu_the_gpu_steps_are_skipped_with_the_reason(tmp_path, verify):
    from zarrdali.backends.gpu import missing_gpu_requirements

    if not missing_gpu_requirements():
        pytest.skip("a GPU is here: the GPU steps would run")
    out = tmp_path / "out"
    done = run("--out", str(out), "--data-dir", str(tmp_path / "data"), "--tiny")
    assert done.returncode == 0, done.stdout + done.stderr
    steps = steps_of(out)
    assert steps["sample-data"]["status"] == "passed"
    gpu_steps = ("pytest-gpu", "small-batch", "bench-b64", "bench-b8", "bench-wait", "decode")
    for name in (*gpu_steps, "decode-lz4"):
        assert steps[name]["status"] == "skipped"
        assert steps[name]["why"].startswith("no GPU here: the GPU path needs")
    assert "skipped no GPU here" in done.stdout
    prov = json.loads((out / "provenance.json").read_text())
    for key in ("date_utc", "command", "commit", "tree_sha256", "gpu", "versions", "python"):
        assert key in prov
    assert prov["gpu"]["missing"] and "gpu_verify.py" in prov["command"]
    assert {"zarr", "numcodecs", "torch"} <= set(prov["versions"])
    assert prov["tree_sha256"] == verify.tree_hash()
    assert len(list(out.iterdir())) <= verify.MAX_FILES
    # --require-gpu: the same run fails
    again = run("--out", str(tmp_path / "o2"), "--data-dir", str(tmp_path / "data"))
    assert again.returncode == 0  # sample data already there: not written again
    assert steps_of(tmp_path / "o2")["sample-data"]["why"].startswith("already in")
    strict = run(
        "--out", str(tmp_path / "o3"), "--data-dir", str(tmp_path / "data"), "--require-gpu"
    )
    assert strict.returncode == 1
    assert steps_of(tmp_path / "o3")["pytest-gpu"]["status"] == "failed"


def test_dry_run_plans_every_step_and_runs_none(tmp_path):
    out = tmp_path / "out"
    done = run("--out", str(out), "--data-dir", str(tmp_path / "data"), "--dry-run")
    assert done.returncode == 0, done.stderr
    steps = steps_of(out)
    assert list(steps) == [
        "sample-data",
        "pytest-gpu",
        "small-batch",
        "bench-b64",
        "bench-b8",
        "bench-wait",
        "decode",
        "decode-lz4",
    ]
    assert all(s["status"] == "planned" for s in steps.values())
    assert "--batch-size 64 --step-ms 20" in steps["bench-wait"]["command"]
    assert "zarrdali-cuda torch-xarray" in steps["bench-b8"]["command"]
    assert "-m gpu" in steps["pytest-gpu"]["command"]
    assert "tests/test_gpu_loader.py" in steps["pytest-gpu"]["command"]
    assert "tests/test_gpu_engine.py" in steps["pytest-gpu"]["command"]
    assert "--codec lz4" in steps["decode-lz4"]["command"]
    assert not (tmp_path / "data").exists()
    assert sum(s["timeout_s"] for s in steps.values()) >= 540  # the budget is what binds


def test_cpu_rehearsal_runs_the_steps_and_collects_their_figures(tmp_path, verify):
    out = tmp_path / "out"
    done = run(
        "--out",
        str(out),
        "--data-dir",
        str(tmp_path / "data"),
        "--scratch",
        str(tmp_path / "scratch"),
        "--tiny",
        "--rehearse-on-cpu",
        "--steps",
        "sample-data,small-batch,bench-wait",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    steps = steps_of(out)
    assert [s["status"] for s in steps.values()] == ["passed"] * 3
    figures = json.loads((out / "summary.json").read_text())["figures"]
    small = figures["small-batch"]
    for store in ("plain", "sharded"):
        assert small[store]["loader_per_batch"]["median_ms"] > 0
        assert small[store]["load_batch_alone"]["n"] == 5
    assert small["goal"]["at_most_ms"] == 2.0
    rows = figures["bench-wait"]
    assert {r["store"] for r in rows} == {"plain", "sharded"}
    assert all(r["status"] == "ok" and 0 <= r["wait_fraction"] <= 1 for r in rows)
    bench = json.loads((out / "bench.json").read_text())
    assert list(bench) == ["bench-wait"] and bench["bench-wait"]["spec"]["step_ms"] == 20
    assert "## bench-wait" in (out / "bench.md").read_text()
    log = (out / "verify.log").read_text()
    assert "===== small-batch: passed" in log and "===== bench-wait: passed" in log
    assert sorted(p.name for p in out.iterdir()) == [
        "bench.json",
        "bench.md",
        "provenance.json",
        "summary.json",
        "verify.log",
    ]


# -- the step runner --------------------------------------------------------------------
def _step(verify, name: str, code: str, timeout: float = 30):
    return verify.Step(name, [sys.executable, "-c", code], timeout)


def test_a_step_past_its_timeout_is_killed_with_its_children_and_the_next_runs(tmp_path, verify):
    log = tmp_path / "log"
    marker = tmp_path / "child-alive"
    child = tmp_path / "child.py"
    child.write_text(f"import time\ntime.sleep(5)\nopen({str(marker)!r}, 'w').close()\n")
    script = tmp_path / "hang.py"
    script.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(child)!r}])\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    hang = f"exec(open({str(script)!r}).read())"
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    deadline = time.monotonic() + 120
    t = time.monotonic()
    slow = verify.run_step(_step(verify, "hang", hang, timeout=3), log, deadline, env, tmp_path)
    assert time.monotonic() - t < 15
    assert slow.status == "timeout" and "after 3 s" in slow.why
    fine = verify.run_step(_step(verify, "next", "print('ok')"), log, deadline, env, tmp_path)
    assert fine.status == "passed"
    time.sleep(max(0.0, t + 6.5 - time.monotonic()))  # past the child's 5 s
    assert not marker.exists(), "the step's child outlived the kill of its process group"
    text = log.read_text()
    assert "started" in text and "===== hang: timeout" in text
    assert "Fatal Python error: Aborted" in text  # faulthandler's dump of the threads
    assert "===== next: passed" in text


def test_a_failing_step_is_recorded_and_the_budget_caps_the_rest(tmp_path, verify):
    log = tmp_path / "log"
    env = dict(os.environ)
    deadline = time.monotonic() + 8
    bad = verify.run_step(
        _step(verify, "bad", "import sys; sys.exit(3)"), log, deadline, env, tmp_path
    )
    assert bad.status == "failed" and bad.returncode == 3 and bad.why == "exit status 3"
    capped = verify.run_step(
        _step(verify, "long", "import time; time.sleep(30)", timeout=100),
        log,
        deadline,
        env,
        tmp_path,
    )
    assert capped.status == "timeout" and capped.limit_s <= 8
    late = verify.run_step(_step(verify, "late", "print(1)"), log, deadline, env, tmp_path)
    assert late.status == "not run" and "budget" in late.why


def test_junit_summary_counts_and_names_failures(tmp_path, verify):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_x" name="test_a"/>'
        '<testcase classname="tests.test_x" name="test_b"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_x" name="test_c"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    got = verify.junit_summary(xml)
    assert got["tests"] == 3 and got["failures"] == 1 and got["skipped"] == 1
    assert got["failed_tests"] == ["tests.test_x::test_b"]
    assert verify.junit_summary(tmp_path / "missing.xml") is None
