"""JAX simulators: the model protocol, RK4 integration, model discovery and checks, and the
reference asset models.

Importing this package leaves JAX's global settings alone: float64 work (validation, filtering,
calibration, what-if answers) runs inside `raytwin.sim.precision.float64` scopes.
"""

from __future__ import annotations

from raytwin.sim.battery import BATTERY_ECM, ocv
from raytwin.sim.discovery import Catalog, UnknownModelError, get_model, load_model, model_ref
from raytwin.sim.integrate import Rollout, rollout, simulate, simulate_batch
from raytwin.sim.model import Input, Model, ModelCheckError, Output, Param, State, Var, rk4_step, unstack
from raytwin.sim.tanks import TWO_TANK
from raytwin.sim.thermal import THERMAL_RC

MODELS: Catalog = Catalog()
"""The declared models by name (entry-point group ``raytwin.models``), loaded on first access."""

__all__ = [
    "BATTERY_ECM", "MODELS", "Input", "Model", "ModelCheckError", "Output", "Param", "Rollout", "State",
    "THERMAL_RC", "TWO_TANK", "UnknownModelError", "Var",
    "get_model", "load_model", "model_ref", "ocv", "rk4_step", "rollout", "simulate", "simulate_batch", "unstack",
]
