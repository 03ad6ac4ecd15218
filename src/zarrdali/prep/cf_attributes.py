"""CF attributes in preparation: what xarray decodes, and how it must be written
(xarray's decoding, the oracle; the loader's own is :mod:`zarrdali.store.cf`).

``prepare`` copies stored values and lets xarray's Zarr writer carry the CF
attributes (``scale_factor``, ``add_offset``, ``_FillValue``, ``missing_value``,
``units``, ``calendar``); ``stats`` computes statistics of what xarray's
``mask_and_scale`` decoding shows. The decoding itself is always xarray's
(:func:`xarray.conventions.decode_cf_variable`); this module only reads the
attributes as Zarr v3 stores spell them and removes the ones xarray would refuse.
"""

from __future__ import annotations

import base64
import logging
import struct
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr
from xarray.conventions import decode_cf_variable

log = logging.getLogger(__name__)

FILL_ATTRIBUTES = ("_FillValue", "missing_value")
PACKING_ATTRIBUTES = ("scale_factor", "add_offset")


def drop_nonconforming_fills(name: str, var: xr.Variable) -> None:
    """Remove a NaN ``_FillValue``/``missing_value`` from an integer variable, in place.

    No integer equals NaN, so xarray's decoder ignores such an attribute (with a
    warning) and the decoded view is the same without it; its Zarr writer,
    though, cannot encode NaN as an integer fill value and fails. (ERA-Interim
    NetCDF files from the MARS archive carry ``_FillValue: NaN`` on int16.)
    """
    if var.dtype.kind not in "iu":
        return
    for key in FILL_ATTRIBUTES:
        value = var.attrs.get(key)
        if value is not None and np.isnan(np.asarray(value, dtype=np.float64)).all():
            log.info("%s: dropping %s=NaN of an integer variable (it marks nothing)", name, key)
            del var.attrs[key]


def zarr_fill_value(var: xr.Variable) -> Any:
    """The Zarr ``fill_value`` a variable's chunks should have: its CF missing value.

    A chunk never written then reads as missing, not as a valid number (xarray
    itself writes 0 for integers, whatever ``_FillValue`` says).
    """
    for key in FILL_ATTRIBUTES:
        value = var.attrs.get(key)
        if value is not None:
            return np.asarray(value, dtype=var.dtype).ravel()[0]
    return np.nan if var.dtype.kind == "f" else None


def parse_fill(value: Any, dtype: np.dtype) -> Any:
    """A ``_FillValue``/``missing_value`` attribute as read from a zarr.json.

    xarray writes a floating variable's ``_FillValue`` to Zarr v3 as the base64
    of a little-endian double (to keep NaN and infinities in JSON); other
    writers use a plain number. Both are accepted.
    """
    if isinstance(value, str) and dtype.kind == "f":
        try:
            raw = base64.b64decode(value.encode(), validate=True)
        except ValueError as err:
            raise ValueError(f"{value!r} is not a number nor a base64 double") from err
        if len(raw) != 8:
            raise ValueError(f"{value!r} is not a base64 double")
        return struct.unpack("<d", raw)[0]
    if isinstance(value, list):
        return [parse_fill(v, dtype) for v in value]
    return value


def decode_variable(name: str, var: xr.Variable, *, scale: bool = True) -> xr.Variable:
    """``var`` (stored values, CF attributes as attributes) as xarray's
    ``mask_and_scale`` decoding shows it: missing values NaN, and with ``scale``
    ``scale_factor``/``add_offset`` applied; without, stored values are kept (what
    a loader reading with ``decode_cf=False`` serves, fill values left out).
    Times are not decoded. Lazy where ``var`` is (dask).
    """
    attrs = dict(var.attrs)
    if not scale:
        for key in PACKING_ATTRIBUTES:
            attrs.pop(key, None)
    var = xr.Variable(var.dims, var.data, attrs)
    drop_nonconforming_fills(name, var)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xr.SerializationWarning)
        return decode_cf_variable(
            name,
            var,
            mask_and_scale=True,
            decode_times=False,
            decode_timedelta=False,
            concat_characters=False,
        )


def zarr_cf_attrs(attrs: Mapping[str, Any], dtype: np.dtype) -> dict[str, Any]:
    """The CF attributes of a zarr.json, fill values parsed (:func:`parse_fill`)."""
    keep = FILL_ATTRIBUTES + PACKING_ATTRIBUTES + ("_Unsigned",)
    return {k: parse_fill(attrs[k], dtype) if k in FILL_ATTRIBUTES else attrs[k]
            for k in keep if k in attrs}  # fmt: skip
