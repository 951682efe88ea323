"""Units: a small explicit table of the units RayTwin accepts and their safe conversions to SI.

Every accepted unit maps to a canonical SI unit by ``si = value * scale + offset``. Two units
are compatible only if they share a canonical unit; nothing is guessed. Extend `UNITS` to
accept more spellings.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class UnitError(ValueError):
    """An unknown unit or a unit that cannot be converted to the expected one."""


class UnitDef(NamedTuple):
    canonical: str
    scale: float
    offset: float = 0.0


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
    "Ah": UnitDef("Ah", 1.0),
    "mAh": UnitDef("Ah", 1e-3),
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
    "rad/s": UnitDef("rad/s", 1.0),
    "rpm": UnitDef("rad/s", 2.0 * math.pi / 60.0),
    "Pa": UnitDef("Pa", 1.0),
    "kPa": UnitDef("Pa", 1e3),
    "bar": UnitDef("Pa", 1e5),
    "H": UnitDef("H", 1.0),
    # time and others
    "1/s": UnitDef("1/s", 1.0),
    "s": UnitDef("s", 1.0),
    "min": UnitDef("s", 60.0),
    "h": UnitDef("s", 3600.0),
    "m/s^2": UnitDef("m/s^2", 1.0),
    "-": UnitDef("-", 1.0),
    "%": UnitDef("-", 1e-2),
}


def unit_def(unit: str) -> UnitDef:
    try:
        return UNITS[unit]
    except KeyError:
        raise UnitError(f"unknown unit {unit!r}; known units: {', '.join(sorted(UNITS))}") from None


def canonical(unit: str) -> str:
    """The SI unit `unit` converts to (raises `UnitError` for unknown units)."""
    return unit_def(unit).canonical


def to_unit(value: float, unit: str, target: str) -> float:
    """Convert `value` from `unit` to `target`, refusing incompatible dimensions."""
    src, dst = unit_def(unit), unit_def(target)
    if src.canonical != dst.canonical:
        raise UnitError(f"cannot convert {unit!r} to {target!r}: {src.canonical} is not {dst.canonical}")
    si = value * src.scale + src.offset
    return (si - dst.offset) / dst.scale
