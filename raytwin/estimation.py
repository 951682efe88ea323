"""State estimation for live twins: an extended Kalman filter over any `raytwin.sim.Model`.

One filter serves linear and nonlinear models: the Jacobians come from `jax.jacfwd` of the
model's own RK4 step and output map, so for a linear model (``thermal_rc``) they are exact and the
filter *is* the linear Kalman filter; for ``battery_ecm`` / ``two_tank`` it is the EKF.

Why this shape:
- kernels are jitted once per *model* (not per asset), so a shard holding thousands of twins of
  the same type compiles twice and then only dispatches;
- between measurements the state is propagated with sub-steps of at most ``model.default_dt``
  (inputs zero-order held), so a long telemetry gap is integrated as accurately as the simulator;
- the covariance update uses the Joseph form (stays symmetric positive semi-definite) and
  measurements may carry any subset of the outputs (missing rows are masked out exactly);
- divergence indicators (normalised innovation squared, residual mean / RMS) are exponentially
  weighted so they follow the recent behaviour of the asset; `drift` fires when the NIS mean
  exceeds its chi-square 99.9 % bound, i.e. the model no longer explains the measurements.

Everything is float64 and deterministic: the same events in the same order give bit-identical
states, which is what recovery and time travel rely on.
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
    """Exponentially weighted innovation statistics of one twin."""

    updates: int = 0
    nis_last: float = 0.0
    nis_mean: float = 0.0  # EWMA of NIS / measured dimensions (1.0 for a consistent filter)
    residual_mean: tuple[float, ...] = ()
    residual_ms: tuple[float, ...] = ()

    @property
    def drift(self) -> bool:
        return self.updates >= DRIFT_MIN_UPDATES and self.nis_mean > DRIFT_NIS_BOUND

    def updated(self, nis: float, dof: int, residual: np.ndarray, mask: np.ndarray) -> Divergence:
        """Fold one update in; outputs missing from this measurement keep their statistics."""
        a = 1.0 if self.updates == 0 else EWMA_ALPHA
        mean = np.asarray(self.residual_mean) if self.residual_mean else np.zeros_like(residual)
        ms = np.asarray(self.residual_ms) if self.residual_ms else np.zeros_like(residual)
        new_mean = np.where(mask, mean + a * (residual - mean), mean)
        new_ms = np.where(mask, ms + a * (residual**2 - ms), ms)
        return Divergence(
            updates=self.updates + 1,
            nis_last=float(nis),
            nis_mean=float(self.nis_mean + a * (nis / dof - self.nis_mean)),
            residual_mean=tuple(float(v) for v in new_mean),
            residual_ms=tuple(float(v) for v in new_ms),
        )


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


@lru_cache(maxsize=None)
def _kernels(model: Model) -> _Kernels:
    """Jitted kernels for one model, shared by every twin of that model.

    `assimilate` fuses predict and update into one dispatch (the per-event cost of a live twin
    is dominated by dispatch, not arithmetic); `predict` alone serves explicit look-ahead.
    """
    step = model.step_vector
    jac_step = jax.jacfwd(step)
    jac_obs = jax.jacfwd(model.observe_vector)

    def predict(x, P, u, p, q_var_rate, n, dt):
        def body(_, carry):
            x, P = carry
            F = jac_step(x, u, p, dt)
            P = F @ P @ F.T + jnp.diag(q_var_rate * dt)
            return step(x, u, p, dt), 0.5 * (P + P.T)

        return jax.lax.fori_loop(0, n, body, (x, P))

    def update(x, P, u, p, z, mask, r_var):
        H = jac_obs(x, u, p) * mask[:, None]
        y = (z - model.observe_vector(x, u, p)) * mask
        S = H @ P @ H.T + jnp.diag(jnp.where(mask > 0, r_var, 1.0))
        K = jnp.linalg.solve(S, H @ P).T  # P H^T S^-1 (S, P symmetric)
        ikh = jnp.eye(x.shape[0]) - K @ H
        P_new = ikh @ P @ ikh.T + K @ jnp.diag(r_var * mask) @ K.T
        x_new = jnp.stack(model.project(tuple(x + K @ y)))
        return x_new, 0.5 * (P_new + P_new.T), y, y @ jnp.linalg.solve(S, y)

    def assimilate(x, P, u_held, u_new, p, q_var_rate, n, dt, z, mask, r_var):
        x, P = predict(x, P, u_held, p, q_var_rate, n, dt)
        return update(x, P, u_new, p, z, mask, r_var)

    return _Kernels(jax.jit(predict), jax.jit(assimilate))


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
        n, dt = self._substeps(fs, t)
        if n == 0:
            return replace(fs, t=t)
        x, P = self._kernels.predict(fs.x, fs.P, fs.u, self.params, self.q_var_rate, n, dt)
        return replace(fs, t=t, x=np.asarray(x), P=np.asarray(P))

    def _substeps(self, fs: FilterState, t: float) -> tuple[int, float]:
        """Sub-steps of at most ``default_dt`` from the filter's time to `t` (0 for the prior)."""
        if fs.t is None:
            return 0, 0.0
        gap = t - fs.t
        if gap < 0:
            raise ValueError(f"cannot predict backwards in time ({fs.t} -> {t}); rewind instead")
        n = math.ceil(gap / self.model.default_dt - 1e-9) if gap > 0 else 0
        return n, (gap / n if n else 0.0)

    def assimilate(self, fs: FilterState, t: float, values: dict[str, float], use_outputs: bool = True) -> FilterState:
        """Predict to `t`, take the measured inputs (held from `t` on), update with the outputs.

        `values` maps input/output names to SI values; unknown names are refused.
        """
        m = self.model
        unknown = set(values) - set(m.input_names) - set(m.output_names)
        if unknown:
            raise KeyError(f"{m.name} has no input/output {sorted(unknown)}")
        u = np.array([values.get(n, fs.u[i]) for i, n in enumerate(m.input_names)], dtype=np.float64)
        mask = np.array([1.0 if (use_outputs and n in values) else 0.0 for n in m.output_names])
        if not mask.any():
            return replace(self.predict(fs, t), u=u)
        n, dt = self._substeps(fs, t)
        z = np.array([values.get(n, 0.0) for n in m.output_names], dtype=np.float64)
        x, P, y, nis = self._kernels.assimilate(fs.x, fs.P, fs.u, u, self.params, self.q_var_rate, n, dt, z, mask,
                                                self.r_var)
        div = fs.divergence.updated(float(nis), int(mask.sum()), np.asarray(y), mask > 0)
        return replace(fs, t=t, x=np.asarray(x), P=np.asarray(P), u=u, divergence=div)


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
