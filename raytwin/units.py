"""Units: a small explicit table of the units RayTwin accepts and their safe conversions to SI.

Every accepted unit maps to an SI expression by ``si = value * scale + offset``. The expression
(``N*m/A``, ``kg*m^2``, ``1/s``) is a product of powers of SI units whose dimensions over the base
units m, kg, s, A, K are known (`ATOMS`), so two units are compatible exactly when their
dimensions are equal: ``V*s/rad`` converts to ``N*m/A`` (a motor's back-EMF and torque constants
are one number in SI), ``J`` to ``N*m``, ``K`` never to ``W``. The radian is dimensionless, as in SI
(so an angle in ``rad`` or ``deg`` converts to ``-`` too, as ``rad/s`` does to ``1/s``).
Nothing is guessed: a spelling is accepted only if it is in `UNITS`; extend the table to accept
more, with the SI expression it means.
"""

from __future__ import annotations

import math
import re
from functools import cache
from typing import NamedTuple


class UnitError(ValueError):
    """An unknown unit or a unit that cannot be converted to the expected one."""


class UnitDef(NamedTuple):
    canonical: str
    """The SI expression the unit converts to (over `ATOMS`)."""
    scale: float
    offset: float = 0.0


BASE = ("m", "kg", "s", "A", "K")
Dimension = tuple[int, int, int, int, int]
"""Exponents of the base units `BASE`."""
ATOMS: dict[str, Dimension] = {
    "1": (0, 0, 0, 0, 0), "-": (0, 0, 0, 0, 0), "rad": (0, 0, 0, 0, 0),
    "m": (1, 0, 0, 0, 0), "kg": (0, 1, 0, 0, 0), "s": (0, 0, 1, 0, 0), "A": (0, 0, 0, 1, 0), "K": (0, 0, 0, 0, 1),
    "N": (1, 1, -2, 0, 0), "J": (2, 1, -2, 0, 0), "W": (2, 1, -3, 0, 0), "Pa": (-1, 1, -2, 0, 0),
    "C": (0, 0, 1, 1, 0), "V": (2, 1, -3, -1, 0), "ohm": (2, 1, -3, -2, 0), "F": (-2, -1, 4, 2, 0),
    "H": (2, 1, -2, -2, 0),
}
"""SI units with their dimensions: the words of the SI expressions in `UNITS`."""


UNITS: dict[str, UnitDef] = {
    # temperature
    "K": UnitDef("K", 1.0),
    "degC": UnitDef("K", 1.0, 273.15),
    "°C": UnitDef("K", 1.0, 273.15),
    # power and energy
    "W": UnitDef("W", 1.0),
    "kW": UnitDef("W", 1e3),
    "MW": UnitDef("W", 1e6),
    "J": UnitDef("J", 1.0),
    "kWh": UnitDef("J", 3.6e6),
    # length, area, flow
    "m": UnitDef("m", 1.0),
    "cm": UnitDef("m", 1e-2),
    "mm": UnitDef("m", 1e-3),
    "m^2": UnitDef("m^2", 1.0),
    "cm^2": UnitDef("m^2", 1e-4),
    "m^3/s": UnitDef("m^3/s", 1.0),
    "L/s": UnitDef("m^3/s", 1e-3),
    "L/min": UnitDef("m^3/s", 1e-3 / 60.0),
    "m^3/h": UnitDef("m^3/s", 1.0 / 3600.0),
    # electrical
    "V": UnitDef("V", 1.0),
    "mV": UnitDef("V", 1e-3),
    "A": UnitDef("A", 1.0),
    "mA": UnitDef("A", 1e-3),
    "C": UnitDef("C", 1.0),
    "Ah": UnitDef("C", 3600.0),
    "mAh": UnitDef("C", 3.6),
    "ohm": UnitDef("ohm", 1.0),
    "mohm": UnitDef("ohm", 1e-3),
    "F": UnitDef("F", 1.0),
    # thermal properties
    "J/K": UnitDef("J/K", 1.0),
    "kJ/K": UnitDef("J/K", 1e3),
    "K/W": UnitDef("K/W", 1.0),
    # mechanics
    "m/s": UnitDef("m/s", 1.0),
    "kg": UnitDef("kg", 1.0),
    "N": UnitDef("N", 1.0),
    "N/m": UnitDef("N/m", 1.0),
    "N*s/m": UnitDef("N*s/m", 1.0),
    "N*m": UnitDef("N*m", 1.0),
    "kg*m^2": UnitDef("kg*m^2", 1.0),
    "rad": UnitDef("rad", 1.0),
    "deg": UnitDef("rad", math.pi / 180.0),
    "rad/s": UnitDef("rad/s", 1.0),
    "deg/s": UnitDef("rad/s", math.pi / 180.0),
    "rpm": UnitDef("rad/s", 2.0 * math.pi / 60.0),
    "Pa": UnitDef("Pa", 1.0),
    "kPa": UnitDef("Pa", 1e3),
    "bar": UnitDef("Pa", 1e5),
    "H": UnitDef("H", 1.0),
    # electric machines: torque constant, back-EMF constant (the same quantity in SI), rotational damping
    "N*m/A": UnitDef("N*m/A", 1.0),
    "V*s/rad": UnitDef("V*s/rad", 1.0),
    "V/krpm": UnitDef("V*s/rad", 60.0 / (2.0 * math.pi * 1000.0)),
    "N*m*s/rad": UnitDef("N*m*s/rad", 1.0),
    # time and others
    "1/s": UnitDef("1/s", 1.0),
    "s": UnitDef("s", 1.0),
    "min": UnitDef("s", 60.0),
    "h": UnitDef("s", 3600.0),
    "m/s^2": UnitDef("m/s^2", 1.0),
    "-": UnitDef("-", 1.0),
    "%": UnitDef("-", 1e-2),
}


_FACTOR = re.compile(r"(?P<atom>[A-Za-z1-]+)(\^(?P<power>-?\d+))?")


@cache
def _parse(expression: str) -> Dimension:
    """The dimension of an SI expression: factors ``atom`` or ``atom^n`` joined by ``*`` and ``/``
    (left to right, so ``N*m*s/rad`` is N m s / rad)."""
    dims, sign = [0] * len(BASE), 1
    for part in re.split(r"([*/])", expression):
        if part in ("*", "/"):
            sign = 1 if part == "*" else -1
            continue
        match = _FACTOR.fullmatch(part)
        if match is None or match["atom"] not in ATOMS:
            raise UnitError(f"SI expression {expression!r}: {part!r} is not one of {', '.join(ATOMS)} (or a power)")
        power = sign * int(match["power"] or 1)
        dims = [d + power * a for d, a in zip(dims, ATOMS[match["atom"]])]
    return tuple(dims)  # type: ignore[return-value]


def _format(dims: Dimension) -> str:
    """``kg*m^2/(s^3*A)`` for a dimension ("1": dimensionless)."""
    def factors(sign: int) -> list[str]:
        ordered = [(BASE[i], dims[i]) for i in (1, 0, 2, 3, 4)]  # kg*m^2, as SI writes it
        return [b if sign * e == 1 else f"{b}^{sign * e}" for b, e in ordered if sign * e > 0]
    num, den = factors(1), factors(-1)
    text = "*".join(num) or "1"
    if den:
        text += "/" + (den[0] if len(den) == 1 else f"({'*'.join(den)})")
    return text


for _unit, _definition in UNITS.items():  # a table entry that does not parse fails at import, not in use
    _parse(_definition.canonical)


def unit_def(unit: str) -> UnitDef:
    try:
        return UNITS[unit]
    except KeyError:
        raise UnitError(f"unknown unit {unit!r}; known units: {', '.join(sorted(UNITS))}") from None


def dimension(unit: str) -> Dimension:
    """The exponents of m, kg, s, A, K in `unit` (raises `UnitError` for unknown units)."""
    return _parse(unit_def(unit).canonical)


@cache
def canonical(unit: str) -> str:
    """The SI dimension of `unit` in base units, e.g. ``kg*m^2/(s^3*A)`` for V: equal exactly for
    units that convert into each other (raises `UnitError` for unknown units, which are not cached).
    Cached: a shard checks every unit of every batch against its twins' types."""
    return _format(dimension(unit))


def same_unit(a: str, b: str) -> bool:
    """Whether `a` and `b` are one unit spelled two ways (``J`` and ``N*m``), not merely of one dimension
    (``degC`` and ``K``: values need converting)."""
    da, db = unit_def(a), unit_def(b)
    return dimension(a) == dimension(b) and math.isclose(da.scale, db.scale, rel_tol=1e-12) and da.offset == db.offset


def _dimension_text(unit: str) -> str:
    """`unit`'s dimension for a message: ``kg*m^2/s``, or "dimensionless (an angle, a ratio)"."""
    text = canonical(unit)
    return "dimensionless (an angle, a ratio)" if text == "1" else text


def to_unit(value: float, unit: str, target: str) -> float:
    """Convert `value` from `unit` to `target`, refusing incompatible dimensions."""
    src, dst = unit_def(unit), unit_def(target)
    if dimension(unit) != dimension(target):
        raise UnitError(f"cannot convert {unit!r} to {target!r}: {_dimension_text(unit)} is not "
                        f"{_dimension_text(target)}")
    si = value * src.scale + src.offset
    return (si - dst.offset) / dst.scale
