"""A sweep's step against the RK4 stability limit of the parameter and input box its scenarios span."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from raytwin.signals import Proportional, signal_function
from raytwin.sim import get_model
from raytwin.sim.checks import BoxLimit, box_corners, check_sampled_loop, check_step, declared_inputs
from raytwin.sim.model import Model

if TYPE_CHECKING:
    from sweeps.kits import Kit
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
    kit = spec.kit(simulator)
    state = {n: float(v) for n, v in (spec.start_state or kit.states0).items()}
    settings = _kit_corners(spec, spec.kit_inputs(kit))
    inputs = _input_box(spec, kit, model, state, settings)
    limit = check_step(model, spec.step_s, box, inputs=inputs, allow_unstable=spec.allow_unstable, what="step_s")
    if (feedback := _feedback_gains(kit, model, state, settings)) is not None:
        gains, loop = feedback
        check_sampled_loop(model, spec.step_s, [b[0] for b in box], [b[1] for b in box], inputs[0], inputs[1],
                           state=[state[n] for n in model.state_names], gains=gains, loop=loop,
                           allow_unstable=spec.allow_unstable, what="step_s")
    return limit


MAX_SIGNAL_SAMPLES = 100_000
"""Times at which a signal is evaluated for its range, at most (evenly spread over the horizon)."""


def _input_box(spec: SweepSpec, kit: Kit, model: Model, state: dict[str, float],
               settings: list[dict[str, float]]) -> np.ndarray:
    """The model inputs' extremes over the sweep, (2, m): each input's signal in the kit (a held kit value, a
    sinusoid, a schedule, ...) evaluated over the horizon at the start state (feedback: over its state's
    plausible range, `_feedback_states`), at the corners of the kit values the sweep's ``input`` dimensions
    span. A signal that cannot be evaluated outside a kernel spans its input's declared range where that is
    finite (`declared_inputs`)."""
    times = np.linspace(0.0, spec.horizon_s, min(spec.n_steps, MAX_SIGNAL_SAMPLES), endpoint=False)
    out = np.array(declared_inputs(model))  # where a signal cannot be evaluated outside a kernel
    for i, declared in enumerate(model.inputs):
        sig = kit.inputs[declared.name]
        try:
            f = signal_function(sig, horizon_s=spec.horizon_s, step_s=spec.step_s, unit=declared.unit, xp=np)
            values = [np.asarray(f(times, x, ip), dtype=np.float64) for ip in settings
                      for x in _feedback_states(sig, state, model)]
        except Exception:  # noqa: BLE001 - a JAX-only function: its declared range, or nominal where unbounded
            continue
        low, high = min(float(np.min(v)) for v in values), max(float(np.max(v)) for v in values)
        if np.isfinite(low) and np.isfinite(high):  # else (feedback on an unbounded state) its declared range
            out[:, i] = low, high
    return out


def _feedback_states(sig: Any, state: dict[str, float], model: Model) -> list[dict[str, float]]:
    """The states a signal is evaluated at: the start state, and for feedback on a state (linear in it) that
    state at its plausible range's ends too, where the feedback takes its extremes during the run; a
    thermostat read at the start state alone spanned one value, however far the state would move."""
    if not isinstance(sig, Proportional):
        return [state]
    bounds = next(v for v in model.states if v.name == sig.state)
    return [state, {**state, sig.state: bounds.lower}, {**state, sig.state: bounds.upper}]


def _feedback_gains(kit: Kit, model: Model, state: dict[str, float],
                    settings: list[dict[str, float]]) -> tuple[np.ndarray, str] | None:
    """The kit's feedback as d input / d state (m, n) in the model's units, unsaturated (the loop's gain
    where it acts), at the kit values that make it strongest, and a line naming it; None without feedback."""
    loops = [(i, sig) for i, d in enumerate(model.inputs) if isinstance(sig := kit.inputs[d.name], Proportional)]
    if not loops:
        return None
    unsaturated = [(i, model.state_names.index(sig.state), sig.state,
                    signal_function(sig.model_copy(update={"lower": None, "upper": None}), unit=model.inputs[i].unit,
                                    xp=np)) for i, sig in loops]

    def gains_at(ip: dict[str, float]) -> np.ndarray:
        gains = np.zeros((len(model.inputs), len(model.states)))
        for i, j, name, f in unsaturated:
            gains[i, j] = float(f(0.0, {**state, name: 1.0}, ip)) - float(f(0.0, {**state, name: 0.0}, ip))
        return gains

    ip = max(settings, key=lambda ip: float(np.abs(gains_at(ip)).sum()))
    named = [f"{model.inputs[i].name} = {sig.gain} ({sig.setpoint} - {sig.state})"
             + (f" with {sig.gain}={ip[sig.gain]:g}" if isinstance(sig.gain, str) else "") for i, sig in loops]
    return gains_at(ip), "; ".join(named)


def _kit_corners(spec: SweepSpec, base: dict[str, float]) -> list[dict[str, float]]:
    """Kit values at the corners of the box the sweep's ``input`` dimensions span (`box_corners`)."""
    dims = [d for d in spec.space.dimensions if d.target == "input" and d.name in base]
    applied = [[d.applied(v, float(base[d.name])) for v in d.extremes()] for d in dims]
    corners = box_corners([min(a) for a in applied], [max(a) for a in applied])
    return [{**base, **{d.name: float(v) for d, v in zip(dims, row)}} for row in corners]
