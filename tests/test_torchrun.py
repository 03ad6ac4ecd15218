"""Under ``torchrun --nproc_per_node=2``, before any process group exists.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` for each process; a
loader made before ``init_process_group`` (or in a script that never makes
one, as data-parallel scripts that only read do) reads its own share from them:
disjoint samples on the two ranks, the same number of batches, a new order
every epoch. Before zarrdali 0.2 both processes read rank 0 of 1: the same data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from storefactory import VarSpec, write_store

SCRIPT = r"""
import json, os, sys
import torch  # noqa: F401  (a training script has it)
import zarrdali

def main():
    store, out = sys.argv[1], sys.argv[2]
    assert not torch.distributed.is_initialized()
    with zarrdali.ZarrLoader(store, ["x"], input_steps=2, target_steps=1, tile=(8, 8),
                             batch_size=8, shuffle=True, seed=3, device="cpu",
                             workers=1) as loader:
        epochs = [[b["index"].tolist() for b in loader] for _ in range(2)]
        state = loader.state_dict()
    rank = os.environ["RANK"]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"epochs": epochs, "rank": state["rank"], "world_size": state["world_size"],
                   "batches": len(loader)}, f)

if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("torchrun") / "store.zarr"
    return write_store(path, [VarSpec("x", shape=(12, 16, 24), chunks=(2, 8, 8))])  # 60 samples


@pytest.mark.slow
def test_ranks_from_torchrun_environment(store, tmp_path):
    script = tmp_path / "read.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    env.pop("ZARRDALI_WORKERS", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(script), str(store), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == 4  # 30 samples each
    for epoch in (0, 1):
        served = [[tuple(s) for b in r["epochs"][epoch] for s in b] for r in ranks]
        assert len(served[0]) == len(served[1]) == 30
        assert not set(served[0]) & set(served[1])  # disjoint
        assert len(set(served[0]) | set(served[1])) == 60
    for r in ranks:  # a new order every epoch
        assert r["epochs"][0] != r["epochs"][1]
