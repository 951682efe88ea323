"""The simulator protocol: a physics model as pure, elementwise JAX functions.

A `Model` describes its state, inputs, parameters and outputs (with units and bounds) and gives
three pure functions over *tuples of arrays* (one array per variable):

- ``coefficients(params) -> coeffs``: everything that depends only on parameters (reciprocals,
  products) computed once per scenario instead of once per step;
- ``derivative(state, inputs, coeffs) -> d state / dt``;
- ``output(state, inputs, coeffs) -> measurements``.

Tuples of arrays ("struct of arrays") rather than stacked vectors are a deliberate choice: every
operation is elementwise, so the same code runs on scalars, on a ``vmap``-ed batch or on a plain
batch of arrays, and XLA fuses a whole RK4 step into one loop over the batch. Stacking the state
into a vector makes XLA emit a gather and a concatenate per stage, which measured ~18x slower on
CPU (see ``benchmarks/``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import math

import jax.numpy as jnp

Arrays = tuple  # a tuple of JAX arrays, one per variable, all broadcastable to a common shape


@dataclass(frozen=True)
class Var:
    """A variable: name, SI unit, a short description and its plausible range.

    The range (``lower`` <= value <= ``upper``, SI) bounds what the quantity can take, sensor noise
    and filter estimates near a physical limit included, not what is typical: telemetry outside it
    is dead-lettered as implausible and what-if inputs and start states outside it are refused, so
    one broken sensor or typo cannot destroy a twin. Declare variables with `State`, `Input` and
    `Output`, which add what each kind needs.
    """

    name: str
    unit: str
    description: str = ""
    lower: float = -math.inf
    upper: float = math.inf

    def __post_init__(self) -> None:
        if not self.lower < self.upper:
            raise ValueError(f"variable {self.name}: need lower < upper, got [{self.lower}, {self.upper}]")
        nominal = getattr(self, "nominal", None)
        if nominal is not None and not self.lower <= nominal <= self.upper:
            raise ValueError(f"variable {self.name}: nominal {nominal} outside [{self.lower}, {self.upper}]")
        for name in ("prior_std", "process_std", "measurement_std"):
            value = getattr(self, name, None)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"variable {self.name}: {name} must be a finite number > 0, got {value}")


@dataclass(frozen=True)
class State(Var):
    """A state variable. ``nominal`` and ``prior_std`` are a new twin's prior (mean, std);
    ``process_std`` the filter's process-noise intensity in units/sqrt(s) (Q = q^2 dt);
    ``compensated``: in float32, accumulate it with Kahan summation (a slowly integrated quantity
    such as a battery's state of charge, whose tiny per-step increments round with a bias)."""

    nominal: float | None = None
    prior_std: float | None = None
    process_std: float | None = None
    compensated: bool = False


@dataclass(frozen=True)
class Input(Var):
    """An input. ``nominal`` is the value a twin holds until the input is first measured, and a
    typical value for examples and model checks."""

    nominal: float | None = None


@dataclass(frozen=True)
class Output(Var):
    """A measurable output. ``measurement_std`` is the sensor noise the filter assumes by default."""

    measurement_std: float | None = None


@dataclass(frozen=True)
class Param:
    """A model parameter with its SI unit, typical value and physically admissible bounds."""

    name: str
    unit: str
    default: float
    lower: float
    upper: float
    description: str = ""

    def __post_init__(self) -> None:
        if not self.lower <= self.default <= self.upper:
            raise ValueError(f"parameter {self.name}: default {self.default} outside [{self.lower}, {self.upper}]")


def _identity(x: Arrays) -> Arrays:
    return x


@dataclass(frozen=True, eq=False)
class Model:
    """A simulator: metadata plus pure JAX functions (see module docstring).

    ``project`` maps a state back onto its physical domain after each step (e.g. tank levels
    stay >= 0); ``dt_limit`` documents the step-size range in which RK4 is accurate.
    """

    name: str
    version: str
    description: str
    states: tuple[State, ...]
    inputs: tuple[Input, ...]
    params: tuple[Param, ...]
    outputs: tuple[Output, ...]
    coefficients: Callable[[Arrays], Arrays]
    derivative: Callable[[Arrays, Arrays, Arrays], Arrays]
    output: Callable[[Arrays, Arrays, Arrays], Arrays]
    project: Callable[[Arrays], Arrays] = field(default=_identity)
    default_dt: float = 1.0
    dt_limit: str = ""

    # ---- names and defaults -------------------------------------------------------------
    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.states)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.inputs)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.outputs)

    def default_params(self) -> dict[str, float]:
        return {p.name: p.default for p in self.params}

    def param_vector(self, overrides: dict[str, float] | None = None) -> list[float]:
        """Parameter values in model order: defaults updated by `overrides` (unknown names refused)."""
        values = self.default_params()
        unknown = set(overrides or {}) - set(values)
        if unknown:
            raise KeyError(f"model {self.name} has no parameter(s) {sorted(unknown)}; known: {sorted(values)}")
        values.update(overrides or {})
        return [float(values[n]) for n in self.param_names]

    # ---- the protocol ----------------------------------------------------------------------
    def step(self, state: Arrays, inputs: Arrays, params: Arrays, dt: float) -> Arrays:
        """One RK4 step of length `dt` with inputs held constant over the step."""
        return rk4_step(self, state, inputs, self.coefficients(params), dt)

    def observe(self, state: Arrays, inputs: Arrays, params: Arrays) -> Arrays:
        """The measurable outputs of `state` (inputs matter for e.g. a battery's IR drop)."""
        return self.output(state, inputs, self.coefficients(params))

    # ---- vector form, for filters that need Jacobians ------------------------------------
    def step_vector(self, x: jnp.ndarray, u: jnp.ndarray, p: jnp.ndarray, dt: float) -> jnp.ndarray:
        """`step` on stacked 1-D arrays (state, inputs, params) -> stacked state."""
        return jnp.stack(self.step(unstack(x), unstack(u), unstack(p), dt))

    def observe_vector(self, x: jnp.ndarray, u: jnp.ndarray, p: jnp.ndarray) -> jnp.ndarray:
        """`observe` on stacked 1-D arrays -> stacked outputs."""
        return jnp.stack(self.observe(unstack(x), unstack(u), unstack(p)))


def unstack(a: jnp.ndarray | Sequence) -> Arrays:
    """Split the last axis of an array into a tuple of arrays (the struct-of-arrays form)."""
    a = jnp.asarray(a)
    return tuple(a[..., i] for i in range(a.shape[-1]))


def rk4_step(model: Model, x: Arrays, u: Arrays, c: Arrays, dt: float) -> Arrays:
    """Classic fourth-order Runge-Kutta step, fused by XLA into one elementwise kernel."""
    f = model.derivative
    half = 0.5 * dt
    k1 = f(x, u, c)
    k2 = f(tuple(xi + half * ki for xi, ki in zip(x, k1)), u, c)
    k3 = f(tuple(xi + half * ki for xi, ki in zip(x, k2)), u, c)
    k4 = f(tuple(xi + dt * ki for xi, ki in zip(x, k3)), u, c)
    sixth = dt / 6.0
    x_next = tuple(
        xi + sixth * (a + 2.0 * b + 2.0 * c_ + d) for xi, a, b, c_, d in zip(x, k1, k2, k3, k4)
    )
    return model.project(x_next)
