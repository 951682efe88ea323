"""Run the thermal sweep as Ray tasks, one chunk per task, with a bounded number in flight.

This is the benchmark's own runner over `raytwin.sim.rollout` (the sweeps package had not landed
its chunk runner when the benchmark was written); it mirrors what a production sweep does: equal
chunks, each task single-threaded in XLA so that N tasks on N cores do not oversubscribe them.
"""

from __future__ import annotations

import os

import numpy as np
import ray

from benchmarks.thermal_scenarios import ThermalSweep, jax_chunk, padded_chunks, plan_chunks

SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
RUNTIME_ENV = {"env_vars": {"XLA_FLAGS": SINGLE_THREAD_XLA}}


@ray.remote(num_cpus=1, runtime_env=RUNTIME_ENV)
def _sweep_chunk(x0: np.ndarray, params: np.ndarray, drivers: np.ndarray, n_steps: int, dt: float) -> np.ndarray:
    # Imported in the worker: raytwin.sim enables x64 and the chunk runs explicitly in float32.
    return jax_chunk(x0, params, drivers, n_steps, dt)


def ensure_ray(address: str | None = None) -> None:
    """Connect to `address` (or start a local Ray on all cores) unless Ray is already up."""
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else os.cpu_count(), include_dashboard=False,
                 logging_level="WARNING")


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def ray_sweep(sweep: ThermalSweep, chunk: int, workers: int) -> np.ndarray:
    """METRICS (n, 4) of `sweep` computed by Ray tasks, at most `workers` running at once.

    The chunking depends on the cluster, not on `workers`, so runs with 1 and with all workers
    execute identical tasks (and reuse the same compiled shapes in warm workers).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    n_chunks, size = plan_chunks(sweep.n, chunk, min_chunks=cluster_cpus())
    pending: dict[ray.ObjectRef, int] = {}
    parts: list[np.ndarray | None] = [None] * n_chunks
    for c, arrays in enumerate(padded_chunks(sweep, n_chunks, size)):
        if len(pending) >= workers:
            _collect(pending, parts)
        pending[_sweep_chunk.remote(*arrays, sweep.n_steps, sweep.dt)] = c
    while pending:
        _collect(pending, parts)
    return np.concatenate(parts)[: sweep.n]


def _collect(pending: dict[ray.ObjectRef, int], parts: list[np.ndarray | None]) -> None:
    done, _ = ray.wait(list(pending), num_returns=1)
    for ref in done:
        parts[pending.pop(ref)] = ray.get(ref)
