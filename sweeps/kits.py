"""Sweep kits: a model's scenario inputs and summary metrics, declared as data.

A `Kit` says, for one model, how each input is generated *inside* the scan from a few named
per-scenario parameters (so no input arrays are stored or transferred) and which summary metrics
are folded step by step into the scan carry (so no trajectory is kept). `Kit.compile` turns it
into a `SweepKit`: the four pure, elementwise JAX functions the engine fuses with the RK4 step,
the same form a hand-written kit has, so `vmap` batches it and XLA fuses it into one kernel.

- inputs: `Constant`, `Sinusoid`, `DailySchedule`, `Step`, `Square`, `PiecewiseLinear`, `RandomWalk`,
  `RandomLevels`, `Series` (a Parquet column), `Proportional` (a saturated P-controller on a
  state), or any JAX function ``fn(t, state, params) -> value`` (`state`, `params`: dicts by name);
- metrics: `Metric` of kind min, max, mean, final, integral, time_above, time_below or
  time_outside over any state, input or output by name, or a `CustomMetric` of JAX functions.

A signal's numeric field is a number or the name of a kit parameter (`Kit.parameters`): those
names are what ``SweepSpec.inputs`` sets and scenario-space dimensions with ``target="input"``
sweep. Random signals and series depend on time only and are shared by all scenarios (give each
random signal of a kit its own `seed`).
Extremes of states include the start state; other metrics see the end of each step (states,
outputs) or the input held over it; durations count the steps taken.

Models without a registered kit get `Kit.generic`: each input held at its declared nominal
(a sweepable parameter named after the input) and the min, max and final value of each state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import jax.numpy as jnp
import numpy as np
from pydantic import Field, TypeAdapter, model_validator

from raytwin.contracts import Contract, Finite
from raytwin.sim import Model
from sweeps.space import Dimension

Params = dict[str, Any]  # kit parameters of one scenario, by name
Value = Finite | str
"""A number, or the name of a kit parameter (set per sweep and sweepable per scenario)."""
TWO_PI = 2.0 * math.pi
DAY_S = 86400.0


class KitParameter(Contract):
    """A named, sweepable value used by the kit's signals or metric thresholds."""

    default: Finite
    unit: str = ""
    description: str = ""


class _Signal(Contract):
    """Common to every signal: optional saturation to [`lower`, `upper`] after evaluation."""

    VALUES: ClassVar[tuple[str, ...]] = ()
    """The fields that take a `Value` (a number or a kit parameter's name), besides the bounds."""

    lower: Value | None = None
    upper: Value | None = None

    def references(self) -> set[str]:
        """Kit parameter names this signal uses."""
        return {v for f in (*self.VALUES, "lower", "upper") if isinstance(v := getattr(self, f), str)}

    def table(self, horizon_s: float, offset: int) -> np.ndarray | None:
        """Values per `hold_s` for signals that are precomputed (random ones, drawn from the seed
        ``seed + offset``: synthetic data sets offset it), else None."""
        return None


class Constant(_Signal):
    VALUES = ("value",)
    kind: Literal["constant"] = "constant"
    value: Value


class Sinusoid(_Signal):
    """``mean + amplitude sin(2 pi (t + phase_s) / period_s)``; a half-sine with ``lower=0, mean=0``."""

    VALUES = ("mean", "amplitude")
    kind: Literal["sinusoid"] = "sinusoid"
    mean: Value = 0.0
    amplitude: Value
    period_s: Annotated[Finite, Field(gt=0)] = DAY_S
    phase_s: Finite = 0.0


class DailySchedule(_Signal):
    """Piecewise constant within each day: `values[i]` from `starts_s[i]` (seconds after midnight)."""

    kind: Literal["daily_schedule"] = "daily_schedule"
    starts_s: Annotated[list[Finite], Field(min_length=1)]
    values: Annotated[list[Value], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> DailySchedule:
        if len(self.starts_s) != len(self.values):
            raise ValueError("daily_schedule: starts_s and values must have the same length")
        if self.starts_s[0] != 0.0 or any(b <= a for a, b in zip(self.starts_s, self.starts_s[1:])):
            raise ValueError("daily_schedule: starts_s must begin at 0 and increase strictly")
        if self.starts_s[-1] >= DAY_S:
            raise ValueError("daily_schedule: starts_s must lie within one day (< 86400 s)")
        return self

    def references(self) -> set[str]:
        return {v for v in self.values if isinstance(v, str)} | super().references()


class Step(_Signal):
    """`before` until `at_s`, `after` from then on."""

    VALUES = ("before", "after", "at_s")
    kind: Literal["step"] = "step"
    before: Value
    after: Value
    at_s: Value


class Square(_Signal):
    """`high` for the first `duty` fraction of each period (from t = `phase_s`), `low` otherwise:
    load pulses, on/off schedules."""

    VALUES = ("low", "high", "period_s", "duty")
    kind: Literal["square"] = "square"
    low: Value = 0.0
    high: Value
    period_s: Value
    duty: Value = 0.5
    phase_s: Finite = 0.0


class PiecewiseLinear(_Signal):
    """Linear interpolation between (`times_s`, `values`), held constant beyond the ends."""

    kind: Literal["piecewise_linear"] = "piecewise_linear"
    times_s: Annotated[list[Finite], Field(min_length=1)]
    values: Annotated[list[Finite], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> PiecewiseLinear:
        if len(self.times_s) != len(self.values):
            raise ValueError("piecewise_linear: times_s and values must have the same length")
        if any(b <= a for a, b in zip(self.times_s, self.times_s[1:])):
            raise ValueError("piecewise_linear: times_s must increase strictly")
        return self


class RandomWalk(_Signal):
    """A seeded Gaussian random walk from `start`, one step of std `step_std` every `hold_s`
    (held in between), saturated to [`lower`, `upper`] at every step."""

    kind: Literal["random_walk"] = "random_walk"
    start: Finite
    step_std: Annotated[Finite, Field(ge=0)]
    hold_s: Annotated[Finite, Field(gt=0)]
    seed: Annotated[int, Field(ge=0)] = 0

    def table(self, horizon_s: float, offset: int) -> np.ndarray:
        steps = np.random.default_rng(self.seed + offset).normal(0.0, self.step_std, _levels(horizon_s, self.hold_s))
        steps[0] = 0.0
        low = -np.inf if self.lower is None else self.lower
        high = np.inf if self.upper is None else self.upper
        values, level = np.empty_like(steps), self.start
        for i, s in enumerate(steps):
            level = min(max(level + s, low), high)
            values[i] = level
        return values


class RandomLevels(_Signal):
    """Seeded random levels held for `hold_s` each: uniform in [`low`, `high`], or drawn from `levels`."""

    kind: Literal["random_levels"] = "random_levels"
    hold_s: Annotated[Finite, Field(gt=0)]
    low: Finite | None = None
    high: Finite | None = None
    levels: Annotated[list[Finite], Field(min_length=1)] | None = None
    seed: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _range(self) -> RandomLevels:
        if (self.levels is None) == (self.low is None or self.high is None):
            raise ValueError("random_levels: give either low and high, or levels")
        if self.levels is None and not self.low <= self.high:
            raise ValueError(f"random_levels: low {self.low} > high {self.high}")
        return self

    def table(self, horizon_s: float, offset: int) -> np.ndarray:
        rng, n = np.random.default_rng(self.seed + offset), _levels(horizon_s, self.hold_s)
        if self.levels is not None:
            return rng.choice(np.asarray(self.levels, dtype=np.float64), size=n)
        return rng.uniform(self.low, self.high, size=n)


class Series(_Signal):
    """A recorded time series: column `column` of the Parquet file `path` (an fsspec URL or path)
    against its `time_column` [s], linearly interpolated at each step and held beyond the ends."""

    kind: Literal["series"] = "series"
    path: Annotated[str, Field(min_length=1)]
    column: Annotated[str, Field(min_length=1)]
    time_column: str = "t_s"

    @functools.cached_property
    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """(times, values) read once from the file."""
        import pyarrow.parquet as pq

        from raytwin.storage import filesystem

        fs, path = filesystem(self.path, None)
        table = pq.read_table(path, columns=[self.time_column, self.column], filesystem=fs)
        t, v = (table[c].to_numpy().astype(np.float64) for c in (self.time_column, self.column))
        if t.size == 0 or np.any(np.diff(t) <= 0) or not np.all(np.isfinite(v)):
            raise ValueError(f"series {self.path}:{self.column}: needs increasing times and finite values")
        return t, v


class Proportional(_Signal):
    """Feedback: ``gain (setpoint - state)`` at the start of each step, e.g. a thermostat
    (saturate it with `lower` / `upper`, e.g. 0 and the heater's capacity)."""

    VALUES = ("setpoint", "gain")
    kind: Literal["proportional"] = "proportional"
    state: Annotated[str, Field(min_length=1)]
    setpoint: Value
    gain: Value


Signal = Annotated[
    Constant | Sinusoid | DailySchedule | Step | Square | PiecewiseLinear | RandomWalk | RandomLevels | Series
    | Proportional,
    Field(discriminator="kind"),
]
InputFn = Callable[[Any, dict[str, Any], Params], Any]
"""A custom input: ``fn(t, state, params) -> value`` in JAX (states and kit parameters by name)."""
SIGNAL = TypeAdapter(Signal)


def _levels(horizon_s: float, hold_s: float) -> int:
    return int(math.floor(horizon_s / hold_s)) + 1


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
        return {v for v in (self.threshold, self.low, self.high) if isinstance(v, str)}


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


@dataclass(frozen=True, eq=False)
class Kit:
    """A model's sweep inputs and metrics as data (see the module docstring).

    `inputs` maps every model input to a signal (or a JAX `InputFn`); `start_state` defaults to
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
        object.__setattr__(self, "parameters", {k: KitParameter.model_validate(v) for k, v in self.parameters.items()})
        if set(inputs) != set(self.model.input_names):
            raise ValueError(f"{name}: inputs must give exactly {list(self.model.input_names)}, got {sorted(inputs)}")
        known = set(self.model.state_names) | set(self.model.input_names) | set(self.model.output_names)
        used: set[str] = set()
        for key, sig in inputs.items():
            if isinstance(sig, Proportional) and sig.state not in self.model.state_names:
                raise ValueError(f"{name}: input {key}: unknown state {sig.state!r}")
            used |= set() if callable(sig) else sig.references()
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"{name}: duplicate metric names {names}")
        for m in self.metrics:
            if isinstance(m, Metric):
                unknown = [v for v in m.variables if v not in known]
                if unknown:
                    raise ValueError(f"{name}: metric {m.name}: unknown variable(s) {unknown}; known: {sorted(known)}")
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
        """Inputs held at their nominal values (one sweepable parameter per input, named after it);
        metrics: min, max and final value of each state."""
        held = {i.name: KitParameter(default=0.0 if i.nominal is None else i.nominal, unit=i.unit,
                                     description=f"{i.description} (held)") for i in model.inputs}
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

    def compile(self, horizon_s: float | None = None) -> SweepKit:
        """The engine's `SweepKit` (cached per kit and horizon; random signals need the horizon)."""
        return _compiled(self, horizon_s)


@functools.cache
def _compiled(kit: Kit, horizon_s: float | None) -> SweepKit:
    model = kit.model
    evaluators = [signal_function(kit.inputs[n], horizon_s) for n in model.input_names]
    metrics = [m if isinstance(m, CustomMetric) else _builtin(model, m, horizon_s) for m in kit.metrics]

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


def _value(v: Value | None, ip: Params):
    return ip[v] if isinstance(v, str) else v


def signal_function(sig: Any, horizon_s: float | None, offset: int = 0) -> InputFn:
    """``f(t, state, ip)`` for one signal, saturated to its bounds; works on a scalar or vector `t`."""
    if callable(sig):
        return sig
    raw = _raw(sig, horizon_s, offset)
    if sig.lower is None and sig.upper is None:
        return raw
    return lambda t, x, ip: jnp.clip(raw(t, x, ip), _value(sig.lower, ip), _value(sig.upper, ip))


def _raw(sig: Any, horizon_s: float | None, offset: int) -> InputFn:
    v = _value
    if isinstance(sig, Constant):
        return lambda t, x, ip: jnp.zeros_like(t) + v(sig.value, ip)
    if isinstance(sig, Sinusoid):
        omega, zero_mean = TWO_PI / sig.period_s, sig.mean == 0.0

        def sinusoid(t, x, ip):
            wave = v(sig.amplitude, ip) * jnp.sin(omega * (t + sig.phase_s))
            return wave if zero_mean else v(sig.mean, ip) + wave
        return sinusoid
    if isinstance(sig, DailySchedule):
        starts = np.asarray(sig.starts_s)

        def schedule(t, x, ip):
            idx = jnp.searchsorted(jnp.asarray(starts, t.dtype), jnp.mod(t, DAY_S), side="right") - 1
            return jnp.stack(jnp.broadcast_arrays(*(jnp.asarray(v(s, ip)) for s in sig.values)))[idx]
        return schedule
    if isinstance(sig, Step):
        return lambda t, x, ip: jnp.where(t < v(sig.at_s, ip), v(sig.before, ip), v(sig.after, ip))
    if isinstance(sig, Square):
        def square(t, x, ip):
            period = v(sig.period_s, ip)
            on = jnp.mod(t - sig.phase_s if sig.phase_s else t, period) < v(sig.duty, ip) * period
            return jnp.where(on, v(sig.high, ip), v(sig.low, ip))
        return square
    if isinstance(sig, Proportional):
        return lambda t, x, ip: v(sig.gain, ip) * (v(sig.setpoint, ip) - x[sig.state])
    if isinstance(sig, PiecewiseLinear | Series):
        times, vals = (np.asarray(sig.times_s), np.asarray(sig.values)) if isinstance(sig, PiecewiseLinear) \
            else sig.points
        return lambda t, x, ip: jnp.interp(t, jnp.asarray(times, t.dtype), jnp.asarray(vals, t.dtype))
    if horizon_s is None:
        raise ValueError(f"a {sig.kind} signal needs the sweep's horizon: compile the kit with horizon_s")
    table, hold = sig.table(horizon_s, offset), sig.hold_s

    def held(t, x, ip):
        idx = jnp.clip(jnp.floor(t / hold).astype(jnp.int32), 0, table.size - 1)
        return jnp.asarray(table, t.dtype)[idx]
    return held


def _builtin(model: Model, m: Metric, horizon_s: float | None) -> CustomMetric:
    """A data `Metric` as init / update / finalize functions."""
    names, scale, states = m.variables, m.scale, set(model.state_names)

    def scaled(a):
        return a if scale == 1.0 else a * scale

    if m.kind in ("min", "max", "final"):
        fold = {"min": jnp.minimum, "max": jnp.maximum, "final": lambda a, b: b}[m.kind]
        start = {"min": jnp.inf, "max": -jnp.inf, "final": 0.0}[m.kind]  # `final` is overwritten at the first step

        def first(x0, ip):  # extremes of a state include the start state
            like = next(iter(x0.values()))
            return x0[names[0]] if names[0] in states and m.kind != "final" else jnp.full_like(like, start)
        return CustomMetric(m.name, first, lambda a, now, ip, dt: fold(a, now[names[0]]), lambda a, dt: scaled(a))

    def zero(x0, ip):
        return jnp.zeros_like(next(iter(x0.values())))

    if m.kind in ("integral", "mean"):
        if m.kind == "mean" and horizon_s is None:
            raise ValueError(f"metric {m.name}: a mean needs the sweep's horizon: compile the kit with horizon_s")
        per = 1.0 if m.kind == "integral" else 1.0 / horizon_s

        def integrate(a, now, ip, dt):
            value = now[names[0]]
            return a + (jnp.abs(value) if m.absolute else value) * dt
        return CustomMetric(m.name, zero, integrate, lambda a, dt: scaled(a if per == 1.0 else a * per))

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
                        lambda a, dt: scaled(a * dt))


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
    parameters and the nonzero kit parameters (up to three) scaled by 0.7..1.3."""
    if kit.example is not None:
        return kit.example
    scale = {"mode": "scale", "low": 0.7, "high": 1.3}
    dims = [Dimension(name=p.name, target="param", **scale) for p in kit.model.params[:3]]
    dims += [Dimension(name=k, target="input", **scale) for k, p in kit.parameters.items() if p.default != 0.0][:3]
    return ExampleSweep(horizon_s=1000 * kit.model.default_dt, step_s=kit.model.default_dt, dimensions=dims)
