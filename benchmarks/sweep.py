"""Sweep throughput of the reference thermal model: the sweeps product against its baselines.

Figures are scenario-steps per second (scenarios x 10,080 RK4 steps / wall time). Before any
speed is reported, every implementation's metrics are checked against the float64 NumPy result;
a disagreement fails the benchmark instead of timing a wrong computation.

RayTwin rows: `sweeps.engine.chunk_metrics` in this process (multi-threaded XLA), and
`sweeps.runner.run_sweep` on Ray with one and with all workers (single-threaded XLA per task,
Parquet output written to a temporary directory: the product's whole path, not just the kernel).
"""

from __future__ import annotations

import math

import numpy as np
import ray

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from benchmarks.thermal_scenarios import (
    CONTINUOUS_TOLERANCE,
    DISCRETE_TOLERANCE,
    SCIPY_METHOD,
    SCIPY_RTOL,
    WEEK_STEPS,
    ThermalSweep,
    Tolerance,
    bench_spec,
    errors_by_metric,
    numpy_rk4,
    product_in_process,
    product_on_ray,
    scipy_loop,
)
from sweeps.runner import ensure_ray

CHUNK = 16_384
"""Most scenarios per chunk (the product's default): `sweep-chunks` measures 4k-64k on this machine."""

FULL_SIZES = (1_000, 10_000, 100_000)
QUICK_SIZES = (64,)
"""One size: every size runs the same code and checks, and each more costs the quick run its compiles again."""
QUICK_STEPS = 1_440  # one day: --quick keeps the whole run to seconds
SCIPY_SAMPLE = 16
QUICK_SCIPY_SAMPLE = 3
BASELINE_REPEAT = 3  # NumPy takes 1-2 min per run at 1e5 scenarios: 3 runs, no warm-up (nothing to compile)

SWEEP_VS_SCIPY_TARGET = 1000.0
SWEEP_VS_NUMPY_TARGET = 3.0


class DisagreementError(AssertionError):
    """An implementation's metrics differ from the float64 reference beyond the tolerance."""


def check_agreement(label: str, result: np.ndarray, reference: np.ndarray, tolerance: Tolerance,
                    checks: dict) -> None:
    checks[label] = {"max_error": errors_by_metric(result, reference), "tolerance": vars(tolerance)}
    bad = tolerance.violations(result, reference)
    if bad:
        raise DisagreementError(f"{label}: metrics differ from float64 NumPy beyond {tolerance}: {bad}")


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def balanced_chunk(n: int, workers: int, most: int = CHUNK) -> int:
    """The chunk size (<= `most`) that gives every worker the same number of equal chunks.

    The product pads the last chunk to the chunk size and runs one chunk per worker at a time,
    so 1e5 scenarios in chunks of 16,384 on 2 workers compute 7 full chunks in 4 rounds (65,536
    rows per worker); 8 chunks of 12,500 take 4 rounds of 50,000 rows per worker.
    """
    rounds = math.ceil(n / (workers * most))
    return math.ceil(n / (workers * rounds))


@benchmark("sweep", "Thermal RC sweep throughput (1 week, 60 s RK4) vs solve_ivp loop and NumPy RK4")
def sweep_throughput(ctx: BenchContext) -> BenchResult:
    sizes = QUICK_SIZES if ctx.quick else FULL_SIZES
    n_steps = QUICK_STEPS if ctx.quick else WEEK_STEPS
    n_sample = QUICK_SCIPY_SAMPLE if ctx.quick else SCIPY_SAMPLE
    baseline_repeat = min(ctx.repeat, BASELINE_REPEAT)
    ensure_ray()
    workers = cluster_cpus()
    res = BenchResult()
    res.notes.append(f"sweeps THERMAL_KIT on thermal_rc, {n_steps} RK4 steps of 60 s per scenario; random space: "
                     f"parameters x U(0.7, 1.3), outdoor mean/amplitude, solar peak, setpoint; equal chunks <= {CHUNK}, "
                     "the same number per worker; "
                     f"{workers} Ray CPUs")

    # (a) solve_ivp loop: its per-scenario cost does not depend on N, so it is timed once on a sample
    sample = ThermalSweep.from_spec(bench_spec(n_sample, n_steps=n_steps))
    t_scipy, scipy_out = ctx.measure("sweep/scipy", lambda: scipy_loop(sample), warmup=0, repeat=baseline_repeat)
    check_agreement("scipy_loop", scipy_out, numpy_rk4(sample), CONTINUOUS_TOLERANCE, res.checks)
    scipy_rate = sample.scenario_steps / t_scipy.median_s
    scipy_name = f"solve_ivp loop ({SCIPY_METHOD}, rtol {SCIPY_RTOL:g}), extrapolated from {n_sample}"
    res.timings[f"scipy_loop@{n_sample}"] = t_scipy
    res.notes.append(f"solve_ivp: a Python loop over scenarios, timed on the first {n_sample} and extrapolated "
                     "linearly (one independent solve per scenario)")

    unit = "scenario-steps/s"
    for n in sizes:
        sweep = ThermalSweep.from_spec(bench_spec(n, n_steps=n_steps, chunk_size=balanced_chunk(n, workers),
                                                  workers=workers))
        rate = lambda t, sweep=sweep: sweep.scenario_steps / t.median_s  # noqa: E731
        t64, reference = ctx.measure(f"sweep/numpy-f64/{n}", lambda: numpy_rk4(sweep, np.float64), warmup=0,
                                     repeat=baseline_repeat)
        t = {"numpy_f64": t64}
        contenders = {
            "numpy_f32": (lambda: numpy_rk4(sweep, np.float32), dict(warmup=0, repeat=baseline_repeat)),
            "in_process": (lambda: product_in_process(sweep), {}),
            # all workers first: its warm-up starts and compiles every worker the 1-worker run reuses
            "ray_all": (lambda: product_on_ray(sweep, None), {}),  # the runner's default window, as users run it
            "ray_1": (lambda: product_on_ray(sweep, 1), {}),
        }
        for key, (fn, options) in contenders.items():
            t[key], out = ctx.measure(f"sweep/{key}/{n}", fn, **options)
            check_agreement(f"{key}@{n}", out, reference, DISCRETE_TOLERANCE, res.checks)  # fail fast
        res.timings.update({f"{key}@{n}": timing for key, timing in t.items()})
        numpy_name, numpy_rate = max((("NumPy RK4 f64", rate(t["numpy_f64"])),
                                      ("NumPy RK4 f32", rate(t["numpy_f32"]))), key=lambda kv: kv[1])
        size = f"N={n:,}"
        res.figures += [
            Figure(f"{size} {scipy_name}", scipy_rate, unit),
            Figure(f"{size} NumPy RK4 float64", rate(t["numpy_f64"]), unit),
            Figure(f"{size} NumPy RK4 float32", rate(t["numpy_f32"]), unit),
            Figure(f"{size} RayTwin engine in-process", rate(t["in_process"]), unit, numpy_name, numpy_rate,
                   SWEEP_VS_NUMPY_TARGET),
            Figure(f"{size} RayTwin run_sweep, Ray 1 worker", rate(t["ray_1"]), unit, numpy_name, numpy_rate,
                   SWEEP_VS_NUMPY_TARGET),
            Figure(f"{size} RayTwin run_sweep, Ray {workers} workers", rate(t["ray_all"]), unit, numpy_name,
                   numpy_rate, SWEEP_VS_NUMPY_TARGET),
            Figure(f"{size} RayTwin run_sweep, Ray {workers} workers", rate(t["ray_all"]), unit, "solve_ivp loop",
                   scipy_rate, SWEEP_VS_SCIPY_TARGET),
            Figure(f"{size} first run overhead (JIT compile), in-process", t["in_process"].overhead_s or 0.0, "s"),
            Figure(f"{size} first run overhead (workers, compile), Ray", t["ray_all"].overhead_s or 0.0, "s"),
        ]
    return res


CHUNK_CANDIDATES = (4_096, 16_384, 65_536)
QUICK_CHUNK_CANDIDATES = (128, 512)


@benchmark("sweep-chunks", "Throughput per chunk size (1 day horizon), to choose the sweep chunk size")
def chunk_sizes(ctx: BenchContext) -> BenchResult:
    """One chunk per run: in-process (multi-threaded XLA) and as one Ray task (single-threaded XLA)."""
    ensure_ray()
    res = BenchResult()
    candidates = QUICK_CHUNK_CANDIDATES if ctx.quick else CHUNK_CANDIDATES
    n_steps = QUICK_STEPS // 4 if ctx.quick else QUICK_STEPS
    rates: dict[tuple[str, int], float] = {}
    for chunk in candidates:
        sweep = ThermalSweep.from_spec(bench_spec(chunk, n_steps=n_steps, chunk_size=chunk))
        t_local, _ = ctx.measure(f"chunks/in-process/{chunk}", lambda: product_in_process(sweep))
        t_task, _ = ctx.measure(f"chunks/ray-task/{chunk}", lambda: product_on_ray(sweep, 1))
        rates["in-process (multi-threaded XLA)", chunk] = sweep.scenario_steps / t_local.median_s
        rates["one Ray task (single-threaded XLA)", chunk] = sweep.scenario_steps / t_task.median_s
        res.timings[f"in_process@{chunk}"], res.timings[f"ray_task@{chunk}"] = t_local, t_task
    reference = CHUNK if CHUNK in candidates else candidates[-1]
    for (how, chunk), value in rates.items():
        res.figures.append(Figure(f"chunk {chunk}: {how}", value, "scenario-steps/s", f"chunk {reference}",
                                  rates[how, reference]))
    res.notes.append(f"{n_steps} steps per scenario, one chunk per run; the ratio compares with chunk {reference}; "
                     "Ray rows include task dispatch and the chunk's Parquet write")
    return res
