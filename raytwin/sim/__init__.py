"""JAX simulators: the model protocol, RK4 integration and the reference asset models.

Importing this package enables JAX's float64 support (``jax_enable_x64``) so that validation
and filtering can run in double precision; throughput paths choose float32 explicitly.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

from raytwin.sim.battery import BATTERY_ECM, ocv  # noqa: E402
from raytwin.sim.integrate import Rollout, rollout, simulate, simulate_batch  # noqa: E402
from raytwin.sim.model import Input, Model, Output, Param, State, Var, rk4_step, unstack  # noqa: E402
from raytwin.sim.tanks import TWO_TANK  # noqa: E402
from raytwin.sim.thermal import THERMAL_RC  # noqa: E402



class UnknownModelError(KeyError, ValueError):
    """No simulator under that name (a ValueError too, so pydantic reports it as a validation error)."""

    def __str__(self) -> str:
        return str(self.args[0])


MODELS: dict[str, Model] = {m.name: m for m in (THERMAL_RC, BATTERY_ECM, TWO_TANK)}


def get_model(name: str) -> Model:
    """The simulator registered under `name` (a clear error lists the known ones)."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown simulator {name!r}; known: {sorted(MODELS)}") from None


__all__ = [
    "BATTERY_ECM", "MODELS", "Input", "Model", "Output", "Param", "Rollout", "State", "THERMAL_RC", "TWO_TANK",
    "UnknownModelError", "Var",
    "get_model", "ocv", "rk4_step", "rollout", "simulate", "simulate_batch", "unstack",
]
