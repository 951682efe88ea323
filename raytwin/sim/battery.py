"""Lithium-ion cell, second-order equivalent circuit (reference model ``battery_ecm``).

    dsoc/dt = -i / (3600 q)
    dv1/dt  = -v1/(r1 c1) + i/c1
    dv2/dt  = -v2/(r2 c2) + i/c2
    v_terminal = ocv(soc) - i r0 - v1 - v2,   ocv(soc) = 3.0 + 1.1 soc - 0.6 soc^2 + 0.7 soc^3

Current ``i`` is positive on discharge. The output is nonlinear in ``soc`` (an extended Kalman
filter applies). The fastest time constant is r1 c1 (40 s typical): RK4 is stable for
dt < 2.785 r1 c1 and accurate to ~1e-6 relative for dt <= 0.1 r1 c1; the reference step is 1 s.
``soc`` integrates the current with nothing pulling it back, so float32 rollouts sum its tiny
increments with compensation (`State(..., compensated=True)`).
"""

from __future__ import annotations

from raytwin.models import Input, Model, Output, Param, State


def ocv(soc):
    """Open-circuit voltage [V] of the reference cell, monotone on soc in [0, 1]."""
    return 3.0 + soc * (1.1 + soc * (-0.6 + 0.7 * soc))


def _coefficients(p):
    q, r0, r1, c1, r2, c2 = p
    return (-1.0 / (3600.0 * q), r0, 1.0 / (r1 * c1), 1.0 / c1, 1.0 / (r2 * c2), 1.0 / c2)


def _derivative(x, u, c):
    _, v1, v2 = x
    (i,) = u
    k_soc, _, a1, b1, a2, b2 = c
    return (k_soc * i, b1 * i - a1 * v1, b2 * i - a2 * v2)


def _output(x, u, c):
    soc, v1, v2 = x
    (i,) = u
    return (ocv(soc) - i * c[1] - v1 - v2,)


BATTERY_ECM = Model(
    name="battery_ecm",
    version="1.0.0",
    description="Lithium-ion cell, OCV + R0 + two RC pairs, coulomb-counted state of charge.",
    states=(
        State("soc", "-", "state of charge", -0.1, 1.1, nominal=0.5, prior_std=0.2, process_std=1e-5, compensated=True),
        State("v1", "V", "first RC pair voltage", -100.0, 100.0, nominal=0.0, prior_std=0.01, process_std=1e-4),
        State("v2", "V", "second RC pair voltage", -100.0, 100.0, nominal=0.0, prior_std=0.01, process_std=1e-4),
    ),
    inputs=(Input("i", "A", "cell current, positive on discharge", -1.0e4, 1.0e4, nominal=0.0),),
    params=(
        Param("q", "Ah", 2.5, 0.1, 500.0, "capacity"),
        Param("r0", "ohm", 0.05, 1.0e-4, 1.0, "series resistance"),
        Param("r1", "ohm", 0.02, 1.0e-4, 1.0, "first RC pair resistance"),
        Param("c1", "F", 2.0e3, 1.0, 1.0e6, "first RC pair capacitance"),
        Param("r2", "ohm", 0.03, 1.0e-4, 1.0, "second RC pair resistance"),
        Param("c2", "F", 2.0e4, 1.0, 1.0e7, "second RC pair capacitance"),
    ),
    outputs=(Output("v_terminal", "V", "terminal voltage", -100.0, 100.0, measurement_std=2e-3),),
    coefficients=_coefficients,
    derivative=_derivative,
    output=_output,
    default_dt=1.0,
    dt_limit="stable for dt < 2.785 r1 c1 (~111 s typical); accurate (~1e-6 rel.) for dt <= 0.1 r1 c1",
)
