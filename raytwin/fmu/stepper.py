"""An FMU as a step function for derivative-free filters (unscented / ensemble Kalman filters).

A filter propagates arbitrary state vectors (sigma points, ensemble members), not the FMU's own
trajectory, so `step` must start the FMU from any state. FMI's get/set FMU state only restores a
state the FMU was in before; setting a continuous state of a co-simulation FMU is only allowed
before initialisation. So each call re-initialises the instance (reset, start values = the state
and parameters, initialise at t = 0), holds the inputs and takes one communication step of `dt`.
That costs one reset and initialisation per call: microseconds for the small FMUs a twin tracks.

A filter must be able to refuse a state the FMU cannot step from (`raytwin.estimation.scan_kernels`, its
look-ahead), so a step the FMU fails (fmpy raises for fmi2Discard, fmi2Error and fmi2Fatal; or its time does
not advance: `FmuStalled`) gives NaN, as a step that overflows does, instead of an exception that fails the whole dispatch of twins; the instance is
reset (or replaced) before its next call. Steps are remembered (`RECENT_STEPS`): the look-ahead of a twin's
event predicts what the next event's prediction does when its gap is split alike, and that prediction then
reads the FMU's results instead of running it again.

The counts (steps run, reused, FMU calls failed) are exported as `raytwin.metrics.FMU_STEPS` and
`FMU_FAILED_CALLS` once per `step` or `observe` call, not per row: a Ray counter's record costs about as much
as the small FMU step it would count. They carry no FMU tag: an FMU's name is its tenant's choice (a stored
FMU's modelName), and the log's `event=fmu_call_failed` names it.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from raytwin import metrics
from raytwin.fmu.describe import FmuError, FmuModel
from raytwin.fmu.instance import FmuInstance

if TYPE_CHECKING:
    from raytwin.ukf import Dynamics

log = logging.getLogger("raytwin.fmu")
MAX_PROBES = 20
"""Doublings of the probe step `FmuStepper` tries to find a fixed-step FMU's next step (2**20 times the
model's default step)."""
RECENT_STEPS = 16_384
"""Steps (one state each) `FmuStepper.step` remembers, least recently used dropped first: a dispatch's look-ahead
for 128 twins of two states with 10 sub-steps each is 128 * 10 * 5 = 6400 (a few MB in all)."""


class FmuStalled(FmuError):
    """A step after which the FMU's time stays where it was, however long the step asked: a failed call, as
    an FMI error status is (the row is NaN), not an exception that fails every twin of the dispatch."""


class FmuStepper:
    """``step(x, u, p, dt) -> x_next`` and ``observe(x, u, p) -> y`` on NumPy arrays, in the order of
    the model's ``state_names``, ``input_names``, ``param_names`` and ``output_names``; a 2-D `x`
    (one row per sigma point) is stepped row by row. A filter's noise is not in an FMU: declare it
    with `FmuModel.declare`.

    A row the FMU cannot step or observe comes back NaN (see the module docstring): a failed FMU call, or a
    row, input, parameter or step length that is not finite (no FMU call: a filter's lanes run in lockstep
    and pass NaN where they need no step). A step of length 0 is the state itself (no FMU call: an FMU
    refuses an empty step, and a twin's first event, from its prior, has none while the other twins of its
    dispatch step). `steps`, `reused` and `failed` count the FMU steps run, the steps answered from the
    remembered ones and the FMU calls that failed (exported: see the module docstring)."""

    def __init__(self, model: FmuModel):
        from fmpy import read_model_description

        md = read_model_description(model.local_path(), validate=False)
        initial = {v.name: v.initial for v in md.modelVariables}
        fixed = [n for n in model.state_names if initial.get(n) == "calculated"]
        if fixed:
            raise FmuError(f"FMU {model.name}: state(s) {fixed} have no settable start value (initial="
                           "calculated), so a filter cannot set them")
        from fmpy.fmi1 import FMICallException  # what fmpy raises for every FMI version's failed call

        self.model = model
        self.instance = FmuInstance(model, "CoSimulation")
        self._failure = FMICallException
        self._recent: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.steps = self.reused = self.failed = 0
        self._exported = (0, 0, 0)  # the counts `_export` last recorded
        # exported at 0 now: the first failures would not show in `rate()` (`raytwin.metrics.Metric.zero`)
        metrics.FMU_STEPS.zero(*({"source": s} for s in metrics.FMU_STEP_SOURCES))
        metrics.FMU_FAILED_CALLS.zero({})
        self._time = next((v.name for v in md.modelVariables if v.causality == "independent"), None)
        self._logged_interpolation = False
        state_index = {n: i for i, n in enumerate(model.state_names)}
        self._outputs_from_states = (np.array([state_index[n] for n in model.output_names], dtype=np.intp)
                                     if set(model.output_names) <= set(state_index) else None)
        """When every output is a state variable (an FMU exposing its states), `observe` reads them
        from `x` instead of initialising the FMU at each sigma point: the same values, no FMU call."""

    def _checked(self, x: np.ndarray, u: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`u` and `p` as float64 arrays, after checking the shapes of `x` (one state), `u` and `p`."""
        m = self.model
        u, p = np.asarray(u, dtype=np.float64), np.asarray(p, dtype=np.float64)
        for what, values, names in (("x", x, m.state_names), ("u", u, m.input_names), ("p", p, m.param_names)):
            if np.shape(values) != (len(names),):
                raise FmuError(f"FMU {m.name}: {what} needs {len(names)} values {list(names)}, got shape "
                               f"{np.shape(values)}")
        return u, p

    def _start(self, x: np.ndarray, u: np.ndarray, p: np.ndarray) -> None:
        m = self.model
        self.instance.initialize({**dict(zip(m.state_names, x)), **dict(zip(m.param_names, p))}, 0.0)
        self.instance.set(dict(zip(m.input_names, u)))

    def _guarded(self, call: Callable[..., np.ndarray], *args: np.ndarray | float) -> np.ndarray | None:
        """`call(*args)`, or None where the FMU fails it (fmpy's exception; the instance is made usable again)."""
        try:
            return call(*args)
        except (self._failure, FmuStalled) as e:
            self.failed += 1
            if self.failed == 1:
                log.warning("event=fmu_call_failed fmu=%r reason=%r: the filter takes the result as NaN and refuses "
                            "the event that led there (logged at its first failure in this process)", self.model.name, str(e))
            self.instance = self.instance.recovered()
            return None

    def _export(self) -> None:
        """Record the counts since the last call in this process's metrics (`raytwin.metrics`)."""
        now = (self.steps, self.reused, self.failed)
        run, reused, failed = (a - b for a, b in zip(now, self._exported, strict=True))
        self._exported = now
        metrics.FMU_STEPS.inc(run, source="run")
        metrics.FMU_STEPS.inc(reused, source="reused")
        metrics.FMU_FAILED_CALLS.inc(failed)

    def step(self, x: np.ndarray, u: np.ndarray, p: np.ndarray, dt: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        try:
            if x.ndim == 2:
                return np.stack([self._step_row(row, u, p, dt) for row in x])
            return self._step_row(x, u, p, dt)
        finally:
            self._export()

    def _step_row(self, x: np.ndarray, u: np.ndarray, p: np.ndarray, dt: float) -> np.ndarray:
        u, p = self._checked(x, u, p)
        dt = float(dt)
        if dt == 0.0:
            return x.copy()
        if not (np.isfinite(dt) and _finite(x, u, p)):
            return np.full_like(x, np.nan)
        key = b"".join((x.tobytes(), u.tobytes(), p.tobytes(), np.float64(dt).tobytes()))
        if (known := self._recent.get(key)) is not None:
            self._recent.move_to_end(key)
            self.reused += 1
            return known.copy()
        x_next = self._guarded(self._step, x, u, p, dt)
        x_next = np.full_like(x, np.nan) if x_next is None else x_next
        self._recent[key] = x_next
        if len(self._recent) > RECENT_STEPS:
            self._recent.popitem(last=False)
        return x_next.copy()

    def _step(self, x: np.ndarray, u: np.ndarray, p: np.ndarray, dt: float) -> np.ndarray:
        self.steps += 1
        self._start(x, u, p)
        self.instance.do_step(0.0, dt)
        x_next = self.instance.get(self.model.state_names)
        reached = self._reached()
        if reached is None or reached >= dt * (1 - 1e-9) - 1e-12:
            return x_next
        return self._interpolated(reached, x_next, dt)

    def _reached(self) -> float | None:
        """The FMU's time, where it exposes it (None where it does not)."""
        if self._time is None:
            return None
        try:
            return float(self.instance.get((self._time,))[0])
        except Exception:  # noqa: BLE001 - an FMU that does not expose its time: nothing to check
            self._time = None
            return None

    def _interpolated(self, reached: float, x_reached: np.ndarray, dt: float) -> np.ndarray:
        """The state at `dt` of a fixed-step FMU that stopped at `reached`, its last whole step before `dt`: take
        its next step and interpolate linearly in between. Such an FMU takes no step shorter than its own, so a
        twin fed events whose gaps are no multiple of it predicted nothing and its estimate copied the
        measurements; interpolating errs by O(h^2) per call, the order of the FMU's own fixed step h."""
        if not self._logged_interpolation:
            self._logged_interpolation = True
            log.info("event=fmu_step_interpolated fmu=%r asked_s=%g reached_s=%g: the FMU takes fixed steps longer "
                     "than the twin's sub-step; states between its steps are interpolated (feed events whose gaps "
                     "are multiples of its step, DefaultExperiment stepSize %g s, to avoid it)", self.model.name,
                     dt, reached, self.model.default_dt)
        t, size = dt, max(self.model.default_dt, dt - reached)
        for _ in range(MAX_PROBES):  # the FMU's step is not declared anywhere: grow the probe until it takes one
            self.instance.do_step(t, size)
            t += size
            after = self._reached()
            if after is not None and after > dt:
                x_after = self.instance.get(self.model.state_names)
                return x_reached + (dt - reached) / (after - reached) * (x_after - x_reached)
            size *= 2
        raise FmuStalled(f"FMU {self.model.name}: its time stays at {reached:g} s after steps up to {t:g} s; it does "
                         "not advance, so a filter cannot step it from this state")

    def observe(self, x: np.ndarray, u: np.ndarray, p: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self._outputs_from_states is not None:
            if x.shape[-1:] != (len(self.model.states),):
                raise FmuError(f"FMU {self.model.name}: x needs {len(self.model.states)} values "
                               f"{list(self.model.state_names)}, got shape {x.shape}")
            return x[..., self._outputs_from_states]
        try:
            return np.stack([self._observe_row(row, u, p) for row in x]) if x.ndim == 2 else self._observe_row(x, u, p)
        finally:
            self._export()

    def _observe_row(self, x: np.ndarray, u: np.ndarray, p: np.ndarray) -> np.ndarray:
        u, p = self._checked(x, u, p)
        if not _finite(x, u, p):
            return np.full(len(self.model.outputs), np.nan)
        y = self._guarded(self._observed, x, u, p)
        return np.full(len(self.model.outputs), np.nan) if y is None else y

    def _observed(self, x: np.ndarray, u: np.ndarray, p: np.ndarray) -> np.ndarray:
        self._start(x, u, p)
        return self.instance.get(self.model.output_names)


def _finite(*arrays: np.ndarray) -> bool:
    """Whether every value of `arrays` (a row, its inputs, its parameters) is a finite number."""
    return all(np.isfinite(a).all() for a in arrays)


@functools.cache
def fmu_stepper(model: FmuModel) -> FmuStepper:
    """This process's `FmuStepper` (one FMU instance) of `model`, which its twins' filters share."""
    return FmuStepper(model)


@functools.cache
def fmu_dynamics(model: FmuModel) -> Dynamics:
    """A filter's `raytwin.ukf.Dynamics` for `model`: `fmu_stepper` behind `host_dynamics`; cached, so
    every twin of the model shares one UKF kernel."""
    from raytwin.ukf import host_dynamics

    stepper = fmu_stepper(model)
    return host_dynamics(model, stepper.step, stepper.observe)
