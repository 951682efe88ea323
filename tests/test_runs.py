"""Run records and reruns: every sweep and calibration is recorded and reproduces bit for bit."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from raytwin.contracts import AssetType
from raytwin.provenance import code_version
from raytwin.registry import ModelRegistry
from raytwin.sim import TWO_TANK
from sweeps.cli import calibrate_app, rerun_app, runs_app
from sweeps.runner import run_sweep
from sweeps.runs import RunError, RunStore, load_calibration, recorded_sweep, rerun
from sweeps.space import Dimension, ScenarioSpace
from sweeps.spec import SweepSpec


def _sweep_spec(registry_url):
    space = ScenarioSpace(method="random", n=300, seed=11, dimensions=[
        Dimension(name="a1", target="param", mode="scale", low=0.8, high=1.2),
        Dimension(name="q_in_mean", target="input", low=5e-5, high=1.5e-4),
    ])
    return SweepSpec(model="tank@1.0.0", registry_url=registry_url, tenant="acme", asset_id="tank-7", space=space,
                     horizon_s=900.0, step_s=1.0, chunk_size=128, trajectories=[3])


def _file_hash(url):
    with open(url, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_sweep_run_record_and_bit_identical_rerun(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYTWIN_USER", "alice")
    registry = ModelRegistry(str(tmp_path / "registry"))
    artifact = registry.register("tank", "1.0.0", AssetType.from_model(TWO_TANK, name="tank"), {"a1": 6e-5})
    runs = str(tmp_path / "runs")
    record = recorded_sweep(_sweep_spec(str(tmp_path / "registry")), runs=runs)
    assert record.status == "succeeded" and record.kind == "sweep"
    assert (record.user, record.tenant, record.asset_id) == ("alice", "acme", "tank-7")
    assert (record.model_ref, record.model_hash) == ("tank@1.0.0", artifact.content_hash)
    assert record.model_code == artifact.code and record.model_code.distribution == "raytwin"
    assert record.seeds == {"space": 11} and record.spec["space"]["n"] == 300
    assert record.code_version == code_version() and "jax" in record.package_versions
    assert sorted(record.outputs) == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet",
                                      "trajectories.parquet"]
    for name, digest in record.outputs.items():
        assert _file_hash(f"{record.output_url}/{name}") == digest
    assert RunStore(runs).load(record.run_id) == record
    # the registry's calibrated parameters were used: the base a1 is 6e-5, scaled by 0.8..1.2
    part = pq.read_table(f"{record.output_url}/part-000000.parquet")
    assert part.num_rows == 128 and "param.a1" in part.column_names

    assert record.summary["platforms"] == ["cpu"]  # what the chunk tasks' kernels ran on
    report = rerun(record.run_id, runs=runs)
    assert report.identical and report.differing == [] and report.caveats == []
    again = RunStore(runs).load(report.rerun)
    assert again.rerun_of == record.run_id and again.outputs == record.outputs

    result = CliRunner().invoke(rerun_app, [record.run_id, "--runs", runs])
    assert result.exit_code == 0, result.output
    assert "identical" in result.output
    listing = CliRunner().invoke(runs_app, ["list", "--runs", runs])
    assert listing.output.count("\tsweep\tsucceeded\ttank@1.0.0\tacme\talice\t") == 3

    # a changed model is detected before anything runs
    registry_dir = tmp_path / "registry" / "models" / "tank" / "1.0.0.json"
    pointer = json.loads(registry_dir.read_text())
    other = registry.register("tank", "1.0.1", AssetType.from_model(TWO_TANK, name="tank"), {"a1": 7e-5})
    registry_dir.write_text(json.dumps({**pointer, "sha256": other.content_hash}))
    with pytest.raises(RunError, match="changed since run"):
        rerun(record.run_id, runs=runs)


def test_calibration_run_records_the_data_hash_and_reruns_identically(ray_session, tmp_path):
    runner, path, runs = CliRunner(), tmp_path / "telemetry.parquet", str(tmp_path / "runs")
    made = runner.invoke(calibrate_app, ["synthetic", "two_tank", "--out", str(path), "--steps", "900", "--seed", "3",
                                         "--param", "a1=5.6e-5", "--param", "a2=4.5e-5",
                                         "--noise", "h1=0.001", "--noise", "h2=0.001"])
    assert made.exit_code == 0, made.output
    # the truth a fit is checked against, the parameters not given at their defaults (printed nowhere before)
    assert '"a1": 5.6e-05, "a2": 4.5e-05' in made.output and '"cd": 0.6' in made.output
    spec_file = tmp_path / "calib.yaml"
    spec_file.write_text(yaml.safe_dump({
        "model": "two_tank", "telemetry": str(path), "start_state": {"h1": 0.3, "h2": 0.3}, "free": ["a1", "a2"],
        "noise_std": {"h1": 1e-3, "h2": 1e-3}, "num_samples": 3, "seed": 5,
        "registry_url": str(tmp_path / "registry"), "register_as": "two_tank_fit@1.0.0", "registered_by": "key-1"}))
    fitted = runner.invoke(calibrate_app, ["run", str(spec_file), "--runs", runs])
    assert fitted.exit_code == 0, fitted.output
    assert "a1 = 5.6" in fitted.output  # printed with its uncertainty
    record = RunStore(runs).load(fitted.output.split()[1].rstrip(":"))
    table = pq.read_table(path)
    assert record.kind == "calibration" and record.input_data_hash == _file_hash(path)
    assert record.seeds == {"search": 5} and set(record.outputs) == {"calibration.json", "fit.png"}
    assert record.summary["parameters"]["a1"] == pytest.approx(5.6e-5, rel=0.02)
    assert record.summary["platforms"] == ["cpu"]  # where its least squares ran
    fit = load_calibration(record.run_id, runs=runs)  # typed, for a notebook: no JSON to parse
    assert fit.parameters == record.summary["parameters"] and fit.free == ["a1", "a2"] and len(fit.correlation) == 2

    report = rerun(record.run_id, runs=runs)
    assert report.identical and report.caveats == [], report.differing
    # a record from before `registered_by` existed (a register_as needs it now) reruns too, publishing nothing
    RunStore(runs).save(record.model_copy(update={"spec": {k: v for k, v in record.spec.items()
                                                           if k != "registered_by"}}))
    assert rerun(record.run_id, runs=runs).identical
    assert ModelRegistry(str(tmp_path / "registry")).versions("two_tank_fit") == ["1.0.0"]

    pq.write_table(table.slice(0, 800), path)  # the telemetry snapshot changed
    with pytest.raises(RunError, match="telemetry .* changed"):
        rerun(record.run_id, runs=runs)


def test_a_failed_run_is_recorded_and_cannot_be_rerun(tmp_path, monkeypatch):
    import sweeps.runs

    def broken(*args, **kwargs):
        raise RuntimeError("storage exploded")

    monkeypatch.setattr(sweeps.runs, "run_sweep", broken)
    space = ScenarioSpace(method="random", n=4, dimensions=[Dimension(name="a1", target="param", low=1e-5, high=2e-5)])
    spec = sweeps.SweepSpec(model="two_tank", space=space, horizon_s=10.0, step_s=1.0)
    runs = str(tmp_path / "runs")
    with pytest.raises(RuntimeError, match="exploded"):
        sweeps.recorded_sweep(spec, runs=runs)
    [record] = RunStore(runs).list()
    assert (record.status, record.error, record.outputs) == ("failed", "storage exploded", {})
    with pytest.raises(RunError, match="only succeeded runs"):
        rerun(record.run_id, runs=runs)
    with pytest.raises(RunError, match=f"run {record.run_id} is a failed sweep, not a succeeded calibration"):
        load_calibration(record.run_id, runs=runs)


def test_a_run_whose_model_code_changed_cannot_be_rerun(tmp_path, monkeypatch):
    """A bare simulator has no registry pin: the run record's code identity is what catches the change."""
    import sweeps.runs

    monkeypatch.setattr(sweeps.runs, "run_sweep", lambda *args, **kwargs: SimpleNamespace(
        outputs={}, n_scenarios=4, n_diverged=0, n_chunks=1, elapsed_s=0.1, scenarios_per_s=40.0, platforms=["cpu"]))
    space = ScenarioSpace(method="random", n=4, dimensions=[Dimension(name="a1", target="param", low=1e-5, high=2e-5)])
    runs = str(tmp_path / "runs")
    record = recorded_sweep(SweepSpec(model="two_tank", space=space, horizon_s=10.0, step_s=1.0), runs=runs)
    then = record.model_code.model_copy(update={"sha256": "0" * 64,
                                                "parts": {"raytwin.sim.tanks": "0" * 64}})
    RunStore(runs).save(record.model_copy(update={"model_code": then}))
    with pytest.raises(RunError, match=f"code of model two_tank@.* changed since run {record.run_id}: "
                                       "module raytwin.sim.tanks changed"):
        rerun(record.run_id, runs=runs)


def test_unknown_runs_are_reported(tmp_path):
    with pytest.raises(RunError, match="no run"):
        RunStore(str(tmp_path)).load("sweep-nope")
    result = CliRunner().invoke(rerun_app, ["sweep-nope", "--runs", str(tmp_path)])
    assert result.exit_code != 0 and "no run 'sweep-nope'" in result.output


def test_a_run_stopped_by_sigterm_is_recorded_as_cancelled(ray_session, tmp_path, monkeypatch):
    """SIGTERM mid-sweep (`raytwin job stop`, a scheduler's kill, `timeout`): the record said "1" or "15" (Ray's
    handler's exit code), then `failed` "terminated by SIGTERM", as a crash would be; it is a cancellation."""
    import os
    import signal
    import time

    import sweeps.runs
    from sweeps.cli import sweep_app

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler interrupts this

    monkeypatch.setattr(sweeps.runs, "run_sweep", terminated)
    space = ScenarioSpace(method="grid", dimensions=[Dimension(name="a1", target="param", mode="scale", values=[1.0])])
    path = tmp_path / "spec.json"
    path.write_text(SweepSpec(model="two_tank", space=space, horizon_s=10.0, step_s=1.0).model_dump_json())
    runs, before = str(tmp_path / "runs"), signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(sweep_app, ["run", str(path), "--runs", runs, "--no-progress"])
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    record, = RunStore(runs).list()
    assert (record.status, record.error) == ("cancelled", "cancelled by SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is before  # the command put the previous handler back


def test_a_sweep_whose_task_is_cancelled_in_a_wait_is_recorded_cancelled(tmp_path):
    """A job cancelled while its sweep task waited on Ray surfaced as `TaskCancelledError`, not the interrupt,
    and its run was recorded `failed` (once in a CI run of the job cancellation test)."""
    from ray.exceptions import TaskCancelledError

    from sweeps import Dimension, ScenarioSpace, SweepSpec
    from sweeps.runs import RunStore, _recorded

    space = ScenarioSpace(method="grid", dimensions=[Dimension(name="a1", target="param", values=[1e-5])])
    spec = SweepSpec(model="two_tank", space=space, horizon_s=10.0, step_s=1.0)
    store = RunStore(str(tmp_path / "runs"))

    def interrupted(url: str):
        raise TaskCancelledError()

    with pytest.raises(TaskCancelledError):
        _recorded(store, "sweep", spec, interrupted, input_url=None, input_hash=None, seeds={}, user="u", rerun_of=None)
    (record,) = store.list()
    assert record.status == "cancelled"


def test_an_interrupted_runs_tasks_are_cancelled_after_its_record_is_saved(tmp_path, monkeypatch):
    """Ray 2.60 aborted a stopped job's driver inside `ray.cancel` (a CHECK failure when the cancel raced a chunk
    completing), before the run was recorded: `raytwin job stop` left no record (once in a CI run of the job
    stop test, 1 in 18 runs of it under load). The record is written first; the cancels follow."""
    import ray

    from sweeps import Dimension, ScenarioSpace, SweepSpec
    from sweeps.runner import RunTerminated
    from sweeps.runs import RunStore, _recorded

    space = ScenarioSpace(method="grid", dimensions=[Dimension(name="a1", target="param", values=[1e-5])])
    spec = SweepSpec(model="two_tank", space=space, horizon_s=10.0, step_s=1.0)
    store, seen = RunStore(str(tmp_path / "runs")), []

    def aborting_cancel(ref, **kwargs):  # what the race does to the process, after which nothing else runs
        seen.append((ref, [r.status for r in store.list()]))
        raise SystemExit("aborted in ray.cancel")

    def interrupted(url: str):
        from raytwin.ray_connect import cancel_tasks

        cancel_tasks(["chunk-0", "chunk-1"])  # what the sweep runner does on SIGTERM, before it re-raises
        raise RunTerminated("sweep cancelled by SIGTERM after 0/1 scenarios")

    monkeypatch.setattr(ray, "cancel", aborting_cancel)
    with pytest.raises(SystemExit, match="aborted in ray.cancel"):
        _recorded(store, "sweep", spec, interrupted, input_url=None, input_hash=None, seeds={}, user="u", rerun_of=None)
    assert seen == [("chunk-0", ["cancelled"])]  # the first cancel found the record saved
    (record,) = store.list()
    assert record.error == "sweep cancelled by SIGTERM after 0/1 scenarios"


def test_a_calibration_run_from_python_records_its_telemetry_by_absolute_path(tmp_path, monkeypatch):
    """`recorded_calibration` recorded a relative telemetry path as given (only `raytwin calibrate run` made it
    absolute): `raytwin rerun` elsewhere read that directory's file of that name, or none."""
    from sweeps.calibration import CalibrationError, CalibrationSpec
    from sweeps.runs import recorded_calibration
    from sweeps.synthetic import synthetic_telemetry

    work = tmp_path / "work"
    work.mkdir()
    table = synthetic_telemetry("two_tank", {}, {"h1": 0.3, "h2": 0.3}, 20, 1.0, {"h1": 1e-3})
    pq.write_table(table, work / "t.parquet")
    monkeypatch.chdir(work)
    spec = CalibrationSpec(model="two_tank", telemetry="t.parquet", start_state={"h1": 0.3, "h2": 0.3}, free=["nope"])
    runs = str(tmp_path / "runs")
    with pytest.raises(CalibrationError, match="free parameters"):  # refused before any fit, and recorded
        recorded_calibration(spec, runs=runs)
    record, = RunStore(runs).list()
    assert record.input_data_url == record.spec["telemetry"] == str(work / "t.parquet")


def test_a_sweeps_series_file_is_recorded_by_absolute_path(ray_session, tmp_path, monkeypatch):
    """A series signal's relative `path` reached the chunk tasks and the record as given: workers in another working
    directory (this session's Ray) failed every chunk, and a rerun elsewhere read another file or none."""
    import numpy as np
    import pyarrow as pa

    work = tmp_path / "work"
    work.mkdir()
    pq.write_table(pa.table({"t_s": [0.0, 600.0], "T_out": [270.0, 280.0]}), work / "weather.parquet")
    monkeypatch.chdir(work)
    spec = SweepSpec.model_validate({
        "model": "thermal_rc", "horizon_s": 600, "step_s": 60,
        "signals": {"T_out": {"kind": "series", "path": "weather.parquet", "column": "T_out"}},
        "space": {"method": "random", "n": 2, "dimensions": [{"name": "C_in", "target": "param", "mode": "scale",
                                                              "low": 0.8, "high": 1.2}]}})
    record = recorded_sweep(spec, runs=str(tmp_path / "runs"))
    assert record.spec["signals"]["T_out"]["path"] == str(work / "weather.parquet")
    assert record.input_files == {str(work / "weather.parquet"): _file_hash(work / "weather.parquet")}
    assert np.isfinite(pq.read_table(f"{record.output_url}/part-000000.parquet")["T_in_min"].to_numpy()).all()
    assert run_sweep(spec, str(tmp_path / "unrecorded")).n_scenarios == 2  # its chunk tasks failed too
    # another weather file under the same name: the rerun answered "differs: part-000000.parquet", saying not why
    pq.write_table(pa.table({"t_s": [0.0, 600.0], "T_out": [260.0, 280.0]}), work / "weather.parquet")
    with pytest.raises(RunError, match=f"input file {work / 'weather.parquet'} changed since run {record.run_id}"):
        rerun(record.run_id, runs=str(tmp_path / "runs"))
    (work / "weather.parquet").unlink()
    with pytest.raises(RunError, match=f"input file {work / 'weather.parquet'} of run {record.run_id} is gone"):
        rerun(record.run_id, runs=str(tmp_path / "runs"))


def test_telemetry_in_a_ray_jobs_working_dir_is_refused_when_the_record_outlives_it(tmp_path, monkeypatch):
    """A job's relative `telemetry:` resolved into its runtime-env working dir, which `cluster down` deletes: the
    record named that path, and `raytwin rerun` could never run it again."""
    from sweeps.runs import runtime_env_dir
    from sweeps.synthetic import synthetic_telemetry

    package = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12"
    package.mkdir(parents=True)
    pq.write_table(synthetic_telemetry("two_tank", {}, {"h1": 0.3, "h2": 0.3}, 20, 1.0, {"h1": 1e-3}),
                   package / "t.parquet")
    (package / "calib.yaml").write_text(yaml.safe_dump({
        "model": "two_tank", "telemetry": "t.parquet", "start_state": {"h1": 0.3, "h2": 0.3}, "free": ["a1"]}))
    monkeypatch.chdir(package)  # as a job's driver runs
    assert runtime_env_dir("t.parquet") == runtime_env_dir(str(package / "runs")) == str(package)
    assert runtime_env_dir(str(tmp_path / "t.parquet")) is None
    assert runtime_env_dir("s3://b/runtime_resources/working_dir_files/_ray_pkg_1/t.parquet") is None
    runs = tmp_path / "runs"
    refused = CliRunner().invoke(calibrate_app, ["run", "calib.yaml", "--runs", str(runs)])
    assert refused.exit_code == 2, refused.output
    compact = lambda text: "".join(text.replace("│", "").split())  # noqa: E731  (rich wraps the usage error's box)
    message = compact(refused.output)
    assert compact(f"lies in a Ray job's uploaded working directory ({package})") in message, message
    assert compact("absolute path outside the working directory") in message and "s3://URL" in message
    assert not runs.exists()  # refused before anything ran or was recorded


def test_a_runs_relative_registry_url_is_recorded_absolute_so_a_rerun_elsewhere_finds_the_model(tmp_path, monkeypatch):
    """A spec's relative `registry_url` ("./models") was recorded as given: `raytwin rerun` from another working
    directory failed with "no model zone-17@1.2.0 in this registry" (found by an outside test, 2026-12-07)."""
    from sweeps.runs import _recorded
    from sweeps.spec import resolve_model

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(work)
    ModelRegistry("models").register("tank", "1.0.0", AssetType.from_model(TWO_TANK, name="tank"), {"a1": 6e-5})
    store = RunStore("runs")
    record = _recorded(store, "sweep", _sweep_spec("models"), lambda url: ({}, {}), input_url=None, input_hash=None,
                       seeds={}, user="u", rerun_of=None)
    assert record.spec["registry_url"] == str(work / "models")
    monkeypatch.chdir(elsewhere)
    assert resolve_model(record.spec["model"], record.spec["registry_url"]).ref == "tank@1.0.0"
    record = record.model_copy(update={"spec": {**record.spec, "registry_url": "gone"}})
    store.save(record)
    with pytest.raises(RunError, match="no model tank@1.0.0 in this registry \\(registry gone\\)"):
        rerun(record.run_id, runs=str(work / "runs"))  # a registry moved since: the rerun names where it looked


def test_a_registry_in_a_ray_jobs_working_dir_is_refused_before_the_run(tmp_path, monkeypatch):
    """A job's relative `registry_url` resolved into its runtime-env working dir, which `cluster down` deletes: the
    record named a model no rerun could read again (and a calibration's `register_as` published into it), while a
    runs root there was refused."""
    from sweeps.runs import _recorded

    package = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)  # as a job's driver runs
    ModelRegistry("models").register("tank", "1.0.0", AssetType.from_model(TWO_TANK, name="tank"), {"a1": 6e-5})
    store = RunStore(str(tmp_path / "runs"))

    def never(url: str) -> tuple[dict, dict]:
        raise AssertionError("ran")

    with pytest.raises(RunError, match=rf"registry_url models lies in a Ray job's uploaded working directory "
                                       rf"\({package}\).*absolute registry_url outside the working directory.*s3://"):
        _recorded(store, "sweep", _sweep_spec("models"), never, input_url=None, input_hash=None, seeds={}, user="u",
                  rerun_of=None)
    assert not (tmp_path / "runs").exists()  # refused before anything ran or was recorded


def test_a_rerun_names_the_packages_whose_versions_changed_since_the_run(tmp_path, monkeypatch):
    """A rerun under another jax or numpy answered "differs: part-000000.parquet" and named only a changed git
    commit: the record holds the package versions, and the rerun now says which of them changed."""
    import sweeps.runs

    monkeypatch.setattr(sweeps.runs, "run_sweep", lambda *args, **kwargs: SimpleNamespace(
        outputs={}, n_scenarios=4, n_diverged=0, n_chunks=1, elapsed_s=0.1, scenarios_per_s=40.0, platforms=["cpu"]))
    space = ScenarioSpace(method="random", n=4, dimensions=[Dimension(name="a1", target="param", low=1e-5, high=2e-5)])
    runs = str(tmp_path / "runs")
    record = recorded_sweep(SweepSpec(model="two_tank", space=space, horizon_s=10.0, step_s=1.0), runs=runs)
    assert {"jax", "numpy", "optax", "fmpy"} <= set(record.package_versions)  # a recommendation steps with optax
    now = record.package_versions["jax"]
    RunStore(runs).save(record.model_copy(update={"package_versions": {**record.package_versions, "jax": "0.0.1"}}))
    assert rerun(record.run_id, runs=runs).package_changes == {"jax": ["0.0.1", now]}
    result = CliRunner().invoke(rerun_app, [record.run_id, "--runs", runs])
    assert result.exit_code == 0 and f"note: package versions changed: jax 0.0.1 -> {now}" in result.output


def test_a_rerun_that_cannot_reproduce_the_bits_says_why(tmp_path, monkeypatch):
    """A sweep recorded on a GPU (the fused kernel) reran on CPUs (the XLA scan), and a calibration whose concurrent
    trials ASHA stopped in arrival order, answered "differs: ..." naming no reason: the rerun now names it."""
    import sweeps.runs
    from sweeps.calibration import CalibrationSpec

    parts = iter([{"part-000000.parquet": "aa"}, {"part-000000.parquet": "bb"}])
    monkeypatch.setattr(sweeps.runs, "run_sweep", lambda *args, **kwargs: SimpleNamespace(
        outputs=next(parts), n_scenarios=4, n_diverged=0, n_chunks=1, elapsed_s=0.1, scenarios_per_s=40.0,
        platforms=["cpu"]))
    space = ScenarioSpace(method="random", n=4, dimensions=[Dimension(name="a1", target="param", low=1e-5, high=2e-5)])
    runs = str(tmp_path / "runs")
    record = recorded_sweep(SweepSpec(model="two_tank", space=space, horizon_s=10.0, step_s=1.0), runs=runs)
    gpu = "gpu: NVIDIA H100 80GB HBM3"
    RunStore(runs).save(record.model_copy(update={"summary": {**record.summary, "platforms": [gpu]}}))
    result = CliRunner().invoke(rerun_app, [record.run_id, "--runs", runs])
    assert result.exit_code == 1 and "differs" in result.output
    assert f"note: the sweep's kernels ran on {gpu} then, on cpu now" in result.output
    fit = dict(model="two_tank", telemetry="t.parquet", start_state={"h1": 0.3, "h2": 0.3}, free=["a1"])
    assert CalibrationSpec(**fit).order_dependence() is None  # one trial at a time: deterministic for a seed
    assert CalibrationSpec(**fit, max_concurrent_trials=4, scheduler="fifo").order_dependence() is None
    assert CalibrationSpec(**fit, max_concurrent_trials=4).order_dependence().startswith(
        "max_concurrent_trials=4 with scheduler asha: Tune's decisions follow the order")
    concurrent = record.model_copy(update={"kind": "calibration", "spec": {**fit, "max_concurrent_trials": 4,
                                                                             "search": "optuna", "scheduler": "fifo"}})
    assert sweeps.runs._caveats(concurrent, concurrent) == [CalibrationSpec(
        **fit, max_concurrent_trials=4, search="optuna", scheduler="fifo").order_dependence()]
    # an FMU sweep's and calibration's binaries, a calibration's least squares and a recommendation's search alike
    for kind, spec, then, now, said in (
            ("sweep", {"engine": "fmu"}, "darwin64", "linux64", "the FMU sweep's binaries ran on darwin64 then, on "
                                                                 "linux64 now"),
            ("calibration", fit, gpu, "cpu", f"the calibration's least-squares stage ran on {gpu} then, on cpu now"),
            ("calibration", {"engine": "fmu"}, "darwin64", "linux64", "the FMU calibration's binaries ran on "
                                                                      "darwin64 then, on linux64 now"),
            ("recommendation", {}, gpu, "cpu", f"the recommendation's search ran on {gpu} then, on cpu now")):
        old, new = (record.model_copy(update={"kind": kind, "spec": spec, "summary": {"platforms": [platform]}})
                    for platform in (then, now))
        assert sweeps.runs._caveats(old, new)[0].startswith(said)


def test_runs_diff_names_each_field_two_runs_differ_in_and_whether_their_outputs_do(tmp_path, monkeypatch):
    """Comparing two sweeps meant reading two `runs show` JSON dumps side by side."""
    import sweeps.runs
    from sweeps.runs import diff_runs

    outputs = iter([{"part-000000.parquet": "aa"}, {"part-000000.parquet": "bb"}])
    monkeypatch.setattr(sweeps.runs, "run_sweep", lambda *args, **kwargs: SimpleNamespace(
        outputs=next(outputs), n_scenarios=4, n_diverged=0, n_chunks=1, elapsed_s=0.1, scenarios_per_s=40.0, platforms=["cpu"]))
    dimension = Dimension(name="a1", target="param", low=1e-5, high=2e-5)
    runs = str(tmp_path / "runs")
    first, second = (recorded_sweep(SweepSpec(model="two_tank", horizon_s=10.0, step_s=1.0, space=ScenarioSpace(
        method="random", n=n, dimensions=[dimension])), runs=runs).run_id for n in (4, 8))
    assert diff_runs(first, second, runs=runs) == {"outputs.part-000000.parquet": ["aa", "bb"],
                                                   "spec.space.n": [4, 8]}
    assert diff_runs(first, first, runs=runs) == {}
    shown = CliRunner().invoke(runs_app, ["diff", first, second, "--runs", runs])
    assert shown.exit_code == 0 and shown.output.splitlines() == ['outputs.part-000000.parquet: "aa" -> "bb"',
                                                                  "spec.space.n: 4 -> 8"]
    assert CliRunner().invoke(runs_app, ["diff", first, first, "--runs", runs]).output == "outputs: identical\n"


def test_a_runs_root_in_a_ray_jobs_working_dir_is_refused_before_the_run(tmp_path, monkeypatch):
    """`raytwin job submit --working-dir . -- raytwin sweep run spec.json` (no --runs: ./runs) succeeded and wrote its
    record and outputs into the job's uploaded working dir, which `raytwin cluster down` deletes with them."""
    from sweeps.cli import sweep_app

    package = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12"
    package.mkdir(parents=True)
    (package / "spec.json").write_text(_sweep_spec(None).model_copy(update={"model": "two_tank"}).model_dump_json())
    monkeypatch.chdir(package)  # as a job's driver runs
    refused = CliRunner().invoke(sweep_app, ["run", "spec.json"])
    assert refused.exit_code == 2, refused.output
    compact = lambda text: "".join(text.replace("│", "").split())  # noqa: E731  (rich wraps the usage error's box)
    assert compact(f"runs root {package / 'runs'} lies in a Ray job's uploaded working directory") in compact(
        refused.output) and compact('--runs "$PWD/runs"') in compact(refused.output), refused.output
    assert not (package / "runs").exists()  # refused before anything ran or was recorded


def test_a_sweep_of_a_model_missing_from_its_registry_names_the_registry(tmp_path):
    """`raytwin sweep run` of a spec whose registry_url pointed at the wrong directory said "no model tank@1.0.0 in
    this registry", naming none: the registry's message leaves its location to the caller (the API hides it)."""
    from sweeps.cli import sweep_app

    (tmp_path / "spec.json").write_text(_sweep_spec(str(tmp_path / "registry")).model_dump_json())
    refused = CliRunner().invoke(sweep_app, ["run", str(tmp_path / "spec.json"), "--runs", str(tmp_path / "runs")])
    compact = "".join(refused.output.replace("│", "").split())
    assert refused.exit_code == 2 and f"(registry{tmp_path / 'registry'})" in compact, refused.output


def test_runs_list_of_a_root_without_runs_says_where_it_looked(tmp_path):
    # a mistyped --runs printed nothing at all, as if no run had ever been recorded
    listing = CliRunner().invoke(runs_app, ["list", "--runs", str(tmp_path / "typo")])
    assert listing.exit_code == 0
    assert f"no runs under {tmp_path / 'typo'}" in listing.output and "--runs" in listing.output
