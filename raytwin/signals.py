"""Scenario inputs declared as data: one family of signals for what-if runs over HTTP and for sweeps.

A signal is a validated contract (``kind`` discriminates; durations and times carry their unit in
the field name: ``period_s``, ``at_s``) that `signal_function` turns into one pure, elementwise
function ``f(t, state, params)``. A sweep kit calls it in JAX inside the RK4 scan, where XLA fuses it
with the model step, so no input array is stored or moved; the HTTP API evaluates the same formulas
in float64 NumPy over a scenario's step times to check and run the scenario.

A numeric field is a number or, in sweeps, the name of a kit parameter (set per sweep and swept
per scenario). ``unit`` (default: the input's own unit) converts the signal's values to the
input's unit; ``lower`` / ``upper`` saturate them (in the signal's unit) before that conversion.
Random signals depend on time only: they are drawn once from ``seed`` plus an offset (a what-if
scenario's seed, a synthetic data set's), so every scenario of a sweep sees the same draw.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, TypeAdapter, model_validator

from raytwin import units
from raytwin.fields import Contract, Finite, Unit

Params = dict[str, Any]
"""Named values of one scenario (kit parameters), by name."""
Value = Finite | str
"""A number, or the name of a parameter (set per sweep and sweepable per scenario)."""
InputFn = Callable[[Any, Any, Params], Any]
"""A compiled or custom input: ``fn(t, state, params) -> value`` in JAX (states and parameters by name)."""
TWO_PI = 2.0 * math.pi
DAY_S = 86400.0
WEEK_S = 7 * DAY_S
CLOCK_ORIGIN = datetime(1970, 1, 5, tzinfo=UTC)
"""A Monday 00:00 UTC: clock signals count their time from the Monday midnight (UTC) before a run's start."""
CLOCK = ("true: the signal follows the wall clock (UTC) of the run's start_time, its t counted from the Monday "
         "00:00 UTC before it (a daily signal: from midnight), not from the start; false: from the start")


def clock_seconds(start_time: datetime | None) -> float:
    """Seconds from the Monday 00:00 UTC before `start_time` to it (0 for None): where clock signals start."""
    if start_time is None:
        return 0.0
    return (start_time - CLOCK_ORIGIN).total_seconds() % WEEK_S


CLOCK_INPUT = "clock_s"
"""The kit parameter clock signals read: seconds from a Monday 00:00 UTC to the run's t = 0. A traced value
(`clock_seconds` of a sweep's `start_time`, or swept itself), so one compiled kernel serves every start time."""


def _clock(sig: Any, ip: Params, period: Any, xp: Any) -> Any:
    """Seconds on the clock at the run's t = 0 for `sig`, reduced by its period; 0 for a signal that does not
    follow the clock. In float32 the clock itself holds ~0.03 s within a week (a daily signal up to ~30 ms late:
    a phase error of ~4e-7 of its period)."""
    if not getattr(sig, "clock", False) or CLOCK_INPUT not in ip:
        return 0.0
    return xp.mod(ip[CLOCK_INPUT], period)


def _shifted(t: Any, shift: Any) -> Any:
    """``t + shift``, without the addition where `shift` is a plain zero (a kernel with one operation less)."""
    return t if isinstance(shift, float | int) and shift == 0 else t + shift


class _Signal(Contract):
    """Common to every signal: its unit and an optional saturation to [`lower`, `upper`]."""

    VALUES: ClassVar[tuple[str, ...]] = ()
    """The fields that take a `Value` (a number or a parameter's name), besides the bounds."""

    unit: Unit | None = Field(None, description="unit of the values (default: the input's own unit)")
    lower: Value | None = None
    upper: Value | None = None

    def references(self) -> set[str]:
        """Parameter names this signal uses."""
        return {v for f in (*self.VALUES, "lower", "upper") if isinstance(v := getattr(self, f), str)}

    def table(self, horizon_s: float, offset: int) -> np.ndarray | None:
        """Values per `hold_s` for precomputed (random) signals, drawn from seed ``seed + offset``; else None."""
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
    clock: bool = Field(False, description=CLOCK)


class Schedule(_Signal):
    """Piecewise constant within each period (a day by default): `values[i]` from `starts_s[i]` after the
    period's start (at t = -`phase_s`, and every `period_s` from there)."""

    kind: Literal["schedule"] = "schedule"
    period_s: Annotated[Finite, Field(gt=0)] = DAY_S
    starts_s: Annotated[list[Finite], Field(min_length=1)]
    values: Annotated[list[Value], Field(min_length=1)]
    phase_s: Finite = 0.0
    clock: bool = Field(False, description=CLOCK)

    @model_validator(mode="after")
    def _consistent(self) -> Schedule:
        if len(self.starts_s) != len(self.values):
            raise ValueError("schedule: starts_s and values must have the same length")
        if self.starts_s[0] != 0.0 or any(b <= a for a, b in zip(self.starts_s, self.starts_s[1:])):
            raise ValueError("schedule: starts_s must begin at 0 and increase strictly")
        if self.starts_s[-1] >= self.period_s:
            raise ValueError(f"schedule: starts_s must lie within one period (< {self.period_s:g} s)")
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
    """`high` for the first `duty` fraction of each period (from t = `phase_s`), `low` otherwise."""

    VALUES = ("low", "high", "period_s", "duty")
    kind: Literal["square"] = "square"
    low: Value = 0.0
    high: Value
    period_s: Value
    duty: Value = 0.5
    phase_s: Finite = 0.0
    clock: bool = Field(False, description=CLOCK)


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
    """A seeded Gaussian random walk from `start`, one step of std `step_std` every `hold_s` (held in
    between), saturated to [`lower`, `upper`] at every step."""

    kind: Literal["random_walk"] = "random_walk"
    start: Finite
    step_std: Annotated[Finite, Field(ge=0)]
    hold_s: Annotated[Finite, Field(gt=0)]
    seed: Annotated[int, Field(ge=0)] = 0

    def table(self, horizon_s: float, offset: int) -> np.ndarray:
        steps = np.random.default_rng(self.seed + offset).normal(0.0, self.step_std, _levels(horizon_s, self.hold_s))
        steps[0] = 0.0
        if self.lower is None and self.upper is None:
            return self.start + np.cumsum(steps)
        low = -np.inf if self.lower is None else self.lower
        high = np.inf if self.upper is None else self.upper
        values, level = np.empty_like(steps), self.start
        for i, s in enumerate(steps):  # saturation makes each level depend on the last
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
    """A recorded time series: either `values`, one per simulation step (held over the step), or
    column `column` of the Parquet file `path` (an fsspec URL or path) against its `time_column`
    [s], linearly interpolated and held beyond the ends."""

    kind: Literal["series"] = "series"
    values: Annotated[list[Finite], Field(min_length=1)] | None = None
    path: Annotated[str, Field(min_length=1)] | None = None
    column: Annotated[str, Field(min_length=1)] | None = None
    time_column: str = "t_s"

    @model_validator(mode="after")
    def _one_source(self) -> Series:
        if (self.values is None) == (self.path is None) or (self.path is None) != (self.column is None):
            raise ValueError("series: give either values (one per step), or path and column (a Parquet file)")
        return self

    @functools.cached_property
    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """(times, values) of a Parquet series, read once from the file."""
        import pyarrow.parquet as pq

        from raytwin.storage import filesystem
        from raytwin.store_failures import store_io

        fs, path = filesystem(self.path, None)
        with store_io("read"):
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


OpenLoopSignal = Annotated[
    Constant | Sinusoid | Schedule | Step | Square | PiecewiseLinear | RandomWalk | RandomLevels | Series,
    Field(discriminator="kind"),
]
"""Signals of time only (no feedback on a state)."""
Signal = Annotated[
    Constant | Sinusoid | Schedule | Step | Square | PiecewiseLinear | RandomWalk | RandomLevels | Series
    | Proportional,
    Field(discriminator="kind"),
]
SIGNAL = TypeAdapter(Signal)


def _levels(horizon_s: float, hold_s: float) -> int:
    return int(math.floor(horizon_s / hold_s)) + 1


def _value(v: Value | None, ip: Params) -> Any:
    return ip[v] if isinstance(v, str) else v


def signal_function(sig: Any, *, horizon_s: float | None = None, step_s: float | None = None, offset: int = 0,
                    unit: str | None = None, xp: Any = None) -> InputFn:
    """``f(t, state, params)`` for one signal (a custom `InputFn` is returned as it is), saturated to its
    bounds and converted to `unit`; elementwise, on a scalar or a vector `t`, in `xp`: ``jax.numpy``
    (the default: traced into a kernel) or ``numpy`` (the same formulas evaluated at once, without
    compiling a kernel per horizon: what a single what-if scenario needs).

    Random signals need `horizon_s` (their draws are tabulated) and draw from ``seed + offset``;
    a series of per-step values needs `step_s` (and has one value per step of `horizon_s`). A `UnitError` if `unit` is not the signal's dimension.
    """
    if callable(sig):
        return sig
    if xp is None:
        import jax.numpy as xp

    raw = _raw(sig, horizon_s, step_s, offset, xp)
    saturated = raw if sig.lower is None and sig.upper is None else (
        lambda t, x, ip: xp.clip(raw(t, x, ip), _value(sig.lower, ip), _value(sig.upper, ip)))
    if sig.unit is None or unit is None or sig.unit == unit:
        return saturated
    src, dst = units.unit_def(sig.unit), units.unit_def(unit)
    units.to_unit(0.0, sig.unit, unit)  # refuses another dimension
    scale, offset_si = src.scale / dst.scale, (src.offset - dst.offset) / dst.scale
    return lambda t, x, ip: saturated(t, x, ip) * scale + offset_si


def _raw(sig: Any, horizon_s: float | None, step_s: float | None, offset: int, xp: Any) -> InputFn:
    v = _value
    if isinstance(sig, Constant):
        return lambda t, x, ip: xp.zeros_like(t) + v(sig.value, ip)
    if isinstance(sig, Sinusoid):
        omega, zero_mean = TWO_PI / sig.period_s, sig.mean == 0.0

        def sinusoid(t, x, ip):
            wave = v(sig.amplitude, ip) * xp.sin(omega * (t + sig.phase_s + _clock(sig, ip, sig.period_s, xp)))
            return wave if zero_mean else v(sig.mean, ip) + wave
        return sinusoid
    if isinstance(sig, Schedule):
        starts = np.asarray(sig.starts_s)

        def schedule(t, x, ip):
            within = xp.mod(_shifted(t, sig.phase_s + _clock(sig, ip, sig.period_s, xp)), sig.period_s)
            idx = xp.searchsorted(xp.asarray(starts, t.dtype), within, side="right") - 1
            return xp.stack(xp.broadcast_arrays(*(xp.asarray(v(s, ip)) for s in sig.values)))[idx]
        return schedule
    if isinstance(sig, Step):
        return lambda t, x, ip: xp.where(t < v(sig.at_s, ip), v(sig.before, ip), v(sig.after, ip))
    if isinstance(sig, Square):
        def square(t, x, ip):
            period = v(sig.period_s, ip)
            on = xp.mod(_shifted(t, _clock(sig, ip, period, xp) - sig.phase_s), period) < v(sig.duty, ip) * period
            return xp.where(on, v(sig.high, ip), v(sig.low, ip))
        return square
    if isinstance(sig, Proportional):
        return lambda t, x, ip: v(sig.gain, ip) * (v(sig.setpoint, ip) - x[sig.state])
    if isinstance(sig, Series) and sig.values is not None:
        if step_s is None:
            raise ValueError("a series of per-step values needs the step: compile it with step_s")
        per_step = np.asarray(sig.values)
        if horizon_s is not None and per_step.size != (n := round(horizon_s / step_s)):
            raise ValueError(f"series has {per_step.size} values for {n} steps")

        def stepwise(t, x, ip):  # the value of the step that starts at t (rounded: t carries float error)
            idx = xp.clip(xp.round(t / step_s).astype(xp.int32), 0, per_step.size - 1)
            return xp.asarray(per_step, t.dtype)[idx]
        return stepwise
    if isinstance(sig, PiecewiseLinear | Series):
        times, vals = (np.asarray(sig.times_s), np.asarray(sig.values)) if isinstance(sig, PiecewiseLinear) \
            else sig.points
        return lambda t, x, ip: xp.interp(t, xp.asarray(times, t.dtype), xp.asarray(vals, t.dtype))
    if horizon_s is None:
        raise ValueError(f"a {sig.kind} signal needs the horizon: compile it with horizon_s")
    table, hold = sig.table(horizon_s, offset), sig.hold_s

    def held(t, x, ip):
        idx = xp.clip(xp.floor(t / hold).astype(xp.int32), 0, table.size - 1)
        return xp.asarray(table, t.dtype)[idx]
    return held
