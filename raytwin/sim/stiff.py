"""Adaptive, implicit integration for stiff models (diffrax), chosen per model.

Fixed-step RK4 stays the fast path: one fused elementwise kernel per step. A stiff model (time
scales apart by many orders of magnitude, e.g. chemical kinetics) would need an RK4 step below its
fastest time constant, which `raytwin.sim.checks` refuses long before it is practical. Such a model
declares ``Model(solver=Adaptive())``: each step of ``dt`` (inputs held) is then integrated by
diffrax's Kvaerno5 (an L-stable ESDIRK method) under a PID step-size controller, and the RK4
stability check does not apply. diffrax is imported on first use.

It integrates in float64 only: in float32 the default rtol (1e-8) is below float32's resolution
(1.2e-7), so on a stiff model such as Robertson's kinetics the controller shrinks the step until
diffrax gives up at ``max_steps``, and looser tolerances rescue some models only. So `simulate`,
`simulate_batch` and sweeps integrate such a model in float64 whatever dtype they are given
(`raytwin.sim.integrate.integration_dtype`), and a float32 run through `rollout` in a caller's own
jit is refused with one line when it is traced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from raytwin.sim.model import ModelCheckError

if TYPE_CHECKING:
    from raytwin.sim.model import Arrays, Model


@dataclass(frozen=True, kw_only=True)
class Adaptive:
    """An adaptive diffrax solver (`method`: a diffrax solver class name, implicit ones for stiff
    models) with relative/absolute tolerances and a bound on internal steps per ``dt``."""

    method: str = "Kvaerno5"
    rtol: float = 1e-8
    atol: float = 1e-10
    max_steps: int = 100_000

    def __post_init__(self) -> None:
        import diffrax

        if not isinstance(getattr(diffrax, self.method, None), type):
            raise ValueError(f"solver method {self.method!r} is not a diffrax solver (e.g. Kvaerno5, Tsit5)")
        if not (self.rtol > 0 and self.atol > 0 and self.max_steps > 0):
            raise ValueError("solver tolerances and max_steps must be > 0")

    def advance(self, model: Model, x: Arrays, u: Arrays, c: Arrays, dt: Any) -> Arrays:
        """The state after `dt` from `x` with inputs `u` held (jit/vmap-able; pure; float64 only)."""
        import diffrax

        dtype = jnp.result_type(*x)
        if dtype != jnp.float64:
            raise ModelCheckError(model.name, "solver", f"Adaptive({self.method}) integrates in float64 only, "
                                  f"not {dtype}: run it in float64 (simulate, simulate_batch and sweeps "
                                  "do so by themselves, raytwin.sim.integrate.integration_dtype)")
        term = diffrax.ODETerm(lambda t, y, args: tuple(model.derivative(y, u, c)))
        solution = diffrax.diffeqsolve(
            term, getattr(diffrax, self.method)(), 0.0, dt, None, tuple(x),
            stepsize_controller=diffrax.PIDController(rtol=self.rtol, atol=self.atol),
            saveat=diffrax.SaveAt(t1=True), max_steps=self.max_steps,
        )
        return tuple(y[-1] for y in solution.ys)
