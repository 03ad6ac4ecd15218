"""CF decoding: the values ``xarray.open_zarr`` shows, from the values stored.

xarray decodes a variable's stored values by its CF attributes
(``mask_and_scale=True``, its default):

* ``_Unsigned = "true"`` on a signed integer variable: the bits are unsigned;
* values equal to ``_FillValue`` or ``missing_value`` (and NaN) are missing,
  served as NaN (:mod:`zarrdali.store.missing` finds them, in the stored dtype);
* ``scale_factor`` and ``add_offset``: ``x * scale_factor + add_offset``.

zarrdali does the same in the pass that casts and normalizes each value (CPU:
where each piece lands, :mod:`zarrdali.batch.finish`; GPU: in the gather
kernel), in the dtype xarray unpacks in, so a served value equals ``float32``
of xarray's decoded value bit for bit (then normalized in float32). xarray
(2026.9, ``coding/variables.py``) picks that dtype as follows, and attributes
read from Zarr JSON are Python floats:

* a float variable whose ``_FillValue``/``missing_value`` are all NaN (what
  xarray writes for every float variable) is unpacked in its own dtype: the
  mask coder leaves it alone and ``data *= scale_factor`` runs in float32 with
  the attribute rounded to float32 (numpy's rules for Python scalars);
* every other packed variable is unpacked in float64: ``float64(x) *
  scale_factor``, then ``+ add_offset``, each rounded on its own.

Only the operations present are applied: a variable with ``add_offset``
alone is not multiplied by 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from zarrdali.errors import ConfigError
from zarrdali.store.open import ArrayLayout

PACKING_ATTRIBUTES = ("scale_factor", "add_offset")


@dataclass(frozen=True)
class Packing:
    """``x * scale + offset`` in ``dtype`` (either may be None: not applied)."""

    scale: float | None
    offset: float | None
    dtype: str = "float64"  # the arithmetic's: float64, or a float variable's own


def _number(value: object, attr: str, layout: ArrayLayout, store_name: str) -> float:
    item = value
    if isinstance(item, (list, tuple)) and len(item) == 1:  # netCDF writes 1-element arrays
        item = item[0]
    if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
        raise ConfigError(
            f"the {attr} attribute {value!r} of variable {layout.name!r} in {store_name!r} is "
            f"not a finite number; fix the attribute, or serve stored values with "
            f"decode_cf=False."
        )
    return float(item)


def packing_of(layout: ArrayLayout, store_name: str) -> Packing | None:
    """The variable's ``scale_factor``/``add_offset`` (None: it has neither)."""
    values = [layout.attrs.get(attr) for attr in PACKING_ATTRIBUTES]
    if all(v is None for v in values):
        return None
    scale, offset = (
        None if v is None else _number(v, attr, layout, store_name)
        for v, attr in zip(values, PACKING_ATTRIBUTES, strict=True)
    )
    if layout.dtype.kind not in "iuf":
        raise ConfigError(
            f"variable {layout.name!r} in {store_name!r} of dtype {layout.dtype} has "
            f"scale_factor/add_offset; only numbers are unpacked (decode_cf=False serves "
            f"it as stored)."
        )
    return Packing(scale, offset, _unpacking_dtype(layout, store_name))


def _unpacking_dtype(layout: ArrayLayout, store_name: str) -> str:
    """The dtype xarray unpacks ``layout``'s values in (see the module docstring)."""
    from zarrdali.store.missing import variable_missing_values

    fill_attrs = any(layout.attrs.get(a) is not None for a in ("_FillValue", "missing_value"))
    only_nan = fill_attrs and not len(variable_missing_values(layout, store_name))
    if layout.dtype.kind == "f" and only_nan:
        return np.dtype(layout.dtype).newbyteorder("=").name
    return "float64"


def unsigned_view(layout: ArrayLayout) -> ArrayLayout:
    """``layout`` with ``_Unsigned = "true"`` applied: a signed integer variable
    read as the unsigned integers of the same bits (its fill value too), as
    xarray's ``UnsignedIntegerCoder`` does. Other layouts are returned as they are."""
    flag = layout.attrs.get("_Unsigned")
    if str(flag).lower() != "true" or layout.dtype.kind != "i":
        return layout
    unsigned = np.dtype(f"u{layout.dtype.itemsize}")
    fill = np.array(layout.fill_value, dtype=layout.dtype).view(unsigned).item()
    attrs = dict(layout.attrs)
    for attr in ("_FillValue", "missing_value"):  # as the unsigned value of the same bits
        if isinstance(attrs.get(attr), (int, float)) and not isinstance(attrs[attr], bool):
            signed = np.array(int(attrs[attr])).astype(layout.dtype)
            attrs[attr] = signed.view(unsigned).item()
    return replace(layout, dtype=unsigned, fill_value=fill, attrs=attrs)


def channel_packing(
    layouts: list[ArrayLayout], store_name: str
) -> tuple[Packing | None, ...] | None:
    """Per channel, its variable's packing (None: no variable is packed)."""
    per_variable = [packing_of(layout, store_name) for layout in layouts]
    if all(p is None for p in per_variable):
        return None
    return tuple(
        p for p, layout in zip(per_variable, layouts, strict=True) for _ in range(layout.n_levels)
    )


def decoded_values(values: np.ndarray, layout: ArrayLayout, store_name: str) -> np.ndarray:
    """A whole array's stored ``values`` as xarray decodes them, float32: for
    what is read once (static fields), the rule the batch paths apply."""
    from zarrdali.store.missing import variable_missing_values

    layout = unsigned_view(layout)
    values = np.asarray(values).astype(layout.dtype, copy=False)
    missing = variable_missing_values(layout, store_name)
    bad = np.isin(values, missing) if len(missing) else None
    packing = packing_of(layout, store_name)
    out = values
    if packing is not None:
        dtype = np.dtype(packing.dtype)
        out = values.astype(dtype)
        if packing.scale is not None:
            out *= dtype.type(packing.scale)
        if packing.offset is not None:
            out += dtype.type(packing.offset)
    out = out.astype(np.float32)
    if bad is not None:
        out[bad] = np.nan
    return out
