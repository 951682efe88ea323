"""Sweep throughput of the reference thermal model: RayTwin against its baselines, same scenarios.

Figures are scenario-steps per second (scenarios x 10,080 RK4 steps / wall time). Before any
speed is reported, every implementation's metrics are checked against the float64 NumPy result
(`AGREEMENT_TOL_K`); a disagreement fails the benchmark instead of timing a wrong computation.
"""

from __future__ import annotations

import numpy as np
import ray

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from benchmarks.ray_runner import _sweep_chunk, cluster_cpus, ensure_ray, ray_sweep
from benchmarks.thermal_scenarios import (
    AGREEMENT_TOL_K,
    SCIPY_METHOD,
    SCIPY_RTOL,
    WEEK_STEPS,
    ThermalSweep,
    jax_in_process,
    max_abs_error,
    numpy_rk4,
    scipy_loop,
)

CHUNK = 16_384
"""Scenarios per jitted call / Ray task: the best of 4k-64k in `sweep-chunks` on the 2-core
development machine (large enough to amortise per-step loop overhead, small enough that a chunk's
~1 MB of state, coefficients and accumulators stays in L2)."""

FULL_SIZES = (1_000, 10_000, 100_000)
QUICK_SIZES = (64, 256)
QUICK_STEPS = 1_440  # one day: --quick keeps the whole run to seconds
SCIPY_SAMPLE = 16
QUICK_SCIPY_SAMPLE = 3
BASELINE_REPEAT = 3  # the NumPy baseline takes ~1 min per run at 1e5 scenarios: 3 runs, no warm-up

SWEEP_VS_SCIPY_TARGET = 1000.0
SWEEP_VS_NUMPY_TARGET = 3.0


class DisagreementError(AssertionError):
    """An implementation's metrics differ from the float64 reference beyond the tolerance."""


def check_agreement(label: str, result: np.ndarray, reference: np.ndarray, checks: dict) -> None:
    errors = max_abs_error(result, reference)
    checks[label] = {"max_abs_error_K": errors, "tolerance_K": AGREEMENT_TOL_K}
    worst = max(errors.values())
    if not worst <= AGREEMENT_TOL_K:
        raise DisagreementError(f"{label}: metrics differ from float64 NumPy by {worst:.3g} K "
                                f"(> {AGREEMENT_TOL_K} K): {errors}")


def _size_label(n: int) -> str:
    return f"N={n:,}"


@benchmark("sweep", "Thermal RC sweep throughput (1 week, 60 s RK4) vs solve_ivp loop and NumPy RK4")
def sweep_throughput(ctx: BenchContext) -> BenchResult:
    sizes = QUICK_SIZES if ctx.quick else FULL_SIZES
    n_steps = QUICK_STEPS if ctx.quick else WEEK_STEPS
    n_sample = QUICK_SCIPY_SAMPLE if ctx.quick else SCIPY_SAMPLE
    baseline_repeat = min(ctx.repeat, BASELINE_REPEAT)
    ensure_ray()
    workers = cluster_cpus()
    res = BenchResult()
    # one population; every size is a prefix of it, so all implementations see the same scenarios
    population = ThermalSweep.generate(max(sizes), n_steps=n_steps)
    res.notes.append(f"thermal_rc, {n_steps} RK4 steps of {population.dt:g} s per scenario; parameters "
                     f"+-30% around typical; inputs sampled at step midpoints; CHUNK={CHUNK}; {workers} Ray CPUs")

    # (a) solve_ivp loop: per-scenario cost does not depend on N, so it is measured once on a sample
    sample = population.subset(slice(0, n_sample))
    t_scipy, scipy_out = ctx.measure("sweep/scipy", lambda: scipy_loop(sample), warmup=0, repeat=baseline_repeat)
    check_agreement("scipy_loop", scipy_out, numpy_rk4(sample), res.checks)
    scipy_rate = sample.scenario_steps / t_scipy.median_s
    scipy_name = f"solve_ivp loop ({SCIPY_METHOD} rtol {SCIPY_RTOL:g}, extrapolated from {n_sample} scenarios)"
    res.timings[f"scipy_loop@{n_sample}"] = t_scipy
    res.notes.append(f"scipy: a Python loop of solve_ivp timed on {n_sample} scenarios and extrapolated "
                     "linearly (it is one independent solve per scenario)")

    for n in sizes:
        sweep = population.subset(slice(0, n))
        size = _size_label(n)
        rate = lambda t, sweep=sweep: sweep.scenario_steps / t.median_s  # noqa: E731

        t64, ref = ctx.measure(f"sweep/numpy-f64/{n}", lambda: numpy_rk4(sweep, np.float64), warmup=0,
                               repeat=baseline_repeat)
        t32, out32 = ctx.measure(f"sweep/numpy-f32/{n}", lambda: numpy_rk4(sweep, np.float32), warmup=0,
                                 repeat=baseline_repeat)
        check_agreement(f"numpy_f32@{n}", out32, ref, res.checks)
        t_jax, out_jax = ctx.measure(f"sweep/jax/{n}", lambda: jax_in_process(sweep, CHUNK))
        check_agreement(f"jax_in_process@{n}", out_jax, ref, res.checks)
        t_all, out_all = ctx.measure(f"sweep/ray-{workers}/{n}", lambda: ray_sweep(sweep, CHUNK, workers))
        check_agreement(f"ray_{workers}_workers@{n}", out_all, ref, res.checks)
        t_one, out_one = ctx.measure(f"sweep/ray-1/{n}", lambda: ray_sweep(sweep, CHUNK, 1))
        check_agreement(f"ray_1_worker@{n}", out_one, ref, res.checks)
        for key, t in (("numpy_f64", t64), ("numpy_f32", t32), ("jax_in_process", t_jax),
                       (f"ray_{workers}_workers", t_all), ("ray_1_worker", t_one)):
            res.timings[f"{key}@{n}"] = t

        best_numpy_name, best_numpy = max((("NumPy RK4 f64", rate(t64)), ("NumPy RK4 f32", rate(t32))),
                                          key=lambda kv: kv[1])
        unit = "scenario-steps/s"
        res.figures += [
            Figure(f"{size} {scipy_name}", scipy_rate, unit),
            Figure(f"{size} NumPy RK4 float64", rate(t64), unit),
            Figure(f"{size} NumPy RK4 float32", rate(t32), unit),
            Figure(f"{size} RayTwin in-process JAX f32", rate(t_jax), unit, best_numpy_name, best_numpy,
                   SWEEP_VS_NUMPY_TARGET),
            Figure(f"{size} RayTwin Ray tasks, 1 worker", rate(t_one), unit, best_numpy_name, best_numpy,
                   SWEEP_VS_NUMPY_TARGET),
            Figure(f"{size} RayTwin Ray tasks, {workers} workers", rate(t_all), unit, best_numpy_name,
                   best_numpy, SWEEP_VS_NUMPY_TARGET),
            Figure(f"{size} RayTwin Ray tasks, {workers} workers", rate(t_all), unit, "solve_ivp loop",
                   scipy_rate, SWEEP_VS_SCIPY_TARGET),
            Figure(f"{size} first-run overhead (JIT compile), in-process", t_jax.overhead_s or 0.0, "s"),
            Figure(f"{size} first-run overhead (compile, workers), Ray", t_all.overhead_s or 0.0, "s"),
        ]
    return res


CHUNK_CANDIDATES = (4_096, 16_384, 65_536)
QUICK_CHUNK_CANDIDATES = (128, 512)


@benchmark("sweep-chunks", "Throughput per chunk size (1 day horizon), to choose the sweep chunk size")
def chunk_sizes(ctx: BenchContext) -> BenchResult:
    ensure_ray()
    res = BenchResult()
    candidates = QUICK_CHUNK_CANDIDATES if ctx.quick else CHUNK_CANDIDATES
    n_steps = QUICK_STEPS // 4 if ctx.quick else QUICK_STEPS
    population = ThermalSweep.generate(max(candidates), n_steps=n_steps, seed=1)
    rates: dict[tuple[str, int], float] = {}
    for chunk in candidates:
        sweep = population.subset(slice(0, chunk))
        t_jax, _ = ctx.measure(f"chunks/jax/{chunk}", lambda: jax_in_process(sweep, chunk))
        args = (sweep.x0, sweep.params, sweep.drivers, sweep.n_steps, sweep.dt)
        t_task, _ = ctx.measure(f"chunks/task/{chunk}", lambda: ray.get(_sweep_chunk.remote(*args)))
        rates["in-process JAX (multi-threaded XLA)", chunk] = sweep.scenario_steps / t_jax.median_s
        rates["one Ray task (single-threaded XLA)", chunk] = sweep.scenario_steps / t_task.median_s
        res.timings[f"jax@{chunk}"], res.timings[f"task@{chunk}"] = t_jax, t_task
    reference = CHUNK if CHUNK in candidates else candidates[-1]
    for (how, chunk), value in rates.items():
        res.figures.append(Figure(f"chunk {chunk}: {how}", value, "scenario-steps/s", f"chunk {reference}",
                                  rates[how, reference]))
    res.notes.append(f"{n_steps} steps per scenario; one chunk per call; the ratio compares with chunk {reference}")
    return res
