"""Which dask scheduler preparation runs on, and its progress bar."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from zarrdali.errors import ConfigError


def active_client() -> object | None:
    """The dask.distributed client in use, if distributed is installed and one is active."""
    try:
        from dask.distributed import get_client
    except ImportError:
        return None
    try:
        return get_client()
    except ValueError:  # no client
        return None


def connect(scheduler: str | None) -> object | None:
    """A client for ``scheduler`` (an address), the active one, or None (local threads).

    Once a client exists dask routes ``compute`` through it, so the rest of the
    code is the same on a laptop and on a cluster.
    """
    if scheduler is None:
        return active_client()
    try:
        from dask.distributed import Client
    except ImportError as err:
        raise ConfigError(
            f"A scheduler address ({scheduler!r}) needs dask.distributed: "
            "pip install 'dask[distributed]'."
        ) from err
    return Client(scheduler)


@contextlib.contextmanager
def progress(enabled: bool) -> Iterator[None]:
    """dask's progress bar for local computations (a cluster has its dashboard)."""
    if not enabled or active_client() is not None:
        yield
        return
    from dask.diagnostics import ProgressBar

    with ProgressBar():
        yield
