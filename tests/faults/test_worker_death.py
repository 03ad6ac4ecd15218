"""A worker process that dies mid-epoch stops the epoch with a named error, at once.

The out-of-memory killer ends a process with SIGKILL, a crash with SIGSEGV; a
worker that cannot start (a main module without the ``__main__`` guard, which
spawned workers re-import) exits with a code. Each case runs in a subprocess of
its own, bounded in time: the training process must raise
:class:`zarrdali.WorkerDiedError` naming the worker, its pid and how it ended,
within seconds, every time, and leave no worker process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from storefactory import VarSpec, write_store

TIMEOUT_S = 120  # per subprocess: imports, spawning two workers, one epoch

TRAIN = """
import multiprocessing, os, sys, time
import zarrdali

def main():
    store, sig, at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    loader = zarrdali.ZarrLoader(store, ["a"], input_steps=2, target_steps=1, tile=(8, 8),
                                 batch_size=4, shuffle=True, device="cpu", workers=2)
    killed = None
    try:
        for k, batch in enumerate(loader):
            if k == at:
                victim = sorted(multiprocessing.active_children(), key=lambda p: p.name)[-1]
                print("victim", victim.pid, flush=True)
                os.kill(victim.pid, sig)
                killed = time.monotonic()
        print("finished without an error", flush=True)
    except zarrdali.WorkerDiedError as err:
        print(f"seconds {time.monotonic() - killed:.3f}", flush=True)
        print("message", err, flush=True)
    print("children", len(multiprocessing.active_children()), flush=True)
    loader.close()

if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    # 38 batches of 4: the epoch goes on long after the worker is killed
    path = tmp_path_factory.mktemp("death") / "store.zarr"
    return write_store(path, [VarSpec("a", shape=(40, 16, 16), chunks=(1, 8, 8))])


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("ZARRDALI_WORKERS", None)
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT_S,
    )


def _lines(out: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


@pytest.mark.parametrize(
    ("sig", "at"),
    [
        (signal.SIGKILL, 0),
        (signal.SIGKILL, 2),
        (signal.SIGKILL, 5),
        (signal.SIGKILL, 9),
        (signal.SIGSEGV, 3),
    ],
    ids=["SIGKILL-first", "SIGKILL-2", "SIGKILL-5", "SIGKILL-9", "SIGSEGV-3"],
)
def test_a_killed_worker_is_named_within_seconds(store, tmp_path, sig, at):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    done = _run(script, str(store), str(int(sig)), str(at))
    assert done.returncode == 0, done.stderr
    out = _lines(done.stdout)
    assert "finished" not in done.stdout, done.stdout
    message = out["message"]
    assert f"pid {out['victim']}" in message
    assert f"{sig.name} (signal {int(sig)})" in message
    assert "worker process" in message
    assert float(out["seconds"]) < 10.0
    assert out["children"] == "0"  # the other worker ended with the epoch


def test_a_worker_that_cannot_start_names_its_exit_code(store, tmp_path):
    """Without the ``__main__`` guard a spawned worker re-runs the script's top
    level, whose attempt to start processes fails: it exits with code 1."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            import zarrdali

            loader = zarrdali.ZarrLoader({str(store)!r}, ["a"], input_steps=2, tile=(8, 8),
                                         batch_size=4, device="cpu", workers=2)
            try:
                for batch in loader:
                    pass
                print("finished without an error")
            except zarrdali.WorkerDiedError as err:
                print("message", err)
            loader.close()
            """
        )
    )
    done = _run(script)
    assert done.returncode == 0, done.stderr
    message = _lines(done.stdout)["message"]
    assert "exited with code 1" in message
    assert "__main__" in message and "workers=0" in message
