"""The loader's options: checked and normalized here, and grouped where they are rare.

The constructor takes the common options flat, as torch users expect
(``batch_size``, ``workers``, ``normalize``, ...), and the rarer ones grouped
(:class:`RemoteOptions`, :class:`GpuOptions`, :class:`LoadingOptions`), each
under the one name it keeps down to the code that acts on it.
"""

from __future__ import annotations

import operator
import os
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
