"""The sweep benchmark's workload and the baselines that compute it independently.

Workload: the product's thermal what-if sweep (`sweeps.reference_kits.THERMAL` on ``thermal_rc``),
one week at 60 s steps (10,080 RK4 steps) per scenario, with a random scenario space:
all six parameters scaled by U(0.7, 1.3) (+-30% around typical), and per scenario the outdoor
daily sinusoid's mean and amplitude, the solar peak and the thermostat setpoint. The kit
generates the inputs inside the scan (``T_out`` sinusoid, half-sine solar gain, a proportional
thermostat ``Q_h = clip(gain (setpoint - T_in), 0, Q_h_max)`` sampled at each step start) and
folds four metrics: peak and lowest indoor temperature, heating energy and time outside the
comfort band.

The baselines re-implement that documented behaviour from scratch, so the benchmark also checks
RayTwin against independent code: (b) NumPy RK4 of the same sampled-data system over all
scenarios at once, and (a) `solve_ivp` per scenario on the continuous-time system (the
thermostat acting continuously, energy integrated as an extra state), which is what a user
without RayTwin would write. Every result is compared with the float64 NumPy metrics
(`check_agreement`) before any speed is reported: a fast wrong answer is never timed as a win.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass

import numpy as np
from scipy.integrate import solve_ivp

from raytwin.signals import DAY_S
from raytwin.sim import THERMAL_RC, rk4_step
from sweeps import engine
from sweeps.aggregate import open_dataset
from sweeps.reference_kits import THERMAL
from sweeps.runner import prepare, run_sweep
from sweeps.space import Dimension, ScenarioSpace
from sweeps.spec import SweepSpec

WEEK_STEPS = 10_080
DT_S = 60.0
THERMAL_KIT = THERMAL.compile()
METRICS = THERMAL_KIT.metric_names  # T_in_max, T_in_min, energy_kwh, discomfort_s


def bench_spec(n: int, *, n_steps: int = WEEK_STEPS, dt: float = DT_S, chunk_size: int = 16_384,
               workers: int = 1, seed: int = 0) -> SweepSpec:
    """The benchmark's sweep as the product's `SweepSpec` (scenario i is the same for any n).

    Chunks hold at most `chunk_size` scenarios and are small enough that `workers` tasks all get
    one (the product pads every chunk to its chunk size, so a small sweep needs a small chunk).
    """
    params = [Dimension(name=p, target="param", mode="scale", low=0.7, high=1.3) for p in THERMAL_RC.param_names]
    inputs = [
        Dimension(name="T_out_mean", target="input", low=263.15, high=288.15),
        Dimension(name="T_out_amplitude", target="input", low=2.0, high=8.0),
        Dimension(name="solar_peak", target="input", low=0.0, high=3000.0),
        Dimension(name="setpoint", target="input", low=292.15, high=296.15),
    ]
    return SweepSpec(model=THERMAL_RC.name, space=ScenarioSpace(method="random", n=n, seed=seed,
                                                                dimensions=params + inputs),
                     horizon_s=n_steps * dt, step_s=dt,
                     chunk_size=min(chunk_size, math.ceil(n / workers)))


@dataclass(frozen=True)
class ThermalSweep:
    """A benchmark sweep: the product spec plus every scenario's values as float64 columns."""

    spec: SweepSpec
    x0: tuple[np.ndarray, ...]  # per state
    params: tuple[np.ndarray, ...]  # per model parameter
    inputs: dict[str, np.ndarray]  # per kit input parameter

    @classmethod
    def from_spec(cls, spec: SweepSpec) -> ThermalSweep:
        _, bases = prepare(spec)
        rows = spec.space.rows(0, spec.space.size)
        x0, params, inputs = engine.scenario_arrays(THERMAL_KIT, bases, spec.space.dimensions, rows, "float64")
        as_np = lambda a: np.broadcast_to(np.asarray(a, dtype=np.float64), rows.shape[:1])  # noqa: E731
        return cls(spec, tuple(map(as_np, x0)), tuple(map(as_np, params)), {k: as_np(v) for k, v in inputs.items()})

    @property
    def n(self) -> int:
        return self.spec.space.size

    @property
    def n_steps(self) -> int:
        return self.spec.n_steps

    @property
    def dt(self) -> float:
        return self.spec.step_s

    @property
    def scenario_steps(self) -> int:
        return self.n * self.n_steps

    def scenario(self, i: int) -> tuple[tuple[float, ...], tuple[float, ...], dict[str, float]]:
        return (tuple(float(a[i]) for a in self.x0), tuple(float(a[i]) for a in self.params),
                {k: float(v[i]) for k, v in self.inputs.items()})


def _daily(t: float, shift_h: float) -> float:
    return math.sin(2.0 * math.pi / DAY_S * (t - shift_h * 3600.0))


# ---- (a) a Python loop of solve_ivp on the continuous-time system -----------------------------
SCIPY_METHOD = "LSODA"
SCIPY_RTOL = 1e-6
SCIPY_ATOL = 1e-6


def scipy_loop(sweep: ThermalSweep) -> np.ndarray:
    """One `solve_ivp` per scenario (LSODA, rtol 1e-6): METRICS (n, 4).

    LSODA measured faster and more accurate here than the default RK45 at the same tolerance.
    Temperatures are sampled at the step boundaries (the instants the discrete code folds) and
    the heating energy is integrated as a third state.
    """
    t_end = sweep.n_steps * sweep.dt
    t_eval = sweep.dt * np.arange(1, sweep.n_steps + 1)
    out = np.empty((sweep.n, len(METRICS)))
    for i in range(sweep.n):
        x0, params, ip = sweep.scenario(i)
        coeffs = THERMAL_RC.coefficients(params)

        def rhs(t, y, coeffs=coeffs, ip=ip):
            q_h = min(max(ip["heater_gain"] * (ip["setpoint"] - y[0]), 0.0), ip["Q_h_max"])
            u = (ip["T_out_mean"] + ip["T_out_amplitude"] * _daily(t, 9.0), q_h,
                 ip["solar_peak"] * max(_daily(t, 6.0), 0.0))
            return (*THERMAL_RC.derivative((y[0], y[1]), u, coeffs), q_h)

        sol = solve_ivp(rhs, (0.0, t_end), (*x0, 0.0), method=SCIPY_METHOD, rtol=SCIPY_RTOL, atol=SCIPY_ATOL,
                        t_eval=t_eval)
        if not sol.success:
            raise RuntimeError(f"solve_ivp failed on scenario {i}: {sol.message}")
        t_in = np.concatenate([[x0[0]], sol.y[0]])
        outside = (sol.y[0] < ip["comfort_low"]) | (sol.y[0] > ip["comfort_high"])
        out[i] = (t_in.max(), t_in.min(), sol.y[2, -1] / 3.6e6, outside.sum() * sweep.dt)
    return out


# ---- (b) hand-vectorised NumPy RK4 over all scenarios -----------------------------------------
def numpy_rk4(sweep: ThermalSweep, dtype: type = np.float64) -> np.ndarray:
    """The sampled-data system stepped by NumPy on whole scenario columns: METRICS (n, 4)."""
    cast = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    x = tuple(map(cast, sweep.x0))
    coeffs = THERMAL_RC.coefficients(tuple(map(cast, sweep.params)))
    ip = {k: cast(v) for k, v in sweep.inputs.items()}
    dt = sweep.dt
    t_max, t_min = x[0].copy(), x[0].copy()
    energy = np.zeros(sweep.n, dtype=dtype)
    outside = np.zeros(sweep.n, dtype=dtype)
    q_h = np.empty(sweep.n, dtype=dtype)
    for k in range(sweep.n_steps):
        t = k * dt  # Python floats are "weak" scalars: they keep float32 arrays in float32
        np.clip(ip["heater_gain"] * (ip["setpoint"] - x[0]), 0.0, ip["Q_h_max"], out=q_h)
        u = (ip["T_out_mean"] + ip["T_out_amplitude"] * _daily(t, 9.0), q_h,
             ip["solar_peak"] * max(_daily(t, 6.0), 0.0))
        x = rk4_step(THERMAL_RC, x, u, coeffs, dt)
        np.maximum(t_max, x[0], out=t_max)
        np.minimum(t_min, x[0], out=t_min)
        energy += q_h * dt
        outside += (x[0] < ip["comfort_low"]) | (x[0] > ip["comfort_high"])
    return np.stack([t_max, t_min, energy / 3.6e6, outside * dt], axis=1).astype(np.float64)


# ---- (c) RayTwin: the sweeps product ----------------------------------------------------------
def product_in_process(sweep: ThermalSweep, kernel: engine.Kernel = "auto") -> np.ndarray:
    """`sweeps.engine.chunk_metrics` chunk after chunk in this process (`kernel`: the platform's, or
    one forced: `sweeps.engine.KERNELS`)."""
    spec, size = sweep.spec, sweep.spec.batch_size
    _, bases = prepare(spec)
    parts = []
    for start in range(0, sweep.n, size):
        rows = spec.space.rows(start, min(start + size, sweep.n))
        metrics = engine.chunk_metrics(THERMAL_KIT, bases, spec.space.dimensions, rows, spec.step_s,
                                       spec.n_steps, size, spec.dtype, kernel)
        parts.append(np.stack([metrics[m] for m in METRICS], axis=1))
    return np.concatenate(parts).astype(np.float64)


def product_on_ray(sweep: ThermalSweep, workers: int | None) -> np.ndarray:
    """`sweeps.runner.run_sweep` with at most `workers` chunk tasks in flight (None: the runner's
    default, twice the tasks that can run at once), read back in order."""
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-") as tmp:
        run_on_ray(sweep, f"{tmp}/sweep", workers)
        return read_metrics(f"{tmp}/sweep")


def run_on_ray(sweep: ThermalSweep, url: str, workers: int | None) -> None:
    """`sweeps.runner.run_sweep` into `url` (see `product_on_ray`), without reading anything back."""
    run_sweep(sweep.spec, url, max_in_flight=workers, progress=False, log_every_s=3600.0)


def read_metrics(url: str) -> np.ndarray:
    """The metrics of a sweep's dataset at `url`, in scenario order, float64."""
    table = open_dataset(url).to_table(columns=["scenario", *METRICS]).sort_by("scenario")
    return np.stack([table[m].to_numpy() for m in METRICS], axis=1).astype(np.float64)


# ---- agreement ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """Accepted differences from the float64 NumPy metrics.

    Temperatures: absolute per scenario [K]; energy: relative per scenario. Time outside the
    comfort band is a count of threshold crossings, ill-conditioned where the thermostat holds
    T_in right at a band edge (float32 rounding then flips many steps of one scenario: 50 steps
    were seen in 1e5 scenarios), so it is compared on its mean over the scenarios [s].
    """

    kelvin: float
    energy_rel: float
    discomfort_mean_s: float

    def violations(self, result: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        errors = errors_by_metric(result, reference)
        limits = {"T_in_max": self.kelvin, "T_in_min": self.kelvin, "energy_kwh": self.energy_rel,
                  "discomfort_s_mean": self.discomfort_mean_s}
        return {m: errors[m] for m, limit in limits.items() if not errors[m] <= limit}


DISCRETE_TOLERANCE = Tolerance(kelvin=0.01, energy_rel=1e-3, discomfort_mean_s=DT_S)
"""float32 vs float64 of the same discrete system: rounding over 10,080 steps is ~1e-3 K."""
CONTINUOUS_TOLERANCE = Tolerance(kelvin=0.02, energy_rel=2e-3, discomfort_mean_s=5 * DT_S)
"""solve_ivp integrates the thermostat continuously while the product samples it every 60 s
(what a digital controller does); measured differences: ~2e-3 K, ~3e-5 relative energy, 1 step."""


def errors_by_metric(result: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Largest difference per metric (absolute K and s; relative for the energy) and the
    difference of the mean time outside the comfort band (`discomfort_s_mean`)."""
    result, reference = np.asarray(result), np.asarray(reference)
    diff = np.abs(result - reference)
    errors = {m: float(diff[:, j].max()) for j, m in enumerate(METRICS)}
    j = METRICS.index("energy_kwh")
    errors["energy_kwh"] = float((diff[:, j] / np.maximum(np.abs(reference[:, j]), 1e-9)).max())
    j = METRICS.index("discomfort_s")
    errors["discomfort_s_mean"] = float(abs(result[:, j].mean() - reference[:, j].mean()))
    return errors
