"""Scenario metrics declared as data: summaries of any state, input or output over a horizon.

A `Metric` compiles (`metric_functions`) into the same three pure JAX functions a hand-written
`CustomMetric` has, ``init`` / ``update`` / ``finalize``, which a sweep folds step by step into
its scan carry, so no trajectory is kept. Extremes of states include the start state; other
metrics see the end of each step (states, outputs) or the input held over it; durations count
the steps taken.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from raytwin import units
from raytwin.fields import Contract, Finite
from raytwin.signals import Params, Value

MetricKind = Literal["min", "max", "mean", "final", "integral", "time_above", "time_below", "time_outside"]


class Metric(Contract):
    """A summary of one variable (state, input or output, by name) over the horizon.

    ``integral`` is the sum of value x step (``absolute``: of |value|); ``time_above`` /
    ``time_below`` count the time with a value above / below `threshold` (with several names in
    `of`: any of them), ``time_outside`` outside [`low`, `high`]. `scale` multiplies the result
    (a unit conversion: 1/3.6e6 for J -> kWh).
    """

    name: Annotated[str, Field(min_length=1)]
    kind: MetricKind
    of: Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)]
    threshold: Value | None = None
    low: Value | None = None
    high: Value | None = None
    absolute: bool = False
    scale: Finite = 1.0
    unit: str = ""
    description: str = ""

    @property
    def variables(self) -> list[str]:
        return [self.of] if isinstance(self.of, str) else list(self.of)

    @model_validator(mode="after")
    def _consistent(self) -> Metric:
        timed = self.kind in ("time_above", "time_below")
        if timed != (self.threshold is not None):
            raise ValueError(f"metric {self.name}: threshold is for time_above/time_below (and needed there)")
        if (self.kind == "time_outside") != (self.low is not None and self.high is not None):
            raise ValueError(f"metric {self.name}: low and high are for time_outside (and needed there)")
        if len(self.variables) > 1 and not self.kind.startswith("time_"):
            raise ValueError(f"metric {self.name}: {self.kind} takes one variable, got {self.variables}")
        return self

    def references(self) -> set[str]:
        """Parameter names this metric uses."""
        return {v for v in (self.threshold, self.low, self.high) if isinstance(v, str)}

    def unit_problem(self, variable_unit: str) -> str | None:
        """Why `unit` does not label the value (that of a variable in `variable_unit`, over time for an integral,
        seconds for a duration, times `scale`), or None: an integral of W labelled kWh without
        ``scale=1/3.6e6`` reported joules as kWh. Units RayTwin cannot read are not judged."""
        value_unit = "s" if self.kind.startswith("time_") else (
            (f"{variable_unit}*s" if variable_unit.isalnum() else f"({variable_unit})*s") if self.kind == "integral"
            else variable_unit)
        if not (self.unit and units.is_unit(self.unit) and units.is_unit(value_unit)):
            return None
        try:
            offset, factor = (units.to_unit(v, value_unit, self.unit) for v in (0.0, 1.0))
        except units.UnitError as exc:
            return f"metric {self.name}: unit {self.unit!r} does not label its value: {exc}"
        if offset != 0.0:
            return (f"metric {self.name}: its value is in {value_unit}; {self.unit} is offset from it, which scale "
                    f"cannot give: label it {value_unit}")
        if math.isclose(factor, self.scale, rel_tol=1e-9):
            return None
        return (f"metric {self.name}: its value is in {value_unit} times scale {self.scale:g}, not {self.unit}: "
                f"give scale={factor:.10g} for {self.unit}, or the unit of the scaled value")


@dataclass(frozen=True)
class CustomMetric:
    """A metric in JAX: ``init(x0, params) -> acc``, ``update(acc, values, params, dt) -> acc`` (values:
    every state, input and output after the step, by name), ``finalize(acc, dt) -> value``."""

    name: str
    init: Callable[[dict[str, Any], Params], Any]
    update: Callable[[Any, dict[str, Any], Params, Any], Any]
    finalize: Callable[[Any, Any], Any]
    unit: str = ""
    description: str = ""


def _value(v: Value | None, ip: Params) -> Any:
    return ip[v] if isinstance(v, str) else v


def metric_functions(m: Metric, state_names: Iterable[str], horizon_s: float | None) -> CustomMetric:
    """A data `Metric` as init / update / finalize JAX functions (`state_names`: whose extremes include
    the start state; a mean needs `horizon_s`)."""
    import jax.numpy as jnp

    names, scale, states = m.variables, m.scale, set(state_names)

    def scaled(a):
        return a if scale == 1.0 else a * scale

    if m.kind in ("min", "max", "final"):
        fold = {"min": jnp.minimum, "max": jnp.maximum, "final": lambda a, b: b}[m.kind]
        start = {"min": jnp.inf, "max": -jnp.inf, "final": 0.0}[m.kind]  # `final` is overwritten at the first step

        def first(x0, ip):  # extremes of a state include the start state
            like = next(iter(x0.values()))
            return x0[names[0]] if names[0] in states and m.kind != "final" else jnp.full_like(like, start)
        return CustomMetric(m.name, first, lambda a, now, ip, dt: fold(a, now[names[0]]), lambda a, dt: scaled(a),
                            m.unit, m.description)

    def zero(x0, ip):
        return jnp.zeros_like(next(iter(x0.values())))

    if m.kind in ("integral", "mean"):
        if m.kind == "mean" and horizon_s is None:
            raise ValueError(f"metric {m.name}: a mean needs the horizon: compile it with horizon_s")
        per = 1.0 if m.kind == "integral" else 1.0 / horizon_s

        def integrate(a, now, ip, dt):
            value = now[names[0]]
            return a + (jnp.abs(value) if m.absolute else value) * dt
        return CustomMetric(m.name, zero, integrate, lambda a, dt: scaled(a if per == 1.0 else a * per),
                            m.unit, m.description)

    def hit(now, ip):
        vals = [now[n] for n in names]
        if m.kind == "time_above":
            flags = [x > _value(m.threshold, ip) for x in vals]
        elif m.kind == "time_below":
            flags = [x < _value(m.threshold, ip) for x in vals]
        else:
            flags = [(x < _value(m.low, ip)) | (x > _value(m.high, ip)) for x in vals]
        return functools.reduce(jnp.logical_or, flags)

    return CustomMetric(m.name, zero, lambda a, now, ip, dt: a + hit(now, ip).astype(a.dtype),
                        lambda a, dt: scaled(a * dt), m.unit, m.description)
