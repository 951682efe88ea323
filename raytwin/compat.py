"""Schema evolution of asset types: what changed between two versions, and whether the version
number says so (semantic versioning).

A client written for one version of a type keeps working with a later version exactly when every
name it may send or read is still there with the same physical dimension, so:

- removing a state, input, output or parameter is **breaking** (a rename is a removal plus an
  addition: nothing in a type says two names are one quantity; twins move with an explicit
  state mapping, `raytwin.migration`);
- changing a variable's unit to another dimension (K -> W) is **breaking**;
- adding a parameter is compatible (it has a default); adding an output is compatible (nothing
  has to send it); adding a state or an input is **breaking** (they have no default: a start
  state or an input set written for the old version would be refused);
- narrowing a plausible range or a parameter's bounds is **breaking** (values accepted before
  would be refused); a unit of the same dimension (K -> degC), a wider range or another default
  is compatible.

A breaking change needs a new major version; `check_version` refuses it otherwise, naming every
breaking change and how to fix it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from raytwin import units
from raytwin.contracts import AssetType, plausible_range

Bump = Literal["major", "minor", "patch", "none"]
KINDS = ("states", "inputs", "outputs", "parameters")


class IncompatibleVersion(ValueError):
    """A new type version whose changes need a larger version bump than it has."""

    def __init__(self, message: str, changes: list[SchemaChange]):
        super().__init__(message)
        self.changes = changes


@dataclass(frozen=True)
class SchemaChange:
    """One difference between two versions of a type; `fix` says how to publish it when breaking."""

    where: str  # "states.T_in"
    change: str  # "removed", "added", "dimension", "unit", "narrowed", "widened", "default"
    breaking: bool
    message: str
    fix: str = ""


def parse_version(version: str) -> tuple[int, int, int]:
    major, minor, patch = (int(p) for p in version.split("."))
    return major, minor, patch


def bump(previous: str, new: str) -> Bump:
    """The part of the version number that grew from `previous` to `new` ("none": not newer)."""
    old, cur = parse_version(previous), parse_version(new)
    if cur <= old:
        return "none"
    return "major" if cur[0] > old[0] else "minor" if cur[1] > old[1] else "patch"


def previous_version(new: str, published: Iterable[str]) -> str | None:
    """The newest published version older than `new` (what `new` is checked against)."""
    older = [v for v in published if parse_version(v) < parse_version(new)]
    return max(older, key=parse_version, default=None)


def _bounds(old_lower: float | None, old_upper: float | None, new_lower: float | None,
            new_upper: float | None) -> str | None:
    """"narrowed", "widened" or None (unchanged), comparing ranges in one unit (None: unbounded)."""
    lo_in = new_lower is not None and (old_lower is None or _above(new_lower, old_lower))
    hi_in = new_upper is not None and (old_upper is None or _above(old_upper, new_upper))
    if lo_in or hi_in:
        return "narrowed"
    same = all(a is b is None or (a is not None and b is not None and _same(a, b))
               for a, b in ((old_lower, new_lower), (old_upper, new_upper)))
    return None if same else "widened"


def _same(a: float, b: float) -> bool:
    """Equal up to unit-conversion rounding (-100 degC and 173.15 K)."""
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def _above(a: float, b: float) -> bool:
    return a > b and not _same(a, b)


def _si(value: float | None, unit: str) -> float | None:
    return None if value is None else units.to_unit(value, unit, units.unit_def(unit).canonical)


def compare_types(old: AssetType, new: AssetType) -> list[SchemaChange]:
    """Every difference between two versions of a type that matters to clients, breaking first."""
    changes: list[SchemaChange] = []
    version = parse_version(old.version)
    major = f"publish it as {version[0] + 1}.0.0"
    minor = f"publish it as {version[0]}.{version[1] + 1}.0 or later (an addition needs a new minor version)"
    for kind in KINDS:
        before, after = getattr(old, kind), getattr(new, kind)
        for name in sorted(set(before) - set(after)):
            changes.append(SchemaChange(
                f"{kind}.{name}", "removed", True, f"{kind}.{name} was removed (or renamed)",
                f"keep {name!r}, or {major} and move twins with POST /v1/assets/{{id}}/migrate, mapping the new "
                "name to the old one"))
        for name in sorted(set(after) - set(before)):
            compatible = kind in ("parameters", "outputs")
            changes.append(SchemaChange(
                f"{kind}.{name}", "added", not compatible,
                f"{kind}.{name} was added" + ("" if compatible else f" ({kind[:-1]}s have no default, so what "
                                                                    f"clients of {old.version} send is refused)"),
                minor if compatible else f"{major} (a new {kind[:-1]} needs a new major version)"))
        for name in sorted(set(before) & set(after)):
            a, b = before[name], after[name]
            where = f"{kind}.{name}"
            if units.dimension(a.unit) != units.dimension(b.unit):
                changes.append(SchemaChange(
                    where, "dimension", True,
                    f"{where}: unit {a.unit!r} ({units.canonical(a.unit)}) became {b.unit!r} ({units.canonical(b.unit)})",
                    f"keep a unit of dimension {units.canonical(a.unit)}, or {major}"))
                continue
            if a.unit != b.unit:
                changes.append(SchemaChange(where, "unit", False, f"{where}: unit {a.unit!r} became {b.unit!r} "
                                                                  "(same dimension, converted)"))
            way = _bounds(_si(a.lower, a.unit), _si(a.upper, a.unit), _si(b.lower, b.unit), _si(b.upper, b.unit))
            if way == "narrowed":
                changes.append(SchemaChange(
                    where, "narrowed", True,
                    f"{where}: range [{a.lower}, {a.upper}] {a.unit} narrowed to [{b.lower}, {b.upper}] {b.unit}",
                    f"keep the range at least as wide, or {major}"))
            elif way == "widened":
                changes.append(SchemaChange(where, "widened", False, f"{where}: range widened"))
            if kind == "parameters" and not _same(_si(a.default, a.unit), _si(b.default, b.unit)):
                changes.append(SchemaChange(where, "default", False,
                                            f"{where}: default {a.default} {a.unit} became {b.default} {b.unit}"))
    return sorted(changes, key=lambda c: not c.breaking)


def required_bump(changes: list[SchemaChange]) -> Bump:
    """The smallest version bump these changes allow."""
    if any(c.breaking for c in changes):
        return "major"
    return "minor" if any(c.change == "added" for c in changes) else "patch"


def check_version(old: AssetType, new: AssetType) -> list[SchemaChange]:
    """The changes from `old` to `new`, or `IncompatibleVersion` when `new`'s number does not allow
    them: a breaking change under a minor or patch bump, or an addition under a patch bump."""
    if old.name != new.name:
        raise ValueError(f"cannot compare versions of two types ({old.name}, {new.name})")
    changes = compare_types(old, new)
    need, have = required_bump(changes), bump(old.version, new.version)
    order = ("none", "patch", "minor", "major")
    if order.index(have) >= order.index(need):
        return changes
    shown = [c for c in changes if c.breaking] or [c for c in changes if c.change == "added"]
    raise IncompatibleVersion(
        f"asset type {new.key} is a {have} bump from {old.version} but its changes need a {need} bump: "
        + "; ".join(f"{c.message}: {c.fix}" for c in shown), shown)


class IncompatibleReplay(ValueError):
    """A retype (`actors.service.TwinService.retype`, a `PUT` of an asset, a bulk retype) to a type version its
    twin's history does not replay on unchanged (`replay_differences`) or whose plausible ranges exclude a reading
    the replay applies or a state it replays into (`range_differences`), each in `differences`; a migration
    moves the twin instead; `old` and `new` are the versions' keys (``name@version``). `explain(how)` words it
    for a caller who migrates with `how` (HTTP: the endpoint)."""

    def __init__(self, asset_id: str, old: str, new: str, differences: list[SchemaChange]):
        self.asset_id, self.old, self.new, self.differences = asset_id, old, new, differences
        super().__init__(self.explain("TwinService.migrate with a MigrationPlan"))

    def __reduce__(self):  # pickled as itself (a Ray task's caller gets it), not as its message alone
        return type(self), (self.asset_id, self.old, self.new, self.differences)

    def explain(self, how: str) -> str:
        widen = (", or publish a version whose plausible ranges hold them"
                 if any(d.change == "range" for d in self.differences) else "")
        return (f"asset {self.asset_id}: its twin's history cannot be replayed unchanged on {self.new}, which differs "
                f"from {self.old} in {', '.join(d.message for d in self.differences)}: a change of type version in "
                "place (a retype) replays the logged history on the new model as logged, so it needs the same states "
                f"in the same units, every input and output of {self.old} in the same unit, and plausible ranges "
                f"that hold the logged readings and the states the new model replays them into; move it with {how}, "
                f"which maps and converts its state{widen}")


def require_replayable(asset_id: str, old: AssetType, new: AssetType) -> None:
    """`IncompatibleReplay` unless the twin of `asset_id`'s history, logged on `old`, replays on `new` unchanged.
    Checked before the replay; the ranges are checked where it runs (`require_plausible`)."""
    if differences := replay_differences(old, new):
        raise IncompatibleReplay(asset_id, old.key, new.key, differences)


def require_plausible(asset_id: str, old: str, new: AssetType, replayed: dict[str, float],
                      along: Sequence[tuple[str, dict[str, float]]], readings: Iterable[dict[str, float]]) -> None:
    """`IncompatibleReplay` (from `old`, a type's key) unless `new`'s plausible ranges hold the state the twin of
    `asset_id` replayed into, the states along the replay and the readings it applied (`range_differences`)."""
    if differences := range_differences(new, replayed, along, readings):
        raise IncompatibleReplay(asset_id, old, new.key, differences)


def range_differences(new: AssetType, replayed: dict[str, float], along: Sequence[tuple[str, dict[str, float]]],
                      readings: Iterable[dict[str, float]]) -> list[SchemaChange]:
    """Where `new`'s plausible ranges exclude the state its model `replayed` the twin's log into, a state `along`
    the replay (when, as words; values), or a logged reading the replay applied (all in `new`'s units, as they are
    when `replay_differences` found none). Why: on `new` the twin would run from a state its own type calls
    implausible (a sweep from "live" starts there; a version whose dynamics differ replays into other states
    than the old one ran in), and the replay applies logged readings as logged, never rechecked, although
    `new` refuses such telemetry. A state that is not a number (a diverged filter) is not checked: it lies in
    no range."""
    differences = []
    for name, q in new.states.items():
        end = replayed.get(name, math.nan)
        ends = math.isfinite(end) and q.outside(end)
        passed = [f"{v:g} {q.unit} at {when}" for when, values in along
                  if math.isfinite(v := values.get(name, math.nan)) and q.outside(v)]
        if not (ends or passed):
            continue
        shown = ", ".join(passed[:3]) + ", ..." * (len(passed) > 3)
        said = (f"the replay ends at {end:g} {q.unit}" + f" (and passed {shown})" * bool(passed) if ends
                else f"the replay passed {shown}")
        differences.append(SchemaChange(f"states.{name}", "range", True,
                                        f"states.{name}: {said}, {plausible_range(q)} of {new.version}"))
    measurable = new.measurable()
    outside: dict[str, list[float]] = {}
    for values in readings:
        for name, value in values.items():
            if (q := measurable.get(name)) is not None and q.outside(value):
                outside.setdefault(name, []).append(value)
    for name, values in sorted(outside.items()):
        q = measurable[name]
        where = f"{'outputs' if name in new.outputs else 'inputs'}.{name}"
        differences.append(SchemaChange(
            where, "range", True, f"{where}: {len(values)} logged reading{'s' * (len(values) != 1)} ("
            f"{', '.join(f'{v:g}' for v in values[:3])}{', ...' * (len(values) > 3)} {q.unit}) {plausible_range(q)} "
            f"of {new.version}"))
    return differences


def replay_differences(old: AssetType, new: AssetType) -> list[SchemaChange]:
    """Why a twin's logged history would not mean on `new` what it meant on `old` (empty: it would). A type
    version changed in place (`PUT` of an asset, a bulk retype) replays the twin's log on `new`'s model as
    logged: values by name, in `old`'s units, unconverted (`actors.twin.Twin.pending`). So `new` must have
    `old`'s states in the same units, and every input and output of `old` (what telemetry carried) as the same
    kind in the same unit: a name `new` lacks drops that history, one in another unit is read as `new`'s, an
    output become an input drives the model instead of correcting it. Added inputs and outputs are fine (the
    history never had them); other changes are a migration's (`raytwin.migration`), which maps the state."""
    differences: list[SchemaChange] = []

    def differ(where: str, change: str, message: str) -> None:
        differences.append(SchemaChange(where, change, True, message))

    for kind, other in (("states", None), ("inputs", "outputs"), ("outputs", "inputs")):
        before, after = getattr(old, kind), getattr(new, kind)
        for name, was in before.items():
            where = f"{kind}.{name}"
            if name in after:
                if not units.same_unit(was.unit, after[name].unit):
                    differ(where, "unit", f"{where} ({was.unit} -> {after[name].unit})")
            elif other is not None and name in getattr(new, other):
                differ(where, "kind", f"{where} is one of the {other} of {new.version}")
            else:
                differ(where, "removed", f"{where} removed (or renamed)")
        if kind == "states":  # a state the history never estimated
            for name in (n for n in after if n not in before):
                differ(f"states.{name}", "added", f"states.{name} added")
    return differences
