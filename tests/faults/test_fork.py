"""A loader in a forked process starts fresh or says what to do, at once; never a hang.

A process forked from one whose loader served batches inherits the loader's
objects but not its threads, and the worker processes are not its children:
before zarrdali 0.2 a torch ``DataLoader(num_workers=2)`` wrapping such a
loader hung for ever, and other wrappings ended in ``AssertionError``s that
named neither zarrdali nor the fix. Each case runs in a subprocess bounded in
time (a hang fails the test), and in the forked child the wait is bounded too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from storefactory import VarSpec, write_store

COMMON = r"""
import json, multiprocessing, os, signal, sys, time
import torch
from torch.utils.data import DataLoader, IterableDataset
import zarrdali

STORE = sys.argv[1]
KW = dict(input_steps=2, target_steps=1, tile=(8, 8), batch_size=4, device="cpu", shuffle=True)

def report(**values):
    print(json.dumps(values), flush=True)

def indexes(batches):
    return [b["index"].tolist() for b in batches]

def epoch_of(epoch, **kw):
    with zarrdali.ZarrLoader(STORE, ["a"], **{**KW, "workers": 0, **kw}) as fresh:
        fresh.set_epoch(epoch)
        return indexes(fresh)

def in_child(work, limit=60):
    '''Run work() in a forked child; its JSON result, or "hung" after limit s.'''
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = work()
        except BaseException as err:
            out = {"error": type(err).__name__, "message": str(err)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return {"error": "hung"}
    data = os.read(r, 1 << 20)
    os.close(r)
    return json.loads(data)

class Wrapped(IterableDataset):
    def __init__(self, loader):
        self.loader = loader
    def __iter__(self):
        for batch in self.loader:
            yield batch["index"]
"""

OS_FORK = (
    COMMON
    + r"""
def main():
    workers = int(sys.argv[2])
    loader = zarrdali.ZarrLoader(STORE, ["a"], workers=workers, **KW)
    it = iter(loader)
    next(it)  # the parent's threads (and workers) are running
    want = epoch_of(1)

    def child():
        out = {}
        t = time.monotonic()
        try:
            next(it)
            out["inherited"] = "served"
        except zarrdali.ProcessContextError as err:
            out["inherited"] = str(err)
        out["inherited_s"] = time.monotonic() - t
        out["fresh"] = indexes(loader) == want  # epoch 1: the parent had started epoch 0
        out["children"] = len(multiprocessing.active_children())
        loader.close()
        return out

    result = in_child(child)
    # A child that leaves through the interpreter's exit (atexit hooks: zarrdali's,
    # multiprocessing's, which terminates its children) leaves the parent's alone.
    pid = os.fork()
    if pid == 0:
        sys.exit(0)
    result["exit_status"] = os.waitpid(pid, 0)[1]
    result["parent_rest"] = sum(1 for _ in it) == len(loader) - 1  # the parent's epoch goes on
    result["parent_next"] = indexes(loader) == want
    loader.close()
    report(**result)

if __name__ == "__main__":
    main()
"""
)

DATALOADER = (
    COMMON
    + r"""
def main():
    how, context = sys.argv[2], sys.argv[3]
    workers = None if how == "auto" else int(how)
    loader = zarrdali.ZarrLoader(STORE, ["a"], workers=workers, **KW)
    next(iter(loader))  # served a batch in the parent first
    want = epoch_of(1)
    t = time.monotonic()
    out = {}
    try:
        # (the workers' warnings go to stderr: a recorder set here would record
        # them in the forked workers' memory)
        dl = DataLoader(Wrapped(loader), batch_size=None, num_workers=2,
                        multiprocessing_context=context, timeout=60)
        got = [b.tolist() for b in dl]
        out["batches"] = len(got)
        # each torch worker serves the whole epoch (each batch twice), in order
        out["every_batch_twice"] = sorted(got) == sorted(want + want)
    except Exception as err:
        out["error"], out["message"] = type(err).__name__, str(err)
    out["seconds"] = time.monotonic() - t
    out["parent_next"] = indexes(loader) == epoch_of(1)  # the parent's loader still works
    loader.close()
    report(**out)

if __name__ == "__main__":
    main()
"""
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("fork") / "store.zarr"
    return write_store(path, [VarSpec("a", shape=(12, 16, 16), chunks=(1, 8, 8))])


def _run(tmp_path, program: str, *args: str) -> tuple[dict, str]:
    """Run ``program`` as a script (spawned processes re-import it), bounded in time."""
    script = tmp_path / "fork_case.py"
    script.write_text(program)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("ZARRDALI_WORKERS", None)
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=100
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.time_limit(110)
@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "workers"])
def test_after_os_fork_the_child_starts_fresh(store, tmp_path, workers):
    result, _ = _run(tmp_path, OS_FORK, str(store), str(workers))
    assert result.get("error") is None, result
    # the iterator inherited from the parent says so at once...
    assert "before os.fork()" in result["inherited"], result
    assert "build the loader in the process that iterates it" in result["inherited"]
    assert result["inherited_s"] < 1.0
    # ...a new iteration in the child works (its own worker processes)...
    assert result["fresh"] is True
    assert result["children"] == workers
    # ...and the parent's loader is untouched
    assert result["parent_rest"] is True and result["parent_next"] is True
    assert result["exit_status"] == 0


@pytest.mark.time_limit(110)
@pytest.mark.parametrize("workers", ["0", "auto"])
def test_a_loader_in_forked_dataloader_workers_serves(store, tmp_path, workers):
    """The hang of issue 27/28: now each forked torch worker loads in-process
    (a daemonic process has no children), with a warning about the duplicates."""
    result, stderr = _run(tmp_path, DATALOADER, str(store), workers, "fork")
    assert result.get("error") is None, result
    assert result["every_batch_twice"] is True
    assert "every worker serves the whole epoch" in stderr
    assert result["parent_next"] is True


@pytest.mark.time_limit(110)
def test_explicit_workers_in_a_forked_dataloader_worker_is_a_named_error(store, tmp_path):
    result, _ = _run(tmp_path, DATALOADER, str(store), "2", "fork")
    assert result["error"] == "ProcessContextError", result
    assert "daemonic process" in result["message"] and "workers=0" in result["message"]
    assert result["seconds"] < 30 and result["parent_next"] is True


@pytest.mark.time_limit(110)
def test_a_loader_sent_to_a_spawned_worker_is_a_named_error(store, tmp_path):
    result, _ = _run(tmp_path, DATALOADER, str(store), "0", "spawn")
    assert result["error"] == "ProcessContextError", result
    assert "cannot be sent to another process" in result["message"]
    assert "in place of a torch DataLoader" in result["message"]
    assert result["seconds"] < 30 and result["parent_next"] is True


DAEMONIC = (
    COMMON
    + r"""
def build(workers, queue):
    try:
        with zarrdali.ZarrLoader(STORE, ["a"], workers=workers, **KW) as loader:
            queue.put(("served", loader.workers, sum(1 for _ in loader)))
    except zarrdali.ProcessContextError as err:
        queue.put(("error", str(err), 0))

def main():
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for workers in (None, 2):
        queue = ctx.Queue()
        proc = ctx.Process(target=build, args=(workers, queue), daemon=True)
        proc.start()
        out[str(workers)] = queue.get(timeout=60)
        proc.join(10)
    report(**out)

if __name__ == "__main__":
    main()
"""
)


@pytest.mark.time_limit(110)
def test_a_loader_built_in_a_daemonic_process(store, tmp_path):
    """Built inside a daemonic process (where torch's DataLoader workers run):
    in-process loading by default; asking for workers is a named error."""
    result, _ = _run(tmp_path, DAEMONIC, str(store))
    kind, workers, batches = result["None"]
    assert (kind, workers) == ("served", 0) and batches > 0
    kind, message, _ = result["2"]
    assert kind == "error" and "daemonic process" in message and "workers=0" in message


REMOTE = (
    COMMON
    + r"""
from zarrdali.bench.objectserver import RangeHTTPServer

def main():
    store = os.path.abspath(STORE)
    with RangeHTTPServer(os.path.dirname(store)) as http:
        url = f"{http.url}/{os.path.basename(store)}"
        loader = zarrdali.ZarrLoader(url, ["a"], workers=0, **KW)
        next(iter(loader))

        def child():
            t = time.monotonic()
            try:
                next(iter(loader))
                return {"served": True}
            except zarrdali.ProcessContextError as err:
                return {"message": str(err), "seconds": time.monotonic() - t}

        result = in_child(child)
        result["parent_next"] = len(indexes(loader)) == len(loader)
        loader.close()
    report(**result)

if __name__ == "__main__":
    main()
"""
)


@pytest.mark.time_limit(110)
def test_a_remote_loader_after_fork_is_a_named_error(store, tmp_path):
    pytest.importorskip("obstore")
    result, _ = _run(tmp_path, REMOTE, str(store))
    assert "message" in result, result
    assert "remote store" in result["message"] and "spawn" in result["message"]
    assert result["seconds"] < 1.0 and result["parent_next"] is True
