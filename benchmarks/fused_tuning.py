"""The fused kernel's launch shape on a GPU: scenarios per program and warps per program.

`sweeps.fused` runs one Pallas program (one GPU thread block) per `block` scenarios with `num_warps`
warps, so each thread holds ``block / (32 * num_warps)`` scenarios' states, stages and accumulators in
registers. More scenarios per thread hide more latency until the registers spill; fewer leave the
multiprocessors short of independent work. The best shape depends on the model's register need
(Lorenz/Tsit5: 7 stages of 3 states; thermal RK4 with its metric accumulators and inputs), so it is
measured rather than guessed, on the two GPU problems of issue 17: the DiffEqGPU paper's Lorenz
ensemble at 2^23 trajectories and one thermal chunk of 2^20 scenarios over a week.

Every shape's results are compared with the XLA path's before it is timed (`SAME_STEPS_ATOL`,
`ROUNDING_TOLERANCE`): a shape changes where each scenario runs, never its arithmetic. The defaults
(`sweeps.fused.BLOCK`, `NUM_WARPS`) are the row marked "default".
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from benchmarks.lorenz_ensemble import SAME_STEPS_ATOL, check, end_states, ensemble
from benchmarks.sweep import check_agreement
from benchmarks.sweep_gpu import ROUNDING_TOLERANCE, gpu_devices
from benchmarks.thermal_scenarios import METRICS, THERMAL_KIT, WEEK_STEPS, bench_spec
from sweeps import engine, fused
from sweeps.runner import prepare


@dataclass(frozen=True)
class Sizes:
    lorenz: int  # trajectories
    lorenz_steps: int
    thermal: int  # scenarios (one chunk)
    thermal_steps: int
    shapes: tuple[tuple[int, int], ...]  # (block, num_warps)


SHAPES = tuple((block, warps) for block in (64, 128, 256, 512, 1024) for warps in (1, 2, 4, 8)
               if 32 * warps <= block <= 256 * warps)
"""1 to 8 scenarios per thread, 1 to 8 warps per program."""
FULL = Sizes(lorenz=1 << 23, lorenz_steps=1000, thermal=1 << 20, thermal_steps=WEEK_STEPS, shapes=SHAPES)
QUICK = Sizes(lorenz=64, lorenz_steps=100, thermal=64, thermal_steps=60, shapes=((16, 1), (32, 1)))


def thermal_chunk(n: int, steps: int, device: jax.Device):
    """(kit, device arrays x0, params, ip, dt) of the `sweep` benchmark's first `n` scenarios."""
    spec = bench_spec(n, n_steps=steps, chunk_size=n)
    _, bases = prepare(spec)
    with jax.default_device(device):
        x0, params, ip = engine.scenario_arrays(THERMAL_KIT, bases, spec.space.dimensions, spec.space.rows(0, n),
                                                "float32")
        dt = jnp.asarray(spec.step_s, jnp.float32)
    return THERMAL_KIT, (x0, params, ip, dt)


def metrics(out: tuple) -> np.ndarray:
    """(n, len(METRICS)) float64 metrics from an engine result (the kit's metrics, then diverged)."""
    return np.stack([np.asarray(m) for m in out[:len(METRICS)]], axis=1).astype(np.float64)


@benchmark("fused-tuning", "The fused GPU kernel's launch shape (scenarios and warps per program) on the Lorenz "
                           "ensemble at 2^23 and a thermal chunk of 2^20")
def fused_tuning(ctx: BenchContext) -> BenchResult:
    gpus = gpu_devices()
    if not gpus:
        res = BenchResult()
        res.notes.append("not run: JAX sees no GPU (the launch shape only matters to Triton on a GPU)")
        return res
    return shapes_on(ctx, gpus[0])


def shapes_on(ctx: BenchContext, device: jax.Device) -> BenchResult:
    """Every shape of the sizes' on `device` (the tests run it on the CPU device in interpret mode,
    where `num_warps` has no effect)."""
    size = QUICK if ctx.quick else FULL
    name = f"{device.platform.upper()} {device.device_kind}"
    res = BenchResult()
    res.notes.append(f"{name}; shapes (scenarios per program, warps): {list(size.shapes)}; default "
                     f"({fused.BLOCK}, {fused.NUM_WARPS}); every shape checked against the XLA path first")
    problems = {  # (kit, args), steps, how results are read, compared with the XLA path's, and within what
        f"Lorenz/Tsit5 N={size.lorenz:,}": (ensemble(size.lorenz, size.lorenz_steps, device), size.lorenz_steps,
                                             end_states, check, SAME_STEPS_ATOL, "trajectory-steps/s"),
        f"thermal RK4 N={size.thermal:,}": (thermal_chunk(size.thermal, size.thermal_steps, device),
                                            size.thermal_steps, metrics, check_agreement, ROUNDING_TOLERANCE,
                                            "scenario-steps/s"),
    }
    for problem, ((kit, args), steps, read, agree, tolerance, unit) in problems.items():
        n = args[0][0].shape[0]
        want = read(jax.block_until_ready(engine._metrics(kit, steps, engine.scan_unroll(args[0][0]), *args)))
        rates = {}
        for block, warps in size.shapes:
            kernel = fused.compiled(kit, steps, *args, block=block, num_warps=warps)
            if isinstance(kernel, str):
                res.notes.append(f"{problem} ({block}, {warps}): not compiled: {kernel}")
                continue
            label = f"{problem} ({block}, {warps})"
            agree(f"{label} vs xla", read(jax.block_until_ready(kernel(*args))), want, tolerance, res.checks)
            t, _ = ctx.measure(f"fused-tuning/{label}", lambda: jax.block_until_ready(kernel(*args)))  # noqa: B023
            res.timings[label] = t
            rates[(block, warps)] = n * steps / t.median_s
        default = rates.get((fused.BLOCK, fused.NUM_WARPS))
        for (block, warps), rate in rates.items():
            mark = ", default" if (block, warps) == (fused.BLOCK, fused.NUM_WARPS) else ""
            res.figures.append(Figure(f"{problem}: {block} per program, {warps} warps{mark}, {name}", rate, unit,
                                      *(("default shape", default) if default and not mark else (None, None))))
    return res
