"""The loader's options: checked and normalized here, and grouped where they are rare.

The constructor takes the common options flat, as torch users expect
(``batch_size``, ``workers``, ``normalize``, ...), and the rarer ones grouped
(:class:`RemoteOptions`, :class:`GpuOptions`, :class:`LoadingOptions`), each
under the one name it keeps down to the code that acts on it.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from zarrdali.errors import ConfigError
from zarrdali.io.remote import is_url


def path_or_object(store: Any) -> Any:
    """A local path as a string with ``~`` expanded (picklable, reopenable);
    URLs and store objects as they are."""
    if isinstance(store, (str, os.PathLike)):
        text = os.fspath(store)
        return text if is_url(text) else os.path.expanduser(text)
    return store


def pair_option(name: str, value: Any) -> tuple[int, int] | None:
    """``(H, W)`` of a tile or stride: None, an int ``n`` (``(n, n)``) or two ints."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, (int, np.integer)):
            return (int(value), int(value))
        pair = tuple(operator.index(v) for v in value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or min(pair) < 1:
        raise ConfigError(
            f"{name} must be (height, width) in grid points, both >= 1, or one int for a "
            f"square, got {value!r}."
        )
    return pair


@dataclass(frozen=True)
class LoadingOptions:
    """How batches are loaded, on either path (each field as the constructor's
    argument of the same name documents it)."""

    workers: int | None = None
    num_threads: int | None = None
    prefetch: int = 2
    persistent_workers: bool = True
    pin_memory: bool = False
    partial_decode: bool = True
    memory_map: bool = False


@dataclass(frozen=True)
class RemoteOptions:
    """How an object store is read: its client's options, the disk cache of its
    bytes (``cache_dir``, ``cache_bytes``), and the request engine's limits."""

    storage_options: Mapping[str, Any] | None = None
    cache_dir: str | os.PathLike | None = None
    cache_bytes: int | None = None
    max_in_flight: int = 64
    request_timeout: float = 60.0


@dataclass(frozen=True)
class GpuOptions:
    """The GPU path's own: its chunk cache in device memory (``cache="gpu"``,
    ``cache_budget`` bytes) and DALI's threads."""

    cache: str | None = None
    cache_budget: int | None = None
    dali_threads: int = 1


OPTION_GROUPS: dict[str, type] = {
    "loading": LoadingOptions,
    "remote": RemoteOptions,
    "gpu": GpuOptions,
}


def merge_option_groups(groups: Mapping[str, Any], flat: Mapping[str, Any]) -> dict[str, Any]:
    """One value per grouped option, from the flat arguments and the groups given.

    A flat argument left at its default takes the group's value; a group left
    at its default takes the flat one; both set, to different values, is an
    error that names the two. ``groups`` maps ``"loading"``, ``"remote"`` and
    ``"gpu"`` to an instance of its class or None; ``flat`` holds every grouped
    option's flat value.
    """
    out = dict(flat)
    for group_name, group in groups.items():
        cls = OPTION_GROUPS[group_name]
        if group is None:
            continue
        if not isinstance(group, cls):
            raise ConfigError(
                f"{group_name}= takes a zarrdali.{cls.__name__}, got {type(group).__name__}."
            )
        for f in fields(cls):
            default, value = f.default, getattr(group, f.name)
            if value == default:
                continue
            if flat[f.name] != default and flat[f.name] != value:
                raise ConfigError(
                    f"{f.name}={flat[f.name]!r} and {group_name}.{f.name}={value!r} disagree; "
                    "give it once."
                )
            out[f.name] = value
    return out


def grouped_option_names() -> tuple[str, ...]:
    """Every option that belongs to a group, in the groups' order."""
    return tuple(f.name for cls in OPTION_GROUPS.values() for f in fields(cls))
