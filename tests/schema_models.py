"""Versions of a one-zone room model for the schema evolution tests: 2.0.0 renames the state `T` [K]
to `T_air` and works in degC (the same linear ODE, so a state converted between them evolves
identically); ROOM_SURFACE adds a second sensor of the air temperature, ROOM_HEAT renames the input
`Q` to `Q_heat` (1.0.0 otherwise)."""

from __future__ import annotations

from raytwin.models import Input, Model, Output, Param, State


def _coefficients(p):
    return p


def _derivative(x, u, c):
    (t,), (t_out, q), (r, cap) = x, u, c
    return (((t_out - t) / r + q) / cap,)


def _output(x, u, c):
    return (x[0],)


def _outputs_twice(x, u, c):
    return (x[0], x[0])


def room(version: str, state: str, unit: str, lower: float, upper: float, nominal: float, heat: str = "Q",
         surface: bool = False) -> Model:
    """`surface`: a second output, `T_surface`, that measures the air temperature too."""
    air = Output(state, unit, "air temperature", lower, upper, measurement_std=0.1)
    return Model(
        name="room", version=version, description="One thermal zone: C dT/dt = (T_out - T)/R + Q.",
        states=(State(state, unit, "air temperature", lower, upper, nominal=nominal, prior_std=1.0, process_std=0.01),),
        inputs=(Input("T_out", unit, "outdoor temperature", lower, upper, nominal=nominal), Input(heat, "W", "heating",
                                                                                                  -1e6, 1e6, nominal=0.0)),
        params=(Param("R", "K/W", 0.01, 1e-4, 1.0, "envelope resistance"),
                Param("C", "J/K", 1e6, 1e3, 1e9, "heat capacity")),
        outputs=(air, Output("T_surface", unit, "surface sensor", lower, upper, measurement_std=0.5)) if surface
        else (air,),
        coefficients=_coefficients, derivative=_derivative, output=_outputs_twice if surface else _output,
        default_dt=60.0)


ROOM_V1 = room("1.0.0", "T", "K", 173.15, 373.15, 293.15)
ROOM_V2 = room("2.0.0", "T_air", "degC", -100.0, 100.0, 20.0)
ROOM_SURFACE = room("1.1.0", "T", "K", 173.15, 373.15, 293.15, surface=True)
ROOM_HEAT = room("3.0.0", "T", "K", 173.15, 373.15, 293.15, heat="Q_heat")
