"""Simulators against solve_ivp (rtol 1e-9) with right-hand sides written independently here
from the equations in shared/README.md, and the linear thermal model against its exact solution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import expm

from raytwin.sim import BATTERY_ECM, THERMAL_RC, TWO_TANK, simulate, simulate_batch
from raytwin.sim.checks import UnstableStepError, UnstableStepWarning, stability_limit
from raytwin.sim.precision import float64
from raytwin.sim.reference import model_rhs, reference_trajectory, relative_error


def thermal_rhs(p):
    c_in, c_m, r_im, r_mo, r_io, f_sol = p

    def rhs(x, u):
        t_in, t_m = x
        t_out, q_h, q_sol = u
        return np.array([
            (t_m - t_in) / (r_im * c_in) + (t_out - t_in) / (r_io * c_in) + (q_h + f_sol * q_sol) / c_in,
            (t_in - t_m) / (r_im * c_m) + (t_out - t_m) / (r_mo * c_m),
        ])

    return rhs


def battery_rhs(p):
    q, _r0, r1, c1, r2, c2 = p

    def rhs(x, u):
        _soc, v1, v2 = x
        (i,) = u
        return np.array([-i / (3600 * q), -v1 / (r1 * c1) + i / c1, -v2 / (r2 * c2) + i / c2])

    return rhs


def tank_rhs(p):
    a1_tank, a2_tank, a1, a2, cd, g = p

    def rhs(x, u):
        h1, h2 = x
        (q_in,) = u
        out1 = cd * a1 * np.sqrt(2 * g * max(h1, 0.0))
        out2 = cd * a2 * np.sqrt(2 * g * max(h2, 0.0))
        return np.array([(q_in - out1) / a1_tank, (out1 - out2) / a2_tank])

    return rhs


def blocky(rng, n_steps, block, low, high):
    """Piecewise-constant random inputs that change every `block` steps."""
    low, high = np.atleast_1d(low), np.atleast_1d(high)
    levels = rng.uniform(low, high, size=(-(-n_steps // block), len(low)))
    return np.repeat(levels, block, axis=0)[:n_steps]


def thermal_inputs(rng, n_steps, dt):
    t = dt * np.arange(n_steps)
    t_out = 278.0 + 6.0 * np.sin(2 * np.pi * t / 86400.0)
    t_out = np.repeat(t_out[::30], 30)[:n_steps]  # outdoor reading every 30 min
    heat = blocky(rng, n_steps, 15, [0.0, 0.0], [6000.0, 800.0])
    return np.column_stack([t_out, heat])


THERMAL_CASES = {
    "typical": {},
    "heavy-and-leaky": {"C_m": 3.0e7, "R_io": 6.0e-3, "R_mo": 3.5e-3},
    "stiff-ish light air node": {"C_in": 1.5e5, "R_im": 1.2e-3},  # tau ~ 180 s at dt = 60 s
}


@pytest.mark.parametrize("case", list(THERMAL_CASES))
def test_thermal_matches_solve_ivp(case):
    rng = np.random.default_rng(1)
    dt, n_steps = 60.0, 1440  # one day
    p = np.array(THERMAL_RC.param_vector(THERMAL_CASES[case]))
    u = thermal_inputs(rng, n_steps, dt)
    x0 = np.array([291.0, 289.5])
    traj = simulate(THERMAL_RC, x0, u, p, dt, dtype=jnp.float64)
    ref = reference_trajectory(thermal_rhs(p), x0, u, dt)
    assert relative_error(traj, ref) < 1e-4


def test_thermal_matches_exact_zoh_solution():
    """The model is linear: x' = A x + B u, exact over a step is expm of the augmented matrix."""
    p = THERMAL_RC.param_vector()
    c_in, c_m, r_im, r_mo, r_io, f_sol = p
    a = np.array([
        [-1 / (r_im * c_in) - 1 / (r_io * c_in), 1 / (r_im * c_in)],
        [1 / (r_im * c_m), -1 / (r_im * c_m) - 1 / (r_mo * c_m)],
    ])
    b = np.array([[1 / (r_io * c_in), 1 / c_in, f_sol / c_in], [1 / (r_mo * c_m), 0.0, 0.0]])
    dt, n_steps = 300.0, 2016  # one week at 5 min
    m = np.zeros((5, 5))
    m[:2, :2], m[:2, 2:] = a, b
    phi = expm(m * dt)
    u = thermal_inputs(np.random.default_rng(2), n_steps, dt)
    x = np.array([293.0, 291.0])
    exact = [x]
    for k in range(n_steps):
        x = phi[:2, :2] @ x + phi[:2, 2:] @ u[k]
        exact.append(x)
    traj = simulate(THERMAL_RC, exact[0], u, np.array(p), dt, dtype=jnp.float64)
    assert relative_error(traj, np.array(exact)) < 1e-6


BATTERY_CASES = {
    "typical": {},
    "aged cell": {"q": 2.0, "r0": 0.08, "r1": 0.035},
    "stiff-ish fast RC pair": {"c1": 150.0},  # r1 c1 = 3 s at dt = 1 s
}


@pytest.mark.parametrize("case", list(BATTERY_CASES))
def test_battery_matches_solve_ivp(case):
    rng = np.random.default_rng(3)
    dt, n_steps = 1.0, 1800
    p = np.array(BATTERY_ECM.param_vector(BATTERY_CASES[case]))
    u = blocky(rng, n_steps, 60, -2.5, 5.0)  # charge and discharge pulses, one minute each
    x0 = np.array([0.9, 0.0, 0.0])
    traj = simulate(BATTERY_ECM, x0, u, p, dt, dtype=jnp.float64)
    ref = reference_trajectory(battery_rhs(p), x0, u, dt)
    assert relative_error(traj, ref) < 1e-4


def test_battery_terminal_voltage_follows_ocv_and_ir_drop():
    p = BATTERY_ECM.param_vector()
    (v,) = BATTERY_ECM.observe((0.5, 0.01, 0.02), (2.0,), tuple(p))
    ocv = 3.0 + 1.1 * 0.5 - 0.6 * 0.25 + 0.7 * 0.125
    assert float(v) == pytest.approx(ocv - 2.0 * 0.05 - 0.03)


TANK_CASES = {
    "filling": ({}, [0.05, 0.02], (1.0e-4, 2.0e-4)),
    "draining": ({"a2": 8.0e-5}, [0.8, 0.6], (0.0, 6.0e-5)),
    "small outlets, slow": ({"a1": 2.0e-5, "cd": 0.5}, [0.3, 0.3], (2.0e-5, 8.0e-5)),
}


@pytest.mark.parametrize("case", list(TANK_CASES))
def test_two_tank_matches_solve_ivp(case):
    overrides, x0, (q_lo, q_hi) = TANK_CASES[case]
    rng = np.random.default_rng(4)
    dt, n_steps = 1.0, 1800
    p = np.array(TWO_TANK.param_vector(overrides))
    u = blocky(rng, n_steps, 120, q_lo, q_hi)
    traj = simulate(TWO_TANK, np.array(x0), u, p, dt, dtype=jnp.float64)
    ref = reference_trajectory(tank_rhs(p), np.array(x0), u, dt)
    assert np.all(traj >= 0.0)
    assert relative_error(traj, ref) < 1e-4


def test_model_rhs_is_the_documented_equation():
    """The reference helper used by the demo wraps the model's own derivative faithfully."""
    p = np.array(THERMAL_RC.param_vector())
    x, u = np.array([292.0, 290.0]), np.array([275.0, 4000.0, 300.0])
    np.testing.assert_allclose(model_rhs(THERMAL_RC, p)(x, u), thermal_rhs(p)(x, u), rtol=1e-12)


def test_batch_equals_single_runs_and_float32_is_close():
    rng = np.random.default_rng(5)
    dt, n_steps, batch = 60.0, 720, 8
    u = thermal_inputs(rng, n_steps, dt)
    params = np.array(THERMAL_RC.param_vector()) * rng.uniform(0.7, 1.3, size=(batch, 6))
    x0 = rng.uniform(285.0, 295.0, size=(batch, 2))
    many = simulate_batch(THERMAL_RC, x0, u, params, dt, dtype=jnp.float64)
    assert many.shape == (batch, n_steps + 1, 2)
    for k in (0, batch - 1):
        one = simulate(THERMAL_RC, x0[k], u, params[k], dt, dtype=jnp.float64)
        np.testing.assert_allclose(many[k], one, rtol=1e-12)
    f32 = simulate_batch(THERMAL_RC, x0, u, params, dt)
    assert f32.dtype == np.float32
    assert relative_error(f32[0].astype(np.float64), many[0]) < 1e-3


def test_per_scenario_inputs():
    rng = np.random.default_rng(6)
    u = rng.uniform(-1.0, 3.0, size=(3, 100, 1))
    x0 = np.tile([0.8, 0.0, 0.0], (3, 1))
    p = np.tile(BATTERY_ECM.param_vector(), (3, 1))
    many = simulate_batch(BATTERY_ECM, x0, u, p, 1.0, dtype=jnp.float64)
    np.testing.assert_allclose(many[2], simulate(BATTERY_ECM, x0[2], u[2], p[2], 1.0, dtype=jnp.float64))


def test_shape_errors_are_clear():
    p, u = THERMAL_RC.param_vector(), np.full((10, 3), [280.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"inputs has shape \(10, 2\), expected \(n_steps, 3\): the last axis is "
                                         "T_out, Q_h, Q_sol"):
        simulate(THERMAL_RC, [290.0, 290.0], np.zeros((10, 2)), p, 60.0)
    # a 2-D x0 returned a (11, 1, 2) trajectory, silently
    with pytest.raises(ValueError, match=r"x0 has shape \(1, 2\), expected \(2,\): the last axis is T_in, T_m"):
        simulate(THERMAL_RC, [[290.0, 290.0]], u, p, 60.0)
    with pytest.raises(ValueError, match=r"x0 has shape \(2,\), expected \(batch, 2\)"):
        simulate_batch(THERMAL_RC, [290.0, 290.0], u, [p], 60.0)
    # a mismatched inputs batch raised JAX's "vmap got inconsistent sizes"
    with pytest.raises(ValueError, match="batch sizes differ: x0 3, params 3, inputs 2; give every batched array"):
        simulate_batch(THERMAL_RC, np.full((3, 2), 290.0), np.tile(u, (2, 1, 1)), np.tile(p, (3, 1)), 60.0)
    assert simulate_batch(THERMAL_RC, np.full((3, 2), 290.0), np.tile(u, (3, 1, 1)), np.tile(p, (3, 1)), 60.0
                          ).shape == (3, 11, 2)
    with pytest.raises(KeyError, match="no parameter"):
        THERMAL_RC.param_vector({"C_inn": 1.0})


def test_start_states_and_inputs_outside_their_plausible_ranges_are_refused_unless_allowed():
    """A start of 1e5 K and inputs far outside their declared range ran silently and looked like results."""
    p, u = THERMAL_RC.param_vector(), np.full((10, 3), [280.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"x0.T_in=100000 outside T_in's plausible range \[173.15, 473.15\] K"):
        simulate(THERMAL_RC, [1e5, 290.0], u, p, 60.0)
    hot = u.copy()
    hot[4, 0] = 1e4
    with pytest.raises(ValueError, match=r"inputs.T_out=10000 outside T_out's plausible range \[173.15, 373.15\] K"):
        simulate_batch(THERMAL_RC, np.full((2, 2), 290.0), hot, np.tile(p, (2, 1)), 60.0)
    kept = simulate(THERMAL_RC, [500.0, 290.0], u, p, 60.0, dtype=jnp.float64, allow_implausible=True)
    assert kept[0, 0] == 500.0 and np.all(np.isfinite(kept))


ROOT = str(Path(__file__).resolve().parents[1])
_BACKEND_PROBE = """
import json, os, sys
import jax, jax.numpy as jnp
from raytwin.sim.cpu import backend_cpu_count, start_single_core_backend
if sys.argv[1] == "single":
    start_single_core_backend()
elif sys.argv[1] == "shard":  # a twin shard's process, as Ray starts it
    import tempfile
    from actors.shard import TwinShardProcess
    with tempfile.TemporaryDirectory() as store:
        TwinShardProcess(store, 0, 1, allowed_lateness_s=60.0, snapshot_every=100)
x = jnp.ones(1 << 20, jnp.float32)
hlo = jax.jit(lambda x: jnp.sin(x) * 2.0 + x).lower(x).compile().as_text()
masks = set()
for tid in os.listdir("/proc/self/task"):
    masks.add(tuple(sorted(os.sched_getaffinity(int(tid)))))
print(json.dumps({"split": "outer_dimension_partitions" in hlo, "masks": sorted(masks),
                  "cpus": sorted(os.sched_getaffinity(0)), "backend_cpus": backend_cpu_count()}))
"""


def _probe_backend(mode: str) -> dict:
    """`_BACKEND_PROBE` in a fresh process (the backend starts once per process)."""
    out = subprocess.run([sys.executable, "-c", _BACKEND_PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    return json.loads(out.stdout.strip().splitlines()[-1])


MULTI_CPU_LINUX = pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                                     reason="per-thread CPU affinity and a second CPU needed")


@MULTI_CPU_LINUX
def test_single_core_backend_stops_xla_splitting_loops_and_leaves_every_thread_all_cpus():
    """XLA splits a large fused loop into parallel tasks by default, not after
    start_single_core_backend, and no thread stays pinned."""
    default, single = _probe_backend("default"), _probe_backend("single")
    assert default["split"] and not single["split"]
    assert single["masks"] == [single["cpus"]]
    # what keeps executables apart (`raytwin.executables`, the shards' JAX cache folder): the split is in them
    assert (default["backend_cpus"], single["backend_cpus"]) == (len(default["cpus"]), 1)


@MULTI_CPU_LINUX
def test_a_twin_shard_process_runs_its_kernels_on_one_core_and_leaves_every_thread_all_cpus():
    """A shard owns one core: its filter dispatches are not split across threads (`TwinShardProcess`)."""
    shard = _probe_backend("shard")
    assert not shard["split"] and shard["backend_cpus"] == 1
    assert shard["masks"] == [shard["cpus"]]


RK4_REAL_AXIS_LIMIT = float(-min(r.real for r in np.roots([1 / 24, 1 / 6, 1 / 2, 1]) if abs(r.imag) < 1e-12))
"""|z| where RK4's amplification 1 + z + z^2/2 + z^3/6 + z^4/24 returns to 1 on the negative real axis (2.785)."""


@pytest.mark.parametrize(("model", "documented_s", "text"), [(THERMAL_RC, 8.7e3, "~8.7e3 s"),
                                                            (BATTERY_ECM, 111.0, "~111 s")])
def test_rk4_stability_limit_is_the_documented_one_from_the_jacobian_eigenvalues(model, documented_s, text):
    import jax

    params = model.param_vector()
    zeros_u = tuple(jnp.zeros(()) for _ in model.inputs)

    def rhs(x):
        return jnp.stack(model.derivative(tuple(x), zeros_u, model.coefficients(tuple(jnp.asarray(params)))))

    with float64():
        jacobian = np.asarray(jax.jacfwd(rhs)(jnp.ones(len(model.states))), dtype=np.float64)
    eigenvalues, vectors = np.linalg.eig(jacobian)
    assert np.all(np.abs(eigenvalues.imag) < 1e-12) and np.all(eigenvalues.real <= 0)
    fastest = int(np.argmin(eigenvalues.real))
    limit = RK4_REAL_AXIS_LIMIT / abs(eigenvalues.real[fastest])
    assert RK4_REAL_AXIS_LIMIT == pytest.approx(2.7853, abs=1e-4)
    assert limit == pytest.approx(documented_s, rel=0.01)
    assert text in model.dt_limit
    assert stability_limit(model) == pytest.approx(limit, rel=1e-9)  # what the entry points check against
    x0 = vectors[:, fastest].real  # the mode that goes unstable first
    n = 2000
    inputs = np.zeros((n, len(model.inputs)))
    for factor, stable in ((0.99, True), (1.01, False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnstableStepWarning)
            end = simulate(model, x0, inputs, params, factor * limit, dtype=jnp.float64, allow_unstable=True,
                           allow_implausible=True)[-1]  # a mode around 0, not a plausible state
        assert bool(np.linalg.norm(end) < np.linalg.norm(x0)) is stable, (factor, end)


def test_a_9000_s_thermal_step_is_refused_and_diverges_where_the_caller_insists():
    args = ([1.0, 0.0], np.zeros((500, 3)), THERMAL_RC.param_vector(), 9000.0)
    with pytest.raises(UnstableStepError, match=r"^model thermal_rc: dt: step 9000 s is beyond the RK4 stability "
                                                r"limit 8656 s at the default parameters"):
        simulate(THERMAL_RC, *args, dtype=jnp.float64, allow_implausible=True)  # deviations around 0 K
    with pytest.warns(UnstableStepWarning, match="beyond the RK4 stability limit 8656 s"):
        end = simulate(THERMAL_RC, *args, dtype=jnp.float64, allow_unstable=True, allow_implausible=True)[-1]
    assert not np.all(np.abs(end) < 1e3)


def test_float32_state_of_charge_keeps_tiny_increments():
    """2 mA on 2.5 Ah for 24 h at 1 s from soc 0.98: each step changes soc by 2.2e-7 (under 4 ulp). Plain float32
    addition ended 1.4e-3 off (7 % of the change); compensated summation stays within one ulp of the closed form."""
    n, current, soc0 = 86_400, 0.002, 0.98
    params = BATTERY_ECM.param_vector()
    exact = soc0 - current * n / (3600.0 * params[0])
    inputs = np.full((n, 1), current)
    f32 = simulate(BATTERY_ECM, [soc0, 0.0, 0.0], inputs, params, 1.0)
    f64 = simulate(BATTERY_ECM, [soc0, 0.0, 0.0], inputs, params, 1.0, dtype=jnp.float64)
    assert f32.dtype == np.float32
    assert abs(float(f32[-1, 0]) - exact) < 6e-8  # one ulp of soc near 0.98
    assert abs(float(f64[-1, 0]) - exact) < 1e-10
    np.testing.assert_allclose(f32[:, 0], f64[:, 0], rtol=0, atol=1e-7)  # the whole trajectory, not just the end
    # the uncompensated states (RC voltages) are rk4_step's own bits
    from raytwin.sim.integrate import rollout

    def f32_tuple(values):
        return tuple(jnp.asarray(v, jnp.float32) for v in values)

    plain = rollout(BATTERY_ECM, f32_tuple((soc0, 0.0, 0.0)), f32_tuple(params), 1.0, 600,
                    (jnp.full(600, current, jnp.float32),), compensated=())
    np.testing.assert_array_equal(np.asarray(plain.trajectory[1]), f32[1:601, 1])
