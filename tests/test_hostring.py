"""The CPU path's ring of batch buffers: leases, copies, release."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zarrdali.cpu.ring import BatchRing, SlotLayout

LAYOUT = SlotLayout.of([(4, 2, 3, 8, 8), (4, 1, 3, 8, 8)], np.float32)


@pytest.mark.parametrize("shared", [False, True])
def test_a_leased_slot_comes_back_when_its_last_view_is_dropped(shared):
    ring = BatchRing(LAYOUT, 4, shared=shared)
    slot = ring.take()
    for k, a in enumerate(ring.views.arrays(slot)):
        a[...] = k + 1
    arrays = ring.hand_out(slot, 3)  # a partial batch: 3 of 4 samples
    assert [a.shape[0] for a in arrays] == [3, 3]
    tensors = [torch.from_numpy(a) for a in arrays]
    del arrays
    view = tensors[1][2]  # a view keeps the whole lease
    del tensors
    assert ring.leased == 1 and slot not in ring._free
    assert float(view.sum()) == 2 * 3 * 8 * 8
    del view
    assert ring.leased == 0 and slot in ring._free
    ring.close()
    assert not ring.mapped


def test_past_keep_leased_batches_come_as_copies_and_free_their_slot():
    ring = BatchRing(LAYOUT, 4, shared=False, keep=2)
    held = []
    for _ in range(3):
        slot = ring.take()
        held.append(ring.hand_out(slot, 4))
    assert ring.leased == 2 and ring.copies == 1
    assert held[2][0].base is None or held[2][0].flags.owndata  # a copy of its own
    assert len(ring._free) == 2  # the copied batch's slot is free at once
    held.clear()
    assert ring.leased == 0 and len(ring._free) == 4
    ring.close()


def test_close_with_batches_held_unmaps_when_the_last_is_dropped():
    ring = BatchRing(LAYOUT, 3, shared=True)
    batch = ring.hand_out(ring.take(), 4)
    batch[0][...] = 7.0
    ring.close()
    assert ring.mapped and ring.fd == -1  # the user's batch stays valid
    assert float(batch[0][0, 0, 0, 0, 0]) == 7.0
    with pytest.raises(RuntimeError, match="closed"):
        ring.take()
    del batch
    assert not ring.mapped


def test_a_slot_given_back_twice_is_an_error():
    ring = BatchRing(LAYOUT, 3, shared=False)
    slot = ring.take()
    ring.give_back(slot)
    with pytest.raises(ValueError, match="not taken"):
        ring.give_back(slot)
    ring.close()


def _shared_sum(shared, conn) -> None:
    try:
        conn.send((float(shared.array.sum()), shared.array.shape, shared.attached))
    finally:
        shared.close()
        conn.close()


def test_a_shared_array_is_mapped_by_spawned_processes_not_copied():
    """The CPU path's static fields: one copy in shared memory, each worker
    process maps it (the descriptor travels at spawn, not the values)."""
    import multiprocessing
    import pickle

    from zarrdali.batch.shared import SharedArray

    field = np.arange(3 * 50 * 70, dtype=np.float32).reshape(3, 50, 70)
    shared = SharedArray.of(field)
    try:
        assert not shared.attached
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_shared_sum, args=(shared, child))
        proc.start()
        child.close()
        assert parent.poll(60)
        total, shape, attached = parent.recv()
        proc.join(30)
        assert proc.exitcode == 0
        assert total == float(field.sum()) and shape == field.shape and attached
        with pytest.raises(RuntimeError):  # outside a spawn, nothing can carry the descriptor
            pickle.dumps(shared)
        np.testing.assert_array_equal(shared.array, field)
    finally:
        shared.close()
    assert shared.fd == -1
    shared.close()  # idempotent
