"""JAX simulators: the model protocol, RK4 integration, model discovery and checks, and the
reference asset models.

Names load on first use (PEP 562), so the reference models can be written against the public
`raytwin.models` exactly as a user's package is. Importing this package leaves JAX's global
settings alone: float64 work (validation, filtering, calibration, what-if answers) runs inside
`raytwin.sim.precision.float64` scopes.
"""

from __future__ import annotations

from raytwin.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "raytwin.sim.battery": ("BATTERY_ECM", "ocv"),
    "raytwin.sim.tanks": ("TWO_TANK",),
    "raytwin.sim.thermal": ("THERMAL_RC",),
    "raytwin.sim.discovery": ("MODELS", "UnknownModelError", "get_model", "load_model", "model_ref"),
    "raytwin.sim.integrate": ("Rollout", "rollout", "simulate", "simulate_batch"),
    "raytwin.sim.tableau": ("ExplicitRK", "RK4", "TSIT5"),
    "raytwin.sim.model": ("Input", "Model", "ModelCheckError", "Output", "Param", "State", "Var", "rk4_step",
                          "unstack"),
})
