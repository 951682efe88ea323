"""Calibration: wall time for `sweeps.calibration.calibrate` to recover known parameters within 2%.

Telemetry is synthetic and independent of the fitted simulator: `sweeps.synthetic` integrates the
true model with `solve_ivp` (LSODA, rtol 1e-9) and adds Gaussian noise at the sensor levels of
the reference set (0.05 K, 2 mV, 1 mm). The fit starts from the typical parameters (the prior),
5-20% away from the truth. A recovery error above 2% fails the benchmark: a fast wrong fit is
not a result.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from sweeps.calibration import CalibrationSpec, calibrate
from sweeps.runner import ensure_ray
from sweeps.synthetic import synthetic_telemetry

RECOVERY_TOLERANCE = 0.02
CASES = {
    "thermal_rc": dict(true=dict(C_in=2.4e6, C_m=1.7e7, R_im=2.3e-3, R_mo=4.4e-3, R_io=1.15e-2, f_sol=0.33),
                       x0={"T_in": 293.15, "T_m": 291.15}, n=4320, dt=60.0, noise={"T_in": 0.05}),
    "battery_ecm": dict(true=dict(q=2.3, r0=0.055, r1=0.017, c1=2.4e3, r2=0.034, c2=1.7e4),
                        x0={"soc": 0.9, "v1": 0.0, "v2": 0.0}, n=3600, dt=1.0, noise={"v_terminal": 0.002}),
    "two_tank": dict(true=dict(a1_tank=1.7e-2, a2_tank=1.3e-2, a1=5.6e-5, a2=4.5e-5),
                     x0={"h1": 0.3, "h2": 0.3}, n=3600, dt=1.0, noise={"h1": 0.001, "h2": 0.001}),
}
QUICK_CASES = ("two_tank",)


class RecoveryError(AssertionError):
    """Calibration did not recover the true parameters within `RECOVERY_TOLERANCE`."""


@benchmark("calibration", "Wall time to recover known parameters within 2% (Ray Tune search + refinement)")
def calibration(ctx: BenchContext) -> BenchResult:
    ensure_ray()
    res = BenchResult()
    names = QUICK_CASES if ctx.quick else tuple(CASES)
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-cal-") as tmp:
        for name in names:
            case = CASES[name]
            telemetry = Path(tmp) / f"{name}.parquet"
            pq.write_table(synthetic_telemetry(name, case["true"], case["x0"], case["n"], case["dt"],
                                               case["noise"], seed=1), telemetry)
            spec = CalibrationSpec(model=name, telemetry=str(telemetry), start_state=case["x0"],
                                   free=list(case["true"]), noise_std=case["noise"], num_samples=4, seed=7)
            runs = iter(range(1_000_000))
            # calibrations are seconds to minutes each: one warm-up (Tune and JIT start-up), few repeats
            timing, (result, _, _) = ctx.measure(
                f"calibration/{name}", lambda: calibrate(spec, f"{tmp}/out-{name}-{next(runs)}"),
                repeat=min(ctx.repeat, 2))
            errors = {p: abs(result.parameters[p] / v - 1.0) for p, v in case["true"].items()}
            res.checks[name] = {"relative_error": errors, "tolerance": RECOVERY_TOLERANCE,
                                "weighted_rmse": result.weighted_rmse, "tune_trials": result.tune_trials,
                                "refine_evaluations": result.refine_evaluations, "samples": case["n"]}
            res.timings[name] = timing
            if max(errors.values()) > RECOVERY_TOLERANCE:
                raise RecoveryError(f"{name}: parameters off by {errors} (> {RECOVERY_TOLERANCE:.0%})")
            res.figures += [
                Figure(f"{name}: wall time, {len(case['true'])} parameters from {case['n']} samples",
                       timing.median_s, "s"),
                Figure(f"{name}: worst parameter error", max(errors.values()), "relative"),
                Figure(f"{name}: first run overhead (Tune, JIT)", timing.overhead_s or 0.0, "s"),
            ]
    res.notes.append("4 Tune trials (random search, ASHA over growing data windows) then least-squares "
                     "refinement with the jacfwd Jacobian; truth 5-20% from the prior")
    return res
