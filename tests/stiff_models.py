"""Robertson's chemical kinetics, a stiff model for the solver tests: rate constants 0.04, 1e4 and 3e7
(time scales 1e-4 s to 1e3 s), RK4 would need millisecond steps; `ROBERTSON` declares the adaptive
implicit solver, importable by path (`tests.stiff_models:ROBERTSON`) for sweeps on Ray workers."""

from __future__ import annotations

from raytwin.models import Input, Model, Output, Param, State
from raytwin.sim.stiff import Adaptive


def _coefficients(p):
    return p


def _derivative(x, u, c):
    return (-c[0] * x[0] + c[1] * x[1] * x[2], c[0] * x[0] - c[1] * x[1] * x[2] - c[2] * x[1] * x[1],
            c[2] * x[1] * x[1])


def _output(x, u, c):
    return (x[2],)


def robertson(**changes) -> Model:
    fields = dict(
        name="robertson", version="1.0.0",
        states=tuple(State(n, "-", "", -0.1, 1.1, nominal=v) for n, v in (("y1", 0.9), ("y2", 3e-5), ("y3", 0.1))),
        inputs=(), outputs=(Output("y3", "-", "", -0.1, 1.1),),
        params=(Param("k1", "1/s", 0.04, 0.01, 0.1), Param("k2", "-", 1e4, 1e3, 1e5), Param("k3", "-", 3e7, 1e7, 1e8)),
        coefficients=_coefficients, output=_output, derivative=_derivative, default_dt=10.0,
    )
    return Model(**{**fields, **changes})


ROBERTSON = robertson(solver=Adaptive())


def _decay(x, u, c):
    return (c[0] - u[0] * x[0],)


FEEDBACK_DECAY = Model(
    name="feedback_decay", version="1.0.0",
    states=(State("x", "-", "a level", 0.0, 10.0, nominal=1.0),),
    inputs=(Input("k", "1/s", "its decay rate, e.g. set by a controller on x", 0.0, 1000.0, nominal=0.0),),
    outputs=(Output("x", "-", "", 0.0, 10.0),), params=(Param("inflow", "1/s", 0.1, 0.0, 1.0),),
    coefficients=_coefficients, output=lambda x, u, c: (x[0],), derivative=_decay, default_dt=0.001,
)
"""Stiff only through its input: a decay whose rate a feedback on its own state sets (0 at the nominal level,
1000/s at the top of its range), for the stability check of state-dependent signals."""
