"""JAX simulators: the model protocol, RK4 integration, model discovery and checks, and the
reference asset models.

Names load on first use (PEP 562), so the reference models can be written against the public
`raytwin.models` exactly as a user's package is. Importing this package leaves JAX's global
settings alone: float64 work (validation, filtering, calibration, what-if answers) runs inside
`raytwin.sim.precision.float64` scopes.
"""

from __future__ import annotations

from raytwin.lazy import lazy_exports

_EXPORTS = {
    "BATTERY_ECM": "raytwin.sim.battery",
    "ocv": "raytwin.sim.battery",
    "TWO_TANK": "raytwin.sim.tanks",
    "THERMAL_RC": "raytwin.sim.thermal",
    "MODELS": "raytwin.sim.discovery",
    "UnknownModelError": "raytwin.sim.discovery",
    "get_model": "raytwin.sim.discovery",
    "load_model": "raytwin.sim.discovery",
    "model_ref": "raytwin.sim.discovery",
    "Rollout": "raytwin.sim.integrate",
    "rollout": "raytwin.sim.integrate",
    "simulate": "raytwin.sim.integrate",
    "simulate_batch": "raytwin.sim.integrate",
    "ExplicitRK": "raytwin.sim.tableau",
    "RK4": "raytwin.sim.tableau",
    "TSIT5": "raytwin.sim.tableau",
    "Input": "raytwin.sim.model",
    "Model": "raytwin.sim.model",
    "ModelCheckError": "raytwin.sim.model",
    "Output": "raytwin.sim.model",
    "Param": "raytwin.sim.model",
    "State": "raytwin.sim.model",
    "Var": "raytwin.sim.model",
    "rk4_step": "raytwin.sim.model",
    "unstack": "raytwin.sim.model",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
