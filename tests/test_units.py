"""Unit strings are compositional: products, quotients, powers and prefixes over a table of symbols,
with scale factors checked against hand-computed ones."""

from __future__ import annotations

import math

import pytest

from raytwin import units
from raytwin.fmu.describe import fmu_unit
from raytwin.units import UnitError, canonical, define, dimension, is_unit, same_unit, to_unit, unit_def


@pytest.mark.parametrize(("unit", "dimension_text", "scale"), [
    # refused by the old fixed table (an outside modeller's list)
    ("W/K", "kg*m^2/(s^3*K)", 1.0), ("W/m^2", "kg/s^3", 1.0), ("kg/s", "kg/s", 1.0), ("m^3", "m^3", 1.0),
    ("mol", "mol", 1.0), ("Hz", "1/s", 1.0), ("L", "m^3", 1e-3), ("g", "kg", 1e-3), ("K/s", "K/s", 1.0),
    ("J/(kg*K)", "m^2/(s^2*K)", 1.0), ("W/(m*K)", "kg*m/(s^3*K)", 1.0), ("kJ", "kg*m^2/s^2", 1e3),
    ("Wh", "kg*m^2/s^2", 3600.0), ("1/K", "1/K", 1.0), ("S", "s^3*A^2/(kg*m^2)", 1.0),
    # hand-computed factors
    ("kJ/(kg*K)", "m^2/(s^2*K)", 1000.0), ("L/min", "m^3/s", 1.0 / 60000.0), ("kWh", "kg*m^2/s^2", 3.6e6),
    ("cm^2", "m^2", 1e-4), ("hPa", "kg/(m*s^2)", 100.0), ("mbar", "kg/(m*s^2)", 100.0), ("mmol/L", "mol/m^3", 1.0),
    ("uF", "s^4*A^2/(kg*m^2)", 1e-6), ("µF", "s^4*A^2/(kg*m^2)", 1e-6), ("μF", "s^4*A^2/(kg*m^2)", 1e-6),
    ("kohm", "kg*m^2/(s^3*A^2)", 1e3), ("kΩ", "kg*m^2/(s^3*A^2)", 1e3), ("mAh", "s*A", 3.6),
    ("g/cm^3", "kg/m^3", 1e3), ("m^3/h", "m^3/s", 1.0 / 3600.0), ("s^-1", "1/s", 1.0), ("ms", "s", 1e-3),
    ("mS/cm", "s^3*A^2/(kg*m^3)", 0.1), ("N.m", "kg*m^2/s^2", 1.0), ("kg*m^2", "kg*m^2", 1.0),
    ("V/krpm", "kg*m^2/(s^2*A)", 60.0 / (2.0 * math.pi * 1000.0)), ("%/min", "1/s", 0.01 / 60.0),
    ("(W/m)^2", "kg^2*m^2/s^6", 1.0), ("min", "s", 60.0), ("Pa", "kg/(m*s^2)", 1.0),
    ("dm^3", "m^3", 1e-3), ("dam", "m", 10.0), ("dL", "m^3", 1e-4), ("TWh", "kg*m^2/s^2", 3.6e15),
    ("PJ", "kg*m^2/s^2", 1e15), ("fF", "s^4*A^2/(kg*m^2)", 1e-15), ("T", "kg/(s^2*A)", 1.0),
])
def test_a_unit_is_parsed_into_its_dimension_and_scale(unit, dimension_text, scale):
    assert canonical(unit) == dimension_text
    assert unit_def(unit).scale == pytest.approx(scale, rel=1e-12) and unit_def(unit).offset == 0.0


def test_spellings_of_one_unit_are_the_same_unit():
    assert same_unit("W/(m^2*K)", "W/m^2/K") and same_unit("W/(m^2*K)", "W*m^-2*K^-1")
    assert same_unit("Hz", "1/s") and same_unit("S", "1/ohm")
    assert same_unit("Wh", "W*h") and same_unit("J/(kg*K)", "J/kg/K") and not same_unit("kJ", "J")
    assert to_unit(1.0, "kJ/(kg*K)", "J/(kg*K)") == pytest.approx(1000.0, rel=1e-15)
    assert to_unit(6.0, "L/min", "m^3/s") == pytest.approx(1e-4, rel=1e-15)
    assert to_unit(2.0, "Wh", "J") == pytest.approx(7200.0, rel=1e-15)
    assert to_unit(1.0, "kWh", "kJ") == pytest.approx(3600.0, rel=1e-15)
    with pytest.raises(UnitError, match=r"cannot convert 'W/K' to 'W/m\^2': kg\*m\^2/\(s\^3\*K\) is not kg/s\^3"):
        to_unit(1.0, "W/K", "W/m^2")


def test_temperatures_with_an_offset_are_whole_units_only():
    assert to_unit(212.0, "degF", "K") == pytest.approx(373.15, rel=1e-15)
    assert to_unit(32.0, "°F", "degC") == pytest.approx(0.0, abs=1e-12)
    assert to_unit(20.0, "°C", "K") == pytest.approx(293.15, rel=1e-15) and dimension("degC") == dimension("K")
    with pytest.raises(UnitError, match=r"'degC/s': degC has an offset .* a temperature is a difference, in K .* "
                                        r"write 'K/s'"):
        unit_def("degC/s")
    for unit in ("W/degF", "°C^2", "(degC)"):
        with pytest.raises(UnitError, match="has an offset and is a unit only on its own"):
            unit_def(unit)


@pytest.mark.parametrize(("unit", "why"), [
    ("furlong/s", "'furlong' is not a known symbol"), ("m s", "' ' at position 1 is not part of a unit"),
    ("m^", "a power is an integer"), ("m^1.5", "a power is an integer"), ("(m", "a '(' is not closed"),
    ("2/s", "a number ('2') is only a power"), ("kkg", "'kkg' is not a known symbol"),
    ("Nm", "'Nm' is not a known symbol"),  # N*m: no product without an operator
    ("kmin", "'kmin' is not a known symbol"), ("kdeg", "'kdeg' is not a known symbol"),  # not prefixable
    ("m^99", "a power is an integer from -12 to 12"), ("m/", "'the end' is not a known symbol"),
    ("m)", "unexpected ')'"),
])
def test_an_unknown_unit_is_refused_with_the_grammar_and_the_symbols(unit, why):
    with pytest.raises(UnitError, match="unknown unit") as info:
        unit_def(unit)
    assert why in str(info.value)
    assert "joined by * (or .) and /" in str(info.value) and "symbols: -, %, rad" in str(info.value)
    assert "prefixes P, T, G, M, k" in str(info.value) and "raytwin.units.define" in str(info.value)


def test_a_long_unit_is_refused_before_it_is_parsed():
    """Telemetry names its units: a deeply nested one must not be recursed into until the stack runs out."""
    assert is_unit("(" * 40 + "m" + ")" * 40)
    for unit in ("(" * 10_000 + "m" + ")" * 10_000, "m*" * 60 + "m"):
        assert not is_unit(unit)
        with pytest.raises(UnitError, match="a unit is at most 100 characters"):
            unit_def(unit)


@pytest.mark.parametrize(("modelica", "unit"), [
    ("W/(m2.K)", "W/(m^2*K)"), ("m/s2", "m/s^2"), ("kg.m2", "kg*m^2"), ("rad/s2", "rad/s^2"),
    # Modelica's signed exponents (its unit grammar: an operand, then an optional sign and integer)
    ("s-1", "1/s"), ("m.s-2", "m/s^2"), ("K-1", "1/K"), ("mol-1", "1/mol"), ("kg.m-3", "kg/m^3"), ("m+2", "m^2"),
    ("1", "-"), ("1/s", "1/s"), ("degC", "degC"),
])
def test_modelica_spellings_from_an_fmu_are_units(modelica, unit):
    assert same_unit(fmu_unit(modelica), unit)


@pytest.fixture
def own_symbols(monkeypatch):
    """`define` on a copy of the table, forgotten after the test."""
    monkeypatch.setattr(units, "SYMBOLS", dict(units.SYMBOLS))
    units._resolve.cache_clear()
    yield
    units._resolve.cache_clear()


def test_a_symbol_can_be_defined_and_composed(own_symbols):
    with pytest.raises(UnitError, match="'ppm' is not a known symbol"):
        unit_def("ppm/s")  # an unknown unit is not remembered as unknown once defined
    define("ppm", 1e-6, "1")
    define("ppm", 1e-6, "-")  # again, same meaning: a module imported twice
    assert to_unit(5e5, "ppm", "%") == pytest.approx(50.0, rel=1e-12) and canonical("ppm/s") == "1/s"
    define("Torr", 101325.0 / 760.0, "Pa", prefixable=True)
    assert to_unit(760.0, "mTorr", "Pa") == pytest.approx(101.325, rel=1e-12)
    for args, why in [
        (("ppm", 1e-3, "1"), r"'ppm' already means 1 times 1e-06"),
        (("km", 1.0, "m"), "'km' already means m times 1000"),
        (("in", 0.0254, "m", True), "min would be ambiguous"),
        (("p s", 1.0, "s"), "a symbol is letters only"),
        (("deca", 0.0, "1"), "scale must be a finite number > 0"),
        (("degR", 5 / 9, "degC"), "'degC' has an offset"),
    ]:
        with pytest.raises(UnitError, match=why):
            define(*args[:3], prefixable=args[3] if len(args) > 3 else False)
