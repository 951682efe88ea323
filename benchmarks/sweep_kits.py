"""Cost of declaring a sweep kit as data: the thermal kit hand-written in JAX vs `sweeps.reference_kits.THERMAL`.

`HANDWRITTEN_THERMAL_KIT` is the thermal kit as it was written before kits became data (four JAX
functions). Both kits run the same engine (`sweeps.engine.chunk_metrics`, divergence flag
included) on the same chunk of the sweep benchmark's scenarios, interleaved round by round in one
process; their metrics must agree before any time is reported. Target: the data kit at >= 90 %
of the hand-written kit's speed.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from benchmarks.harness import BenchContext, BenchResult, Figure, Timing, benchmark
from benchmarks.thermal_scenarios import THERMAL_KIT, bench_spec
from raytwin.signals import DAY_S, TWO_PI
from raytwin.sim import THERMAL_RC
from sweeps import engine
from sweeps.kits import SweepKit
from sweeps.runner import prepare

DATA_VS_HANDWRITTEN_TARGET = 0.9
CHUNK, STEPS = 16_384, 1_440
QUICK_CHUNK, QUICK_STEPS = 256, 120


def _inputs(t, x, ip):
    t_out = ip["T_out_mean"] + ip["T_out_amplitude"] * jnp.sin((TWO_PI / DAY_S) * (t - 9.0 * 3600.0))
    q_sol = ip["solar_peak"] * jnp.maximum(jnp.sin((TWO_PI / DAY_S) * (t - 6.0 * 3600.0)), 0.0)
    q_h = jnp.clip(ip["heater_gain"] * (ip["setpoint"] - x[0]), 0.0, ip["Q_h_max"])
    return (t_out, q_h, q_sol)


def _init(x0, ip):
    zero = jnp.zeros_like(x0[0])
    return (x0[0], x0[0], zero, zero)


def _update(acc, x_next, u, coeffs, ip, dt):
    t_max, t_min, energy_j, outside = acc
    t_in = x_next[0]
    out_of_band = (t_in < ip["comfort_low"]) | (t_in > ip["comfort_high"])
    return (jnp.maximum(t_max, t_in), jnp.minimum(t_min, t_in), energy_j + u[1] * dt,
            outside + out_of_band.astype(t_in.dtype))


def _finalize(acc, dt):
    t_max, t_min, energy_j, outside = acc
    return (t_max, t_min, energy_j / 3.6e6, outside * dt)


HANDWRITTEN_THERMAL_KIT = SweepKit(
    model=THERMAL_RC, input_params=THERMAL_KIT.input_params, start_state=THERMAL_KIT.start_state,
    metrics=THERMAL_KIT.metrics, inputs=_inputs, init=_init, update=_update, finalize=_finalize,
)


def kit_metrics(kit: SweepKit, n: int, n_steps: int) -> dict[str, np.ndarray]:
    """One chunk of the sweep benchmark's first `n` scenarios (one day at 60 s by default) with `kit`."""
    spec = bench_spec(n, n_steps=n_steps, chunk_size=n)
    _, bases = prepare(spec)
    return engine.chunk_metrics(kit, bases, spec.space.dimensions, spec.space.rows(0, n), spec.step_s, n_steps, n,
                                spec.dtype)


def _timing(samples: list[float], first: float) -> Timing:
    q25, q50, q75 = np.percentile(samples, [25, 50, 75])
    return Timing(float(q50), float(min(samples)), float(q75 - q25), len(samples), first)


@benchmark("sweep-kits", "Thermal sweep kernel: kit declared as data vs the same kit hand-written in JAX")
def data_vs_handwritten(ctx: BenchContext) -> BenchResult:
    n, n_steps = (QUICK_CHUNK, QUICK_STEPS) if ctx.quick else (CHUNK, STEPS)
    kits = {"handwritten": HANDWRITTEN_THERMAL_KIT, "data": THERMAL_KIT}
    res = BenchResult()
    first, samples, out = {}, {k: [] for k in kits}, {}
    for label, kit in kits.items():  # compile both before timing
        t0 = time.perf_counter()
        out[label] = kit_metrics(kit, n, n_steps)
        first[label] = time.perf_counter() - t0
    for name in THERMAL_KIT.metric_names:
        np.testing.assert_allclose(out["data"][name], out["handwritten"][name], rtol=1e-6, atol=1e-4)
    res.checks["max_abs_difference"] = {name: float(np.max(np.abs(out["data"][name] - out["handwritten"][name])))
                                        for name in THERMAL_KIT.metric_names}
    for _ in range(max(ctx.repeat, 1)):  # interleaved rounds: both kits see the same machine load
        for label, kit in kits.items():
            t0 = time.perf_counter()
            kit_metrics(kit, n, n_steps)
            samples[label].append(time.perf_counter() - t0)
    timings = {label: _timing(samples[label], first[label]) for label in kits}
    res.timings.update({f"sweep-kits/{label}": t for label, t in timings.items()})
    rate = {label: n * n_steps / t.median_s for label, t in timings.items()}
    res.figures.append(Figure(f"thermal kit declared as data, chunk {n} x {n_steps} steps, in-process",
                              rate["data"], "scenario-steps/s", "the same kit hand-written in JAX",
                              rate["handwritten"], target_ratio=DATA_VS_HANDWRITTEN_TARGET))
    res.notes.append("both kits run the same engine with the per-scenario divergence flag; float32; "
                     "rounds interleaved in one process")
    return res
