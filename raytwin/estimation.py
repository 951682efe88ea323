"""State estimation for live twins: an extended Kalman filter over any `raytwin.sim.Model`.

One filter serves linear and nonlinear models: the Jacobians come from `jax.jacfwd` of the
model's own RK4 step and output map, so for a linear model (``thermal_rc``) they are exact and the
filter *is* the linear Kalman filter; for ``battery_ecm`` / ``two_tank`` it is the EKF.

Why this shape:
- kernels are jitted per *model* (not per asset) and per power-of-two run length, so a shard
  holding thousands of twins of a type compiles a handful of times and then only dispatches;
- one dispatch applies a whole run of events to each of `LANES` twins (`assimilate_runs`): the
  per-event cost of a live twin used to be the Python->XLA dispatch, not the arithmetic;
- between measurements the state is propagated with sub-steps of at most ``model.default_dt``
  (inputs zero-order held), so a long telemetry gap is integrated as accurately as the simulator;
- the covariance update uses the Joseph form (stays symmetric positive semi-definite) and
  measurements may carry any subset of the outputs (missing rows are masked out exactly);
- divergence indicators (normalised innovation squared, residual mean / RMS) are exponentially
  weighted so they follow the recent behaviour of the asset; `drift` fires when the NIS mean
  exceeds its chi-square 99.9 % bound, i.e. the model no longer explains the measurements.

Everything is float64 and deterministic: the same events in the same order give bit-identical
states however they are split into calls and whichever twins share a dispatch, which is what
recovery and time travel rely on (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import chi2

import raytwin.sim  # noqa: F401  (enables float64)
from raytwin.sim import Model


@dataclass(frozen=True)
class NoiseDefaults:
    """Per-model filter defaults (SI units).

    ``process_std`` is the process-noise intensity per state in units/sqrt(s) (Q = q^2 dt per
    sub-step); ``measurement_std`` the sensor noise per output; ``initial_*`` the prior when a
    twin is registered without one; ``inputs`` the value an input holds until first measured.
    """

    initial_state: dict[str, float]
    initial_std: dict[str, float]
    process_std: dict[str, float]
    measurement_std: dict[str, float]
    inputs: dict[str, float]


DEFAULTS: dict[str, NoiseDefaults] = {
    "thermal_rc": NoiseDefaults(
        initial_state={"T_in": 293.15, "T_m": 293.15},
        initial_std={"T_in": 2.0, "T_m": 2.0},
        process_std={"T_in": 1e-2, "T_m": 1e-3},
        measurement_std={"T_in": 0.05},
        inputs={"T_out": 283.15, "Q_h": 0.0, "Q_sol": 0.0},
    ),
    "battery_ecm": NoiseDefaults(
        initial_state={"soc": 0.5, "v1": 0.0, "v2": 0.0},
        initial_std={"soc": 0.2, "v1": 0.01, "v2": 0.01},
        process_std={"soc": 1e-5, "v1": 1e-4, "v2": 1e-4},
        measurement_std={"v_terminal": 2e-3},
        inputs={"i": 0.0},
    ),
    "two_tank": NoiseDefaults(
        initial_state={"h1": 0.5, "h2": 0.5},
        initial_std={"h1": 0.1, "h2": 0.1},
        process_std={"h1": 1e-4, "h2": 1e-4},
        measurement_std={"h1": 1e-3, "h2": 1e-3},
        inputs={"q_in": 0.0},
    ),
}

EWMA_ALPHA = 0.05
"""Weight of the newest update in the divergence indicators (~40-update memory)."""
DRIFT_MIN_UPDATES = 20
_EFFECTIVE_DOF = (2.0 - EWMA_ALPHA) / EWMA_ALPHA
DRIFT_NIS_BOUND = float(chi2.ppf(0.999, _EFFECTIVE_DOF) / _EFFECTIVE_DOF)
"""An EWMA of NIS/dof above this is a 1-in-1000 event for a consistent filter: flag drift."""


@dataclass(frozen=True)
class Divergence:
    """Exponentially weighted innovation statistics of one twin (folded in by the filter kernel)."""

    updates: int = 0
    nis_last: float = 0.0
    nis_mean: float = 0.0  # EWMA of NIS / measured dimensions (1.0 for a consistent filter)
    residual_mean: tuple[float, ...] = ()
    residual_ms: tuple[float, ...] = ()

    @property
    def drift(self) -> bool:
        return self.updates >= DRIFT_MIN_UPDATES and self.nis_mean > DRIFT_NIS_BOUND


@dataclass(frozen=True)
class FilterState:
    """Mean, covariance, held inputs and the time they refer to (epoch seconds, None = prior)."""

    t: float | None
    x: np.ndarray
    P: np.ndarray
    u: np.ndarray
    divergence: Divergence = field(default_factory=Divergence)


class _Kernels(NamedTuple):
    predict: Callable
    assimilate: Callable


class FilterTrace(NamedTuple):
    """The filter state after each event of one run (for checkpoints)."""

    t: np.ndarray  # (n,)
    x: np.ndarray  # (n, states)
    P: np.ndarray  # (n, states, states)
    u: np.ndarray  # (n, inputs)
    updates: np.ndarray  # (n,) and the divergence statistics after each event
    nis_last: np.ndarray
    nis_mean: np.ndarray
    residual_mean: np.ndarray  # (n, outputs)
    residual_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.t)

    def state(self, i: int) -> FilterState:
        updates = int(self.updates[i])
        div = Divergence(
            updates, float(self.nis_last[i]), float(self.nis_mean[i]),
            tuple(self.residual_mean[i].tolist()) if updates else (), tuple(self.residual_ms[i].tolist()) if updates else (),
        )
        return FilterState(float(self.t[i]), self.x[i], self.P[i], self.u[i], div)


RUN_LENGTHS = (8, 64)
"""The padded scan lengths of event runs: a run is padded to the shortest that holds it and a
longer one continues in the next dispatch. Two shapes per model means two compiles (~1-2 s each),
done when the model's first filter is made (`ExtendedKalmanFilter.warm_up`) so that a live event
never waits for one (compiling on demand for every power of two stalled a live stream for seconds).
8 keeps a lone event's padding cheap, 64 keeps a long replay to few dispatches; no length is 1 (a
one-iteration loop XLA would inline and could fuse differently)."""

MAX_RUN = RUN_LENGTHS[-1]
"""Longest run of events in one dispatch."""

LANES = 32
"""Every filter dispatch runs exactly this many twins side by side (unused lanes are no-ops).

Why a fixed width: with one shape per run length, each twin's arithmetic is the same vector code
whatever lane it gets and whoever its neighbours are, so a twin's state has the same bits in a
live batch and in a replay alone (a vmap over a varying number of twins does NOT give that for
the nonlinear models: measured). 32 lanes cost about as much per dispatch as one twin did.
"""


def bucket(n: int) -> int:
    """The padded scan length for a run of `n` (<= `MAX_RUN`) events."""
    return next(length for length in RUN_LENGTHS if n <= length)


def _mm(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """A small matrix product as broadcast multiply + sum: XLA fuses it with its neighbours,
    where a `dot` would be a separate kernel launch per filter step."""
    return (a[:, :, None] * b[None, :, :]).sum(axis=1)


def _solve_spd(S: jnp.ndarray, B: jnp.ndarray) -> jnp.ndarray:
    """S^-1 B for a small symmetric positive definite S, by unrolled Gauss-Jordan elimination
    (no pivoting needed for SPD): fused elementwise code instead of a LAPACK call per step."""
    n = S.shape[0]
    A = jnp.concatenate([S, B], axis=1)
    for i in range(n):
        row = A[i] / A[i, i]
        A = (A - A[:, i:i + 1] * row[None, :]).at[i].set(row)
    return A[:, n:]


@lru_cache(maxsize=None)
def _kernels(model: Model) -> _Kernels:
    """Jitted kernels for one model, shared by every twin of that model.

    `assimilate` runs a sorted run of events for each of `LANES` twins in ONE dispatch (a
    `lax.scan` over predict + update + divergence statistics, vmapped over twins, each with its
    own parameters and noise): the per-event cost of a live twin was the Python->XLA dispatch,
    not the arithmetic. Padding steps have no sub-steps and no
    measurement, which makes them exact no-ops, so the state after an event depends only on the
    events before it - never on how they were split into calls (live batches vs log replay).
    `predict` alone serves explicit look-ahead.
    """
    step = model.step_vector
    jac_step = jax.jacfwd(step)
    jac_obs = jax.jacfwd(model.observe_vector)

    def predict(x, P, u, p, q_var_rate, n, dt):
        def body(_, carry):
            x, P = carry
            F = jac_step(x, u, p, dt)
            P = _mm(_mm(F, P), F.T) + jnp.diag(q_var_rate * dt)
            return step(x, u, p, dt), 0.5 * (P + P.T)

        return jax.lax.fori_loop(0, n, body, (x, P))

    def update(x, P, u, p, z, mask, r_var):
        H = jac_obs(x, u, p) * mask[:, None]
        y = (z - model.observe_vector(x, u, p)) * mask
        HP = _mm(H, P)
        S = _mm(HP, H.T) + jnp.diag(jnp.where(mask > 0, r_var, 1.0))
        sol = _solve_spd(S, jnp.concatenate([HP, y[:, None]], axis=1))  # S^-1 [H P, y]
        K = sol[:, :-1].T  # P H^T S^-1 (S, P symmetric)
        ikh = jnp.eye(x.shape[0]) - _mm(K, H)
        P_new = _mm(_mm(ikh, P), ikh.T) + _mm(K * (r_var * mask), K.T)
        x_new = jnp.stack(model.project(tuple(x + (K * y).sum(axis=1))))
        return x_new, 0.5 * (P_new + P_new.T), y, (y * sol[:, -1]).sum()

    def assimilate(x, P, div, p, q_var_rate, r_var, n_sub, dt, u_held, u_new, z, mask):
        def event(carry, ev):
            x, P, (updates, nis_last, nis_mean, res_mean, res_ms) = carry
            n, dt, u_held, u_new, z, mask = ev
            x, P = predict(x, P, u_held, p, q_var_rate, n, dt)
            x_upd, P_upd, y, nis = update(x, P, u_new, p, z, mask, r_var)
            measured = mask > 0
            has = jnp.any(measured)
            a = jnp.where(updates == 0, 1.0, EWMA_ALPHA)
            div_new = (
                updates + 1, nis, nis_mean + a * (nis / jnp.maximum(mask.sum(), 1.0) - nis_mean),
                jnp.where(measured, res_mean + a * (y - res_mean), res_mean),
                jnp.where(measured, res_ms + a * (y * y - res_ms), res_ms),
            )
            carry = (jnp.where(has, x_upd, x), jnp.where(has, P_upd, P),
                     jax.tree.map(lambda new, old: jnp.where(has, new, old), div_new, (updates, nis_last, nis_mean,
                                                                                        res_mean, res_ms)))
            return carry, carry

        return jax.lax.scan(event, (x, P, div), (n_sub, dt, u_held, u_new, z, mask))[1]

    return _Kernels(jax.jit(predict), jax.jit(jax.vmap(assimilate)))


class ExtendedKalmanFilter:
    """The filter for one model and parameter set; cheap to construct (kernels are shared)."""

    def __init__(
        self,
        model: Model,
        params: list[float] | np.ndarray,
        *,
        process_std: dict[str, float] | None = None,
        measurement_std: dict[str, float] | None = None,
    ):
        self.model = model
        self.defaults = DEFAULTS.get(model.name)
        if self.defaults is None and (process_std is None or measurement_std is None):
            raise ValueError(f"no filter defaults for model {model.name}: give process_std and measurement_std")
        self.params = jnp.asarray(np.asarray(params, dtype=np.float64))
        q = _complete("process_std", model.state_names, process_std, self.defaults)
        r = _complete("measurement_std", model.output_names, measurement_std, self.defaults)
        self.q_var_rate = jnp.asarray(q**2)
        self.r_var = jnp.asarray(r**2)
        self._kernels = _kernels(model)
        self.measured_names = tuple(dict.fromkeys((*model.input_names, *model.output_names)))
        """The value columns of `assimilate_many`: the model's inputs, then its outputs."""
        col = {n: i for i, n in enumerate(self.measured_names)}
        self._input_cols = np.array([col[n] for n in model.input_names], dtype=np.intp)
        self._output_cols = np.array([col[n] for n in model.output_names], dtype=np.intp)

    def initial(
        self,
        state: dict[str, float] | None = None,
        std: dict[str, float] | None = None,
        inputs: dict[str, float] | None = None,
    ) -> FilterState:
        """The prior: given values over the model defaults (unknown names refused)."""
        m = self.model
        x = _complete("initial_state", m.state_names, state, self.defaults)
        s = _complete("initial_std", m.state_names, std, self.defaults)
        u = _complete("inputs", m.input_names, inputs, self.defaults)
        if np.any(s <= 0):
            raise ValueError(f"initial std must be > 0, got {dict(zip(m.state_names, s.tolist()))}")
        return FilterState(t=None, x=x, P=np.diag(s**2), u=u)

    def predict(self, fs: FilterState, t: float) -> FilterState:
        """Advance to time `t` with held inputs, in sub-steps of at most ``default_dt``."""
        gap = 0.0 if fs.t is None else t - fs.t
        if gap < 0:
            raise ValueError(f"cannot predict backwards in time ({fs.t} -> {t}); rewind instead")
        n = math.ceil(gap / self.model.default_dt - 1e-9) if gap > 0 else 0
        if n == 0:
            return replace(fs, t=t)
        x, P = self._kernels.predict(fs.x, fs.P, fs.u, self.params, self.q_var_rate, n, gap / n)
        return replace(fs, t=t, x=np.asarray(x), P=np.asarray(P))

    def assimilate(self, fs: FilterState, t: float, values: dict[str, float], use_outputs: bool = True) -> FilterState:
        """One event: predict to `t`, take the measured inputs (held from `t` on), update with the outputs.

        `values` maps input/output names to SI values; unknown names are refused.
        """
        unknown = set(values) - set(self.measured_names)
        if unknown:
            raise KeyError(f"{self.model.name} has no input/output {sorted(unknown)}")
        row = np.array([[values.get(n, np.nan) for n in self.measured_names]], dtype=np.float64)
        return self.assimilate_many(fs, np.array([t], dtype=np.float64), row, np.array([use_outputs])).state(0)

    def warm_up(self) -> None:
        """Compile this model's kernel for every run length now (when a twin is created or
        recovered), not when a live event first needs it; once per model and process."""
        if self.model in _WARM:
            return
        prior, cols = self.initial(), len(self.measured_names)
        for n in RUN_LENGTHS:
            t = np.arange(n, dtype=np.float64) * self.model.default_dt
            assimilate_runs([Run(self, prior, t, np.full((n, cols), np.nan), np.zeros(n, dtype=bool))])
        _WARM.add(self.model)

    def assimilate_many(self, fs: FilterState, t: np.ndarray, values: np.ndarray, use_outputs: np.ndarray) -> FilterTrace:
        """One twin's run of events (see `Run`); the trace holds the state after each event."""
        return assimilate_runs([Run(self, fs, t, values, use_outputs)])[0]


_WARM: set[Model] = set()


class Run(NamedTuple):
    """Events of one twin in time order, to apply from `start`.

    `t` (n,) epoch seconds; `values` (n, len(filter.measured_names)) in SI units, NaN = not
    measured; `use_outputs` (n,) False for events whose outputs must not update the estimate
    (bad quality). Inputs are held from their last measurement; an event without outputs only
    predicts.
    """

    filter: ExtendedKalmanFilter
    start: FilterState
    t: np.ndarray
    values: np.ndarray
    use_outputs: np.ndarray


def assimilate_runs(runs: list[Run]) -> list[FilterTrace]:
    """Apply each (non-empty) run to its twin: one kernel dispatch per `LANES` twins of a model
    and per `MAX_RUN` events (a longer run continues in the next round of dispatches)."""
    if any(len(run.t) == 0 for run in runs):
        raise ValueError("every run needs at least one event")
    pieces: list[list[FilterTrace]] = [[] for _ in runs]
    starts = [run.start for run in runs]
    for offset in range(0, max((len(run.t) for run in runs), default=0), MAX_RUN):
        active = [i for i, run in enumerate(runs) if len(run.t) > offset]
        part = slice(offset, offset + MAX_RUN)
        by_model: dict[Model, list[int]] = {}
        for i in active:
            by_model.setdefault(runs[i].filter.model, []).append(i)
        for model, indices in by_model.items():
            for c in range(0, len(indices), LANES):
                chunk = indices[c:c + LANES]
                lanes = [Run(runs[i].filter, starts[i], runs[i].t[part], runs[i].values[part], runs[i].use_outputs[part])
                         for i in chunk]
                for i, trace in zip(chunk, _assimilate_lanes(model, lanes)):
                    pieces[i].append(trace)
                    starts[i] = trace.state(len(trace) - 1)
    return [p[0] if len(p) == 1 else FilterTrace(*(np.concatenate(f) for f in zip(*p))) for p in pieces]


def _assimilate_lanes(model: Model, runs: list[Run]) -> list[FilterTrace]:
    """Up to `LANES` runs of twins of `model` in one dispatch, padded to (LANES, bucket) arrays."""
    f0 = runs[0].filter
    ny = len(model.output_names)
    lengths = np.array([len(r.t) for r in runs])
    L = bucket(int(lengths.max()))
    valid = np.arange(L)[None, :] < np.pad(lengths, (0, LANES - len(runs)))[:, None]

    t = np.zeros((LANES, L))
    values = np.full((LANES, L, len(f0.measured_names)), np.nan)
    use = np.zeros((LANES, L), dtype=bool)
    t0 = np.full(LANES, np.nan)
    # unused lanes repeat the first twin's parameters and state (finite arithmetic), with no steps
    x = np.repeat(runs[0].start.x[None], LANES, axis=0)
    P = np.repeat(runs[0].start.P[None], LANES, axis=0)
    u0 = np.repeat(runs[0].start.u[None], LANES, axis=0)
    p = np.repeat(np.asarray(f0.params)[None], LANES, axis=0)
    q = np.repeat(np.asarray(f0.q_var_rate)[None], LANES, axis=0)
    r_var = np.repeat(np.asarray(f0.r_var)[None], LANES, axis=0)
    updates = np.zeros(LANES, dtype=np.int64)
    nis_last, nis_mean = np.zeros(LANES), np.zeros(LANES)
    res_mean, res_ms = np.zeros((LANES, ny)), np.zeros((LANES, ny))
    for k, run in enumerate(runs):
        n, fs, flt = lengths[k], run.start, run.filter
        t[k, :n], values[k, :n], use[k, :n] = run.t, run.values, run.use_outputs
        if fs.t is not None:
            t0[k] = fs.t
        x[k], P[k], u0[k], p[k], q[k], r_var[k] = fs.x, fs.P, fs.u, flt.params, flt.q_var_rate, flt.r_var
        d = fs.divergence
        updates[k], nis_last[k], nis_mean[k] = d.updates, d.nis_last, d.nis_mean
        if d.updates:
            res_mean[k], res_ms[k] = d.residual_mean, d.residual_ms

    # sub-steps of at most default_dt into each event from the one before (none from the prior)
    gap = np.diff(t, axis=1, prepend=t0[:, None])
    gap = np.where(valid & ~np.isnan(gap), gap, 0.0)
    if np.any(gap < 0):
        k = int(np.flatnonzero((gap < 0).any(axis=1))[0])
        raise ValueError(f"cannot predict backwards in time ({runs[k].start.t} -> {runs[k].t.tolist()}); rewind instead")
    n_sub = np.where(gap > 0, np.ceil(gap / model.default_dt - 1e-9), 0.0)
    dt = np.divide(gap, n_sub, out=np.zeros_like(gap), where=n_sub > 0)
    # inputs: each held from its last measurement (or from the twin's held value)
    held = np.concatenate([u0[:, None, :], values[:, :, f0._input_cols]], axis=1)
    last = np.where(np.isnan(held), 0, np.arange(L + 1)[None, :, None])
    held = np.take_along_axis(held, np.maximum.accumulate(last, axis=1), axis=1)
    z = values[:, :, f0._output_cols]
    mask = (~np.isnan(z) & (use & valid)[:, :, None]).astype(np.float64)

    out = _kernels(model).assimilate(
        x, P, (updates, nis_last, nis_mean, res_mean, res_ms), p, q, r_var,
        n_sub.astype(np.int32), dt, held[:, :-1], held[:, 1:], np.nan_to_num(z, nan=0.0), mask)
    xs, Ps, (upd, nl, nm, rm, rs) = jax.tree.map(np.asarray, out)
    return [FilterTrace(run.t.astype(np.float64), xs[k, :n], Ps[k, :n], held[k, 1:n + 1], upd[k, :n], nl[k, :n],
                        nm[k, :n], rm[k, :n], rs[k, :n]) for k, (run, n) in enumerate(zip(runs, lengths))]


def _complete(kind: str, names: tuple[str, ...], given: dict[str, float] | None, defaults: NoiseDefaults | None):
    """Values for `names` in order: `given` over the model defaults; unknown or missing refused."""
    given = dict(given or {})
    unknown = set(given) - set(names)
    if unknown:
        raise KeyError(f"{kind}: unknown name(s) {sorted(unknown)}; expected {list(names)}")
    base = getattr(defaults, kind) if defaults is not None else {}
    missing = [n for n in names if n not in given and n not in base]
    if missing:
        raise KeyError(f"{kind}: no value and no default for {missing}")
    out = np.array([float(given.get(n, base.get(n, 0.0))) for n in names], dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{kind}: values must be finite, got {dict(zip(names, out.tolist()))}")
    return out
