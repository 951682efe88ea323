"""Arithmetic roofline: what fraction of this machine's float32 peak the sweep achieves.

FLOPs per RK4 step of the thermal model are counted two independent ways: from the model's
jaxpr (every elementwise arithmetic operation once, before any compiler optimisation) and from
XLA's own `cost_analysis` of the compiled, batched step. The same two counts are reported for
the whole sweep-kernel step (RK4 + the kit's generated inputs + metric updates); the target
uses the model-only jaxpr count, the useful arithmetic every RK4 simulator has to do. The peak is a measured large float32
matmul, in-process through XLA and, in a clean subprocess, through NumPy's BLAS (without the
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE overrides some machines set, which slow a current OpenBLAS);
the larger is the peak.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark, run_python, subprocess_env_without
from benchmarks.sweep import CHUNK, QUICK_STEPS, cluster_cpus
from benchmarks.thermal_scenarios import (
    THERMAL_KIT,
    WEEK_STEPS,
    ThermalSweep,
    bench_spec,
    product_in_process,
    product_on_ray,
)
from raytwin.sim import THERMAL_RC, Model, rk4_step
from raytwin.sim.cpu import CPU_COMPILER_OPTIONS
from sweeps.kits import SweepKit
from sweeps.runner import ensure_ray

ARITHMETIC_PRIMITIVES = frozenset(
    {"add", "sub", "mul", "div", "neg", "max", "min", "abs", "sqrt", "rsqrt", "exp", "log", "sin", "cos",
     "tanh", "pow", "integer_pow", "square"}
)
ROOFLINE_TARGET = 0.5
MATMUL_N = 4096
QUICK_MATMUL_N = 512


def jaxpr_flops(jaxpr: jax.extend.core.Jaxpr) -> int:
    """Elementwise arithmetic operations in `jaxpr` (each output element counts one), sub-jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ARITHMETIC_PRIMITIVES:
            total += sum(math.prod(v.aval.shape) for v in eqn.outvars)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                total += jaxpr_flops(inner)
    return total


def _scalar_step_args(model: Model):
    one = jnp.float32(1.0)
    return (tuple(one for _ in model.states), tuple(one for _ in model.inputs),
            model.coefficients(tuple(jnp.float32(p.default) for p in model.params)))


def rk4_flops_jaxpr(model: Model, dt: float) -> int:
    """FLOPs of one RK4 step of one scenario, counted on the model's jaxpr (coefficients excluded)."""
    x, u, c = _scalar_step_args(model)
    closed = jax.make_jaxpr(lambda x, u, c: rk4_step(model, x, u, c, dt))(x, u, c)
    return jaxpr_flops(closed.jaxpr)


def rk4_flops_xla(model: Model, dt: float, batch: int = 1024) -> float:
    """FLOPs of one RK4 step of one scenario according to XLA's cost model of the compiled batch step."""
    x, u, c = (tuple(jnp.full(batch, v, jnp.float32) for v in group) for group in _scalar_step_args(model))
    compiled = jax.jit(lambda x, u, c: rk4_step(model, x, u, c, dt)).lower(x, u, c).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) / batch


def _kit_step_args(kit: SweepKit, batch: int):
    """A batch of float32 (x, acc, coeffs, input params) at the kit's defaults, and the scalar time."""
    model = kit.model
    full = lambda v: jnp.full(batch, v, jnp.float32)  # noqa: E731
    x = tuple(full(kit.start_state[n]) for n in model.state_names)
    ip = {k: full(v) for k, v in kit.default_inputs().items()}
    coeffs = model.coefficients(tuple(full(p.default) for p in model.params))
    return x, kit.init(x, ip), coeffs, ip, jnp.float32(3600.0)


def _kit_step(kit: SweepKit, dt: float):
    """One scan iteration of the sweep kernel: generated inputs, RK4 step, metric update."""
    def step(x, acc, coeffs, ip, t):
        u = kit.inputs(t, x, ip)
        x_next = rk4_step(kit.model, x, u, coeffs, dt)
        return x_next, kit.update(acc, x_next, u, coeffs, ip, dt)

    return step


def kernel_flops_jaxpr(kit: SweepKit, dt: float, batch: int = 1024) -> float:
    """FLOPs per scenario of one sweep-kernel step (RK4 + kit inputs + metrics), from the jaxpr.

    Counted on a batch: time-only operations (the daily sinusoids) are shared by all scenarios of
    a chunk, so they add 1/batch per scenario instead of a full count.
    """
    closed = jax.make_jaxpr(_kit_step(kit, dt))(*_kit_step_args(kit, batch))
    return jaxpr_flops(closed.jaxpr) / batch


def kernel_flops_xla(kit: SweepKit, dt: float, batch: int = 1024) -> float:
    """FLOPs per scenario of one sweep-kernel step as XLA compiles it (its fusions recompute
    shared subexpressions: the RK4 chain once per state variable it produces)."""
    compiled = jax.jit(_kit_step(kit, dt), compiler_options=CPU_COMPILER_OPTIONS).lower(
        *_kit_step_args(kit, batch)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) / batch


def jax_matmul_peak(ctx: BenchContext, n: int) -> float:
    """float32 FLOP/s of an n x n matmul through XLA in this process (all cores)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    t, _ = ctx.measure(f"roofline/jax-matmul/{n}", lambda: mm(a, b).block_until_ready())
    return 2.0 * n**3 / t.median_s


_NUMPY_MATMUL = """
import json, time, numpy as np
n, repeat = {n}, {repeat}
rng = np.random.default_rng(0)
a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
a @ b
times = []
for _ in range(repeat):
    t0 = time.perf_counter(); a @ b; times.append(time.perf_counter() - t0)
try:
    from threadpoolctl import threadpool_info
    blas = threadpool_info()
except ImportError:
    deps = np.show_config(mode="dicts")["Build Dependencies"]
    blas = {{"build": deps.get("blas", {{}})}}
print(json.dumps({{"median_s": float(np.median(times)), "blas": blas}}))
"""


def numpy_matmul_peak(ctx: BenchContext, n: int) -> tuple[float, dict]:
    """float32 FLOP/s of an n x n matmul through NumPy's BLAS, in a subprocess without OPENBLAS overrides."""
    env = subprocess_env_without("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    out = json.loads(run_python(_NUMPY_MATMUL.format(n=n, repeat=ctx.repeat), env).strip().splitlines()[-1])
    return 2.0 * n**3 / out["median_s"], out["blas"]


@benchmark("roofline", "Fraction of the measured float32 peak (large matmul) achieved by the thermal sweep")
def roofline(ctx: BenchContext) -> BenchResult:
    ensure_ray()
    res = BenchResult()
    dt = 60.0
    flops_jaxpr = rk4_flops_jaxpr(THERMAL_RC, dt)
    flops_xla = rk4_flops_xla(THERMAL_RC, dt)
    kernel_jaxpr, kernel_xla = kernel_flops_jaxpr(THERMAL_KIT, dt), kernel_flops_xla(THERMAL_KIT, dt)
    res.checks["flops_per_step"] = {"jaxpr": flops_jaxpr, "xla_cost_analysis": flops_xla,
                                    "kernel_jaxpr": kernel_jaxpr, "kernel_xla_cost_analysis": kernel_xla}
    n_mm = QUICK_MATMUL_N if ctx.quick else MATMUL_N
    peak_jax = jax_matmul_peak(ctx, n_mm)
    peak_numpy, blas = numpy_matmul_peak(ctx, n_mm)
    res.checks["numpy_blas_without_openblas_overrides"] = blas
    peak = max(peak_jax, peak_numpy)

    workers = cluster_cpus()
    n_steps = QUICK_STEPS // 4 if ctx.quick else WEEK_STEPS
    n = 256 if ctx.quick else workers * CHUNK
    sweep = ThermalSweep.from_spec(bench_spec(n, n_steps=n_steps, chunk_size=CHUNK, workers=workers, seed=2))
    t_jax, _ = ctx.measure("roofline/sweep-in-process", lambda: product_in_process(sweep))
    t_ray, _ = ctx.measure("roofline/sweep-ray", lambda: product_on_ray(sweep, None))
    res.timings.update({"sweep_in_process": t_jax, f"sweep_ray_{workers}_workers": t_ray})
    rates = {"engine in-process": sweep.scenario_steps / t_jax.median_s,
             f"Ray tasks, {workers} workers": sweep.scenario_steps / t_ray.median_s}
    best_how, best_rate = max(rates.items(), key=lambda kv: kv[1])

    # the target counts the model's own arithmetic only (input generation and metrics are not counted)
    flops = float(flops_jaxpr)
    res.figures += [
        Figure("FLOPs per RK4 step (jaxpr count)", flops_jaxpr, "FLOP", "XLA cost_analysis", flops_xla),
        Figure("FLOPs per sweep-kernel step: RK4 + kit inputs + metrics (jaxpr count)", kernel_jaxpr, "FLOP",
               "XLA cost_analysis", kernel_xla),
        Figure(f"peak float32 matmul {n_mm}^2, XLA", peak_jax, "FLOP/s"),
        Figure(f"peak float32 matmul {n_mm}^2, NumPy BLAS", peak_numpy, "FLOP/s"),
    ]
    for how, rate in rates.items():
        res.figures.append(Figure(f"sweep {sweep.n} scenarios, {how}: achieved", rate * flops, "FLOP/s",
                                  "peak", peak, ROOFLINE_TARGET if how == best_how else None))
    res.figures.append(Figure(f"sweep {sweep.n} scenarios, {best_how}: achieved, whole kernel counted",
                              best_rate * kernel_jaxpr, "FLOP/s", "peak", peak))
    res.notes.append(f"fraction = scenario-steps/s x {flops:g} FLOP per RK4 step / peak (the target's count: the "
                     f"model only); the whole kernel does {kernel_jaxpr:.0f} FLOP of useful arithmetic per step "
                     f"(jaxpr) and XLA executes {kernel_xla:.0f} (its fusions recompute the RK4 chain per state "
                     f"variable); best: {best_how}")
    return res
