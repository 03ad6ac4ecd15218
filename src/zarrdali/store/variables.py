"""What the loader serves as channels: variables, and the levels chosen of each.

``variables`` lists arrays of the store, stacked as channels in that order. A
variable with a level axis contributes one channel per level, or only the
levels asked for, in the order asked::

    variables=["t2m", "msl", ("t", [500, 850]), ("z", 500)]   # by level value
    variables=[("t", {"isel": [0, 3]})]                          # by level index
    variables=[("t", {"sel": [500, 850]})]                       # by value, spelled out

Values are those of the level coordinate (the 1-D array named like the
variable's level dimension), compared in its dtype; indices count along the
stored level axis. Where a store chunks levels apart, only the chunks of the
chosen levels are read (:mod:`zarrdali.batch.plan` plans per run of levels).
Every channel has a name, ``"t2m"`` or ``"t@500"`` (``"t[3]"`` where the store
has no level coordinate): :attr:`ZarrLoader.channels`.

The choice is resolved once, in the constructor, to store indices
(:class:`VariableSelection`, small and picklable), so worker processes rebuild
the same layouts without reading the coordinate again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import zarr

from zarrdali.errors import ConfigError
from zarrdali.store.cf import unsigned_view
from zarrdali.store.open import ArrayLayout, load_layouts

# What one entry of `variables` may be.
VariableArg = str | tuple[str, object]


@dataclass(frozen=True)
class VariableRequest:
    """One entry of ``variables``: the array, and the levels asked for (as given)."""

    name: str
    levels: object = None  # None: all; else values, or {"sel": ...} / {"isel": ...}


@dataclass(frozen=True)
class VariableSelection:
    """The variables and chosen store levels (indices), and the ``dims`` names:
    everything needed to rebuild the loader's layouts in another process."""

    names: tuple[str, ...]
    levels: tuple[tuple[int, ...] | None, ...]  # per variable: store indices, or all
    dims: tuple[tuple[str, str], ...] = ()
    decode_cf: bool = True  # _Unsigned integers read as unsigned (zarrdali.store.cf)

    def layouts(self, group: zarr.Group, store_name: str) -> list[ArrayLayout]:
        """The layouts of the variables, each with its chosen levels."""
        layouts = load_layouts(group, store_name, self.names, dict(self.dims))
        return self.applied(layouts)

    def applied(self, layouts: list[ArrayLayout]) -> list[ArrayLayout]:
        """``layouts`` with the chosen levels (and, decoding CF, ``_Unsigned``)."""
        out = []
        for layout, levels in zip(layouts, self.levels, strict=True):
            if levels is not None:
                layout = replace(layout, levels=levels)
            out.append(unsigned_view(layout) if self.decode_cf else layout)
        return out


def parse_variables(variables: object) -> list[VariableRequest]:
    """The loader's ``variables`` argument as requests (no store needed)."""
    if isinstance(variables, (str, tuple)) and not _is_request_tuple(variables):
        items: list = [variables] if isinstance(variables, str) else list(variables)
    elif isinstance(variables, tuple):
        items = [variables]
    elif isinstance(variables, (set, frozenset)):
        raise ConfigError(
            f"variables must be a list of array names (their order is the channels' "
            f"order), not a set: got {variables!r}. Pass a list, e.g. {sorted(variables)!r}."
        )
    elif isinstance(variables, Mapping):
        raise ConfigError(
            f"variables must be a list of array names (or (name, levels) pairs), not a "
            f"mapping: got keys {list(variables)}. For levels write [('t', [500, 850])]."
        )
    else:
        try:
            items = list(variables)  # type: ignore[call-overload]
        except TypeError:
            raise ConfigError(
                f"variables must be an array name or a list of them, got {variables!r}."
            ) from None
    requests = []
    for item in items:
        if isinstance(item, str):
            requests.append(VariableRequest(item))
        elif _is_request_tuple(item):
            requests.append(VariableRequest(item[0], item[1]))
        else:
            raise ConfigError(
                f"each variable is an array name or a (name, levels) pair such as "
                f"('t', [500, 850]); got {item!r}."
            )
    if not requests:
        raise ConfigError("`variables` is empty: name at least one array of the store.")
    return requests


def _is_request_tuple(item: object) -> bool:
    return (
        isinstance(item, (tuple, list))
        and len(item) == 2
        and isinstance(item[0], str)
        and not isinstance(item[1], str)
    )


def _level_coordinate(group: zarr.Group, layout: ArrayLayout) -> np.ndarray | None:
    """The values of the variable's level coordinate (None: the store has none)."""
    dim = layout.level_dim
    node = group[dim] if dim in group else None  # noqa: SIM401  (see timecoord.py)
    if not isinstance(node, zarr.Array) or node.shape != (layout.level_size,):
        return None
    return np.asarray(node[...])


def _level_indices(
    request: VariableRequest, layout: ArrayLayout, coordinate: np.ndarray | None, store: str
) -> tuple[int, ...]:
    """The store indices of the levels ``request`` asks for, in its order."""
    what = f"variable {layout.name!r} of {store!r}"
    levels = request.levels
    if not layout.has_levels:
        raise ConfigError(
            f"{what} has no level axis (dimensions {layout.dims}); list it without levels."
        )
    by_index = False
    if isinstance(levels, Mapping):
        if set(levels) not in ({"sel"}, {"isel"}):
            raise ConfigError(
                f"levels of {what} as a mapping must be {{'sel': values}} or "
                f"{{'isel': indices}}, got {levels!r}."
            )
        by_index = "isel" in levels
        levels = levels["isel" if by_index else "sel"]
    wanted = list(levels) if isinstance(levels, (list, tuple, np.ndarray, range)) else [levels]
    if not wanted:
        raise ConfigError(f"no levels chosen for {what}; list at least one.")
    n = layout.level_size
    if by_index:
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in wanted):
            raise ConfigError(f"level indices of {what} must be integers, got {wanted}.")
        indices = [int(i) + n if int(i) < 0 else int(i) for i in wanted]
        bad = [w for w, i in zip(wanted, indices, strict=True) if not 0 <= i < n]
        if bad:
            raise ConfigError(f"level indices {bad} of {what} are outside its {n} levels.")
    else:
        if coordinate is None:
            raise ConfigError(
                f"{what} has no level coordinate (an array named {layout.level_dim!r} with "
                f"its {n} values) to choose levels by value; choose them by index: "
                f"({layout.name!r}, {{'isel': [...]}})."
            )
        try:
            asked = np.asarray(wanted, dtype=coordinate.dtype)
        except (ValueError, TypeError, OverflowError) as err:
            raise ConfigError(
                f"levels {wanted} of {what} are not values of its level coordinate "
                f"{layout.level_dim!r} ({coordinate.dtype}): {err}."
            ) from None
        indices = []
        for value, given in zip(asked.tolist(), wanted, strict=True):
            hits = np.flatnonzero(coordinate == value)
            if not len(hits):
                raise ConfigError(
                    f"level {given!r} is not in the level coordinate {layout.level_dim!r} of "
                    f"{what}; it holds {coordinate.tolist()}."
                )
            indices.append(int(hits[0]))
    if len(set(indices)) != len(indices):
        raise ConfigError(f"levels {wanted} of {what} name a level twice.")
    return tuple(indices)


def _label(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def resolve_variables(
    variables: object,
    group: zarr.Group,
    store_name: str,
    dims: Mapping[str, str] | None = None,
    decode_cf: bool = True,
) -> tuple[VariableSelection, list[ArrayLayout], list[str]]:
    """The selection, the layouts (levels applied) and the channel names."""
    requests = parse_variables(variables)
    names = tuple(r.name for r in requests)
    layouts = load_layouts(group, store_name, names, dims)
    chosen: list[tuple[int, ...] | None] = []
    channels: list[str] = []
    for request, layout in zip(requests, layouts, strict=True):
        coordinate = _level_coordinate(group, layout) if layout.has_levels else None
        levels = None
        if request.levels is not None:
            levels = _level_indices(request, layout, coordinate, store_name)
        chosen.append(levels)
        if not layout.has_levels:
            channels.append(layout.name)
            continue
        for i in levels if levels is not None else range(layout.level_size):
            label = f"@{_label(coordinate[i].item())}" if coordinate is not None else f"[{i}]"
            channels.append(f"{layout.name}{label}")
    selection = VariableSelection(
        names, tuple(chosen), tuple((dims or {}).items()), bool(decode_cf)
    )
    return selection, selection.applied(layouts), channels
