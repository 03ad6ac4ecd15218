"""A ZarrLoader trained on by PyTorch Lightning's ``Trainer`` on the CPU.

Lightning never calls ``set_epoch`` on a loader (only on a DataLoader's sampler)
and builds no ``DistributedSampler`` for one: a new order every epoch and each
rank's own share must come from the loader. Lightning checks a loader with an
``iter()`` it never advances, and saves and restores its ``state_dict``.

- one process: two epochs, two orders, each a whole epoch; with worker
  processes, the same processes in both epochs; a fit resumed from the
  checkpoint of epoch 0 serves what an uninterrupted run serves in epoch 1;
- ``strategy="ddp"`` with 2 CPU processes on gloo (Lightning's launcher runs
  the script again for rank 1): the loader is built before ``fit`` (rank 0
  finds no rank yet, rank 1 reads Lightning's ``LOCAL_RANK``/``WORLD_SIZE``),
  disjoint samples per rank, a new order every epoch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storefactory import VarSpec, write_store

pytest.importorskip("lightning")

NT, NY, NX = 12, 16, 24  # 10 t0 x 6 tiles of 8x8 = 60 samples

MODULE = r'''
import multiprocessing, os
import lightning as L
import torch
import zarrdali


class Model(L.LightningModule):
    """Records the samples of every batch, per epoch; learns nothing useful."""

    def __init__(self, loader=None, make_loader=None):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.loader, self.make_loader = loader, make_loader
        self.seen = {}
        self.workers = {}

    def train_dataloader(self):
        return self.loader if self.loader is not None else self.make_loader()

    def on_train_epoch_start(self):
        self.seen[self.current_epoch] = []

    def training_step(self, batch, k):
        if k == 0:  # worker processes of this process, after the epoch's first batch
            pids = sorted(p.pid for p in multiprocessing.active_children())
            self.workers[self.current_epoch] = pids
        self.seen[self.current_epoch] += [tuple(r) for r in batch["index"].tolist()]
        x = batch["input"].mean().reshape(1, 1)
        return (self.layer(x) - 1.0).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def trainer(**kw):
    kw = {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "logger": False,
          "enable_checkpointing": False, "enable_progress_bar": False,
          "enable_model_summary": False, **kw}
    return L.Trainer(**kw)
'''

DDP = (
    MODULE
    + r"""
import json, sys


def main():
    store, out = sys.argv[1], sys.argv[2]
    # built before fit: no process group, and rank 0 has no launcher variables yet
    loader = zarrdali.ZarrLoader(store, ["x"], input_steps=2, target_steps=1, tile=(8, 8),
                                 batch_size=8, shuffle=True, seed=3, device="cpu", workers=0)
    model = Model(loader)
    trainer(strategy="ddp", devices=2).fit(model)
    rank = trainer_rank = int(os.environ.get("LOCAL_RANK", 0))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"seen": model.seen, "state": {k: v for k, v in loader.state_dict().items()
                                                 if k in ("rank", "world_size", "epoch")}}, f)


if __name__ == "__main__":
    main()
"""
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lightning") / "store.zarr"
    return write_store(path, [VarSpec("x", shape=(NT, NY, NX), chunks=(2, 8, 8))])


@pytest.fixture(scope="module")
def lightning_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("lightning_module") / "zarrdali_lightning_model.py"
    path.write_text(MODULE)
    sys.path.insert(0, str(path.parent))
    try:
        import zarrdali_lightning_model

        yield zarrdali_lightning_model
    finally:
        sys.path.remove(str(path.parent))
        sys.modules.pop("zarrdali_lightning_model", None)


def _loader(store, workers: int = 0):
    import zarrdali

    return zarrdali.ZarrLoader(
        str(store), ["x"], input_steps=2, target_steps=1, tile=(8, 8), batch_size=8,
        shuffle=True, seed=3, device="cpu", workers=workers,
    )  # fmt: skip


def _epoch(store, epoch: int) -> list[tuple[int, int, int]]:
    with _loader(store) as loader:
        loader.set_epoch(epoch)
        return [tuple(r) for b in loader for r in b["index"].tolist()]


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "persistent-workers"])
def test_two_epochs_two_orders_in_one_process(store, lightning_module, workers):
    with _loader(store, workers) as loader:
        model = lightning_module.Model(loader)
        lightning_module.trainer().fit(model)
        assert loader.epoch == 1
    first, second = model.seen[0], model.seen[1]
    assert len(first) == len(set(first)) == 60 and set(first) == set(second)
    assert first != second  # a new order
    assert first == _epoch(store, 0) and second == _epoch(store, 1)
    if workers:  # the same worker process in both epochs
        assert len(model.workers[0]) == 1 and model.workers[0] == model.workers[1]


def test_a_fit_resumed_from_a_checkpoint_serves_the_next_epoch(store, lightning_module, tmp_path):
    """Lightning saves the loader's state_dict (taken at the end of epoch 0) and
    loads it into the loader of the resumed fit: epoch 1 follows, as uninterrupted."""
    ckpt = tmp_path / "epoch0.ckpt"
    with _loader(store) as loader:
        trainer = lightning_module.trainer(max_epochs=1)
        trainer.fit(lightning_module.Model(loader))
        trainer.save_checkpoint(ckpt)
    with _loader(store) as fresh:
        resumed = lightning_module.Model(fresh)
        lightning_module.trainer(max_epochs=2).fit(resumed, ckpt_path=str(ckpt))
    assert list(resumed.seen) == [1]
    assert resumed.seen[1] == _epoch(store, 1)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(store, tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(DDP)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("ZARRDALI_WORKERS", None)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, str(script), str(store), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, got in enumerate(ranks):
        assert got["state"] == {"rank": r, "world_size": 2, "epoch": 1}
    for epoch in ("0", "1"):
        per_rank = [[tuple(s) for s in got["seen"][epoch]] for got in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == 30
        assert not set(per_rank[0]) & set(per_rank[1])  # disjoint
        assert len(set(per_rank[0]) | set(per_rank[1])) == 60
    for got in ranks:  # a new order every epoch, on every rank
        assert got["seen"]["0"] != got["seen"]["1"]
