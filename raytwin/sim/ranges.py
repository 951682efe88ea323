"""The values a run may give a model: parameters within their bounds, inputs and start states within their
plausible ranges. Shared by sweeps (`sweeps.spec.range_problems`) and the array entry points
(`raytwin.sim.integrate.simulate`), so a what-if is refused with the same words wherever it is asked."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from raytwin.sim.model import Model, ModelCheckError


@dataclass(frozen=True)
class Allowed:
    """The values one parameter (its bounds), input or state (its plausible range) may take."""

    name: str
    lower: float
    upper: float
    unit: str
    kind: str

    def __contains__(self, value: float) -> bool:
        return self.lower <= value <= self.upper

    @property
    def unit_text(self) -> str:
        return f" {self.unit}" if self.unit not in ("", "-") else ""

    def __str__(self) -> str:
        return f"{self.name}'s {self.kind} [{self.lower:g}, {self.upper:g}]{self.unit_text}"


def allowed_values(params: Mapping[str, Any], inputs: Mapping[str, Any], states: Mapping[str, Any]
                   ) -> dict[str, dict[str, Allowed]]:
    """Per target, the values a run may give each name: a parameter's bounds, an input's or a state's
    plausible range (declarations by name, with ``lower``, ``upper`` and ``unit``)."""
    return {target: {n: Allowed(n, v.lower, v.upper, v.unit, kind) for n, v in declared.items()}
            for target, declared, kind in (("param", params, "bounds"), ("input", inputs, "plausible range"),
                                           ("state", states, "plausible range"))}


def outside(field: str, allowed: Mapping[str, Allowed], given: Mapping[str, float]) -> list[str]:
    """'field.name=value outside name's plausible range [lower, upper] unit' for each given value that is."""
    return [f"{field}.{name}={value:g} outside {allowed[name]}"
            for name, value in given.items() if name in allowed and value not in allowed[name]]


def check_ranges(model: Model, x0: np.ndarray, inputs: np.ndarray) -> None:
    """Refuse start states (last axis: the model's states) and inputs (last axis: its inputs) outside their
    plausible ranges: a start of 1e5 K or a heater of 1 MW is a typo, and its trajectory would look like
    a result. Each column's finite extremes are checked (NaN and inf: `check_start`, `check_step`)."""
    allowed = allowed_values({}, {v.name: v for v in model.inputs}, {v.name: v for v in model.states})
    problems = []
    for field, target, values, names in (("x0", "state", x0, model.state_names),
                                         ("inputs", "input", inputs, model.input_names)):
        if not names:
            continue
        columns = np.asarray(values, dtype=np.float64).reshape(-1, len(names))
        finite = np.where(np.isfinite(columns), columns, np.nan)  # NaN and inf are refused as such by the step check
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an empty or all-NaN column: no extremes
            extremes = (np.nanmin(finite, axis=0, initial=np.inf), np.nanmax(finite, axis=0, initial=-np.inf))
        for row in extremes:
            problems += outside(field, allowed[target], {n: v for n, v in zip(names, row) if np.isfinite(v)})
    if problems:
        raise ModelCheckError(model.name, "values", "; ".join(dict.fromkeys(problems)) + ": give values within "
                              "them (or allow_implausible=True if the model is valid beyond its declared ranges)")
