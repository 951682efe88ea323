"""State mappings that move a twin from one asset type version to another.

A migration names, for each state of the target version, where its value comes from: a state of
the source version (``{"from": "T"}``, converted between the two simulators' units) or a value
(``{"value": 20.0, "unit": "degC"}``). A target state left out takes the source state of the same
name, if there is one. `plan_migration` checks the mapping as a whole and reports every problem at
once; a plan is *invertible* when every target state comes from a distinct source state and every
source state is used, and then `MigrationPlan.inverse` is the mapping that moves the twin back.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from raytwin import units
from raytwin.contracts import AssetType, SemVer, implausible_states
from raytwin.fields import Contract, Finite, Unit


class MigrationError(ValueError):
    """A state mapping that does not fit its two versions."""


class FromState(Contract):
    from_: Annotated[str, Field(alias="from", description="A state of the source version")]

    model_config = {**Contract.model_config, "populate_by_name": True, "serialize_by_alias": True}


class FixedValue(Contract):
    value: Finite
    unit: Unit


StateSource = FromState | FixedValue


class MigrationRequest(Contract):
    """Move an asset and its twin to another version of its type."""

    type_version: SemVer
    states: dict[str, StateSource] = Field(
        default_factory=dict,
        description="Target state -> its source: {\"from\": \"<source state>\"} or {\"value\": v, \"unit\": u}; "
                    "a target state left out takes the source state of the same name")


class MigrationPlan(Contract):
    """A checked mapping: for each target state, its source state or fixed value, in target units."""

    sources: dict[str, str | float]
    """Target state -> source state name, or a value already in the target unit."""
    source_units: dict[str, Unit]
    target_units: dict[str, Unit]

    def apply(self, state: dict[str, float]) -> dict[str, float]:
        """The target state for a source state (values converted to the target units)."""
        return {t: (units.to_unit(state[s], self.source_units[s], self.target_units[t]) if isinstance(s, str) else s)
                for t, s in self.sources.items()}

    def apply_std(self, std: dict[str, float]) -> dict[str, float]:
        """Standard deviations of the mapped states (a scale, no offset: 1 K of spread is 1 degC);
        fixed values get none (the target model's prior)."""
        out = {}
        for t, s in self.sources.items():
            if isinstance(s, str):
                src, dst = units.unit_def(self.source_units[s]), units.unit_def(self.target_units[t])
                out[t] = std[s] * src.scale / dst.scale
        return out

    @property
    def invertible(self) -> bool:
        named = [s for s in self.sources.values() if isinstance(s, str)]
        return len(named) == len(self.sources) and set(named) == set(self.source_units) and len(set(named)) == len(named)

    def inverse(self) -> dict[str, FromState] | None:
        """The mapping that moves a twin back (None when the plan is not invertible)."""
        if not self.invertible:
            return None
        return {s: FromState(from_=t) for t, s in self.sources.items()}  # type: ignore[misc]


def plan_migration(source_units: dict[str, str], target_units: dict[str, str],
                   states: dict[str, StateSource], target_type: AssetType | None = None) -> MigrationPlan:
    """Check `states` (target state -> source) against the two versions' state units (of their
    simulators: what a twin's state is in) and fixed values against the plausible ranges of
    `target_type`; `MigrationError` lists every problem and its fix."""
    problems: list[str] = []
    if unknown := sorted(set(states) - set(target_units)):
        problems.append(f"states {unknown} are not states of the target version (its states: {sorted(target_units)})")
    sources: dict[str, str | float] = {}
    for target, unit in target_units.items():
        given = states.get(target)
        if given is None:
            if target in source_units:
                given = FromState(from_=target)  # type: ignore[call-arg]
            else:
                problems.append(f"target state {target!r} has no source: map it with {{\"from\": \"<source state>\"}} "
                                f"(one of {sorted(source_units)}) or give {{\"value\": ..., \"unit\": ...}}")
                continue
        if isinstance(given, FromState):
            name = given.from_
            if name not in source_units:
                problems.append(f"{target}: source state {name!r} does not exist (source states: "
                                f"{sorted(source_units)})")
            elif units.dimension(source_units[name]) != units.dimension(unit):
                problems.append(f"{target}: cannot convert {name} [{source_units[name]}] to [{unit}] "
                                f"({units.canonical(source_units[name])} is not {units.canonical(unit)})")
            else:
                sources[target] = name
        else:
            try:
                sources[target] = units.to_unit(given.value, given.unit, unit)
            except units.UnitError as exc:
                problems.append(f"{target}: {exc}")
    if target_type is not None:
        fixed = {t: v for t, v in sources.items() if not isinstance(v, str)}
        problems += implausible_states(fixed, target_units, target_type, "states")
    if problems:
        raise MigrationError("state mapping refused: " + "; ".join(problems))
    return MigrationPlan(sources=sources, source_units=source_units, target_units=target_units)
