"""Checks a model must pass before RayTwin runs it, and the RK4 stability limit of a step.

`check_model` runs a model's functions the way RayTwin will: names and shapes (each function
returns one array per variable, broadcasting over a batch), scenarios kept apart (a scenario's value
in a batch of two is its value alone: no sum or index across the batch), finite values at the nominal point and
at the corners of the parameter bounds (and after a short probe run there), traceability under
``jit``, ``vmap`` and ``jacfwd``, and numerical stability. Each failure is a `ModelCheckError`: one
line naming the model and the field.

Stability: a fixed-step RK4 run multiplies a mode of eigenvalue lambda by R(h lambda) per step,
R(z) = 1 + z + z^2/2 + z^3/6 + z^4/24. The step `h` is stable while |R(h lambda)| <= 1 for every
eigenvalue of the Jacobian d derivative / d state (evaluated at the nominal state and inputs);
along the negative real axis that is h <= 2.785/|lambda|, on the imaginary axis h <= 2.828/|lambda|.
Modes with a positive real part grow in the exact solution too and set no limit. The limit of a
parameter *box* is the smallest over its corners (all 2^p, or `MAX_CORNERS` drawn with a fixed
seed when there are more), a heuristic for nonlinear models, exact at the corners only.

What is refused (a demanding user expects a step that diverges never to be run silently):
- `check_model`: a default step (or the given `dt`) beyond the limit at the default parameters; a
  box whose corners need a smaller step is reported as a warning (bounds are admissible values,
  not typical ones: thermal_rc's box reaches C_in 1e5 J/K with R_im 1e-5 K/W, limit ~2.8 s);
- `check_step` (registry artifacts, `simulate`, `simulate_batch`, `rollout` with concrete values,
  sweeps): a step beyond the limit of the parameter values actually used (their box, for a
  batch), unless the caller passes ``allow_unstable=True``: then a loud warning and a log line;
- `check_finite_run` (`simulate`, `simulate_batch`): a run whose states turned NaN or inf, as the limit is
  checked at the nominal state only and a start far from it can be stiffer (``allow_unstable=True``: a warning).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from raytwin.sim.model import Model, ModelCheckError, model_step, unstack
from raytwin.sim.precision import float64
from raytwin.sim.stiff import Adaptive

log = logging.getLogger("raytwin.sim")

MAX_CORNERS = 256
"""Parameter-box corners checked at most; beyond 2^8 corners a fixed-seed random subset."""
PROBE_STEPS = 10
"""Steps of the probe run at each corner (at the checked step, or half the corner's limit if smaller)."""
_RAY_POINTS = np.linspace(0.0, 4.0, 4001)[1:]  # |z| along a ray: RK4's stability region lies within |z| < 3


class UnstableStepError(ModelCheckError):
    """A step beyond the RK4 stability limit of the parameters it would run with."""


class UnstableStepWarning(UserWarning):
    """A step beyond the RK4 stability limit that the caller insisted on (``allow_unstable=True``)."""


class DivergedRunError(ModelCheckError):
    """A run whose states turned NaN or inf (returned, its NaN rows read as results): the first scenario that did,
    the step and time from the start where it did, and its states that did."""

    def __init__(self, model: str, field: str, reason: str, scenario: int, step: int, time_s: float,
                 states: list[str]):
        super().__init__(model, field, reason)
        self.scenario, self.step, self.time_s, self.states = scenario, step, time_s, states

    def __reduce__(self) -> tuple[type[DivergedRunError], tuple]:  # (ModelCheckError's: in a Ray task too)
        return type(self), (self.model, self.field, self.reason, self.scenario, self.step, self.time_s, self.states)


def _rk4_gain(z: np.ndarray) -> np.ndarray:
    return np.abs(1.0 + z * (1.0 + z * (0.5 + z * (1.0 / 6.0 + z / 24.0))))


def rk4_limits(eigenvalues: np.ndarray) -> np.ndarray:
    """For each eigenvalue, the largest h with |R(h lambda)| <= 1 (bisection along the ray from 0);
    inf for lambda = 0 and for growing modes (Re lambda > 0)."""
    lam = np.asarray(eigenvalues, dtype=np.complex128).ravel()
    mag = np.abs(lam)
    growing = lam.real > 1e-9 * mag
    active = (mag > 0) & ~growing & np.isfinite(mag)
    out = np.full(lam.shape, np.inf)
    if not np.any(active):
        return out
    direction = (np.minimum(lam.real, 0.0) + 1j * lam.imag)[active] / mag[active]
    gain = _rk4_gain(_RAY_POINTS[None, :] * direction[:, None])
    first = np.argmax(gain > 1.0 + 1e-12, axis=1)  # the region is bounded: every ray leaves it
    hi = _RAY_POINTS[first]
    lo = np.where(first > 0, _RAY_POINTS[np.maximum(first - 1, 0)], 0.0)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        inside = _rk4_gain(mid * direction) <= 1.0 + 1e-12
        lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
    out[active] = lo / mag[active]
    return out


def nominal_point(model: Model) -> tuple[np.ndarray, np.ndarray]:
    """(state, inputs) where checks evaluate the model: each variable's ``nominal``, else the middle
    of its range (or its one finite bound, or 0)."""

    def value(v: Any) -> float:
        if getattr(v, "nominal", None) is not None:
            return float(v.nominal)
        finite = [b for b in (v.lower, v.upper) if math.isfinite(b)]
        return sum(finite) / len(finite) if finite else 0.0

    return (np.array([value(v) for v in model.states], dtype=np.float64),
            np.array([value(v) for v in model.inputs], dtype=np.float64))


def declared_inputs(model: Model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The box of the inputs' declared ranges, (lows, highs); an unbounded side at the nominal value."""
    u = nominal_point(model)[1]
    lows = tuple(v.lower if math.isfinite(v.lower) else float(n) for v, n in zip(model.inputs, u))
    highs = tuple(v.upper if math.isfinite(v.upper) else float(n) for v, n in zip(model.inputs, u))
    return lows, highs


def box_corners(lows: Sequence[float], highs: Sequence[float], *, seed: int = 0) -> np.ndarray:
    """Corners of the box [lows, highs], shape (k, p): all of them up to `MAX_CORNERS`, else that many
    drawn with a fixed seed (reproducible reports)."""
    lows, highs = np.asarray(lows, dtype=np.float64), np.asarray(highs, dtype=np.float64)
    varying = np.flatnonzero(lows != highs)
    if 2 ** len(varying) <= MAX_CORNERS:
        bits = (np.arange(2 ** len(varying))[:, None] >> np.arange(len(varying))[None, :]) & 1
    else:
        bits = np.random.default_rng(seed).integers(0, 2, size=(MAX_CORNERS, len(varying)))
    corners = np.repeat(lows[None, :], len(bits), axis=0)
    corners[:, varying] = np.where(bits == 1, highs[varying], lows[varying])
    return corners


@cache
def _jacobians(model: Model) -> Callable:
    """jit(vmap over rows of (inputs, parameters) of d derivative / d state), for one model."""

    def f(x, u, p):
        return jnp.stack(model.derivative(unstack(x), unstack(u), model.coefficients(unstack(p))))

    return jax.jit(jax.vmap(jax.jacfwd(f), in_axes=(None, 0, 0)))


def stability_limits(model: Model, param_rows: np.ndarray, input_rows: np.ndarray | None = None,
                     state: np.ndarray | None = None) -> np.ndarray:
    """The RK4 step limit [s] for each row of parameter values (k, p), at the nominal state (or `state`) and at the
    nominal inputs or the same row of `input_rows` (k, m); NaN where the Jacobian is not finite."""
    x, u = nominal_point(model)
    x = x if state is None else np.asarray(state, dtype=np.float64)
    rows = np.atleast_2d(np.asarray(param_rows, dtype=np.float64))
    inputs = np.broadcast_to(u, (len(rows), len(u))) if input_rows is None else \
        np.atleast_2d(np.asarray(input_rows, dtype=np.float64))
    with float64():
        jac = np.asarray(_jacobians(model)(x, inputs, rows))
    finite = np.all(np.isfinite(jac), axis=(1, 2))
    n = len(model.states)
    eig = np.linalg.eigvals(np.where(finite[:, None, None], jac, 0.0))
    limits = rk4_limits(eig).reshape(-1, n).min(axis=1)
    return np.where(finite, limits, np.nan)


def stability_limit(model: Model, params: Sequence[float] | None = None) -> float:
    """The RK4 step limit [s] at parameter values `params` (model order; default: the defaults)."""
    row = model.param_vector() if params is None else list(params)
    return float(stability_limits(model, np.asarray([row]))[0])


@dataclass(frozen=True)
class BoxLimit:
    """The smallest RK4 step limit over a box of parameters (and inputs) and the corner where it is reached."""

    dt_max: float
    corner: tuple[float, ...]
    corners: int
    inputs: tuple[float, ...] | None = None  # the inputs at that corner (None: the nominal ones)


def joint_corners(lows: Sequence[float], highs: Sequence[float], input_lows: Sequence[float],
                  input_highs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(parameter rows, input rows) at the corners of one box of parameters and inputs (`box_corners`)."""
    both = box_corners((*lows, *input_lows), (*highs, *input_highs))
    return both[:, :len(lows)], both[:, len(lows):]


@lru_cache(maxsize=4096)
def box_limit(model: Model, lows: tuple[float, ...], highs: tuple[float, ...],
              input_lows: tuple[float, ...] | None = None, input_highs: tuple[float, ...] | None = None) -> BoxLimit:
    """`BoxLimit` of the parameter box [lows, highs], at the nominal inputs or over the input box [input_lows,
    input_highs] (one box of both: the stiffness of a valve's tank grows with its opening; cached: entry
    points check every call against it)."""
    if input_lows is None or input_highs is None:
        corners = box_corners(lows, highs)
        limits = stability_limits(model, corners)
        inputs = None
    else:
        corners, inputs = joint_corners(lows, highs, input_lows, input_highs)
        limits = stability_limits(model, corners, inputs)
    k = int(np.argmin(np.where(np.isnan(limits), -np.inf, limits)))
    return BoxLimit(float(limits[k]), tuple(float(v) for v in corners[k]), len(corners),
                    None if inputs is None else tuple(float(v) for v in inputs[k]))


def describe_params(model: Model, values: Sequence[float], inputs: Sequence[float] | None = None) -> str:
    """'C_in=1e+05, R_im=1e-05' for the parameters that differ from their defaults (and 'opening=1' for the
    `inputs` that differ from their nominal values)."""
    changed = [f"{p.name}={v:g}" for p, v in zip(model.params, values) if v != p.default]
    if inputs is not None:
        changed += [f"{n}={v:g}" for n, v, u in zip(model.input_names, inputs, nominal_point(model)[1]) if v != u]
    return ", ".join(changed) if changed else "the default parameters"


def check_start(model: Model, x0: Sequence[Any]) -> None:
    """Refuse a start state (one value or array per state) with NaN or inf: the run would be NaN
    from the first step and read as a divergence."""
    bad = [n for n, v in zip(model.state_names, x0) if not np.all(np.isfinite(np.asarray(v, dtype=np.float64)))]
    if bad:
        raise ModelCheckError(model.name, "x0", f"the start value of {', '.join(bad)} is not finite; "
                              "give finite values")


def check_params(model: Model, params: np.ndarray) -> None:
    """Refuse parameter values (an array whose last axis is the model's parameters) outside their declared
    bounds, as sweeps, calibration and the registry do: the bounds are the values the model is valid for,
    and a run outside them is a result of equations nobody vouched for."""
    values = np.asarray(params, dtype=np.float64).reshape(-1, len(model.params))
    if not values.size:
        return
    low, high = values.min(axis=0), values.max(axis=0)
    outside = [f"{p.name}={v:g} is outside its bounds [{p.lower:g}, {p.upper:g}]"
               for p, lo, hi in zip(model.params, low, high) for v in (lo, hi) if not p.lower <= v <= p.upper]
    if outside:
        raise ModelCheckError(model.name, "params", "; ".join(dict.fromkeys(outside)) + ": give values within "
                              "them, or widen the parameter's bounds in the model if they are admissible")


def _non_finite_at(model: Model, values: Sequence[float], corner: bool) -> str:
    """Why the stability check cannot run at parameter `values`: every value (any of them may be the
    cause), and those outside their declared bounds, the usual reason. A smaller step cannot help."""
    named = ", ".join(f"{p.name}={v:g}" for p, v in zip(model.params, values))
    outside = [f"{p.name}={v:g} is outside its bounds [{p.lower:g}, {p.upper:g}]"
               for p, v in zip(model.params, values) if not p.lower <= v <= p.upper]
    hint = "; ".join(outside) if outside else "use values at which the model's equations are defined"
    where = " (a corner of the parameter box)" if corner else ""
    return f"parameters {named}{where} make the derivative non-finite (its Jacobian at the nominal state): {hint}"


def check_step(
    model: Model, dt: float, params: Sequence[Any] | None = None, *, inputs: Any = None,
    allow_unstable: bool = False, what: str = "dt",
) -> BoxLimit:
    """Refuse (or, with `allow_unstable`, warn loudly about) a step `dt` beyond the RK4 stability limit
    of `params`: one value or one array per parameter (a batch: checked over its box), default
    the model's defaults, with `inputs` (an array whose last axis is the model's inputs, e.g. a
    series (n_steps, m): checked over the box of their values; default the nominal inputs). `what`
    names the field in the message. Returns the limit.

    A step that is not a finite number of seconds > 0, an empty batch and inputs that are not finite
    are refused first (a negative step would integrate backwards in time, a zero one never move, a
    NaN input makes the whole run NaN)."""
    if not (math.isfinite(float(dt)) and float(dt) > 0):
        raise ModelCheckError(model.name, what, f"must be a finite number of seconds > 0, got {float(dt):g}")
    values = model.param_vector() if params is None else params
    if len(values) != len(model.params):
        raise ValueError(f"{model.name}: {len(values)} parameter values, expected {model.param_names}")
    arrays = [np.asarray(v, dtype=np.float64) for v in values]
    if any(a.size == 0 for a in arrays):
        raise ModelCheckError(model.name, "params", "batch is empty: give at least one scenario")
    input_lows = input_highs = None
    if inputs is not None and len(model.inputs):
        table = np.asarray(inputs, dtype=np.float64).reshape(-1, len(model.inputs))
        if not np.all(np.isfinite(table)):
            bad = [n for n, col in zip(model.input_names, table.T) if not np.all(np.isfinite(col))]
            raise ModelCheckError(model.name, "inputs", f"{', '.join(bad)}: not finite (NaN or inf) in the input "
                                  "series; the whole run would be NaN")
        if len(table):
            input_lows, input_highs = tuple(table.min(axis=0).tolist()), tuple(table.max(axis=0).tolist())
    check_functions(model)
    if model.solver is not None:  # an adaptive solver chooses its own steps
        return BoxLimit(math.inf, tuple(model.param_vector()), 0)
    lows = tuple(float(a.min()) for a in arrays)
    highs = tuple(float(a.max()) for a in arrays)
    limit = box_limit(model, lows, highs, input_lows, input_highs)
    if input_lows is not None and (nominal := box_limit(model, lows, highs)).dt_max <= limit.dt_max * (1 + 1e-9):
        limit, input_lows, input_highs = nominal, None, None  # the inputs do not set it: name the parameters only
    if not float(dt) <= limit.dt_max:
        if math.isnan(limit.dt_max):  # no step is stable or unstable there: the parameters are the problem
            field_, reason = "params", _non_finite_at(model, limit.corner, lows != highs)
            fix = "allow_unstable=True runs it anyway"
        else:
            corner = "the corner " if input_lows != input_highs else "the parameter corner " if lows != highs else ""
            field_, reason = what, (f"step {float(dt):g} s is beyond the RK4 stability limit {limit.dt_max:.4g} s "
                                    f"at {corner}{describe_params(model, limit.corner, limit.inputs)}")
            fix = _step_fix(what, limit.dt_max)
        if not allow_unstable:
            raise UnstableStepError(model.name, field_, f"{reason} ({fix})")
        warnings.warn(f"model {model.name}: {field_}: {reason}: the run may diverge", UnstableStepWarning,
                      stacklevel=3)
        log.warning("event=unstable_step model=%s dt=%g limit=%g", model.name, float(dt), limit.dt_max)
    return limit


def check_finite_run(model: Model, traj: np.ndarray, inputs: np.ndarray, params: np.ndarray, dt: float, *,
                     allow_unstable: bool = False) -> None:
    """Refuse (with `allow_unstable`, warn about) trajectories (batch, n_steps + 1, n_states) whose states turned
    NaN or inf, naming the first scenario, step and time. `check_step` checks the step at the nominal state only,
    as a check at the start state would refuse legitimate starts (an empty two-tank, whose Jacobian is infinite
    at h = 0); a start far from the nominal state can be stiffer (dx/dt = -k x^3 from x = 100 went to 1e110, then
    NaN), so the run itself is checked. `inputs`: (n_steps, m), or (batch, n_steps, m); `params`: (batch, p)."""
    bad = ~np.isfinite(traj)
    if not bad.any():
        return
    rows = bad.any(axis=2)
    diverged = np.flatnonzero(rows.any(axis=1))
    s = int(diverged[0])
    step = int(np.argmax(rows[s]))
    names = [n for n, b in zip(model.state_names, bad[s, step]) if b]
    before = ", ".join(f"{n}={v:.4g}" for n, v in zip(model.state_names, traj[s, step - 1]))
    which = f"scenario {s} ({len(diverged)} of {len(traj)} diverged): " if len(traj) > 1 else ""
    reason = (f"the run diverged: {which}{', '.join(names)} not finite from step {step} (t = {step * float(dt):g} s "
              f"from the start), after {before} at step {step - 1}")
    if isinstance(model.solver, Adaptive):
        fix = "the adaptive solver could not follow it: check the model's equations at those states and parameters"
    else:
        first = np.atleast_2d(np.asarray(inputs, dtype=np.float64)[..., 0, :])  # shared, or one row a scenario
        limit = stability_limits(model, params[s:s + 1], first[s if len(first) > 1 else 0][None], traj[s, 0])[0]
        at_start = f" (at this start state the limit is {limit:.4g} s)" if math.isfinite(limit) else ""
        fix = (f"the step {float(dt):g} s was checked against RK4's stability limit at the model's nominal state "
               f"only{at_start}: use a smaller step, or an adaptive solver "
               "(Model(solver=raytwin.sim.stiff.Adaptive())); no step helps where the exact solution blows up "
               "(dx/dt = x^2 does at t = 1/x0)")
    if not allow_unstable:
        raise DivergedRunError(model.name, "dt", f"{reason}; {fix}", s, step, step * float(dt), names)
    warnings.warn(f"model {model.name}: dt: {reason}", UnstableStepWarning, stacklevel=3)
    log.warning("event=diverged_run model=%s dt=%g step=%d", model.name, float(dt), step)


def _step_fix(what: str, dt_max: float) -> str:
    """How to get within the limit: the model's declared step names the value to declare."""
    if what != "default_dt":
        return "use a smaller step, or allow_unstable=True"
    return (f"declare default_dt at most {_round_down(dt_max):g} s, or solver=raytwin.sim.stiff.Adaptive() for a "
            "stiff model")


def _round_down(x: float, digits: int = 3) -> float:
    """`x` cut to `digits` significant digits, never rounded up: a step to declare must stay within its limit."""
    scale = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return math.floor(x / scale) * scale


# ----------------------------------------------------------------------- sampled feedback ----
@cache
def _loop_jacobians(model: Model) -> Callable:
    """jit(vmap over rows of (inputs, parameters) of d next state / d state for one step whose inputs follow
    the state at the step's start, ``u0 + gains (x - x0)``, held through the step), for one model."""

    def step(xv, x0, u0, p, gains, dt):
        u = u0 + gains @ (xv - x0)
        return jnp.stack(model_step(model, unstack(xv), unstack(u), model.coefficients(unstack(p)), dt))

    return jax.jit(jax.vmap(jax.jacfwd(step), in_axes=(None, None, 0, 0, None, None)))


def _loop_radii(model: Model, x: np.ndarray, rows: np.ndarray, inputs: np.ndarray, gains: np.ndarray,
                dt: float) -> np.ndarray:
    """The spectral radius of each row's one-step map of the sampled loop (NaN where not finite)."""
    with float64():
        jac = np.asarray(_loop_jacobians(model)(x, x, inputs, rows, gains, jnp.float64(dt)))
    finite = np.all(np.isfinite(jac), axis=(1, 2))
    radii = np.abs(np.linalg.eigvals(np.where(finite[:, None, None], jac, 0.0))).max(axis=1)
    return np.where(finite, radii, np.nan)


def check_sampled_loop(
    model: Model, dt: float, lows: Sequence[float], highs: Sequence[float], input_lows: Sequence[float],
    input_highs: Sequence[float], *, state: Sequence[float], gains: np.ndarray, loop: str,
    allow_unstable: bool = False, what: str = "dt",
) -> float:
    """Refuse (or, with `allow_unstable`, warn loudly about) a step at which inputs computed from the state at
    each step's start and held through the step (a sampled feedback loop: `gains` is d input / d state,
    (m, n), where no input saturates) make the loop unstable, anywhere in the box of parameters and inputs
    [lows, highs] x [input_lows, input_highs], linearised at `state`. Returns the largest stable step at the
    worst corner (inf when the step is stable at every corner).

    The open-loop RK4 limit (`check_step`) does not see this: a thermostat whose gain is large against the
    room's heat capacity overshoots when it acts on a state a whole step old, and from step to step the
    heater swings between its bounds (thermal_rc at C_in 1e5 J/K with a 5 kW/K thermostat: open-loop limit
    463 s, loop stable up to 40.2 s; at 60 s, 2.7 h of two days outside the comfort band where 2 s steps
    gave none). Corners where the continuous loop itself grows
    (a tiny step's map grows too) are left alone: there the growth is the system's, not the step's.
    `loop` names the loop in the message."""
    rows, inputs = joint_corners(lows, highs, input_lows, input_highs)
    x, gains = np.asarray(state, dtype=np.float64), np.asarray(gains, dtype=np.float64)
    tiny = float(dt) * 1e-4
    radii = _loop_radii(model, x, rows, inputs, gains, dt)
    growing = _loop_radii(model, x, rows, inputs, gains, tiny) > 1.0 + 1e-12
    unstable = (radii > 1.0 + 1e-9) & ~growing
    if not np.any(unstable):
        return math.inf
    k = int(np.argmax(np.where(unstable, radii, -np.inf)))
    lo, hi = tiny, float(dt)  # the step is unstable at hi, stable at lo
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        stable = _loop_radii(model, x, rows[k:k + 1], inputs[k:k + 1], gains, mid)[0] <= 1.0 + 1e-9
        lo, hi = (mid, hi) if stable else (lo, mid)
    at = describe_params(model, rows[k], inputs[k])
    reason = (f"step {float(dt):g} s makes the sampled feedback loop unstable: {loop}, computed at each step's "
              f"start and held through it, grows {radii[k]:.4g}x per step at {at}, where the largest stable step "
              f"is {lo:.4g} s (the run would oscillate instead of settling, swinging between the input's bounds "
              "where it saturates)")
    if not allow_unstable:
        raise UnstableStepError(model.name, what, f"{reason} (use a smaller step or gain, or allow_unstable=True)")
    warnings.warn(f"model {model.name}: {what}: {reason}", UnstableStepWarning, stacklevel=3)
    log.warning("event=unstable_loop model=%s dt=%g limit=%g", model.name, float(dt), lo)
    return lo


# ------------------------------------------------------------------------------- check_model ----
@dataclass(frozen=True)
class ModelReport:
    """What `check_model` found: the step checked, its limits, and warnings that did not fail it."""

    model: str
    dt: float
    dt_max: float  # at the default parameters
    box_dt_max: float  # over the corners of the parameter bounds
    box_corner: dict[str, float]
    corners: int
    warnings: tuple[str, ...] = field(default=())
    adaptive: str | None = None  # the model's `Adaptive` solver, which has no RK4 limit and runs in float64 only

    def lines(self) -> list[str]:
        step = (f"step {self.dt:g} s; RK4 stability limit {self.dt_max:.4g} s at the default parameters, "
                f"{self.box_dt_max:.4g} s over {self.corners} corners of the parameter bounds")
        if self.adaptive is not None:
            step = (f"step {self.dt:g} s, integrated by {self.adaptive} under its own step control (no RK4 limit), "
                    "in float64 only: simulate, simulate_batch and sweeps choose float64 for it")
        return [f"model {self.model}: ok", step, *(f"warning: {w}" for w in self.warnings)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _call(model: Model, name: str, fn: Callable, *args: Any) -> Any:
    try:
        return fn(*args)
    except ModelCheckError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported the same way
        raise ModelCheckError(model.name, name, f"raised {_first_line(exc)}") from None


def _returns(model: Model, name: str, value: Any, expected: tuple[str, ...], batch: tuple[int, ...]) -> tuple:
    """`value` as a tuple of `len(expected)` arrays that broadcast to `batch`."""
    what = ", ".join(expected)
    if not isinstance(value, tuple | list):
        raise ModelCheckError(model.name, name, f"must return a tuple of arrays ({what}), got {type(value).__name__}")
    if name != "coefficients" and len(value) != len(expected):
        raise ModelCheckError(model.name, name, f"returned {len(value)} value(s), expected {len(expected)} ({what})")
    for i, v in enumerate(value):
        shape = np.shape(v)
        try:
            ok = np.broadcast_shapes(shape, batch) == batch
        except ValueError:
            ok = False
        if not ok:
            label = expected[i] if i < len(expected) else f"[{i}]"
            raise ModelCheckError(model.name, name, f"{label} has shape {shape}, which does not broadcast "
                                                    f"to the batch shape {batch}")
        if name != "coefficients" and _integral(v):
            raise ModelCheckError(model.name, name, f"{expected[i]} is {np.dtype(v.dtype)}: return floating-point "
                                                    "values (a cast to an integer or boolean type truncates the value "
                                                    "and has no derivative, so the stability limit and the EKF see 0)")
    return tuple(value)


def _integral(value: Any) -> bool:
    """An integer or boolean array: not a Python number or a weakly typed constant, which take the state's float
    type in the step's arithmetic."""
    dtype = getattr(value, "dtype", None)
    return dtype is not None and not np.issubdtype(dtype, np.inexact) and not getattr(value, "weak_type", False)


def _functions(model: Model) -> list[tuple[str, Callable, tuple[str, ...]]]:
    """(name, function of (x, u, p), names of what it returns) for every model function."""
    coeffs = lambda x, u, p: model.coefficients(p)  # noqa: E731
    out = [("coefficients", coeffs, ()),
           ("derivative", lambda x, u, p: model.derivative(x, u, model.coefficients(p)), model.state_names),
           ("output", lambda x, u, p: model.output(x, u, model.coefficients(p)), model.output_names)]
    if model.update is not None:
        out.append(("update", lambda x, u, p: model.update(x, u, model.coefficients(p)), model.state_names))
    out.append(("project", lambda x, u, p: model.project(x), model.state_names))
    return out


def _shapes(model: Model, x: np.ndarray, u: np.ndarray, p: np.ndarray, batch: tuple[int, ...]) -> None:
    """Each function returns one array per variable, broadcasting to `batch` (variables given as arrays of it)."""
    args = tuple(tuple(np.broadcast_to(a, batch) for a in arrays) for arrays in (x, u, p))
    for name, fn, expected in _functions(model):
        _returns(model, name, _call(model, name, fn, *args), expected, batch)


def _traceable(model: Model, x: np.ndarray, u: np.ndarray, p: np.ndarray) -> None:
    """Each function under jit, vmap and jacfwd (Python control flow on a traced value fails here)."""
    args = tuple(tuple(jnp.asarray(v) for v in a) for a in (x, u, p))
    batched = tuple(tuple(jnp.full((2,), v) for v in a) for a in args)
    for name, fn, _ in _functions(model):
        _call(model, f"{name} (under jax.jit)", jax.jit(fn), *args)
        _call(model, f"{name} (under jax.vmap)", jax.vmap(fn), *batched)
        if name != "coefficients":
            def vector(xv, fn=fn):
                return jnp.stack([jnp.asarray(v) for v in fn(unstack(xv), args[1], args[2])])

            _call(model, f"{name} (under jax.jacfwd)", jax.jacfwd(vector), jnp.asarray(x))


def _shifted(v: float, lower: float, upper: float) -> float:
    """`v` moved a quarter of the way to a finite bound (by a quarter of its size, at least 0.25, towards an infinite
    one): another admissible value. A variable fixed by its bounds keeps its value."""
    if upper > v:
        return v + 0.25 * (upper - v if math.isfinite(upper) else max(abs(v), 1.0))
    if lower < v:
        return v - 0.25 * (v - lower if math.isfinite(lower) else max(abs(v), 1.0))
    return v


def _scenario_independent(model: Model, x: np.ndarray, u: np.ndarray, p: np.ndarray) -> None:
    """Each function's value for a scenario in a batch of two distinct ones is its value for that scenario alone. A
    function that reduces or indexes across its arrays (``jnp.sum(x)``, ``x[0]``) passes the shape checks (its result
    broadcasts) and is right under ``vmap``, but mixes the scenarios of a batch of arrays, as a sweep's or a shard's."""
    other = tuple(np.array([_shifted(float(v), q.lower, q.upper) for v, q in zip(values, declared)])
                  for values, declared in ((x, model.states), (u, model.inputs), (p, model.params)))
    points = ((x, u, p), other)
    pair = tuple(tuple(jnp.asarray([a, b]) for a, b in zip(one, two)) for one, two in zip(*points))
    for name, fn, expected in _functions(model):
        together = fn(*pair)
        for k, point in enumerate(points):
            alone = fn(*(tuple(jnp.asarray(v) for v in arrays) for arrays in point))
            for i, (batched, single) in enumerate(zip(together, alone)):
                got, want = np.broadcast_to(np.asarray(batched), (2,))[k], np.asarray(single)
                if not np.allclose(got, want, rtol=1e-7, atol=0.0, equal_nan=True):
                    label = expected[i] if i < len(expected) else f"[{i}]"
                    raise ModelCheckError(model.name, f"{name}.{label}", (
                        f"mixes the scenarios of a batch: {got:g} for scenario {k} of a batch of two, {want:g} for it "
                        "alone (a sum, mean, max or index across the arrays, e.g. jnp.sum(x[0]) or x[0][0]); write it "
                        "for one scenario, elementwise: RayTwin applies it to batches (vmap, or arrays of scenarios)"))


def _finite(model: Model, x: np.ndarray, u: np.ndarray, rows: np.ndarray, limits: np.ndarray, dt: float) -> None:
    """Every function finite at each parameter row, and the state and outputs after a probe run."""
    rows_t = tuple(jnp.asarray(c) for c in rows.T)
    n = rows.shape[0]
    xb = tuple(jnp.full((n,), v) for v in x)
    ub = tuple(jnp.full((n,), v) for v in u)
    steps = np.where(np.isnan(limits), dt, np.minimum(dt, 0.5 * limits))

    def probe(x0, u0, p, h):
        c = model.coefficients(p)
        state = jax.lax.fori_loop(0, PROBE_STEPS, lambda _, x: tuple(model_step(model, x, u0, c, h)), tuple(x0))
        return state, model.output(state, u0, c)

    checks = [(name, expected, fn(xb, ub, rows_t)) for name, fn, expected in _functions(model)[1:]]
    final, outputs = jax.jit(lambda *a: jax.lax.map(lambda row: probe(*row), a))(xb, ub, rows_t, jnp.asarray(steps))
    checks += [("probe run: state", model.state_names, final), ("probe run: output", model.output_names, outputs)]
    for name, expected, values in checks:
        for label, v in zip(expected, values):
            bad = ~np.isfinite(np.broadcast_to(np.asarray(v), (n,)))
            if np.any(bad):
                k = int(np.argmax(bad))
                hint = "" if not name.startswith("probe run") else (
                    f" after {PROBE_STEPS} steps of {steps[k]:g} s: a step beyond the stability limit of where the "
                    "state goes (a stiff model whose fast modes are absent at its nominal state) diverges; use a "
                    "smaller default_dt, or solver=Adaptive()")
                raise ModelCheckError(model.name, f"{name}.{label}",
                                      f"not finite at {describe_params(model, rows[k])}{hint}")


def check_model(model: Any, *, dt: float | None = None) -> ModelReport:
    """Run every check on `model` at step `dt` (default: its ``default_dt``); raises `ModelCheckError`."""
    if not isinstance(model, Model):
        raise ModelCheckError(repr(model)[:40], "model", f"is a {type(model).__name__}, not a raytwin Model")
    return _check(model, float(model.default_dt if dt is None else dt))


@lru_cache(maxsize=256)
def _check(model: Model, dt: float) -> ModelReport:
    if not (math.isfinite(dt) and dt > 0):
        raise ModelCheckError(model.name, "dt", f"must be a finite number of seconds > 0, got {dt}")
    for q in model.params:
        if not (math.isfinite(q.lower) and math.isfinite(q.upper)):
            raise ModelCheckError(model.name, f"params.{q.name}", f"bounds [{q.lower}, {q.upper}] must be finite: "
                                  "the checks probe the corners of the parameter box")
    check_functions(model)
    x, u = nominal_point(model)
    p = np.asarray(model.param_vector(), dtype=np.float64)
    with float64():
        corners = box_corners([q.lower for q in model.params], [q.upper for q in model.params])
        rows = np.concatenate([p[None, :], corners])
        limits = stability_limits(model, rows) if model.solver is None else np.full(len(rows), np.inf)
        _finite(model, x, u, rows, limits, dt)
    field_ = "default_dt" if dt == model.default_dt else "dt"
    if math.isnan(limits[0]):
        raise ModelCheckError(model.name, "derivative", "its Jacobian is not finite at the default parameters")
    if dt > limits[0]:
        raise UnstableStepError(model.name, field_, f"step {dt:g} s is beyond the RK4 stability limit "
                                                    f"{limits[0]:.4g} s at the default parameters "
                                                    f"({_step_fix(field_, limits[0])})")
    box = np.where(np.isnan(limits[1:]), -np.inf, limits[1:])
    k = int(np.argmin(box))
    notes = []
    if dt > limits[1 + k]:
        notes.append(f"{field_} {dt:g} s is beyond the RK4 stability limit {limits[1 + k]:.4g} s at the parameter "
                     f"corner {describe_params(model, corners[k])}: artifacts and sweeps with such values are "
                     "refused at this step")
    if model.solver is None and len(model.inputs):  # the declared input ranges, at the default parameters
        at = tuple(float(v) for v in p)
        by_inputs = box_limit(model, at, at, *declared_inputs(model))
        if dt > by_inputs.dt_max:
            notes.append(f"{field_} {dt:g} s is beyond the RK4 stability limit {by_inputs.dt_max:.4g} s at "
                         f"{describe_params(model, at, by_inputs.inputs)} (within the inputs' declared ranges): "
                         "simulations and sweeps with such inputs are refused at this step, and a twin fed them "
                         "predicts garbage; use a smaller step or solver=Adaptive()")
    adaptive = f"Adaptive({model.solver.method})" if isinstance(model.solver, Adaptive) else None
    return ModelReport(model.name, dt, float(limits[0]), float(limits[1 + k]),
                       dict(zip(model.param_names, corners[k].tolist())), len(corners), tuple(notes), adaptive)


@lru_cache(maxsize=256)
def check_functions(model: Model) -> None:
    """Each function of `model` returns one floating-point array per variable, in the batch's shape, and traces
    under jit, vmap and jacfwd (`ModelCheckError` otherwise): what `check_step` needs before it differentiates
    them. A model that reached a sweep by import path without `raytwin models check` raised JAX's traceback from
    inside the stability check. Once per model and process."""
    x, u = nominal_point(model)
    p = np.asarray(model.param_vector(), dtype=np.float64)
    with float64():
        _shapes(model, x, u, p, ())
        _traceable(model, x, u, p)
        _shapes(model, x, u, p, (3,))
        _scenario_independent(model, x, u, p)


def clear_caches() -> None:
    """Forget every model's checks, limits and compiled Jacobians: the next check starts cold
    (what the ``model-checks`` benchmark times)."""
    for cached in (_check, check_functions, _jacobians, box_limit):
        cached.cache_clear()


def check_registration(model: Model, params: Sequence[float], *, allow_unstable: bool = False) -> ModelReport:
    """What registering an artifact checks: `check_model` (once per model and process), then the
    model's ``default_dt`` (the step its twins run) against the limit at the artifact's `params`."""
    report = check_model(model)
    check_step(model, model.default_dt, list(params), allow_unstable=allow_unstable, what="default_dt")
    return report
