"""Synthetic telemetry with known parameters: the ground truth that calibration must recover.

Trajectories come from `scipy.integrate.solve_ivp` (`raytwin.sim.reference`), not from the JAX
simulator that calibration uses, so a recovered parameter set is also a check of the simulator.
Each model gets an excitation that makes its parameters identifiable (see `sweeps/README.md`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raytwin.sim import get_model
from raytwin.sim.reference import model_rhs, reference_trajectory


def _held(values: np.ndarray, every: int, n: int) -> np.ndarray:
    """Hold each value for `every` steps (piecewise constant), truncated to n steps."""
    return np.repeat(values, every)[:n]


def excitation(simulator: str, n_steps: int, dt: float, seed: int = 0) -> np.ndarray:
    """Inputs (n_steps, n_inputs) that excite every time constant of the model."""
    rng = np.random.default_rng(seed)
    if simulator == "thermal_rc":
        hour = max(1, round(3600 / dt))
        hours = n_steps // hour + 1
        t_hours = 3600.0 * np.arange(hours)
        t_out = 278.15 + 5.0 * np.sin(2 * np.pi * (t_hours - 9 * 3600) / 86400) + rng.normal(0, 1.0, hours)
        q_sol = 2000.0 * np.maximum(np.sin(2 * np.pi * (t_hours - 6 * 3600) / 86400), 0.0)
        heating = rng.choice([0.0, 3000.0, 6000.0], size=hours)  # random multi-level heating, hourly
        return np.column_stack([_held(v, hour, n_steps) for v in (t_out, heating, q_sol)])
    if simulator == "battery_ecm":
        block = max(1, round(60 / dt))  # a new current level every minute: pulses and rests
        levels = rng.choice([0.0, 0.0, 1.0, 2.5, 5.0, -2.5], size=n_steps // block + 1)
        return _held(levels, block, n_steps)[:, None]
    if simulator == "two_tank":
        block = max(1, round(300 / dt))
        levels = rng.uniform(0.3e-4, 1.6e-4, size=n_steps // block + 1)
        return _held(levels, block, n_steps)[:, None]
    raise ValueError(f"no excitation design for {simulator!r}")


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
    u = excitation(simulator, n_steps, dt, seed)
    x = reference_trajectory(model_rhs(model, p), np.asarray([x0[s] for s in model.state_names]), u[:-1], dt)
    y = np.stack(model.observe(tuple(x.T), tuple(u.T), tuple(p)), axis=1)
    rng = np.random.default_rng([seed, 1])
    columns = {"t_s": dt * np.arange(n_steps)}
    columns.update({name: u[:, j] for j, name in enumerate(model.input_names)})
    for j, name in enumerate(model.output_names):
        columns[name] = y[:, j] + rng.normal(0.0, noise_std.get(name, 0.0), n_steps)
    return pa.table(columns)
