"""Recommended actions: the schedule of one controllable input that minimises a kit metric over a
horizon from a twin's state, under bounds on its states, with the expected change against the
baseline and an uncertainty band.

The action is a piecewise-constant schedule of one model input (e.g. the heating power ``Q_h``):
one value per `Control.block_s`, repeating every `Control.period_s` (default: the whole horizon,
no repetition). It replaces that input's kit signal (the *baseline*, e.g. the reference kit's
thermostat at a constant setpoint) in a sweep kit, so the plan and the baseline run through the
same engine and metrics (`sweeps.engine`).

Constraints, stated: the control's box ``[lower, upper]`` is kept by **projection** (each value is
clipped); bounds on states (`Bound`, e.g. a comfort band on ``T_in``) are **penalties** while
searching, on bounds tightened by `Bound.margin`, and a recommendation reports each bound's time
outside the (untightened) band and the state's extremes for the plan and the baseline.

The verdict (`_verdict`, on the model's nominal parameters): a plan that keeps every band is answered
``feasible``, unless the baseline keeps them too and the plan's objective is worse (then the baseline
is the better action: refused). A plan that leaves a band is refused (`InfeasibleRecommendation`:
which band, for how long, by how much, what to change), unless it gets closer to the bands than the
baseline does and the spec accepts it (`RecommendSpec.best_effort`): then it is answered
``best_effort``, each band it leaves in `Recommendation.violations`.

Two searches:
- ``gradient``: `jax.grad` of objective + penalty through the RK4 scan, Adam (optax) steps on the
  block values, each followed by the projection; float64, in-process (a week at 15-minute steps
  with 168 hourly values: a few seconds).
- ``sampled``: a random or grid sweep over the block values through the sweep engine on Ray
  (`sweeps.runner.run_sweep`, its dataset kept in the run); the best sample whose states stay within
  the tightened bounds wins. Sampling suits a few blocks (e.g. four per day); use the gradient for
  more.

The band: an ensemble of parameter sets, log-normal around the model's parameters, from a
calibration run's `CalibrationResult` (relative std and correlation of its free parameters) or from
declared relative standard deviations; plan and baseline run on every member, and the answer holds
quantiles of the objective's change. `recorded_recommendation` writes a run record (kind
``recommendation``; `sweeps.runs.rerun` reproduces it bit for bit).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydantic import Field, model_validator

from raytwin.contracts import Contract, Finite, Identifier, StartedFrom, whole_steps
from raytwin.provenance import compute_platform
from raytwin.scenario_metrics import Metric
from raytwin.signals import Schedule
from raytwin.sim import rollout
from raytwin.sim.precision import float64
from raytwin.storage import filesystem, make_folder, replace_file
from raytwin.store_failures import store_io
from sweeps.aggregate import open_dataset
from sweeps.calibration import CalibrationResult
from sweeps.engine import chunk_metrics
from sweeps.kits import SweepKit
from sweeps.runner import prepare, run_sweep
from sweeps.runs import DEFAULT_RUNS_ROOT, RunError, RunRecord, RunStore, _recorded
from sweeps.space import Dimension, ScenarioSpace, Seed
from sweeps.spec import ModelStart, SweepSpec, resolve_model
from sweeps.stability import check_sweep_step

log = logging.getLogger("raytwin.recommend")

Method = Literal["gradient", "sampled"]
Status = Literal["feasible", "best_effort"]
RESULT_FILE = "recommendation.json"
SEARCH_DIR = "search"
QUANTILES = (0.05, 0.5, 0.95)
CLOSER = 0.01
"""A best effort's largest distance beyond a band counts as closer than the baseline's only when at least
this share smaller (an optimiser's rounding is no improvement)."""


class RecommendError(ValueError):
    """A recommendation that cannot be made as asked (the message says what to change)."""


class InfeasibleRecommendation(RecommendError):
    """The best plan found leaves a band (and is not accepted as a best effort), or keeps the bands in fewer
    ensemble members than asked: `details` holds each band's `Violation` (or its members outside) as JSON, for
    the API's 422 ``infeasible``."""

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.details = details or []

    def __reduce__(self):  # keep the details across Ray's pickling
        return (type(self), (str(self), self.details))


class Control(Contract):
    """The controllable input and its schedule's shape and box (kept by projection)."""

    input: Identifier = Field(description="The model input the action sets, e.g. `Q_h`")
    block_s: Annotated[Finite, Field(gt=0)] = Field(3600.0, description="One value per block")
    period_s: Annotated[Finite, Field(gt=0)] | None = Field(
        None, description="The schedule repeats with this period (default: the horizon, no repetition)")
    lower: Finite
    upper: Finite

    @model_validator(mode="after")
    def _box(self) -> Control:
        if not self.lower < self.upper:
            raise ValueError(f"control {self.input}: lower ({self.lower:g}) must be below upper ({self.upper:g})")
        return self


class Bound(Contract):
    """A band a state must stay in (penalised while searching, on the band tightened by `margin`)."""

    of: Identifier = Field(description="A state of the model, e.g. `T_in`")
    low: Finite | None = None
    high: Finite | None = None
    margin: Annotated[Finite, Field(ge=0)] = Field(
        0.0, description="Tightening while searching, in the state's unit: room for the coarse step and the model error")

    @model_validator(mode="after")
    def _band(self) -> Bound:
        if self.low is None and self.high is None:
            raise ValueError(f"bound on {self.of}: give low, high or both")
        if self.low is not None and self.high is not None and not self.low + 2 * self.margin < self.high:
            raise ValueError(f"bound on {self.of}: low + 2 margin must stay below high")
        return self

    @property
    def metric(self) -> str:
        return f"outside_{self.of}_s"

    @property
    def lowest(self) -> str:
        return f"lowest_{self.of}"

    @property
    def highest(self) -> str:
        return f"highest_{self.of}"

    @property
    def band(self) -> str:
        if self.low is None:
            return f"<= {self.high:g}"
        return f">= {self.low:g}" if self.high is None else f"[{self.low:g}, {self.high:g}]"

    def metrics(self) -> list[Metric]:
        """Its time outside the band, and the state's extremes (how far a plan misses the band)."""
        low = -1e300 if self.low is None else self.low
        high = 1e300 if self.high is None else self.high
        return [Metric(name=self.metric, kind="time_outside", of=self.of, low=low, high=high, unit="s",
                       description=f"time {self.of} spent outside [{self.low}, {self.high}]"),
                Metric(name=self.lowest, kind="min", of=self.of, description=f"lowest {self.of}"),
                Metric(name=self.highest, kind="max", of=self.of, description=f"highest {self.of}")]

    def miss(self, metrics: Mapping[str, Any]) -> np.ndarray:
        """By how much the state misses the band (its unit; 0 within it), from `metrics()`'s values (numbers or
        arrays of them): a state that never enters the band, by its shortfall at the closest; one that does, by its
        largest distance beyond it (the start state counts: no plan moves it)."""
        lowest, highest = np.asarray(metrics[self.lowest]), np.asarray(metrics[self.highest])
        low = -np.inf if self.low is None else self.low
        high = np.inf if self.high is None else self.high
        beyond = np.maximum(np.maximum(low - lowest, highest - high), 0.0)
        return np.where(highest < low, low - highest, np.where(lowest > high, lowest - high, beyond))

    def tightened(self) -> tuple[float, float]:
        return (-np.inf if self.low is None else self.low + self.margin,
                np.inf if self.high is None else self.high - self.margin)


class Ensemble(Contract):
    """Where the band comes from: a calibration run's covariance, or declared relative stds."""

    size: Annotated[int, Field(ge=2, le=4096)] = 64
    seed: Annotated[int, Field(ge=0)] = 0
    calibration_run: str | None = Field(None, description="A calibration run id in the same runs root")
    rel_std: dict[Identifier, Annotated[Finite, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="Declared relative std per parameter (used without a calibration)")

    @model_validator(mode="after")
    def _source(self) -> Ensemble:
        if (self.calibration_run is None) == (not self.rel_std):
            raise ValueError("ensemble: give either calibration_run (its parameter covariance) or rel_std "
                             "(declared relative uncertainty per parameter), not both and not neither")
        return self


class RecommendSpec(ModelStart, StartedFrom):
    """One recommendation: model and start state (e.g. `sweeps.twins.start_from_twin`), horizon,
    the control, the objective (a kit metric, minimised), bounds, the search and the ensemble."""

    horizon_s: Annotated[Finite, Field(gt=0)]
    step_s: Annotated[Finite, Field(gt=0)]
    control: Control
    objective: Identifier = Field(description="A metric of the model's kit, minimised, e.g. `energy_kwh`")
    constraints: Annotated[list[Bound], Field(max_length=16)] = Field(default_factory=list)
    method: Method = "gradient"
    iterations: Annotated[int, Field(ge=1, le=20_000)] = 400
    learning_rate: Annotated[Finite, Field(gt=0)] = 0.02
    penalty: Annotated[Finite, Field(gt=0)] = Field(
        1e3, description="Objective units per (unit of the state)^2 x hour outside a tightened band")
    search: Literal["random", "grid"] = "random"
    samples: Annotated[int, Field(ge=1, le=1_000_000)] = 4096
    levels: Annotated[int, Field(ge=2, le=64)] = 5
    seed: Seed = 0
    ensemble: Ensemble
    best_effort: bool = Field(False, description=(
        "Accept a plan that leaves a band but gets closer to it than the baseline (answered with status "
        "`best_effort` and its `violations`); false: such a plan is refused, as is one no closer than the baseline"))
    min_feasible_fraction: Annotated[Finite, Field(ge=0, le=1)] = Field(0.0, description=(
        "The share of the ensemble's members (the nominal model among them) in which a feasible plan must keep "
        "every band the whole horizon: a chance constraint; below it the plan is refused (422 `infeasible`, "
        "naming each band's share of members that leave it). 0: judged on the model's parameters alone. A "
        "`best_effort` plan, which leaves a band on them already, is not held to it"))
    start_warnings: Annotated[list[str], Field(max_length=8)] = Field(default_factory=list, description=(
        "What the twin's filter said of the live state the plan starts from (`serve_apps.routes_scenarios."
        "live_warnings`: a latched drift alarm, a diverged estimate), carried into the answer and its record"))

    @property
    def n_steps(self) -> int:
        return round(self.horizon_s / self.step_s)

    @property
    def period_s(self) -> float:
        return self.control.period_s or self.horizon_s

    @property
    def starts_s(self) -> list[float]:
        return np.arange(0.0, self.period_s, self.control.block_s).tolist()

    @property
    def block_names(self) -> list[str]:
        return [f"u{i:04d}" for i in range(len(self.starts_s))]

    @model_validator(mode="after")
    def _shape(self) -> RecommendSpec:
        whole_steps(self.horizon_s, self.step_s)
        bounded = [b.of for b in self.constraints]
        if len(set(bounded)) < len(bounded):
            raise ValueError(f"constraints: one bound per state (give low and high in it), got {bounded}")
        blocks = self.period_s / self.control.block_s
        if not blocks <= 10_000 or abs(blocks - round(blocks)) > 1e-9:
            raise ValueError(f"control: block_s ({self.control.block_s:g}) must divide the period "
                             f"({self.period_s:g} s) into at most 10,000 blocks")
        if self.method == "sampled" and self.search == "grid" and self.levels ** round(blocks) > 1_000_000:
            raise ValueError(f"a grid of {self.levels}^{round(blocks)} schedules is too large; use fewer blocks "
                             "(a longer block_s or a shorter period_s), fewer levels or search='random'")
        return self

    def sweep_spec(self, space: ScenarioSpace, dtype: str = "float64") -> SweepSpec:
        """The plan as a sweep: the control's signal replaced by the block schedule, the bounds as metrics."""
        mid = 0.5 * (self.control.lower + self.control.upper)
        return SweepSpec(
            model=self.model, registry_url=self.registry_url, tenant=self.tenant, asset_id=self.asset_id,
            start_state=self.start_state, parameters=self.parameters,
            inputs={**self.inputs, **dict.fromkeys(self.block_names, mid)},
            signals={self.control.input: Schedule(period_s=self.period_s, starts_s=self.starts_s,
                                                  values=self.block_names)},
            metrics=self._metrics(), space=space, horizon_s=self.horizon_s, step_s=self.step_s, dtype=dtype,
            start_time=self.start_time)

    def baseline_spec(self, space: ScenarioSpace) -> SweepSpec:
        return SweepSpec(
            model=self.model, registry_url=self.registry_url, tenant=self.tenant, asset_id=self.asset_id,
            start_state=self.start_state, parameters=self.parameters, inputs=self.inputs, metrics=self._metrics(),
            space=space, horizon_s=self.horizon_s, step_s=self.step_s, dtype="float64", start_time=self.start_time)

    def _metrics(self) -> list[Metric]:
        """The kit's metrics and one time-outside metric per bound."""
        probe = SweepSpec(model=self.model, registry_url=self.registry_url, start_state=self.start_state,
                          inputs=self.inputs, horizon_s=self.horizon_s, step_s=self.step_s,
                          space=_nominal_space(self))
        simulator, _ = prepare(probe)
        kit = probe.kit(simulator)
        if self.objective not in kit.compile().metric_names:
            raise RecommendError(f"objective {self.objective!r} is not a metric of {simulator}'s kit; metrics: "
                                 f"{list(kit.compile().metric_names)}")
        if self.control.input not in kit.model.input_names:
            raise RecommendError(f"control: {simulator} has no input {self.control.input!r}; inputs: "
                                 f"{list(kit.model.input_names)}")
        unknown = [b.of for b in self.constraints if b.of not in kit.model.state_names]
        if unknown:
            raise RecommendError(f"bounds on unknown state(s) {unknown}; states: {list(kit.model.state_names)}")
        kit_metrics = [m for m in kit.metrics if isinstance(m, Metric)]
        bound_metrics = [m for b in self.constraints for m in b.metrics()]
        taken = sorted({m.name for m in bound_metrics} & set(kit.compile().metric_names))
        if taken:
            raise RecommendError(f"the bounds' metrics {taken} are also metrics of {simulator}'s kit: its kit must "
                                 "not name metrics outside_<state>_s, lowest_<state> or highest_<state>")
        return kit_metrics + bound_metrics


class ActionSchedule(Contract):
    """The proposed action: `values[i]` of `input` from `starts_s[i]` (seconds after the horizon's
    start) within every `period_s`."""

    input: str
    unit: str
    block_s: float
    period_s: float
    starts_s: list[float]
    values: list[float]


class Band(Contract):
    q05: float
    q50: float
    q95: float


class Violation(Contract):
    """A band the plan leaves on the model's nominal parameters: for how long and how far, and the baseline's."""

    of: str
    low: float | None
    high: float | None
    unit: str
    outside_s: float = Field(description="Time the plan's state spends outside the band")
    miss: float = Field(description=(
        "By how much the plan's state misses the band, in its unit: if it never enters the band, its shortfall at "
        "the closest; else its largest distance beyond the band (the start state included)"))
    baseline_outside_s: float
    baseline_miss: float

    def describe(self, horizon_s: float) -> str:
        return (f"{self.of} leaves its band {Bound(of=self.of, low=self.low, high=self.high).band} {self.unit} for "
                f"{self.outside_s:g} of {horizon_s:g} s and misses it by {self.miss:.4g} {self.unit} (the baseline: "
                f"{self.baseline_outside_s:g} s, by {self.baseline_miss:.4g} {self.unit})")

    def closer(self) -> tuple[bool, bool]:
        """(worse, better) than the baseline: longer outside or missing by more; shorter outside, or missing by at
        least `CLOSER` less."""
        worse = self.outside_s > self.baseline_outside_s or (
            self.outside_s > 0.0 and self.miss > self.baseline_miss * (1.0 + 1e-9))
        better = self.outside_s < self.baseline_outside_s or (
            self.baseline_outside_s > 0.0 and self.miss < (1.0 - CLOSER) * self.baseline_miss)
        return worse, better


class Recommendation(Contract, StartedFrom):
    """The answer: the action, the expected change of the objective and its band, the bounds."""

    run_id: str | None = None
    status: Status | None = Field(None, description=(
        "feasible: the plan keeps every band (on the model's parameters); best_effort: it leaves a band (see "
        "`violations`) but gets closer to it than the baseline, answered because the request set best_effort; "
        "null: recorded before recommendations had a status"))
    violations: list[Violation] = Field(default_factory=list, description=(
        "The bands a best_effort plan leaves, for how long and how far, against the baseline (empty when feasible)"))
    method: Method
    model_ref: str
    tenant: str
    asset_id: str | None
    start_state: dict[str, float]
    start_time: datetime | None = Field(None, description=(
        "The wall-clock time of t = 0, where clock signals started: from a twin's live state, its state's event "
        "time (how old the state is); from an explicit one, the request's start_time (null: a Monday 00:00 UTC)"))
    horizon_s: float
    step_s: float
    action: ActionSchedule
    objective: str
    baseline: dict[str, float] = Field(description="Metrics of the baseline (the kit's signal) at the model's parameters")
    recommended: dict[str, float] = Field(description="Metrics of the action at the model's parameters")
    change: float = Field(description="recommended - baseline objective")
    change_pct: float
    change_band: Band = Field(description="Quantiles of the change over the parameter ensemble")
    change_pct_band: Band
    feasible_fraction: float = Field(description="Ensemble members where the plan keeps every band the whole horizon")
    no_worse_fraction: float | None = Field(None, description=(
        "Ensemble members where the plan leaves no band longer than the baseline does"))
    uncertainty: str = Field(description="Where the ensemble's parameter spread came from")
    constraints: list[Bound]
    search: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list, description=(
        "From a live state: what the twin's filter said of it when the plan was made (its drift alarm latched, its "
        "estimate diverged): the model may no longer explain the asset. Empty: nothing to say."))


def _nominal_space(spec: RecommendSpec) -> ScenarioSpace:
    """One scenario: the model's parameters as they are (a scale of 1 on the first)."""
    first = resolve_model(spec.model, spec.registry_url).model().param_names[0]
    return ScenarioSpace(method="grid", dimensions=[Dimension(name=first, target="param", mode="scale", values=[1.0])])


def _ensemble_scales(spec: RecommendSpec, base: dict[str, float], runs: str | None,
                     storage_options: dict | None) -> tuple[list[str], np.ndarray, str]:
    """(parameter names, (size, n) multiplicative factors, source): log-normal members, the first
    the nominal model (factors 1)."""
    e = spec.ensemble
    if e.calibration_run is not None:
        if runs is None:
            raise RecommendError("ensemble.calibration_run needs the runs root it was recorded in")
        fs, root = filesystem(runs.rstrip("/"), storage_options)
        path = f"{root}/{e.calibration_run}/output/calibration.json"
        with store_io("read"):
            if not fs.exists(path):
                raise RecommendError(f"no calibration result for run {e.calibration_run!r} under {runs}")
            body = fs.cat_file(path)
        result = CalibrationResult.model_validate_json(body)
        names, rel = result.free, np.array([result.rel_std[n] for n in result.free])
        cov = np.outer(rel, rel) * np.asarray(result.correlation)
        source = f"calibration run {e.calibration_run} (covariance of {', '.join(names)})"
    else:
        names = sorted(e.rel_std)
        cov = np.diag([e.rel_std[n] ** 2 for n in names])
        source = "declared: " + ", ".join(f"{n} {e.rel_std[n]:.1%}" for n in names)
    unknown = sorted(set(names) - set(base))
    if unknown:
        raise RecommendError(f"ensemble: unknown parameter(s) {unknown}; parameters: {sorted(base)}")
    rng = np.random.default_rng(e.seed)
    z = rng.multivariate_normal(np.zeros(len(names)), cov, size=e.size - 1, method="eigh")
    return names, np.exp(np.vstack([np.zeros(len(names)), z])), source


def _evaluate(sweep: SweepSpec, names: list[str], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of `sweep`'s kit for each row of parameter factors (in-process, float64)."""
    simulator, bases = prepare(sweep)
    kit = sweep.kit(simulator).compile(sweep.horizon_s, sweep.step_s)
    dims = [Dimension(name=n, target="param", mode="scale", low=1e-6, high=1e6) for n in names]
    return chunk_metrics(kit, bases, dims, rows, sweep.step_s, sweep.n_steps, rows.shape[0], "float64", kernel="xla")


@functools.cache
def _optimiser(kit: SweepKit, n_steps: int, iterations: int, learning_rate: float, objective: int,
               names: tuple[str, ...], band_states: tuple[int, ...]) -> Callable[..., Any]:
    """The jitted search for one kit and shape, compiled once per process: a rerun, or the next request
    for an asset of the same type and shape, reuses it (the values are arguments, not constants)."""
    model, optimiser = kit.model, optax.adam(learning_rate)

    def loss(theta, x0, params, fixed, lows, highs, lo, span, dt, penalty):
        coeffs = model.coefficients(params)
        ip = {**fixed, **dict(zip(names, lo + span * theta))}
        run = rollout(model, x0, params, dt, n_steps, lambda k, t, x: kit.inputs(t, x, ip),
                      accumulate=lambda acc, t, x, u, xn: kit.update(acc, xn, u, coeffs, ip, dt),
                      acc0=kit.init(x0, ip), keep_trajectory=True)
        value = kit.finalize(run.accumulated, dt)[objective]
        excess = sum(dt / 3600.0 * jnp.sum(jnp.maximum(lows[j] - run.trajectory[i], 0.0) ** 2
                                           + jnp.maximum(run.trajectory[i] - highs[j], 0.0) ** 2)
                     for j, i in enumerate(band_states))
        return value + penalty * excess, (value, excess)

    value_and_grad = jax.value_and_grad(loss, has_aux=True)

    @jax.jit
    def optimise(theta, *args):
        def iteration(carry, _):
            theta, state = carry
            _, grad = value_and_grad(theta, *args)
            updates, state = optimiser.update(grad, state, theta)
            return (jnp.clip(optax.apply_updates(theta, updates), 0.0, 1.0), state), None  # the box: projection

        (theta, _), _ = jax.lax.scan(iteration, (theta, optimiser.init(theta)), None, length=iterations)
        return theta, loss(theta, *args)

    return optimise


def _gradient_search(spec: RecommendSpec) -> tuple[np.ndarray, dict[str, Any]]:
    """Projected Adam on the block values (scaled to [0, 1]) of objective + penalty, float64."""
    sweep = spec.sweep_spec(_nominal_space(spec))
    simulator, bases = prepare(sweep)
    names = tuple(spec.block_names)
    lo, span = spec.control.lower, spec.control.upper - spec.control.lower
    with float64():
        kit: SweepKit = sweep.kit(simulator).compile(spec.horizon_s, spec.step_s)
        model = kit.model
        f64 = lambda v: jnp.asarray(v, jnp.float64)  # noqa: E731
        optimise = _optimiser(kit, spec.n_steps, spec.iterations, spec.learning_rate,
                              kit.metric_names.index(spec.objective), names,
                              tuple(model.state_names.index(b.of) for b in spec.constraints))
        bands = [b.tightened() for b in spec.constraints]
        theta, (total, (value, excess)) = optimise(
            jnp.full(len(names), 0.5, jnp.float64),
            tuple(f64(bases.state[n]) for n in model.state_names), tuple(f64(bases.params[n]) for n in model.param_names),
            {k: f64(v) for k, v in bases.inputs.items() if k not in names},
            f64([low for low, _ in bands]), f64([high for _, high in bands]), f64(lo), f64(span), f64(spec.step_s),
            f64(spec.penalty))
    values = lo + span * np.asarray(theta, dtype=np.float64)
    return values, {"iterations": spec.iterations, "loss": float(total), "objective": float(value),
                    "penalty_k2h": float(excess), "learning_rate": spec.learning_rate, "penalty": spec.penalty}


def _sampled_search(spec: RecommendSpec, out_url: str, storage_options: dict | None
                    ) -> tuple[np.ndarray, dict[str, Any], list[str]]:
    """A random or grid sweep of the block values on Ray; the best sample within the tightened bounds, and the
    platforms the sweep's chunks ran on."""
    dims = [Dimension(name=n, target="input", low=spec.control.lower, high=spec.control.upper,
                      levels=spec.levels if spec.search == "grid" else None) for n in spec.block_names]
    space = (ScenarioSpace(method="grid", dimensions=dims, seed=spec.seed) if spec.search == "grid"
             else ScenarioSpace(method="random", dimensions=dims, n=spec.samples, seed=spec.seed))
    tight = spec.model_copy(update={"constraints": [
        b.model_copy(update={"low": None if b.low is None else b.low + b.margin,
                             "high": None if b.high is None else b.high - b.margin, "margin": 0.0})
        for b in spec.constraints]})
    result = run_sweep(tight.sweep_spec(space), out_url, storage_options=storage_options, progress=False)
    columns = [spec.objective, *(m.name for b in spec.constraints for m in b.metrics()),
               *(f"input.{n}" for n in spec.block_names)]
    with store_io("read"):
        table = open_dataset(out_url, storage_options).to_table(columns=columns)
    data = {c: table.column(c).to_numpy() for c in columns}
    inside = np.ones(table.num_rows, bool)
    for b in spec.constraints:
        inside &= data[b.metric] == 0.0
    finite = np.isfinite(data[spec.objective])
    inside &= finite
    if inside.any():
        best = int(np.flatnonzero(inside)[np.argmin(data[spec.objective][inside])])
    elif spec.best_effort and finite.any():  # least time outside, then least miss, then objective; `_verdict` judges
        outside = sum(data[b.metric] for b in tight.constraints)
        miss = sum(b.miss(data) for b in tight.constraints)
        best = int(np.flatnonzero(finite)[np.lexsort((data[spec.objective][finite], miss[finite], outside[finite]))[0]])
    else:
        raise RecommendError(f"none of the {table.num_rows} sampled schedules keeps the states within the bounds "
                             "(tightened by their margins): sample more, widen the control's box or the bands, use "
                             "fewer blocks, method='gradient', or best_effort=true for the schedule closest to them")
    values = np.array([data[f"input.{n}"][best] for n in spec.block_names], dtype=np.float64)
    return values, {"search": spec.search, "samples": table.num_rows, "within_bounds": int(inside.sum()),
                    "best_scenario": best, "sweep_outputs": result.outputs}, result.platforms


def _check_members_step(specs: tuple[SweepSpec, ...], simulator: str, params: dict[str, float], names: list[str],
                        rows: np.ndarray) -> None:
    """`sweeps.stability.check_sweep_step` of the plan and the baseline over the box the ensemble's members span
    (each factor's range), before the search: the nominal model passing said nothing of a member with 0.77 its
    C_in, whose thermostat rang at the step and went into the change band unchecked."""
    dims = [Dimension(name=n, target="param", mode="scale", values=sorted({float(rows[:, j].min()),
                                                                            float(rows[:, j].max())}))
            for j, n in enumerate(names)]
    if not dims:
        return
    space = ScenarioSpace(method="grid", dimensions=dims)
    for sweep in specs:
        check_sweep_step(sweep.model_copy(update={"space": space}), simulator, params)


def _search_more(spec: RecommendSpec) -> str:
    if spec.method == "gradient":
        return (f"give more iterations ({spec.iterations}) or another learning_rate ({spec.learning_rate:g}), or try "
                "method='sampled'")
    return f"sample more (samples {spec.samples}, levels {spec.levels}) or try method='gradient'"


def _verdict(spec: RecommendSpec, planned: Mapping[str, float], base: Mapping[str, float],
             units: Mapping[str, str]) -> tuple[Status, list[Violation]]:
    """The plan's status on the nominal model, or `RecommendError` for a plan that must not be answered: one
    that leaves a band and does not improve on the baseline (farther from a band, or neither closer to one nor
    better on the objective; or it does, but `best_effort` is off), and one that keeps the bands where the
    baseline keeps them too, at a worse objective. A band no schedule can keep for a while (a start state
    outside it, which the heater needs hours to leave) is left alike by both: a plan as close and cheaper is
    a best effort."""
    checks = [Violation(of=b.of, low=b.low, high=b.high, unit=units[b.of], outside_s=planned[b.metric],
                        miss=float(b.miss(planned)), baseline_outside_s=base[b.metric],
                        baseline_miss=float(b.miss(base))) for b in spec.constraints]
    violations = [c for c in checks if c.outside_s > 0.0]
    objective, plan, baseline = spec.objective, planned[spec.objective], base[spec.objective]
    if not violations:
        if plan > baseline + 1e-9 * abs(baseline) and not any(c.baseline_outside_s > 0.0 for c in checks):
            raise RecommendError(
                f"the best schedule found is worse than the baseline: {objective} {plan:.6g} against "
                f"{baseline:.6g} ({100.0 * (plan - baseline) / abs(baseline):+.1f} %), and the baseline keeps every "
                f"band already, so keep the baseline; to search further, {_search_more(spec)}")
        return "feasible", []
    worse, better = zip(*(c.closer() for c in checks))
    cheaper = plan < baseline - 1e-9 * abs(baseline)
    closer = not any(worse) and (any(better) or cheaper)
    if closer and spec.best_effort:
        return "best_effort", violations
    control = spec.control
    missed = "; ".join(c.describe(spec.horizon_s) for c in violations)
    fix = (f"widen the band, the control's box ({control.input} in [{control.lower:g}, {control.upper:g}]) or the "
           f"horizon ({spec.horizon_s:g} s) so that the state can reach the band")
    if closer:
        fix += (", or set best_effort to true to accept this schedule, which gets closer to the band than the "
                f"baseline{'' if any(better) else ' (as close, at a better ' + objective + ')'}")
    else:
        fix += (" (best_effort would not accept this schedule either: it is farther from a band than the baseline, "
                f"or as close at no better {objective})")
    raise InfeasibleRecommendation(f"the constraints cannot be met: the best schedule found ({spec.method}) {missed}; "
                                   f"{fix}", [c.model_dump(mode="json") for c in violations])


def _check_chance(spec: RecommendSpec, planned: Mapping[str, np.ndarray], within: np.ndarray) -> None:
    """Refuse a plan feasible on the nominal model that keeps the bands in fewer of the ensemble's members than
    `RecommendSpec.min_feasible_fraction` asks: it was answered with its low `feasible_fraction` alone."""
    if within.mean() >= spec.min_feasible_fraction:
        return
    n = within.size
    left = [{"of": b.of, "members_outside": int((planned[b.metric] > 0.0).sum()), "members": n}
            for b in spec.constraints]
    shares = "; ".join(f"{d['of']} leaves its band in {d['members_outside']} of {n}" for d in left
                       if d["members_outside"])
    raise InfeasibleRecommendation(
        f"the best schedule found ({spec.method}) keeps every band on the model's parameters but in only "
        f"{int(within.sum())} of the ensemble's {n} members ({within.mean():.0%}), below min_feasible_fraction "
        f"{spec.min_feasible_fraction:g} ({shares}): give the bands a margin (the search aims inside it), widen them or "
        "the control's box, or lower min_feasible_fraction", [d for d in left if d["members_outside"]])


def _band(values: np.ndarray) -> Band:
    q = np.quantile(values, QUANTILES)
    return Band(q05=float(q[0]), q50=float(q[1]), q95=float(q[2]))


@dataclass(frozen=True)
class SearchRun:
    """How a recommendation's search ran: its run record's summary keeps it, its hashed outputs do not."""

    optimiser_s: float  # the search's wall time
    platforms: list[str]  # what the search and the evaluations computed on (`raytwin.provenance.compute_platform`)


def recommend(spec: RecommendSpec, out_url: str | None = None, *, runs: str | None = None,
              storage_options: dict | None = None) -> tuple[Recommendation, SearchRun]:
    """The recommendation for `spec` and how its search ran. `out_url`: where the sampled
    search writes its sweep (required for ``sampled``); `runs`: the root holding `ensemble.calibration_run`."""
    one = _nominal_space(spec)
    baseline = spec.baseline_spec(one)
    simulator, bases = prepare(baseline)
    names, rows, source = _ensemble_scales(spec, bases.params, runs, storage_options)
    _check_members_step((baseline, spec.sweep_spec(one)), simulator, bases.params, names, rows)
    started = time.perf_counter()
    platforms = {compute_platform()}  # the gradient search and the evaluations run in this process
    if spec.method == "gradient":
        values, search = _gradient_search(spec)
    else:
        if out_url is None:
            raise RecommendError("the sampled search writes a sweep dataset: give out_url")
        values, search, chunks = _sampled_search(spec, f"{out_url.rstrip('/')}/{SEARCH_DIR}", storage_options)
        platforms.update(chunks)
    optimiser_s = time.perf_counter() - started
    plan = spec.sweep_spec(one).model_copy(update={"inputs": {**spec.inputs, **dict(zip(spec.block_names,
                                                                                        values.tolist()))}})
    planned, base = _evaluate(plan, names, rows), _evaluate(baseline, names, rows)
    change = planned[spec.objective] - base[spec.objective]
    within, no_worse = np.ones(rows.shape[0], bool), np.ones(rows.shape[0], bool)
    for b in spec.constraints:
        within &= planned[b.metric] == 0.0
        no_worse &= planned[b.metric] <= base[b.metric]
    model = plan.kit(simulator).model
    unit = model.inputs[model.input_names.index(spec.control.input)].unit
    nominal = lambda m: {k: float(v[0]) for k, v in m.items() if k != "diverged"}  # noqa: E731
    status, violations = _verdict(spec, nominal(planned), nominal(base), {s.name: s.unit for s in model.states})
    if status == "feasible":
        _check_chance(spec, planned, within)
    answer = Recommendation(
        status=status, violations=violations, start_time=spec.start_time, warnings=spec.start_warnings,
        start_revision=spec.start_revision, start_etag=spec.start_etag,
        method=spec.method, model_ref=resolve_model(spec.model, spec.registry_url).ref, tenant=spec.tenant, asset_id=spec.asset_id,
        start_state=bases.state, horizon_s=spec.horizon_s, step_s=spec.step_s,
        action=ActionSchedule(input=spec.control.input, unit=unit, block_s=spec.control.block_s,
                              period_s=spec.period_s, starts_s=spec.starts_s,
                         values=values.tolist()),
        objective=spec.objective, baseline=nominal(base), recommended=nominal(planned),
        change=float(change[0]), change_pct=float(100.0 * change[0] / base[spec.objective][0]),
        change_band=_band(change), change_pct_band=_band(100.0 * change / base[spec.objective]),
        feasible_fraction=float(within.mean()), no_worse_fraction=float(no_worse.mean()), uncertainty=source,
        constraints=spec.constraints, search=search)
    log.info("event=recommendation model=%s asset=%s method=%s status=%s change=%.4g change_pct=%.2f optimiser_s=%.2f",
             spec.model, spec.asset_id, spec.method, status, answer.change, answer.change_pct, optimiser_s)
    return answer, SearchRun(optimiser_s, sorted(platforms))


def write_result(answer: Recommendation, out_url: str, storage_options: dict | None) -> dict[str, str]:
    """Write `recommendation.json` under `out_url`; file name -> SHA-256 of everything written there."""
    fs, root = filesystem(out_url.rstrip("/"), storage_options)
    make_folder(fs, root)
    body = json.dumps(answer.model_dump(mode="json", exclude={"run_id"}), sort_keys=True).encode()
    replace_file(fs, f"{root}/{RESULT_FILE}", body)
    outputs = {RESULT_FILE: hashlib.sha256(body).hexdigest()}
    for name, digest in answer.search.get("sweep_outputs", {}).items():
        outputs[f"{SEARCH_DIR}/{name}"] = digest
    return outputs


def recorded_recommendation(
    spec: RecommendSpec, *, runs: str = DEFAULT_RUNS_ROOT, storage_options: dict | None = None,
    user: str | None = None, rerun_of: str | None = None,
) -> tuple[RunRecord, Recommendation]:
    """Recommend into a new run (`recommendation.json`, and the sampled search's sweep) and record it;
    the optimiser's wall time and the platforms it computed on are in the record's summary (`optimiser_s`,
    `platforms`), not in the hashed outputs."""
    answers: list[Recommendation] = []

    def execute(out_url: str) -> tuple[dict, dict]:
        answer, search = recommend(spec, out_url, runs=runs, storage_options=storage_options)
        answers.append(answer)
        summary = {"method": spec.method, "status": answer.status, "objective": spec.objective,
                   "change": answer.change, "change_pct": answer.change_pct,
                   "optimiser_s": round(search.optimiser_s, 3), "platforms": search.platforms}
        return write_result(answer, out_url, storage_options), summary

    record = _recorded(RunStore(runs, storage_options), "recommendation", spec, execute, input_url=None,
                       input_hash=None, seeds={"search": spec.seed, "ensemble": spec.ensemble.seed}, user=user,
                       rerun_of=rerun_of)
    return record, answers[0].model_copy(update={"run_id": record.run_id})


def load_recommendation(run_id: str, *, runs: str = DEFAULT_RUNS_ROOT,
                        storage_options: dict | None = None) -> Recommendation:
    """The recommendation of a recorded run (`RunError` for an unknown run or one of another kind)."""
    store = RunStore(runs, storage_options)
    record = store.load(run_id)
    if record.kind != "recommendation" or record.status != "succeeded":
        raise RunError(f"run {run_id} is a {record.status} {record.kind}, not a succeeded recommendation")
    fs, root = filesystem(store.output_url(run_id), storage_options)
    with store_io("read"):
        body = fs.cat_file(f"{root}/{RESULT_FILE}")
    answer = Recommendation.model_validate_json(body)
    return answer.model_copy(update={"run_id": run_id})


__all__ = ["Band", "Bound", "Control", "Ensemble", "InfeasibleRecommendation", "Recommendation", "RecommendError",
           "RecommendSpec", "SearchRun", "Status", "Violation", "ActionSchedule", "load_recommendation", "recommend",
           "recorded_recommendation", "write_result"]
