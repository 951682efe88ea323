"""Explicit Runge-Kutta tableaus (`raytwin.sim.tableau`): the published Tsit5 coefficients, its
order of convergence, agreement with scipy's solve_ivp on Lorenz and the thermal model, and RK4 as
a tableau against the built-in RK4."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from benchmarks.lorenz import LORENZ
from raytwin.models import RK4, TSIT5, ExplicitRK
from raytwin.sim import THERMAL_RC, simulate
from raytwin.sim.reference import reference_trajectory, relative_error
from tests.test_simulators import thermal_inputs, thermal_rhs

LORENZ_TSIT5 = dataclasses.replace(LORENZ, solver=TSIT5)
LORENZ_X0 = np.array([1.0, 0.0, 0.0])
LORENZ_P = np.array([10.0, 21.0, 8.0 / 3.0])


def lorenz_rhs(t, x, sigma, rho, beta):  # written from the equations, not from the model
    return [sigma * (x[1] - x[0]), x[0] * (rho - x[2]) - x[1], x[0] * x[1] - beta * x[2]]


def lorenz_exact(t1: float) -> np.ndarray:
    sol = solve_ivp(lorenz_rhs, (0.0, t1), LORENZ_X0, method="DOP853", rtol=1e-13, atol=1e-13, args=tuple(LORENZ_P))
    return sol.y[:, -1]


def lorenz_end(model, dt: float, t1: float = 1.0) -> np.ndarray:
    n = round(t1 / dt)
    return simulate(model, LORENZ_X0, np.zeros((n, 0)), LORENZ_P, dt, dtype=jnp.float64)[-1]


def test_tsit5_coefficients_are_the_published_ones():
    """Against diffrax's independent transcription of Tsitouras (2011), to the last float64 bit."""
    from diffrax._solver.tsit5 import _tsit5_tableau as ref

    for row, ref_row in zip(TSIT5.a, ref.a_lower[:5], strict=True):
        np.testing.assert_allclose(row, ref_row, rtol=1e-15, atol=0)
    np.testing.assert_allclose(TSIT5.b, ref.a_lower[5], rtol=1e-15, atol=0)  # the FSAL row is the weights
    np.testing.assert_allclose(TSIT5.b, ref.b_sol[:6], rtol=1e-15, atol=0)
    assert ref.b_sol[6] == 0.0  # FSAL: the seventh stage only serves the error estimate
    np.testing.assert_allclose(TSIT5.c[1:], ref.c[:5], rtol=1e-15, atol=0)
    assert (TSIT5.stages, TSIT5.order) == (6, 5)


def test_a_mistyped_coefficient_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"row 2 of a sums to .* not c\[2\]"):
        ExplicitRK(name="bad", order=4, a=((0.5,), (0.0, 0.51), (0.0, 0.0, 1.0)), b=RK4.b, c=RK4.c)
    with pytest.raises(ValueError, match="weights sum to"):
        ExplicitRK(name="bad", order=4, a=RK4.a, b=(0.2, 1 / 3, 1 / 3, 1 / 6), c=RK4.c)


@pytest.mark.parametrize(("solver", "order"), [(TSIT5, 5), (RK4, 4)])
def test_order_of_convergence_on_lorenz(solver, order):
    """Halving the step divides the end-state error by 2^order (slope of log error vs log dt)."""
    exact = lorenz_exact(1.0)
    model = dataclasses.replace(LORENZ, solver=solver)
    steps = [0.01, 0.005, 0.0025]  # asymptotic range; errors 1e-7..1e-10, far above the reference's
    errors = [np.max(np.abs(lorenz_end(model, dt) - exact)) for dt in steps]
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert order - 0.3 < slope < order + 0.5, (errors, slope)


def test_rk4_tableau_is_the_builtin_rk4_within_rounding():
    builtin = lorenz_end(LORENZ, 0.01)
    tableau = lorenz_end(dataclasses.replace(LORENZ, solver=RK4), 0.01)
    np.testing.assert_allclose(tableau, builtin, rtol=1e-12, atol=1e-12)
    assert not np.array_equal(tableau, lorenz_end(LORENZ_TSIT5, 0.01))  # the solver is really switched


def test_tsit5_matches_solve_ivp_on_lorenz_at_the_benchmark_step():
    np.testing.assert_allclose(lorenz_end(LORENZ_TSIT5, 0.001), lorenz_exact(1.0), rtol=0, atol=1e-10)


def test_tsit5_matches_solve_ivp_on_the_thermal_model():
    """A day at 60 s with random piecewise-constant heating: Tsit5 is closer than RK4 to LSODA."""
    dt, n_steps = 60.0, 1440
    p = np.array(THERMAL_RC.param_vector({"C_in": 1.5e5, "R_im": 1.2e-3}))  # tau ~ 180 s: the stiff-ish case
    u = thermal_inputs(np.random.default_rng(1), n_steps, dt)
    x0 = np.array([291.0, 289.5])
    ref = reference_trajectory(thermal_rhs(p), x0, u, dt)
    thermal_tsit5 = dataclasses.replace(THERMAL_RC, solver=TSIT5)
    tsit5 = relative_error(simulate(thermal_tsit5, x0, u, p, dt, dtype=jnp.float64), ref)
    rk4 = relative_error(simulate(THERMAL_RC, x0, u, p, dt, dtype=jnp.float64), ref)
    assert tsit5 < 1e-6 and tsit5 < rk4 / 10, (tsit5, rk4)


def test_a_sweep_spec_selects_its_solver_and_records_it():
    """`SweepSpec.solver` swaps the model's step for one sweep (kept in the spec's JSON, so a rerun does too)."""
    from pydantic import ValidationError

    from sweeps.engine import Bases, chunk_metrics
    from sweeps.space import Dimension, ScenarioSpace
    from sweeps.spec import SweepSpec

    space = ScenarioSpace(method="grid", dimensions=[Dimension(name="C_in", target="param", mode="scale",
                                                               values=[0.5, 1.0])])
    spec = SweepSpec.model_validate_json(SweepSpec(model="thermal_rc", horizon_s=86400.0, step_s=300.0, space=space,
                                                   solver="tsit5").model_dump_json())
    default = SweepSpec(model="thermal_rc", horizon_s=86400.0, step_s=300.0, space=space)
    assert spec.kit("thermal_rc").model.solver is TSIT5 and default.kit("thermal_rc").model.solver is None
    assert spec.kit("thermal_rc") is spec.kit("thermal_rc")  # one kit (one compiled kernel) per declaration
    runs = {}
    for name, s in (("tsit5", spec), ("rk4", default)):
        kit = s.kit("thermal_rc").compile(s.horizon_s)
        bases = Bases(dict(kit.start_state), THERMAL_RC.default_params(), kit.default_inputs())
        runs[name] = chunk_metrics(kit, bases, space.dimensions, space.rows(0, 2), s.step_s, s.n_steps, 2, "float64")
    # 300 s steps (600 s: the thermostat's sampled loop rings at C_in x0.5, refused): the methods really differ,
    # by micro-kelvins at the peak (6.3e-6 K)
    gap = np.abs(runs["tsit5"]["T_in_max"] - runs["rk4"]["T_in_max"]).max()
    assert 1e-9 < gap < 1e-3
    with pytest.raises(ValidationError, match="'rk4' or 'tsit5'"):
        SweepSpec(model="thermal_rc", horizon_s=86400.0, step_s=600.0, space=space, solver="dopri5")
