"""Calibration: recover known parameters (within 2%) from synthetic noisy telemetry made by solve_ivp."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytwin.registry import ModelRegistry
from raytwin.sim import get_model
from sweeps.calibration import CalibrationError, CalibrationSpec, build_problem, calibrate
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


def _telemetry(tmp_path, simulator, seed=1):
    case = CASES[simulator]
    table = synthetic_telemetry(simulator, case["true"], case["x0"], case["n"], case["dt"], case["noise"], seed)
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


@pytest.mark.parametrize("simulator", sorted(CASES))
def test_calibration_recovers_known_parameters(ray_session, tmp_path, simulator):
    registry = str(tmp_path / "registry")
    spec = _spec(simulator, _telemetry(tmp_path, simulator), **CASES[simulator]["search"],
                 registry_url=registry, register_as=f"{simulator}-fitted@1.0.0")
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
                           registry_url=str(registry), register_as="tank-fitted@1.0.0")
    with pytest.raises(CalibrationError, match=r"cd=1 at its upper bound \(declared \[0.1, 1\]\).*widen the model's "
                                               r"bounds"):
        calibrate(spec, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and ModelRegistry(str(registry)).names() == []


@pytest.mark.parametrize("uncertainty", ["prediction_error", "least_squares"])
def test_parameters_the_data_cannot_tell_apart_are_refused_not_reported_with_zero_uncertainty(
        ray_session, tmp_path, uncertainty):
    """two_tank's cd enters only as cd*a1 and cd*a2: with all three free the fit reported each "+- 0 %" (the
    prediction-error Hessian's inverse had negative variances, clipped to 0) and a correlation of -1.8e308."""
    spec = _spec("two_tank", _telemetry(tmp_path, "two_tank"), free=["a1", "a2", "cd", "a2_tank"], num_samples=2,
                 uncertainty=uncertainty, parameters={"a1_tank": CASES["two_tank"]["true"]["a1_tank"]})
    with pytest.raises(CalibrationError, match=r"^the telemetry does not identify (\w+, )*cd(, \w+)* of two_tank: "
                                               r"changing them together leaves the outputs \(almost\) unchanged"):
        calibrate(spec, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    if uncertainty == "least_squares":  # the CLI: a fit the data refused, not a usage error (it printed one)
        from typer.testing import CliRunner

        from raytwin.cli import app

        (tmp_path / "spec.json").write_text(spec.model_dump_json())
        result = CliRunner().invoke(app, ["calibrate", "run", str(tmp_path / "spec.json"), "--runs",
                                          str(tmp_path / "runs")])
        assert result.exit_code == 1 and "error: the telemetry does not identify" in result.output, result.output
        assert "Usage" not in result.output


def test_the_result_records_each_outputs_sigma_and_which_were_assumed(ray_session, tmp_path):
    undeclared = f"{__name__}:TANK_WITHOUT_SENSOR_NOISE"
    path = _telemetry(tmp_path, "two_tank")
    spec = _spec("two_tank", path, model=undeclared, free=["a1"], noise_std={"h2": 0.003}, num_samples=2,
                 parameters={n: v for n, v in CASES["two_tank"]["true"].items() if n != "a1"})
    result, _, _ = calibrate(spec, str(tmp_path / "out"))
    assert result.noise_std == {"h1": 1.0, "h2": 0.003} and result.noise_std_assumed == ["h1"]
    assert json.loads((tmp_path / "out" / "calibration.json").read_text())["noise_std_assumed"] == ["h1"]


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
    with pytest.raises(CalibrationError, match=r"identify a, b of m: changing them together .*fix all but one"):
        _std_and_correlation(problem, together)
    # the prediction-error fit inverts its Hessian, which gives no finite covariance here: the information
    # names the parameter (the refusal named all of them)
    singular = np.diag([4.0, 2.0, 0.0])
    with pytest.raises(CalibrationError, match=r"^the telemetry does not identify c of m: changing it leaves"):
        _std_and_correlation(problem, np.full((3, 3), np.nan), singular)
    with pytest.raises(CalibrationError, match=r"^the telemetry does not identify a, b, c of m"):  # unknown: all
        _std_and_correlation(problem, np.full((3, 3), np.nan))
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
