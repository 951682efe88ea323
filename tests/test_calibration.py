"""Calibration: recover known parameters (within 2%) from synthetic noisy telemetry made by solve_ivp."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest

from raytwin.registry import ModelRegistry
from raytwin.sim import get_model
from sweeps.calibration import CalibrationError, CalibrationSpec, build_problem, calibrate, read_telemetry
from sweeps.synthetic import synthetic_telemetry

# true parameters differ from the typical values (the prior) by 5-20%; only identifiable ones are free
# (two_tank: cd and g only enter as cd*a*sqrt(2g), so the outlet areas are fitted with cd, g fixed)
CASES = {
    "thermal_rc": dict(
        true=dict(C_in=2.4e6, C_m=1.7e7, R_im=2.3e-3, R_mo=4.4e-3, R_io=1.15e-2, f_sol=0.33),
        x0={"T_in": 293.15, "T_m": 291.15}, n=4320, dt=60.0, noise={"T_in": 0.05},
        search=dict(search="random", num_samples=4, scheduler="asha"),
    ),
    "battery_ecm": dict(
        true=dict(q=2.3, r0=0.055, r1=0.017, c1=2.4e3, r2=0.034, c2=1.7e4),
        x0={"soc": 0.9, "v1": 0.0, "v2": 0.0}, n=3600, dt=1.0, noise={"v_terminal": 0.002},
        search=dict(search="random", num_samples=4, scheduler="hyperband"),
    ),
    "two_tank": dict(
        true=dict(a1_tank=1.7e-2, a2_tank=1.3e-2, a1=5.6e-5, a2=4.5e-5),
        x0={"h1": 0.3, "h2": 0.3}, n=3600, dt=1.0, noise={"h1": 0.001, "h2": 0.001},
        search=dict(search="grid", grid_levels=2, scheduler="asha"),  # 2^4 grid points
        event_times=True,
    ),
}


def _telemetry(tmp_path, simulator, seed=1, n=None):
    """The case's synthetic telemetry (`n` samples: the case's own by default) written to a parquet file."""
    case = CASES[simulator]
    table = synthetic_telemetry(simulator, case["true"], case["x0"], n or case["n"], case["dt"], case["noise"], seed)
    if case.get("event_times"):  # telemetry as exported by the twins: timestamps instead of t_s
        start = datetime(2026, 1, 1, tzinfo=UTC)
        stamps = [start + timedelta(seconds=s) for s in table["t_s"].to_pylist()]
        table = table.drop(["t_s"]).append_column("event_time", pa.array(stamps, pa.timestamp("ms", tz="UTC")))
    path = tmp_path / f"{simulator}.parquet"
    pq.write_table(table, path)
    return str(path)


def _spec(simulator, telemetry, **kw):
    case = CASES[simulator]
    base = dict(model=simulator, telemetry=telemetry, start_state=case["x0"], free=list(case["true"]),
                noise_std=case["noise"], num_samples=4, seed=7)
    return CalibrationSpec(**{**base, **kw})


def test_a_calibration_refuses_a_seed_tunes_searchers_cannot_take():
    """A seed of 2**32 or more failed the calibration inside Ray Tune (NumPy's RandomState takes 32 bits, "Seed must
    be between 0 and 2**32 - 1"), after Ray started; the spec refuses it, naming the limit."""
    from sweeps.calibration import TUNE_SEED_MAX

    np.random.RandomState(_spec("thermal_rc", "t.parquet", seed=TUNE_SEED_MAX).seed)  # what the searchers do with it
    with pytest.raises(ValueError, match=f"seed: Input should be less than or equal to {TUNE_SEED_MAX}"):
        _spec("thermal_rc", "t.parquet", seed=TUNE_SEED_MAX + 1)


@pytest.mark.parametrize("simulator", sorted(CASES))
def test_calibration_recovers_known_parameters(ray_session, tmp_path, simulator):
    registry = str(tmp_path / "registry")
    spec = _spec(simulator, _telemetry(tmp_path, simulator), **CASES[simulator]["search"],
                 registry_url=registry, register_as=f"{simulator}-fitted@1.0.0", registered_by="key-fitter")
    result, files, data_hash = calibrate(spec, str(tmp_path / "out"))
    true = CASES[simulator]["true"]
    for name, value in true.items():
        err = result.parameters[name] / value - 1.0
        assert abs(err) < 0.02, f"{name}: {result.parameters[name]} vs true {value}"
        # the reported uncertainty is honest: the error is within 4 standard deviations
        assert abs(err) < 4 * result.rel_std[name] + 1e-4, (name, err, result.rel_std[name])
    # noise-level fit: weighted RMSE ~ 1 when the weights are the true noise std
    assert 0.9 < result.weighted_rmse < 1.1
    assert result.weighted_rmse <= result.tune_best_loss
    assert result.tune_trials == (16 if spec.search == "grid" else 4) and result.refined
    defaults = get_model(simulator).default_params()
    assert {n: v for n, v in result.parameters.items() if n not in true} == {
        n: v for n, v in defaults.items() if n not in true}  # parameters not fitted stay as given
    out = tmp_path / "out"
    assert (out / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "calibration.json").read_text())["parameters"] == result.parameters
    assert set(files) == {"calibration.json", "fit.png"} and len(data_hash) == 64
    published = ModelRegistry(registry).get(f"{simulator}-fitted@1.0.0")
    assert published.parameters == result.parameters and published.metadata["telemetry_sha256"] == data_hash
    assert published.metadata["published_by"] == "key-fitter"  # four eyes: it may not approve its own fit
    assert published.metadata["published_by_verified"] == "false"  # F7: declared to the calibration, nothing checked it
    assert published.metadata["published_via"].startswith("offline calibration")
    assert {"published_os_user", "published_host"} <= set(published.metadata)  # what the machine said


def test_a_fit_is_registered_only_with_the_principal_that_publishes_it(tmp_path):
    """`register_as` registered a version with no principal: four eyes and the audit could not tell who fitted it,
    so its fitter could approve it."""
    with pytest.raises(ValueError, match=r"register_as needs registered_by: the principal publishing the fit"):
        _spec("two_tank", str(tmp_path / "t.parquet"), registry_url=str(tmp_path), register_as="tank@1.0.0")


def test_a_register_as_version_registered_already_is_refused_before_the_search(tmp_path, monkeypatch):
    """It was refused only by the registration after the whole fit (minutes of Tune and least squares)."""
    from raytwin.contracts import AssetType
    from raytwin.registry import RegistryError
    from sweeps import calibration

    registry = ModelRegistry(str(tmp_path / "registry"))
    registry.register("tank-fitted", "1.0.0", AssetType.from_model(get_model("two_tank")))
    monkeypatch.setattr(calibration, "tune_search", lambda *a: pytest.fail("the search ran"))
    spec = _spec("two_tank", _telemetry(tmp_path, "two_tank"), registry_url=registry.url,
                 register_as="tank-fitted@1.0.0", registered_by="key-fitter")
    with pytest.raises(RegistryError, match=r"^register_as tank-fitted@1.0.0 is registered already \(versions of "
                                            r"tank-fitted: 1.0.0\): give register_as a version not registered yet"):
        calibrate(spec, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_too_few_samples_for_the_free_parameters_are_refused_before_the_search_naming_both(tmp_path, monkeypatch):
    """3 samples for 2 free parameters ran the search, and the refusal blamed a parameter bound, not the data."""
    from sweeps import calibration
    from sweeps.calibration import MIN_SAMPLES_PER_FREE

    monkeypatch.setattr(calibration, "tune_search", lambda *a: pytest.fail("the search ran"))
    path = tmp_path / "few.parquet"
    case = CASES["two_tank"]
    pq.write_table(synthetic_telemetry("two_tank", case["true"], case["x0"], 3, 1.0, case["noise"], 1), path)
    with pytest.raises(CalibrationError, match=r"^calibration of two_tank: 3 telemetry samples for 2 free "
                                               r"parameter\(s\): a calibration needs at least 10 \(5 a free "
                                               r"parameter\); give a longer telemetry window or fewer free parameters$"):
        calibrate(_spec("two_tank", str(path), free=["a1", "a2"]), str(tmp_path / "out"))
    table = synthetic_telemetry("two_tank", case["true"], case["x0"], 2 * MIN_SAMPLES_PER_FREE, 1.0, case["noise"], 1)
    assert build_problem(_spec("two_tank", str(path), free=["a1", "a2"]), table, {}, "two_tank").n == 10  # enough
    assert not (tmp_path / "out").exists()


def test_a_model_without_inputs_is_fitted(tmp_path, monkeypatch):
    """A model driven by its start state alone (no input columns) crashed on an empty input stack before any fit;
    its least squares (in process, as the refinement after Ray Tune's search runs it) recovers its rate."""
    from sweeps.calibration import refine
    from tests.test_cli import NO_INPUT_MODEL

    (tmp_path / "cal_decay.py").write_text(NO_INPUT_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    table = synthetic_telemetry("cal_decay:DECAY", {"k": 0.7}, {"v": 10.0}, 100, 0.01, {"v": 0.01}, 1)
    spec = CalibrationSpec(model="cal_decay:DECAY", telemetry="decay.parquet", start_state={"v": 10.0}, free=["k"])
    problem = build_problem(spec, table, {}, "cal_decay:DECAY")
    theta, _ = refine(problem, np.log([1.5]))
    assert np.exp(theta[0]) == pytest.approx(0.7, rel=0.01)


def test_samples_further_apart_than_the_models_step_are_integrated_in_sub_steps():
    """The search and least squares took one RK4 step per sample: a DC motor sampled at 50 Hz (its default step
    2 ms) missed its own noise-free truth by 0.26 sigma, and a pendulum sampled at 2 Hz fitted its length 90 sigma
    off with a weighted RMSE of 1.09 (no misfit warning). Twins and the prediction-error fit sub-step already."""
    true, x0 = {"R": 0.55, "k": 0.315}, {"i": 0.0, "omega": 0.0, "T_w": 298.15}
    table = synthetic_telemetry("dc_motor", true, x0, 200, 0.02, {}, 1)  # noise-free: the fit's own truth
    spec = CalibrationSpec(model="dc_motor", telemetry="bench.parquet", start_state=x0, free=list(true))
    problem = build_problem(spec, table, {}, "dc_motor")
    residuals = problem.residuals(np.log(list(true.values())), problem.n)
    assert np.sqrt(np.mean(residuals**2)) < 1e-3
    assert problem.n_sub == 10  # 2 ms steps, as the prediction-error fit takes


def test_a_trials_window_losses_are_each_windows_own_from_one_compile():
    """Tune's trials score growing windows of the data (ASHA's iterations): each window's loss is the one its own
    run gives, taken from one simulation of the whole data (causal), so a trial compiles the simulator once, not
    once per window length."""
    from sweeps.calibration import _residuals, window_losses

    case = CASES["two_tank"]
    table = synthetic_telemetry("two_tank", case["true"], case["x0"], 91, 1.0, case["noise"], 1)
    problem = build_problem(_spec("two_tank", "tank.parquet"), table, {}, "two_tank")
    theta = np.log(problem.base_params[problem.free_index]) + 0.1
    windows = problem.windows(3)
    compiled = _residuals._cache_size()
    losses = window_losses(problem, theta, windows)
    assert _residuals._cache_size() == compiled + 1
    assert losses == [problem.loss(theta, n) for n in windows] and len(set(losses)) == 3


def test_telemetry_that_is_missing_or_not_parquet_is_a_calibration_error(tmp_path):
    """Bad data is the user's to fix (`CalibrationError`); the store failing the read is no such thing
    (`tests/test_store_outages_typed.py`: a `StoreIOError`, a 503)."""
    (tmp_path / "notes.parquet").write_text("not Parquet")
    for name in ("missing.parquet", "notes.parquet"):
        with pytest.raises(CalibrationError, match=f"cannot read telemetry .*{name}: "):
            read_telemetry(str(tmp_path / name))


def test_calibration_refuses_unusable_input(tmp_path):
    path = _telemetry(tmp_path, "two_tank")
    table = pq.read_table(path)
    with pytest.raises(CalibrationError, match="lacks column"):
        build_problem(_spec("two_tank", path), table.drop(["h2"]), {}, "two_tank")
    with pytest.raises(CalibrationError, match="not in two_tank"):
        build_problem(_spec("two_tank", path, free=["nope"]), table, {}, "two_tank")
    with pytest.raises(CalibrationError, match=r"start_std names \['h3'\], not states of two_tank: \['h1', 'h2'\]"):
        build_problem(_spec("two_tank", path, start_std={"h3": 0.01}), table, {}, "two_tank")
    shuffled = table.take(np.r_[1, 0, 2:table.num_rows])
    with pytest.raises(CalibrationError, match="uniformly spaced"):
        build_problem(_spec("two_tank", path), shuffled, {}, "two_tank")
    with pytest.raises(ValueError, match="repeat"):
        _spec("two_tank", path, free=["a1", "a1"])
    with pytest.raises(ValueError, match="less than or equal to 100000"):
        _spec("two_tank", path, num_samples=1_000_000_000)
    with pytest.raises(ValueError, match=r"a grid of 400 levels over 2 free parameters is 160,000 trials, over 100,000"):
        _spec("two_tank", path, free=["a1", "cd"], search="grid", grid_levels=400)


def test_model_based_search_without_its_package_says_what_to_install(ray_session, tmp_path):
    pytest.importorskip("ray.tune")
    try:
        import optuna  # noqa: F401
        pytest.skip("optuna is installed")
    except ImportError:
        pass
    spec = _spec("two_tank", _telemetry(tmp_path, "two_tank"), search="optuna")
    with pytest.raises(CalibrationError, match="pip install optuna"):
        calibrate(spec, str(tmp_path / "out"))


def test_noise_std_names_outputs_and_defaults_to_the_declared_measurement_std(tmp_path):
    """A `noise_std` name that is no output is refused (it was ignored); an output it leaves out is weighted by
    its declared measurement_std (it was sigma 1: uncertainties ~1000x too wide for a 1 mm sensor), and sigma 1
    is assumed, and listed, only where the model declares none."""
    path = _telemetry(tmp_path, "two_tank")
    table = pq.read_table(path)
    with pytest.raises(CalibrationError, match=r"noise_std names \['y'\], not outputs of two_tank: \['h1', 'h2'\]"):
        build_problem(_spec("two_tank", path, noise_std={"y": 0.1}), table, {}, "two_tank")
    problem = build_problem(_spec("two_tank", path, noise_std={"h1": 0.002}), table, {}, "two_tank")
    assert problem.sigma.tolist() == [0.002, 1e-3] and problem.sigma_assumed == ()
    undeclared = f"{__name__}:TANK_WITHOUT_SENSOR_NOISE"
    problem = build_problem(_spec("two_tank", path, model=undeclared, noise_std={"h2": 0.003}), table, {}, undeclared)
    assert problem.sigma.tolist() == [1.0, 0.003] and problem.sigma_assumed == ("h1",)


TANK_WITHOUT_SENSOR_NOISE = dataclasses.replace(get_model("two_tank"), outputs=tuple(
    dataclasses.replace(o, measurement_std=None) for o in get_model("two_tank").outputs))


def test_a_fit_that_ends_on_a_declared_bound_is_refused_before_anything_is_written_or_registered(ray_session, tmp_path):
    """Data of cd = 1.2, beyond two_tank's bounds [0.1, 1]: least squares stopped on the bound, then the
    prediction-error stage, unbounded, moved on to ~1.2, which was reported, written, and then refused by the
    registry with a traceback."""
    true = {**CASES["two_tank"]["true"], "cd": 1.2}
    path = tmp_path / "tank.parquet"
    pq.write_table(synthetic_telemetry("two_tank", true, CASES["two_tank"]["x0"], 600, 1.0,
                                       {"h1": 1e-3, "h2": 1e-3}, seed=1), path)
    registry = tmp_path / "registry"
    spec = CalibrationSpec(model="two_tank", telemetry=str(path), start_state=CASES["two_tank"]["x0"], free=["cd"],
                           parameters={n: v for n, v in true.items() if n != "cd"}, num_samples=2, seed=7,
                           registry_url=str(registry), register_as="tank-fitted@1.0.0", registered_by="key-fitter")
    with pytest.raises(CalibrationError, match=r"cd=1 at its upper bound \(declared \[0.1, 1\]\).*widen the model's "
                                               r"bounds"):
        calibrate(spec, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and ModelRegistry(str(registry)).names() == []


UNIDENTIFIED = (r"^the telemetry does not identify (\w+, )*cd(, \w+)* of two_tank: changing them together leaves the "
                r"outputs \(almost\) unchanged")


@pytest.mark.parametrize("uncertainty", ["prediction_error", "least_squares"])
def test_parameters_the_data_cannot_tell_apart_are_refused_not_reported_with_zero_uncertainty(
        ray_session, tmp_path, uncertainty):
    """two_tank's cd enters only as cd*a1 and cd*a2: with all three free the fit reported each "+- 0 %" (the
    prediction-error Hessian's inverse had negative variances, clipped to 0) and a correlation of -1.8e308. The
    products make the directions exactly equal whatever the data's length: a sixth of the case's is enough.
    The least-squares case is refused through the CLI (the one fit it runs): a fit the data refused, not a usage
    error (it printed one), recorded as failed with the refusal and no outputs."""
    spec = _spec("two_tank", _telemetry(tmp_path, "two_tank", n=600), free=["a1", "a2", "cd", "a2_tank"], num_samples=2,
                 uncertainty=uncertainty, parameters={"a1_tank": CASES["two_tank"]["true"]["a1_tank"]})
    if uncertainty == "prediction_error":
        with pytest.raises(CalibrationError, match=UNIDENTIFIED):
            calibrate(spec, str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()
    else:
        from typer.testing import CliRunner

        from raytwin.cli import app
        from sweeps.runs import RunStore

        (tmp_path / "spec.json").write_text(spec.model_dump_json())
        result = CliRunner().invoke(app, ["calibrate", "run", str(tmp_path / "spec.json"), "--runs",
                                          str(tmp_path / "runs")])
        assert result.exit_code == 1 and "error: the telemetry does not identify" in result.output, result.output
        assert "Usage" not in result.output
        (record,) = RunStore(str(tmp_path / "runs")).list()
        assert record.status == "failed" and re.match(UNIDENTIFIED, record.error), record.error
        assert record.outputs == {} and not any(Path(record.output_url).rglob("*"))  # nothing written


def test_the_result_records_each_outputs_sigma_and_which_were_assumed(ray_session, tmp_path, caplog):
    undeclared = f"{__name__}:TANK_WITHOUT_SENSOR_NOISE"
    path = _telemetry(tmp_path, "two_tank", n=600)  # a sixth of the case's: the stages and sigmas need no more
    spec = _spec("two_tank", path, model=undeclared, free=["a1"], noise_std={"h2": 0.003}, num_samples=2,
                 parameters={n: v for n, v in CASES["two_tank"]["true"].items() if n != "a1"})
    caplog.set_level(logging.INFO, logger="raytwin.calibration")
    result, _, _ = calibrate(spec, str(tmp_path / "out"))
    # each stage after Tune says it started: a minute of refinement and prediction-error fit logged nothing
    stages = [f"calibration {stage}" for stage in ("tune_done", "refine start", "refine done",
                                                    "prediction_error start", "prediction_error process_noise")]
    said = [r.getMessage() for r in caplog.records if r.name == "raytwin.calibration"]
    assert [stage for message in said for stage in stages if message.startswith(stage)] == stages
    assert result.noise_std == {"h1": 1.0, "h2": 0.003} and result.noise_std_assumed == ["h1"]
    written = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert written["noise_std_assumed"] == ["h1"]
    assert result.warnings == [] and "warnings" not in written  # a fit that matches: the bytes it had before


def test_the_refusal_names_only_the_parameters_the_data_do_not_see():
    """One unidentified parameter (f_sol on night-time data) was refused naming all six, with advice for
    parameters that enter only together."""
    from types import SimpleNamespace

    from sweeps.calibration import _std_and_correlation

    problem = SimpleNamespace(free_names=("a", "b", "c"), simulator="m")
    alone = np.linalg.pinv(np.diag([4.0, 2.0, 0.0]))  # c moves nothing
    with pytest.raises(CalibrationError, match=r"^the telemetry does not identify c of m: changing it leaves the "
                                               r"outputs \(almost\) unchanged.*; fix it \(`parameters`\)"):
        _std_and_correlation(problem, alone)
    together = np.linalg.pinv(np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0]]))  # a and b as a sum
    with pytest.raises(CalibrationError, match=r"identify a, b of m: changing them together .*; fix any one of them "
                                               r"\(`parameters`: they move along one direction"):
        _std_and_correlation(problem, together)
    # the prediction-error fit inverts its Hessian, which gives no finite covariance here: the information
    # names the parameter (the refusal named all of them)
    singular = np.diag([4.0, 2.0, 0.0])
    with pytest.raises(CalibrationError, match=r"^the telemetry does not identify c of m: changing it leaves"):
        _std_and_correlation(problem, np.full((3, 3), np.nan), singular)
    with pytest.raises(CalibrationError, match=r"^the telemetry does not identify a, b, c of m.*; fix some of them"):
        _std_and_correlation(problem, np.full((3, 3), np.nan))  # unknown: all
    rel_std, corr = _std_and_correlation(problem, np.linalg.inv(np.diag([4.0, 2.0, 1.0])))
    np.testing.assert_allclose(rel_std, [0.5, 2 ** -0.5, 1.0])
    np.testing.assert_allclose(corr, np.eye(3), atol=1e-15)


@pytest.mark.parametrize("inverse", ["pinv", "inv"])
def test_an_unidentified_pair_is_named_not_the_best_identified_parameter(inverse):
    """A pendulum's damping c and mass m enter as c/m: the data see log c - log m, not log c + log m, while
    L is well identified. The refusal read the unseen direction off the covariance's pseudo-inverse, which
    cuts the covariance's smallest eigenvalues (the best-identified directions), and named L."""
    from types import SimpleNamespace

    from sweeps.calibration import Unidentified, _std_and_correlation

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(size=200)
    jac = np.column_stack([-a, 50.0 * b, a + 1e-9 * rng.normal(size=200)])  # d/dlog m, d/dlog L, d/dlog c
    info = jac.T @ jac
    cov = np.linalg.pinv(info) if inverse == "pinv" else np.linalg.inv(info)
    problem = SimpleNamespace(free_names=("m", "L", "c"), simulator="pendulum")
    with pytest.raises(Unidentified, match=r"does not identify m, c of pendulum"):
        _std_and_correlation(problem, 1e-4 * cov)


def _unseen_advice(problem, information):
    from sweeps.calibration import Unidentified, _std_and_correlation

    with pytest.raises(Unidentified) as refused:
        _std_and_correlation(problem, np.linalg.pinv(information))
    with pytest.raises(Unidentified) as refused_pem:  # the prediction-error fit's path: from the information
        _std_and_correlation(problem, np.full(information.shape, np.nan), information)
    assert str(refused.value) == str(refused_pem.value)
    return str(refused.value)


def test_the_advice_fixes_as_many_parameters_as_the_data_leave_unseen():
    """Five parameters along one unseen direction were told to "fix all but one of them"; an outside test fixed
    one (eta) and the other four fitted within 1 sigma. One direction: fix any one; k directions: fix k."""
    from types import SimpleNamespace

    problem = SimpleNamespace(free_names=("a", "b", "c", "d", "e"), simulator="m")
    one = _unseen_advice(problem, np.eye(5) - np.ones((5, 5)) / 5)  # sees all but a+b+c+d+e
    assert "identify a, b, c, d, e of m" in one and "fix any one of them" in one and "all but one" not in one
    two = np.zeros((5, 5))
    two[np.ix_([0, 1], [0, 1])] = 1.0  # a, b enter as a + b ...
    two[np.ix_([2, 3], [2, 3])] = 1.0  # ... and c, d as c + d: two unseen directions
    two[4, 4] = 2.0
    advice = _unseen_advice(problem, two)
    assert "identify a, b, c, d of m" in advice and "fix 2 of them" in advice, advice
    both = np.diag([0.0, 0.0, 1.0, 2.0, 3.0])  # a and b each move nothing
    assert "identify a, b of m" in (advice := _unseen_advice(problem, both)) and "; fix them (" in advice, advice


def _nan_derivative(x, u, c):
    return tuple(d + 0.0 * jnp.sqrt(-1.0 - x[0]) for d in get_model("two_tank").derivative(x, u, c))


NAN_TANK = dataclasses.replace(get_model("two_tank"), name="nan_tank", derivative=_nan_derivative)
"""two_tank whose derivative takes the square root of a negative number: NaN at every parameter set."""


def test_a_model_that_is_nan_everywhere_is_refused_naming_the_model_and_values_not_with_scipys_error(
        ray_session, tmp_path):
    """Trials whose simulation is NaN score BAD_LOSS (1e30), which `min` took as the best: the refinement then
    stopped on scipy's "Residuals are not finite in the initial point.", and the run record kept that."""
    from sweeps.calibration import NO_FINITE_LOSS, NoFiniteLoss, refine
    from sweeps.runs import RunStore, recorded_calibration

    nan_model = f"{__name__}:NAN_TANK"
    spec = _spec("two_tank", _telemetry(tmp_path, "two_tank", n=600), model=nan_model, free=["a1", "a2"], num_samples=2)
    runs = str(tmp_path / "runs")
    with pytest.raises(NoFiniteLoss, match=rf"^calibration of {nan_model}: {NO_FINITE_LOSS}: its simulation was "
                                           r"NaN/inf at every parameter set tried \(a1=[\d.e+-]+, a2=[\d.e+-]+; .*, "
                                           r"2 in all; fixed: a1_tank=.*\); check the model's domain"):
        recorded_calibration(spec, runs=runs)
    (record,) = RunStore(runs).list()
    assert record.status == "failed" and NO_FINITE_LOSS in record.error and "initial point" not in record.error
    problem = build_problem(spec, pq.read_table(spec.telemetry), {}, nan_model)
    with pytest.raises(NoFiniteLoss, match=r"the refinement's start \(a1=5e-05, a2=5e-05\) gives NaN/inf outputs; "
                                           r"check the model's domain"):
        refine(problem, np.log([5e-5, 5e-5]))


def test_fixed_parameters_out_of_bounds_and_telemetry_in_other_units_are_refused_up_front(tmp_path):
    """A fixed eta=5 (bounds [0.5, 1]) was run, and the refusal blamed the free parameters at their bounds;
    T_a in degC against a range in K was fitted into bounds too."""
    path = _telemetry(tmp_path, "two_tank")
    table = pq.read_table(path)
    with pytest.raises(CalibrationError, match=r"^calibration of two_tank: cd=5 is outside its bounds \[0.1, 1\]: "
                                               r"give `parameters` values within them"):
        build_problem(_spec("two_tank", path, free=["a1"], parameters={"cd": 5.0}), table, {}, "two_tank")
    thermal = synthetic_telemetry("thermal_rc", {}, {"T_in": 293.15, "T_m": 291.15}, 50, 60.0, {"T_in": 0.05}, 1)
    celsius = thermal.set_column(thermal.schema.get_field_index("T_in"), "T_in",
                                 pa.compute.subtract(thermal["T_in"], 273.15))
    spec = CalibrationSpec(model="thermal_rc", telemetry=path, start_state={"T_in": 293.15, "T_m": 291.15},
                           free=["C_in"])
    build_problem(spec, thermal, {}, "thermal_rc")  # in K: accepted
    with pytest.raises(CalibrationError, match=r"telemetry for thermal_rc is implausible: T_in spans \[2\d\.\d+, "
                                               r"2\d\.\d+\] \(50 of 50 samples outside its declared range "
                                               r"\[173.15, 473.15\] K; expected in K\); telemetry is read in the "
                                               r"model's declared units \(convert the column, or name its unit in "
                                               r"the Parquet field metadata 'unit'\)"):
        build_problem(spec, celsius, {}, "thermal_rc")


def test_a_parameter_name_typo_and_a_start_state_in_other_units_are_refused_naming_them(tmp_path):
    """`parameters={"C_inn": ...}` raised a KeyError (a traceback from `raytwin calibrate run`), and a start state in
    degC against a range in K ran and blamed C_in at its lower bound."""
    thermal = synthetic_telemetry("thermal_rc", {}, {"T_in": 293.15, "T_m": 291.15}, 50, 60.0, {"T_in": 0.05}, 1)
    base = {"model": "thermal_rc", "telemetry": str(tmp_path / "t.parquet"),
            "start_state": {"T_in": 293.15, "T_m": 291.15}, "free": ["R_io"]}
    spec = lambda **kw: CalibrationSpec(**{**base, **kw})  # noqa: E731
    with pytest.raises(CalibrationError, match=r"^parameters names \['C_inn'\], not parameters of thermal_rc: "
                                               r"\['C_in', 'C_m', 'R_im', 'R_mo', 'R_io', 'f_sol'\]$"):
        build_problem(spec(parameters={"C_inn": 2e6}), thermal, {}, "thermal_rc")
    with pytest.raises(CalibrationError, match=r"^calibration of thermal_rc: start_state.T_in=20 outside T_in's "
                                               r"plausible range \[173.15, 473.15\] K: give the asset's state at the "
                                               r"first sample in the model's declared units"):
        build_problem(spec(start_state={"T_in": 20.0, "T_m": 291.15}), thermal, {}, "thermal_rc")


def _with_unit(table: pa.Table, name: str, unit: str) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, table.schema.field(name).with_metadata({b"unit": unit.encode()}), table[name])


def test_a_telemetry_column_naming_its_unit_in_field_metadata_is_converted_to_the_declared_unit(tmp_path):
    """Telemetry is read in the model's declared units (K for thermal_rc's T_in); a column whose Parquet field
    metadata names another unit (degC) is converted, and one of another dimension is refused naming both."""
    thermal = synthetic_telemetry("thermal_rc", {}, {"T_in": 293.15, "T_m": 291.15}, 50, 60.0, {"T_in": 0.05}, 1)
    spec = CalibrationSpec(model="thermal_rc", telemetry=str(tmp_path / "t.parquet"),
                           start_state={"T_in": 293.15, "T_m": 291.15}, free=["C_in"])
    kelvin = build_problem(spec, thermal, {}, "thermal_rc")
    celsius = thermal.set_column(thermal.schema.get_field_index("T_in"), "T_in",
                                 pa.compute.subtract(thermal["T_in"], 273.15))
    converted = build_problem(spec, _with_unit(celsius, "T_in", "degC"), {}, "thermal_rc")
    np.testing.assert_allclose(converted.y, kelvin.y, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(converted.u, kelvin.u)
    with pytest.raises(CalibrationError, match=r"^telemetry column T_in of thermal_rc \(field metadata unit 'W', "
                                               r"declared 'K'\): cannot convert 'W' to 'K'"):
        build_problem(spec, _with_unit(thermal, "T_in", "W"), {}, "thermal_rc")
    with pytest.raises(CalibrationError, match=r"field metadata unit 'furlong'.*unknown unit 'furlong'"):
        build_problem(spec, _with_unit(thermal, "T_in", "furlong"), {}, "thermal_rc")


def test_a_fit_that_does_not_match_the_data_warns_that_its_intervals_assume_one_that_does(ray_session, tmp_path):
    """Weighted RMSE 3.29 (about 1 expected) was reported with C_a +- 1.2 % and no warning, the truth 8 sigma away:
    the warning goes into the result, the run record and the CLI; the intervals are reported as computed."""
    from typer.testing import CliRunner

    from raytwin.cli import app
    from sweeps.calibration import MISFIT_RMSE

    true = CASES["two_tank"]["true"]
    wrong = {**true, "a2": 0.9 * true["a2"]}  # a fixed parameter 10 % off: a1 cannot make up for it
    spec = _spec("two_tank", _telemetry(tmp_path, "two_tank", n=600), free=["a1"], num_samples=2,
                 parameters={n: v for n, v in wrong.items() if n != "a1"}, uncertainty="least_squares")
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    out = CliRunner().invoke(app, ["calibrate", "run", str(tmp_path / "spec.json"), "--runs", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    assert "warning: the fit does not match the data: weighted RMSE" in out.output, out.output
    assert "check the fixed parameters, noise_std and the model" in out.output
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/run.json")]
    (warning,) = record["summary"]["warnings"]
    result = json.loads((tmp_path / "runs" / record["run_id"] / "output" / "calibration.json").read_text())
    assert result["warnings"] == [warning] and result["weighted_rmse"] > MISFIT_RMSE
    assert 0 < result["rel_std"]["a1"] < 0.05  # the intervals as computed, not widened or dropped
