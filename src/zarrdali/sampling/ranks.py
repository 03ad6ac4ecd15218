"""This process's rank and the world size, as torch's launchers and users set them.

In order: the values given; ``torch.distributed`` when its process group is
initialized; the environment that launchers set before any process group exists
(``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; PyTorch Lightning's
``ddp`` launcher: ``WORLD_SIZE``, ``NODE_RANK``, ``LOCAL_RANK``); else rank 0 of 1,
*unbound*: a loader re-asks ``torch.distributed`` when an epoch starts, so one
built before ``init_process_group`` (or before Lightning's ``Trainer.fit``
starts its processes) still reads its own share.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from zarrdali.errors import ConfigError

_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    bound: bool  # False: nothing said so; asked again once a process group exists
    source: str  # where the values came from, for messages


def process_group() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the initialized default process group, else None.

    No process group exists unless ``torch.distributed`` was imported: it is not
    imported here (a first import of torch from a loader's constructor would
    keep that frame, and the loader, alive until the collector runs)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return None
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={value!r} is not an integer; a launcher "
            f"(torchrun, Lightning) sets it to this process's rank or the world size."
        ) from None


def from_environment(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``(rank, world_size)`` from a launcher's environment variables, None when
    none is set. Raises :class:`ConfigError` when they do not say which rank this is."""
    env = os.environ if env is None else env
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_rank, node_rank = _int(env, "LOCAL_RANK"), _int(env, "NODE_RANK")
    local_world = _int(env, "LOCAL_WORLD_SIZE")
    if rank is None and world is None and local_rank is None:
        return None
    if world is None:
        if rank in (None, 0) and local_rank in (None, 0):
            return None  # a rank 0 alone says nothing about others
        raise ConfigError(
            f"RANK={env.get('RANK')}/LOCAL_RANK={env.get('LOCAL_RANK')} are set but "
            "WORLD_SIZE is not: cannot tell which share of the samples this process "
            "reads. Launch with torchrun, set WORLD_SIZE, or pass rank= and world_size=."
        )
    if rank is None and local_rank is not None:
        if not node_rank:  # one node (Lightning's ddp launcher sets no RANK)
            rank = local_rank
        elif local_world is not None:
            rank = node_rank * local_world + local_rank
    if rank is None:
        if world == 1:
            return 0, 1
        raise ConfigError(
            f"WORLD_SIZE={world} is set but not this process's rank (RANK, or "
            "LOCAL_RANK on one node): cannot tell which share of the samples it reads. "
            "Launch with torchrun, set RANK, or pass rank= and world_size=."
        )
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(
            f"the environment says rank {rank} of WORLD_SIZE={world}; a rank must be "
            "in [0, WORLD_SIZE). Check the launcher's variables, or pass rank= and world_size=."
        )
    return rank, world


def resolve(rank: int | None, world_size: int | None) -> Ranks:
    """The rank and world size a loader serves (see the module's docstring)."""
    if rank is not None and world_size is not None:
        return Ranks(rank, world_size, True, "given")
    found = process_group()
    source = "torch.distributed"
    if found is None:
        found = from_environment()
        source = (
            "environment ("
            + ", ".join(
                f"{name}={os.environ[name]}" for name in _LAUNCHER_VARIABLES if name in os.environ
            )
            + ")"
        )
    if found is None:
        return Ranks(rank or 0, world_size or 1, rank is not None or world_size is not None, "")
    return Ranks(
        found[0] if rank is None else rank,
        found[1] if world_size is None else world_size,
        True,
        source,
    )
