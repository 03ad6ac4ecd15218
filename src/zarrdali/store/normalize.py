"""Per-channel mean/std from the user or from statistics stored in the store.

Statistics live in each array's attributes under ``"stats"``:
``{"mean": float | [per level], "std": float | [per level], ...}`` (written by
``zarrdali stats``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from zarrdali.errors import ConfigError
from zarrdali.store.open import ArrayLayout

NormalizeArg = None | str | Mapping[str, tuple[object, object]]


def _per_channel(value: object, layout: ArrayLayout, what: str) -> np.ndarray:
    """One value per channel: from one value, one per level of the store (the
    chosen levels' taken), or one per chosen level."""
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    levels = getattr(layout, "levels", None)
    level_size = getattr(layout, "level_size", layout.n_levels)
    if arr.size == 1:
        return np.full(layout.n_levels, arr[0])
    if arr.size == level_size:
        return arr if levels is None else arr[list(levels)]
    if arr.size == layout.n_levels:
        return arr
    chosen = f", {layout.n_levels} of them chosen" if layout.n_levels != level_size else ""
    raise ConfigError(
        f"{what} of {layout.name!r} has {arr.size} values but the variable has "
        f"{level_size} level(s){chosen}: give one value, one per level, or one per "
        f"chosen level."
    )


def _check_stats_units(stats: dict, layout: ArrayLayout, store_name: str, decode_cf: bool) -> None:
    """Stored statistics must be of the values served: CF-decoded ones with
    ``decode_cf`` (``zarrdali stats``' default), stored ones without."""
    from zarrdali.store.cf import packing_of
    from zarrdali.store.missing import variable_missing_values

    encoded = packing_of(layout, store_name) is not None or bool(
        len(variable_missing_values(layout, store_name))
    )
    if not encoded:
        return  # decoded and stored values are the same numbers
    decoded = stats.get("decoded")
    if decoded is None and decode_cf:
        raise ConfigError(
            f"normalize='store': the stats of {layout.name!r} in {store_name!r} were computed "
            f"before zarrdali decoded CF attributes (scale_factor, add_offset, _FillValue), so "
            f"they are of its stored values. Run `zarrdali stats {store_name}` again."
        )
    if decoded is not None and bool(decoded) != decode_cf:
        have = "CF-decoded" if decoded else "stored (not CF-decoded)"
        raise ConfigError(
            f"normalize='store': the stats of {layout.name!r} in {store_name!r} are of its "
            f"{have} values, but the loader serves "
            f"{'decoded' if decode_cf else 'stored'} values (decode_cf={decode_cf}). Run "
            f"`zarrdali stats{'' if decode_cf else ' --raw'} {store_name}` or pass "
            f"decode_cf={not decode_cf}."
        )


def channel_stats(
    normalize: NormalizeArg,
    layouts: Sequence[ArrayLayout],
    store_name: str,
    decode_cf: bool = True,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean and std per channel (float32 arrays of length C), or None for no scaling.

    Statistics stored by ``zarrdali stats`` must be of the values served
    (CF-decoded or stored, as ``decode_cf`` says)."""
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
            _check_stats_units(stats, layout, store_name, decode_cf)
            pairs[layout.name] = (stats["mean"], stats["std"])
        normalize = pairs
    missing = [layout.name for layout in layouts if layout.name not in normalize]
    if missing:
        raise ConfigError(f"normalize has no (mean, std) for variable(s) {missing}.")
    means, stds = [], []
    for layout in layouts:  # a variable listed twice (other levels) takes its own
        mean, std = normalize[layout.name]
        means.append(_per_channel(mean, layout, "mean"))
        s = _per_channel(std, layout, "std")
        if np.any(s <= 0) or not np.all(np.isfinite(s)):
            raise ConfigError(f"std of {layout.name!r} must be finite and > 0, got {std}.")
        stds.append(s)
    return np.concatenate(means).astype(np.float32), np.concatenate(stds).astype(np.float32)
