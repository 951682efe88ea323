"""`raytwin demo`: the whole loop on an embedded local Ray, with no external services.

Each section prints what it did and a figure that can be checked: a model registered and read
back by content hash, a batch of scenarios simulated on Ray workers, and the simulator compared
with scipy's solve_ivp on the same inputs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console()


def _section(title: str) -> None:
    console.rule(f"[bold]{title}")


def thermal_week_inputs(n_steps: int, dt: float, rng: np.random.Generator) -> np.ndarray:
    """A week of weather and heating: daily outdoor sinusoid, morning/evening heating schedule."""
    t = dt * np.arange(n_steps)
    t_out = 278.0 + 5.0 * np.sin(2 * np.pi * (t - 6 * 3600) / 86400.0) + rng.normal(0, 0.3)
    hour = (t % 86400.0) / 3600.0
    q_h = np.where(((hour >= 6) & (hour < 9)) | ((hour >= 17) & (hour < 23)), 6000.0, 1500.0)
    q_sol = np.clip(800.0 * np.sin(2 * np.pi * (t - 6 * 3600) / 86400.0), 0.0, None)
    return np.column_stack([t_out, q_h, q_sol])


def section_registry(root: Path):
    from raytwin.contracts import AssetType
    from raytwin.registry import ModelRegistry
    from raytwin.sim import THERMAL_RC

    _section("1. Model registry")
    registry = ModelRegistry(str(root / "models"))
    artifact = registry.register("office-zone", "1.0.0", AssetType.from_model(THERMAL_RC), {"C_in": 2.2e6})
    same = registry.get("office-zone@1.0.0")
    console.print(f"registered {artifact.ref} sha256={artifact.content_hash[:16]}… read back identical: {same == artifact}")
    return artifact


def section_batch(artifact, scenarios: int, rng: np.random.Generator):
    import ray

    from raytwin.sim import simulate_batch

    _section(f"2. {scenarios:,} what-if scenarios, one week at 60 s, on Ray workers")
    model = artifact.model()
    dt, n_steps = 60.0, 7 * 1440
    inputs = thermal_week_inputs(n_steps, dt, rng)
    params = np.array(artifact.param_vector()) * rng.uniform(0.7, 1.3, size=(scenarios, len(model.params)))
    x0 = np.tile([293.0, 292.0], (scenarios, 1))

    @ray.remote
    def run_chunk(x0_c, params_c):
        traj = simulate_batch(model, x0_c, inputs, params_c, dt)
        t_in = traj[:, :, 0]
        return np.column_stack([t_in.min(axis=1), t_in.max(axis=1), t_in[:, -1]])

    chunks = np.array_split(np.arange(scenarios), max(1, int(ray.available_resources().get("CPU", 1))))
    start = time.perf_counter()
    parts = ray.get([run_chunk.remote(x0[c], params[c]) for c in chunks])
    elapsed = time.perf_counter() - start
    summary = np.concatenate(parts)
    table = Table("metric", "p5", "p50", "p95")
    for name, col in (("min T_in [°C]", 0), ("max T_in [°C]", 1), ("final T_in [°C]", 2)):
        q = np.percentile(summary[:, col] - 273.15, [5, 50, 95])
        table.add_row(name, *(f"{v:.2f}" for v in q))
    console.print(table)
    console.print(
        f"{scenarios * n_steps:,} scenario-steps in {elapsed:.2f} s (includes JIT compile) on {len(chunks)} worker(s)"
    )
    return inputs, params, x0, dt


def section_validation(artifact, inputs, params, x0, dt):
    import jax.numpy as jnp

    from raytwin.sim import simulate
    from raytwin.sim.reference import model_rhs, reference_trajectory, relative_error

    _section("3. Simulator vs scipy.integrate.solve_ivp (LSODA, rtol 1e-9), first simulated day")
    model = artifact.model()
    n = 1440
    table = Table("scenario", "max error / range (float64)", "max error / range (float32)", "max |ΔT| float32 [K]")
    for k in (0, len(params) // 2, len(params) - 1):
        ref = reference_trajectory(model_rhs(model, params[k]), x0[k], inputs[:n], dt)
        f64 = simulate(model, x0[k], inputs[:n], params[k], dt, dtype=jnp.float64)
        f32 = simulate(model, x0[k], inputs[:n], params[k], dt).astype(np.float64)
        table.add_row(
            str(k), f"{relative_error(f64, ref):.2e}", f"{relative_error(f32, ref):.2e}", f"{np.abs(f32 - ref).max():.2e}"
        )
    console.print(table)


def run_demo(scenarios: int = 2000, twins: int = 20, workdir: str | None = None) -> None:
    """Run every section on a fresh embedded Ray; `workdir` keeps the demo's data (else a temp dir)."""
    import ray

    rng = np.random.default_rng(2026)
    with tempfile.TemporaryDirectory(prefix="raytwin-demo-") as tmp:
        root = Path(workdir or tmp)
        console.print(f"[bold]RayTwin demo[/] — data under {root}")
        ray.init(num_cpus=None, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            artifact = section_registry(root)
            inputs, params, x0, dt = section_batch(artifact, scenarios, rng)
            section_validation(artifact, inputs, params, x0, dt)
        finally:
            ray.shutdown()
