"""Drift detection: false alarms per twin-day on healthy streams and detection delay of injected faults.

Streams are seeded twins of each reference model: the truth is the model's own RK4 step at its
``default_dt`` driven by its kit's excitation (`sweeps.synthetic.excitation`, one seed per twin),
with process noise at the model's declared ``process_std`` or none (noise-free dynamics), sampled
with its declared sensor noise; a fault multiplies one parameter by a factor at a known time. The
filter is the product's (`raytwin.estimation.assimilate_runs`, default detector and adaptation).

False episodes per twin-day: each healthy twin is watched until its first alarm (an operator's
clear restarts the CUSUMs from zero, so episodes form a renewal process): episodes / twin-days
watched. Detection delay: event-time hours from the fault to the first alarm, over the twins
without an alarm before the fault (median and worst; "missed" counts those never flagged).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from raytwin.drift import FALSE_ALARM_INTERVAL_S
from raytwin.estimation import ExtendedKalmanFilter, Run, assimilate_runs
from raytwin.sim import Model, get_model
from raytwin.sim.precision import in_float64
from sweeps.synthetic import excitation

DAY_S = 86_400.0
TARGET_FALSE_PER_DAY = DAY_S / FALSE_ALARM_INTERVAL_S  # <= 1 false episode per twin per 30 days
TARGET_THERMAL_DELAY_H = 6.0  # a halved R_io flagged within 6 h


@dataclass(frozen=True)
class Case:
    """One model's streams: sample interval, healthy duration, fault onset and the faults to inject."""

    model: str
    sample_s: float
    days: float  # streams with a fault
    healthy_days: float  # healthy streams (the battery's excitation empties the cell in ~2.5 h)
    fault_at_s: float
    x0: dict[str, float]
    faults: tuple[tuple[str, float], ...]  # (parameter, factor)


CASES = (
    Case("thermal_rc", 300.0, 3.0, 3.0, DAY_S, {"T_in": 293.15, "T_m": 292.15},
         (("R_io", 0.5), ("R_io", 0.7), ("R_io", 0.85))),
    Case("battery_ecm", 1.0, 1 / 24, 1 / 12, 900.0, {"soc": 0.9, "v1": 0.0, "v2": 0.0},
         (("r0", 2.0), ("r0", 1.3), ("q", 0.8))),
    Case("two_tank", 1.0, 1 / 24, 1.0, 900.0, {"h1": 0.3, "h2": 0.3},
         (("a1", 0.7), ("a1", 0.9), ("a2", 0.9))),
)


@partial(jax.jit, static_argnames=("model", "n_sub"))
def _truth(model: Model, x0, u, p_before, p_after, fault_step, q_std, key, dt, n_sub: int):
    """States at every sample (n, states) of one twin: RK4 sub-steps of `dt`, additive process noise
    of std ``q_std * sqrt(dt)`` per sub-step, parameters switched at sample `fault_step`."""
    def sample(x, k_u):
        k, u_k, key_k = k_u
        p = jnp.where(k >= fault_step, p_after, p_before)

        def sub(i, x):
            noise = jax.random.normal(jax.random.fold_in(key_k, i), x.shape) * q_std * jnp.sqrt(dt)
            return jnp.stack(model.project(tuple(model.step_vector(x, u_k, p, dt) + noise)))

        return jax.lax.fori_loop(0, n_sub, sub, x), x

    keys = jax.random.split(key, u.shape[0])
    return jax.lax.scan(sample, x0, (jnp.arange(u.shape[0]), u, keys))[1]


def streams(case: Case, twins: int, *, noise: bool, fault: tuple[str, float] | None, seed: int = 0):
    """(event times [s], filter value rows (twins, n, columns), the filter) for seeded twins."""
    model = get_model(case.model)
    n = int(round((case.days if fault is not None else case.healthy_days) * DAY_S / case.sample_s))
    flt = ExtendedKalmanFilter(model, model.param_vector())
    p = np.asarray(model.param_vector(), dtype=np.float64)
    p_fault = p.copy()
    if fault is not None:
        p_fault[model.param_names.index(fault[0])] *= fault[1]
    fault_step = int(round(case.fault_at_s / case.sample_s)) if fault is not None else n
    n_sub = max(int(round(case.sample_s / model.default_dt)), 1)
    q_std = np.asarray([s.process_std for s in model.states]) * (1.0 if noise else 0.0)
    r_std = np.asarray([o.measurement_std for o in model.outputs])
    x0 = np.asarray([case.x0[s] for s in model.state_names])
    truth = in_float64(_truth)
    rows = []
    for k in range(twins):
        u = excitation(model, n, case.sample_s, seed=seed * 100_003 + k)
        x = np.asarray(truth(model, x0, u, p, p_fault, fault_step, q_std, jax.random.PRNGKey(seed * 100_003 + k),
                             case.sample_s / n_sub, n_sub))
        params = np.where(np.arange(n)[:, None] >= fault_step, p_fault, p)
        y = np.asarray(in_float64(jax.vmap(model.observe_vector))(x, u, params))
        y = y + np.random.default_rng([seed, k]).normal(size=y.shape) * r_std
        values = dict(zip(model.input_names, u.T)) | dict(zip(model.output_names, y.T))
        rows.append(np.column_stack([values[c] for c in flt.measured_names]))
    return case.sample_s * np.arange(n, dtype=np.float64), np.stack(rows), flt


CHUNK = 4096
"""Events per twin per `assimilate_runs` call: a day at 1 Hz of 64 twins' traces would not fit in memory."""


def first_alarms(t: np.ndarray, rows: np.ndarray, flt: ExtendedKalmanFilter) -> np.ndarray:
    """Event time [s] of each twin's first drift alarm (inf: none), the twins run side by side."""
    states = [flt.initial()] * len(rows)
    out = np.full(len(rows), np.inf)
    for start in range(0, len(t), CHUNK):
        part = slice(start, start + CHUNK)
        use = np.ones(len(t[part]), dtype=bool)
        traces = assimilate_runs([Run(flt, fs, t[part], r[part], use) for fs, r in zip(states, rows)])
        for k in range(len(rows)):
            hit = np.flatnonzero(traces[k].alarm)
            if hit.size and np.isinf(out[k]):
                out[k] = t[part][hit[0]]
        states = traces.final_states()
    return out


def false_episodes_per_day(first: np.ndarray, horizon_s: float) -> tuple[float, int, float]:
    """(episodes per twin-day, episodes, twin-days watched) from first-alarm times (renewal estimate)."""
    watched = np.minimum(first, horizon_s).sum() / DAY_S
    episodes = int(np.isfinite(first).sum())
    return episodes / watched, episodes, watched


@benchmark("drift", "Drift detector: false episodes per twin-day on healthy streams, delay to flag injected faults")
def drift(ctx: BenchContext) -> BenchResult:
    res = BenchResult()
    twins = 8 if ctx.quick else 64
    for case in CASES[:1] if ctx.quick else CASES:
        horizon = case.healthy_days * DAY_S
        for noise in (False, True):
            label = f"{case.model} ({'process noise' if noise else 'noise-free dynamics'})"
            t, rows, flt = streams(case, twins, noise=noise, fault=None)
            rate, episodes, watched = false_episodes_per_day(first_alarms(t, rows, flt), horizon)
            res.checks[f"{label}: healthy"] = {"episodes": episodes, "twin_days": watched}
            res.figures.append(Figure(f"{label}: false episodes per twin-day ({episodes} in {watched:.1f} twin-days)",
                                      rate, "1/day", target_max=TARGET_FALSE_PER_DAY))
            for param, factor in case.faults:
                t, rows, flt = streams(case, twins, noise=noise, fault=(param, factor), seed=1)
                first = first_alarms(t, rows, flt)
                after = first[first >= case.fault_at_s] - case.fault_at_s
                eligible = int((first >= case.fault_at_s).sum())
                missed = int(np.isinf(after).sum())
                found = after[np.isfinite(after)] / 3600.0
                median = float(np.median(found)) if found.size else float("inf")
                worst = float(found.max()) if found.size and not missed else float("inf")
                res.checks[f"{label}: {param} x{factor}"] = {"eligible": eligible, "missed": missed,
                                                             "delay_h": found.tolist()}
                target = TARGET_THERMAL_DELAY_H if (case.model, param, factor) == ("thermal_rc", "R_io", 0.5) else None
                res.figures.append(Figure(f"{label}: {param} x{factor} flagged, worst of {eligible} twins "
                                          f"(median {median:.3g} h, missed {missed})", worst, "h", target_max=target))
                if target is not None:
                    res.figures.append(Figure(f"{label}: {param} x{factor} share flagged within {target:g} h",
                                              float(np.mean(after <= target * 3600.0)), "fraction"))
    res.notes.append(f"{twins} seeded twins per case; thermal 3 days at 5 min (fault after 1 day); battery 2 h "
                     "healthy, tanks 1 day healthy, both 1 h at 1 s with a fault after 15 min; default detector "
                     "(false-alarm interval 30 days) and process-noise adaptation")
    return res
