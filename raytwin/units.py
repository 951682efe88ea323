"""Units: compositional unit strings over a table of symbols, converted to SI by dimension.

A unit string is symbols joined by ``*`` (or ``.``, Modelica's product) and ``/`` (left to right:
``W/m^2/K`` is ``W/(m^2*K)``), each with an optional integer power ``^n`` (``m^3``, ``s^-1``) and
grouped by parentheses (``J/(kg*K)``); ``1/K`` is the inverse of a kelvin, ``-`` (or ``1``)
dimensionless. No spaces. The symbols (`SYMBOLS`) are SI's and a few common others (``L``, ``bar``,
``Wh``, ``rpm``, ``%``); a prefix (`PREFIXES`: ``kJ``, ``mA``, ``uF``, ``hPa``, ``cm``) applies only to
the symbols marked prefixable, so ``min`` is minutes and ``Pa`` a pascal, never a prefixed ``in`` or
``a``, and ``kg`` is a prefixed ``g``. The prefix binds before the power: ``cm^2`` is 1e-4 m^2.

Every unit is ``si = value * scale + offset`` over the base units m, kg, s, A, K, mol (`BASE`), so
two units are compatible exactly when their dimensions are equal: ``V*s/rad`` converts to ``N*m/A``
(a motor's back-EMF and torque constants are one number in SI), ``J`` to ``N*m``, ``K`` never to
``W``. The radian is dimensionless, as in SI (``deg`` converts to ``-``, ``rad/s`` to ``1/s``).
Temperatures with an offset (``degC``, ``°C``, ``degF``, ``°F``) are whole units only: a rate or
coefficient is a temperature difference, so it is written in ``K`` (``K/s``, ``W/K``).

`define` adds a symbol (``define("ppm", 1e-6, "1")``). It changes this process only: call it at import
of the module that declares the model, so that every process that loads the model (Serve replicas,
ingest tasks, Ray workers) has defined it before it reads the unit.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import NamedTuple, NoReturn


class UnitError(ValueError):
    """An unknown unit or a unit that cannot be converted to the expected one."""


BASE = ("m", "kg", "s", "A", "K", "mol")
Dimension = tuple[int, int, int, int, int, int]
"""Exponents of the base units `BASE`."""


class UnitDef(NamedTuple):
    canonical: str
    """The unit's dimension in base units (``kg*m^2/s^3`` for kW): itself a unit, of scale 1."""
    scale: float
    offset: float = 0.0


class Symbol(NamedTuple):
    dimension: Dimension
    scale: float
    """The symbol in SI base units: 1 kWh is 3.6e6 kg*m^2/s^2."""
    prefixable: bool = False


def _dim(m: int = 0, kg: int = 0, s: int = 0, A: int = 0, K: int = 0, mol: int = 0) -> Dimension:  # noqa: N803
    return (m, kg, s, A, K, mol)


_ONE, _J, _C, _PA = _dim(), _dim(m=2, kg=1, s=-2), _dim(s=1, A=1), _dim(m=-1, kg=1, s=-2)
_OHM = _dim(m=2, kg=1, s=-3, A=-2)
_RPM = 2.0 * math.pi / 60.0

SYMBOLS: dict[str, Symbol] = {
    # dimensionless: ratios and angles
    "-": Symbol(_ONE, 1.0), "%": Symbol(_ONE, 1e-2),
    "rad": Symbol(_ONE, 1.0, True), "deg": Symbol(_ONE, math.pi / 180.0),
    # SI base units (the kilogram is a prefixed gram)
    "m": Symbol(_dim(m=1), 1.0, True), "g": Symbol(_dim(kg=1), 1e-3, True), "s": Symbol(_dim(s=1), 1.0, True),
    "A": Symbol(_dim(A=1), 1.0, True), "K": Symbol(_dim(K=1), 1.0, True), "mol": Symbol(_dim(mol=1), 1.0, True),
    # SI derived units
    "Hz": Symbol(_dim(s=-1), 1.0, True), "N": Symbol(_dim(m=1, kg=1, s=-2), 1.0, True), "J": Symbol(_J, 1.0, True),
    "W": Symbol(_dim(m=2, kg=1, s=-3), 1.0, True), "Pa": Symbol(_PA, 1.0, True), "C": Symbol(_C, 1.0, True),
    "V": Symbol(_dim(m=2, kg=1, s=-3, A=-1), 1.0, True), "ohm": Symbol(_OHM, 1.0, True),
    "Ω": Symbol(_OHM, 1.0, True), "S": Symbol(_dim(m=-2, kg=-1, s=3, A=2), 1.0, True),
    "F": Symbol(_dim(m=-2, kg=-1, s=4, A=2), 1.0, True), "H": Symbol(_dim(m=2, kg=1, s=-2, A=-2), 1.0, True),
    "Wb": Symbol(_dim(m=2, kg=1, s=-2, A=-1), 1.0, True), "T": Symbol(_dim(kg=1, s=-2, A=-1), 1.0, True),
    # common others
    "min": Symbol(_dim(s=1), 60.0), "h": Symbol(_dim(s=1), 3600.0), "L": Symbol(_dim(m=3), 1e-3, True),
    "bar": Symbol(_PA, 1e5, True), "Wh": Symbol(_J, 3600.0, True), "Ah": Symbol(_C, 3600.0, True),
    "rpm": Symbol(_dim(s=-1), _RPM), "krpm": Symbol(_dim(s=-1), 1e3 * _RPM),
}
"""The symbols a unit string is made of, with their dimension and scale to SI base units."""

AFFINE: dict[str, tuple[float, float]] = {
    "degC": (1.0, 273.15), "°C": (1.0, 273.15),
    "degF": (5.0 / 9.0, 273.15 - 32.0 * 5.0 / 9.0), "°F": (5.0 / 9.0, 273.15 - 32.0 * 5.0 / 9.0),
}
"""Temperatures with an offset, as (scale, offset) to kelvin: whole units only."""

PREFIXES: dict[str, float] = {
    "P": 1e15, "T": 1e12, "G": 1e9, "M": 1e6, "k": 1e3, "h": 1e2, "da": 1e1, "d": 1e-1, "c": 1e-2, "m": 1e-3,
    "u": 1e-6, "µ": 1e-6, "μ": 1e-6, "n": 1e-9, "p": 1e-12, "f": 1e-15,
}
"""SI prefixes, on the symbols of `SYMBOLS` marked prefixable."""

GRAMMAR = ("a unit is symbols joined by * (or .) and / with integer powers ^n and parentheses, no spaces "
           "(W/K, J/(kg*K), W/m^2, 1/s, kJ/K, m^3/h)")
_TOKEN = re.compile(r"(?P<int>-?\d+)|(?P<symbol>[^\W\d_]+|%|-|°[^\W\d_]+)|(?P<op>[*./^()])")
_SYMBOL = re.compile(r"[^\W\d_]+")
_MAX_POWER = 12
_MAX_CHARS = 100  # telemetry names its units: bounds the parser's work (and its recursion) per string


def _prefixed(symbol: str) -> tuple[float, Symbol] | None:
    """(prefix factor, symbol) that `symbol` spells, a whole symbol before a prefixed one."""
    if symbol in SYMBOLS:
        return 1.0, SYMBOLS[symbol]
    for prefix, factor in PREFIXES.items():
        base = SYMBOLS.get(symbol[len(prefix):]) if symbol.startswith(prefix) else None
        if base is not None and base.prefixable:
            return factor, base
    return None


def _known_symbols() -> str:
    prefixable = [s for s, d in SYMBOLS.items() if d.prefixable]
    return (f"symbols: {', '.join(SYMBOLS)}; prefixes {', '.join(PREFIXES)} on {', '.join(prefixable)}; "
            f"on their own: {', '.join(AFFINE)}; more with raytwin.units.define")


class _Parser:
    """Recursive descent over the tokens of one unit string, into (dimension, scale)."""

    def __init__(self, unit: str) -> None:
        self.unit, self.tokens, pos = unit, [], 0
        while pos < len(unit):
            match = _TOKEN.match(unit, pos)
            if match is None:
                self.fail(f"{unit[pos]!r} at position {pos} is not part of a unit")
            self.tokens.append((match.lastgroup or "", match.group()))
            pos = match.end()
        self.pos = 0

    def fail(self, why: str) -> NoReturn:
        raise UnitError(f"unknown unit {self.unit!r}: {why}; {GRAMMAR}; {_known_symbols()}")

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")

    def take(self) -> tuple[str, str]:
        token = self.peek()
        self.pos += 1
        return token

    def parse(self) -> tuple[Dimension, float]:
        result = self.expression()
        if self.peek()[0] != "end":
            self.fail(f"unexpected {self.peek()[1]!r}")
        return result

    def expression(self) -> tuple[Dimension, float]:
        dims, scale = self.power()
        while self.peek()[1] in ("*", ".", "/"):
            sign = -1 if self.take()[1] == "/" else 1
            d, f = self.power()
            dims, scale = _combine(dims, d, sign), scale * f**sign
        return dims, scale

    def power(self) -> tuple[Dimension, float]:
        dims, scale = self.factor()
        if self.peek()[1] != "^":
            return dims, scale
        self.take()
        kind, text = self.take()
        fraction = self.peek()[1] == "." and self.pos + 1 < len(self.tokens) and self.tokens[self.pos + 1][0] == "int"
        if kind != "int" or abs(int(text)) > _MAX_POWER or fraction:
            self.fail(f"a power is an integer from -{_MAX_POWER} to {_MAX_POWER}, not {text or 'nothing'!r}")
        return _combine(_ONE, dims, int(text)), scale ** int(text)

    def factor(self) -> tuple[Dimension, float]:
        kind, text = self.take()
        if text == "(":
            inner = self.expression()
            if self.take()[1] != ")":
                self.fail("a '(' is not closed")
            return inner
        if kind == "int":
            if text == "1":
                return _ONE, 1.0
            self.fail(f"a number ({text!r}) is only a power after ^, or the 1 of 1/s")
        if text in AFFINE:
            raise UnitError(f"unit {self.unit!r}: {text} has an offset and is a unit only on its own; inside a "
                            f"compound unit a temperature is a difference, in K (1 degC of difference is 1 K, "
                            f"1 degF is 5/9 K): write {self.unit.replace(text, 'K')!r}")
        found = _prefixed(text) if kind == "symbol" else None
        if found is None:
            self.fail(f"unexpected {text!r}" if kind == "op" else f"{text or 'the end'!r} is not a known symbol")
        factor, symbol = found
        return symbol.dimension, factor * symbol.scale


def _combine(a: Dimension, b: Dimension, power: int) -> Dimension:
    return tuple(x + power * y for x, y in zip(a, b))  # type: ignore[return-value]


def _format(dims: Dimension) -> str:
    """``kg*m^2/(s^3*A)`` for a dimension ("1": dimensionless)."""
    def factors(sign: int) -> list[str]:
        ordered = [(BASE[i], dims[i]) for i in (1, 0, 2, 3, 4, 5)]  # kg*m^2, as SI writes it
        return [b if sign * e == 1 else f"{b}^{sign * e}" for b, e in ordered if sign * e > 0]
    num, den = factors(1), factors(-1)
    text = "*".join(num) or "1"
    if den:
        text += "/" + (den[0] if len(den) == 1 else f"({'*'.join(den)})")
    return text


@lru_cache(maxsize=4096)
def _resolve(unit: str) -> tuple[UnitDef, Dimension]:
    """Cached (bounded: units arrive in telemetry) per unit string; unknown units raise and are not cached."""
    if unit in AFFINE:
        scale, offset = AFFINE[unit]
        return UnitDef("K", scale, offset), _dim(K=1)
    if not unit:
        raise UnitError(f"unknown unit '': write '-' for a dimensionless value; {GRAMMAR}")
    if len(unit) > _MAX_CHARS:
        raise UnitError(f"unknown unit {unit[:20]!r}...: a unit is at most {_MAX_CHARS} characters")
    dims, scale = _Parser(unit).parse()
    return UnitDef(_format(dims), scale), dims


def unit_def(unit: str) -> UnitDef:
    """`unit`'s dimension in base units and its conversion to them (raises `UnitError` for unknown units)."""
    return _resolve(unit)[0]


def is_unit(unit: str) -> bool:
    """Whether `unit` is a known unit (a telemetry column's units are checked once per distinct string)."""
    try:
        _resolve(unit)
    except UnitError:
        return False
    return True


def dimension(unit: str) -> Dimension:
    """The exponents of m, kg, s, A, K, mol in `unit` (raises `UnitError` for unknown units)."""
    return _resolve(unit)[1]


def canonical(unit: str) -> str:
    """The SI dimension of `unit` in base units, e.g. ``kg*m^2/(s^3*A)`` for V: equal exactly for
    units that convert into each other (raises `UnitError` for unknown units, which are not cached).
    Cached: a shard checks every unit of every batch against its twins' types."""
    return _resolve(unit)[0].canonical


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


def define(symbol: str, scale: float, unit: str, *, prefixable: bool = False) -> None:
    """Add `symbol` meaning `scale` times `unit` (``define("psi", 6894.757, "Pa")``), usable in compounds
    (``psi/s``). Defining a symbol again with the same meaning is allowed (a module imported twice).
    This process only: call it at import of the module that declares the model (see the module doc)."""
    if not isinstance(symbol, str) or _SYMBOL.fullmatch(symbol) is None:
        raise UnitError(f"define({symbol!r}): a symbol is letters only (a compound unit is written with it)")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise UnitError(f"define({symbol!r}): scale must be a finite number > 0, not {scale!r}")
    base = unit_def(unit)
    if base.offset:
        raise UnitError(f"define({symbol!r}): {unit!r} has an offset; define a symbol over K instead")
    new = Symbol(dimension(unit), scale * base.scale, prefixable)
    old = SYMBOLS.get(symbol)
    if old is not None and old.dimension == new.dimension and math.isclose(old.scale, new.scale, rel_tol=1e-12) \
            and old.prefixable == prefixable:
        return
    if old is not None or symbol in AFFINE or _prefixed(symbol) is not None:
        raise UnitError(f"define({symbol!r}): {symbol!r} already means {canonical(symbol)} times "
                        f"{unit_def(symbol).scale:g}; choose another symbol")
    clashes = [p + symbol for p in PREFIXES if prefixable and (p + symbol in SYMBOLS or p + symbol in AFFINE)]
    if clashes:
        raise UnitError(f"define({symbol!r}, prefixable=True): {', '.join(clashes)} would be ambiguous; "
                        "define it not prefixable")
    SYMBOLS[symbol] = new
    _resolve.cache_clear()


def _check_table() -> None:
    """A prefixed symbol that spells another symbol would be ambiguous: fail at import, not in use."""
    clashes = [p + s for s, d in SYMBOLS.items() if d.prefixable for p in PREFIXES
               if p + s in SYMBOLS or p + s in AFFINE]
    if clashes:
        raise UnitError(f"ambiguous unit symbols: {', '.join(clashes)}")


_check_table()
