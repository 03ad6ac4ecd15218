"""``benchmarks/gpu_verify.py`` on the CPU: no-GPU and dry runs (the steps in the
order of what they prove, their timeouts within the budget), a CPU rehearsal of
its steps at tiny size, its step runner (timeouts, failures, budget), what a
run cut short keeps, the goals, and the remote probe's HTTP range server with
the GPU backend on the CPU stand-in."""

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
    gpu_steps = [name for name in steps if name != "sample-data"]
    assert len(gpu_steps) == 8
    for name in gpu_steps:
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
    assert steps_of(tmp_path / "o3")["stack-check"]["status"] == "failed"


def test_dry_run_plans_every_step_in_order_within_the_budget(tmp_path, verify):
    out = tmp_path / "out"
    done = run("--out", str(out), "--data-dir", str(tmp_path / "data"), "--dry-run")
    assert done.returncode == 0, done.stderr
    steps = steps_of(out)
    # what they prove: the stack, the GPU tests, decode, the end-to-end bench, the rest
    assert list(steps) == [
        "stack-check",
        "pytest-gpu",
        "decode",
        "decode-lz4",
        "sample-data",
        "bench-b64",
        "small-batch",
        "bench-wait",
        "remote-gpu",
    ]
    assert all(s["status"] == "planned" for s in steps.values())
    assert all(s["why"].startswith("--dry-run") for s in steps.values())
    # each step gets its whole timeout even when every one before used all of its own
    assert sum(s["timeout_s"] for s in steps.values()) <= verify.DEFAULT_BUDGET_S
    bench = steps["bench-b64"]["command"]
    assert "era5_sharded.zarr" in bench and "--batch-size 64" in bench
    assert "zarrdali-cuda torch-xarray" in bench
    assert "--batch-size 64 --step-ms 20" in steps["bench-wait"]["command"]
    assert "-m gpu" in steps["pytest-gpu"]["command"] and " -v " in steps["pytest-gpu"]["command"]
    assert "tests/test_gpu_loader.py" in steps["pytest-gpu"]["command"]
    assert "tests/test_gpu_engine.py" in steps["pytest-gpu"]["command"]
    assert "tests/test_feed_gpu.py" in steps["pytest-gpu"]["command"]
    assert "--batch-size 64" in steps["decode"]["command"]
    assert "--codec lz4" in steps["decode-lz4"]["command"]
    assert "--probe-remote" in steps["remote-gpu"]["command"]
    if verify.find_stack_check() is not None:  # ../shared/tools beside a developer's checkout
        assert "gpu_stack_check.py" in steps["stack-check"]["command"]
    else:  # a clean clone (CI): said, and the step fails when run
        assert "gpu_stack_check.py not found" in steps["stack-check"]["why"]
    assert not (tmp_path / "data").exists()
    prov = json.loads((out / "provenance.json").read_text())
    assert [s["name"] for s in prov["steps"]] == list(steps)
    extra = run("--out", str(tmp_path / "o2"), "--dry-run", "--steps", "bench-b8,decode")
    assert list(steps_of(tmp_path / "o2")) == ["bench-b8", "decode"], extra.stderr


def test_find_stack_check(tmp_path, verify, monkeypatch):
    assert verify.find_stack_check(None, tmp_path) is None
    part = tmp_path / ".stack" / "p3"
    part.mkdir(parents=True)
    (part / "gpu_stack_check.py").write_text("")
    assert verify.find_stack_check(None, tmp_path) == part / "gpu_stack_check.py"
    assert verify.find_stack_check("x.py", tmp_path) == Path("x.py")
    # a clean clone without ../shared: the step says so (and fails when run)
    monkeypatch.setattr(verify, "find_stack_check", lambda *a: None)
    args = verify.parse(["--out", str(tmp_path / "o"), "--dry-run"])
    step = verify.plan_steps(args, tmp_path, tmp_path)[0]
    assert step.name == "stack-check" and "gpu_stack_check.py not found" in step.why


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
        "sample-data,small-batch,bench-wait,remote-gpu",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    steps = steps_of(out)
    assert [s["status"] for s in steps.values()] == ["passed"] * 4
    summary = json.loads((out / "summary.json").read_text())
    figures = summary["figures"]
    small = figures["small-batch"]
    for store in ("plain", "sharded"):
        assert small[store]["loader_per_batch"]["median_ms"] > 0
        assert small[store]["load_batch_alone"]["n"] == 5
        assert small[store]["stages_ms_per_batch_8"]["zarrdali.load"] > 0  # the NVTX ranges
        assert small[store]["stages_ms_per_batch_64"]["zarrdali.plan"] > 0
    assert small["goal"]["at_most_ms"] == 2.0
    rows = figures["bench-wait"]
    assert {r["store"] for r in rows} == {"era5_sharded.zarr"}
    assert all(r["status"] == "ok" and 0 <= r["wait_fraction"] <= 1 for r in rows)
    bench = json.loads((out / "bench.json").read_text())
    assert list(bench) == ["bench-wait"] and bench["bench-wait"]["spec"]["step_ms"] == 20
    assert "## bench-wait" in (out / "bench.md").read_text()
    remote = figures["remote-gpu"]
    assert remote["pinned"]["status"] == "ok" and remote["pinned"]["equal"] is True
    assert remote["pinned"]["server"]["GET"] > 0 and remote["faster"] == "pinned"
    goals = {g["goal"]: g for g in summary["goals"]}
    assert goals["ms per batch of 8, back to back through DALI"]["value"] > 0
    log = (out / "verify.log").read_text()
    assert "===== small-batch: passed" in log and "===== bench-wait: passed" in log
    assert sorted(p.name for p in out.iterdir()) == [
        "bench.json",
        "bench.md",
        "provenance.json",
        "remote.json",
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


# -- what a run cut short keeps, and the goals --------------------------------------------
def test_pytest_progress_of_a_run_cut_short(verify):
    log = (
        "\n===== pytest-gpu: python -m pytest -v (limit 180 s)\n"
        "tests/test_gpu_engine.py::test_a[cuda] PASSED [ 10%]\n"
        "tests/test_gpu_engine.py::test_b[cuda-x] FAILED [ 20%]\n"
        "tests/test_gpu_loader.py::test_c SKIPPED (no) [ 30%]\n"
        "tests/test_gpu_loader.py::test_d PASSED [ 40%]\n"
        "Fatal Python error: Aborted\n"
    )
    got = verify.pytest_progress(log)
    assert got["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert got["failed_tests"] == ["tests/test_gpu_engine.py::test_b[cuda-x]"]
    assert got["last_reported"] == "tests/test_gpu_loader.py::test_d"


def test_goals_say_what_is_met_and_by_how_much_a_figure_is_missed(verify):
    row = dict(status="ok", decoded_gb_per_s=None, wait_fraction=None)
    figures = {
        "bench-b64": [
            {**row, "loader": "zarrdali[cuda]", "samples_per_s": 15000.0, "decoded_gb_per_s": 24.0},
            {**row, "loader": "torch DataLoader + xarray", "samples_per_s": 1000.0},
        ],
        "decode": {
            "zstd, 64k chunks: nvcomp-capi": {"status": "ok", "gb_per_s": 75.0},
            "zstd, 1m chunks: zarrdali-gpu[kvikio,warm-cache]": {"status": "ok", "gb_per_s": 30.0},
        },
        "bench-wait": [{**row, "loader": "zarrdali[cuda]", "wait_fraction": 0.02}],
        "pytest-gpu": {"tests": 90, "failures": 1, "errors": 0, "skipped": 3},
    }
    goals = {g["goal"]: g for g in verify.evaluate_goals(figures)}
    speed = goals["zarrdali[cuda] / torch DataLoader + xarray, batch 64, sharded"]
    assert speed["value"] == 15.0 and speed["met"] is True and speed["stretch"] == 20.0
    rate = goals["zarrdali[cuda] decoded GB/s, batch 64, sharded"]
    assert rate["met"] is False and rate["missed_by"] == "0.80x the target"
    warm = goals["zarrdali-gpu with the GPU cache warm (decode_gpu.py, best row)"]
    assert warm["value"] == 30.0 and warm["met"] is False
    assert goals["nvCOMP C API, zstd, 64 KiB chunks"]["met"] is True
    assert goals["share of a 20 ms step spent waiting, batch 64"]["met"] is True
    assert goals["ms per batch of 8, back to back through DALI"]["missed_by"] == "not measured"
    assert goals["GPU tests failed or in error"]["met"] is False


def test_a_timed_out_pytest_step_keeps_its_finished_tests(tmp_path, verify):
    out = tmp_path / "out"
    out.mkdir()
    log = out / "verify.log"
    log.write_text(
        "# header\n\n===== pytest-gpu: pytest -v (limit 1 s)\n"
        "tests/test_gpu_engine.py::test_a[cuda] PASSED [ 50%]\n"
        "===== pytest-gpu: timeout in 1.0 s still running after 1 s\n"
    )
    step = verify.Step("pytest-gpu", ["pytest"], 1, status="timeout")
    figures: dict = {}
    verify.collect(step, out, tmp_path, log, figures, [])
    assert figures["pytest-gpu"]["counts"] == {"passed": 1}
    summary = verify.write_summary(out, [step], figures, time.monotonic())
    assert summary["ok"] is False and summary["figures"]["pytest-gpu"]["counts"]["passed"] == 1


# -- the remote probe -----------------------------------------------------------------------
def test_range_server_answers_what_obstore_and_kvikio_ask(tmp_path, verify):
    import urllib.error
    import urllib.request

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "obj").write_bytes(bytes(range(100)))

    def get(path, headers=None, method="GET"):
        req = urllib.request.Request(server.url + path, headers=headers or {}, method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()

    with verify.RangeHTTPServer(tmp_path) as server:
        status, headers, body = get("/a/obj")
        assert status == 200 and body == bytes(range(100))
        status, headers, body = get("/a/obj", {"Range": "bytes=10-19"})
        assert status == 206 and body == bytes(range(10, 20))
        assert headers["Content-Range"] == "bytes 10-19/100"
        assert get("/a/obj", {"Range": "bytes=-5"})[2] == bytes(range(95, 100))  # shard index
        assert get("/a/obj", {"Range": "bytes=90-"})[2] == bytes(range(90, 100))
        status, headers, body = get("/a/obj", method="HEAD")
        assert status == 200 and headers["Content-Length"] == "100" and body == b""
        for path, headers, code in (("/a/nope", {}, 404), ("/a/obj", {"Range": "bytes=200-"}, 416)):
            with pytest.raises(urllib.error.HTTPError) as info:
                get(path, headers)
            assert info.value.code == code
        assert server.counts["GET"] == 6 and server.counts["HEAD"] == 1


def test_remote_probe_runs_the_gpu_backend_over_http(tmp_path, verify, monkeypatch):
    """The GPU rows of the remote probe on the CPU stand-in: ``read="pinned"``
    loads every batch through the HTTP server equal to the CPU backend's on the
    local copy; kvikIO's remote file is missing from the fake: skipped, why."""
    import fakegpu
    from zarrdali.sample_data import SampleDataSpec, write_sample_data

    write_sample_data(tmp_path, SampleDataSpec(n_time=12, n_lat=33, n_lon=40), progress=False)
    fakegpu.install(monkeypatch)
    args = verify.parse(
        ["--probe-remote", "--probe-json", str(tmp_path / "remote.json"), "--data-dir",
         str(tmp_path), "--probe-batches", "3", "--probe-warmup", "1", "--probe-tile", "8"]
    )  # fmt: skip
    assert verify.probe_remote(args) == 0
    got = json.loads((tmp_path / "remote.json").read_text())
    assert got["pinned"]["status"] == "ok" and got["pinned"]["read"] == "pinned"
    assert got["pinned"]["equal"] is True and got["pinned"]["server"]["GET"] > 0
    assert got["kvikio"]["status"] == "skipped" and got["faster"] == "pinned"
