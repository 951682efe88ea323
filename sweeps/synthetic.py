"""Synthetic telemetry with known parameters: the ground truth that calibration must recover.

Trajectories come from `scipy.integrate.solve_ivp` (`raytwin.sim.reference`), not from the JAX
simulator that calibration uses, so a recovered parameter set is also a check of the simulator.
The inputs are the model kit's `excitation` signals (open loop: `raytwin.signals` data), or
generic ones derived from the model's declaration (`generic_excitation`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raytwin.sim import Model, get_model
from raytwin.sim.reference import model_rhs, reference_trajectory
from raytwin.signals import RandomLevels, signal_function
from sweeps.kits import kit_for

HOLD_STEPS = 60
"""Generic excitation: a new random level of each input every 60 of the model's default steps."""
SPAN = 0.5
"""Generic excitation: levels uniform within nominal +- 50 % (+- 1 unit around a zero nominal)."""


def generic_excitation(model: Model) -> dict[str, RandomLevels]:
    """Piecewise-constant random levels around each input's nominal, within its declared range,
    held for `HOLD_STEPS` default steps: steps of every size excite every time constant."""
    signals = {}
    for j, v in enumerate(model.inputs):
        nominal = 0.0 if v.nominal is None else v.nominal
        span = SPAN * abs(nominal) or 1.0
        low, high = max(nominal - span, v.lower), min(nominal + span, v.upper)
        signals[v.name] = RandomLevels(low=low, high=high, hold_s=HOLD_STEPS * model.default_dt, seed=j)
    return signals


def excitation(model: Model | str, n_steps: int, dt: float, seed: int = 0) -> np.ndarray:
    """Inputs (n_steps, n_inputs) at times ``dt * k``: the kit's excitation (or the generic one)."""
    model = get_model(model) if isinstance(model, str) else model
    signals = kit_for(model).excitation or generic_excitation(model)
    t = dt * np.arange(n_steps, dtype=np.float64)
    columns = []
    for var in model.inputs:  # open-loop signals of numbers only (checked by `Kit`), in float64 NumPy
        fn = signal_function(signals[var.name], horizon_s=n_steps * dt, step_s=dt, offset=seed, unit=var.unit, xp=np)
        columns.append(np.asarray(fn(t, None, {}), dtype=np.float64))
    return np.column_stack(columns) if columns else np.empty((n_steps, 0))  # a model without inputs: no column


def synthetic_telemetry(
    simulator: str,
    params: dict[str, float],
    x0: dict[str, float],
    n_steps: int,
    dt: float,
    noise_std: dict[str, float],
    seed: int = 0,
) -> pa.Table:
    """Telemetry table: ``t_s``, the inputs, and the outputs with Gaussian noise of `noise_std`."""
    model = get_model(simulator)
    p = np.asarray(model.param_vector(params))
    u = excitation(model, n_steps, dt, seed)
    x = reference_trajectory(model_rhs(model, p), np.asarray([x0[s] for s in model.state_names]), u[:-1], dt)
    y = np.stack(model.observe(tuple(x.T), tuple(u.T), tuple(p)), axis=1)
    rng = np.random.default_rng([seed, 1])
    columns = {"t_s": dt * np.arange(n_steps)}
    columns.update({name: u[:, j] for j, name in enumerate(model.input_names)})
    for j, name in enumerate(model.output_names):
        columns[name] = y[:, j] + rng.normal(0.0, noise_std.get(name, 0.0), n_steps)
    return pa.table(columns)
