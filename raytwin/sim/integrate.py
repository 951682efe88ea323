"""Fixed-step RK4 integration in `jax.lax.scan`: jitted, vmapped, float32 or float64.

`rollout` is the engine: it integrates a model from a state under inputs that are either a
precomputed time series or a function of (step, time, state) (generated profiles and feedback
controllers), optionally folding each step into an accumulator (summary metrics) instead of
keeping the trajectory, so sweeps can stream millions of scenarios in bounded memory.
`simulate` and `simulate_batch` are the array-in, array-out conveniences on top of it; they run
in the precision of their `dtype` (float64 in a scope, `raytwin.sim.precision`); `rollout` runs in
its caller's.

In float32, states that integrate tiny increments with nothing pulling them back are updated with
compensated (Kahan) summation: a battery's coulomb-counted state of charge (2 mA on 2.5 Ah at soc
0.98: dx = 2.2e-7 per 1 s step, under 4 ulp of soc) otherwise keeps the rounding error of every
step, and that rounding is biased (24 h: 1.4e-3 off, 7 % of the change). A model declares which
(`State(..., compensated=True)`); the RK4 stages stay `rk4_step`'s arithmetic, only the final
addition is compensated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from raytwin.sim.checks import check_finite_run, check_params, check_start, check_step
from raytwin.sim.model import Arrays, Model, ModelCheckError, after_step, model_step, rk4_step, unstack
from raytwin.sim.precision import precision
from raytwin.sim.ranges import check_ranges
from raytwin.sim.stiff import Adaptive

InputFn = Callable[[jax.Array, jax.Array, Arrays], Arrays]
"""inputs(k, t, state) -> input tuple, for generated or closed-loop inputs."""

Accumulate = Callable[[Any, jax.Array, Arrays, Arrays, Arrays], Any]
"""accumulate(acc, t, state, inputs, next_state) -> acc, folded over every step."""


def compensated_states(model: Model) -> tuple[str, ...]:
    """The states `rollout` sums with compensation in float32 by default: those the model declares,
    meant for pure integrators (no term pulls them back, so a step's rounding error is never
    forgotten). States that relax to an equilibrium (temperatures, RC voltages, tank levels) forget
    rounding errors within their time constant and should not be: every compensated state adds one
    pass over the RK4 chain per step on CPU (XLA emits one loop per carried array), and compensating
    both thermal states made the sweep kernel 1.7-2.1x slower for changes of 1e-5 relative in its
    metrics."""
    return tuple(v.name for v in model.states if v.compensated)


class Rollout(NamedTuple):
    final: Arrays
    trajectory: Arrays | None  # one (n_steps, ...) array per state variable, if kept
    accumulated: Any


def rollout(
    model: Model,
    x0: Arrays,
    params: Arrays,
    dt: float,
    n_steps: int,
    inputs: Arrays | InputFn,
    *,
    accumulate: Accumulate | None = None,
    acc0: Any = None,
    keep_trajectory: bool = True,
    unroll: int = 1,
    compensated: tuple[str, ...] | None = None,
    allow_unstable: bool = False,
) -> Rollout:
    """Integrate `n_steps` RK4 steps of `dt` from `x0` (pure; jit/vmap it from outside).

    `inputs` is either a tuple with one array per model input whose leading axis is time
    (length `n_steps`, zero-order hold over each step) or an `InputFn`. `unroll` steps run per
    loop iteration (`jax.lax.scan`'s option): the same arithmetic, fewer loop iterations.
    `compensated` names the states updated with Kahan summation (default: the model's
    `compensated_states` in float32, none in float64); the others are exactly `rk4_step`'s.

    Called with concrete `dt` and `params`, a step beyond the RK4 stability limit of the parameters
    is refused (`raytwin.sim.checks.check_step`; ``allow_unstable=True`` warns instead), as is a
    concrete `x0` that is not finite. Traced calls (inside the caller's jit/vmap) cannot look at
    values: their entry points check (`simulate`, `simulate_batch`, sweeps). A model with an
    `Adaptive` solver runs only in float64 (`raytwin.sim.stiff`); `simulate` and `simulate_batch`
    choose it for such a model (`integration_dtype`).
    """
    if not any(isinstance(v, jax.core.Tracer) for v in (dt, *params)):
        series = None if callable(inputs) or not len(inputs) or any(isinstance(v, jax.core.Tracer) for v in inputs) \
            else np.stack([np.asarray(v, dtype=np.float64) for v in inputs], axis=-1)
        check_step(model, dt, params, inputs=series, allow_unstable=allow_unstable)
    if not any(isinstance(v, jax.core.Tracer) for v in x0):
        check_start(model, x0)
    coeffs = model.coefficients(params)
    dtype = jnp.result_type(*x0)
    dt_ = jnp.asarray(dt, dtype)
    index = compensated_index(model, dtype, compensated)

    def body(carry, xs):
        x, error, acc = carry
        if callable(inputs):
            k = xs
            t = k.astype(dtype) * dt_
            u = inputs(k, t, x)
        else:
            k, u = xs
            t = k.astype(dtype) * dt_
        x_next, error = advance(model, index, x, error, u, coeffs, dt_)
        if accumulate is not None:
            acc = accumulate(acc, t, x, u, x_next)
        return (x_next, error, acc), (x_next if keep_trajectory else None)

    steps = jnp.arange(n_steps, dtype=jnp.int32)
    xs = steps if callable(inputs) else (steps, tuple(inputs))
    error0 = tuple(jnp.zeros_like(jnp.asarray(x0[i])) for i in index)
    (final, _, acc), traj = jax.lax.scan(body, (tuple(x0), error0, acc0), xs, unroll=unroll)
    return Rollout(final, traj, acc)


def compensated_index(model: Model, dtype: Any, compensated: tuple[str, ...] | None = None) -> tuple[int, ...]:
    """Positions of the states summed with compensation: `compensated` by name, or by default the
    model's `compensated_states` in float32 with the built-in RK4 (none in float64 or with another solver)."""
    if compensated is None:
        compensated = compensated_states(model) if dtype == jnp.float32 and model.solver is None else ()
    return tuple(model.state_names.index(name) for name in compensated)


def advance(model: Model, index: tuple[int, ...], x: Arrays, error: Arrays, u: Arrays, coeffs: Arrays,
            dt: jax.Array) -> tuple[Arrays, Arrays]:
    """One step of `rollout`: the model's step, with the states `index` summed with compensation
    (`error`: what their sums rounded away so far); returns (x_next, error_next). The fused GPU
    kernel (`sweeps.fused`) steps with this same function."""
    if index:
        return _compensated_step(model, index, x, error, u, coeffs, dt)
    return model_step(model, x, u, coeffs, dt), error


def _compensated_step(model: Model, index: tuple[int, ...], x: Arrays, error: Arrays, u: Arrays, coeffs: Arrays,
                      dt: jax.Array) -> tuple[Arrays, Arrays]:
    """An RK4 step whose states `index` are updated with Kahan summation; returns (x_next, error_next).

    The increment is `rk4_step` of the model shifted to `x`, started from 0: its stages are exactly
    ``f(x + h k)`` as in `rk4_step`, and ``0 + dx`` is `dx`, not yet rounded by `x` (so the other
    states' ``x + dx`` are `rk4_step`'s bits). `error` holds what ``x + dx`` rounded away so far. A
    state the model's `update` or `project` moves (a reset, a clip to its domain) restarts with no error.
    """

    def shifted(y: Arrays, u_: Arrays, c_: Arrays) -> Arrays:
        return model.derivative(tuple(xi + yi for xi, yi in zip(x, y, strict=True)), u_, c_)

    around_x = dataclasses.replace(model, derivative=shifted, update=None, project=lambda y: y)
    dx = rk4_step(around_x, tuple(jnp.zeros_like(xi) for xi in x), u, coeffs, dt)
    summed = [xi + di for xi, di in zip(x, dx, strict=True)]
    corrected = tuple(dx[i] - e for i, e in zip(index, error, strict=True))
    for i, c in zip(index, corrected, strict=True):
        summed[i] = x[i] + c
    x_next = tuple(after_step(model, tuple(summed), u, coeffs))
    error_next = tuple(jnp.where(x_next[i] == summed[i], (summed[i] - x[i]) - c, 0.0)
                       for i, c in zip(index, corrected, strict=True))
    return x_next, error_next


@partial(jax.jit, static_argnames=("model",))
def _simulate_one(model: Model, x0: jax.Array, inputs: jax.Array, params: jax.Array, dt: jax.Array) -> jax.Array:
    x0_t = unstack(x0)
    run = rollout(model, x0_t, unstack(params), dt, inputs.shape[0], unstack(inputs))
    traj = jnp.stack(run.trajectory, axis=-1)
    return jnp.concatenate([x0[None, :], traj], axis=0)


def integration_dtype(model: Model, dtype: Any) -> np.dtype:
    """The dtype `model` is integrated in when results in `dtype` are asked for: float64 for an
    `Adaptive` solver (its implicit steps fail in float32, `raytwin.sim.stiff`), else `dtype`."""
    return np.dtype(np.float64) if isinstance(model.solver, Adaptive) else np.dtype(dtype)


def _as_arrays(model: Model, dtype: Any, batched: bool, allow_implausible: bool, *arrays
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x0, inputs, params) as arrays of `dtype`, their shapes checked against the model (`batched`: with a
    leading batch axis, `simulate_batch`'s), the start state checked to be finite and within its plausible
    range, the inputs within theirs (unless `allow_implausible`) and the parameters within their bounds."""
    if isinstance(arrays[2], Mapping):
        raise TypeError(f"{model.name}: params must be values in model order {model.param_names}, not a mapping: "
                        "pass model.param_vector(your_dict)")
    x0, inputs, params = (np.asarray(a, dtype=dtype) for a in arrays)
    batch = ("batch",) if batched else ()
    for name, array, expected, allowed_ndim in (
            ("x0", x0, (*batch, model.state_names), {len(batch) + 1}),
            ("inputs", inputs, (*batch, "n_steps", model.input_names), {2, 3} if batched else {2}),
            ("params", params, (*batch, model.param_names), {len(batch) + 1})):
        if array.ndim not in allowed_ndim or array.shape[-1] != len(expected[-1]):
            shape = ", ".join([*expected[:-1], str(len(expected[-1]))]) + ("," if len(expected) == 1 else "")
            optional = f" or (n_steps, {len(expected[-1])}) shared by the batch" if batched and name == "inputs" else ""
            raise ValueError(f"{model.name}: {name} has shape {array.shape}, expected ({shape}){optional}: "
                             f"the last axis is {', '.join(expected[-1])}")
    check_start(model, np.moveaxis(x0, -1, 0))
    if not allow_implausible:
        check_ranges(model, x0, inputs)
    check_params(model, params)
    return x0, inputs, params


def simulate(
    model: Model,
    x0: np.ndarray,
    inputs: np.ndarray,
    params: np.ndarray,
    dt: float,
    *,
    dtype: Any = jnp.float32,
    allow_unstable: bool = False,
    allow_implausible: bool = False,
) -> np.ndarray:
    """Trajectory of one scenario, shape (n_steps + 1, n_states), from state `x0`.

    `inputs` has shape (n_steps, n_inputs), held constant over each step; `params` is in model
    order (`Model.param_vector`). float32 by default; pass ``dtype=jnp.float64`` for validation
    (a model with an `Adaptive` solver is integrated in float64 either way, `integration_dtype`).
    A step beyond the RK4 stability limit of `params` (at the nominal state) is refused, and so is a run whose
    states turned NaN or inf, naming the step (``allow_unstable=True``: warnings, and the trajectory as it ran),
    and so are parameters outside their declared bounds (`raytwin.sim.checks.check_params`), arrays of
    another shape, and start states and inputs outside their plausible ranges (`raytwin.sim.ranges`;
    ``allow_implausible=True`` runs them, for a model valid beyond what it declares).
    """
    work = integration_dtype(model, dtype)
    x0, inputs, params = _as_arrays(model, work, False, allow_implausible, x0, inputs, params)
    check_step(model, dt, params, inputs=inputs, allow_unstable=allow_unstable)
    with precision(work):
        traj = np.asarray(_simulate_one(model, x0, inputs, params, jnp.asarray(dt, work)))
    return _checked(model, traj[None], dtype, inputs, params[None], dt, allow_unstable)[0]


def _checked(model: Model, traj: np.ndarray, dtype: Any, inputs: np.ndarray, params: np.ndarray, dt: float,
             allow_unstable: bool) -> np.ndarray:
    """The runs `traj` (batch, n_steps + 1, n_states) in `dtype`, checked for states that turned NaN or inf in the
    precision they ran in (`check_finite_run`), then for finite states beyond `dtype`'s range (an adaptive run in
    float64 returned in float32): those would read as a divergence the step cannot fix."""
    check_finite_run(model, traj, inputs, params, dt, allow_unstable=allow_unstable)
    with np.errstate(over="ignore"):  # (NumPy's warning beside the error below says less)
        out = traj.astype(dtype, copy=False)
    if out is not traj and not np.isfinite(out).all() and np.isfinite(traj).all():
        raise ModelCheckError(model.name, "dtype", f"the run's states reach {np.abs(traj).max():.4g}, beyond "
                              f"{np.dtype(dtype).name}'s range: pass dtype=jnp.float64")
    return out


@partial(jax.jit, static_argnames=("model", "shared_inputs"))
def _simulate_many(model, x0, inputs, params, dt, shared_inputs: bool):
    in_axes = (0, None if shared_inputs else 0, 0, None)
    return jax.vmap(partial(_simulate_one.__wrapped__, model), in_axes=in_axes)(x0, inputs, params, dt)


def simulate_batch(
    model: Model,
    x0: np.ndarray,
    inputs: np.ndarray,
    params: np.ndarray,
    dt: float,
    *,
    dtype: Any = jnp.float32,
    allow_unstable: bool = False,
    allow_implausible: bool = False,
) -> np.ndarray:
    """Trajectories of a batch of scenarios, shape (batch, n_steps + 1, n_states), via `vmap`.

    `x0` is (batch, n_states), `params` (batch, n_params); `inputs` is (n_steps, n_inputs),
    shared by all scenarios, or (batch, n_steps, n_inputs). The step is checked against the RK4
    stability limit over the box of the batch's parameters (its corners; cached per box), and the runs for
    states that turned NaN or inf; shapes, ranges, ``allow_unstable`` and ``allow_implausible`` are as in
    `simulate`.
    """
    work = integration_dtype(model, dtype)
    x0, inputs, params = _as_arrays(model, work, True, allow_implausible, x0, inputs, params)
    sizes = {"x0": x0.shape[0], "params": params.shape[0], **({"inputs": inputs.shape[0]} if inputs.ndim == 3 else {})}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{model.name}: batch sizes differ: " + ", ".join(f"{k} {v}" for k, v in sizes.items())
                         + "; give every batched array the same first axis")
    check_step(model, dt, tuple(params.T), inputs=inputs, allow_unstable=allow_unstable)
    shared = inputs.ndim == 2
    with precision(work):
        traj = np.asarray(_simulate_many(model, x0, inputs, params, jnp.asarray(dt, work), shared))
    return _checked(model, traj, dtype, inputs, params, dt, allow_unstable)
