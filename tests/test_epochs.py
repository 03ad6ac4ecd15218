"""Epochs as torch's DataLoader serves them: a new order at every ``iter()``.

``DataLoader(shuffle=True)`` reshuffles on every ``iter()`` and PyTorch Lightning
never calls ``set_epoch`` on a loader, so a loader that repeats its order until
told otherwise trains every epoch on one order. Here each new iteration serves
the next epoch unless ``set_epoch`` or ``load_state_dict`` chose one; ``len()``
and ``drop_last`` count batches as torch does; the rank and world size come
from ``torch.distributed`` or a launcher's environment.
"""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader

import zarrdali.loader
from storefactory import VarSpec
from test_loader_oracle import loader_for, to_numpy
from zarrdali import ConfigError
from zarrdali.sampling.ranks import from_environment

NT, NY, NX = 12, 16, 24  # 10 t0 x 6 tiles = 60 samples


@pytest.fixture
def store(make_store):
    return make_store(VarSpec("x", shape=(NT, NY, NX), chunks=(2, 8, 8)))


def order(batches) -> list[tuple[int, int, int]]:
    return [tuple(r) for b in batches for r in to_numpy(b)["index"].tolist()]


def one_epoch(loader) -> list[tuple[int, int, int]]:
    return order(loader)


def epoch_of(store, epoch: int, **kw) -> list[tuple[int, int, int]]:
    """What a fresh loader serves for ``epoch`` chosen with set_epoch."""
    with loader_for(store, ["x"], batch_size=8, **kw) as fresh:
        fresh.set_epoch(epoch)
        return one_epoch(fresh)


# -- a new order every iteration -------------------------------------------------------
def test_every_iteration_serves_the_next_epoch(store):
    with loader_for(store, ["x"], batch_size=8) as loader:
        epochs = [one_epoch(loader) for _ in range(3)]
        assert loader.epoch == loader.state_dict()["epoch"] == 2
    assert len({tuple(e) for e in epochs}) == 3  # three orders
    for e, served in enumerate(epochs):
        assert len(served) == len(set(served)) == 60  # each a whole epoch
        assert served == epoch_of(store, e)  # epoch e, as set_epoch(e) serves it


def test_set_epoch_chooses_and_the_next_iterations_count_on(store):
    with loader_for(store, ["x"], batch_size=8) as loader:
        loader.set_epoch(5)
        assert one_epoch(loader) == epoch_of(store, 5)
        assert one_epoch(loader) == epoch_of(store, 6)
        loader.set_epoch(5)  # asked again: the same order again
        assert one_epoch(loader) == epoch_of(store, 5)
        with pytest.raises(ConfigError, match="epoch must be >= 0"):
            loader.set_epoch(-1)


def test_set_epoch_every_epoch_as_with_a_distributed_sampler(store):
    """The DistributedSampler habit: set_epoch(e) before every epoch."""
    with loader_for(store, ["x"], batch_size=8) as loader:
        for e in range(3):
            loader.set_epoch(e)
            assert one_epoch(loader) == epoch_of(store, e)


def test_the_samplers_set_epoch_sets_the_loaders(store):
    """What Lightning calls at every epoch start (a DataLoader's sampler.set_epoch)."""
    import pickle
    from dataclasses import fields

    from zarrdali.sampling.epochs import Sampler

    with loader_for(store, ["x"], batch_size=8) as loader:
        loader.sampler.set_epoch(4)
        assert one_epoch(loader) == epoch_of(store, 4)
        plain = pickle.loads(pickle.dumps(loader.sampler))  # as worker processes get it
        assert type(plain) is Sampler
        assert [getattr(plain, f.name) for f in fields(Sampler)] == [
            getattr(loader.sampler, f.name) for f in fields(Sampler)
        ]
        assert plain.epoch_plan(loader.candidates.samples(7, 4), 4).samples.tolist() == [
            list(s) for s in epoch_of(store, 4)
        ]


def test_a_break_ends_the_epoch_and_the_next_iteration_starts_the_next(store):
    with loader_for(store, ["x"], batch_size=8) as loader:
        for k, _ in enumerate(loader):
            if k == 2:
                break
        assert loader.state_dict()["epoch"] == 0
        assert loader.state_dict()["batches_served"] == 3
        assert one_epoch(loader) == epoch_of(store, 1)  # whole, as torch does


def test_an_iterator_never_started_does_not_count(store):
    """Lightning calls ``iter()`` once to check that a loader is iterable."""
    with loader_for(store, ["x"], batch_size=8) as loader:
        unused = iter(loader)
        del unused
        iter(loader)
        assert one_epoch(loader) == epoch_of(store, 0)
        assert loader.epoch == 0


def test_unshuffled_epochs_count_too(store):
    """Without shuffling the order stays; the epoch still counts (random tile
    offsets and augmentations are drawn per epoch)."""
    with loader_for(store, ["x"], batch_size=8, shuffle=False) as loader:
        first, second = one_epoch(loader), one_epoch(loader)
        assert first == second and loader.epoch == 1


def test_random_tiles_are_drawn_anew_every_iteration(store):
    with loader_for(store, ["x"], batch_size=8, tile_sampling="random") as loader:
        first, second = one_epoch(loader), one_epoch(loader)
    assert set(first) != set(second)


# -- resume ------------------------------------------------------------------------------
def _state_after(store, epoch: int, batches: int | None) -> dict:
    with loader_for(store, ["x"], batch_size=8) as loader:
        loader.set_epoch(epoch)
        it = iter(loader)
        for _ in range(len(loader) if batches is None else batches):
            next(it)
        if batches is None:  # exhaust it, as a training loop does
            assert next(it, None) is None
        state = loader.state_dict()
        it.close()
    return state


def test_resume_serves_the_rest_of_the_saved_epoch_then_the_next(store):
    state = _state_after(store, 3, 2)
    with loader_for(store, ["x"], batch_size=8) as loader:
        loader.load_state_dict(state)
        assert one_epoch(loader) == epoch_of(store, 3)[16:]
        assert one_epoch(loader) == epoch_of(store, 4)


def test_resume_then_set_epoch_of_the_state_keeps_the_resume_point(store):
    """A trainer that loads the state, then sets the epoch it was saved at."""
    state = _state_after(store, 3, 2)
    with loader_for(store, ["x"], batch_size=8) as loader:
        loader.load_state_dict(state)
        loader.set_epoch(3)
        assert one_epoch(loader) == epoch_of(store, 3)[16:]


def test_a_state_saved_at_the_end_of_an_epoch_resumes_with_the_next(store):
    """What Lightning saves at the end of a training epoch: epoch e, all served."""
    state = _state_after(store, 3, None)
    assert state["batches_served"] == 8
    with loader_for(store, ["x"], batch_size=8) as loader:
        loader.load_state_dict(state)
        assert loader.state_dict()["epoch"] == 3  # says what was loaded
        assert one_epoch(loader) == epoch_of(store, 4)


# -- len() and drop_last as torch counts them ----------------------------------------------
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [1, 7, 8, 60, 61])
def test_len_and_batch_sizes_as_torch(store, batch_size, drop_last):
    if drop_last and batch_size > 60:
        pytest.skip("no full batch: an error (tested in test_plan.py)")
    torch_sizes = [
        len(b) for b in DataLoader(range(60), batch_size=batch_size, drop_last=drop_last)
    ]
    with loader_for(store, ["x"], batch_size=batch_size, drop_last=drop_last) as loader:
        sizes = [len(b["index"]) for b in loader]
        assert len(loader) == len(DataLoader(range(60), batch_size=batch_size, drop_last=drop_last))
    assert sizes == torch_sizes


def test_len_is_the_whole_epoch_also_while_resuming(store):
    state = _state_after(store, 1, 3)
    with loader_for(store, ["x"], batch_size=8) as loader:
        loader.load_state_dict(state)
        assert len(loader) == 8
        assert sum(1 for _ in loader) == 5


# -- ranks from the environment -------------------------------------------------------------
LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def launcher_env(monkeypatch):
    for name in LAUNCHER:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_env


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, None),
        ({"RANK": 1, "WORLD_SIZE": 2, "LOCAL_RANK": 1}, (1, 2)),  # torchrun
        ({"RANK": 5, "WORLD_SIZE": 8, "LOCAL_RANK": 1, "LOCAL_WORLD_SIZE": 4}, (5, 8)),
        ({"LOCAL_RANK": 1, "WORLD_SIZE": 2, "NODE_RANK": 0}, (1, 2)),  # Lightning's ddp
        ({"LOCAL_RANK": 1, "WORLD_SIZE": 4, "NODE_RANK": 1, "LOCAL_WORLD_SIZE": 2}, (3, 4)),
        ({"WORLD_SIZE": 1}, (0, 1)),
        ({"LOCAL_RANK": 0}, None),  # rank 0 alone: nothing about other ranks
    ],
)
def test_ranks_from_a_launchers_environment(launcher_env, env, want):
    launcher_env(**env)
    assert from_environment() == want


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"WORLD_SIZE": 2}, "WORLD_SIZE=2 is set but not this process's rank"),
        ({"LOCAL_RANK": 1, "WORLD_SIZE": 4, "NODE_RANK": 1}, "WORLD_SIZE=4 is set but not"),
        ({"RANK": 1}, "WORLD_SIZE is not"),
        ({"RANK": 2, "WORLD_SIZE": 2}, r"rank 2 of WORLD_SIZE=2"),
        ({"RANK": "one", "WORLD_SIZE": 2}, "RANK='one' is not an integer"),
    ],
)
def test_an_environment_that_does_not_say_the_rank_is_an_error(launcher_env, env, says):
    launcher_env(**env)
    with pytest.raises(ConfigError, match=says):
        from_environment()


def test_loader_takes_its_share_from_the_environment(store, launcher_env):
    per_rank = []
    for rank in (0, 1):
        launcher_env(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank)
        with loader_for(store, ["x"], batch_size=8) as loader:
            assert (loader.sampler.rank, loader.sampler.world_size) == (rank, 2)
            assert len(loader) == 4
            per_rank.append(one_epoch(loader))
        with loader_for(store, ["x"], batch_size=8, rank=0, world_size=1) as given:
            assert given.sampler.world_size == 1  # given values win
    assert len(per_rank[0]) == len(per_rank[1]) == 30
    assert not set(per_rank[0]) & set(per_rank[1])


def test_a_loader_made_before_the_process_group_takes_its_ranks(store, launcher_env, monkeypatch):
    """Built before ``init_process_group`` (or ``Trainer.fit``), no environment:
    the process group's rank and world size once it exists."""
    group: list[tuple[int, int]] = []
    monkeypatch.setattr(zarrdali.loader, "process_group", lambda: group[0] if group else None)
    with loader_for(store, ["x"], batch_size=8) as loader:
        assert len(loader) == 8  # rank 0 of 1 for now
        group.append((1, 2))
        assert len(loader) == 4
        served = one_epoch(loader)
        assert loader.state_dict()["rank"] == 1 and loader.state_dict()["world_size"] == 2
    with loader_for(store, ["x"], batch_size=8, rank=1, world_size=2) as given:
        assert served == one_epoch(given)


def test_a_process_group_wins_over_the_environment(store, launcher_env, monkeypatch):
    launcher_env(RANK=0, WORLD_SIZE=4)
    import zarrdali.sampling.ranks

    monkeypatch.setattr(zarrdali.sampling.ranks, "process_group", lambda: (1, 2))
    with loader_for(store, ["x"], batch_size=8) as loader:
        assert (loader.sampler.rank, loader.sampler.world_size) == (1, 2)
