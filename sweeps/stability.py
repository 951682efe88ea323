"""A sweep's step against the RK4 stability limit of the parameter and input box its scenarios span."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from raytwin.sim import get_model
from raytwin.sim.checks import BoxLimit, check_step, nominal_point
from raytwin.sim.model import Model

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
    return check_step(model, spec.step_s, box, inputs=_input_box(spec, simulator, model),
                      allow_unstable=spec.allow_unstable, what="step_s")


def _input_box(spec: SweepSpec, simulator: str, model: Model) -> np.ndarray:
    """The model inputs' extremes over the sweep, (2, m): an input its kit holds at a kit value of the same
    name (a bring-your-own model's kit) spans that value (`inputs`, else the kit's default) widened by its
    ``input`` dimensions; an input the kit drives by a signal (a sinusoid, a schedule, a controller) spans
    its declared range, where that is finite (a signal may reach any of it)."""
    kit = spec.kit(simulator).default_inputs()
    nominal = nominal_point(model)[1]
    out = np.repeat(nominal[None, :], 2, axis=0)
    for i, (name, declared) in enumerate(zip(model.input_names, model.inputs)):
        if name not in kit or name in spec.signals:
            out[:, i] = [b if np.isfinite(b) else nominal[i] for b in (declared.lower, declared.upper)]
            continue
        base = float(spec.inputs.get(name, kit[name]))
        values = [base] + [d.applied(v, base) for d in spec.space.dimensions if d.target == "input" and d.name == name
                           for v in d.extremes()]
        out[:, i] = min(values), max(values)
    return out
