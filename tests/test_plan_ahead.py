"""Batches are planned ahead of the consumer, off its thread."""

from __future__ import annotations

import threading

import zarrdali
import zarrdali.batch.load as batch_load
from storefactory import VarSpec


def test_batches_are_planned_in_background_threads_ahead_of_the_consumer(make_store, monkeypatch):
    store = make_store(VarSpec("a", shape=(24, 21, 33), chunks=(1, 8, 8), shards=(4, 16, 16)))
    planned: list[tuple[str, int]] = []  # (thread, batches the consumer had when planned)
    served = [0]
    real = batch_load.plan_batch

    def recording(*args, **kwargs):
        planned.append((threading.current_thread().name, served[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_load, "plan_batch", recording)
    loader = zarrdali.ZarrLoader(
        store,
        ["a"],
        input_steps=2,
        target_steps=1,
        tile=(8, 8),
        batch_size=4,
        device="cpu",
        workers=0,
        prefetch=2,
    )
    main = threading.current_thread().name
    for _ in loader:
        served[0] += 1
    assert len(planned) == len(loader) == served[0]
    assert all(name != main for name, _ in planned), "planning ran on the consumer's thread"
    # Batch k is planned before the consumer has received batch k - 1 (for k >= 2).
    ahead = [k - had for k, (_, had) in enumerate(planned)]
    assert max(ahead) >= 2, f"plans were not made ahead of the consumer: {ahead}"
