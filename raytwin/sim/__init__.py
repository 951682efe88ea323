"""JAX simulators: the model protocol, RK4 integration, model discovery and checks, and the
reference asset models.

Importing this package enables JAX's float64 support (``jax_enable_x64``) so that validation
and filtering can run in double precision; throughput paths choose float32 explicitly.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

from raytwin.sim.battery import BATTERY_ECM, ocv  # noqa: E402
from raytwin.sim.discovery import Catalog, UnknownModelError, get_model, load_model, model_ref  # noqa: E402
from raytwin.sim.integrate import Rollout, rollout, simulate, simulate_batch  # noqa: E402
from raytwin.sim.model import Input, Model, ModelCheckError, Output, Param, State, Var, rk4_step, unstack  # noqa: E402
from raytwin.sim.tanks import TWO_TANK  # noqa: E402
from raytwin.sim.thermal import THERMAL_RC  # noqa: E402

MODELS: Catalog = Catalog()
"""The declared models by name (entry-point group ``raytwin.models``), loaded on first access."""

__all__ = [
    "BATTERY_ECM", "MODELS", "Input", "Model", "ModelCheckError", "Output", "Param", "Rollout", "State",
    "THERMAL_RC", "TWO_TANK", "UnknownModelError", "Var",
    "get_model", "load_model", "model_ref", "ocv", "rk4_step", "rollout", "simulate", "simulate_batch", "unstack",
]
