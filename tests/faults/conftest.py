"""The fault suite: how zarrdali fails when its store, network or disk misbehave.

Every test here is bounded in time: ``@pytest.mark.time_limit(seconds)`` (default
120) raises in the test once the limit passes (SIGALRM), and a watchdog ends the
whole run 30 s later if the test does not return (a hang inside C code).
Signals that kill (SIGSEGV, SIGBUS) are provoked in subprocesses.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

DEFAULT_LIMIT_S = 120


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "time_limit(seconds): fail a fault test that runs longer")


class TimeLimitExceeded(Exception):
    """A fault test ran past its time limit (it would have hung CI)."""


@pytest.fixture(autouse=True)
def _time_limit(request):
    marker = request.node.get_closest_marker("time_limit")
    limit = int(marker.args[0]) if marker else DEFAULT_LIMIT_S

    def expired(signum, frame):
        raise TimeLimitExceeded(f"{request.node.nodeid} ran past its {limit} s limit")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(limit)
    faulthandler.dump_traceback_later(limit + 30, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        signal.alarm(0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


def run_python(code: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this zarrdali and the tests'
    helpers (``storefactory``); a process killed by a signal has ``returncode < 0``."""
    import zarrdali

    paths = [str(Path(zarrdali.__file__).parents[1]), str(Path(__file__).parents[1])]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    env.setdefault("ZARRDALI_WORKERS", "0")
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def python_child():
    """:func:`run_python`, for tests that provoke signals in another process."""
    return run_python


@pytest.fixture(scope="session")
def remote_store(tmp_path_factory) -> Path:
    """A small sharded + plain store on disk, for the servers of the remote faults."""
    from storefactory import VarSpec, write_store

    specs = [
        VarSpec("sharded", shape=(12, 21, 33), chunks=(1, 8, 8), shards=(4, 16, 16), seed=1),
        VarSpec("plain", shape=(12, 21, 33), chunks=(2, 8, 8), seed=2),
    ]
    return write_store(tmp_path_factory.mktemp("faults") / "store.zarr", specs)
