"""The simulator protocol: a physics model as pure, elementwise JAX functions.

A `Model` describes its state, inputs, parameters and outputs (with units and bounds) and gives
pure functions over *tuples of arrays* (one array per variable):

- ``coefficients(params) -> coeffs``: everything that depends only on parameters (reciprocals,
  products) computed once per scenario instead of once per step;
- ``derivative(state, inputs, coeffs) -> d state / dt``;
- ``output(state, inputs, coeffs) -> measurements``;
- optionally ``update(state, inputs, coeffs) -> state``: a discrete map applied after each RK4 step
  (hybrid and event models: a relay that switches, a counter, a reset), and ``project(state) ->
  state``, applied last, to keep a state in its physical domain.

Construction checks what can be checked without running the functions (kinds, unique identifier
names, no input named like a state or output, an output named like a state in its unit, units in
`raytwin.units`, a positive finite ``default_dt``) and raises `ModelCheckError`
naming the model and the field; `raytwin.sim.checks.check_model` runs the functions.

Tuples of arrays ("struct of arrays") rather than stacked vectors are a deliberate choice: every
operation is elementwise, so the same code runs on scalars, on a ``vmap``-ed batch or on a plain
batch of arrays, and XLA fuses a whole RK4 step into one loop over the batch. Stacking the state
into a vector makes XLA emit a gather and a concatenate per stage, which measured ~18x slower on
CPU (see ``benchmarks/``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import math
import re

import jax.numpy as jnp

from raytwin import units

Arrays = tuple  # a tuple of JAX arrays, one per variable, all broadcastable to a common shape


@dataclass(frozen=True)
class Var:
    """A variable: name, unit (SI or any the unit grammar reads: `raytwin.units`), a short description and its
    plausible range.

    The range (``lower`` <= value <= ``upper``, in its unit) bounds what the quantity can take, sensor noise
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
        fail = lambda reason: DeclarationError(declared_field(self), reason)  # noqa: E731
        if not self.lower < self.upper:
            raise fail(_range_problem(self.lower, self.upper))
        nominal = getattr(self, "nominal", None)
        if nominal is not None and not self.lower <= nominal <= self.upper:
            raise fail(f"nominal {nominal:g} is outside its range [{self.lower:g}, {self.upper:g}]")
        for name in ("prior_std", "process_std", "measurement_std"):
            value = getattr(self, name, None)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise fail(f"{name} must be a finite number > 0, got {value:g}")


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
    """A model parameter with its unit, typical value and physically admissible bounds (infinite
    where unknown, as in an FMU without min/max; `check_model` and the registry need finite ones)."""

    name: str
    unit: str
    default: float
    lower: float
    upper: float
    description: str = ""

    def __post_init__(self) -> None:
        fail = lambda reason: DeclarationError(declared_field(self), reason)  # noqa: E731
        if not math.isfinite(self.default) or math.isnan(self.lower) or math.isnan(self.upper):
            raise fail(f"the default must be finite and the bounds numbers, got default {self.default:g} "
                       f"in [{self.lower:g}, {self.upper:g}]")
        if self.lower > self.upper:
            raise fail(_range_problem(self.lower, self.upper))
        if not self.lower <= self.default <= self.upper:
            raise fail(f"default {self.default:g} is outside its bounds [{self.lower:g}, {self.upper:g}]")


class DeclarationError(ValueError):
    """A variable or parameter declared with values it cannot have, raised when it is constructed
    (before any model holds it, so it names the field, e.g. ``params.m``, and loading the model
    module adds the model: `raytwin.sim.discovery.load_model`)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason

    def __reduce__(self) -> tuple[type[DeclarationError], tuple[str, str]]:
        """Rebuilt from its parts when it crosses processes (Ray, Serve), as the default pickle cannot."""
        return type(self), (self.field, self.reason)


def declared_field(v: Var | Param) -> str:
    """Where a declaration sits in a model: ``states.x``, ``params.m`` (the kind's `Model` field)."""
    kind = next((k for k, cls in _KINDS if isinstance(v, cls)), "variables")
    return f"{kind}.{v.name}"


def _range_problem(lower: float, upper: float) -> str:
    """Why [lower, upper] is not a range, saying a reversed one is reversed."""
    if lower > upper:
        return f"lower bound {lower:g} is above upper bound {upper:g}: swap them"
    return f"range [{lower:g}, {upper:g}] needs lower < upper"


def _identity(x: Arrays) -> Arrays:
    return x


def _check_shared_names(model: Model, fail: Callable[[str, str], ModelCheckError]) -> None:
    """Refuse names that telemetry and scenario metrics could not tell apart: they name a variable by its name
    alone, so an input named like a state or output would be fed by, or stand in for, the other (a reading of
    ``theta`` drove the torque input ``theta`` too). An output may repeat a state's name, the state observed, but
    then in the state's unit: metrics read such an output from the state."""
    others = {v.name: kind for kind in ("states", "outputs") for v in getattr(model, kind)}
    for v in model.inputs:
        if v.name in others:
            raise fail(f"inputs.{v.name}", f"shares its name with {others[v.name]}.{v.name}: telemetry and scenario "
                                            "metrics name a variable by its name alone; rename one of them")
    states = {v.name: v for v in model.states}
    for v in model.outputs:
        if v.name in states and not units.same_unit(v.unit, states[v.name].unit):
            raise fail(f"outputs.{v.name}", f"unit {v.unit!r} is not {states[v.name].unit!r}, the unit of the state it "
                                            "is named after: metrics read such an output from the state; declare "
                                            "the state's unit, or name the output differently (e.g. "
                                            f"{v.name}_{v.unit.replace('/', '_per_')})")


class ModelCheckError(ValueError):
    """A model declaration or function that RayTwin cannot run safely: one line naming the model
    and the field (``model pump: states[1]: unit 'bar' is unknown ...``)."""

    def __init__(self, model: str, field: str, reason: str):
        super().__init__(f"model {model}: {field}: {reason}")
        self.model, self.field, self.reason = model, field, reason

    def __reduce__(self) -> tuple[type[ModelCheckError], tuple[str, str, str]]:
        """Rebuilt from its three parts: raised in a Ray task, it reaches the caller as itself (the default pickle
        passed only the message, and Ray handed over an unserializable error: a 500 instead of a 422)."""
        return type(self), (self.model, self.field, self.reason)


class Solver(Protocol):
    """How a model's steps are integrated when not by RK4 (see `raytwin.sim.stiff`)."""

    def advance(self, model: Model, x: Arrays, u: Arrays, c: Arrays, dt: Any) -> Arrays: ...


_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_KINDS = (("states", State), ("inputs", Input), ("params", Param), ("outputs", Output))


class Declared:
    """Names and defaults of anything that declares `states`, `inputs`, `params` and `outputs`
    (a JAX `Model`, an FMU), in declaration order."""

    name: str
    states: tuple[State, ...]
    inputs: tuple[Input, ...]
    params: tuple[Param, ...]
    outputs: tuple[Output, ...]

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


@dataclass(frozen=True, eq=False, kw_only=True)
class Model(Declared):
    """A simulator: metadata plus pure JAX functions (see module docstring). Keyword-only.

    ``solver``: None for fixed-step RK4 (the fast path), another explicit Runge-Kutta tableau at the
    same fixed step (`raytwin.sim.tableau.TSIT5`), or an adaptive solver for a stiff model
    (`raytwin.sim.stiff.Adaptive`), which then integrates each step of ``dt``.
    ``update`` (optional) is a discrete map applied after each step, before ``project``
    (which keeps a state in its physical domain, e.g. tank levels >= 0); ``default_dt`` [s] is the
    step twins and examples use; ``dt_limit`` documents the step-size range in which RK4 is
    accurate (the stability limit itself is computed: `raytwin.sim.checks.stability_limit`).
    """

    name: str
    version: str
    description: str = ""
    states: tuple[State, ...]
    inputs: tuple[Input, ...]
    params: tuple[Param, ...]
    outputs: tuple[Output, ...]
    coefficients: Callable[[Arrays], Arrays]
    derivative: Callable[[Arrays, Arrays, Arrays], Arrays]
    output: Callable[[Arrays, Arrays, Arrays], Arrays]
    update: Callable[[Arrays, Arrays, Arrays], Arrays] | None = None
    project: Callable[[Arrays], Arrays] = field(default=_identity)
    default_dt: float = 1.0
    dt_limit: str = ""
    solver: Solver | None = None

    filters: ClassVar[tuple[str, ...]] = ("ekf", "ukf")
    """The twin filters (`raytwin.ukf.FILTERS`) that can run this model, the default first: JAX
    code has Jacobians (``jacfwd``) for the EKF and can be evaluated at sigma points for the UKF."""

    def __post_init__(self) -> None:
        name = self.name if isinstance(self.name, str) else repr(self.name)
        fail = lambda fld, reason: ModelCheckError(name, fld, reason)  # noqa: E731
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise fail("name", "must be an identifier (a letter, then letters, digits or _; at most 64)")
        if not isinstance(self.version, str) or not _VERSION.match(self.version):
            raise fail("version", f"{self.version!r} is not a semantic version like 1.0.0")
        for kind, cls in _KINDS:
            variables = getattr(self, kind)
            if not isinstance(variables, tuple):
                raise fail(kind, f"must be a tuple of {cls.__name__}, got {type(variables).__name__}")
            seen = set()
            for i, v in enumerate(variables):
                if type(v) is not cls:
                    raise fail(f"{kind}[{i}]", f"is a {type(v).__name__}, expected {cls.__name__}")
                if not isinstance(v.name, str) or not v.name.isidentifier():
                    raise fail(f"{kind}[{i}]", f"name {v.name!r} is not an identifier")
                if v.name in seen:
                    raise fail(f"{kind}.{v.name}", "declared twice")
                seen.add(v.name)
                try:
                    units.canonical(v.unit)
                except units.UnitError as exc:
                    raise fail(f"{kind}.{v.name}", str(exc)) from None
        if not self.states:
            raise fail("states", "a model needs at least one state")
        _check_shared_names(self, fail)
        for fn in ("coefficients", "derivative", "output", "project"):
            if not callable(getattr(self, fn)):
                raise fail(fn, "must be a function")
        if self.update is not None and not callable(self.update):
            raise fail("update", "must be a function or None")
        if self.solver is not None and not callable(getattr(self.solver, "advance", None)):
            raise fail("solver", "must be None (RK4), an explicit tableau such as "
                                   "raytwin.models.TSIT5, or a solver such as raytwin.sim.stiff.Adaptive()")
        if not (isinstance(self.default_dt, int | float) and math.isfinite(self.default_dt) and self.default_dt > 0):
            raise fail("default_dt", f"must be a finite number of seconds > 0, got {self.default_dt!r}")

    def check_registration(self, params: Sequence[float], *, allow_unstable: bool = False) -> None:
        """What the registry runs before storing an artifact of this model (`raytwin.sim.checks.
        check_registration`: the model's checks, then its ``default_dt`` against the RK4 limit)."""
        from raytwin.sim.checks import check_registration

        check_registration(self, params, allow_unstable=allow_unstable)

    # ---- the protocol ----------------------------------------------------------------------
    def step(self, state: Arrays, inputs: Arrays, params: Arrays, dt: float) -> Arrays:
        """One step of length `dt` with inputs held constant over the step."""
        return model_step(self, state, inputs, self.coefficients(params), dt)

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
    """Classic fourth-order Runge-Kutta step, fused by XLA into one elementwise kernel, then the
    model's discrete `update` (if any) and `project`."""
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
    return after_step(model, x_next, u, c)


def model_step(model: Model, x: Arrays, u: Arrays, c: Arrays, dt: float) -> Arrays:
    """One step with the model's solver: `rk4_step`, or its adaptive solver followed by `after_step`."""
    if model.solver is None:
        return rk4_step(model, x, u, c, dt)
    return after_step(model, model.solver.advance(model, x, u, c, dt), u, c)


def after_step(model: Model, x: Arrays, u: Arrays, c: Arrays) -> Arrays:
    """What follows the continuous part of a step: the discrete `update`, then `project`."""
    if model.update is not None:
        x = tuple(model.update(x, u, c))
    return model.project(x)
