"""The `raytwin` command: version, mounted sub-commands, and the demo end to end (small sizes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raytwin.cli import app

ROOT = Path(__file__).resolve().parent.parent


def test_version_lists_the_stack():
    out = CliRunner().invoke(app, ["version"])
    assert out.exit_code == 0
    for name in ("raytwin", "ray", "jax", "pydantic"):
        assert f"\n{name} " in "\n" + out.output


def test_every_bounded_context_is_mounted():
    out = CliRunner().invoke(app, ["--help"])
    for command in ("demo", "twins", "sweep", "calibrate", "rerun", "serve", "keys", "cluster", "job", "status", "bench", "models",
                    "recalibration", "shadow", "audit"):
        assert command in out.output


def test_every_help_flows_for_the_terminal_to_wrap():
    """Typer's rich help printed docstrings' source line breaks: `raytwin --help` broke `audit`'s summary
    mid-sentence at every width, as every command's help below its first paragraph. Every help of every command and
    group (`bench` is `python -m benchmarks`'s app) is its paragraphs, each one line."""
    import click
    import typer.main

    def commands(command: click.Command, path: str):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, f"{path} {name}")

    found = dict(commands(typer.main.get_command(app), "raytwin"))
    assert "raytwin bench run" in found and "raytwin twins dead-letters" in found  # (groups are walked)
    broken = [path for path, command in found.items() if any("\n" in p for p in (command.help or "").split("\n\n"))]
    assert broken == []
    wide = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400"}).output
    assert re.search(r"audit +Who changed what and when: .* is also named on stderr\. +│", wide), wide


def test_demo_runs_the_whole_loop(tmp_path):
    """The README's demo command, at small sizes, in its own process (it starts its own Ray). Its options size only
    the twins (two: an interleaved stream) and the sweep; three quarters of its time are the fixed-size calibration,
    recalibration and recommendation of sections 4 and 6, which no option shrinks."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "raytwin.cli", "demo", "--scenarios", "64", "--twins", "2", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "read back identical: True" in out
    assert "duplicates=0 rejected=0" in out and "accepted=0 duplicates=" in out
    assert "compacted the event log while the twins run" in out and "time travel:" in out
    assert "published zone-000@1.1.0" in out
    assert "outputs identical = True" in out
    # section 6, the closed loop: each line prints a verdict the demo computed
    assert "drift flagged within 6 h: True" in out
    assert "R_io within 3 %: True" in out
    assert "shadow evaluation done: True, candidate preferred: True" in out
    assert "author's own approval refused: True" in out and "promoted by bob (approver, not the author)" in out
    assert "refused=none" in out and "no event lost: True" in out
    assert "innovations back to nominal: True" in out
    assert "audit chain verifies: True" in out
    assert "with discomfort no worse: True" in out
    assert (tmp_path / "runs").is_dir() and any((tmp_path / "runs").glob("calibration-*/output/fit.png"))


def _said(result) -> str:
    """The command's output with the error box's borders and line breaks taken out."""
    return " ".join(result.output.replace("│", " ").split())


def test_calibrate_synthetic_imports_a_model_from_the_working_directory(tmp_path, monkeypatch):
    """As `raytwin models` does: the README's guide writes my_models.py and runs the commands next to it."""
    import pyarrow.parquet as pq

    from tests.test_models import USER_PACKAGE

    (tmp_path / "cli_cwd_spring.py").write_text(USER_PACKAGE)
    monkeypatch.chdir(tmp_path)
    # as for the console script: the working directory is not on sys.path ("" is, under `python -m pytest`)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    made = CliRunner().invoke(app, ["calibrate", "synthetic", "cli_cwd_spring:SPRING", "--out", "s.parquet",
                                    "--steps", "5"])
    assert made.exit_code == 0, made.output
    assert pq.read_table(tmp_path / "s.parquet").column_names == ["t_s", "F", "x"]
    # how far the data move each input: the generic excitation's +- 1 N around F's zero nominal, said so
    assert re.search(r"^inputs: F -?0\.\d+ to -?0\.\d+ N \(no kit: random levels .* write your own data\)$", made.output,
                     re.M), made.output
    missing = CliRunner().invoke(app, ["calibrate", "synthetic", "no_such_module:SPRING", "--out", "s.parquet"])
    assert missing.exit_code == 2 and "cannot import no_such_module" in missing.output


NO_INPUT_MODEL = """
from raytwin.models import Model, Output, Param, State

DECAY = Model(name="decay", version="0.1.0", description="first-order decay, no inputs",
              states=(State("v", "V", "voltage", -100.0, 100.0, nominal=10.0, prior_std=0.1, process_std=1e-3),),
              inputs=(), params=(Param("k", "1/s", 0.5, 0.1, 2.0, "rate"),),
              outputs=(Output("v", "V", "voltage", -100.0, 100.0, measurement_std=0.01),),
              coefficients=lambda p: p, derivative=lambda x, u, c: (-c[0] * x[0],), output=lambda x, u, c: x,
              default_dt=0.01)
"""


def test_calibrate_synthetic_writes_a_model_without_inputs(tmp_path, monkeypatch):
    """A model driven by its start state alone (no inputs) gets its telemetry; it crashed on an empty input stack."""
    import numpy as np
    import pyarrow.parquet as pq

    (tmp_path / "cli_decay.py").write_text(NO_INPUT_MODEL)
    monkeypatch.chdir(tmp_path)
    made = CliRunner().invoke(app, ["calibrate", "synthetic", "cli_decay:DECAY", "--out", "d.parquet", "--steps", "101",
                                    "--param", "k=0.7"])
    assert made.exit_code == 0, made.output
    assert re.search(r"^inputs: none$", made.output, re.M), made.output
    table = pq.read_table(tmp_path / "d.parquet")
    assert table.column_names == ["t_s", "v"]
    np.testing.assert_allclose(table["v"].to_numpy()[-1], 10.0 * np.exp(-0.7), rtol=1e-6)  # v(1 s), no noise asked


def test_calibrate_synthetic_refuses_an_fmu_saying_how_to_make_its_data(tmp_path, reference_fmus):
    from raytwin.fmu import store_fmu

    url = store_fmu(reference_fmus[(2, "VanDerPol")], str(tmp_path / "registry")).url
    result = CliRunner().invoke(app, ["calibrate", "synthetic", url, "--out", str(tmp_path / "v.parquet")])
    assert result.exit_code == 2, result.output
    assert "is an FMU: this command integrates a JAX model's equations" in _said(result), result.output
    assert "Traceback" not in result.output and not (tmp_path / "v.parquet").exists()


@pytest.mark.parametrize("args, reason", [
    (["--param", "kk=1"], "Invalid value for --param: unknown name(s) ['kk']; two_tank has ['a1_tank', "),
    (["--noise", "y=0.1"], "Invalid value for --noise: unknown name(s) ['y']; two_tank has ['h1', 'h2']"),
    (["--noise", "h1=-1"], "Invalid value for --noise: {'h1': -1.0}: values must be finite numbers >= 0"),
    (["--dt", "0"], "Invalid value for --dt: 0.0 is not a finite number of seconds > 0"),  # was replaced by 1 s
    (["--dt", "-1"], "Invalid value for --dt: -1.0 is not a finite number of seconds > 0"),
    (["--steps", "0"], "'--steps': Input should be greater than or equal to 3"),
    (["--param", "cd=5"], "Invalid value for --param: cd=5 is outside its bounds [0.1, 1]: give values within them"),
    (["--out", "missing/s.parquet"], "Invalid value for --out: cannot write missing/s.parquet"),
])
def test_calibrate_synthetic_refuses_bad_arguments_in_one_line(tmp_path, monkeypatch, args, reason):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["calibrate", "synthetic", "two_tank", "--out", "s.parquet", *args])
    assert result.exit_code == 2 and reason in _said(result), result.output
    assert not (tmp_path / "s.parquet").exists()


def _spec_file(tmp_path, **spec) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"horizon_s": 500.0, "step_s": 1.0, **spec}))
    return str(path)


def test_sweep_run_refuses_an_absurd_size_up_front_saying_what_it_would_write(tmp_path):
    """10^12 scenarios were accepted and wrote 30 MB/s towards ~100 TB until the disk filled."""
    dims = [{"name": "a1", "target": "param", "mode": "scale", "low": 0.9, "high": 1.1}]
    runs = str(tmp_path / "runs")
    small = _spec_file(tmp_path, model="two_tank", space={"method": "lhs", "n": 3, "dimensions": dims})
    result = CliRunner().invoke(app, ["sweep", "run", small, "--runs", runs, "--max-scenarios", "2"])
    assert result.exit_code == 2 and "3 scenarios of 500 steps would write about" in _said(result), result.output
    assert "more than --max-scenarios 2; pass --max-scenarios 3 to run it" in _said(result)
    huge = _spec_file(tmp_path, model="two_tank", space={"method": "random", "n": 10**12, "dimensions": dims})
    result = CliRunner().invoke(app, ["sweep", "run", huge, "--runs", runs])
    assert result.exit_code == 2, result.output
    assert "1,000,000,000,000 scenarios of 500 steps would write about " in _said(result)
    assert " TB (" in _said(result) and "scenario-steps: more than --max-scenarios 100,000,000 and --max-work 10,000,000,000" \
        in _said(result)
    assert not (tmp_path / "runs").exists()


def test_sweep_run_says_a_slow_sweeps_rate_as_it_was(tmp_path, monkeypatch):
    """8 scenarios in 20.6 s printed "(0/s)" (and recorded 0.4): a slow sweep's rate has 3 significant digits."""
    from types import SimpleNamespace

    import sweeps.runner
    import sweeps.runs
    from sweeps.runs import RunStore

    monkeypatch.setattr(sweeps.runner, "ensure_ray", lambda: None)  # the sweep itself is replaced: no Ray needed
    monkeypatch.setattr(sweeps.runs, "run_sweep", lambda *args, **kwargs: SimpleNamespace(
        outputs={}, n_scenarios=8, n_diverged=0, n_chunks=1, elapsed_s=20.57, scenarios_per_s=8 / 20.57,
        platforms=["cpu"]))
    dims = [{"name": "a1", "target": "param", "mode": "scale", "low": 0.9, "high": 1.1}]
    runs = str(tmp_path / "runs")
    spec = _spec_file(tmp_path, model="two_tank", space={"method": "lhs", "n": 8, "dimensions": dims})
    result = CliRunner().invoke(app, ["sweep", "run", spec, "--runs", runs])
    assert result.exit_code == 0, result.output
    assert "8 scenarios in 20.57 s (0.389/s)" in result.output
    [record] = RunStore(runs).list()
    assert record.summary["scenarios_per_s"] == 0.389


def test_a_local_ray_that_times_out_starting_is_one_line_for_a_sweep_too(tmp_path, monkeypatch):
    """On a loaded machine `raytwin sweep run` and `calibrate run` printed Ray's bare start timeout as a ~60-line
    traceback; `raytwin serve` said it in one line (tests/test_serve_units.py), and so do they now."""
    import sweeps.runner

    def timed_out() -> None:
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(sweeps.runner, "ensure_ray", timed_out)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    dims = [{"name": "a1", "target": "param", "mode": "scale", "low": 0.9, "high": 1.1}]
    spec = _spec_file(tmp_path, model="two_tank", space={"method": "lhs", "n": 2, "dimensions": dims})
    result = CliRunner().invoke(app, ["sweep", "run", spec, "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: the local Ray did not start: The current node timed out during startup.")
    assert "probably loaded" in result.output and "RAY_ADDRESS=auto" in result.output
    assert not list((tmp_path / "runs").glob("*/run.json"))  # nothing ran, nothing recorded


def test_a_rerun_whose_local_ray_times_out_starting_is_one_line(tmp_path, monkeypatch):
    """`raytwin rerun` printed Ray's start timeout as a traceback after `sweep run` and `calibrate run` said it in one
    line; a run id that is not recorded is still said without starting Ray."""
    import sweeps.runner
    from tests.fixtures_serve import saved_run

    def timed_out() -> None:
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(sweeps.runner, "ensure_ray", timed_out)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    saved_run(tmp_path / "runs", "calibration-1", {"fit.json": b"{}"})
    result = CliRunner().invoke(app, ["rerun", "calibration-1", "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: the local Ray did not start: The current node timed out during startup.")
    missing = CliRunner().invoke(app, ["rerun", "calibration-2", "--runs", str(tmp_path / "runs")])
    assert missing.exit_code == 2 and "calibration-2" in _said(missing) and "did not start" not in missing.output


def test_sweep_run_refuses_more_scenario_steps_than_max_work_up_front(tmp_path):
    """1,000 scenarios x 1e7 steps ran 88 s with no estimate: the scenario count alone passed the guard."""
    dims = [{"name": "a1", "target": "param", "mode": "scale", "low": 0.9, "high": 1.1}]
    runs = str(tmp_path / "runs")
    spec = _spec_file(tmp_path, model="two_tank", space={"method": "lhs", "n": 4, "dimensions": dims})
    result = CliRunner().invoke(app, ["sweep", "run", spec, "--runs", runs, "--max-work", "1999"])
    assert result.exit_code == 2, result.output
    assert "4 scenarios of 500 steps would write about" in _said(result)
    assert "compute 2e+03 scenario-steps: more than --max-work 1,999; pass --max-work 2000 to run it" in _said(result)
    assert "--max-scenarios" not in _said(result)
    assert not (tmp_path / "runs").exists()


def test_sweep_run_of_a_registry_model_refuses_spec_mistakes_in_one_line_before_recording(tmp_path):
    """As for a built-in simulator's spec (checked on load); they were tracebacks and failed run records."""
    from raytwin.contracts import AssetType
    from raytwin.registry import ModelRegistry
    from raytwin.sim import TWO_TANK

    registry = str(tmp_path / "registry")
    ModelRegistry(registry).register("tank", "1.0.0", AssetType.from_model(TWO_TANK, name="tank"))
    space = {"method": "lhs", "n": 3, "dimensions": [{"name": "nope", "target": "param", "low": 1.0, "high": 2.0}]}
    for model, reason in (("tank@1.0.0", "sweep over two_tank: dimension param.nope: unknown; known params: "),
                          ("tank@9.9.9", "no model tank@9.9.9 in this registry; versions: ['1.0.0']")):
        spec = _spec_file(tmp_path, model=model, registry_url=registry, space=space)
        result = CliRunner().invoke(app, ["sweep", "run", spec, "--runs", str(tmp_path / "runs")])
        assert result.exit_code == 2 and reason in _said(result), result.output
    assert not (tmp_path / "runs").exists()


def test_calibrate_run_with_missing_telemetry_says_so_in_one_line(ray_session, tmp_path):
    spec = tmp_path / "calib.yaml"
    spec.write_text(json.dumps({"model": "two_tank", "telemetry": str(tmp_path / "nope.parquet"),
                                "start_state": {"h1": 0.3, "h2": 0.3}, "free": ["a1"]}))
    result = CliRunner().invoke(app, ["calibrate", "run", str(spec), "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 2 and f"cannot read telemetry {tmp_path / 'nope.parquet'}: " in _said(result), \
        result.output


def test_a_calibration_given_a_relative_path_reruns_from_anywhere_and_a_lost_input_is_one_line(
        ray_session, tmp_path, monkeypatch):
    """The record kept `zone-17.parquet` as given: `raytwin rerun` from another directory failed with a 69-line
    traceback. And a fit published with `register_as` says so: the command printed nothing of the version it
    registered. (The fit itself is the cheapest the spec allows, one window, one trial and the least-squares
    uncertainty: what is checked is where its paths and its registration go.)"""
    import pyarrow.parquet as pq

    from raytwin.registry import ModelRegistry
    from sweeps.synthetic import synthetic_telemetry

    work = tmp_path / "work"
    work.mkdir()
    pq.write_table(synthetic_telemetry("two_tank", {"a1": 5.6e-5}, {"h1": 0.3, "h2": 0.3}, 300, 1.0,
                                       {"h1": 1e-3, "h2": 1e-3}, seed=1), work / "tank.parquet")
    registry = str(tmp_path / "registry")
    (work / "calib.yaml").write_text(json.dumps({"model": "two_tank", "telemetry": "tank.parquet", "num_samples": 1,
                                                 "windows": 1, "scheduler": "fifo", "uncertainty": "least_squares",
                                                 "start_state": {"h1": 0.3, "h2": 0.3}, "free": ["a1"],
                                                 "registry_url": registry, "register_as": "tank-fit@1.0.0",
                                                 "registered_by": "key-fitter"}))
    monkeypatch.chdir(work)
    result = CliRunner().invoke(app, ["calibrate", "run", "calib.yaml", "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert (f"registered tank-fit@1.0.0 in {registry} with the fitted parameters (published_by key-fitter, "
            "unverified)") in result.output and ModelRegistry(registry).versions("tank-fit") == ["1.0.0"]
    run_id = result.output.split()[1].rstrip(":")
    record = json.loads((tmp_path / "runs" / run_id / "run.json").read_text())
    assert record["spec"]["telemetry"] == str(work / "tank.parquet")
    monkeypatch.chdir(tmp_path)
    (work / "tank.parquet").rename(tmp_path / "moved.parquet")
    result = CliRunner().invoke(app, ["rerun", run_id, "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 2 and f"{run_id}: cannot read telemetry" in _said(result), result.output
    assert "Traceback" not in result.output


def test_sweep_run_says_why_a_spec_is_refused_in_one_plain_line(tmp_path):
    """Not pydantic's "<root>: Value error, ..." : the reason, after the file it is in."""
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"model": "thermal_rc", "inputs": {"setpont": 293.15}, "horizon_s": 3600.0,
                                "step_s": 60.0, "space": {"method": "grid", "dimensions": [
                                    {"name": "C_in", "target": "param", "mode": "scale", "values": [1.0]}]}}))
    result = CliRunner().invoke(app, ["sweep", "run", str(path), "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 2
    said = _said(result)
    assert "spec.json: sweep over thermal_rc: unknown input name(s) ['setpont']; known: [" in said
    assert "Value error" not in said and "<root>" not in said


def test_a_store_outage_is_one_line_and_exit_75_not_a_traceback(tmp_path, monkeypatch, capsys):
    """`raytwin registry status` while the registry's store fails every read (EIO): a traceback of the storage
    layer's frames, before; now one line saying that the store failed, and `EX_TEMPFAIL` so that scripts retry."""
    import errno

    from fsspec.implementations.local import LocalFileSystem

    from raytwin import cli

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    for method in ("open", "cat_file", "ls", "info", "exists"):
        monkeypatch.setattr(LocalFileSystem, method, failing)
    monkeypatch.setattr(sys, "argv", ["raytwin", "registry", "status", "zone", "--registry", str(tmp_path / "reg")])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    said = capsys.readouterr().err
    assert exited.value.code == cli.EX_TEMPFAIL, said
    assert said.startswith("raytwin: the store failed a read (io: ") and said.count("\n") == 1, said
    assert "Traceback" not in said


def test_models_show_and_check_an_fmu_by_its_stored_url(reference_fmus, tmp_path):
    """Both refused a stored FMU ("is a FmuModel, not a raytwin Model"): `show` lists its variables with units,
    `check` runs the probe registration runs (finite values inside the declared ranges)."""
    from raytwin.fmu import store_fmu

    url = store_fmu(reference_fmus[(3, "VanDerPol")], str(tmp_path / "models")).url
    shown = CliRunner().invoke(app, ["models", "show", url])
    assert shown.exit_code == 0, shown.output
    assert "(FMI 3.0, " in shown.output and "states:\n  x0 [" in shown.output
    assert "params:\n  mu [" in shown.output
    checked = CliRunner().invoke(app, ["models", "check", url])
    assert checked.exit_code == 0, checked.output
    assert "probe run: 10 steps" in checked.output and "finite, within the declared ranges" in checked.output
