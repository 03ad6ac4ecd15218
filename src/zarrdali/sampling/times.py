"""Timestamps: the store's time coordinate, served as ``batch["time"]``.

Where the store has a 1-D array named like the variables' time dimension (the
first of their ``dimension_names``), each sample's frames get their time as
int64 nanoseconds since 1970-01-01: CF-decoded by xarray's own coder (``units``
such as ``"hours since 2020-01-01"`` and ``calendar``; non-standard calendars
through cftime, counted in that calendar), raw values where it has no
``units``. The coordinate is read and decoded once, when the loader is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from zarrdali.errors import ConfigError
from zarrdali.sampling.epochs import SampleSpec
from zarrdali.store.open import ArrayLayout

# numpy's NaT as int64: where the coordinate holds its fill value.
NAT = np.iinfo(np.int64).min


def _cftime_to_ns(values: np.ndarray, calendar: str) -> np.ndarray:
    """cftime dates as nanoseconds since 1970-01-01 of their own calendar."""
    import cftime

    micros = cftime.date2num(
        values.ravel(), "microseconds since 1970-01-01 00:00:00", calendar=calendar
    )
    return np.asarray(micros, dtype=np.int64).reshape(values.shape) * 1000


def decode_times(values: np.ndarray, attrs: dict, what: str) -> np.ndarray:
    """int64 nanoseconds since the epoch, CF-decoded as xarray decodes them.

    ``what`` names the coordinate (and store) in errors.
    """
    values = np.asarray(values)
    if values.dtype.kind == "M":  # stored as datetimes already
        return values.astype("datetime64[ns]").view(np.int64)
    if "units" not in attrs:  # raw values
        if values.dtype.kind in "iu":
            return values.astype(np.int64)
        if values.dtype.kind == "f" and np.all(np.isfinite(values) & (values == np.round(values))):
            return values.astype(np.int64)
        raise ConfigError(
            f"{what} has no 'units' and {values.dtype} values that are not whole numbers; "
            f"give it CF units (e.g. 'hours since 2020-01-01') or pass time=False."
        )
    import xarray as xr
    from xarray.coding.times import CFDatetimeCoder

    variable = xr.Variable(("time",), values, attrs)
    try:
        decoded = xr.conventions.decode_cf_variable(
            "time", variable, decode_times=CFDatetimeCoder(time_unit="ns"), decode_timedelta=False
        ).values
    except (ValueError, OverflowError, TypeError) as err:
        raise ConfigError(f"{what} cannot be decoded as CF times: {err}") from err
    if decoded.dtype.kind == "M":
        return decoded.astype("datetime64[ns]").view(np.int64)
    if decoded.dtype == object:  # cftime dates (a non-standard calendar)
        try:
            return _cftime_to_ns(decoded, attrs.get("calendar", "standard"))
        except (ValueError, TypeError, AttributeError) as err:
            raise ConfigError(f"{what} cannot be decoded as CF times: {err}") from err
    raise ConfigError(
        f"{what} has units {attrs['units']!r}, not CF time units ('<unit> since <date>'); "
        f"fix its attributes or pass time=False."
    )


def read_time_coordinate(
    group: zarr.Group, store_name: str, layout: ArrayLayout, time: bool | None
) -> np.ndarray | None:
    """The decoded time coordinate ``[n_time]`` int64 ns, or None.

    ``time=None`` serves it where the store has it; ``True`` requires it;
    ``False`` never reads it.
    """
    if time is False:
        return None
    dim = layout.time_dim
    # `in` first, not group[dim] or group.get(dim): the KeyError they raise and
    # catch keeps this frame's callers (the loader) alive through its traceback
    # until the garbage collector runs.
    node = group[dim] if dim in group else None  # noqa: SIM401
    if not isinstance(node, zarr.Array):
        if time:
            raise ConfigError(
                f"time=True but store {store_name!r} has no coordinate array named like "
                f"the time dimension {dim!r} of {layout.name!r}; pass time=None or False."
            )
        return None
    what = f"time coordinate {dim!r} of {store_name!r}"
    if node.ndim != 1 or node.shape[0] != layout.n_time:
        raise ConfigError(
            f"{what} has shape {node.shape} but {layout.name!r} has {layout.n_time} time "
            f"steps; fix the store or pass time=False."
        )
    return decode_times(np.asarray(node[...]), dict(node.attrs), what)


@dataclass(frozen=True)
class FrameTimes:
    """A batch output (see :class:`~zarrdali.gpu.pipeline.BatchSource`): int64
    ``[B, input_steps + target_steps]``, the time of each frame of each sample
    (a per-batch gather, in the training process on both paths)."""

    times: np.ndarray  # [n_time] int64 ns
    offsets: np.ndarray  # [n_frames]: store steps from t0 to each frame

    @classmethod
    def for_spec(cls, times: np.ndarray, spec: SampleSpec) -> FrameTimes:
        return cls(times, np.arange(spec.n_frames, dtype=np.int64) * spec.frame_step)

    def __call__(self, samples: np.ndarray, flags: np.ndarray | None) -> np.ndarray:
        return self.times[samples[:, :1] + self.offsets]
