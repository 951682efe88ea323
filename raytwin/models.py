"""The public API for writing RayTwin models: what a user's package imports.

    from raytwin.models import Model, State, Input, Output, Param, check_model, load_model

A model is a frozen `Model` (keyword-only) of declared variables and pure JAX functions over tuples
of arrays (see `raytwin.sim.model`). Declare it in your package's ``pyproject.toml`` under
``[project.entry-points."raytwin.models"]`` (``name = "package.module:MODEL"``) or refer to it by
its import path ``package.module:MODEL``; `check_model` runs what registration runs.

Stability of these names: `Model`, `State`, `Input`, `Output`, `Param`, `check_model`,
`load_model`, `get_model`, `ModelCheckError`, `UnknownModelError` and the function signatures of
`Model` (``coefficients(p)``, ``derivative(x, u, c)``, ``output(x, u, c)``, ``update(x, u, c)``,
``project(x)``) are stable: they change only with a major version. `ModelReport`,
`stability_limit`, `rk4_limits` and `DivergedRunError` are provisional (their fields may still grow), as are the explicit
Runge-Kutta solvers `ExplicitRK`, `RK4` and `TSIT5` (``Model(solver=TSIT5)``: `raytwin.sim.tableau`).
"""

from __future__ import annotations

from raytwin.sim.checks import (
    DivergedRunError, ModelReport, UnstableStepError, UnstableStepWarning, check_model, rk4_limits, stability_limit,
)
from raytwin.sim.discovery import GROUP, UnknownModelError, get_model, load_model
from raytwin.sim.model import Input, Model, ModelCheckError, Output, Param, State
from raytwin.sim.tableau import RK4, TSIT5, ExplicitRK

__all__ = [
    "GROUP", "DivergedRunError", "ExplicitRK", "Input", "Model", "ModelCheckError", "ModelReport", "Output",
    "Param", "RK4", "State", "TSIT5", "UnknownModelError", "UnstableStepError", "UnstableStepWarning",
    "check_model", "get_model", "load_model", "rk4_limits", "stability_limit",
]
