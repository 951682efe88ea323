"""`raytwin demo` (`demo.cli`): the whole loop on an embedded local Ray, with no external services.

1. register a building-zone model in the model registry (content-hashed);
2. check the JAX simulator against scipy's solve_ivp on a batch of scenarios;
3. replay recorded telemetry of several buildings into live twins (validated, idempotent
   ingestion; EKF estimates compared with the hidden truth; time travel);
4. calibrate one building's model from its telemetry with Ray Tune and publish the fit;
5. run a recorded what-if sweep from that twin's live state with the calibrated model, and rerun
   it to show the outputs are bit-identical;
6. close the loop on a building whose R_io halves (`demo.closed_loop`): drift, recalibration, shadow
   evaluation, four-eyes promotion, hot swap, the audit chain, and a recommendation checked
   independently.
Every section prints figures that can be checked against the truth the demo generated.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

console = Console(width=None if Console().is_terminal else 120)
TENANT = "demo"
DT = 60.0  # simulation and recording step [s]
DAYS = 3
SAMPLE_EVERY = 5  # live telemetry every 5 minutes
T_IN_NOISE = 0.05  # K


def _section(title: str) -> None:
    console.rule(f"[bold]{title}")


def _zone(k: int) -> str:
    return f"zone-{k:03d}"


def section_registry(root: Path):
    from raytwin.contracts import AssetType
    from raytwin.registry import ModelRegistry
    from raytwin.sim import THERMAL_RC

    _section("1. Model registry")
    registry = ModelRegistry(str(root / "models"))
    artifact = registry.register("office-zone", "1.0.0", AssetType.from_model(THERMAL_RC))
    same = registry.get("office-zone@1.0.0")
    console.print(f"registered {artifact.ref} sha256={artifact.content_hash[:16]}… read back identical: {same == artifact}")
    return registry, artifact


VALIDATION_BATCH = 2000
"""Scenarios simulated with full trajectories in the validation section (the sweep streams the rest)."""


def section_validation(artifact, rng: np.random.Generator, scenarios: int) -> None:
    import jax.numpy as jnp

    from raytwin.sim import simulate, simulate_batch
    from raytwin.sim.reference import model_rhs, reference_trajectory, relative_error
    from sweeps.synthetic import excitation

    model = artifact.model()
    n_steps = 1440
    _section(f"2. Simulator: {scenarios:,} scenarios (one day, ±30% parameters) vs scipy solve_ivp (LSODA, rtol 1e-9)")
    u = excitation(model.name, n_steps, DT, seed=1)
    params = np.array(artifact.param_vector()) * rng.uniform(0.7, 1.3, size=(scenarios, len(model.params)))
    x0 = np.tile([293.0, 292.0], (scenarios, 1))
    batch = simulate_batch(model, x0, u, params, DT)  # float32, vmap over scenarios
    table = Table("scenario", "error/range float64", "error/range float32 (batch)", "max |ΔT_in| float32 [K]")
    for k in (0, scenarios // 2, scenarios - 1):
        ref = reference_trajectory(model_rhs(model, params[k]), x0[k], u, DT)
        f64 = simulate(model, x0[k], u, params[k], DT, dtype=jnp.float64)
        f32 = batch[k].astype(np.float64)
        table.add_row(str(k), f"{relative_error(f64, ref):.1e}", f"{relative_error(f32, ref):.1e}",
                      f"{np.abs(f32[:, 0] - ref[:, 0]).max():.1e}")
    console.print(table)


def _truth(model, params: np.ndarray, x0: np.ndarray, seed: int):
    """A building's hidden truth: inputs, states and noisy T_in for DAYS at DT."""
    import jax.numpy as jnp

    from raytwin.sim import simulate
    from sweeps.synthetic import excitation

    n_steps = DAYS * 1440
    u = excitation(model.name, n_steps + 1, DT, seed=seed)
    x = simulate(model, x0, u[:-1], params, DT, dtype=jnp.float64)
    y = x[:, 0] + np.random.default_rng([seed, 7]).normal(0.0, T_IN_NOISE, size=len(x))
    return u, x, y


def _telemetry_events(asset_id: str, start: datetime, u: np.ndarray, y: np.ndarray):
    from raytwin.contracts import TelemetryEvent

    for seq, k in enumerate(range(0, len(y), SAMPLE_EVERY)):
        yield TelemetryEvent(
            asset_id=asset_id, event_time=start + timedelta(seconds=DT * k), sequence=seq,
            measurements={
                "T_in": {"value": float(y[k]) - 273.15, "unit": "degC"},  # converted to K on ingestion
                "T_out": {"value": float(u[k, 0]), "unit": "K"},
                "Q_h": {"value": float(u[k, 1]) / 1000.0, "unit": "kW"},
                "Q_sol": {"value": float(u[k, 2]), "unit": "W"},
            },
        )


def section_twins(root: Path, artifact, twins: int, rng: np.random.Generator):
    from actors import TwinService
    from actors.ingest import events_to_table
    from raytwin.contracts import Asset

    _section(f"3. Live twins: {twins} buildings, {DAYS} days of 5-minute telemetry replayed through ingestion")
    model = artifact.model()
    start = (datetime.now(UTC) - timedelta(days=DAYS + 1)).replace(second=0, microsecond=0)
    service = TwinService(str(root / "twins"), shards=2, allowed_lateness_s=3600.0)
    truths, events = {}, []
    for k in range(twins):
        params = np.array(artifact.param_vector()) * rng.uniform(0.8, 1.2, size=len(model.params))
        x0 = np.array([rng.uniform(290.0, 295.0), rng.uniform(289.0, 293.0)])
        u, x, y = _truth(model, params, x0, seed=100 + k)
        truths[_zone(k)] = (params, u, x, y)
        service.register(Asset(id=_zone(k), tenant=TENANT, type_name="thermal_rc", type_version="1.0.0"), artifact)
        events.extend(_telemetry_events(_zone(k), start, u, y))
    events.sort(key=lambda e: e.event_time)  # a gateway's interleaved stream
    stream = root / "telemetry" / "stream.parquet"
    stream.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(events_to_table(events), stream)
    report = service.ingest_parquet(TENANT, str(stream))
    console.print(f"ingested {stream.name}: accepted={report.accepted} duplicates={report.duplicates} "
                  f"rejected={report.rejected}")
    again = service.ingest_parquet(TENANT, str(stream))
    console.print(f"replayed the same file again (at-least-once delivery): accepted={again.accepted} "
                  f"duplicates={again.duplicates}")
    table = Table("twin", "revision", "T_in est ± σ [°C]", "T_in truth", "T_m est ± σ [°C]", "T_m truth", "NIS mean", "drift")
    errors_t_m = []
    for k in range(twins):
        s = service.state(TENANT, _zone(k))
        states = truths[_zone(k)][2]
        x_true = states[(len(states) - 1) // SAMPLE_EVERY * SAMPLE_EVERY]  # the state at the last telemetry sample
        errors_t_m.append(abs(s.state["T_m"] - x_true[1]))
        if k < 5:
            table.add_row(_zone(k), str(s.revision),
                          f"{s.state['T_in'] - 273.15:.2f} ± {s.std['T_in']:.2f}", f"{x_true[0] - 273.15:.2f}",
                          f"{s.state['T_m'] - 273.15:.2f} ± {s.std['T_m']:.2f}", f"{x_true[1] - 273.15:.2f}",
                          f"{s.divergence.nis_mean:.2f}", str(s.divergence.drift))
    console.print(table)
    console.print(f"unmeasured building-mass temperature T_m, all {twins} twins: mean |error| "
                  f"{np.mean(errors_t_m):.2f} K (priors were 293.15 ± 2 K)")
    merged = service.store.compact(tenant=TENANT, min_files=1)
    console.print(f"compacted the event log while the twins run (`raytwin twins compact`): "
                  f"{sum(c.files_in for c in merged)} part files -> {sum(c.files_out for c in merged)}")
    past = start + timedelta(days=1)
    then = service.state_at(TENANT, _zone(0), past)
    console.print(f"time travel: {_zone(0)} at {past.isoformat()} had revision {then.revision}, "
                  f"T_in {then.state['T_in'] - 273.15:.2f} °C")
    return service, truths


def section_calibration(root: Path, registry, truths) -> str:
    import pyarrow as pa

    from sweeps.calibration import CalibrationSpec
    from sweeps.runs import recorded_calibration

    zone = _zone(0)
    params, u, x, y = truths[zone]
    _section(f"4. Calibration of {zone} from {DAYS} days of 1-minute telemetry (Ray Tune + ASHA, then jax.jacfwd least squares)")
    path = root / "telemetry" / f"{zone}-history.parquet"
    pq.write_table(pa.table({"t_s": DT * np.arange(len(y)), "T_out": u[:, 0], "Q_h": u[:, 1], "Q_sol": u[:, 2],
                             "T_in": y}), path)
    spec = CalibrationSpec(
        model="office-zone@1.0.0", registry_url=registry.url, tenant=TENANT, asset_id=zone, telemetry=str(path),
        start_state={"T_in": float(x[0, 0]), "T_m": float(x[0, 1])},
        free=["C_in", "C_m", "R_im", "R_mo", "R_io", "f_sol"], noise_std={"T_in": T_IN_NOISE},
        search="random", num_samples=8, scheduler="asha", windows=2, register_as=f"{zone}@1.1.0",
        registered_by="demo-fitter",
    )
    record = recorded_calibration(spec, runs=str(root / "runs"))
    fitted, rel_std = record.summary["parameters"], record.summary["rel_std"]
    table = Table("parameter", "truth", "fitted ± σ", "error")
    for name, true in zip(registry.get(spec.model).model().param_names, params):
        table.add_row(name, f"{true:.4g}", f"{fitted[name]:.4g} ± {100 * rel_std[name]:.2f}%",
                      f"{100 * (fitted[name] / true - 1):+.2f}%")
    console.print(table)
    console.print(f"run {record.run_id}: weighted RMSE {record.summary['weighted_rmse']:.3f}, "
                  f"published {spec.register_as}; fit plot {record.output_url}/fit.png")
    return spec.register_as


def section_sweep(root: Path, registry, service, model_ref: str, scenarios: int) -> None:
    from sweeps.aggregate import quantiles
    from sweeps.runs import recorded_sweep, rerun
    from sweeps.space import Dimension, ScenarioSpace
    from sweeps.spec import SweepSpec
    from sweeps.twins import start_from_twin

    zone = _zone(0)
    _section(f"5. What-if sweep: {scenarios:,} scenarios x 1 week from {zone}'s live state, calibrated model")
    fields = start_from_twin(service, TENANT, zone)
    fields["model"] = model_ref
    spec = SweepSpec(
        **fields, registry_url=registry.url, horizon_s=7 * 86400.0, step_s=DT,
        space=ScenarioSpace(method="lhs", n=scenarios, seed=7, dimensions=[
            Dimension(name="T_out_mean", target="input", low=263.15, high=283.15),
            Dimension(name="setpoint", target="input", low=291.15, high=295.15),
            Dimension(name="C_in", target="param", mode="scale", low=0.9, high=1.1),
        ]),
    )
    runs = str(root / "runs")
    record = recorded_sweep(spec, runs=runs, progress=False)
    console.print(f"run {record.run_id}: {record.summary['scenarios']:,} scenarios in {record.summary['elapsed_s']} s "
                  f"({record.summary['scenarios_per_s']:,.0f} scenarios/s incl. compile); start state "
                  + ", ".join(f"{k}={v - 273.15:.2f} °C" for k, v in spec.start_state.items()))
    bands = quantiles(record.output_url, ["energy_kwh", "discomfort_s", "T_in_min"]).to_pylist()
    table = Table("metric", "p5", "p50", "p95")
    for row in bands:
        qs = [row[c] for c in row if c.startswith("q")]
        table.add_row(row["metric"], *(f"{v:,.2f}" for v in qs))
    console.print(table)
    report = rerun(record.run_id, runs=runs)
    console.print(f"rerun {report.rerun} of {report.original}: outputs identical = {report.identical}")


def run_demo(scenarios: int = 2000, twins: int = 20, workdir: str | None = None) -> None:
    """Run every section on a fresh embedded Ray; `workdir` keeps the demo's data (else a temp dir)."""
    import ray

    from demo.closed_loop import section_closed_loop

    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(2026)
    with tempfile.TemporaryDirectory(prefix="raytwin-demo-") as tmp:
        root = Path(workdir or tmp).resolve()
        console.print(f"[bold]RayTwin demo[/] — data under {root}")
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            registry, artifact = section_registry(root)
            section_validation(artifact, rng, min(scenarios, VALIDATION_BATCH))
            service, truths = section_twins(root, artifact, twins, rng)
            calibrated = section_calibration(root, registry, truths)
            section_sweep(root, registry, service, calibrated, scenarios)
            section_closed_loop(root, registry, artifact, service)
            service.close()
        finally:
            ray.shutdown()
        if workdir is None:
            console.print("the demo's data was in a temporary directory; pass --workdir DIR to keep it")
