"""Missing values: which stored values are not data, for ``masks`` and ``nan_fill``.

A value is *invalid* when it is NaN, or equal to one of its variable's CF
missing values: the ``_FillValue`` and ``missing_value`` attributes, compared
in the variable's own dtype before any cast (an int16 satellite store marks
gaps with e.g. ``-32768``). A chunk that was never written reads as the
array's ``fill_value``, and is valid or not by the same rule, so a store whose
``fill_value`` is NaN or equals ``_FillValue`` has its missing chunks masked.

Both paths apply the rule in the pass that casts and normalizes each value
(the CPU path per piece as it lands, :mod:`zarrdali.batch.finish`; the GPU
path in its gather kernel), so ``input_mask`` is True exactly where the
value is valid, and ``nan_fill`` replaces exactly the invalid values, after
normalization.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from zarrdali.errors import ConfigError
from zarrdali.store.open import ArrayLayout

# CF attributes naming the values that are not data.
MISSING_ATTRIBUTES = ("_FillValue", "missing_value")
# At most this many distinct missing values per variable (the GPU kernel's table).
MAX_MISSING = 4
# How zarr writes non-finite floats in JSON.
_JSON_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _attribute_values(value: object, dtype: np.dtype) -> list[object]:
    """The values an attribute holds, decoded as xarray decodes them: a float
    variable's ``_FillValue`` as xarray writes it to Zarr is a base64 string of
    a little-endian double; zarr writes ``"NaN"``, ``"Infinity"``."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out: list[object] = []
    for item in items:
        if isinstance(item, str):
            if item in _JSON_FLOATS:
                item = _JSON_FLOATS[item]
            elif dtype.kind == "f":
                raw = base64.b64decode(item.encode(), validate=True)
                if len(raw) != 8:
                    raise ValueError(f"{item!r} is not a base64 double")
                item = struct.unpack("<d", raw)[0]
            else:
                raise ValueError(f"{item!r} is not a number")
        if isinstance(item, bool) or not isinstance(item, (int, float, np.number)):
            raise ValueError(f"{item!r} is not a number")
        out.append(item)
    return out


def _is_nan(value: object) -> bool:
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _typed(value: object, dtype: np.dtype) -> np.generic:
    """``value`` as a ``dtype`` scalar, as numpy compares a Python number with an
    array of ``dtype``: a float rounded to the dtype; an integer that the dtype
    cannot hold (or that is not whole) is an error, as it could never match."""
    if dtype.kind in "iu":
        if not float(value).is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        info = np.iinfo(dtype)
        if not info.min <= int(value) <= info.max:
            raise ValueError(f"{value!r} is out of the range of {dtype}")
        return dtype.type(int(value))
    if dtype.kind == "f":
        return dtype.type(value)
    raise ValueError(f"variables of dtype {dtype} cannot be masked")


def variable_missing_values(layout: ArrayLayout, store_name: str) -> np.ndarray:
    """The CF missing values of ``layout`` (NaN left out: NaN is always invalid),
    distinct, in its dtype (native byte order). An attribute that is not a value
    of that dtype is a :class:`ConfigError` naming the variable and attribute."""
    dtype = np.dtype(layout.dtype).newbyteorder("=")
    values: list[np.generic] = []
    for attr in MISSING_ATTRIBUTES:
        raw = layout.attrs.get(attr)
        if raw is None:
            continue
        try:
            # NaN is always missing; an integer variable's NaN can never match
            # (xarray drops it too)
            items = [v for v in _attribute_values(raw, dtype) if not _is_nan(v)]
            values += [_typed(v, dtype) for v in items]
        except (ValueError, TypeError) as err:
            raise ConfigError(
                f"the {attr} attribute {raw!r} of variable {layout.name!r} in {store_name!r} "
                f"is not a value of its dtype {dtype} ({err}); fix the attribute, or leave "
                f"masks and nan_fill off and serve stored values with decode_cf=False."
            ) from err
    array = np.array(values, dtype=dtype)
    if dtype.kind == "f":
        array = array[~np.isnan(array)]
    array = np.unique(array)  # -0.0 and 0.0 once too: they compare equal
    if len(array) > MAX_MISSING:
        raise ConfigError(
            f"variable {layout.name!r} in {store_name!r} has {len(array)} distinct missing "
            f"values in {MISSING_ATTRIBUTES}; zarrdali masks at most {MAX_MISSING}."
        )
    return array


@dataclass(frozen=True)
class MissingValues:
    """What the loader does with invalid values: ``nan_fill`` (None: leave them)
    and ``masks`` (serve ``input_mask``/``target_mask``), and per variable its
    CF missing values (:func:`variable_missing_values`)."""

    nan_fill: float | None
    masks: bool
    per_variable: tuple[np.ndarray, ...]
    levels: tuple[int, ...]  # channels of each variable
    to_nan: bool = False  # CF decoding: missing values are served as NaN (or nan_fill)

    @property
    def active(self) -> bool:
        return self.masks or self.nan_fill is not None or self.to_nan

    @cached_property
    def per_channel(self) -> tuple[np.ndarray, ...]:
        """The missing values of each channel (a variable's, for each of its levels)."""
        pairs = zip(self.per_variable, self.levels, strict=True)
        return tuple(values for values, n in pairs for _ in range(n))


def check_missing_options(
    nan_fill: object,
    masks: object,
    layouts: Sequence[ArrayLayout],
    store_name: str,
    decode_cf: bool = False,
) -> MissingValues | None:
    """The loader's ``nan_fill`` and ``masks`` (and with ``decode_cf`` the CF
    missing values, served as NaN), checked. None: no value is ever checked
    (neither option, and no variable has missing values to decode)."""
    if not isinstance(masks, (bool, np.bool_)):
        raise ConfigError(f"masks must be True or False, got {masks!r}.")
    if nan_fill is not None:
        if isinstance(nan_fill, (bool, np.bool_)) or not isinstance(
            nan_fill, (int, float, np.integer, np.floating)
        ):
            raise ConfigError(f"nan_fill must be a number or None, got {nan_fill!r}.")
        with np.errstate(over="ignore"):
            as_float32 = np.float32(nan_fill)
        if not (math.isfinite(float(nan_fill)) and np.isfinite(as_float32)):
            raise ConfigError(
                f"nan_fill must be a finite float32 number (it replaces missing values), "
                f"got {nan_fill!r}."
            )
    if not masks and nan_fill is None and not decode_cf:
        return None
    per_variable = tuple(variable_missing_values(layout, store_name) for layout in layouts)
    if not masks and nan_fill is None and not any(len(v) for v in per_variable):
        return None  # CF decoding alone, and nothing but NaN is missing
    return MissingValues(
        nan_fill=None if nan_fill is None else float(np.float32(nan_fill)),
        masks=bool(masks),
        per_variable=per_variable,
        levels=tuple(layout.n_levels for layout in layouts),
        to_nan=bool(decode_cf),
    )
