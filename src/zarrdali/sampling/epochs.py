"""Which samples form an epoch, in which order, for which rank. Pure: no I/O.

A sample is ``(t0, y0, x0)``: the window of frames ``t0, t0 + frame_step, ...``
and the tile whose top-left corner is ``(y0, x0)``. An epoch is a permutation of
the candidate samples (a function of ``seed`` and the epoch number only), cut
into equal shares per rank, then into batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from zarrdali.errors import ConfigError


@dataclass(frozen=True)
class SampleSpec:
    """What one sample is, independent of any store."""

    input_steps: int
    target_steps: int = 0
    frame_step: int = 1  # store time steps between consecutive frames
    time_stride: int = 1  # store time steps between consecutive windows' t0
    tile: tuple[int, int] | None = None  # None: the whole field
    tile_stride: tuple[int, int] | None = None  # None: the tile (no overlap)
    tile_sampling: Literal["grid", "random"] = "grid"
    cover_edges: bool = True  # add a tile flush with the far edge when the grid stops short

    def __post_init__(self) -> None:
        if self.input_steps < 1:
            raise ConfigError(f"input_steps must be >= 1, got {self.input_steps}.")
        if self.target_steps < 0:
            raise ConfigError(f"target_steps must be >= 0, got {self.target_steps}.")
        if self.frame_step < 1 or self.time_stride < 1:
            raise ConfigError(
                f"frame_step and time_stride must be >= 1, got {self.frame_step} and "
                f"{self.time_stride}."
            )
        if self.tile is not None and (len(self.tile) != 2 or min(self.tile) < 1):
            raise ConfigError(f"tile must be (height, width) with sizes >= 1, got {self.tile}.")
        if self.tile_stride is not None and (
            len(self.tile_stride) != 2 or min(self.tile_stride) < 1
        ):
            raise ConfigError(f"tile_stride must be (dy, dx) >= 1, got {self.tile_stride}.")
        if self.tile_sampling not in ("grid", "random"):
            raise ConfigError(
                f"tile_sampling must be 'grid' or 'random', got {self.tile_sampling!r}."
            )

    @property
    def n_frames(self) -> int:
        return self.input_steps + self.target_steps

    @property
    def window_span(self) -> int:
        """Store time steps one window covers, first frame to last inclusive."""
        return (self.n_frames - 1) * self.frame_step + 1


def n_origins(size: int, tile: int, stride: int, cover_edges: bool) -> int:
    """``len(tile_origins(...))``, without making them (Python ints: any size)."""
    if tile > size:
        return 0
    n = (size - tile) // stride + 1
    return n + int(cover_edges and (n - 1) * stride + tile < size)


def tile_origins(size: int, tile: int, stride: int, cover_edges: bool) -> np.ndarray:
    """Start offsets of a regular tiling of ``size`` cells by ``tile`` cells."""
    starts = np.arange(0, size - tile + 1, stride, dtype=np.int64)
    if cover_edges and starts[-1] + tile < size:
        starts = np.append(starts, size - tile)
    return starts


@dataclass(frozen=True)
class SampleGrid:
    """The candidate samples of a store of shape ``(n_time, ny, nx)`` for a spec."""

    spec: SampleSpec
    n_time: int
    ny: int
    nx: int
    t0s: np.ndarray = field(init=False, repr=False)
    y0s: np.ndarray = field(init=False, repr=False)
    x0s: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        spec = self.spec
        if spec.window_span > self.n_time:
            raise ConfigError(
                f"A window of {spec.input_steps} input + {spec.target_steps} target frames "
                f"every {spec.frame_step} step(s) spans {spec.window_span} time steps, but "
                f"the store has {self.n_time}. Shorten the window or use a longer store."
            )
        h, w = self.tile_hw
        if h > self.ny or w > self.nx:
            raise ConfigError(
                f"tile {spec.tile} is larger than the field ({self.ny}, {self.nx}). "
                f"Use a smaller tile or tile=None for the whole field."
            )
        sy, sx = spec.tile_stride or (h, w)
        t0s = np.arange(0, self.n_time - spec.window_span + 1, spec.time_stride, dtype=np.int64)
        object.__setattr__(self, "t0s", t0s)
        object.__setattr__(self, "y0s", tile_origins(self.ny, h, sy, spec.cover_edges))
        object.__setattr__(self, "x0s", tile_origins(self.nx, w, sx, spec.cover_edges))

    @staticmethod
    def count(spec: SampleSpec, n_time: int, ny: int, nx: int) -> int:
        """How many samples the grid of a store this size has, computed without
        making it (so a store too large to plan can be refused first)."""
        if spec.window_span > n_time:
            return 0
        h, w = spec.tile or (ny, nx)
        sy, sx = spec.tile_stride or (h, w)
        n_t0 = (n_time - spec.window_span) // spec.time_stride + 1
        return (
            n_t0 * n_origins(ny, h, sy, spec.cover_edges) * n_origins(nx, w, sx, spec.cover_edges)
        )

    @property
    def tile_hw(self) -> tuple[int, int]:
        return self.spec.tile or (self.ny, self.nx)

    @property
    def tiles_per_step(self) -> int:
        return len(self.y0s) * len(self.x0s)

    def __len__(self) -> int:
        return len(self.t0s) * self.tiles_per_step

    def samples(self, seed: int, epoch: int) -> np.ndarray:
        """All candidate samples, ``[N, 3]`` int64 of ``(t0, y0, x0)``.

        Grid tiling gives the same set every epoch; random tiling draws each
        sample's offset anew per epoch (deterministic in ``seed`` and ``epoch``).
        """
        t = np.repeat(self.t0s, self.tiles_per_step)
        if self.spec.tile_sampling == "random":
            rng = np.random.default_rng([seed, epoch, 1])
            h, w = self.tile_hw
            y = rng.integers(0, self.ny - h + 1, size=len(t), dtype=np.int64)
            x = rng.integers(0, self.nx - w + 1, size=len(t), dtype=np.int64)
        else:
            yy, xx = np.meshgrid(self.y0s, self.x0s, indexing="ij")
            y = np.tile(yy.ravel(), len(self.t0s))
            x = np.tile(xx.ravel(), len(self.t0s))
        return np.stack([t, y, x], axis=1)


@dataclass(frozen=True)
class EpochPlan:
    """The batches one rank serves in one epoch.

    Batches are ``batch_size`` samples (the last one shorter unless
    ``drop_last``), or, for the rest of an epoch resumed at another world size,
    the sizes ``sizes`` lists (each at most ``batch_size``).
    """

    epoch: int
    samples: np.ndarray  # [n_rank_samples, 3], in serving order
    batch_size: int
    drop_last: bool
    sizes: np.ndarray | None = None  # [n_batches]: batch sizes, when not the regular ones

    def __len__(self) -> int:
        if self.sizes is not None:
            return len(self.sizes)
        n = len(self.samples)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batch(self, k: int) -> np.ndarray:
        if not 0 <= k < len(self):
            raise IndexError(f"batch {k} out of range for an epoch of {len(self)} batches")
        if self.sizes is not None:
            start = int(self.sizes[:k].sum())
            return self.samples[start : start + int(self.sizes[k])]
        return self.samples[k * self.batch_size : (k + 1) * self.batch_size]


@dataclass(frozen=True)
class Segment:
    """Part of an epoch served in lockstep by ``world_size`` ranks: ``batches`` each."""

    world_size: int
    batches: int


def _batch_sizes(shares: np.ndarray, n_batches: int, batch_size: int) -> np.ndarray:
    """``[ranks, n_batches]``: each rank's share cut into ``n_batches`` batches of at
    most ``batch_size`` and at least one sample, full batches first."""
    i = np.arange(n_batches)
    sizes = shares[:, None] - i * batch_size - (n_batches - 1 - i)
    return np.clip(sizes, 1, batch_size) if n_batches else sizes


def _segment_layout(
    m: int, world_size: int, batch_size: int, drop_last: bool, first: bool
) -> tuple[int, np.ndarray]:
    """How ``m`` samples (in serving order) are served by ``world_size`` ranks in
    lockstep: how many of them (the first ones), and each rank's batch sizes
    ``[world_size, n_batches]``. Rank ``r`` serves samples ``r, r + world_size, ...``
    of them.

    ``first``: the epoch's start, as :meth:`Sampler.epoch_plan` serves it (the
    remainder of ``m / world_size`` left out). Otherwise, the rest of an epoch
    resumed at another world size: every sample served once (``drop_last``: full
    batches only), in the same number of batches on every rank, which needs at
    least one sample per batch; the few samples that cannot be split so (fewer
    than ``world_size``) are left out, as at an epoch's start.
    """
    if first:
        per_rank = m // world_size
        n_batches = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
        used = per_rank * world_size
    elif drop_last:
        n_batches = m // (world_size * batch_size)
        used = n_batches * world_size * batch_size
    else:
        # Equal batch counts need m >= world_size * n_batches: always so with
        # batches of 2+ and m >= world_size; else keep a multiple of world_size.
        used = m if batch_size > 1 and m >= world_size else m - m % world_size
        n_batches = math.ceil(used / (world_size * batch_size))
    if drop_last:
        used = n_batches * world_size * batch_size
        return used, np.full((world_size, n_batches), batch_size, dtype=np.int64)
    shares = used // world_size + (np.arange(world_size) < used % world_size)
    return used, _batch_sizes(shares.astype(np.int64), n_batches, batch_size)


@dataclass(frozen=True)
class Sampler:
    """Shuffle and partition candidate samples into per-rank epochs.

    Every rank gets ``N // world_size`` samples (the remainder, different each
    shuffled epoch, is left out) so all ranks run the same number of batches and
    no sample is served twice in an epoch.
    """

    batch_size: int
    shuffle: bool = False
    seed: int = 0
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"rank must be in [0, world_size) with world_size >= 1; got rank "
                f"{self.rank}, world_size {self.world_size}."
            )

    def epoch_plan(
        self, candidates: np.ndarray, epoch: int, resumed: Sequence[Segment] = ()
    ) -> EpochPlan:
        """This rank's batches of ``epoch``.

        ``resumed``: the parts of this epoch already served at other world sizes
        (a state saved at another ``world_size``, see :meth:`rest_of_epoch`):
        the plan is then this rank's share of what they left unserved.
        """
        n = len(candidates)
        per_rank = n // self.world_size
        if per_rank == 0 or (self.drop_last and per_rank < self.batch_size):
            raise ConfigError(
                f"{n} samples cannot give every one of {self.world_size} rank(s) a batch of "
                f"{self.batch_size}{' (drop_last)' if self.drop_last else ''}. Use a smaller "
                f"batch, a smaller tile stride, or fewer ranks."
            )
        resumed = list(resumed)
        while resumed and resumed[0].batches == 0:  # nothing served yet: a fresh start
            resumed.pop(0)
        if resumed:
            return self._resumed_plan(candidates, epoch, resumed)
        order = self.order(n, epoch)
        mine = order[: per_rank * self.world_size][self.rank :: self.world_size]
        return EpochPlan(epoch, candidates[mine], self.batch_size, self.drop_last)

    def order(self, n: int, epoch: int) -> np.ndarray:
        """The epoch's candidate positions in serving order (all ranks interleaved)."""
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(n)
        return np.arange(n)

    def rest_of_epoch(self, n: int, epoch: int, resumed: Sequence[Segment]) -> np.ndarray:
        """The positions of ``epoch`` not served by the ``resumed`` segments, in order.

        Each segment's ranks served in lockstep: rank ``r`` of ``w`` served the
        first ``batches`` batches of its share (positions ``r, r + w, ...`` of what
        was left), as :func:`_segment_layout` laid them out.
        """
        rest = self.order(n, epoch)
        for i, seg in enumerate(resumed):
            used, sizes = _segment_layout(
                len(rest), seg.world_size, self.batch_size, self.drop_last, first=i == 0
            )
            served = sizes[:, : seg.batches].sum(axis=1)  # per rank
            pos = np.arange(used)
            rest = rest[:used][pos // seg.world_size >= served[pos % seg.world_size]]
        return rest

    def _resumed_plan(
        self, candidates: np.ndarray, epoch: int, resumed: Sequence[Segment]
    ) -> EpochPlan:
        rest = self.rest_of_epoch(len(candidates), epoch, resumed)
        used, sizes = _segment_layout(
            len(rest), self.world_size, self.batch_size, self.drop_last, first=False
        )
        mine = rest[:used][self.rank :: self.world_size]
        return EpochPlan(epoch, candidates[mine], self.batch_size, self.drop_last, sizes[self.rank])


@dataclass(frozen=True)
class SampleTable:
    """Candidate samples listed by an index (``zarrdali index``), not a grid.

    ``rows`` are ``(t0, y0, x0)``. Without weights every row is served once
    per epoch. With weights, each epoch draws ``samples_per_epoch`` rows (default:
    as many as there are) with replacement, with probability proportional to
    the weight, deterministic in ``seed`` and ``epoch`` (torch's
    ``WeightedRandomSampler`` semantics): a row may then repeat within an epoch.
    """

    rows: np.ndarray
    tile_hw: tuple[int, int]
    weights: np.ndarray | None = None
    samples_per_epoch: int | None = None
    source: str = "sample index"

    def __post_init__(self) -> None:
        rows = np.asarray(self.rows, dtype=np.int64)
        if rows.ndim != 2 or rows.shape[1] != 3 or len(rows) == 0:
            raise ConfigError(f"{self.source}: expected rows of (t0, y0, x0), got {rows.shape}.")
        object.__setattr__(self, "rows", rows)
        if self.weights is not None:
            w = np.asarray(self.weights, dtype=np.float64)
            if (
                w.shape != (len(rows),)
                or not np.all(np.isfinite(w))
                or np.any(w < 0)
                or not (w.sum() > 0)
            ):
                raise ConfigError(
                    f"{self.source}: weights must be one finite value >= 0 per row, not all zero."
                )
            object.__setattr__(self, "weights", w / w.sum())

    def check_bounds(self, spec: SampleSpec, n_time: int, ny: int, nx: int) -> None:
        """Every row's window and tile must lie inside the store."""
        h, w = self.tile_hw
        t0, y0, x0 = self.rows.T
        bad = (
            (t0 < 0)
            | (t0 + spec.window_span > n_time)
            | (y0 < 0)
            | (y0 + h > ny)
            | (x0 < 0)
            | (x0 + w > nx)
        )
        if bad.any():
            first = tuple(int(v) for v in self.rows[np.argmax(bad)])
            raise ConfigError(
                f"{self.source}: {int(bad.sum())} row(s) fall outside the store "
                f"(time {n_time}, field {ny}x{nx}) for a window of {spec.window_span} steps "
                f"and tile {self.tile_hw}; first: {first}. Was the index built for this "
                f"store and window?"
            )

    def __len__(self) -> int:
        return self.samples_per_epoch or len(self.rows)

    def samples(self, seed: int, epoch: int) -> np.ndarray:
        if self.weights is None:
            return self.rows
        rng = np.random.default_rng([seed, epoch, 2])
        return self.rows[rng.choice(len(self.rows), size=len(self), p=self.weights)]
