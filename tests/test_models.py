"""Bring your own model: the public authoring API, discovery (entry points and import paths), the checks
registration runs (each wrong model with its one-line error), the RK4 stability limit, and `raytwin models`."""

from __future__ import annotations

import logging
import math
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from raytwin.cli import app
from raytwin.contracts import AssetType, describe_error
from raytwin.models import (
    DivergedRunError, Input, Model, ModelCheckError, Output, Param, State, UnknownModelError, UnstableStepError,
    UnstableStepWarning, check_model, get_model, load_model, rk4_limits, stability_limit,
)
from raytwin.registry import ModelRegistry, RegistryError
from raytwin.sim import MODELS, THERMAL_RC, TWO_TANK, model_ref, rollout, simulate, simulate_batch, unstack
from raytwin.sim.checks import check_step
from tests.stiff_models import robertson

RK4_REAL = 2.785293563405282  # |z| where 1 + z + z^2/2 + z^3/6 + z^4/24 returns to 1 on the negative real axis

USER_PACKAGE = '''
"""A user's model package: a mass on a spring with a damper, written against the public API only."""
from raytwin.models import Input, Model, Output, Param, State


def coefficients(p):
    m, k, c = p
    return (k / m, c / m, 1.0 / m)


def derivative(x, u, c):
    pos, vel = x
    (force,) = u
    k_m, c_m, inv_m = c
    return (vel, inv_m * force - k_m * pos - c_m * vel)


def output(x, u, c):
    return (x[0],)


SPRING = Model(
    name="spring", version="0.1.0", description="damped mass on a spring",
    states=(State("x", "m", "position", -10.0, 10.0, nominal=0.1, prior_std=0.1, process_std=1e-3),
            State("v", "m/s", "velocity", -100.0, 100.0, nominal=0.0, prior_std=0.1, process_std=1e-3)),
    inputs=(Input("F", "N", "applied force", -1e3, 1e3, nominal=0.0),),
    params=(Param("m", "kg", 1.0, 0.5, 2.0, "mass"), Param("k", "N/m", 4.0, 1.0, 10.0, "stiffness"),
            Param("c", "N*s/m", 0.4, 0.1, 1.0, "damping")),
    outputs=(Output("x", "m", "position", -10.0, 10.0, measurement_std=1e-3),),
    coefficients=coefficients, derivative=derivative, output=output, default_dt=0.01,
)
'''


@pytest.fixture(scope="module")
def user_package(tmp_path_factory) -> Path:
    """`acme_models` (with `acme_models.spring:SPRING`) and an installed-looking distribution declaring it in the
    ``raytwin.models`` entry-point group, on sys.path for this module."""
    root = tmp_path_factory.mktemp("site")
    (root / "acme_models").mkdir()
    (root / "acme_models" / "__init__.py").write_text("")
    (root / "acme_models" / "spring.py").write_text(USER_PACKAGE)
    dist = root / "acme_models-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-models\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[raytwin.models]\nspring = acme_models.spring:SPRING\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


# ---------------------------------------------------------------------------- discovery ----
def test_reference_models_are_discovered_not_hard_coded():
    assert {"thermal_rc", "battery_ecm", "two_tank"} <= set(MODELS)
    assert MODELS["thermal_rc"] is THERMAL_RC is get_model("raytwin.sim.thermal:THERMAL_RC")
    assert model_ref(THERMAL_RC) == "thermal_rc"


def test_a_user_model_is_found_by_entry_point_and_by_import_path(user_package):
    spring = get_model("spring")
    assert spring is load_model("acme_models.spring:SPRING") is get_model("acme_models.spring:SPRING")
    assert "spring" in MODELS and MODELS["spring"] is spring
    assert check_model(spring).dt_max == pytest.approx(stability_limit(spring))
    # the whole API works on it: an asset type, the registry, a simulation
    asset_type = AssetType.from_model(spring)
    assert asset_type.simulator == "spring"
    by_path = AssetType(**{**asset_type.model_dump(), "simulator": "acme_models.spring:SPRING"})
    assert by_path.states.keys() == {"x", "v"}
    traj = simulate(spring, [0.1, 0.0], np.zeros((500, 1)), spring.param_vector(), 0.01, dtype=jnp.float64)
    assert abs(traj[-1, 0]) < 0.1


def test_unknown_models_are_one_line_errors_naming_the_field():
    with pytest.raises(UnknownModelError, match=r"^unknown simulator 'pump'; known: \[.*'thermal_rc'"):
        get_model("pump")
    with pytest.raises(UnknownModelError, match=r"^unknown simulator 'models/pump.fmu'; known: \[.*\] \(an FMU file: "
                                                r"store it with raytwin.fmu.store_fmu\(path, registry_url\) and give "
                                                r"the URL it returns"):  # said "or give an import path"
        get_model("models/pump.fmu")
    for path, reason in (("no_such_pkg.mod:PUMP", r"cannot import no_such_pkg\.mod: No module named 'no_such_pkg'; "
                                                   r"install its package where the model runs: for `raytwin serve`, "
                                                   r"where its Serve replicas and Ray workers run .*PYTHONPATH.*"
                                                   r"runtime_env"),
                         ("raytwin.sim.thermal:PUMP", "has no attribute 'PUMP'"),
                         ("raytwin.sim.thermal:_derivative", "is a function, not a raytwin Model")):
        with pytest.raises(UnknownModelError, match=reason):
            get_model(path)
    with pytest.raises(ValidationError) as info:
        AssetType(**{**AssetType.from_model(THERMAL_RC).model_dump(), "simulator": "pump"})
    message = describe_error(info.value)
    assert message.startswith("simulator: unknown simulator 'pump'") and "\n" not in message
    with pytest.raises(ValidationError) as info:  # what POST /v1/asset-types answers (422) on a server lacking it
        AssetType(**{**AssetType.from_model(THERMAL_RC).model_dump(), "simulator": "no_such_pkg.mod:PUMP"})
    message = describe_error(info.value)
    assert "cannot import no_such_pkg.mod" in message and "PYTHONPATH `raytwin serve` was started with" in message


def test_a_model_module_that_fails_to_run_and_a_scripts_own_model_are_one_line_errors(tmp_path, monkeypatch, caplog):
    """A syntax error or an exception while the model's module runs is one line naming the file (it was a
    69-line traceback), but none of the server's absolute paths; a model defined in a script (`__main__`, which multiprocessing, imported by Ray,
    also names `__mp_main__`) has no import path a worker could use: said so, not a path that cannot work."""
    import sys
    import types

    (tmp_path / "m_syntax.py").write_text("def deriv(x, u, c)\n    return x\n")
    (tmp_path / "m_raises.py").write_text("RATE = 1 / 0\n")
    (tmp_path / "m_reads.py").write_text(f"open({str(tmp_path / 'table.csv')!r})\n")
    (tmp_path / "m_imports.py").write_text("from json import table\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    caplog.set_level(logging.WARNING, "raytwin.sim")
    with pytest.raises(UnknownModelError, match=r"m_syntax does not parse: expected ':' \(m_syntax.py, line 1\)$"):
        get_model("m_syntax:M")
    with pytest.raises(UnknownModelError, match="importing m_raises raised ZeroDivisionError: division by zero"):
        get_model("m_raises:M")
    # the server's paths are no tenant's to read (a request's import path is validated on the server): in its log only
    with pytest.raises(UnknownModelError, match=r"raised FileNotFoundError: .* No such file or directory: '<store>'$"):
        get_model("m_reads:M")
    with pytest.raises(UnknownModelError, match=r"cannot import name 'table' from 'json' \(<store>\)"):
        get_model("m_imports:M")
    assert str(tmp_path / "table.csv") in caplog.text and "json/__init__.py" in caplog.text
    assert str(tmp_path / "m_syntax.py") in caplog.text
    script = types.ModuleType("__main__")
    script.SPRING = spring = _model(name="scripted")
    monkeypatch.setitem(sys.modules, "__main__", script)
    monkeypatch.setitem(sys.modules, "__mp_main__", script)
    with pytest.raises(UnknownModelError, match="a script's own names are not"):
        AssetType.from_model(spring)


def test_a_module_of_python_itself_is_no_model_path_and_is_not_run():
    """An asset type's simulator is imported where the request is validated, for any tenant's admin key: `this:s`
    ran `this` (the Zen of Python in the API replica's log), so `antigravity` would open a browser and `test.autotest`
    would have run CPython's whole test suite inside the replica. Python's own modules are refused unimported."""
    for path in ("this:s", "json:loads", "os.path:join"):
        with pytest.raises(UnknownModelError, match=f"model path '{path}': .* is part of Python itself, not a model"):
            get_model(path)
    with pytest.raises(ValidationError) as info:  # what POST /v1/asset-types answers (422)
        AssetType(**{**AssetType.from_model(THERMAL_RC).model_dump(), "simulator": "this:s"})
    assert "this is part of Python itself" in describe_error(info.value)


# ----------------------------------------------------------------- declarations refused ----
def _model(**changes) -> Model:
    """A valid one-state decay model dx/dt = -k x (+ u), with `changes`."""
    fields = dict(
        name="decay", version="1.0.0",
        states=(State("x", "m", "level", -10.0, 10.0, nominal=1.0),),
        inputs=(Input("u", "m/s", "inflow", -1.0, 1.0, nominal=0.0),),
        params=(Param("k", "1/s", 1.0, 0.5, 2.0, "rate"),),
        outputs=(Output("y", "m", "level", -10.0, 10.0),),
        coefficients=lambda p: p,
        derivative=lambda x, u, c: (u[0] - c[0] * x[0],),
        output=lambda x, u, c: (x[0],),
        default_dt=0.1,
    )
    return Model(**{**fields, **changes})


@pytest.mark.parametrize(("changes", "expected"), [
    ({"name": "my model"}, "model my model: name: must be an identifier"),
    ({"version": "1.0"}, "model decay: version: '1.0' is not a semantic version"),
    ({"states": (State("x", "m"), State("x", "m"))}, "model decay: states.x: declared twice"),
    ({"states": (Input("x", "m"),)}, r"model decay: states\[0\]: is a Input, expected State"),
    ({"states": (State("2x", "m"),)}, r"model decay: states\[0\]: name '2x' is not an identifier"),
    ({"params": (Param("k", "furlong/s", 1.0, 0.5, 2.0),)}, "model decay: params.k: unknown unit 'furlong/s'"),
    ({"default_dt": 0.0}, "model decay: default_dt: must be a finite number of seconds > 0"),
    ({"derivative": None}, "model decay: derivative: must be a function"),
    # telemetry and metrics name variables by name alone: a reading of `y` would also drive an input `y`
    ({"inputs": (Input("y", "m/s"),)}, "model decay: inputs.y: shares its name with outputs.y: .* rename one"),
    ({"inputs": (Input("x", "m/s"),)}, "model decay: inputs.x: shares its name with states.x"),
    # an output named after a state is read from the state by metrics: in another unit it would be mislabelled
    ({"outputs": (Output("x", "mm"),)}, "model decay: outputs.x: unit 'mm' is not 'm', the unit of the state"),
])
def test_bad_declarations_are_refused_at_construction(changes, expected):
    with pytest.raises(ModelCheckError, match="^" + expected) as info:
        _model(**changes)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("module", "declaration", "expected"), [
    ("reversed_bounds", 'Param("m", "kg", 1.0, 2.0, 0.5)',
     "params.m: lower bound 2 is above upper bound 0.5: swap them"),
    ("default_outside", 'Param("m", "kg", 5.0, 0.5, 2.0)', r"params.m: default 5 is outside its bounds \[0.5, 2\]"),
    ("nominal_outside", 'State("x", "m", "", -10.0, 10.0, nominal=50.0)',
     r"states.x: nominal 50 is outside its range \[-10, 10\]"),
    ("negative_std", 'Output("y", "m", measurement_std=-1e-3)',
     "outputs.y: measurement_std must be a finite number > 0, got -0.001"),
])
def test_a_declaration_refused_while_its_module_loads_is_one_line_naming_the_model_and_field(
        tmp_path, monkeypatch, module, declaration, expected):
    """A `Param` or variable is refused when constructed, before any model holds it: loading its
    module names the model by its path."""
    (tmp_path / f"{module}.py").write_text(f"from raytwin.models import Output, Param, State\nBAD = {declaration}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelCheckError, match=f"^model {module}:BAD: {expected}$"):
        load_model(f"{module}:BAD")
    for command in ("check", "show"):
        result = CliRunner().invoke(app, ["models", command, f"{module}:BAD"])
        assert result.exit_code == 2 and result.output.count("\n") == 1
        assert result.output.startswith(f"error: model {module}:BAD: {expected.split(':')[0]}: ")


def _branchy(x, u, c):
    if x[0] > 0:  # Python control flow on a traced value
        return (-c[0] * x[0],)
    return (c[0] * x[0],)


@pytest.mark.parametrize(("changes", "expected"), [
    ({"derivative": lambda x, u, c: (-c[0] * x[0], 0.0)}, r"model decay: derivative: returned 2 value\(s\), expected 1 "
                                                          r"\(x\)"),
    ({"output": lambda x, u, c: x[0]}, r"model decay: output: must return a tuple of arrays \(y\), got ndarray"),
    ({"output": lambda x, u, c: (x[1],)}, "model decay: output: raised IndexError: tuple index out of range"),
    ({"output": lambda x, u, c: (jnp.zeros(5),)}, r"model decay: output: y has shape \(5,\), which does not broadcast"),
    ({"output": lambda x, u, c: (jnp.log(c[0] - 0.5),)}, "model decay: output.y: not finite at k=0.5"),
    ({"derivative": lambda x, u, c: ((-c[0] * x[0]).astype(jnp.int32),)},  # passed, with an infinite stability limit
     "model decay: derivative: x is int32: return floating-point values"),
    ({"output": lambda x, u, c: (x[0] > 0.5,)}, "model decay: output: y is bool: return floating-point values"),
    ({"derivative": _branchy}, r"model decay: derivative \(under jax.jit\): raised TracerBoolConversionError"),
    ({"derivative": lambda x, u, c: (u[0] - c[0] * jnp.mean(x[0]),)},  # passed: right under vmap, not on a batch
     "model decay: derivative.x: mixes the scenarios of a batch: -2.125 for scenario 0 of a batch of two, -1 for it "
     r"alone \(a sum, mean, max or index across the arrays, .*\); write it for one scenario, elementwise: RayTwin "
     r"applies it to batches \(vmap, or arrays of scenarios\)$"),
    ({"output": lambda x, u, c: (jnp.flip(x[0]),)}, "model decay: output.y: mixes the scenarios of a batch"),
    ({"default_dt": 3.0}, "model decay: default_dt: step 3 s is beyond the RK4 stability limit 2.785 s at the "
                          r"default parameters \(declare default_dt at most 2.78 s, or solver=raytwin.sim.stiff.Adaptive\(\)"),
])
def test_wrong_models_fail_the_checks_with_one_line_reasons(changes, expected):
    with pytest.raises(ModelCheckError, match="^" + expected) as info:
        check_model(_model(**changes))
    assert "\n" not in str(info.value)


def test_a_model_no_check_ran_on_is_refused_by_simulate_and_sweeps_with_the_checks_one_line_reason(tmp_path,
                                                                                                   monkeypatch):
    """A model given by import path, never `raytwin models check`ed, raised JAX's multi-screen traceback from inside
    the stability check of `simulate` and of a sweep spec (TracerBoolConversionError), and an int cast passed."""
    from sweeps.spec import SweepSpec

    with pytest.raises(ModelCheckError, match=r"^model decay: derivative \(under jax.jit\): raised "
                                              r"TracerBoolConversionError"):
        simulate(_model(derivative=_branchy), [1.0], np.zeros((3, 1)), [1.0], 0.1)
    (tmp_path / "cast_models.py").write_text(textwrap.dedent("""
        import jax.numpy as jnp
        from raytwin.models import Model, Output, Param, State
        CAST = Model(name="cast", version="1.0.0", states=(State("x", "m", "", -10.0, 10.0, nominal=1.0),),
                     inputs=(), params=(Param("k", "1/s", 1.0, 0.5, 2.0),), outputs=(Output("y", "m"),),
                     coefficients=lambda p: p, derivative=lambda x, u, c: ((-c[0] * x[0]).astype(jnp.int32),),
                     output=lambda x, u, c: (x[0],), default_dt=0.1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"model cast: derivative: x is int32: return floating-point values"):
        SweepSpec(model="cast_models:CAST", start_state={"x": 1.0}, horizon_s=1.0, step_s=0.1,
                  space={"method": "random", "n": 2, "dimensions": [{"name": "k", "target": "param", "low": 0.5,
                                                                     "high": 2.0}]})


def test_a_model_unstable_somewhere_in_its_box_passes_with_a_warning_and_registration_refuses_those_values(tmp_path):
    report = check_model(THERMAL_RC)
    assert report.dt_max == pytest.approx(8656, rel=1e-3)  # the documented ~8.7e3 s
    assert report.box_dt_max < 60.0 and report.box_corner["C_in"] == 1e5
    assert "default_dt 60 s is beyond the RK4 stability limit" in report.warnings[0]
    registry, asset_type = ModelRegistry(str(tmp_path)), AssetType.from_model(THERMAL_RC)
    risky = {"C_in": 1e5, "R_im": 2e-4}  # admissible, and 60 s steps diverge to 1e266
    with pytest.raises(RegistryError, match=r"^zone@1.0.0: model thermal_rc: default_dt: step 60 s is beyond the RK4 "
                                            r"stability limit 54.35 s at C_in=100000, R_im=0.0002"):
        registry.register("zone", "1.0.0", asset_type, risky)
    assert registry.names() == []
    with pytest.warns(UnstableStepWarning, match="the run may diverge"):
        registry.register("zone", "1.0.0", asset_type, risky, allow_unstable=True)
    assert registry.get("zone@1.0.0").parameters["C_in"] == 1e5


# ----------------------------------------------------------------------------- stability ----
def test_rk4_limits_along_a_ray_match_the_analytic_values():
    limits = rk4_limits(np.array([-1.0, -50.0, 3j, 0.0, 0.2, -1.0 + 1.0j]))
    np.testing.assert_allclose(limits[:3], [RK4_REAL, RK4_REAL / 50.0, 2.0 * np.sqrt(2.0) / 3.0], rtol=1e-9)
    assert limits[3] == np.inf and limits[4] == np.inf  # no decay to lose: no limit
    z = limits[5] * (-1.0 + 1.0j)
    assert abs(1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24) == pytest.approx(1.0, abs=1e-9)


def test_the_limit_of_a_linear_model_is_2_785_over_lambda_and_a_step_just_over_it_diverges():
    model = _model()
    for k in (0.5, 1.0, 2.0):
        assert stability_limit(model, [k]) == pytest.approx(RK4_REAL / k, rel=1e-9)
    limit = stability_limit(model, [2.0])
    inputs = np.zeros((4000, 1))
    below = simulate(model, [1.0], inputs, [2.0], 0.999 * limit, dtype=jnp.float64)
    assert abs(below[-1, 0]) < 1.0
    with pytest.raises(UnstableStepError, match=r"^model decay: dt: step 1.39404 s is beyond the RK4 stability limit "
                                                r"1.393 s at k=2 \(use a smaller step, or allow_unstable=True\)$"):
        simulate(model, [1.0], inputs, [2.0], 1.001 * limit, dtype=jnp.float64)
    with pytest.warns(UnstableStepWarning):
        above = simulate(model, [1.0], inputs, [2.0], 1.001 * limit, dtype=jnp.float64, allow_unstable=True)
    assert abs(above[-1, 0]) > 1.0


def test_a_run_that_diverges_far_from_the_nominal_state_is_refused_naming_the_step_instead_of_returning_nan():
    """dx/dt = -k x^3 from x = 100: the step was checked at the nominal x = 1 (limit 0.93 s), and the 0.1 s step
    returned 2.3e110, then NaN, without a word. Checking at the start state instead would refuse an empty
    two-tank (its Jacobian is infinite at h = 0), a legitimate start: the run is checked."""
    cubic = _model(states=(State("x", "m", "level", -1e3, 1e3, nominal=1.0),),
                   params=(Param("k", "1/(m^2*s)", 1.0, 0.5, 2.0, "rate"),),
                   outputs=(Output("y", "m", "level", -1e3, 1e3),),
                   derivative=lambda x, u, c: (u[0] - c[0] * x[0] ** 3,))
    inputs = np.zeros((10, 1))
    with pytest.raises(DivergedRunError, match=(
            r"^model decay: dt: the run diverged: x not finite from step 2 \(t = 0.2 s from the start\), after "
            r"x=2.298e\+110 at step 1; the step 0.1 s was checked against RK4's stability limit at the model's nominal "
            r"state only \(at this start state the limit is 9.284e-05 s\): use a smaller step, or an adaptive "
            r"solver")) as info:
        simulate(cubic, [100.0], inputs, [1.0], 0.1, dtype=jnp.float64)
    assert (info.value.scenario, info.value.step, info.value.time_s, info.value.states) == (0, 2, 0.2, ["x"])
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)  # raised in a Ray task, it stays itself
    with pytest.raises(DivergedRunError, match=r"the run diverged: scenario 1 \(1 of 2 diverged\): x not finite "):
        simulate_batch(cubic, [[1.0], [100.0]], inputs, [[1.0], [1.0]], 0.1)  # float32: NaN from step 1
    with pytest.warns(UnstableStepWarning, match="the run diverged"):
        assert np.isnan(simulate(cubic, [100.0], inputs, [1.0], 0.1, allow_unstable=True)[-1, 0])
    t = 2000 * 5e-5  # a step under the start state's limit follows the exact x0 / sqrt(1 + 2 k x0^2 t)
    end = simulate(cubic, [100.0], np.zeros((2000, 1)), [1.0], 5e-5, dtype=jnp.float64)[-1, 0]
    assert end == pytest.approx(100.0 / math.sqrt(1.0 + 2.0 * 100.0**2 * t), rel=1e-5)
    empty = simulate(TWO_TANK, [0.0, 0.0], np.full((60, 1), 1e-4), TWO_TANK.param_vector(), 1.0)
    assert np.isfinite(empty).all() and empty[-1, 0] > 0.0  # filling from empty runs as before


def test_a_finite_run_beyond_float32s_range_is_refused_naming_the_dtype_not_the_step():
    """An adaptive model runs in float64 and returns float32 by default: a finite run past float32's range read as
    inf in the result and was refused as a divergence a smaller step would fix (the run is checked where it ran)."""
    from raytwin.sim.stiff import Adaptive

    growth = _model(solver=Adaptive(), derivative=lambda x, u, c: (c[0] * x[0],))  # x = e^(k t): 2.7e43 at 100 s
    inputs = np.zeros((100, 1))
    with pytest.raises(ModelCheckError, match=r"^model decay: dtype: the run's states reach 2\.\d+e\+43, beyond "
                                              r"float32's range: pass dtype=jnp.float64$"):
        simulate(growth, [1.0], inputs, [1.0], 1.0)
    assert simulate(growth, [1.0], inputs, [1.0], 1.0, dtype=jnp.float64)[-1, 0] == pytest.approx(math.exp(100.0),
                                                                                                  rel=1e-4)


def test_batches_and_rollouts_are_checked_over_their_parameter_box():
    model = _model()
    params = np.array([[0.5], [1.0], [2.0]])
    with pytest.raises(UnstableStepError, match="at the parameter corner k=2"):
        simulate_batch(model, np.ones((3, 1)), np.zeros((10, 1)), params, 2.0)
    assert simulate_batch(model, np.ones((2, 1)), np.zeros((10, 1)), params[:2], 2.0).shape == (2, 11, 1)
    with pytest.raises(UnstableStepError, match="^model decay: dt: step 2 s"):
        rollout(model, (jnp.ones(3),), unstack(params), 2.0, 10, (jnp.zeros((10, 3)),))



def test_a_step_is_checked_over_the_inputs_it_runs_with_not_only_the_nominal_ones(tmp_path, monkeypatch):
    """A tank drained through a valve stiffens as it opens: dh/dt = -opening k h. At the nominal opening 0.05
    the 0.1 s step is stable (limit 1.11 s); fully open, the limit is 0.056 s and RK4 returned 1e113 with no
    word, and a sweep over the opening reported finite garbage as valid. NaN inputs are refused too."""
    from sweeps import Dimension, ScenarioSpace, SweepSpec

    valve = _model(name="valve", inputs=(Input("opening", "-", "valve opening", 0.0, 1.0, nominal=0.05),),
                   params=(Param("k", "1/s", 50.0, 10.0, 60.0, "drain rate when open"),),
                   derivative=lambda x, u, c: (-u[0] * c[0] * x[0],))
    report = check_model(valve)
    assert report.dt_max == pytest.approx(2.785 / 2.5, rel=1e-3) and any(
        "beyond the RK4 stability limit 0.05571 s at opening=1 (within the inputs' declared ranges)" in w for w in report.warnings), report.warnings
    half_open = np.full((20, 1), 0.05)
    assert abs(simulate(valve, [1.0], half_open, [50.0], 0.1, dtype=jnp.float64)[-1, 0]) < 1.0
    with pytest.raises(UnstableStepError, match=r"step 0.1 s is beyond the RK4 stability limit 0.05571 s at "
                                                r"opening=1 \(use a smaller step"):
        simulate(valve, [1.0], np.full((20, 1), 1.0), [50.0], 0.1, dtype=jnp.float64)
    with pytest.raises(UnstableStepError, match="at the corner k=60, opening=1"):
        simulate_batch(valve, np.ones((2, 1)), np.concatenate([half_open, np.ones((20, 1))]).reshape(2, 20, 1),
                       np.array([[50.0], [60.0]]), 0.1)
    with pytest.raises(UnstableStepError, match="at opening=1"):
        rollout(valve, (jnp.ones(1),), (jnp.full(1, 50.0),), 0.1, 20, (jnp.ones((20, 1)),))
    with pytest.raises(ModelCheckError, match="inputs: opening: not finite"):
        simulate(valve, [1.0], np.full((20, 1), np.nan), [50.0], 0.01)
    with pytest.raises(TypeError, match=r"not a mapping: pass model.param_vector\(your_dict\)"):
        simulate(valve, [1.0], half_open, {"k": 50.0}, 0.01)
    (tmp_path / "valve_mod.py").write_text(textwrap.dedent("""
        from raytwin.models import Input, Model, Output, Param, State
        VALVE = Model(name="valve", version="1.0.0", states=(State("h", "m", "level", -10.0, 10.0, nominal=1.0),),
                      inputs=(Input("opening", "-", "valve opening", 0.0, 1.0, nominal=0.05),),
                      params=(Param("k", "1/s", 50.0, 10.0, 60.0, "drain rate when open"),),
                      outputs=(Output("y", "m", "level", -10.0, 10.0),), coefficients=lambda p: p,
                      derivative=lambda x, u, c: (-u[0] * c[0] * x[0],), output=lambda x, u, c: (x[0],),
                      default_dt=0.1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))

    def sweep(*openings: float) -> SweepSpec:
        return SweepSpec(model="valve_mod:VALVE", space=ScenarioSpace(method="grid", dimensions=[
            Dimension(name="opening", target="input", values=list(openings))]), horizon_s=2.0, step_s=0.1)

    sweep(0.02, 0.05)
    with pytest.raises(ValidationError, match="step_s: step 0.1 s is beyond the RK4 stability limit 0.05571 s at "
                                              "the corner opening=1"):
        sweep(0.05, 1.0)

    def driven(*means: float, amplitude: float = 0.02) -> SweepSpec:  # the opening follows a sinusoid
        return SweepSpec(model="valve_mod:VALVE", signals={"opening": {"kind": "sinusoid", "mean": "op_mean",
                         "amplitude": amplitude, "period_s": 0.4}}, inputs={"op_mean": means[0]},
                         space=ScenarioSpace(method="grid", dimensions=[Dimension(name="op_mean", target="input",
                                                                                  values=list(means))]),
                         horizon_s=2.0, step_s=0.1)

    driven(0.05, 0.08)  # reaches 0.1: stable
    with pytest.raises(ValidationError, match="beyond the RK4 stability limit 0.08985 s at the corner opening=0.62"):
        driven(0.05, 0.6)  # h_max 27.7 for a true 1e-13 was reported not diverged
    with pytest.raises(ValidationError, match="at the corner opening=1.15"):  # past its declared range
        driven(1.0, amplitude=0.15)


def test_a_non_finite_jacobian_names_every_parameter_value_and_does_not_blame_the_step(user_package):
    spring = get_model("acme_models.spring:SPRING")
    with pytest.raises(UnstableStepError, match=r"^model spring: params: parameters m=0, k=4, c=0.4 make the "
                                                r"derivative non-finite \(its Jacobian at the nominal state\): "
                                                r"m=0 is outside its bounds \[0.5, 2\] "
                                                r"\(allow_unstable=True runs it anyway\)$"):
        check_step(spring, 0.01, [0.0, 4.0, 0.4])
    with pytest.raises(UnstableStepError, match=r"^model spring: params: parameters m=0, k=4, c=0.4 \(a corner of the "
                                                r"parameter box\) make the derivative non-finite"):
        check_step(spring, 0.01, (np.array([-1.0, 0.0]), np.array([4.0, 4.0]), np.array([0.4, 0.4])))


def test_simulate_refuses_parameters_outside_their_bounds(user_package):
    """`simulate` ran them without a word, where sweeps, calibration, the registry and the API refuse them."""
    spring, x0, inputs = get_model("acme_models.spring:SPRING"), [0.1, 0.0], np.zeros((10, 1))
    with pytest.raises(ModelCheckError, match=r"^model spring: params: m=0.1 is outside its bounds \[0.5, 2\]: give "
                                              r"values within them, or widen the parameter's bounds in the model"):
        simulate(spring, x0, inputs, [0.1, 4.0, 0.4], 0.01)
    with pytest.raises(ModelCheckError, match=r"m=3 is outside its bounds \[0.5, 2\]: give"):  # one scenario of many
        simulate_batch(spring, [x0, x0], inputs, [[1.0, 4.0, 0.4], [3.0, 4.0, 0.4]], 0.01)
    assert simulate(spring, x0, inputs, [2.0, 4.0, 0.4], 0.01).shape == (11, 2)  # the bound itself is admissible


def test_the_admissible_thermal_corner_that_diverged_to_1e266_is_refused():
    params = THERMAL_RC.param_vector({"C_in": 1e5, "R_im": 2e-4})
    args = ([293.0, 293.0], np.tile([283.0, 0.0, 0.0], (1440, 1)), params, 60.0)
    with pytest.raises(UnstableStepError, match="limit 54.35 s at C_in=100000, R_im=0.0002"):
        simulate(THERMAL_RC, *args, dtype=jnp.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableStepWarning)
        diverged = simulate(THERMAL_RC, *args, dtype=jnp.float64, allow_unstable=True)
    assert not np.all(np.abs(diverged[-1]) < 1e100)


def test_a_sweep_whose_parameter_box_reaches_instability_is_refused():
    from sweeps.space import Dimension, ScenarioSpace
    from sweeps.spec import SweepSpec

    def spec(low: float, **kw) -> SweepSpec:
        space = ScenarioSpace(method="grid", dimensions=[
            Dimension(name="C_in", target="param", values=[low, 2e6]),
            Dimension(name="R_im", target="param", values=[2e-4, 2e-3])])
        return SweepSpec(model="thermal_rc", space=space, horizon_s=86400.0, step_s=60.0, **kw)

    assert spec(1e6).space.size == 4
    with pytest.raises(ValidationError) as info:
        spec(1e5)
    message = describe_error(info.value)
    assert "model thermal_rc: step_s: step 60 s is beyond the RK4 stability limit 54.35 s at the parameter corner " \
           "C_in=100000, R_im=0.0002" in message and "\n" not in message
    with pytest.warns(UnstableStepWarning):
        assert spec(1e5, allow_unstable=True).allow_unstable


# -------------------------------------------------------------------- hybrid models ----
def test_the_discrete_update_runs_after_each_rk4_step():
    """A sawtooth: x rises at 1/s and an event resets it to 0 once it reaches 1 (an update, not a derivative)."""
    saw = _model(derivative=lambda x, u, c: (jnp.ones_like(x[0]),),
                 update=lambda x, u, c: (jnp.where(x[0] >= 1.0 - 1e-9, 0.0, x[0]),),
                 params=(Param("k", "1/s", 1.0, 0.5, 2.0),))
    check_model(saw)
    for dtype in (jnp.float64, jnp.float32):
        traj = simulate(saw, [0.0], np.zeros((12, 1)), [1.0], 0.25, dtype=dtype)[:, 0]
        np.testing.assert_allclose(traj, [0, .25, .5, .75, 0, .25, .5, .75, 0, .25, .5, .75, 0], atol=1e-6)


# ------------------------------------------------------------------------------ the CLI ----
def test_models_cli_lists_shows_and_checks(user_package):
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and "spring\t0.1.0\tacme_models.spring:SPRING" in listed.output
    assert "thermal_rc\t1.0.0\traytwin.sim.thermal:THERMAL_RC" in listed.output
    shown = runner.invoke(app, ["models", "show", "acme_models.spring:SPRING"])
    assert shown.exit_code == 0 and "  k [N/m] default 4 [1, 10] stiffness" in shown.output
    checked = runner.invoke(app, ["models", "check", "spring"])
    assert checked.exit_code == 0 and checked.output.startswith("model spring: ok")
    refused = runner.invoke(app, ["models", "check", "spring", "--dt", "2"])
    assert refused.exit_code == 1
    assert refused.output.startswith("error: model spring: dt: step 2 s is beyond the RK4 stability limit")
    unknown = runner.invoke(app, ["models", "show", "pump"])
    assert unknown.exit_code == 2 and unknown.output.startswith("error: unknown simulator 'pump'")


def test_user_models_and_the_reference_models_use_only_the_public_api():
    root = Path(__file__).resolve().parents[1] / "raytwin" / "sim"
    for source in (USER_PACKAGE, *((root / f).read_text() for f in ("thermal.py", "battery.py", "tanks.py"))):
        lines = textwrap.dedent(source).splitlines()
        imports = [line for line in lines if line.startswith(("from raytwin", "import raytwin"))]
        assert imports == ["from raytwin.models import Input, Model, Output, Param, State"]


# ------------------------------------------------------------------------------ float64 ----
X64_PROBE = '''
import importlib, pkgutil, jax, numpy as np, jax.numpy as jnp
names = []
for top in ("raytwin", "actors", "sweeps", "serve_apps", "cluster", "benchmarks"):
    package = importlib.import_module(top)
    names += [m.name for m in pkgutil.walk_packages(package.__path__, top + ".") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
assert not jax.config.jax_enable_x64, "an import turned jax_enable_x64 on"

from raytwin.estimation import ExtendedKalmanFilter
from raytwin.sim import THERMAL_RC, simulate
from raytwin.sim.reference import model_rhs
from sweeps.space import _uniform_columns

p = THERMAL_RC.param_vector()
u = np.tile([278.15, 1000.0, 0.0], (1440, 1))
f64 = simulate(THERMAL_RC, [293.15, 293.15], u, p, 60.0, dtype=jnp.float64)
f32 = simulate(THERMAL_RC, [293.15, 293.15], u, p, 60.0)
assert f64.dtype == np.float64 and f32.dtype == np.float32 and 0 < np.max(np.abs(f64 - f32)) < 1e-2
ekf = ExtendedKalmanFilter(THERMAL_RC, p)
prior = ekf.initial()._replace(t=0.0)
fs = ekf.predict(prior, 1e-3)  # a change of 5e-7 K that float32 (ulp 3e-5 K at 293 K) would round away
assert fs.x.dtype == np.float64 and 0 < prior.x[0] - fs.x[0] < 1e-6
assert model_rhs(THERMAL_RC, p)(np.array([293.15, 293.15 + 1e-9]), np.zeros(3)).dtype == np.float64
assert _uniform_columns(0, np.arange(4), 2).dtype == np.float64
assert jnp.zeros(1).dtype == jnp.float32 and not jax.config.jax_enable_x64
print("ok", len(names))
'''


def test_importing_raytwin_leaves_jax_x64_alone_and_its_float64_paths_stay_float64():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", X64_PROBE], capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok ")


def test_float64_callbacks_leave_the_precision_of_xlas_threads_alone(monkeypatch):
    """A host callback's float64 arguments and result cross a thread where float64 is off (as XLA's
    own threads may be) bit for bit, its JAX code computes in float64 there, and that thread's setting
    is the same afterwards: a user's float32 callback run there next still computes in float32."""
    import threading

    import jax

    from raytwin.sim import precision

    targets = []
    real = jax.pure_callback
    monkeypatch.setattr(jax, "pure_callback", lambda fn, *a, **kw: (targets.append(fn), real(fn, *a, **kw))[1])
    with precision.float64():
        third = jax.jit(lambda x: precision.float64_callback(lambda v: jnp.asarray(v) / 3.0, x.shape, x))(np.ones(2))
    assert third.dtype == np.float64 and third.tolist() == [1.0 / 3.0] * 2  # exact: no float32 on the way
    (host,) = targets

    def on_a_float32_thread(seen: dict) -> None:
        from jax._src import dtypes

        before = jax.config.jax_enable_x64
        packed = np.full(2, 1.0).view(np.uint32).reshape(2, 2)  # the argument as the kernel sends it
        bits = dtypes.canonicalize_value(host(packed))  # what XLA does with the result there
        seen.update(before=before, after=jax.config.jax_enable_x64, bits=bits.dtype, user=jnp.zeros(()).dtype,
                    value=bits.view(np.float64).ravel().tolist())

    seen: dict = {}
    worker = threading.Thread(target=on_a_float32_thread, args=(seen,))
    worker.start()
    worker.join()
    assert seen == {"before": False, "after": False, "bits": np.uint32, "user": jnp.float32,
                    "value": [1.0 / 3.0] * 2}


# ------------------------------------------------------------------------ stiff models ----
def test_a_stiff_model_declares_an_adaptive_implicit_solver_and_matches_radau():
    from raytwin.sim.checks import check_step
    from raytwin.sim.reference import model_rhs, reference_trajectory, relative_error
    from raytwin.sim.stiff import Adaptive

    with pytest.raises(ModelCheckError, match=r"^model robertson: default_dt: step 10 s is beyond the RK4 stability "
                                              r"limit 0.00\d+ s"):
        check_model(robertson())  # RK4 would need steps of a millisecond for 40 s
    stiff = robertson(solver=Adaptive(rtol=1e-8, atol=1e-12))
    assert check_step(stiff, 10.0).dt_max == np.inf  # its own step control, no RK4 limit (check_model: ~10 s compile)
    params, x0, inputs = stiff.param_vector(), [1.0, 0.0, 0.0], np.zeros((40, 0))
    traj = simulate(stiff, x0, inputs, params, 10.0, dtype=jnp.float64)
    reference = reference_trajectory(model_rhs(stiff, params), np.array(x0), inputs, 10.0, method="Radau",
                                     rtol=1e-11, atol=1e-14)
    assert relative_error(traj, reference) < 1e-5
    np.testing.assert_allclose(traj.sum(axis=1), 1.0, atol=1e-9)  # mass is conserved
    with pytest.raises(ValueError, match="'Nope' is not a diffrax solver"):
        Adaptive(method="Nope")


def test_a_stiff_model_runs_in_float64_when_float32_is_asked_for_and_a_float32_rollout_is_refused():
    """Kvaerno5 fails in float32 (max_steps reached), which simulations and sweeps use by default."""
    from raytwin.sim.reference import model_rhs, reference_trajectory, relative_error
    from raytwin.sim.stiff import Adaptive

    stiff = robertson(solver=Adaptive())
    params, x0, inputs = stiff.param_vector(), [1.0, 0.0, 0.0], np.zeros((10, 0))
    traj = simulate(stiff, x0, inputs, params, 10.0)  # the default dtype, float32
    reference = reference_trajectory(model_rhs(stiff, params), np.array(x0), inputs, 10.0, method="Radau",
                                     rtol=1e-11, atol=1e-14)
    assert traj.dtype == np.float32 and relative_error(traj, reference) < 1e-5
    batch = simulate_batch(stiff, [x0, x0], inputs[:5], [params, params], 10.0)
    assert batch.dtype == np.float32 and relative_error(batch[1], reference[:6]) < 1e-5
    with pytest.raises(ModelCheckError, match=r'^model robertson: solver: Adaptive\(Kvaerno5\) integrates in float64 '
                                              r'only, not float32: run it in float64 \(simulate, simulate_batch and sweeps'):
        rollout(stiff, tuple(jnp.float32(v) for v in x0), tuple(jnp.float32(v) for v in params), 10.0, 3, ())
    assert "in float64 only: simulate, simulate_batch and sweeps choose float64 for it" in \
        check_model(stiff).lines()[1]


def test_a_model_with_unbounded_parameters_is_refused_by_the_checks_not_at_construction():
    """An FMU without min/max has unbounded parameters; the checks need a box to probe."""
    import dataclasses

    from raytwin.models import Param, check_model
    from raytwin.sim import THERMAL_RC
    from raytwin.sim.model import ModelCheckError

    unbounded = (dataclasses.replace(THERMAL_RC.params[0], lower=-math.inf), *THERMAL_RC.params[1:])
    model = dataclasses.replace(THERMAL_RC, name="thermal_unbounded", params=unbounded)
    with pytest.raises(ModelCheckError, match=r"thermal_unbounded: params.C_in: bounds \[-inf, .*must be finite"):
        check_model(model)
    with pytest.raises(ValueError, match="default must be finite"):
        Param("p", "-", math.inf, 0.0, 1.0)


def test_model_errors_cross_processes_as_themselves():
    """An `UnstableStepError` raised in a Ray task (a recommendation's check) could not be unpickled: Ray handed
    the route an unserializable error and the client a 500 instead of the 422 naming the stable step."""
    import pickle

    from raytwin.query import QuerySyntaxError
    from raytwin.sim.model import DeclarationError

    for error in (UnstableStepError("thermal_rc", "step_s", "step 900 s ... largest stable step is 804.2 s"),
                  ModelCheckError("pump", "states[1]", "unit 'bar' is unknown"),
                  DeclarationError("params.m", "lower > upper"), QuerySyntaxError("unexpected ')'", 7)):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error) and vars(back) == vars(error)
