"""What-if sweeps: scenario spaces, the jitted engine against solve_ivp, Ray runs, retries, quantiles, CLI."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from raytwin.sim import BATTERY_ECM, THERMAL_RC
from raytwin.sim.precision import float64
from raytwin.sim.reference import model_rhs, reference_trajectory
from sweeps import engine, runner
from sweeps.aggregate import open_dataset, quantiles
from sweeps.cli import sweep_app
from sweeps.engine import Bases, chunk_metrics, scenario_arrays
from sweeps.reference_kits import BATTERY, THERMAL
from sweeps.runner import FAULT_ENV, TRAJECTORY_FILE, run_sweep
from sweeps.space import Dimension, ScenarioSpace
from sweeps.spec import SweepSpec
from tests.ray_metrics import total, wait_until


THERMAL_KIT, BATTERY_KIT = THERMAL.compile(), BATTERY.compile()


def _space(method="lhs", n=600, seed=3):
    dims = [
        Dimension(name="C_in", target="param", mode="scale", low=0.7, high=1.3),
        Dimension(name="R_io", target="param", mode="scale", low=0.7, high=1.3),
        Dimension(name="T_out_mean", target="input", low=263.15, high=283.15),
    ]
    return ScenarioSpace(method=method, n=n, seed=seed, dimensions=dims)


def _thermal_spec(**kw):
    base = dict(model="thermal_rc", space=_space(), horizon_s=86400.0, step_s=120.0, chunk_size=256)
    return SweepSpec(**{**base, **kw})


# ------------------------------------------------------------------------ spaces ----
def test_grid_enumerates_the_product_in_index_order():
    space = ScenarioSpace(method="grid", dimensions=[
        Dimension(name="C_in", target="param", values=[1.0, 2.0]),
        Dimension(name="setpoint", target="input", low=290.0, high=294.0, levels=3),
    ])
    assert space.size == 6
    expected = [[a, b] for a in (1.0, 2.0) for b in (290.0, 292.0, 294.0)]
    np.testing.assert_array_equal(space.rows(0, 6), expected)
    np.testing.assert_array_equal(space.rows(4, 6), expected[4:])


@pytest.mark.parametrize("method", ["random", "lhs"])
def test_samples_depend_only_on_the_scenario_index(method):
    space = _space(method, n=500)
    whole = space.rows(0, 500)
    np.testing.assert_array_equal(whole[123:321], _space(method, n=500).rows(123, 321))
    assert whole[:, 0].min() >= 0.7 and whole[:, 0].max() <= 1.3
    assert not np.array_equal(whole, _space(method, n=500, seed=4).rows(0, 500))


def test_latin_hypercube_puts_one_sample_in_each_stratum():
    rows = _space("lhs", n=200).rows(0, 200)
    strata = np.floor((rows[:, 2] - 263.15) / 20.0 * 200).astype(int)
    assert sorted(strata) == list(range(200))


def test_a_space_refuses_a_seed_jax_cannot_take_and_samples_with_the_largest_it_takes():
    """A random space seeded with 2**63 or more failed its sweep inside `jax.random.key` (OverflowError: a 500 over
    HTTP, a failed job); the contract refuses it, naming the limit."""
    from sweeps.space import SEED_MAX

    dims = [Dimension(name="C_in", target="param", low=1, high=2)]
    assert ScenarioSpace(method="random", n=2, seed=SEED_MAX, dimensions=dims).rows(0, 2).shape == (2, 1)
    with pytest.raises(ValueError, match=f"seed\n  Input should be less than or equal to {SEED_MAX}"):
        ScenarioSpace(method="random", n=2, seed=SEED_MAX + 1, dimensions=dims)


def test_spaces_and_specs_refuse_bad_input():
    with pytest.raises(ValueError, match="needs n"):
        ScenarioSpace(method="random", dimensions=[Dimension(name="C_in", target="param", low=1, high=2)])
    with pytest.raises(ValueError, match="low and high"):
        Dimension(name="C_in", target="param")
    with pytest.raises(ValueError, match="unknown; known params"):
        _thermal_spec(space=ScenarioSpace(method="random", n=4, dimensions=[
            Dimension(name="C_nope", target="param", low=1, high=2)]))
    with pytest.raises(ValueError, match="whole number of steps"):
        _thermal_spec(horizon_s=1000.0, step_s=300.0)
    with pytest.raises(ValueError, match="outside the 600 scenarios"):
        _thermal_spec(trajectories=[600])
    with pytest.raises(ValueError, match="too many"):
        _thermal_spec(trajectories=list(range(600)), horizon_s=86400.0 * 365, step_s=60.0)


def test_a_refused_spec_says_why_in_plain_lines_and_is_still_a_validation_error(tmp_path):
    """A spec's refusal was pydantic's "1 validation error for SweepSpec / Value error, ... [type=value_error,
    input_value={...}] For further information visit https://errors.pydantic.dev": the reason, one line a field."""
    from raytwin.contracts import SpecError
    from sweeps.calibration import CalibrationSpec

    with pytest.raises(SpecError) as refused:
        _thermal_spec(inputs={"setpont": 293.15})
    assert isinstance(refused.value, ValidationError)  # code catching pydantic's error still does
    assert str(refused.value).startswith("sweep over thermal_rc: unknown input name(s) ['setpont']; known: [")
    with pytest.raises(SpecError) as refused:
        SweepSpec.model_validate({"model": "thermal_rc", "space": _space().model_dump(), "horizon_s": -1.0})
    assert str(refused.value) == "horizon_s: Input should be greater than 0\nstep_s: Field required"
    with pytest.raises(SpecError) as refused:
        CalibrationSpec(model="thermal_rc", free=["C_in"], telemetry=str(tmp_path / "t.parquet"), start_state={},
                        lossy=1)
    assert str(refused.value) == "lossy: Extra inputs are not permitted"


def test_a_model_named_by_its_import_path_sweeps():
    """README, "Add your own model": a model may be named by its import path; the spec checked it under its
    bare name, which only an installed entry point resolves."""
    spec = SweepSpec(model="tests.schema_models:ROOM_V1", horizon_s=3600.0, step_s=60.0,
                     space=ScenarioSpace(method="grid", dimensions=[Dimension(name="R", target="param", mode="scale",
                                                                              values=[0.5, 2.0])]))
    simulator, bases = runner.prepare(spec)
    assert simulator.endswith(":ROOM_V1") and bases.params["R"] == 0.01  # the path it was found under


def test_values_outside_the_bounds_and_plausible_ranges_are_refused_naming_dimension_value_and_range(tmp_path):
    """A negative or huge resistance and a setpoint of 1e308 K are no what-ifs (their results would look
    valid): each scaled or absolute dimension value, `parameters` and `inputs` entry is checked, for a
    simulator name by the spec, for a registry model around the artifact's parameters by the runner."""
    from raytwin.contracts import AssetType
    from raytwin.registry import ModelRegistry

    def spec(*dims: Dimension, model: str = "thermal_rc", **kw) -> SweepSpec:
        return SweepSpec(model=model, space=ScenarioSpace(method="grid", dimensions=list(dims)), horizon_s=3600.0,
                         step_s=60.0, **kw)

    r_io = Dimension(name="R_io", target="param", mode="scale", values=[1.0])
    for dims, kw, message in (
        ([Dimension(name="R_io", target="param", mode="scale", values=[-1.0, 1.0, 1e308])], {},
         "dimension param.R_io: scale -1, 1e+308 of R_io=0.01 K/W outside [0.001, 100] (R_io's bounds [1e-05, 1] K/W)"),
        ([Dimension(name="R_io", target="param", values=[0.5, 2.0])], {},
         "dimension param.R_io: value 2 outside R_io's bounds [1e-05, 1] K/W"),
        ([Dimension(name="setpoint", target="input", low=290.0, high=1e308, levels=2)], {},
         "dimension input.setpoint: value 1e+308 outside setpoint's plausible range [173.15, 473.15] K"),
        ([r_io], {"inputs": {"setpoint": 1e308}, "parameters": {"C_in": -5.0}},
         "parameters.C_in=-5 outside C_in's bounds [100000, 1e+08] J/K; "
         "inputs.setpoint=1e+308 outside setpoint's plausible range [173.15, 473.15] K"),
        ([Dimension(name="solar_peak", target="input", mode="scale", values=[0.5, 2.0])],
         {"inputs": {"solar_peak": 0.0}},
         "dimension input.solar_peak: scales solar_peak, whose base value is 0, so every scenario has solar_peak=0 "
         "(its column would show the factors); sweep it with mode \"absolute\""),
        ([r_io], {"start_state": {"T_in": 1e6, "T_m": 293.15}},  # every scenario was "diverged" at its start
         "start_state.T_in=1e+06 outside T_in's plausible range [173.15, 473.15] K"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"sweep over thermal_rc: {message}")):
            spec(*dims, **kw)
    spec(Dimension(name="R_io", target="param", mode="scale", values=[0.01, 100.0]), inputs={"setpoint": 473.15})

    registry = str(tmp_path / "models")  # R_io 0.02 there: the allowed scales halve
    ModelRegistry(registry).register("zone", "1.0.0", AssetType.from_model(THERMAL_RC), {"R_io": 0.02})
    huge = spec(Dimension(name="R_io", target="param", mode="scale", values=[1.0, 60.0]), model="zone@1.0.0",
                registry_url=registry)  # the spec alone cannot know the artifact's R_io
    with pytest.raises(ValueError, match=re.escape("dimension param.R_io: scale 60 of R_io=0.02 K/W outside "
                                                   "[0.0005, 50] (R_io's bounds [1e-05, 1] K/W)")):
        runner.prepare(huge)


# ------------------------------------------------------------------------ engine ----
def test_thermal_metrics_match_solve_ivp_open_loop():
    """Heater off: inputs are known functions of time, so solve_ivp gives an independent reference."""
    dt, n_steps = 300.0, 288
    inputs = {**THERMAL_KIT.default_inputs(), "heater_gain": 0.0, "comfort_low": 285.0, "comfort_high": 291.0}
    bases = Bases(THERMAL_KIT.start_state, THERMAL_RC.default_params(), inputs)
    dims = [Dimension(name="C_in", target="param", mode="scale", values=[0.7, 1.0, 1.3])]
    rows = np.array([[0.7], [1.0], [1.3]])
    got = chunk_metrics(THERMAL_KIT, bases, dims, rows, dt, n_steps, 8, "float64")
    t = dt * np.arange(n_steps)
    t_out = inputs["T_out_mean"] + inputs["T_out_amplitude"] * np.sin(2 * np.pi / 86400 * (t - 9 * 3600))
    q_sol = inputs["solar_peak"] * np.maximum(np.sin(2 * np.pi / 86400 * (t - 6 * 3600)), 0.0)
    u = np.column_stack([t_out, np.zeros(n_steps), q_sol])
    for k, scale in enumerate(rows[:, 0]):
        p = THERMAL_RC.param_vector({"C_in": 2.0e6 * scale})
        ref = reference_trajectory(model_rhs(THERMAL_RC, np.asarray(p)), np.array([293.15, 291.15]), u, dt)[:, 0]
        # RK4 at 300 s is accurate to ~1e-6 of the range; extremes include the start state
        assert got["T_in_max"][k] == pytest.approx(ref.max(), abs=1e-5)
        assert got["T_in_min"][k] == pytest.approx(ref.min(), abs=1e-5)
        outside = dt * np.sum((ref[1:] < 285.0) | (ref[1:] > 291.0))  # time counts the steps taken
        assert abs(got["discomfort_s"][k] - outside) <= dt  # a step may sit on the band edge
        assert outside > 0 and got["energy_kwh"][k] == 0.0


def test_battery_metrics_match_analytic_and_solve_ivp():
    dt, n_steps = 1.0, 1800
    inputs = {**BATTERY_KIT.default_inputs(), "v_limit": 3.9}
    bases = Bases(BATTERY_KIT.start_state, BATTERY_ECM.default_params(), inputs)
    dims = [Dimension(name="current_a", target="input", values=[1.0, 5.0])]
    got = chunk_metrics(BATTERY_KIT, bases, dims, np.array([[1.0], [5.0]]), dt, n_steps, 4, "float64")
    on = (np.arange(n_steps) % 600) < 300
    for k, current in enumerate((1.0, 5.0)):
        charge = current * on.sum() * dt / 3600.0
        assert got["charge_ah"][k] == pytest.approx(charge, rel=1e-12)
        assert got["soc_min"][k] == pytest.approx(0.9 - charge / 2.5, rel=1e-9)
        u = (current * on)[:, None]
        x = reference_trajectory(model_rhs(BATTERY_ECM, np.asarray(BATTERY_ECM.param_vector())),
                                 np.array([0.9, 0.0, 0.0]), u, dt)[1:]
        v = np.asarray(BATTERY_ECM.observe(tuple(x.T), (u[:, 0],), tuple(BATTERY_ECM.param_vector())))[0]
        assert got["v_terminal_min"][k] == pytest.approx(v.min(), abs=1e-7)


def test_a_scenario_does_not_depend_on_its_chunk_neighbours():
    space = _space(n=64)
    bases = Bases(THERMAL_KIT.start_state, THERMAL_RC.default_params(), THERMAL_KIT.default_inputs())
    rows = space.rows(0, 64)
    full = chunk_metrics(THERMAL_KIT, bases, space.dimensions, rows, 120.0, 720, 64, "float32")
    part = chunk_metrics(THERMAL_KIT, bases, space.dimensions, rows[10:13], 120.0, 720, 64, "float32")
    for name in full:
        np.testing.assert_array_equal(full[name][10:13], part[name])


def test_cpu_vector_width_option_changes_no_bit_of_the_metrics():
    """The engine compiles with CPU_COMPILER_OPTIONS (512-bit vectors): elementwise IEEE arithmetic,
    so the metrics are bit-identical to XLA's default code (run records and reruns rely on it)."""
    space = _space(n=40)
    bases = Bases(THERMAL_KIT.start_state, THERMAL_RC.default_params(), THERMAL_KIT.default_inputs())
    x0, params, ip = scenario_arrays(THERMAL_KIT, bases, space.dimensions, space.rows(0, 40), "float32")
    dt = jnp.asarray(120.0, jnp.float32)
    default = jax.jit(engine._metrics_fn, static_argnames=("kit", "n_steps", "unroll"))(THERMAL_KIT, 720, 1, x0,
                                                                                          params, ip, dt)
    product = engine._metrics(THERMAL_KIT, 720, 1, x0, params, ip, dt)
    for a, b in zip(default, product, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scan_unroll_is_per_platform_and_computes_the_same_metrics():
    """GPUs run 8 RK4 steps per scan iteration (fewer kernel launches), CPUs one; same arithmetic."""
    space = _space(n=16)
    bases = Bases(THERMAL_KIT.start_state, THERMAL_RC.default_params(), THERMAL_KIT.default_inputs())
    x0, params, ip = scenario_arrays(THERMAL_KIT, bases, space.dimensions, space.rows(0, 16), "float64")
    (device,) = x0[0].devices()
    assert engine.scan_unroll(x0[0]) == (8 if device.platform == "gpu" else 1)
    with float64():  # the kernel itself, without chunk_metrics' scope
        dt = jnp.asarray(120.0, jnp.float64)
        one = engine._metrics(THERMAL_KIT, 725, 1, x0, params, ip, dt)  # 725 = 90 x 8 + 5: a partial last iteration
        eight = engine._metrics(THERMAL_KIT, 725, 8, x0, params, ip, dt)
    for a, b in zip(one, eight, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-9)


def test_values_no_dimension_sets_are_chunk_scalars_with_the_same_metrics():
    space = _space(n=24)  # sets C_in, R_io, T_out_mean; every other parameter and input is shared
    bases = Bases(THERMAL_KIT.start_state, THERMAL_RC.default_params(), THERMAL_KIT.default_inputs())
    x0, params, ip = scenario_arrays(THERMAL_KIT, bases, space.dimensions, space.rows(0, 24), "float32")
    assert [np.ndim(p) for p in params] == [1, 0, 0, 0, 1, 0]
    assert {k for k, v in ip.items() if np.ndim(v)} == {"T_out_mean"}
    assert all(np.shape(x) == (24,) for x in x0)
    full = lambda a: jnp.broadcast_to(a, (24,))  # noqa: E731
    dt = jnp.asarray(120.0, jnp.float32)
    shared = engine._metrics(THERMAL_KIT, 720, 1, x0, params, ip, dt)
    per_scenario = engine._metrics(THERMAL_KIT, 720, 1, x0, tuple(map(full, params)),
                                   {k: full(v) for k, v in ip.items()}, dt)
    for a, b in zip(shared, per_scenario, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------- Ray runs ----
def test_sweep_on_ray_writes_the_dataset_and_retries_a_lost_worker(ray_session, ray_metrics_port, tmp_path,
                                                                   monkeypatch):
    spec = _thermal_spec(trajectories=[0, 599])
    clean = run_sweep(spec, str(tmp_path / "clean"), progress=False)
    # its scenarios are counted by simulator (a bounded tag: raytwin.sim.discovery.simulator_label), never by model
    done = wait_until(ray_metrics_port, lambda s: total(s, "ray_raytwin_sweep_scenarios_total", simulator="thermal_rc")
                      >= 600, "the sweep's scenarios by simulator")
    assert not any("model" in labels for labels, _ in done["ray_raytwin_sweep_scenarios_total"])
    assert clean.n_chunks == 3 and set(clean.outputs) == {
        "part-000000.parquet", "part-000001.parquet", "part-000002.parquet", TRAJECTORY_FILE}
    table = open_dataset(str(tmp_path / "clean")).to_table().sort_by("scenario")
    assert table.num_rows == 600
    np.testing.assert_array_equal(table["scenario"].to_numpy(), np.arange(600))
    np.testing.assert_array_equal(table["input.T_out_mean"].to_numpy(), spec.space.rows(0, 600)[:, 2])
    # the distributed result is exactly the single-process engine's on the same chunk
    bases = Bases(THERMAL_KIT.start_state, THERMAL_RC.default_params(), THERMAL_KIT.default_inputs())
    local = chunk_metrics(THERMAL_KIT, bases, spec.space.dimensions, spec.space.rows(256, 512), 120.0, 720, 256,
                          "float32")
    np.testing.assert_array_equal(table["energy_kwh"].to_numpy()[256:512], local["energy_kwh"])
    # colder winters need more heating energy
    cold = table["input.T_out_mean"].to_numpy() < 268
    warm = table["input.T_out_mean"].to_numpy() > 278
    assert table["energy_kwh"].to_numpy()[cold].mean() > table["energy_kwh"].to_numpy()[warm].mean()
    traj = pq.read_table(tmp_path / "clean" / TRAJECTORY_FILE)
    last = traj["T_in"].to_numpy()[traj["scenario"].to_numpy() == 599]
    assert last.size == 721 and np.max(last) == pytest.approx(table["T_in_max"][599].as_py(), rel=1e-6)

    # the first attempt of chunk 1 kills its worker; Ray retries it and the result is identical
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv(FAULT_ENV[0], "1")
    monkeypatch.setenv(FAULT_ENV[1], str(markers))
    faulty = run_sweep(spec, str(tmp_path / "faulty"), progress=False)
    assert os.path.exists(markers / "crashed-1")
    assert faulty.outputs == clean.outputs


def test_a_stiff_model_sweeps_in_float64_when_float32_is_asked_for(ray_session, tmp_path):
    """A model declared with `Adaptive()` (README: how stiff models are declared) fails in float32 (its
    steps run out); a sweep, float32 by default, integrates it in float64 and matches Radau."""
    from tests.stiff_models import ROBERTSON

    spec = SweepSpec(model="tests.stiff_models:ROBERTSON", horizon_s=40.0, step_s=10.0, space=ScenarioSpace(
        method="grid", dimensions=[Dimension(name="k1", target="param", mode="scale", values=[0.5, 1.0])]))
    assert spec.dtype == "float32"
    run_sweep(spec, str(tmp_path / "out"), progress=False)
    table = open_dataset(str(tmp_path / "out")).to_table().sort_by("scenario")
    params = ROBERTSON.param_vector()
    for row, scale in enumerate((0.5, 1.0)):
        x = reference_trajectory(model_rhs(ROBERTSON, params * np.array([scale, 1.0, 1.0])),
                                 np.array([s.nominal for s in ROBERTSON.states]), np.zeros((4, 0)), 10.0,
                                 method="Radau", rtol=1e-11, atol=1e-14)
        assert table.column("y3_final")[row].as_py() == pytest.approx(x[-1, 2], rel=1e-6)
    assert table.schema.field("y3_final").type == "double"  # computed, and kept, in float64


@pytest.mark.parametrize("method", ["random", "grid"])
def test_chunk_tasks_draw_the_rows_the_driver_would(ray_session, tmp_path, method):
    """Grid and random scenarios follow from their index, so each chunk task draws its own rows (an LHS
    design travels from the driver, above): the dataset holds exactly `ScenarioSpace.rows`' values."""
    space = _space("random", n=600) if method == "random" else ScenarioSpace(method="grid", dimensions=[
        Dimension(name="C_in", target="param", mode="scale", low=0.7, high=1.3, levels=30),
        Dimension(name="T_out_mean", target="input", low=263.15, high=283.15, levels=20)])
    spec = _thermal_spec(space=space)
    assert space.indexed and run_sweep(spec, str(tmp_path / "out"), progress=False).n_chunks == 3
    table = open_dataset(str(tmp_path / "out")).to_table().sort_by("scenario")
    rows = space.rows(0, 600)
    for j, column in enumerate(space.columns):
        np.testing.assert_array_equal(table[column].to_numpy(), rows[:, j])
    bases = Bases(THERMAL_KIT.start_state, THERMAL_RC.default_params(), THERMAL_KIT.default_inputs())
    local = chunk_metrics(THERMAL_KIT, bases, space.dimensions, space.rows(512, 600), 120.0, 720, 256, "float32")
    np.testing.assert_array_equal(table["energy_kwh"].to_numpy()[512:], local["energy_kwh"])


def test_ctrl_c_cancels_outstanding_chunks(ray_session, tmp_path, monkeypatch, cancelled_tasks):
    from sweeps import runner

    def interrupted_wait(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.ray, "wait", interrupted_wait)
    with pytest.raises(runner.SweepCancelled, match="cancelled after 0/600 scenarios"):
        run_sweep(_thermal_spec(), str(tmp_path / "out"), progress=False, max_in_flight=2)
    assert len(cancelled_tasks) == 2  # the whole in-flight window


def test_a_local_ray_start_after_jax_prints_no_fork_warning_and_other_forks_still_do(monkeypatch):
    """`raytwin sweep run` and `rerun` printed JAX's "os.fork() was called ... deadlock" warning: Ray forks its
    processes with a preexec_fn and execs them (harmless), after the spec's checks started JAX's backend."""
    import subprocess
    import warnings

    import jax

    from sweeps import runner

    def ray_like_start(**kwargs):  # what ray.init does for a local cluster: ConsolePopen(..., preexec_fn=...)
        subprocess.run(["true"], preexec_fn=lambda: None, check=True)

    jax.devices()  # JAX's at-fork hook is installed
    monkeypatch.setattr(runner.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runner.ray, "init", ray_like_start)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner.ensure_ray()
        assert not [w for w in caught if "os.fork() was called" in str(w.message)]
        ray_like_start()  # anywhere else, it still warns
        assert [w for w in caught if "os.fork() was called" in str(w.message)]


def test_sweep_refuses_a_non_empty_output(ray_session, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        run_sweep(_thermal_spec(), str(tmp_path / "out"))


def test_run_sweep_and_recorded_sweep_refuse_a_huge_design_up_front_saying_how_to_run_it(tmp_path, monkeypatch):
    """A Python sweep had no size limit (the CLI refused over 1e8 scenarios): an LHS design of 1e9 scenarios died in
    the driver with a MemoryError drawing it. Refused before the design is drawn, Ray starts or anything is written."""
    from sweeps.limits import SweepTooLarge
    from sweeps.runs import recorded_sweep

    monkeypatch.setattr(runner, "ensure_ray", lambda: pytest.fail("a refused sweep started Ray"))
    spec = _thermal_spec(space=_space(n=10**9))
    with pytest.raises(SweepTooLarge, match=r"1,000,000,000 scenarios of 720 steps would write about .* more than "
                       r"max_scenarios=100,000,000; pass max_scenarios=1000000000 to run it, or run it as several "
                       r"smaller sweeps \(a smaller design"):
        run_sweep(spec, str(tmp_path / "out"))
    with pytest.raises(SweepTooLarge, match="pass max_scenarios=1000000000 to run it"):
        recorded_sweep(spec, runs=str(tmp_path / "runs"))
    with pytest.raises(SweepTooLarge, match="more than max_scenarios=599"):
        run_sweep(_thermal_spec(), str(tmp_path / "out"), max_scenarios=599)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
    assert "_lhs_design" not in spec.space.__dict__  # the design was never drawn


def test_sweep_to_s3_and_quantiles_match_numpy(ray_session, s3_url):
    space = ScenarioSpace(method="grid", dimensions=[
        Dimension(name="T_out_mean", target="input", values=[268.15, 278.15]),
        Dimension(name="C_in", target="param", mode="scale", low=0.7, high=1.3, levels=40),
    ])
    spec = _thermal_spec(space=space, chunk_size=32)
    url = f"{s3_url}/sweep"
    run_sweep(spec, url, progress=False)
    table = open_dataset(url).to_table()
    assert table.num_rows == 80
    bands = quantiles(url, ["energy_kwh", "T_in_min"], q=(0.05, 0.5, 0.95)).to_pylist()
    for row in bands:
        values = table[row["metric"]].to_numpy().astype(np.float64)
        expected = np.quantile(values, [0.05, 0.5, 0.95])
        assert [row["q0.05"], row["q0.5"], row["q0.95"]] == pytest.approx(expected, rel=1e-12)
    grouped = quantiles(url, ["energy_kwh"], by=["input.T_out_mean"]).to_pylist()
    assert [g["input.T_out_mean"] for g in grouped] == [268.15, 278.15]
    for g in grouped:
        mask = table["input.T_out_mean"].to_numpy() == g["input.T_out_mean"]
        values = table["energy_kwh"].to_numpy()[mask].astype(np.float64)
        assert g["count"] == 40 and g["q0.5"] == pytest.approx(np.median(values), rel=1e-12)
    with pytest.raises(KeyError, match="unknown column"):
        quantiles(url, ["nope"])


# ---------------------------------------------------------------------------- CLI ----
def test_cli_example_run_and_quantiles(ray_session, tmp_path):
    runner = CliRunner()
    example = runner.invoke(sweep_app, ["example", "two_tank", "--n", "50"])
    assert example.exit_code == 0, example.output
    spec = json.loads(example.stdout)
    spec["horizon_s"] = 600.0
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    runs = str(tmp_path / "runs")
    result = runner.invoke(sweep_app, ["run", str(path), "--runs", runs, "--no-progress"])
    assert result.exit_code == 0, result.output
    run_id = result.output.split()[1].rstrip(":")
    bands = runner.invoke(sweep_app, ["quantiles", run_id, "--runs", runs, "--metric", "h1_max", "--q", "0.5"])
    assert bands.exit_code == 0, bands.output
    header, row = bands.output.strip().splitlines()
    assert header.split("\t") == ["metric", "count", "diverged", "mean", "q0.5"] and row.startswith("h1_max\t50\t0\t")
    bad = runner.invoke(sweep_app, ["run", str(tmp_path / "missing.json"), "--runs", runs])
    assert bad.exit_code != 0 and "cannot read" in bad.output


def test_a_diverging_scenario_is_reported_and_left_out_of_the_quantiles(ray_session, tmp_path):
    """C_in 1e5 with R_im 2e-4 is admissible but unstable at 60 s steps: the run reports it (CLI, run
    record, `diverged` column) and its metrics are NaN, never a result in the bands."""
    from sweeps.runs import RunStore

    space = ScenarioSpace(method="grid", dimensions=[Dimension(name="C_in", target="param", values=[1e5, 2e6]),
                                                     Dimension(name="R_im", target="param", values=[2e-4, 2e-3])])
    path = tmp_path / "spec.json"
    with pytest.warns(UserWarning, match="beyond the RK4 stability limit"):  # refused unless the user insists
        spec = _thermal_spec(space=space, horizon_s=21600.0, step_s=60.0, allow_unstable=True)
    path.write_text(spec.model_dump_json())
    runs, cli = str(tmp_path / "runs"), CliRunner()
    result = cli.invoke(sweep_app, ["run", str(path), "--runs", runs, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "diverged: 1 of 4 scenarios" in result.output
    assert result.output.rstrip().endswith("where states beyond a declared range are plausible (a tank heated past its "
                                           "range's top), widen that range (State lower/upper)")  # flagged alike
    record = RunStore(runs).list()[0]
    assert record.summary["diverged"] == 1
    table = open_dataset(record.output_url).to_table().sort_by("scenario")
    assert table["diverged"].to_pylist() == [True, False, False, False]
    assert np.isnan(table["T_in_max"][0].as_py()) and np.all(np.isfinite(table["T_in_max"].to_numpy()[1:]))
    (band,) = quantiles(record.output_url, ["T_in_max"], q=(0.5,)).to_pylist()
    assert (band["count"], band["diverged"]) == (3, 1)
    assert band["q0.5"] == pytest.approx(np.median(table["T_in_max"].to_numpy()[1:]), rel=1e-6)


def test_chunk_tasks_share_each_gpu_without_preallocating_it(monkeypatch):
    monkeypatch.setattr(runner.ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    options, slots = runner.task_plan()  # a task per CPU the node has per GPU
    assert options["num_gpus"] == 1 / 8 and slots == 16
    assert options["runtime_env"]["env_vars"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    for cpus, per_gpu in ((2.0, 2), (6.0, 3), (64.0, 8)):  # within GPU_TASKS_PER_GPU's bounds
        monkeypatch.setattr(runner.ray, "cluster_resources", lambda cpus=cpus: {"CPU": cpus, "GPU": 2.0})
        assert runner.task_plan()[1] == 2 * per_gpu
    monkeypatch.setattr(runner.ray, "cluster_resources", lambda: {"CPU": 2.0})
    options, slots = runner.task_plan()
    assert options["num_cpus"] == 1 and slots == 2 and "num_gpus" not in options
    assert options["runtime_env"]["env_vars"]["JAX_PLATFORMS"] == "cpu"


def test_cpu_side_workers_keep_jax_off_the_gpu():
    """Twin shards, API replicas and CPU sweep tasks carry JAX_PLATFORMS=cpu (merged, not replacing)."""
    from raytwin.sim.cpu import CPU_ONLY_ENV, cpu_only

    merged = cpu_only({"num_cpus": 1, "runtime_env": {"env_vars": {"XLA_FLAGS": "x"}, "pip": ["a"]}})
    assert merged["runtime_env"] == {"env_vars": {"XLA_FLAGS": "x", **CPU_ONLY_ENV}, "pip": ["a"]}
    assert cpu_only({})["runtime_env"]["env_vars"] == CPU_ONLY_ENV


def test_a_sweep_of_a_registry_model_is_checked_around_the_artifacts_parameters(tmp_path):
    """The spec alone cannot check a `name@version` model (its parameters live in the registry):
    preparing the sweep does, over the box its dimensions span around the artifact's values."""
    from raytwin.contracts import AssetType
    from raytwin.registry import ModelRegistry
    from raytwin.sim.checks import UnstableStepError

    registry = str(tmp_path / "models")
    ModelRegistry(registry).register("zone", "1.0.0", AssetType.from_model(THERMAL_RC))
    space = ScenarioSpace(method="random", n=4, dimensions=[
        Dimension(name="C_in", target="param", mode="scale", low=0.05, high=1.0)])
    spec = SweepSpec(model="zone@1.0.0", registry_url=registry, space=space, horizon_s=7200.0, step_s=3600.0)
    with pytest.raises(UnstableStepError, match="step_s"):
        runner.prepare(spec)
    stable = spec.model_copy(update={"step_s": 30.0, "horizon_s": 3600.0})  # 60 s: the thermostat's loop rings
    assert runner.prepare(stable)[0] == "thermal_rc"


def test_a_feedback_input_is_checked_for_stability_over_its_states_range_not_at_the_start_state():
    """A controller's input was evaluated at the start state only for the step check: a feedback that is 0 there
    and drives the model stiff once its state moves let a step 30x beyond the stability limit through."""
    from raytwin.signals import Proportional

    feedback = {"k": Proportional(state="x", setpoint=1.0, gain=-100.0, lower=0.0, upper=1000.0)}
    space = ScenarioSpace(method="grid", dimensions=[Dimension(name="inflow", target="param", values=[0.1])])
    common = dict(model="tests.stiff_models:FEEDBACK_DECAY", horizon_s=10.0, signals=feedback, space=space)
    with pytest.raises(ValidationError, match="step_s"):
        SweepSpec(**common, step_s=0.1)
    SweepSpec(**common, step_s=0.002)  # within the limit at k = 1000/s (2.79 / 1000 s)


def test_a_thermostat_too_strong_for_the_step_is_refused_where_the_sampled_loop_starts_to_ring():
    """The step check saw the model's own modes only: at C_in 1e5 J/K the kit's 5 kW/K thermostat, computed at
    each step's start and held through it, swung the heater between its bounds at 60 s steps (far within the
    open-loop RK4 limit there, 463 s) and a sweep reported hours outside the comfort band that 2 s steps did
    not. The refusal names the largest stable step; the kernel settles
    just below it and rings just above it."""
    space = ScenarioSpace(method="grid", dimensions=[Dimension(name="R_io", target="param", mode="scale",
                                                               values=[1.0])])

    def spec(step_s: float, **kw) -> SweepSpec:
        return SweepSpec(model="thermal_rc", parameters={"C_in": 1e5}, horizon_s=2 * 86400.0, step_s=step_s,
                         space=space, **kw)

    with pytest.raises(ValidationError, match=r"step_s: step 60 s makes the sampled feedback loop unstable: Q_h = "
                                              r"heater_gain \(setpoint - T_in\) with heater_gain=5000, .* grows "
                                              r"1.8\d+x per step at C_in=100000.*largest stable step is 40.2 s"):
        spec(60.0)
    with pytest.raises(ValidationError, match="largest stable step is 40.2 s"):
        spec(45.0)
    spec(36.0)
    with pytest.warns(UserWarning, match="the sampled feedback loop unstable"):
        spec(45.0, allow_unstable=True)

    bases = Bases(THERMAL_KIT.start_state, {**THERMAL_RC.default_params(), "C_in": 1e5}, THERMAL_KIT.default_inputs())

    def coldest(step_s: float) -> float:
        n = round(2 * 86400.0 / step_s)
        return float(chunk_metrics(THERMAL_KIT, bases, space.dimensions, space.rows(0, 1), step_s, n, 1,
                                   "float64")["T_in_min"][0])

    start = THERMAL_KIT.start_state["T_in"]  # below the setpoint: a settling loop never goes under it
    assert coldest(36.0) >= start - 1e-6
    assert coldest(45.0) < start - 0.5  # overshoots, then undershoots by more each step until it saturates
