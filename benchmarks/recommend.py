"""Optimiser time for one recommendation (`sweeps.recommend`): a week of a thermal zone at 15-minute
steps, 168 hourly heating values, projected Adam through the RK4 scan: the first recommendation of a
process (JIT compile included) and the next ones of the same kit and shape (compiled once), against one
float64 forward evaluation of the same plan through the sweep engine measured in the same run."""

from __future__ import annotations

import statistics

import numpy as np

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from sweeps.recommend import Bound, Control, Ensemble, RecommendSpec, recommend

DAY_S = 86_400.0


def _spec(days: float, iterations: int) -> RecommendSpec:
    return RecommendSpec(
        model="thermal_rc", start_state={"T_in": 294.15, "T_m": 293.15}, inputs={"setpoint": 296.15},
        horizon_s=days * DAY_S, step_s=600.0, control=Control(input="Q_h", block_s=3600.0, lower=0.0, upper=1e4),
        objective="energy_kwh", constraints=[Bound(of="T_in", low=292.15, high=297.15, margin=0.2)],
        iterations=iterations, ensemble=Ensemble(rel_std={"R_io": 0.05}, size=2))


@benchmark("recommend", "Optimiser time for one recommendation (a week, 168 hourly values, gradient + optax)")
def recommend_bench(ctx: BenchContext) -> BenchResult:
    from sweeps.recommend import _evaluate, _nominal_space

    res = BenchResult()
    spec = _spec(1.0 if ctx.quick else 7.0, 20 if ctx.quick else 400)
    times, answer = [], None
    for _ in range(1 if ctx.quick else 3):
        answer, search = recommend(spec)
        times.append(search.optimiser_s)
    plan = spec.sweep_spec(_nominal_space(spec)).model_copy(update={"inputs": {
        **spec.inputs, **dict(zip(spec.block_names, answer.action.values))}})
    forward, _ = ctx.measure("one forward evaluation", lambda: _evaluate(plan, ["R_io"], np.ones((1, 1))),
                             repeat=3 if ctx.quick else 10)
    label = f"{spec.n_steps} steps x {spec.iterations} Adam iterations, {len(spec.block_names)} values"
    baseline = "one forward evaluation of the plan (sweep engine, float64)"
    res.figures.append(Figure(name=f"optimiser time, first in the process (compile included), {label}",
                              value=times[0], unit="s", baseline=baseline, baseline_value=forward.median_s))
    if len(times) > 1:
        res.figures.append(Figure(name=f"optimiser time, compiled (same kit and shape), {label}",
                                  value=statistics.median(times[1:]), unit="s", baseline=baseline,
                                  baseline_value=forward.median_s, note=f"median of {len(times) - 1}"))
    res.checks.update(change_pct=answer.change_pct, outside_T_in_s=answer.recommended["outside_T_in_s"],
                      optimiser_s=[round(t, 3) for t in times])
    return res
