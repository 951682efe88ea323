"""FMU sweep throughput (scenario-steps/s per core) next to the same model in JAX, in the same run.

The model is the Reference FMUs' Van der Pol oscillator (FMI 2.0, built from source with CMake in
a temporary directory; `raytwin.fmu.reference`), swept over its damping ``mu``:

- the FMU in co-simulation, one instance reused across scenarios, in this process (one core) and
  through `raytwin.fmu.run_fmu_sweep` on Ray CPU tasks (one instance per worker);
- the FMU in model exchange (fmpy's CVode, rtol 1e-8) in this process;
- the baseline: the same equations as a RayTwin JAX model, RK4 in float64, `simulate_batch`
  (vmapped) in this process (XLA runs this small elementwise loop on one thread).

Before anything is timed, co-simulation must reproduce the shipped reference output and model
exchange must agree with the JAX trajectory. The work per step differs: the co-simulation FMU takes
one explicit-Euler step per 0.01 s (its fixed internal step), RK4 four derivative evaluations;
both are dominated by per-call overhead (Python -> C per step for the FMU, none inside XLA's loop).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from raytwin.fmu import FmuInstance, FmuModel, FmuScenario, run_fmu_sweep, run_scenarios
from raytwin.fmu.reference import build_reference_fmus, default_source
from raytwin.sim import Model, Output, Param, State, simulate, simulate_batch

DT = 0.01
AGREEMENT_ATOL = 1e-4


def _vdp(x, u, c):
    (x0, x1), (mu,) = x, c
    return x1, mu * (1.0 - x0 * x0) * x1 - x0


VAN_DER_POL = Model(
    name="van_der_pol", version="1.0.0", description="Van der Pol oscillator (JAX baseline of the FMU)",
    states=(State("x0", "-", nominal=2.0), State("x1", "-", nominal=0.0)), inputs=(),
    params=(Param("mu", "-", 1.0, 0.05, 10.0),), outputs=(Output("x0", "-"), Output("x1", "-")),
    coefficients=lambda p: p, derivative=_vdp, output=lambda x, u, c: x, default_dt=DT,
)


class DisagreementError(AssertionError):
    """An implementation did not compute what it should have: nothing is timed."""


def _check(model: FmuModel, res: BenchResult) -> None:
    ref = np.genfromtxt(default_source() / "VanDerPol" / "VanDerPol_out.csv", delimiter=",", names=True)
    cs = FmuInstance(model).run(FmuScenario(len(ref) - 1, DT))
    cs_error = float(max(np.abs(cs[:, 0] - ref["x0"]).max(), np.abs(cs[:, 1] - ref["x1"]).max()))
    n, mu = 500, 1.3
    me = FmuInstance(model, "ModelExchange").run(FmuScenario(n, DT, params={"mu": mu}))
    jax_traj = simulate(VAN_DER_POL, [2.0, 0.0], np.zeros((n, 0)), [mu], DT, dtype=jnp.float64)
    me_error = float(np.abs(me - jax_traj).max())
    res.checks["co_simulation_vs_reference_csv"] = {"max_abs_error": cs_error, "tolerance": 1e-12}
    res.checks["model_exchange_vs_jax"] = {"max_abs_error": me_error, "tolerance": AGREEMENT_ATOL}
    if cs_error > 1e-12 or me_error > AGREEMENT_ATOL:
        raise DisagreementError(f"FMU disagrees: reference csv {cs_error:.2e}, JAX {me_error:.2e}")


@benchmark("fmu-sweep", "FMU sweep scenario-steps/s per core (co-simulation, model exchange, Ray) vs JAX")
def fmu_sweep(ctx: BenchContext) -> BenchResult:
    import ray

    from sweeps.runner import ensure_ray

    ensure_ray()
    res = BenchResult()
    n_scen, n_steps = (8, 100) if ctx.quick else (256, 2000)
    mus = np.linspace(0.5, 2.0, n_scen)
    scenarios = [FmuScenario(n_steps, DT, params={"mu": float(m)}) for m in mus]
    work = n_scen * n_steps
    workers = int(ray.cluster_resources().get("CPU", 1))
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-fmu-") as tmp:
        model = FmuModel.load(build_reference_fmus(Path(tmp), 2, ("VanDerPol",))["VanDerPol"])
        _check(model, res)
        t_cs, _ = ctx.measure("fmu/co-simulation", lambda: run_scenarios(model, scenarios))
        me_scenarios = scenarios[: max(2, n_scen // 8)]  # CVode is slower: a subset
        t_me, _ = ctx.measure("fmu/model-exchange", lambda: run_scenarios(model, me_scenarios, "ModelExchange"))
        chunk = max(1, n_scen // (4 * workers))
        t_ray, swept = ctx.measure("fmu/ray", lambda: run_fmu_sweep(model, scenarios, chunk_size=chunk,
                                                                      keep_outputs=False))
    if swept.failed:
        raise DisagreementError(f"FMU sweep scenarios failed: {swept.failed}")
    x0 = np.tile([2.0, 0.0], (n_scen, 1))
    u = np.zeros((n_steps, 0))
    t_jax, _ = ctx.measure("fmu/jax", lambda: simulate_batch(VAN_DER_POL, x0, u, mus[:, None], DT,
                                                             dtype=jnp.float64))
    res.timings.update({"co_simulation": t_cs, "model_exchange": t_me, "ray": t_ray, "jax": t_jax})
    jax_rate = work / t_jax.median_s
    base = "JAX RK4 float64, in-process"
    res.figures += [
        Figure(f"Van der Pol FMU co-simulation, 1 instance in-process, {n_scen} x {n_steps} steps",
               work / t_cs.median_s, "scenario-steps/s/core", base, jax_rate),
        Figure(f"Van der Pol FMU model exchange (CVode), in-process, {len(me_scenarios)} scenarios",
               len(me_scenarios) * n_steps / t_me.median_s, "scenario-steps/s/core", base, jax_rate),
        Figure(f"Van der Pol FMU co-simulation on {workers} Ray CPU workers, per core",
               work / t_ray.median_s / workers, "scenario-steps/s/core", base, jax_rate),
        Figure("JAX Van der Pol, RK4 float64, vmapped in-process", jax_rate, "scenario-steps/s/core"),
    ]
    res.checks["ray_instances_per_worker"] = swept.instantiations
    res.notes.append("FMU: Reference FMUs VanDerPol (FMI 2.0) built from source; co-simulation steps with "
                     "explicit Euler at 0.01 s inside the FMU, JAX with RK4; JAX timed after its compile")
    return res


@benchmark("fmu-twin", "UKF twin events/s with the VanDerPol FMU as dynamics vs the same model in JAX")
def fmu_twin(ctx: BenchContext) -> BenchResult:
    """Twins of one model take 64 events each (x0 every 0.1 s, 10 sub-steps) in one `assimilate_runs`
    call, in this process: the UKF stepping the FMU on the host (`FmuModel.filter_dynamics`) and the
    UKF tracing the JAX Van der Pol into its kernel. Both track the same measurements first; their
    final estimates must agree to the FMU's Euler error."""
    from raytwin.estimation import Run, assimilate_runs
    from raytwin.ukf import UnscentedKalmanFilter

    res = BenchResult()
    n_twins, n_events = (2, 64) if ctx.quick else (16, 64)
    noise = {"process_std": {"x0": 0.02, "x1": 0.02}, "measurement_std": {"x0": 0.05, "x1": 0.05}}
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-fmu-twin-") as tmp:
        fmu = FmuModel.load(build_reference_fmus(Path(tmp), 2, ("VanDerPol",))["VanDerPol"])
        truth = FmuInstance(fmu).run(FmuScenario(10 * (n_events - 1), DT))[::10, 0]
        t = 1.77e9 + 0.1 * np.arange(n_events)

        def track(model) -> np.ndarray:
            flt = UnscentedKalmanFilter(model, [1.0], **noise)
            prior = flt.initial({"x0": 1.8, "x1": 0.2}, {"x0": 0.3, "x1": 0.3})
            values = np.column_stack([truth, np.full(n_events, np.nan)])
            runs = [Run(flt, prior, t, values + 0.01 * j, np.ones(n_events, dtype=bool)) for j in range(n_twins)]
            return np.stack([s.x for s in assimilate_runs(runs).final_states()])

        t_fmu, x_fmu = ctx.measure("fmu-twin/fmu", lambda: track(fmu))
        t_jax, x_jax = ctx.measure("fmu-twin/jax", lambda: track(VAN_DER_POL))
    gap = float(np.abs(x_fmu - x_jax).max())
    res.checks["final_estimates_fmu_vs_jax"] = {"max_abs_difference": gap, "tolerance": 0.05}
    if gap > 0.05:
        raise DisagreementError(f"FMU and JAX UKF twins disagree by {gap:.3g}")
    events = n_twins * n_events
    res.timings.update({"fmu": t_fmu, "jax": t_jax})
    res.figures += [
        Figure(f"UKF twins on the Van der Pol FMU, {n_twins} twins x {n_events} events (10 sub-steps each)",
               events / t_fmu.median_s, "events/s", "the same UKF on the JAX model", events / t_jax.median_s),
        Figure("UKF twins on the JAX Van der Pol", events / t_jax.median_s, "events/s"),
    ]
    res.notes.append("in-process, one dispatch of 128 lanes; the FMU is called once per distinct lane, sigma "
                     "point (5) and sub-step; kernels compiled in the warm-up run")
    return res
