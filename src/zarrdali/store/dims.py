"""Which axis of an array is time, level, y and x: found by its dimension names.

zarrdali serves ``[B, T, C, H, W]`` from arrays of dimensions ``(time, y, x)``
or ``(time, level, y, x)`` in any stored order. The roles come from each
array's ``dimension_names`` (what xarray writes to ``zarr.json``):

* time: ``time``, ``valid_time``, ``t``, ``date``, ... (:data:`KNOWN_NAMES`)
* level: ``level``, ``isobaricInhPa``, ``pressure_level``, ``plev``, ``lev``, ...
* y: ``lat``, ``latitude``, ``y``, ``rlat``, ``south_north``, ...
* x: ``lon``, ``longitude``, ``x``, ``rlon``, ``west_east``, ...

matched without regard to case; ``dims={"time": "forecast_time", ...}``
names them where the store uses other names. A store whose arrays have no
dimension names (or only xarray's placeholders ``dim_0``, ``phony_dim_0``)
is read by position: ``(time, y, x)`` or ``(time, level, y, x)``, in that
order. A named dimension that is none of the four, a role named twice, or a
role missing is a :class:`~zarrdali.errors.ConfigError` naming the array and
its dimensions: never a positional guess where the names say otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from zarrdali.errors import ConfigError

ROLES = ("time", "level", "y", "x")

KNOWN_NAMES: dict[str, frozenset[str]] = {
    "time": frozenset(
        {"time", "valid_time", "t", "times", "date", "datetime", "time_counter", "xtime"}
    ),
    "level": frozenset(
        {
            "level",
            "levels",
            "lev",
            "plev",
            "isobaricinhpa",
            "isobaricinpa",
            "isobaric",
            "pressure",
            "pressure_level",
            "pressure_levels",
            "air_pressure",
            "model_level",
            "model_levels",
            "hybrid",
            "height",
            "altitude",
            "depth",
            "deptht",
            "bottom_top",
            "z",
            "sigma",
        }
    ),
    "y": frozenset(
        {"y", "lat", "latitude", "rlat", "south_north", "yc", "nlat", "grid_yt", "row", "rows"}
    ),
    "x": frozenset(
        {"x", "lon", "longitude", "rlon", "west_east", "xc", "nlon", "grid_xt", "col", "cols"}
    ),
}

# What xarray and netCDF write for dimensions that have no name.
_PLACEHOLDER = re.compile(r"(phony_)?dim_\d+")


def check_dims_override(dims: Mapping[str, str] | None) -> dict[str, str]:
    """The loader's ``dims=`` argument: role -> dimension name, checked."""
    if dims is None:
        return {}
    if not isinstance(dims, Mapping):
        raise ConfigError(
            f"dims must map roles to dimension names, e.g. {{'time': 'valid_time', "
            f"'y': 'rlat', 'x': 'rlon'}}; got {dims!r}."
        )
    out = {}
    for role, name in dims.items():
        if role not in ROLES:
            raise ConfigError(f"dims has an unknown role {role!r}; roles are {ROLES}.")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"dims[{role!r}] must be a dimension name, got {name!r}.")
        out[role] = name
    if len(set(out.values())) != len(out):
        raise ConfigError(f"dims gives one dimension name to two roles: {out}.")
    return out


def is_unnamed(name: str | None) -> bool:
    return name is None or bool(_PLACEHOLDER.fullmatch(name))


def role_of(name: str, overrides: Mapping[str, str]) -> str | None:
    """The role of dimension ``name`` (None: none of time, level, y, x)."""
    for role, given in overrides.items():
        if name == given:
            return role
    lowered = name.lower()
    for role, names in KNOWN_NAMES.items():
        if role in overrides:  # the user named this role's dimension
            continue
        if lowered in names:
            return role
    return None


def dimension_axes(
    names: Sequence[str | None] | None,
    ndim: int,
    *,
    array: str,
    store: str,
    overrides: Mapping[str, str] | None = None,
    static: bool = False,
) -> tuple[int, ...]:
    """The stored axis of time, (level,) y and x of a variable of ``ndim``
    dimensions (3 axes for ``(time, y, x)``, 4 for ``(time, level, y, x)``);
    with ``static`` of (level,) y and x of a static field (``(y, x)`` or
    ``(level, y, x)``). ``names`` are its ``dimension_names`` (None: none)."""
    overrides = dict(overrides or {})
    shapes = (
        {2: ("y", "x"), 3: ("level", "y", "x")}
        if static
        else {
            3: ("time", "y", "x"),
            4: ("time", "level", "y", "x"),
        }
    )
    if ndim not in shapes:
        what = "static field" if static else "variable"
        served = " and ".join(str(roles).replace("'", "") for roles in shapes.values())
        raise ConfigError(
            f"{what} {array!r} of {store!r} has {ndim} dimensions {tuple(names or ())}; "
            f"zarrdali serves {served} arrays."
        )
    wanted = shapes[ndim]
    if names is None or all(is_unnamed(n) for n in names):
        return tuple(range(ndim))  # no names: stored in the order of `wanted`
    found: dict[str, int] = {}
    problems = []
    for axis, name in enumerate(names):
        role = None if is_unnamed(name) else role_of(name, overrides)
        if role is None or role not in wanted:
            problems.append(f"dimension {name!r} is none of {', '.join(wanted)}")
        elif role in found:
            problems.append(f"{names[found[role]]!r} and {name!r} are both {role}")
        else:
            found[role] = axis
    if not problems:
        problems = [f"no {role} dimension" for role in wanted if role not in found]
    if problems:
        absent = [f"{r}={n!r}" for r, n in overrides.items() if n not in names]
        if absent:
            problems.append(f"dims= names {', '.join(absent)}, which it does not have")
        raise ConfigError(
            f"{'static field' if static else 'variable'} {array!r} of {store!r} has "
            f"dimensions {tuple(names)}: {'; '.join(problems)}. zarrdali finds the axes by "
            f"name (time/valid_time/t, level/isobaricInhPa/pressure_level/plev, "
            f"lat/latitude/y, lon/longitude/x); name yours with "
            f"dims={{'time': ..., 'y': ..., 'x': ...}}."
        )
    return tuple(found[role] for role in wanted)
