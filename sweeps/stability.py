"""A sweep's step against the RK4 stability limit of the parameter box its scenarios span."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from raytwin.sim import get_model
from raytwin.sim.checks import BoxLimit, check_step

if TYPE_CHECKING:
    from sweeps.spec import SweepSpec


def check_sweep_step(spec: SweepSpec, simulator: str, base_parameters: dict[str, float] | None = None) -> BoxLimit:
    """Refuse a sweep whose `step_s` is beyond the RK4 stability limit somewhere in its parameter box:
    each parameter's base value (the simulator's default, then `base_parameters` such as a registry
    artifact's, then the spec's `parameters`) widened by its ``param`` dimensions (absolute or
    scaled values), checked at the box's corners. The message names the corner and the limit; a
    sweep that must run anyway sets ``allow_unstable`` (a warning and a log line instead)."""
    model = get_model(simulator)
    base = {**model.default_params(), **(base_parameters or {}), **spec.parameters}
    values = {name: [value] for name, value in base.items()}
    for d in spec.space.dimensions:
        if d.target == "param" and d.name in base:
            values[d.name] = [d.applied(v, base[d.name]) for v in d.extremes()]
    box = [np.array([min(values[n]), max(values[n])]) for n in model.param_names]
    return check_step(model, spec.step_s, box, allow_unstable=spec.allow_unstable, what="step_s")
