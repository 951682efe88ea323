"""The example model package (examples/dcmotor, distribution ``raytwin-dcmotor``), installed with pip,
used through RayTwin's public API and CLI only: discovered, checked, registered with its code pinned,
tracked by a live twin (EKF) and calibrated. Its sweep, HTTP and cluster-job uses are tested next to
the server and cluster fixtures (tests/test_serve_api.py, tests/test_cluster_local.py: a job runs the
kit's example sweep) and its README's walk-through runs in tests/test_guides.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from actors import TwinService
from raytwin.cli import app
from raytwin.contracts import Asset, AssetType, TelemetryEvent
from raytwin.models import get_model
from raytwin.registry import ModelRegistry
from raytwin_dcmotor import DC_MOTOR  # installed with pip (./dev installs examples/dcmotor)
from sweeps.calibration import CalibrationSpec, calibrate
from sweeps.synthetic import synthetic_telemetry

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
TRUE = {"R": 0.55, "k": 0.315}  # the motor on the bench differs from the datasheet by 5-10 %
NOISE = {"i": 0.05, "omega": 0.2, "T_w": 0.5}
START = {"i": 0.0, "omega": 0.0, "T_w": 298.15}
N, DT = 200, 0.05  # 10 s of telemetry at 20 Hz


def telemetry_events(table, asset_id: str) -> list[TelemetryEvent]:
    """Rows of a synthetic telemetry table as events: inputs and measured outputs, SI units."""
    units = {v.name: v.unit for v in (*DC_MOTOR.inputs, *DC_MOTOR.outputs)}
    rows = table.to_pylist()
    return [TelemetryEvent(asset_id=asset_id, sequence=k, event_time=T0 + timedelta(seconds=row["t_s"]),
                           measurements={n: {"value": row[n], "unit": u} for n, u in units.items()})
            for k, row in enumerate(rows)]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """`raytwin calibrate synthetic dc_motor ...` output (noisy) and the noise-free truth it was drawn from."""
    out = tmp_path_factory.mktemp("dcmotor") / "bench.parquet"
    args = ["calibrate", "synthetic", "dc_motor", "--out", str(out), "--steps", str(N), "--dt", str(DT),
            *[f"--param={k}={v}" for k, v in TRUE.items()], *[f"--noise={k}={v}" for k, v in NOISE.items()]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"start_state: {json.dumps(START)}" in result.output  # the kit's start state
    truth = synthetic_telemetry("dc_motor", TRUE, START, N, DT, {}, seed=0)
    return out, truth


def test_the_installed_package_is_discovered_and_checked():
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and "dc_motor\t0.1.0\traytwin_dcmotor.model:DC_MOTOR" in listed.output
    checked = runner.invoke(app, ["models", "check", "dc_motor"])
    assert checked.exit_code == 0, checked.output
    assert "model dc_motor: ok" in checked.output and "warning" not in checked.output  # stable over its bounds
    assert get_model("dc_motor") is DC_MOTOR


def test_the_registry_pins_the_packages_code(tmp_path):
    registry = ModelRegistry(str(tmp_path))
    artifact = registry.register("motor-7", "1.0.0", AssetType.from_model(DC_MOTOR), parameters=TRUE)
    assert artifact.asset_type.simulator == "dc_motor"
    assert (artifact.code.distribution, artifact.code.version) == ("raytwin-dcmotor", "0.1.0")
    again = registry.get("motor-7@1.0.0")
    assert again.code == artifact.code and again.model() is DC_MOTOR


def test_a_live_twin_tracks_the_motor_from_telemetry(ray_session, tmp_path, synthetic):
    path, truth = synthetic
    artifact = ModelRegistry(str(tmp_path / "models")).register(
        "motor-7", "1.0.0", AssetType.from_model(DC_MOTOR), parameters=TRUE)
    service = TwinService(str(tmp_path / "twins"), shards=1)
    try:
        service.register(Asset(id="motor-7", tenant="acme", type_name="dc_motor", type_version="0.1.0"), artifact,
                         initial_state={"i": 0.0, "omega": 0.0, "T_w": 310.0})  # 12 K off: a guess
        report = service.ingest("acme", telemetry_events(pq.read_table(path), "motor-7"))
        assert report.accepted == N, report
        state = service.state("acme", "motor-7")
    finally:
        service.close()
    last = truth.slice(N - 1).to_pylist()[0]
    for name in ("i", "omega", "T_w"):  # within 4 reported std of the noise-free truth
        assert abs(state.state[name] - last[name]) < 4 * state.std[name], (name, state, last)
    assert abs(state.state["T_w"] - last["T_w"]) < NOISE["T_w"]  # better than one thermistor reading


def test_calibration_recovers_resistance_and_back_emf(ray_session, tmp_path):
    """Sampled at 200 Hz: calibration integrates at the sample period (20 Hz would bias R by 5 %)."""
    path = tmp_path / "bench.parquet"
    pq.write_table(synthetic_telemetry("dc_motor", TRUE, START, 2000, 0.005, NOISE, seed=2), path)
    spec = CalibrationSpec(model="dc_motor", telemetry=str(path), start_state=START, free=list(TRUE),
                           noise_std=NOISE, num_samples=2, seed=3)
    result, _, _ = calibrate(spec, str(tmp_path / "fit"))
    for name, value in TRUE.items():
        assert abs(result.parameters[name] / value - 1.0) < 0.02, (name, result.parameters[name], value)
