"""Time from fault to promoted model: the closed loop of `raytwin demo` section 6, timed step by step.

A building's twin (`thermal_rc`, 5-minute telemetry, one shard of a local `actors.TwinService`) runs
its production model when the building's true R_io halves at a known event time (`demo.closed_loop`:
the same truth, twin and steps as the demo). From the first reading after the fault the benchmark
measures, for each step of the loop, the readings since the fault, the event time they span and the
wall seconds the product took to get there:

(a) the drift flag latches (readings sent one at a time, as a live stream delivers them);
(b) the recalibration (`sweeps.recalibration.recalibrate`: Ray Tune + least squares on the day after
    the fault read back from the event log) has registered the candidate;
(c) the shadow evaluation over the next readings has a verdict, recorded on the lifecycle log;
(d) the candidate is in production: staged by its author's team, approved by a second principal
    with the approver role (four eyes);
(e) the hot swap is applied: the first reading after the boundary was applied by the new version.

Why two clocks: the event time is what the loop has to wait for in production (the data a step needs:
the latch, a day of post-fault telemetry to fit, the shadow's readings), the wall seconds are what
RayTwin adds on top when the readings arrive faster than real time (a replay); the approval here is a
library call, so a person's review time is not included. There is no baseline to divide by: the
figures are the loop's own, with the issue's 6 h target for the drift flag.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark

HOUR_S = 3600.0
DRIFT_TARGET_H = 6.0


@benchmark("closed-loop", "Readings, event hours and wall seconds from an injected fault (R_io halved) to drift flag, "
                          "candidate, shadow verdict, four-eyes promotion and hot swap on a local service")
def closed_loop(ctx: BenchContext) -> BenchResult:
    from actors import TwinService
    from demo.closed_loop import (
        ASSET,
        SHADOW_EVENTS,
        TENANT,
        faulted_building,
        ingest_until_drift,
        production_lifecycle,
        recalibrate_window,
    )
    from raytwin.contracts import AssetType
    from raytwin.registry import ModelRegistry
    from raytwin.shadow import conclude
    from raytwin.sim import THERMAL_RC
    from sweeps.runner import ensure_ray

    ensure_ray()
    res = BenchResult()
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-loop-") as tmp:
        root = Path(tmp)
        registry = ModelRegistry(str(root / "models"))
        artifact = registry.register("office-zone", "1.0.0", AssetType.from_model(THERMAL_RC))
        service = TwinService(str(root / "twins"), shards=1, allowed_lateness_s=3600.0)
        try:
            lifecycle, alice, bob = production_lifecycle(registry, artifact)
            building = faulted_building(service, artifact)
            service.ingest(TENANT, building.healthy)
            window, shadowed, after = building.window, building.shadowed, building.after
            marks: list[tuple[str, int, float]] = []  # (step, readings since the fault, wall seconds)
            t0 = time.perf_counter()

            fed, latched = ingest_until_drift(service, window)  # (a)
            marks.append(("drift flag", fed, time.perf_counter() - t0))
            service.ingest(TENANT, window[fed:])
            fit, samples = recalibrate_window(root, registry, artifact, service, window[-1].event_time, latched,
                                              max_trials=2 if ctx.quick else 4)  # (b)
            marks.append(("candidate registered", len(window), time.perf_counter() - t0))

            candidate = registry.get(fit.candidate)  # (c)
            run_id, _ = service.models.start_shadow(TENANT, candidate, events=SHADOW_EVENTS, asset_ids=[ASSET])
            service.ingest(TENANT, shadowed)
            report = service.models.shadow(TENANT, fit.candidate)
            [evaluated, *_] = conclude(lifecycle, fit.candidate, TENANT, run_id, report.comparison, len(report.twins))
            marks.append(("shadow verdict", len(window) + len(shadowed), time.perf_counter() - t0))

            lifecycle.transition(fit.candidate, "staging", alice, f"shadow run {run_id} preferred it")  # (d)
            promoted = lifecycle.transition(fit.candidate, "production", bob, f"approved on shadow run {run_id}")
            marks.append(("promoted", len(window) + len(shadowed), time.perf_counter() - t0))

            outcome = service.models.swap(TENANT, candidate, after[0].event_time, asset_ids=[ASSET])  # (e)
            state = service.ingest(TENANT, after[:1], states=True).states[-1]
            marks.append(("hot swap applied", len(window) + len(shadowed) + 1, time.perf_counter() - t0))
        finally:
            service.close()

    sent = len(building.healthy) + len(window) + len(shadowed) + 1
    r_io = THERMAL_RC.param_names.index("R_io")
    res.checks.update(
        r_io_error_pct=100 * (fit.parameters["R_io"] / building.faulted[r_io] - 1), recalibrated_samples=samples,
        shadow_done=report.done, candidate_better=report.comparison.candidate_better,
        loglik_gain=report.comparison.loglik_gain, verdict=evaluated.reason, promoted_by=promoted.actor,
        swap_refused=outcome.refused, model_ref_after_swap=state.model_ref, events_sent=sent,
        events_applied=state.events_applied)
    if not (report.done and state.model_ref == fit.candidate and state.events_applied == sent and not outcome.refused):
        raise RuntimeError(f"the loop did not close: {res.checks}")
    for step, readings, wall_s in marks:
        latest = building.events[building.n_before + readings - 1]
        hours = (latest.event_time - building.fault_at).total_seconds() / HOUR_S
        note = f"{readings} readings after the fault"
        res.figures.append(Figure(f"fault -> {step}: event time", hours, "h", note=note,
                                  target_max=DRIFT_TARGET_H if step == "drift flag" else None))
        res.figures.append(Figure(f"fault -> {step}: wall time", wall_s, "s", note=note))
    res.notes.append(f"calibration with {2 if ctx.quick else 4} Tune trials on {samples} samples; shadow over "
                     f"{SHADOW_EVENTS} readings; approval by a library call (no review time)")
    return res
