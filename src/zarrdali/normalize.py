"""Per-channel mean/std from the user or from statistics stored in the store.

Statistics live in each array's attributes under ``"stats"``:
``{"mean": float | [per level], "std": float | [per level], ...}`` (written by
``zarrdali stats``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import ConfigError
from .store import ArrayLayout

NormalizeArg = None | str | Mapping[str, tuple[object, object]]


def _per_channel(value: object, layout: ArrayLayout, what: str) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.size == 1:
        return np.full(layout.n_levels, arr[0])
    if arr.size != layout.n_levels:
        raise ConfigError(
            f"{what} of {layout.name!r} has {arr.size} values but the variable has "
            f"{layout.n_levels} level(s): give one value, or one per level."
        )
    return arr


def channel_stats(
    normalize: NormalizeArg, layouts: Sequence[ArrayLayout], store_name: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean and std per channel (float32 arrays of length C), or None for no scaling."""
    if normalize is None:
        return None
    if isinstance(normalize, str):
        if normalize != "store":
            raise ConfigError(f"normalize must be None, 'store' or a mapping, got {normalize!r}.")
        pairs = {}
        for layout in layouts:
            stats = layout.attrs.get("stats")
            if not stats or "mean" not in stats or "std" not in stats:
                raise ConfigError(
                    f"normalize='store' but array {layout.name!r} of {store_name!r} has no "
                    f"'stats' attribute with mean and std. Run `zarrdali stats {store_name}` "
                    f"or pass normalize={{variable: (mean, std)}}."
                )
            pairs[layout.name] = (stats["mean"], stats["std"])
        normalize = pairs
    missing = [layout.name for layout in layouts if layout.name not in normalize]
    if missing:
        raise ConfigError(f"normalize has no (mean, std) for variable(s) {missing}.")
    means, stds = [], []
    for layout in layouts:
        mean, std = normalize[layout.name]
        means.append(_per_channel(mean, layout, "mean"))
        s = _per_channel(std, layout, "std")
        if np.any(s <= 0) or not np.all(np.isfinite(s)):
            raise ConfigError(f"std of {layout.name!r} must be finite and > 0, got {std}.")
        stds.append(s)
    return np.concatenate(means).astype(np.float32), np.concatenate(stds).astype(np.float32)
