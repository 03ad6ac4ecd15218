"""Flips and quarter turns: the same transform on input and target, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest

from storefactory import VarSpec
from test_loader_oracle import Oracle, loader_for, run_epochs
from zarrdali import ConfigError
from zarrdali.sampling.augment import apply_augmentations, draw_augmentations


@pytest.fixture
def store(make_store):
    return make_store(
        VarSpec("a", shape=(16, 21, 33), chunks=(1, 8, 8)),
        VarSpec("b", shape=(16, 2, 21, 33), chunks=(2, 1, 8, 8), dtype="int16"),
    )


def check_augmented(batches, oracle, input_steps=2, target_steps=1, hw=(8, 8)):
    seen = set()
    for batch in batches:
        for i, (t0, y0, x0) in enumerate(batch["index"].tolist()):
            flags = batch["augment"][i]
            seen.add(tuple(flags.tolist()))
            window = oracle.window(t0, y0, x0, input_steps + target_steps, 1, hw)
            want = apply_augmentations(window, flags)
            got = np.concatenate([batch["input"][i], batch["target"][i]])
            np.testing.assert_array_equal(got, want, err_msg=f"sample {(t0, y0, x0)} {flags}")
    return seen


@pytest.mark.parametrize("workers", [0, 2])
def test_flips_and_rotations_match_numpy(store, workers):
    loader = loader_for(store, ["a", "b"], augment=("flip", "rot90"), workers=workers)
    batches = run_epochs(loader, [0, 1])
    seen = set()
    for epoch in (0, 1):
        seen |= check_augmented(batches[epoch], Oracle(store, ["a", "b"]))
    assert len(seen) == 8  # all elements of the square's symmetry group occur


def test_flip_only_never_transposes(store):
    loader = loader_for(store, ["a"], augment="flip", tile=(8, 12))  # flips allow any tile
    batches = run_epochs(loader, [0])[0]
    seen = check_augmented(batches, Oracle(store, ["a"]), hw=(8, 12))
    assert {f[0] for f in seen} == {0} and len(seen) == 4


def test_augmentations_are_reproducible_and_resume_exactly(store):
    full = run_epochs(loader_for(store, ["a"], augment=("rot90",), batch_size=5), [2])[2]
    loader = loader_for(store, ["a"], augment=("rot90",), batch_size=5)
    loader.set_epoch(2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    it.close()
    resumed = loader_for(store, ["a"], augment=("rot90",), batch_size=5)
    resumed.load_state_dict(state)
    rest = [{k: v.numpy() for k, v in b.items()} for b in resumed]
    for got, want in zip(rest, full[3:], strict=True):
        for key in ("input", "augment", "index"):
            np.testing.assert_array_equal(got[key], want[key])


def test_draws_depend_on_seed_epoch_and_batch():
    a = draw_augmentations(("flip", "rot90"), 64, seed=1, epoch=0, batch=0)
    np.testing.assert_array_equal(a, draw_augmentations(("flip", "rot90"), 64, 1, 0, 0))
    for other in [(2, 0, 0), (1, 1, 0), (1, 0, 1)]:
        assert not np.array_equal(a, draw_augmentations(("flip", "rot90"), 64, *other))


def test_rot90_needs_a_square_tile(store):
    with pytest.raises(ConfigError, match="square tile"):
        loader_for(store, ["a"], augment=("rot90",), tile=(8, 12))


def test_unknown_augmentation(store):
    with pytest.raises(ConfigError, match="unknown augmentation"):
        loader_for(store, ["a"], augment=("shear",))


def test_rot90_flags_are_quarter_turns():
    from zarrdali.sampling.augment import _ROT90

    x = np.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    for k in range(4):
        np.testing.assert_array_equal(apply_augmentations(x, _ROT90[k]), np.rot90(x, k, (-2, -1)))
