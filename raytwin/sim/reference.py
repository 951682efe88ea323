"""Independent reference integration with `scipy.integrate.solve_ivp`, for validating simulators.

Inputs are held constant over each step (zero-order hold, as in `rollout`), so the reference
integrates each run of identical input rows as one smooth initial-value problem and reports the
state at every step boundary. Tolerances default to rtol 1e-9, atol 1e-12 (method LSODA).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from raytwin.sim.model import Model
from raytwin.sim.precision import in_float64

Rhs = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""rhs(state, inputs) -> d state / dt, plain NumPy float64."""


def model_rhs(model: Model, params: np.ndarray) -> Rhs:
    """The model's own derivative as a float64 NumPy function (jitted once)."""
    coeffs = tuple(np.asarray(params, dtype=np.float64))
    rhs = lambda x, u: jax.numpy.stack(model.derivative(tuple(x), tuple(u), model.coefficients(coeffs)))  # noqa: E731
    f = in_float64(jax.jit(rhs))
    return lambda x, u: np.asarray(f(x, u))


def reference_trajectory(
    rhs: Rhs,
    x0: np.ndarray,
    inputs: np.ndarray,
    dt: float,
    *,
    method: str = "LSODA",
    rtol: float = 1e-9,
    atol: float = 1e-12,
) -> np.ndarray:
    """States at t = 0, dt, ..., n_steps*dt, shape (n_steps + 1, n_states)."""
    inputs = np.asarray(inputs, dtype=np.float64)
    n_steps = inputs.shape[0]
    out = np.empty((n_steps + 1, len(x0)))
    out[0] = x = np.asarray(x0, dtype=np.float64)
    # split the horizon where the (zero-order-hold) inputs change
    changes = np.flatnonzero(np.any(np.diff(inputs, axis=0) != 0.0, axis=1)) + 1
    starts = np.concatenate([[0], changes])
    ends = np.concatenate([changes, [n_steps]])
    from scipy.integrate import solve_ivp  # here: a reference for checks, not a cost of importing the simulators

    for a, b in zip(starts, ends):
        u = inputs[a]
        t_eval = dt * np.arange(a + 1, b + 1)
        sol = solve_ivp(
            lambda _t, y: rhs(y, u), (dt * a, dt * b), x, method=method, t_eval=t_eval, rtol=rtol, atol=atol
        )
        if not sol.success:
            raise RuntimeError(f"solve_ivp failed on steps {a}..{b}: {sol.message}")
        out[a + 1 : b + 1] = sol.y.T
        x = out[b]
    return out


def relative_error(trajectory: np.ndarray, reference: np.ndarray) -> float:
    """Largest error over the trajectory, relative to each state's range of variation.

    Scaling by the range (not the magnitude) keeps the check honest for states such as
    temperatures in kelvin, whose magnitude (~290 K) dwarfs their variation.
    """
    scale = np.maximum(np.ptp(reference, axis=0), 1e-12)
    return float(np.max(np.abs(trajectory - reference) / scale))
