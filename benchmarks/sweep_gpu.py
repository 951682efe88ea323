"""Sweep throughput on a GPU: the `sweep` benchmark's workload with JAX on an accelerator.

Same workload, product code and agreement checks as `sweep` (`benchmarks.thermal_scenarios`),
sized for a GPU: 1e5 to 1e7 scenarios of one week at 60 s, chunks of up to `GPU_CHUNK`.

Rows:
- RayTwin engine in-process on the GPU (`sweeps.engine.chunk_metrics`, chunk after chunk), which
  runs the fused Pallas kernel there (`sweeps.fused`), and at the largest size the XLA path too,
  as the fused kernel's baseline (their metrics are first checked equal within `ROUNDING_TOLERANCE`);
- `run_sweep` on Ray, whose runner gives every chunk task ``num_gpus=1`` when the cluster has
  GPUs (the product path: dispatch and the Parquet write of each chunk included);
- baselines timed in the same run on this machine's CPU: NumPy RK4 (float32 and float64, one
  core) on 1e5 scenarios over one day. Its cost per scenario-step does not depend on the horizon
  (the same array operations every step), and a week would cost minutes of the lent machine.

Before anything is timed, the first `REFERENCE_N` scenarios' metrics from each GPU path are
compared with float64 NumPy (`DISCRETE_TOLERANCE`). Where JAX sees no GPU the benchmark says so
and measures nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from benchmarks.sweep import check_agreement
from benchmarks.thermal_scenarios import (
    DISCRETE_TOLERANCE,
    WEEK_STEPS,
    ThermalSweep,
    Tolerance,
    bench_spec,
    numpy_rk4,
    product_in_process,
    product_on_ray,
)
from sweeps.engine import Kernel, kernel_for
from sweeps.runner import GPU_TASKS_PER_GPU, ensure_ray


@dataclass(frozen=True)
class Sizes:
    """How big each part of the run is (full on a GPU; quick for the harness check)."""

    sweeps: tuple[int, ...]  # scenarios per in-process run; the last one also runs on Ray
    chunk: int
    steps: int
    baseline: int  # NumPy scenarios ...
    baseline_steps: int  # ... and steps
    reference: int  # scenarios checked against float64 NumPy


FULL = Sizes(sweeps=(100_000, 1_000_000, 10_000_000), chunk=1_048_576, steps=WEEK_STEPS, baseline=100_000,
             baseline_steps=1_440, reference=4_096)
"""Chunks of 2^20 scenarios: enough independent lanes to fill an H100 at every scan step."""
QUICK = Sizes(sweeps=(512,), chunk=256, steps=240, baseline=512, baseline_steps=240, reference=512)
H100_TARGET = 1e11  # scenario-steps/s on one H100 (issue 17: 4x the XLA path's 2.5e10; was 1e9)
ROUNDING_TOLERANCE = Tolerance(kelvin=1e-3, energy_rel=1e-5, discomfort_mean_s=60.0)
"""Fused kernel vs XLA path, both float32: the same arithmetic in another order (10,080 steps)."""


def gpu_devices() -> list[jax.Device]:
    """The GPUs JAX sees (none when jaxlib has no GPU plugin or no GPU is visible)."""
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


@benchmark("sweep-gpu", "Thermal RC sweep throughput on a GPU (1e5-1e7 scenarios) vs NumPy RK4 on the CPU")
def sweep_gpu(ctx: BenchContext) -> BenchResult:
    gpus = gpu_devices()
    if not gpus:
        res = BenchResult()
        res.notes.append(f"not run: JAX sees no GPU (backend {jax.default_backend()!r}, devices "
                         f"{[str(d) for d in jax.devices()]}); install jax[cuda] on a machine with a GPU")
        return res
    return accelerator_sweep(ctx, gpus[0])


def accelerator_sweep(ctx: BenchContext, device: jax.Device, kernel: Kernel = "auto") -> BenchResult:
    """The GPU benchmark on `device` with the in-process `kernel` (the tests run it on the CPU device
    at tiny sizes, the fused kernel in interpret mode)."""
    size = QUICK if ctx.quick else FULL
    name = f"{device.platform.upper()} {device.device_kind}"
    unit = "scenario-steps/s"
    res = BenchResult()
    res.notes.append(f"{name}; thermal_rc sweep of {size.steps} RK4 steps of 60 s (float32), chunks of <= "
                     f"{size.chunk:,} scenarios; NumPy baselines on this machine's CPU (one core); agreement with "
                     f"float64 NumPy checked on the first {size.reference:,} scenarios of every run")

    small = ThermalSweep.from_spec(bench_spec(size.baseline, n_steps=size.baseline_steps))
    rates = {}
    for dtype in (np.float32, np.float64):
        t, _ = ctx.measure(f"sweep-gpu/numpy-{dtype.__name__}", lambda: numpy_rk4(small, dtype), warmup=0,
                           repeat=min(ctx.repeat, 3))
        rates[f"NumPy RK4 {dtype.__name__} (CPU, 1 core)"] = small.scenario_steps / t.median_s
        res.timings[f"numpy_{dtype.__name__}"] = t
    numpy_name, numpy_rate = max(rates.items(), key=lambda kv: kv[1])
    res.figures += [Figure(f"{label}, {size.baseline:,} scenarios x {size.baseline_steps} steps", rate, unit)
                    for label, rate in rates.items()]
    reference = numpy_rk4(ThermalSweep.from_spec(bench_spec(size.reference, n_steps=size.steps)), np.float64)

    def agreed(label: str, out: np.ndarray) -> np.ndarray:
        check_agreement(label, out[:size.reference], reference, DISCRETE_TOLERANCE, res.checks)
        return out

    how = kernel_for(jax.device_put(np.zeros(1, np.float32), device), kernel)
    with jax.default_device(device):
        for n in size.sweeps:
            sweep = ThermalSweep.from_spec(bench_spec(n, n_steps=size.steps, chunk_size=size.chunk))
            t, out = ctx.measure(f"sweep-gpu/in_process/{n}",
                                 lambda: agreed(f"in_process@{n}", product_in_process(sweep, kernel)))
            res.timings[f"in_process@{n}"] = t
            rate = sweep.scenario_steps / t.median_s
            res.figures += [
                Figure(f"N={n:,} RayTwin engine in-process ({how}), {name}", rate, unit, numpy_name, numpy_rate,
                       target_min=H100_TARGET),
                Figure(f"N={n:,} first run overhead (JIT compile), in-process", t.overhead_s or 0.0, "s"),
            ]
        if how == "pallas":  # the XLA path on the same device, as the fused kernel's baseline
            t, xla = ctx.measure(f"sweep-gpu/in_process_xla/{n}", lambda: product_in_process(sweep, "xla"))
            check_agreement(f"in_process@{n} vs xla", out, xla, ROUNDING_TOLERANCE, res.checks)
            res.timings[f"in_process_xla@{n}"] = t
            res.figures.append(Figure(f"N={n:,} fused kernel vs XLA path, in-process, {name}", rate, unit,
                                      "XLA path", sweep.scenario_steps / t.median_s))

    ensure_ray()
    ray_size = size.sweeps[-1]
    sweep = ThermalSweep.from_spec(bench_spec(ray_size, n_steps=size.steps, chunk_size=size.chunk))
    t, _ = ctx.measure(f"sweep-gpu/ray/{ray_size}", lambda: agreed(f"ray@{ray_size}", product_on_ray(sweep, None)))
    res.timings[f"ray@{ray_size}"] = t
    res.figures += [
        Figure(f"N={ray_size:,} RayTwin run_sweep, Ray {device.platform.upper()} tasks", sweep.scenario_steps / t.median_s, unit,
               numpy_name, numpy_rate, target_min=H100_TARGET),
        Figure(f"N={ray_size:,} first run overhead (workers, compile), Ray", t.overhead_s or 0.0, "s"),
    ]
    res.notes.append("Ray rows: `run_sweep` as a user runs it (on a GPU cluster, chunk tasks of "
                     f"num_gpus={1 / GPU_TASKS_PER_GPU:g}, twice as many in flight as can run)")
    return res

