"""An unscented Kalman filter for live twins: derivative-free, for any model that can step and observe.

The EKF (`raytwin.estimation`) needs Jacobians (`jacfwd` of the model's JAX code); the UKF only
evaluates the model at 2n+1 sigma points per step (the scaled unscented transform of Julier and
Wan-van der Merwe, weights as in FilterPy's `MerweScaledSigmaPoints`), so it also serves models
that are black-box step functions (an FMU): the model is reached only through `Dynamics`, two
callables on batches of states. `jax_dynamics` gives them for a `raytwin.sim.Model` (traced into
the kernel), `host_dynamics` wraps NumPy callables (`jax.pure_callback`), so an FMU adapter plugs
into the same kernel.

Why a UKF next to the EKF: the unscented transform sees the model's curvature over the spread of
the estimate, so the innovation covariance carries the linearisation error instead of hiding it
(a fresh battery twin's first update reports an honest std), and it needs no derivatives.

It is an `ExtendedKalmanFilter` with other kernels: the same `FilterState`, `Divergence`
bookkeeping, batching across twins (`assimilate_runs`, `LANES` per dispatch, the same bits live
and in replay), process noise per sub-step and capped gaps, so twins, snapshots and recovery work
unchanged. On a linear model it is the Kalman filter (to round-off; tested).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from raytwin.estimation import ExtendedKalmanFilter, _Kernels, _mm, _solve_spd, scan_kernels, skip
from raytwin.executables import kernel_identity
from raytwin.sim import Model, unstack
from raytwin.sim.model import Declared
from raytwin.sim.precision import float64_callback

ALPHA, BETA = 1.0, 2.0
"""Sigma-point spread and prior-knowledge weight (beta = 2 is optimal for Gaussian priors)."""

UKF_ITERATIONS = 4
"""Statistical linearisations of the output map per update (see `_ukf_kernels`)."""


def kappa(n: int) -> float:
    """Julier's choice n + kappa = 3 (matches the Gaussian's fourth moment), never negative (a
    negative kappa makes the central weight negative and the covariance possibly indefinite)."""
    return max(3.0 - n, 0.0)


class Dynamics(NamedTuple):
    """How a filter reaches a model, for a batch of k states (rows), with params bound per twin:
    `step(X (k, n), u (m,), p (n_params,), dt) -> (k, n)` (one step, inputs held) and
    `observe(X (k, n), u, p) -> (k, n_outputs)`. Traceable JAX functions, or `host_dynamics`."""

    step: Callable
    observe: Callable


def jax_dynamics(model: Model) -> Dynamics:
    """A JAX model's own step and output, elementwise over the sigma points (its native form)."""
    return Dynamics(
        lambda X, u, p, dt: jnp.stack(model.step(unstack(X), tuple(u), tuple(p), dt), axis=-1),
        lambda X, u, p: jnp.stack(model.observe(unstack(X), tuple(u), tuple(p)), axis=-1),
    )


def host_dynamics(model: Declared, step: Callable, observe: Callable) -> Dynamics:
    """Dynamics from NumPy callables with `Dynamics`' signatures (float64 arrays in and out), e.g.
    an FMU stepped on the host, through `jax.pure_callback`. A dispatch's lanes arrive in one call
    (`vmap_method="broadcast_all"`) and only the distinct ones are computed (`distinct_lanes`):
    a dispatch runs `LANES` lanes in lockstep, mostly idle copies of its first twin, so a lone FMU
    twin costs one evaluation per sigma point and sub-step instead of 128."""
    ny = len(model.outputs)

    def host_step(X, u, p, dt):
        return float64_callback(distinct_lanes(step), X.shape, X, u, p, dt, vmap_method="broadcast_all")

    def host_observe(X, u, p):
        return float64_callback(distinct_lanes(observe), (X.shape[0], ny), X, u, p, vmap_method="broadcast_all")

    return Dynamics(host_step, host_observe)


def distinct_lanes(fn: Callable) -> Callable:
    """`fn(X (k, n), *per_twin)` over leading lane axes of all its arguments, evaluated once per
    distinct lane (equal arguments give equal results: `fn` must be a pure function of them)."""

    def call(X, *rest):
        X = np.asarray(X, dtype=np.float64)
        lead = X.shape[:-2]
        if not lead:
            return np.asarray(fn(X, *rest), dtype=np.float64)
        lanes = int(np.prod(lead))
        args = [a.reshape(lanes, *a.shape[len(lead):]) for a in (X, *map(np.asarray, rest))]
        keys = np.concatenate([a.reshape(lanes, -1) for a in args], axis=1)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        done = np.stack([np.asarray(fn(*(a[i] for a in args)), dtype=np.float64) for i in first])
        return done[inverse.reshape(-1)].reshape(*lead, *done.shape[1:])

    return call


def weights(n: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(n + lambda, mean weights, covariance weights) of the 2n+1 scaled sigma points."""
    lam = ALPHA**2 * (n + kappa(n)) - n
    wm = np.full(2 * n + 1, 0.5 / (n + lam))
    wc = wm.copy()
    wm[0] = lam / (n + lam)
    wc[0] = wm[0] + 1.0 - ALPHA**2 + BETA
    return n + lam, wm, wc


def _cholesky(P: jnp.ndarray) -> jnp.ndarray:
    """Lower L with L L^T = P for a small SPD P, unrolled (fused elementwise code, like
    `_solve_spd`); a P that is not positive definite gives NaN, which flags the twin diverged."""
    n = P.shape[0]
    L, rows = jnp.zeros_like(P), jnp.arange(n)
    for j in range(n):
        d = jnp.sqrt(P[j, j] - (L[j, :j] ** 2).sum())
        col = (P[:, j] - (L[:, :j] * L[j, :j]).sum(axis=1)) / d
        L = L.at[:, j].set(jnp.where(rows > j, col, jnp.where(rows == j, d, 0.0)))
    return L


@lru_cache(maxsize=None)
def _ukf_kernels(model: Model, dynamics: Dynamics) -> _Kernels:
    """The UKF's kernels for one model and its dynamics, shared by every twin using them.

    The update is iterated (`UKF_ITERATIONS`; Garcia-Fernandez et al., iterated posterior
    linearisation): the first pass is the textbook UKF, whose regression over the prior's sigma
    points (soc 0.5 +- 0.35) cannot reach a cell far out (a full cell: 0.11 short with a std of
    0.034; a draw 3.3 sigma out: 0.27 short, NEES ~700); each next pass regresses over the sigma points of the
    updated estimate, and the update of the prediction through that linearisation is exact for a
    linear model (the KF) and near the MAP estimate otherwise."""
    n = len(model.states)
    c, wm_np, wc_np = weights(n)
    root_c = float(np.sqrt(c))

    def sigma_points(x, P):
        offsets = root_c * _cholesky(P).T  # rows: the columns of sqrt(c P)
        return jnp.concatenate([x[None, :], x[None, :] + offsets, x[None, :] - offsets], axis=0)

    def mean_and_deviations(Y):
        """The weighted mean of transformed sigma points (rows) and each point's deviation from it."""
        y = (jnp.asarray(wm_np)[:, None] * Y).sum(axis=0)
        return y, Y - y[None, :]

    def predict(x, P, u, p, q_var_rate, n_sub, dt, skipped):
        wc = jnp.asarray(wc_np)

        def body(_, carry):
            x, P = carry
            X = dynamics.step(sigma_points(x, P), u, p, dt)
            x, dX = mean_and_deviations(X)
            P = (wc[:, None, None] * dX[:, :, None] * dX[:, None, :]).sum(axis=0) + jnp.diag(q_var_rate * dt)
            return x, 0.5 * (P + P.T)

        x, P = jax.lax.fori_loop(0, n_sub, body, (x, P))
        return x, skip(P, q_var_rate, skipped)

    def update(x, P, u, p, z, mask, r_var):
        wc = jnp.asarray(wc_np)
        r_diag = jnp.diag(jnp.where(mask > 0, r_var, 1.0))

        def linearise(x_lin, P_lin):
            """Statistical linear regression of the output map over the sigma points of (x_lin, P_lin):
            y = A x + b + e, cov(e) = omega (unmeasured outputs: zero rows, exact no-ops)."""
            X = sigma_points(x_lin, P_lin)
            y_hat, dY = mean_and_deviations(dynamics.observe(X, u, p))
            dY = dY * mask[None, :]
            Pxy = (wc[:, None, None] * (X - x_lin[None, :])[:, :, None] * dY[:, None, :]).sum(axis=0)
            Pyy = (wc[:, None, None] * dY[:, :, None] * dY[:, None, :]).sum(axis=0)
            A = _solve_spd(P_lin, Pxy).T
            return A, y_hat - (A * x_lin[None, :]).sum(axis=1), Pyy - _mm(_mm(A, P_lin), A.T)

        def correct(A, b, omega):
            """The Kalman update of the prediction (x, P) through the linearised output map."""
            y = (z - (A * x[None, :]).sum(axis=1) - b) * mask
            AP = _mm(A, P)
            S = _mm(AP, A.T) + omega + r_diag
            sol = _solve_spd(S, jnp.concatenate([AP, y[:, None]], axis=1))
            K = sol[:, :-1].T  # P A^T S^-1
            P_new = P - _mm(K, AP)  # P - K S K^T
            return x + (K * y).sum(axis=1), 0.5 * (P_new + P_new.T), y, (y * sol[:, -1]).sum(), jnp.diagonal(S)

        # the first pass is the textbook UKF (its innovation and NIS are reported); the next ones
        # re-linearise over the updated estimate (iterated posterior linearisation)
        x_new, P_new, innovation, nis, s_diag = correct(*linearise(x, P))
        for _ in range(UKF_ITERATIONS - 1):
            x_new, P_new, *_ = correct(*linearise(x_new, P_new))
        return jnp.stack(model.project(tuple(x_new))), P_new, innovation, nis, s_diag

    # a model's JAX dynamics are made from the model alone; other dynamics (an FMU's host stepper) are
    # identified by their pickle, or not at all
    own = dynamics is _jax_dynamics(model)
    # the look-ahead refuses updates that leave the model's domain (`scan_kernels`): one sub-step for a JAX
    # model, the event's gap again for a host stepper (an FMU), whose next prediction reuses its host calls
    return scan_kernels(predict, update, look_ahead="step" if own else "gap",
                        identity=lambda: kernel_identity("ukf", model, *(() if own else (dynamics,))))


class UnscentedKalmanFilter(ExtendedKalmanFilter):
    """The scaled UKF for one model and parameter set (see module docstring); `dynamics` defaults
    to the model's JAX code (`jax_dynamics`), or give `host_dynamics` for a black-box model."""

    kind = "ukf"

    def __init__(self, model: Model, params: list[float] | np.ndarray, *, dynamics: Dynamics | None = None,
                 **options):
        """`options`: `ExtendedKalmanFilter`'s (noise and drift-detector settings)."""
        self.dynamics = dynamics if dynamics is not None else default_dynamics(model)
        super().__init__(model, params, **options)

    def _make_kernels(self) -> _Kernels:
        return _ukf_kernels(self.model, self.dynamics)


_jax_dynamics = lru_cache(maxsize=None)(jax_dynamics)
"""One `Dynamics` per model, so all of its UKFs share one kernel (the cache key)."""


def default_dynamics(model: Declared) -> Dynamics:
    """The model's own ``filter_dynamics()`` when it has one (a black box such as an FMU: its
    host stepper), else its JAX code (`jax_dynamics`); one object per model either way."""
    own = getattr(model, "filter_dynamics", None)
    return own() if callable(own) else _jax_dynamics(model)


FILTERS: dict[str, type[ExtendedKalmanFilter]] = {"ekf": ExtendedKalmanFilter, "ukf": UnscentedKalmanFilter}
"""The filters a twin can choose by name (registration option / asset metadata ``filter``)."""


def make_filter(kind: str, model: Model, params: list[float] | np.ndarray, **noise) -> ExtendedKalmanFilter:
    """The filter named `kind` (one of `FILTERS`) for a model; a clear error for another name."""
    try:
        cls = FILTERS[kind]
    except KeyError:
        raise ValueError(f"unknown filter {kind!r}; known: {sorted(FILTERS)}") from None
    return cls(model, params, **noise)
