"""Adaptive, implicit integration for stiff models (diffrax), chosen per model.

Fixed-step RK4 stays the fast path: one fused elementwise kernel per step. A stiff model (time
scales apart by many orders of magnitude, e.g. chemical kinetics) would need an RK4 step below its
fastest time constant, which `raytwin.sim.checks` refuses long before it is practical. Such a model
declares ``Model(solver=Adaptive())``: each step of ``dt`` (inputs held) is then integrated by
diffrax's Kvaerno5 (an L-stable ESDIRK method) under a PID step-size controller, and the RK4
stability check does not apply. diffrax is imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
        """The state after `dt` from `x` with inputs `u` held (jit/vmap-able; pure)."""
        import diffrax

        term = diffrax.ODETerm(lambda t, y, args: tuple(model.derivative(y, u, c)))
        solution = diffrax.diffeqsolve(
            term, getattr(diffrax, self.method)(), 0.0, dt, None, tuple(x),
            stepsize_controller=diffrax.PIDController(rtol=self.rtol, atol=self.atol),
            saveat=diffrax.SaveAt(t1=True), max_steps=self.max_steps,
        )
        return tuple(y[-1] for y in solution.ys)
