"""The sampling index: from a tiling index, drop tiles with too much missing data,
then balance the distribution of the aggregate over bins (LDCast's approach):
a quota per bin, an acceptance probability per bin, or weights that make every
bin equally likely when the loader draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from zarrdali.errors import ConfigError


@dataclass(frozen=True)
class SamplingSpec:
    max_missing: float = 0.0  # drop tiles whose missing fraction exceeds this
    bins: int | tuple[float, ...] = 10  # number of equal-width bins, or the edges
    quota: int | tuple[int, ...] | None = None  # rows kept per bin (without replacement)
    accept: float | tuple[float, ...] | None = None  # probability of keeping a row, per bin
    balance_weights: bool = False  # weight = 1 / rows in its bin
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_missing <= 1.0:
            raise ConfigError(f"max_missing must lie in [0, 1], got {self.max_missing}.")
        if self.quota is not None and self.accept is not None:
            raise ConfigError("Give a per-bin quota or an acceptance probability, not both.")
        if isinstance(self.bins, int):
            if self.bins < 1:
                raise ConfigError(f"bins must be >= 1, got {self.bins}.")
        elif len(self.bins) < 2 or np.any(np.diff(self.bins) <= 0):
            raise ConfigError(f"bin edges must be increasing, at least two: {self.bins}.")

    @property
    def n_bins(self) -> int:
        return self.bins if isinstance(self.bins, int) else len(self.bins) - 1

    def per_bin(self, value: object, what: str) -> np.ndarray:
        arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
        if arr.size == 1:
            arr = np.full(self.n_bins, arr[0])
        if arr.size != self.n_bins:
            raise ConfigError(f"{what}: {arr.size} values for {self.n_bins} bins.")
        return arr

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("bins", "quota", "accept"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        return d


def bin_edges(values: np.ndarray, spec: SamplingSpec) -> np.ndarray:
    if not isinstance(spec.bins, int):
        return np.asarray(spec.bins, dtype=np.float64)
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    return np.linspace(lo, hi if hi > lo else lo + 1.0, spec.bins + 1)


def assign_bins(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value: [edges[i], edges[i+1]), the last bin closed; outside: clipped."""
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)


def sampling_table(tiling: pd.DataFrame, spec: SamplingSpec) -> tuple[pd.DataFrame, list]:
    """The sampled rows (with ``bin``, and ``weight`` if asked) and the bin edges."""
    keep = (1.0 - tiling["valid_fraction"] <= spec.max_missing + 1e-12) & tiling[
        "aggregate"
    ].notna()
    table = tiling[keep].reset_index(drop=True)
    edges = bin_edges(table["aggregate"].to_numpy(), spec)
    table["bin"] = assign_bins(table["aggregate"].to_numpy(), edges)
    rng = np.random.default_rng(spec.seed)
    if spec.quota is not None:
        quota = spec.per_bin(spec.quota, "quota").astype(np.int64)
        chosen = []
        for b in range(spec.n_bins):
            rows = np.flatnonzero(table["bin"].to_numpy() == b)
            take = min(int(quota[b]), len(rows))
            chosen.append(rng.choice(rows, size=take, replace=False))
        table = table.iloc[np.sort(np.concatenate(chosen))].reset_index(drop=True)
    elif spec.accept is not None:
        p = spec.per_bin(spec.accept, "accept")
        if np.any((p < 0) | (p > 1)):
            raise ConfigError(f"accept probabilities must lie in [0, 1], got {list(p)}.")
        table = table[rng.random(len(table)) < p[table["bin"].to_numpy()]].reset_index(drop=True)
    if spec.balance_weights:
        counts = table["bin"].map(table["bin"].value_counts())
        table["weight"] = 1.0 / counts.to_numpy(dtype=np.float64)
    if len(table) == 0:
        raise ConfigError(
            "No tile is left after filtering and sampling: raise max_missing or the quotas."
        )
    return table, [float(e) for e in edges]


def parse_per_bin(text: str | None) -> float | tuple[float, ...] | None:
    """CLI helper: '0.5' or '0.1,0.5,1'."""
    if text is None:
        return None
    values = tuple(float(v) for v in text.split(","))
    return values[0] if len(values) == 1 else values


def as_ints(value: float | Sequence[float] | None) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    return tuple(int(v) for v in value)
