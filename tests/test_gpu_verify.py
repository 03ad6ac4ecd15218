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


def run(
    *args: str, timeout: float = 300, path: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*path, *sys.path]))
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
    from zarrdali.gpu import missing_gpu_requirements

    if not missing_gpu_requirements():
        pytest.skip("a GPU is here: the GPU steps would run")
    out = tmp_path / "out"
    done = run("--out", str(out), "--data-dir", str(tmp_path / "data"), "--tiny")
    assert done.returncode == 0, done.stdout + done.stderr
    steps = steps_of(out)
    assert steps["sample-data"]["status"] == "passed"
    assert steps["imports"]["status"] == "passed"  # the GPU stack is not required here
    gpu_steps = [name for name in steps if name not in ("sample-data", "imports")]
    assert len(gpu_steps) == 11
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
    strict_steps = steps_of(tmp_path / "o3")
    # the GPU stack is missing here: the import check says what, and nothing else runs
    assert strict_steps["imports"]["status"] == "failed"
    assert "MISSING cupy (pip: cupy-cuda13x)" in strict.stdout
    assert all(s["status"] == "not run" for n, s in strict_steps.items() if n != "imports")
    assert "the import check failed (cupy" in strict_steps["pytest-gpu"]["why"]


def test_dry_run_plans_every_step_in_order_within_the_budget(tmp_path, verify):
    out = tmp_path / "out"
    done = run("--out", str(out), "--data-dir", str(tmp_path / "data"), "--dry-run")
    assert done.returncode == 0, done.stderr
    steps = steps_of(out)
    # what they prove: the stack, the GPU tests, decode, the end-to-end bench, the rest
    assert list(steps) == [
        "imports",
        "stack-check",
        "pytest-gpu",
        "decode",
        "decode-lz4",
        "sample-data",
        "bench-b64",
        "small-batch",
        "bench-wait",
        "bench-b256",
        "bench-b8",
        "remote-gpu",
        "pytest-gpu-corrupt",  # last: see test_corruption_tests_run_last_in_their_own_process
    ]
    assert all(s["status"] == "planned" for s in steps.values())
    assert all(s["why"].startswith("--dry-run") for s in steps.values())
    # each step gets its whole timeout even when every one before used all of its own
    assert sum(s["timeout_s"] for s in steps.values()) <= verify.DEFAULT_BUDGET_S
    for batch in (8, 64, 256):
        bench = steps[f"bench-b{batch}"]["command"]
        assert "era5_sharded.zarr" in bench and f"--batch-size {batch}" in bench
        assert "zarrdali-cuda torch-xarray zarrdali-cpu" in bench
    assert "--batch-size 64 --step-ms 5" in steps["bench-wait"]["command"]
    assert "--probe-imports" in steps["imports"]["command"]
    assert "-m 'gpu and not corrupt_input'" in steps["pytest-gpu"]["command"]
    assert " -v " in steps["pytest-gpu"]["command"]
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
    step = next(s for s in verify.plan_steps(args, tmp_path, tmp_path) if s.name == "stack-check")
    assert "gpu_stack_check.py not found" in step.why


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
    assert list(bench) == ["bench-wait"] and bench["bench-wait"]["spec"]["step_ms"] == 5
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
    assert goals["share of a 5 ms step spent waiting, batch 64"]["met"] is True
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


# -- the GPU test steps: they count what ran --------------------------------------------
def _fake_pytest_timeout(root: Path) -> Path:
    """A stand-in for pytest-timeout installed as pip installs it: a module and a
    distribution whose ``pytest11`` entry point names it (pytest loads it at
    start-up), adding ``--timeout``."""
    root.mkdir()
    (root / "pytest_timeout.py").write_text(
        "def pytest_addoption(parser):\n"
        "    parser.addoption('--timeout', type=float, default=None)\n"
    )
    info = root / "pytest_timeout-2.4.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pytest-timeout\nVersion: 2.4.0\n")
    (info / "entry_points.txt").write_text("[pytest11]\ntimeout = pytest_timeout\n")
    return root


def test_the_pytest_command_runs_tests_where_pytest_timeout_is_installed(tmp_path, verify):
    """Where pytest-timeout is installed its entry point loads it: adding ``-p
    pytest_timeout`` registered it twice and pytest ran nothing (the GPU host's
    first verification). ``--timeout`` alone is what the command passes."""
    plugin = _fake_pytest_timeout(tmp_path / "site")
    marker = "@pytest.mark." + "gpu"  # spelt apart: gpu_test_files() reads this file's text
    (tmp_path / "test_one.py").write_text(f"import pytest\n\n{marker}\ndef test_x():\n    pass\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin), *sys.path]))
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    junit = tmp_path / "junit.xml"
    cmd = verify.pytest_command(sys.executable, "gpu", junit, ["test_one.py"], timeout_plugin=True)
    assert "pytest_timeout" not in cmd and cmd[cmd.index("--timeout") + 1] == "100"
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert verify.junit_summary(junit)["tests"] == 1
    # the command as it was: pytest stops at start-up and runs no test
    twice = [*cmd[:5], "-p", "pytest_timeout", *cmd[5:]]
    junit.unlink()
    done = subprocess.run(twice, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Plugin already registered" in done.stdout + done.stderr
    assert verify.junit_summary(junit) is None


@pytest.mark.parametrize("step_name", ["pytest-gpu", "pytest-gpu-corrupt"])
@pytest.mark.parametrize(
    "junit",
    [
        None,  # pytest stopped before writing it
        '<testsuites><testsuite tests="0" failures="0" errors="0" skipped="0"/></testsuites>',
        '<testsuites><testsuite tests="2" failures="0" errors="0" skipped="2">'
        '<testcase classname="t" name="a"><skipped/></testcase>'
        '<testcase classname="t" name="b"><skipped/></testcase></testsuite></testsuites>',
    ],
    ids=["no-junit", "zero-tests", "all-skipped"],
)
def test_a_gpu_test_step_that_ran_no_test_fails(tmp_path, verify, step_name, junit):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir()
    scratch.mkdir()
    log = out / "verify.log"
    log.write_text(f"\n===== {step_name}: pytest (limit 100 s)\n===== {step_name}: passed\n")
    if junit is not None:
        folder = out if step_name == "pytest-gpu" else scratch
        (folder / f"{step_name}.xml").write_text(junit)
    step = verify.Step(step_name, ["pytest"], 100, status="passed", returncode=0)
    figures: dict = {}
    verify.collect(step, out, scratch, log, figures, [])
    assert step.status == "failed" and step.why.startswith("no test ran")
    summary = verify.write_summary(out, [step], figures, time.monotonic())
    assert summary["ok"] is False
    goals = {g["goal"]: g for g in summary["goals"]}
    assert goals[f"{step_name}: tests run (not skipped)"]["met"] is False
    failed = goals["GPU tests failed or in error"]
    assert failed["met"] is not True and failed["missed_by"] == "no GPU test ran"


def test_gpu_test_counts_that_ran_meet_the_goals(tmp_path, verify):
    figures = {
        "pytest-gpu": {"tests": 12, "failures": 0, "errors": 0, "skipped": 2},
        "pytest-gpu-corrupt": {"counts": {"passed": 3}},
    }
    goals = {g["goal"]: g for g in verify.evaluate_goals(figures)}
    assert goals["pytest-gpu: tests run (not skipped)"]["value"] == 10
    assert goals["pytest-gpu-corrupt: tests run (not skipped)"]["met"] is True
    assert goals["GPU tests failed or in error"]["met"] is True
    figures["pytest-gpu-corrupt"] = {"counts": {"passed": 2, "failed": 1}}
    goals = {g["goal"]: g for g in verify.evaluate_goals(figures)}
    assert goals["GPU tests failed or in error"]["value"] == 1


def _collected(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in (0, 5), done.stdout + done.stderr  # 5: none selected
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_gpu_test_files_are_the_ones_with_gpu_tests(verify):
    files = verify.gpu_test_files()
    assert "tests/test_gpu_engine.py" in files and "tests/test_loader_oracle.py" in files
    assert "tests/test_gpu_verify.py" not in files and "tests/test_gpu_decode.py" not in files


def test_corruption_tests_run_last_in_their_own_process(tmp_path, verify):
    """The GPU tests that feed corrupt chunks to the device path carry the
    ``corrupt_input`` marker: the GPU suite's step runs without them, and a
    step of their own runs them in another process, after every other step
    (a device fault is sticky for the process that caught it)."""
    args = verify.parse(["--out", str(tmp_path), "--dry-run"])
    steps = verify.plan_steps(args, tmp_path, tmp_path)
    assert steps[-1].name == "pytest-gpu-corrupt"
    main, corrupt = (
        next(s for s in steps if s.name == n) for n in ("pytest-gpu", "pytest-gpu-corrupt")
    )
    select = {s.name: s.command[s.command.index("-m", 4) + 1] for s in (main, corrupt)}
    assert select == {
        "pytest-gpu": "gpu and not corrupt_input",
        "pytest-gpu-corrupt": "gpu and corrupt_input",
    }
    assert (
        main.command[main.command.index("--junitxml") + 1]
        != corrupt.command[corrupt.command.index("--junitxml") + 1]
    )
    files = ["tests/test_gpu_engine.py"]
    corrupt_ids = _collected("-m", select["pytest-gpu-corrupt"], *files)
    assert corrupt_ids and all("corrupt" in i or "crc32c" in i for i in corrupt_ids)
    assert any("test_corrupted_zstd_frame_raises_chunk_error[cuda" in i for i in corrupt_ids)
    assert not set(corrupt_ids) & set(_collected("-m", select["pytest-gpu"], *files))
    # in any run, they come last (on the stand-in too)
    everything = _collected(*files)
    marked = set(_collected("-m", "corrupt_input", *files))
    assert set(corrupt_ids) < marked
    assert set(everything[-len(marked) :]) == marked


def test_the_import_check_fails_fast_naming_what_is_missing(tmp_path, verify):
    """A package the steps import that the machine lacks (here tqdm and PyYAML,
    hidden) fails the first step in seconds, names the modules that need it
    and the pip names to add to the pack, and no other step runs. (The whole
    run here takes a minute at most; on the GPU host about ten seconds.)"""
    hide = tmp_path / "hide"
    for name in ("tqdm", "yaml"):
        (hide / name).mkdir(parents=True)
        (hide / name / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n'
        )
    out = tmp_path / "out"
    t = time.monotonic()
    done = run(
        "--out", str(out), "--data-dir", str(tmp_path / "data"), "--steps",
        "imports,sample-data", path=(str(hide),),
    )  # fmt: skip
    assert time.monotonic() - t < 120
    assert done.returncode == 1, done.stdout + done.stderr
    steps = steps_of(out)
    assert steps["imports"]["status"] == "failed"
    assert steps["sample-data"]["status"] == "not run"
    assert "the import check failed (tqdm, yaml)" in steps["sample-data"]["why"]
    found = json.loads((out / "summary.json").read_text())["figures"]["imports"]
    assert "zarrdali" in found["missing"]["yaml"]  # zarr's config (donfig) needs PyYAML
    assert found["pip"] == ["pyyaml", "tqdm"]
    log = (out / "verify.log").read_text()
    assert "MISSING tqdm (pip: tqdm), needed by" in log
    assert "gpu_pack.py pack .stack --extra pyyaml tqdm" in log
    assert not (tmp_path / "data").exists()


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


def test_the_host_run_script_stages_unpacks_and_runs_the_verification(tmp_path, verify):
    """``benchmarks/gpu_host_run.sh``: two parts staged by ``stage``, the last
    by ``run``, which unpacks them with the pack's own ``gpu_pack.py`` (its
    checksums) and runs the verification with ``--require-gpu`` and the commit
    into ``$OUT`` (here a dry run)."""
    import hashlib
    import shutil
    import tarfile

    tool = REPO.parent / "shared" / "tools" / "gpu_pack.py"
    if not tool.is_file():
        tool = Path("/work/shared/tools/gpu_pack.py")
    if not tool.is_file():
        pytest.skip("gpu_pack.py (../shared/tools) is not beside this checkout")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "packed_module.py").write_text("VALUE = 1\n")
    archive = tmp_path / "stack.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tree, arcname=".")
    blob = archive.read_bytes()
    half = len(blob) // 2
    sums = []
    for k, piece in enumerate((blob[:half], blob[half:])):
        part = tmp_path / ".stack" / f"p{k + 1}"
        part.mkdir(parents=True)
        name = f"stack.tar.xz.part-{k:02d}"
        (part / name).write_bytes(piece)
        sums.append(f"{hashlib.sha256(piece).hexdigest()}  {name}\n")
    last = tmp_path / ".stack" / "p2"
    (last / "SHA256SUMS").write_text("".join(sums))
    shutil.copy(tool, last / "gpu_pack.py")
    (last / "gpu_stack_check.py").write_text("print('ok')\n")
    script = REPO / "benchmarks" / "gpu_host_run.sh"
    out = tmp_path / "out"
    env = dict(
        os.environ,
        STAGE=str(tmp_path / "stage"),
        SITE=str(tmp_path / "site"),
        DATA=str(tmp_path / "data"),
        OUT=str(out),
        PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join(sys.path),
    )
    first = subprocess.run(
        ["bash", str(script), "stage", str(tmp_path / ".stack" / "p1")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    done = subprocess.run(
        ["bash", str(script), "run", "abc1234", str(last), "--dry-run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "packed_module.py").read_text() == "VALUE = 1\n"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["commit"] == "abc1234" and prov["commit_source"] == "--commit"
    assert "--require-gpu" in prov["command"] and prov["stack_check"].endswith(
        "p2/gpu_stack_check.py"
    )
    steps = steps_of(out)
    assert next(iter(steps)) == "imports" and "--require-gpu" in steps["imports"]["command"]
    # a part missing: unpack names it, and nothing runs
    (tmp_path / "stage" / "stack.tar.xz.part-00").unlink()
    again = subprocess.run(
        ["bash", str(script), "run", "abc1234", str(last), "--dry-run"],
        cwd=REPO, env=dict(env, OUT=str(tmp_path / "o2")), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert again.returncode != 0 and "stack.tar.xz.part-00" in again.stdout + again.stderr
