"""FMU sweeps and calibrations leave the run records JAX runs leave (model and FMU hashes, spec,
seeds, output hashes), and `rerun` reproduces them bit for bit."""

from __future__ import annotations

import hashlib

import fmpy
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytwin.contracts import AssetType
from raytwin.fmu import FmuInstance, FmuScenario, store_fmu
from raytwin.registry import ModelRegistry
from sweeps import Dimension, ScenarioSpace
from sweeps.fmu import FmuCalibrationSpec, FmuSpecError, FmuSweepSpec
from sweeps.runs import RunStore, recorded_fmu_calibration, recorded_fmu_sweep, rerun


@pytest.fixture(scope="module")
def registry(reference_fmus, tmp_path_factory) -> ModelRegistry:
    """``vdp@1.0.0``: the VanDerPol FMU (FMI 3.0), mu = 1.2; also ``jax@1.0.0``, a JAX model."""
    from benchmarks.fmu import VAN_DER_POL

    registry = ModelRegistry(str(tmp_path_factory.mktemp("fmu-runs") / "models"))
    stored = store_fmu(reference_fmus[(3, "VanDerPol")], registry.url)
    registry.register("vdp", "1.0.0", AssetType.from_model(stored.declare(mu={"lower": 0.1, "upper": 5.0}),
                                                           name="vdp", version="1.0.0"), {"mu": 1.2})
    registry.register("jax", "1.0.0", AssetType.from_model(VAN_DER_POL, name="jax"))
    return registry


def test_an_fmu_sweep_is_recorded_like_a_jax_sweep_and_reruns_identically(ray_session, registry, tmp_path):
    artifact = registry.get("vdp@1.0.0")
    space = ScenarioSpace(method="grid", dimensions=[Dimension(name="mu", target="param", mode="scale", values=[0.5, 1.5]),
                                                     Dimension(name="x0", target="state", values=[1.0, 2.5])])
    spec = FmuSweepSpec(model="vdp@1.0.0", registry_url=registry.url, tenant="acme", asset_id="osc-1",
                        start_state={"x1": 0.5}, space=space, horizon_s=2.0, step_s=0.01, chunk_size=3)
    runs = str(tmp_path / "runs")
    record = recorded_fmu_sweep(spec, runs=runs, user="alice")
    assert (record.kind, record.status, record.user, record.tenant, record.asset_id) == (
        "sweep", "succeeded", "alice", "acme", "osc-1")
    assert (record.model_ref, record.model_hash) == ("vdp@1.0.0", artifact.content_hash)
    assert record.model_code.kind == "file" and record.model_code.sha256 == artifact.model().fmu_hash
    assert FmuSweepSpec.model_validate(record.spec) == spec and record.seeds == {"space": 0}
    assert record.summary["scenarios"] == 4 and record.summary["failed"] == 0
    assert record.summary["platforms"] == [fmpy.platform]  # the FMU binary the chunks ran: another one's bits differ
    assert RunStore(runs).load(record.run_id) == record

    (name, digest), = record.outputs.items()
    data = open(f"{record.output_url}/{name}", "rb").read()
    assert hashlib.sha256(data).hexdigest() == digest
    table = pq.read_table(f"{record.output_url}/{name}").to_pydict()
    assert table["param.mu"] == [0.5, 0.5, 1.5, 1.5] and table["state.x0"] == [1.0, 2.5, 1.0, 2.5]
    # scenario 3, run here directly: mu scaled from the artifact's 1.2, x0 from the space, x1 from the spec
    y = FmuInstance(artifact.model()).run(FmuScenario(200, 0.01, {"x0": 2.5, "x1": 0.5}, {"mu": 1.2 * 1.5}))
    assert (table["x0_final"][3], table["x1_max"][3], table["error"][3]) == (y[-1, 0], y[:, 1].max(), None)

    again = rerun(record.run_id, runs=runs)
    assert again.identical and again.differing == [] and again.caveats == []
    assert RunStore(runs).load(again.rerun).rerun_of == record.run_id


def test_an_fmu_calibration_is_recorded_with_its_telemetry_hash_and_reruns_identically(ray_session, registry, tmp_path):
    artifact = registry.get("vdp@1.0.0")
    truth = FmuInstance(artifact.model()).run(FmuScenario(150, 0.02, params={"mu": 1.7}))
    rng = np.random.default_rng(4)
    telemetry = str(tmp_path / "osc.parquet")
    pq.write_table(pa.table({"t_s": 0.02 * np.arange(151), "x0": truth[:, 0] + rng.normal(0, 0.01, 151)}), telemetry)
    spec = FmuCalibrationSpec(model="vdp@1.0.0", registry_url=registry.url, telemetry=telemetry,
                              start_state={"x0": 2.0, "x1": 0.0}, free={"mu": (0.3, 4.0)}, num_samples=2, seed=3)
    runs = str(tmp_path / "runs")
    record = recorded_fmu_calibration(spec, runs=runs)
    assert (record.kind, record.status, record.seeds) == ("calibration", "succeeded", {"search": 3})
    assert record.input_data_url == telemetry
    assert record.input_data_hash == hashlib.sha256(open(telemetry, "rb").read()).hexdigest()
    assert record.model_code.sha256 == artifact.model().fmu_hash
    assert record.summary["parameters"]["mu"] == pytest.approx(1.7, rel=0.02) and record.summary["trials"] == 2
    assert record.summary["platforms"] == [fmpy.platform]  # the FMU binary its trials ran, as a sweep's record names
    again = rerun(record.run_id, runs=runs)
    assert again.identical and again.caveats == []


def test_an_fmu_calibration_reads_a_column_in_the_unit_its_field_metadata_names(ray_session, registry, tmp_path):
    """As a JAX model's calibration: telemetry recorded in another unit of the declared one's dimension is
    converted (VanDerPol's x0 is dimensionless: here in percent), and one of another dimension is refused."""
    artifact = registry.get("vdp@1.0.0")
    truth = FmuInstance(artifact.model()).run(FmuScenario(150, 0.02, params={"mu": 1.7}))
    t_s = pa.array(0.02 * np.arange(151))

    def calibrate(unit: str):
        field = pa.field("x0", pa.float64(), metadata={"unit": unit})
        telemetry = str(tmp_path / f"osc-{unit}.parquet")
        pq.write_table(pa.Table.from_arrays([t_s, pa.array(100.0 * truth[:, 0])],
                                            schema=pa.schema([("t_s", pa.float64()), field])), telemetry)
        spec = FmuCalibrationSpec(model="vdp@1.0.0", registry_url=registry.url, telemetry=telemetry,
                                  start_state={"x0": 2.0, "x1": 0.0}, free={"mu": (0.3, 4.0)}, num_samples=2, seed=3)
        return recorded_fmu_calibration(spec, runs=str(tmp_path / "runs"))

    assert calibrate("%").summary["parameters"]["mu"] == pytest.approx(1.7, rel=0.02)
    with pytest.raises(FmuSpecError, match=r"telemetry column x0 of FMU van der Pol oscillator \(field metadata "
                                           r"unit 'm', declared '-'\): cannot convert 'm' to '-'"):
        calibrate("m")


def test_fmu_specs_refuse_what_their_model_lacks(registry, tmp_path):
    space = ScenarioSpace(method="grid", dimensions=[Dimension(name="k", target="param", values=[1.0])])
    spec = FmuSweepSpec(model="vdp@1.0.0", registry_url=registry.url, space=space, horizon_s=1.0, step_s=0.1,
                        parameters={"gain": 2.0})
    artifact = registry.get("vdp@1.0.0")
    with pytest.raises(FmuSpecError, match=r"unknown parameter\(s\) \['gain'\]; known: \['mu'\]; dimension param.k: "
                                           r"unknown; known params: \['mu'\]"):
        spec.scenarios(artifact, artifact.model())
    # values outside the declared bounds (mu in [0.1, 5], the artifact's 1.2) are no what-if either
    scaled = ScenarioSpace(method="grid", dimensions=[Dimension(name="mu", target="param", mode="scale",
                                                                values=[0.5, 10.0])])
    with pytest.raises(FmuSpecError, match=r"dimension param.mu: scale 10 of mu=1.2 outside \[0.0833333, 4.16667\] "
                                           r"\(mu's bounds \[0.1, 5\]\)"):
        spec.model_copy(update={"parameters": {}, "space": scaled}).scenarios(artifact, artifact.model())
    with pytest.raises(FmuSpecError, match=r"parameters.mu=-1 outside mu's bounds \[0.1, 5\]"):
        spec.model_copy(update={"parameters": {"mu": -1.0}, "space": space.model_copy(update={"dimensions": []})}
                        ).scenarios(artifact, artifact.model())
    with pytest.raises(FmuSpecError, match=r"jax@1.0.0: simulator 'benchmarks.fmu:VAN_DER_POL' is not an FMU; "
                                           r"sweep it with sweeps.SweepSpec"):
        recorded_fmu_sweep(spec.model_copy(update={"model": "jax@1.0.0"}), runs=str(tmp_path / "runs"))
    failed, = RunStore(str(tmp_path / "runs")).list()  # a failed run is recorded too, with its reason
    assert failed.status == "failed" and "is not an FMU" in failed.error


def test_an_fmu_sweep_whose_horizon_is_shorter_than_a_step_says_so():
    """It said "horizon_s 0.005 is not a whole number of steps of 0.01 s", not that the horizon holds no step."""
    space = ScenarioSpace(method="grid", dimensions=[Dimension(name="mu", target="param", values=[1.0])])
    with pytest.raises(ValueError, match=r"horizon_s 0.005 is shorter than one step of 0.01 s: give a horizon_s of "
                                         r"one or more whole steps, or a step_s of at most horizon_s that divides it"):
        FmuSweepSpec(model="vdp@1.0.0", registry_url="registry", space=space, horizon_s=0.005, step_s=0.01)
    assert FmuSweepSpec(model="vdp@1.0.0", registry_url="registry", space=space, horizon_s=0.01, step_s=0.01).n_steps == 1


def test_an_fmu_calibration_refuses_too_few_samples_for_its_free_parameters_naming_both(registry, tmp_path):
    """As a JAX calibration does (`sweeps.calibration.MIN_SAMPLES_PER_FREE`), before Ray starts."""
    from sweeps.fmu import calibrate_fmu_spec

    telemetry = str(tmp_path / "osc.parquet")
    pq.write_table(pa.table({"t_s": 0.02 * np.arange(4), "x0": np.linspace(2.0, 1.9, 4)}), telemetry)
    spec = FmuCalibrationSpec(model="vdp@1.0.0", registry_url=registry.url, telemetry=telemetry,
                              start_state={"x0": 2.0, "x1": 0.0}, free={"mu": (0.3, 4.0)})
    with pytest.raises(FmuSpecError, match=r"^calibration of FMU .*: 4 telemetry samples for 1 free parameter\(s\): "
                                           r"a calibration needs at least 5"):
        calibrate_fmu_spec(spec, str(tmp_path / "out"))


def test_an_fmu_calibration_refuses_telemetry_without_the_fmus_inputs(reference_fmus, tmp_path):
    """Inputs missing from the telemetry were held at the FMU's start values: a fit of an asset driven otherwise."""
    registry = ModelRegistry(str(tmp_path / "models"))
    stored = store_fmu(reference_fmus[(3, "Feedthrough")], registry.url)
    bounded = stored.declare(**{name: {"lower": -10.0, "upper": 10.0} for name in stored.param_names})
    registry.register("ft", "1.0.0", AssetType.from_model(bounded, name="ft", version="1.0.0"))
    telemetry = str(tmp_path / "ft.parquet")
    pq.write_table(pa.table({"t_s": 0.1 * np.arange(20), "Float64_continuous_input": np.ones(20),
                             "Float64_continuous_output": np.ones(20)}), telemetry)
    spec = FmuCalibrationSpec(model="ft@1.0.0", registry_url=registry.url, telemetry=telemetry, start_state={},
                              free={"Float64_tunable_parameter": (-5.0, 5.0)})
    with pytest.raises(FmuSpecError, match=r"^calibration of FMU Feedthrough: telemetry lacks input column\(s\) "
                                           r"\['Float32_continuous_input', 'Float32_discrete_input', "
                                           r"'Float64_discrete_input'\]: the FMU would run with them held at their "
                                           r"start values"):
        recorded_fmu_calibration(spec, runs=str(tmp_path / "runs"))


def test_a_what_if_scenario_of_an_fmu_asset_is_refused_pointing_at_sweeps(registry):
    """POST /v1/scenarios of an FMU asset raised AttributeError (the step check asked the FMU for its solver): a 500."""
    from raytwin.contracts import Scenario
    from serve_apps.errors import Unprocessable
    from serve_apps.scenarios import prepare

    scenario = Scenario(asset_id="osc-1", start_state={"x0": 2.0, "x1": 0.0}, horizon_s=0.1, step_s=0.01)
    with pytest.raises(Unprocessable, match=r"^asset osc-1: its simulator is an FMU, and a what-if scenario "
                                            r"integrates a JAX model; sweep it instead \(POST /v1/sweeps"):
        prepare(scenario, registry.get("vdp@1.0.0"), None)


def test_the_sweep_command_runs_an_fmu_spec_so_ray_jobs_can(ray_session, registry, tmp_path):
    """`raytwin sweep run` (what `raytwin job submit` runs on a cluster) takes a spec saying `engine: fmu`."""
    from typer.testing import CliRunner

    from raytwin.cli import app

    space = ScenarioSpace(method="grid", dimensions=[Dimension(name="mu", target="param", values=[0.5, 2.0])])
    spec = FmuSweepSpec(model="vdp@1.0.0", registry_url=registry.url, space=space, horizon_s=0.5, step_s=0.01)
    path = tmp_path / "fmu-sweep.json"
    path.write_text(spec.model_dump_json())
    runs = str(tmp_path / "runs")
    out = CliRunner().invoke(app, ["sweep", "run", str(path), "--runs", runs])
    assert out.exit_code == 0, out.output
    record, = RunStore(runs).list()
    assert f"run {record.run_id}: 2 FMU scenarios (0 failed)" in out.output
    assert FmuSweepSpec.model_validate(record.spec) == spec and record.model_code.kind == "file"

    path.write_text(spec.model_copy(update={"parameters": {"gain": 1.0}}).model_dump_json())
    out = CliRunner().invoke(app, ["sweep", "run", str(path), "--runs", runs])
    assert out.exit_code == 2 and "unknown parameter" in out.output and "'gain'" in out.output  # (a boxed message)


def test_an_fmu_calibration_searches_within_the_declared_bounds_and_says_when_no_trial_fitted(
        ray_session, registry, tmp_path, monkeypatch):
    """A free range beyond `declare(mu={"lower": 0.1, "upper": 5.0})` was searched (and every run there diverged);
    a search whose every trial failed ended in "Out of range float values are not JSON compliant"."""
    import sweeps.fmu
    from raytwin.fmu.batch import FmuCalibration
    from sweeps.fmu import calibrate_fmu_spec

    telemetry = str(tmp_path / "osc.parquet")
    pq.write_table(pa.table({"t_s": 0.02 * np.arange(11), "x0": np.linspace(2.0, 1.9, 11)}), telemetry)
    spec = FmuCalibrationSpec(model="vdp@1.0.0", registry_url=registry.url, telemetry=telemetry,
                              start_state={"x0": 2.0, "x1": 0.0}, free={"mu": (-4.0, -0.3)})
    with pytest.raises(FmuSpecError, match=r"free mu \[-4, -0.3\] leaves its declared bounds \[0.1, 5\]"):
        calibrate_fmu_spec(spec, str(tmp_path / "out"))
    monkeypatch.setattr(sweeps.fmu, "calibrate_fmu", lambda *a, **kw: FmuCalibration({"mu": 1.0}, float("inf"), 4, 8,
                                                                                      ["linux64"]))
    with pytest.raises(FmuSpecError, match="no trial produced a finite loss: every FMU run failed"):
        calibrate_fmu_spec(spec.model_copy(update={"free": {"mu": (0.3, 4.0)}}), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_fmu_sweep_refuses_a_huge_design_up_front_saying_how_to_run_it(registry, tmp_path, monkeypatch):
    """It had no limit in Python: a design of 1e9 LHS scenarios was drawn in the driver, one object each. And it
    is refused before the FMU is loaded (a download and a read), which only sized the message."""
    from typer.testing import CliRunner

    import sweeps.fmu
    from raytwin.cli import app
    from sweeps.limits import SweepTooLarge

    space = ScenarioSpace(method="grid", dimensions=[Dimension(name="mu", target="param", values=[1.0, 1.1, 1.2])])
    spec = FmuSweepSpec(model="vdp@1.0.0", registry_url=registry.url, space=space, horizon_s=1.0, step_s=0.1)
    monkeypatch.setattr(FmuSweepSpec, "scenarios", lambda *a: pytest.fail("the design was drawn"))
    monkeypatch.setattr(ModelRegistry, "get", lambda *a, **kw: pytest.fail("the FMU was loaded"))
    runs = str(tmp_path / "runs")
    with pytest.raises(SweepTooLarge, match=r"^3 scenarios of 10 steps would write about 72 B \(3 values a scenario\) "
                                            r"plus 96 B for each of the model's outputs \(4 values a scenario each\) "
                                            r".* more than max_scenarios=2; pass max_scenarios=3 to run it, or run it "
                                            "as several smaller sweeps"):
        recorded_fmu_sweep(spec, runs=runs, max_scenarios=2)
    assert RunStore(runs).list() == []  # refused before anything is recorded
    with pytest.raises(SweepTooLarge, match=r"more than max_scenarios=2"):
        sweeps.fmu.run_fmu_spec(spec, str(tmp_path / "out"), max_scenarios=2)
    assert not (tmp_path / "out").exists()
    path = tmp_path / "fmu-sweep.json"
    path.write_text(spec.model_dump_json())
    out = CliRunner().invoke(app, ["sweep", "run", str(path), "--runs", runs, "--max-scenarios", "2"])
    assert out.exit_code == 2 and "more than --max-scenarios 2" in " ".join(out.output.split()), out.output
