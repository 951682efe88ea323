"""FMUs through fmpy, on the Modelica Association's Reference FMUs built from source (FMI 2.0 and 3.0).

The build fixture fails (never skips) without CMake or the sources: CI has both.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import re
import tempfile
import zipfile

import jax.numpy as jnp
import fmpy
import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from benchmarks.fmu import VAN_DER_POL  # a JAX Van der Pol written from the equations
from raytwin.fmu import (
    INSTANTIATIONS, FmuError, FmuInstance, FmuModel, FmuScenario, FmuStepper, calibrate_fmu, run_fmu_sweep,
    run_scenarios, store_fmu,
)
from raytwin.fmu.describe import FmuCacheFull
from raytwin.fmu.instance import discard_instance
from raytwin.fmu.reference import build_reference_fmus, default_source
from raytwin.modelcode import code_identity
from raytwin.sim import Output, get_model, simulate
from raytwin.store_failures import StoreIOError
from serve_apps.store_errors import store_failure
from tests.conftest import REFERENCE_FMU_MODELS

VERSIONS = tuple(REFERENCE_FMU_MODELS)  # the session fixture `reference_fmus` (tests/conftest.py) builds these


def reference_output(model: str) -> np.ndarray:
    return np.genfromtxt(default_source() / model / f"{model}_out.csv", delimiter=",", names=True)


def test_the_build_fails_clearly_without_the_sources(tmp_path):
    with pytest.raises(FmuError, match="cannot build the reference FMUs: no sources at"):
        build_reference_fmus(tmp_path, 2, ("VanDerPol",), source=tmp_path / "nowhere")


# ---- describe ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_describe_maps_variables_to_raytwin_declarations(reference_fmus, version):
    path = reference_fmus[(version, "VanDerPol")]
    model = FmuModel.load(path)
    assert model.fmi_version == f"{version}.0"
    assert model.state_names == ("x0", "x1") and model.output_names == ("x0", "x1")
    assert model.param_names == ("mu",) and model.input_names == ()
    assert [s.nominal for s in model.states] == [2.0, 0.0] and model.default_params() == {"mu": 1.0}
    assert model.default_dt == 0.01 and model.can_get_set_state
    assert set(model.interfaces) == {"CoSimulation", "ModelExchange"}
    with open(path, "rb") as f:
        assert model.fmu_hash == hashlib.sha256(f.read()).hexdigest()
    feed = FmuModel.load(reference_fmus[(version, "Feedthrough")])  # inputs and parameters, bounds absent
    assert "Float64_continuous_input" in feed.input_names and "Float64_tunable_parameter" in feed.param_names


def test_declarations_an_fmu_lacks_are_added_by_name(reference_fmus):
    model = FmuModel.load(reference_fmus[(2, "VanDerPol")])
    tracked = model.declare(x0={"prior_std": 0.1, "process_std": 0.01, "measurement_std": 0.02, "upper": 3.0})
    assert (tracked.states[0].prior_std, tracked.states[0].process_std, tracked.states[0].upper) == (0.1, 0.01, 3.0)
    assert (tracked.outputs[0].measurement_std, tracked.outputs[0].upper) == (0.02, 3.0)
    assert tracked.states[1] == model.states[1] and tracked.fmu_hash == model.fmu_hash
    bounded = model.declare(mu={"lower": 0.1, "upper": 5.0})  # an asset type needs finite parameter bounds
    assert (bounded.params[0].lower, bounded.params[0].upper, bounded.params[0].default) == (0.1, 5.0, 1.0)
    with pytest.raises(FmuError, match="has no state, input, output or parameter 'k'"):
        model.declare(k={"prior_std": 1.0})
    with pytest.raises(FmuError, match="mu has no field 'prior_std'"):
        model.declare(mu={"prior_std": 1.0})
    with pytest.raises(FmuError, match="x1 has no field 'std'"):
        model.declare(x1={"std": 1.0})
    with pytest.raises(FmuError, match="prior_std must be a finite number > 0"):
        model.declare(x1={"prior_std": -1.0})


def test_an_fmu_unit_raytwin_does_not_know_is_refused_naming_the_variable(reference_fmus, monkeypatch):
    from raytwin import units

    monkeypatch.delitem(units.SYMBOLS, "m")  # BouncingBall's h is in m, v in m/s
    units._resolve.cache_clear()  # what was resolved with the metre
    with pytest.raises(FmuError, match=r"BouncingBall.fmu: variable h: unit 'm' is unknown to RayTwin .*'m' is not "
                                       r"a known symbol.* raytwin.units.define"):
        FmuModel.load(reference_fmus[(2, "BouncingBall")])


def test_an_fmu_without_a_binary_for_this_platform_is_refused_naming_the_platforms(reference_fmus, tmp_path):
    """An FMU exported for macOS only loaded (its description is portable) and its first run failed with fmpy's
    "Cannot find shared library /tmp/raytwin-fmu-.../binaries/linux64/...", naming neither the FMU nor the fix."""
    darwin = tmp_path / "BouncingBall.fmu"
    with zipfile.ZipFile(reference_fmus[(2, "BouncingBall")]) as src, zipfile.ZipFile(darwin, "w") as dst:
        for item in src.infolist():
            if not item.filename.startswith("sources/"):
                name = item.filename.replace(f"binaries/{fmpy.platform}/", "binaries/darwin64/")
                dst.writestr(name.replace(".so", ".dylib"), src.read(item))
    model = FmuModel.load(darwin)
    with pytest.raises(FmuError, match=rf"^FMU BouncingBall has no binary for this machine's platform {fmpy.platform} "
                                       rf"\(it has: darwin64\): export it again for {fmpy.platform}$"):
        FmuInstance(model, "CoSimulation")


def test_an_fmu_with_array_variables_is_refused(reference_fmus):
    with pytest.raises(FmuError, match="StateSpace.fmu: variable A is an array .* scalar variables only"):
        FmuModel.load(reference_fmus[(3, "StateSpace")])


@pytest.mark.parametrize("step", ["0", "-0.01"])
def test_an_fmu_whose_default_step_is_not_positive_is_refused_at_load(reference_fmus, monkeypatch, step):
    import fmpy

    read = fmpy.read_model_description

    def with_step(*args, **kwargs):
        md = read(*args, **kwargs)
        md.defaultExperiment.stepSize = step
        return md

    monkeypatch.setattr(fmpy, "read_model_description", with_step)
    with pytest.raises(FmuError, match=f"^FMU VanDerPol.fmu: DefaultExperiment stepSize {float(step):g} must be a "
                                       "finite number of seconds > 0; fix it in the FMU's modelDescription.xml$"):
        FmuModel.load(reference_fmus[(2, "VanDerPol")])


@pytest.fixture
def remote_fmu(tmp_path, monkeypatch):
    """A remote FMU's URL (fsspec's in-memory filesystem; any bytes: nothing opens them) and the folder it is
    downloaded into (the machine's temporary directory is `tmp_path`)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    memory = fsspec.filesystem("memory")
    path = f"/{tmp_path.name}/fmus/{hashlib.sha256(b'an FMU').hexdigest()}.fmu"  # as `store_fmu` names it
    memory.pipe_file(path, b"an FMU")
    yield f"memory://{path.lstrip('/')}", tmp_path / "raytwin-fmu"
    memory.rm(f"/{tmp_path.name}", recursive=True)


@pytest.mark.parametrize("load", [FmuModel.load, get_model], ids=["load", "get_model"])
def test_a_full_local_disk_downloading_an_fmu_is_no_store_outage(remote_fmu, monkeypatch, load):
    """The download's write filling the machine's own disk raised the store's `disk_full` (a 503 sending the
    operator to free the store's disk; `get_model`: an unknown simulator): it names the local folder and what to
    free or set, and leaves no part."""
    url, cache = remote_fmu
    cache.mkdir()
    part = cache / "download.part"
    part.symlink_to("/dev/full")  # every write fails as on a full disk: ENOSPC
    monkeypatch.setattr(tempfile, "mkstemp", lambda **_: (os.open(part, os.O_WRONLY), str(part)))
    with pytest.raises(FmuCacheFull, match=f"no space left in {cache} to download FMU {url}: free space there, or "
                                           "set TMPDIR to a directory with room") as raised:
        load(url)
    assert raised.value.errno == errno.ENOSPC and store_failure(raised.value) is None
    assert not list(cache.iterdir())


@pytest.mark.parametrize("load", [FmuModel.load, get_model], ids=["load", "get_model"])
def test_the_store_failing_an_fmu_download_is_a_store_outage(remote_fmu, monkeypatch, load):
    """`get_model` answered it as an unknown simulator (a `ValueError`: the caller's fault)."""
    url, cache = remote_fmu

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(MemoryFileSystem, "_open", fail)
    with pytest.raises(StoreIOError) as raised:
        load(url)
    assert (raised.value.operation, raised.value.error) == ("read", "io") and not list(cache.iterdir())


def test_a_full_local_disk_extracting_an_fmu_is_the_operators_and_leaves_no_folder(reference_fmus, tmp_path,
                                                                                     monkeypatch):
    """`fmpy.extract` filling the machine's temporary directory raised a plain OSError and left its half-extracted
    folder there; a probe run answered it as the FMU failing (a bad model) and a sweep as its scenarios failing."""
    model = FmuModel.load(reference_fmus[(2, "VanDerPol")])  # a local file: nothing is downloaded
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    write = zipfile.ZipFile._extract_member

    def full(self, *args):
        write(self, *args)  # a file written: the folder is half-extracted when the disk fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(zipfile.ZipFile, "_extract_member", full)
    discard_instance(model, "CoSimulation")  # one an earlier test cached would not be extracted again
    for attempt in (lambda: FmuInstance(model), lambda: model.check_registration([1.0]),
                    lambda: run_scenarios(model, [FmuScenario(3)])):
        with pytest.raises(FmuCacheFull, match=re.escape(f"no space left in {tmp_path} to extract FMU {model.name} "
                                                         f"({model.url}): free space there, or set TMPDIR")) as raised:
            attempt()
        assert raised.value.errno == errno.ENOSPC and store_failure(raised.value) is None
        assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_zip_is_not_an_fmu(tmp_path):
    path = tmp_path / "pump.fmu"
    path.write_text("not a zip")
    with pytest.raises(FmuError, match=f"^FMU pump.fmu: not an FMU: {path} is not a zip archive"):
        FmuModel.load(path)


FMI1_DESCRIPTION = """<?xml version="1.0" encoding="UTF-8"?>
<fmiModelDescription fmiVersion="1.0" modelName="decay" modelIdentifier="decay"
                     guid="{8c4e810f-3df3-4a00-8276-176fa3c9f000}" numberOfContinuousStates="1"
                     numberOfEventIndicators="0">
  <ModelVariables>
    <ScalarVariable name="x" valueReference="0" causality="output"><Real start="1"/></ScalarVariable>
    <ScalarVariable name="der(x)" valueReference="1"><Real derivative="1"/></ScalarVariable>
  </ModelVariables>
  <Implementation><CoSimulation_StandAlone><Capabilities/></CoSimulation_StandAlone></Implementation>
</fmiModelDescription>"""


def test_an_fmi_1_fmu_and_a_zip_without_a_model_description_are_refused_saying_why(tmp_path):
    """An FMI 1.0 FMU loaded without its state (FMI 1.0 has no ModelStructure) and its runs called FMI 2.0's
    functions; a zip without modelDescription.xml raised zipfile's KeyError."""
    for name, members in (("decay.fmu", {"modelDescription.xml": FMI1_DESCRIPTION}),
                          ("pump.fmu", {"binaries/linux64/pump.so": ""})):
        with zipfile.ZipFile(tmp_path / name, "w") as archive:
            for member, text in members.items():
                archive.writestr(member, text)
    with pytest.raises(FmuError, match=r"^FMU decay.fmu: FMI 1.0 is not supported: RayTwin runs FMI 2.0 and 3.0 "
                                       r"FMUs; export it again as FMI 2.0 or 3.0$"):
        FmuModel.load(tmp_path / "decay.fmu")
    with pytest.raises(FmuError, match=r"^FMU pump.fmu: not an FMU: .*pump.fmu has no modelDescription.xml at the "
                                       r"root of its zip archive$"):
        FmuModel.load(tmp_path / "pump.fmu")


def test_the_fmu_file_is_stored_content_hashed(reference_fmus, tmp_path, s3_url):
    path = reference_fmus[(2, "VanDerPol")]
    for where in (str(tmp_path / "store"), s3_url):
        stored = store_fmu(path, where)
        assert stored.url.endswith(f"fmus/{stored.fmu_hash}.fmu")
        assert store_fmu(path, where) == stored  # idempotent
        assert FmuInstance(stored).run(FmuScenario(3)).shape == (4, 2)  # runs from the stored copy
    identity = code_identity(stored)  # what the registry pins for an FMU model
    assert (identity.kind, identity.sha256) == ("file", stored.fmu_hash)
    other = reference_fmus[(3, "VanDerPol")]
    with pytest.raises(FmuError, match="has SHA-256 .* expected .*: the file changed"):
        FmuModel.load(other, expected_hash=stored.fmu_hash)
    with pytest.raises(FmuError, match="no FMU file at"):
        FmuModel.load(tmp_path / "missing.fmu")


def test_an_asset_type_of_an_fmu_without_parameter_bounds_names_them_and_how_to_declare_them(reference_fmus, tmp_path):
    """BouncingBall's g has no min/max: pydantic's "validation errors for ParameterSpec" named neither g nor the fix."""
    from raytwin.contracts import AssetType

    stored = store_fmu(reference_fmus[(2, "BouncingBall")], str(tmp_path))
    with pytest.raises(ValueError, match=r"^BouncingBall: parameters without the finite bounds an asset type needs: "
                                         r"g \[-inf, inf\]; give them with "
                                         r"`\.declare\(g=\{\"lower\": \.\.\., \"upper\": \.\.\.\}\)` before"):
        AssetType.from_model(stored, name="ball", version="1.0.0")
    declared = AssetType.from_model(stored.declare(g={"lower": -20.0, "upper": -1.0}), name="ball", version="1.0.0")
    assert (declared.parameters["g"].lower, declared.parameters["g"].upper) == (-20.0, -1.0)


# ---- simulation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["VanDerPol", "Dahlquist"])
def test_co_simulation_reproduces_the_reference_outputs(reference_fmus, version, name):
    ref = reference_output(name)
    model = FmuModel.load(reference_fmus[(version, name)])
    instance = FmuInstance(model)
    scenario = FmuScenario(n_steps=len(ref) - 1, dt=float(ref["time"][1]))
    for _ in range(2):  # the second run is on the same instance after a reset
        y = instance.run(scenario)
        for j, out in enumerate(model.output_names):
            np.testing.assert_allclose(y[:, j], ref[out], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_jax_van_der_pol_agrees_with_the_fmu(reference_fmus, version):
    """Model exchange integrates the FMU's equations with CVode (rtol 1e-8); RK4 at 0.01 in float64
    is accurate to ~1e-8 here, so both are the same trajectory. (The co-simulation FMU steps with
    explicit Euler at 0.01: its phase drifts by ~0.4 over 10 s, which is what its reference output says.)"""
    model = FmuModel.load(reference_fmus[(version, "VanDerPol")])
    n, dt = 1000, 0.01
    for mu in (0.5, 1.5):
        jax_traj = simulate(VAN_DER_POL, [2.0, 0.0], np.zeros((n, 0)), [mu], dt, dtype=jnp.float64)
        me = FmuInstance(model, "ModelExchange").run(FmuScenario(n, dt, params={"mu": mu}))
        np.testing.assert_allclose(me, jax_traj, atol=2e-5)


@pytest.mark.parametrize("interface", ["CoSimulation", "ModelExchange"])
def test_inputs_are_held_over_each_step(reference_fmus, interface):
    model = FmuModel.load(reference_fmus[(3, "Feedthrough")])
    u = np.array([1.0, -2.0, 3.5, 0.25])
    y = FmuInstance(model, interface).run(FmuScenario(4, 0.5, inputs={"Float64_continuous_input": u}),
                                          ("Float64_continuous_output",))
    np.testing.assert_array_equal(y[:, 0], [*u, u[-1]])
    if interface == "CoSimulation":  # Float32 variables through FMI 3.0's Float32 calls (Float64 ones fail there)
        both = {"Float64_continuous_input": u, "Float32_continuous_input": -u}
        y = FmuInstance(model, interface).run(FmuScenario(4, 0.5, inputs=both),
                                              ("Float32_continuous_output", "Float64_continuous_output"))
        np.testing.assert_array_equal(y, np.column_stack([[*-u, -u[-1]], [*u, u[-1]]]))


def test_bad_scenarios_are_refused_with_their_reason(reference_fmus):
    model = FmuModel.load(reference_fmus[(2, "Feedthrough")])
    instance = FmuInstance(model)
    with pytest.raises(FmuError, match=r"has no parameter\(s\) \['gain'\]"):
        instance.run(FmuScenario(3, params={"gain": 2.0}))
    with pytest.raises(FmuError, match=r"has no output or state \['Float64_fixed_parameter'\]"):
        instance.run(FmuScenario(3), ("Float64_fixed_parameter",))
    with pytest.raises(FmuError, match="input Float64_continuous_input needs 3 values, got shape"):
        instance.run(FmuScenario(3, inputs={"Float64_continuous_input": np.zeros(2)}))
    with pytest.raises(FmuError, match="^scenario: input Float64_continuous_input is nan at step 1; inputs must be "
                                       "finite numbers$"):  # not "... = nan at step 1 ...: the run diverged"
        instance.run(FmuScenario(3, inputs={"Float64_continuous_input": np.array([1.0, np.nan, 2.0])}))
    with pytest.raises(FmuError, match=r"^scenario: give input values by name, \{name: value\} \(an input: \{name: "
                                       r"one value per step\}\), not a ndarray; Feedthrough's: \['Float64_continuous_"):
        instance.run(FmuScenario(3, inputs=np.zeros((3, 1))))  # as `simulate` takes them: was "unhashable type"
    with pytest.raises(FmuError, match="^scenario: parameter Float64_tunable_parameter is nan; parameters must be "
                                       "finite numbers$"):  # was run, and reported as the FMU diverging
        instance.run(FmuScenario(3, params={"Float64_tunable_parameter": np.nan}))
    with pytest.raises(FmuError, match=r"does not provide ModelExchange; it provides \['CoSimulation'\]"):
        FmuInstance(dataclasses.replace(model, interfaces=("CoSimulation",)), "ModelExchange")


def test_a_diverging_scenario_is_reported_and_the_next_one_runs(reference_fmus):
    model = FmuModel.load(reference_fmus[(2, "VanDerPol")])
    discard_instance(model, "CoSimulation")  # whatever an earlier test left cached (a registration probes the FMU)
    before = INSTANTIATIONS[model.fmu_hash]
    results = run_scenarios(model, [FmuScenario(300, params={"mu": 1e6}), FmuScenario(300)])
    (bad, reason), (good, ok) = results
    assert bad is None and "is non-finite or outside its range [-inf, inf]: the run diverged" in reason
    assert ok is None and np.all(np.isfinite(good))
    assert INSTANTIATIONS[model.fmu_hash] - before == 2  # the first run's instance, and its replacement after it failed
    bounded = dataclasses.replace(model, outputs=(Output("x0", "-", lower=-1.5, upper=2.5), model.outputs[1]))
    with pytest.raises(FmuError, match=r"x0 = -1.50\d* at step \d+ is non-finite or outside its range \[-1.5, 2.5\]"):
        FmuInstance(bounded).run(FmuScenario(300))


# ---- Ray: sweep and calibration ------------------------------------------------------------------
def test_a_sweep_on_ray_tasks_reuses_one_instance_per_worker(ray_session, reference_fmus):
    model = FmuModel.load(reference_fmus[(2, "VanDerPol")])
    mus = np.linspace(0.2, 3.0, 64)
    scenarios = [FmuScenario(500, 0.01, params={"mu": float(mu)}) for mu in mus]
    result = run_fmu_sweep(model, scenarios, chunk_size=8, keep_outputs=False)
    assert result.failed == [] and len(result.errors) == 64
    assert result.instantiations and set(result.instantiations.values()) == {1}  # 8 tasks, one instance each worker
    local = run_scenarios(model, [scenarios[0], scenarios[-1]])
    for i, (y, _) in zip((0, 63), local):
        assert result.metrics["x0_final"][i] == y[-1, 0] and result.metrics["x1_max"][i] == y[:, 1].max()


def test_an_interrupted_fmu_sweep_cancels_its_tasks(ray_session, reference_fmus, monkeypatch, cancelled_tasks):
    """Ctrl-C or SIGTERM in the wait cancels every chunk task: they ran on until the driver exited, long after
    the run was recorded cancelled."""
    import ray

    def interrupted_get(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "get", interrupted_get)
    model = FmuModel.load(reference_fmus[(2, "VanDerPol")])
    with pytest.raises(KeyboardInterrupt):
        run_fmu_sweep(model, [FmuScenario(500, 0.01)] * 6, chunk_size=2)
    assert len(cancelled_tasks) == 3  # every chunk


def test_calibration_recovers_mu_from_fmu_output(ray_session, reference_fmus, capsys):
    """And prints nothing: Tune's table and its "View detailed results here:" a removed temporary folder were
    printed into `raytwin calibrate run`'s answer (`raytwin.tune_output`)."""
    model = FmuModel.load(reference_fmus[(3, "VanDerPol")])
    scenario = FmuScenario(400, 0.02)
    truth = FmuInstance(model).run(FmuScenario(400, 0.02, params={"mu": 1.7}))
    rng = np.random.default_rng(0)
    observed = {"x0": truth[:, 0] + rng.normal(0, 0.01, len(truth))}
    fit = calibrate_fmu(model, scenario, observed, {"mu": (0.3, 4.0)}, num_samples=2, seed=1)
    assert fit.params["mu"] == pytest.approx(1.7, rel=0.02)
    assert fit.trials == 2 and fit.loss < 2e-4 and fit.platforms == [fmpy.platform]
    assert capsys.readouterr().out == ""
    with pytest.raises(FmuError, match=r"no parameter\(s\) \['k'\]"):
        calibrate_fmu(model, scenario, observed, {"k": (0.1, 1.0)})


# ---- the step adapter for filters ---------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_the_stepper_steps_like_the_fmus_own_simulation(reference_fmus, version):
    model = FmuModel.load(reference_fmus[(version, "VanDerPol")])
    stepper = FmuStepper(model)
    p, dt = np.array([1.2]), 0.1
    x = np.array([1.5, -0.5])
    path = [x]
    for _ in range(30):
        path.append(stepper.step(path[-1], np.zeros(0), p, dt))
    own = FmuInstance(model).run(FmuScenario(30, dt, start={"x0": 1.5, "x1": -0.5}, params={"mu": 1.2}))
    np.testing.assert_allclose(np.array(path), own, rtol=1e-12, atol=1e-12)
    sigma = np.array([[1.5, -0.5], [0.1, 0.2]])
    np.testing.assert_array_equal(stepper.step(sigma, [], p, dt)[0], path[1])
    np.testing.assert_array_equal(stepper.observe(sigma, [], p), sigma)  # outputs are the states
    with pytest.raises(FmuError, match=r"x needs 2 values \['x0', 'x1'\], got shape \(3,\)"):
        stepper.step(np.zeros(3), [], p, dt)


@pytest.mark.parametrize("version", VERSIONS)
def test_steps_shorter_than_the_fmus_own_follow_its_trajectory(reference_fmus, version, caplog):
    """The Reference FMUs take no step shorter than theirs (0.01 s): a twin fed events 0.015 s apart (sub-steps
    of 0.0075 s) predicted nothing and its estimate copied the measurements. The stepper interpolates between
    the FMU's own steps: 40 sub-steps of 0.0075 s land where solve_ivp does at 0.3 s, as near as the FMU's
    own forward Euler at 0.01 s (30 steps) does."""
    from scipy.integrate import solve_ivp

    model = FmuModel.load(reference_fmus[(version, "VanDerPol")])
    stepper, x0, p = FmuStepper(model), np.array([1.5, -0.5]), np.array([1.2])
    with caplog.at_level("INFO", logger="raytwin.fmu"):
        x = x0
        for _ in range(40):
            x = stepper.step(x, [], p, 0.0075)
    fmu_own = FmuInstance(model).run(FmuScenario(30, 0.01, start={"x0": 1.5, "x1": -0.5}, params={"mu": 1.2}))[-1]
    exact = solve_ivp(lambda _, s: [s[1], 1.2 * (1 - s[0] ** 2) * s[1] - s[0]], (0, 0.3), x0, rtol=1e-12,
                      atol=1e-12).y[:, -1]
    assert np.linalg.norm(exact - x0) > 0.1  # it moved
    own_error = np.linalg.norm(fmu_own - exact)
    assert np.linalg.norm(x - fmu_own) < own_error  # within the FMU's own discretisation error
    assert np.linalg.norm(x - exact) < 2 * own_error
    np.testing.assert_array_equal(stepper.step(np.stack([x0, x0]), [], p, 0.0075)[1], stepper.step(x0, [], p, 0.0075))
    np.testing.assert_array_equal(stepper.step(x0, [], p, 0.02), FmuInstance(model).run(  # whole steps: exact
        FmuScenario(2, 0.01, start={"x0": 1.5, "x1": -0.5}, params={"mu": 1.2}))[-1])
    logged = [r.message.split(":")[0] for r in caplog.records if r.name == "raytwin.fmu" and "interpolated" in r.message]
    assert logged == [f"event=fmu_step_interpolated fmu={model.name!r} asked_s=0.0075 reached_s=0"]  # once


def test_an_fmu_with_nothing_real_to_simulate_is_refused_at_load(reference_fmus):
    """Stair counts with an Integer: it loaded with no states or outputs and failed at its first run."""
    with pytest.raises(FmuError, match=r"^FMU Stair.fmu: no real-valued state or output RayTwin can use \(it maps "
                                       r"Real/Float64/Float32 variables only; this FMU has Integer ones\)$"):
        FmuModel.load(reference_fmus[(2, "Stair")])
