"""Sweep kits: a model's scenario inputs and summary metrics, declared as data.

A `Kit` says, for one model, how each input is generated *inside* the scan from a few named
per-scenario parameters (so no input arrays are stored or transferred) and which summary metrics
are folded step by step into the scan carry (so no trajectory is kept). `Kit.compile` turns it
into a `SweepKit`: the four pure, elementwise JAX functions the engine fuses with the RK4 step,
the same form a hand-written kit has, so `vmap` batches it and XLA fuses it into one kernel.

- inputs: the signals of `raytwin.signals` (the family the HTTP API's scenarios use too: constant,
  sinusoid, schedule, step, square, piecewise-linear, seeded random walk and levels, series,
  proportional feedback on a state), or any JAX function ``fn(t, state, params) -> value``
  (`state`, `params`: dicts by name);
- metrics: `raytwin.scenario_metrics.Metric` (min, max, mean, final, integral, time above / below /
  outside thresholds over any state, input or output by name), or a `CustomMetric` of JAX functions.

A signal's numeric field is a number or the name of a kit parameter (`Kit.parameters`): those
names are what ``SweepSpec.inputs`` sets and scenario-space dimensions with ``target="input"``
sweep. Random signals and series depend on time only and are shared by all scenarios (give each
random signal of a kit its own `seed`).

Models without a registered kit get `Kit.generic`: each input held at its declared nominal
(a sweepable parameter named after the input) and the min, max and final value of each state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field, model_validator

from raytwin import units
from raytwin.fields import Contract, Finite
from raytwin.scenario_metrics import CustomMetric, Metric, metric_functions
from raytwin.signals import CLOCK_INPUT, SIGNAL, WEEK_S, Constant, Params, Proportional, signal_function
from raytwin.sim import Model
from sweeps.space import Dimension


class KitParameter(Contract):
    """A named, sweepable value used by the kit's signals or metric thresholds. `lower` and `upper`
    bound the plausible values (a setpoint: those of the state it controls): a sweep that sets one
    outside them is refused, since its results would look like valid data."""

    default: Finite
    unit: str = ""
    description: str = ""
    lower: float = -math.inf
    upper: float = math.inf

    @model_validator(mode="after")
    def _ordered(self) -> KitParameter:
        if not self.lower <= self.upper:
            raise ValueError(f"need lower <= upper, got [{self.lower}, {self.upper}]")
        return self


CLOCK_PARAMETER = KitParameter(
    default=0.0, unit="s", lower=0.0, upper=WEEK_S,
    description="seconds from the Monday 00:00 UTC before t = 0 to it, where signals with clock: true start: set "
                "from a sweep's start_time (or given, or swept, without one)")
"""Declared by every kit with a clock signal (`raytwin.signals.CLOCK_INPUT`)."""


@dataclass(frozen=True)
class Quantity:
    name: str
    unit: str
    description: str


@dataclass(frozen=True, eq=False)
class SweepKit:
    """The compiled form the engine runs (`Kit.compile`, or written by hand).

    ``inputs(t, x, ip)`` gives the model inputs at time t in state x; ``init(x0, ip)`` the
    accumulator; ``update(acc, x_next, u, coeffs, ip, dt)`` folds one step; ``finalize(acc, dt)``
    the metrics in `metrics` order.
    """

    model: Model
    input_params: dict[str, tuple[float, str, str]]  # name -> (default, unit, description)
    start_state: dict[str, float]
    metrics: tuple[Quantity, ...]
    inputs: Callable[[Any, tuple, Params], tuple]
    init: Callable[[tuple, Params], tuple]
    update: Callable[[tuple, tuple, tuple, tuple, Params, Any], tuple]
    finalize: Callable[[tuple, Any], tuple]

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics)

    def default_inputs(self) -> dict[str, float]:
        return {k: v[0] for k, v in self.input_params.items()}


class ExampleSweep(Contract):
    """A starting point for ``raytwin sweep example``: horizon, step and scenario dimensions."""

    horizon_s: Annotated[Finite, Field(gt=0)]
    step_s: Annotated[Finite, Field(gt=0)]
    dimensions: Annotated[list[Dimension], Field(min_length=1)]


SCENARIO_COLUMNS = ("scenario", "diverged")
"""Columns of a sweep's output beside its metrics (`sweeps.runner`, `sweeps.engine.DIVERGED`). A metric of either
name replaced the column (a metric `scenario` the scenario indices), and a dotted name is a dimension's column
(`param.C_in`) that `quantiles` leaves out of the metrics."""


@dataclass(frozen=True, eq=False)
class Kit:
    """A model's sweep inputs and metrics as data (see the module docstring).

    `inputs` maps every model input to a signal (or a JAX `raytwin.signals.InputFn`); `start_state` defaults to
    the states' declared nominal values; `example` and `excitation` (open-loop signals that make
    the parameters identifiable, for synthetic telemetry) are optional, with generic fallbacks
    derived from the model's declaration (`example_sweep`, `sweeps.synthetic.excitation`).
    """

    model: Model
    inputs: Mapping[str, Any]
    metrics: tuple[Metric | CustomMetric, ...]
    parameters: Mapping[str, KitParameter] = field(default_factory=dict)
    start_state: Mapping[str, float] | None = None
    example: ExampleSweep | None = None
    excitation: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        name = f"kit for {self.model.name}"
        inputs = {k: v if callable(v) else SIGNAL.validate_python(v) for k, v in self.inputs.items()}
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "metrics", tuple(m if isinstance(m, CustomMetric) else Metric.model_validate(m)
                                                  for m in self.metrics))
        parameters = {k: KitParameter.model_validate(v) for k, v in self.parameters.items()}
        if any(getattr(sig, "clock", False) for sig in inputs.values()):
            parameters.setdefault(CLOCK_INPUT, CLOCK_PARAMETER)
        object.__setattr__(self, "parameters", parameters)
        if set(inputs) != set(self.model.input_names):
            raise ValueError(f"{name}: inputs must give exactly {list(self.model.input_names)}, got {sorted(inputs)}")
        declared = {v.name: v for v in (*self.model.states, *self.model.inputs, *self.model.outputs)}
        known = set(declared)
        used: set[str] = set()
        for var in self.model.inputs:
            sig = inputs[var.name]
            if isinstance(sig, Proportional) and sig.state not in self.model.state_names:
                raise ValueError(f"{name}: input {var.name}: unknown state {sig.state!r}")
            if not callable(sig) and sig.unit is not None and units.canonical(sig.unit) != units.canonical(var.unit):
                raise ValueError(f"{name}: input {var.name}: unit {sig.unit!r} is not {var.unit!r}")
            used |= set() if callable(sig) else sig.references()
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"{name}: duplicate metric names {names}")
        if clashing := [n for n in names if n in SCENARIO_COLUMNS or "." in n]:
            raise ValueError(f"{name}: metric name(s) {clashing} would clash with the output's columns "
                             f"{list(SCENARIO_COLUMNS)} and a dimension's (param.NAME, ...): rename them")
        for m in self.metrics:
            if isinstance(m, Metric):
                unknown = [v for v in m.variables if v not in known]
                if unknown:
                    raise ValueError(f"{name}: metric {m.name}: unknown variable(s) {unknown}; known: {sorted(known)}")
                if problem := m.unit_problem(declared[m.variables[0]].unit):
                    raise ValueError(f"{name}: {problem}")
                used |= m.references()
        missing = used - set(self.parameters)
        if missing:
            raise ValueError(f"{name}: undeclared parameter(s) {sorted(missing)}; declare them in parameters "
                             "(in a SweepSpec: give their values in inputs)")
        if self.excitation is not None:
            signals = {k: SIGNAL.validate_python(v) for k, v in self.excitation.items()}
            object.__setattr__(self, "excitation", signals)
            if set(signals) != set(self.model.input_names):
                raise ValueError(f"{name}: excitation must give exactly {list(self.model.input_names)}")
            if any(isinstance(s, Proportional) or s.references() for s in signals.values()):
                raise ValueError(f"{name}: excitation signals are open loop, with numbers (no state, no parameters)")
        if self.start_state is not None and set(self.start_state) != set(self.model.state_names):
            raise ValueError(f"{name}: start_state must give exactly {list(self.model.state_names)}")
        if self.start_state is None and any(s.nominal is None for s in self.model.states):
            raise ValueError(f"{name}: give start_state (not every state declares a nominal value)")

    @classmethod
    def generic(cls, model: Model) -> Kit:
        """Inputs held at their nominal values (one sweepable parameter per input, named after it, with
        the input's plausible range); metrics: min, max and final value of each state."""
        held = {i.name: KitParameter(default=0.0 if i.nominal is None else i.nominal, unit=i.unit,
                                     description=f"{i.description} (held)", lower=i.lower, upper=i.upper)
                for i in model.inputs}
        metrics = tuple(Metric(name=f"{s.name}_{kind}", kind=kind, of=s.name, unit=s.unit)
                        for s in model.states for kind in ("min", "max", "final"))
        return cls(model, {name: Constant(value=name) for name in held}, metrics, held)

    @property
    def states0(self) -> dict[str, float]:
        if self.start_state is not None:
            return dict(self.start_state)
        return {s.name: float(s.nominal) for s in self.model.states}

    def default_inputs(self) -> dict[str, float]:
        return {k: p.default for k, p in self.parameters.items()}

    def compile(self, horizon_s: float | None = None, step_s: float | None = None) -> SweepKit:
        """The engine's `SweepKit` (cached per kit, horizon and step; random signals and means need
        the horizon, series of per-step values the step)."""
        return _compiled(self, horizon_s, step_s)


@functools.cache
def _compiled(kit: Kit, horizon_s: float | None, step_s: float | None) -> SweepKit:
    model = kit.model
    evaluators = [signal_function(kit.inputs[v.name], horizon_s=horizon_s, step_s=step_s, unit=v.unit)
                  for v in model.inputs]
    metrics = [m if isinstance(m, CustomMetric) else metric_functions(m, model.state_names, horizon_s)
               for m in kit.metrics]

    def inputs(t, x, ip):
        state = dict(zip(model.state_names, x))
        return tuple(f(t, state, ip) for f in evaluators)

    def values(x, u, coeffs):
        out = dict(zip(model.output_names, model.output(x, u, coeffs)))
        return {**out, **dict(zip(model.input_names, u)), **dict(zip(model.state_names, x))}

    def init(x0, ip):
        return tuple(m.init(dict(zip(model.state_names, x0)), ip) for m in metrics)

    def update(acc, x_next, u, coeffs, ip, dt):
        now = values(x_next, u, coeffs)
        return tuple(m.update(a, now, ip, dt) for m, a in zip(metrics, acc))

    def finalize(acc, dt):
        return tuple(m.finalize(a, dt) for m, a in zip(metrics, acc))

    return SweepKit(
        model=model,
        input_params={k: (p.default, p.unit, p.description) for k, p in kit.parameters.items()},
        start_state=kit.states0,
        metrics=tuple(Quantity(m.name, m.unit, m.description) for m in kit.metrics),
        inputs=inputs, init=init, update=update, finalize=finalize,
    )


_KITS: dict[str, Kit] = {}


def register_kit(kit: Kit) -> Kit:
    """Make `kit` the sweep kit of its model (a model package calls this next to its model)."""
    _KITS[kit.model.name] = kit
    return kit


def kit_for(model: Model) -> Kit:
    """The kit registered for `model`, or `Kit.generic(model)`."""
    import sweeps.reference_kits  # noqa: F401  (registers the reference models' kits)

    registered = _KITS.get(model.name)
    return registered if registered is not None and registered.model is model else Kit.generic(model)


def example_sweep(kit: Kit) -> ExampleSweep:
    """The kit's own example, or one derived from the model: 1,000 default steps; the first three
    parameters and the nonzero kit parameters (up to three) scaled by 0.7..1.3, within their bounds and
    plausible ranges (a temperature of 283 K in [230, 330] K by 0.81..1.17: 0.7 was refused by the example's own
    check); a value the range leaves no room to scale is not swept."""
    if kit.example is not None:
        return kit.example
    dims = [Dimension(name=p.name, target="param", mode="scale", low=r[0], high=r[1]) for p in kit.model.params[:3]
            if (r := _example_scales(p.default, p.lower, p.upper)) is not None]
    dims += [Dimension(name=k, target="input", mode="scale", low=r[0], high=r[1]) for k, p in kit.parameters.items()
             if (r := _example_scales(p.default, p.lower, p.upper)) is not None][:3]
    return ExampleSweep(horizon_s=1000 * kit.model.default_dt, step_s=kit.model.default_dt, dimensions=dims)


def _example_scales(default: float, lower: float, upper: float) -> tuple[float, float] | None:
    """0.7..1.3 of `default`, narrowed to the scales that keep it within [lower, upper] (rounded inwards to 4
    decimals); None for 0 or where no room is left."""
    if default == 0.0:
        return None
    ends = sorted(b / default for b in (lower, upper))
    low, high = math.ceil(max(0.7, ends[0]) * 1e4) / 1e4, math.floor(min(1.3, ends[1]) * 1e4) / 1e4
    return (low, high) if low < high else None

