"""A brushed DC motor with winding temperature (model ``dc_motor``), written on RayTwin's public API.

    L di/dt     = V - R i - k omega                      (armature circuit, back-EMF k omega)
    J domega/dt = k i - b omega - tau_load               (rotor, viscous friction)
    C_th dT_w/dt = R i^2 - (T_w - T_amb) / R_th          (winding: copper losses, loss to ambient)

The torque and back-EMF constants are one number in SI units: ``k`` [N*m/A] = [V*s/rad] (RayTwin's
unit table converts a datasheet's V/krpm to it); ``b`` is the viscous friction [N*m*s/rad].

Time scales at the defaults: the electromechanical pair has eigenvalues -25 +- 16.6j 1/s (RK4 is
stable for dt < 0.094 s), the winding's thermal time constant is C_th R_th = 250 s. The fastest
corner of the parameter bounds (R 2 ohm, L 2 mH: R/L = 1000 1/s) needs dt < 2.8 ms, so the default
step of 2 ms is stable over the whole box (`raytwin models check dc_motor` prints both limits).
"""

from __future__ import annotations

from raytwin.models import Input, Model, Output, Param, State
from raytwin.scenario_metrics import Metric
from raytwin.signals import Constant, RandomLevels, Square
from sweeps.kits import ExampleSweep, Kit, KitParameter, register_kit

def _coefficients(p):
    r, l, k, j, b, c_th, r_th = p
    inv_l, inv_j = 1.0 / l, 1.0 / j
    return (r * inv_l, k * inv_l, inv_l, k * inv_j, b * inv_j, inv_j,
            r / c_th, 1.0 / (r_th * c_th))


def _derivative(x, u, c):
    i, omega, t_w = x
    v, tau_load, t_amb = u
    r_l, k_l, inv_l, k_j, b_j, inv_j, r_c, a_th = c
    di = inv_l * v - r_l * i - k_l * omega
    domega = k_j * i - b_j * omega - inv_j * tau_load
    dt_w = r_c * i * i - a_th * (t_w - t_amb)
    return (di, domega, dt_w)


def _output(x, u, c):
    return x


DC_MOTOR = Model(
    name="dc_motor",
    version="0.1.0",
    description="Brushed DC motor (48 V, ~1 kW) with a lumped winding temperature.",
    states=(
        State("i", "A", "armature current", -200.0, 200.0, nominal=0.0, prior_std=1.0, process_std=0.5),
        State("omega", "rad/s", "rotor speed", -1000.0, 1000.0, nominal=0.0, prior_std=5.0, process_std=0.5),
        State("T_w", "K", "winding temperature", 223.15, 473.15, nominal=298.15, prior_std=5.0,
              process_std=0.01),
    ),
    inputs=(
        Input("V", "V", "armature voltage", -100.0, 100.0, nominal=48.0),
        Input("tau_load", "N*m", "load torque", -50.0, 50.0, nominal=0.0),
        Input("T_amb", "K", "ambient temperature", 233.15, 353.15, nominal=298.15),
    ),
    params=(
        Param("R", "ohm", 0.5, 0.1, 2.0, "armature resistance"),
        Param("L", "H", 0.01, 2e-3, 0.05, "armature inductance"),
        Param("k", "N*m/A", 0.3, 0.05, 1.0, "torque constant (= back-EMF constant in V*s/rad)"),
        Param("J", "kg*m^2", 0.01, 1e-3, 0.1, "rotor + load inertia"),
        Param("b", "N*m*s/rad", 5e-4, 0.0, 0.01, "viscous friction"),
        Param("C_th", "J/K", 500.0, 50.0, 5000.0, "winding thermal capacity"),
        Param("R_th", "K/W", 0.5, 0.05, 5.0, "winding-to-ambient thermal resistance"),
    ),
    outputs=(
        Output("i", "A", "measured armature current", -200.0, 200.0, measurement_std=0.05),
        Output("omega", "rad/s", "measured speed (encoder)", -1000.0, 1000.0, measurement_std=0.2),
        Output("T_w", "K", "winding thermistor", 223.15, 473.15, measurement_std=0.5),
    ),
    coefficients=_coefficients,
    derivative=_derivative,
    output=_output,
    default_dt=0.002,
    dt_limit="stable for dt < 0.094 s at the default parameters, < 2.8 ms over the parameter bounds",
)

MINUTE_S = 60.0

DC_MOTOR_KIT = register_kit(Kit(
    model=DC_MOTOR,
    parameters={
        "V_supply": KitParameter(default=48.0, unit="V", description="supply voltage"),
        "load": KitParameter(default=5.0, unit="N*m", description="load torque while the load is on"),
        "load_period_s": KitParameter(default=20.0, unit="s", description="load cycle period"),
        "T_amb": KitParameter(default=298.15, unit="K", description="ambient temperature"),
        "T_max": KitParameter(default=353.15, unit="K", description="winding temperature limit"),
    },
    inputs={
        "V": Constant(value="V_supply"),
        "tau_load": Square(high="load", period_s="load_period_s", duty=0.5),
        "T_amb": Constant(value="T_amb"),
    },
    metrics=(
        Metric(name="T_w_max", kind="max", of="T_w", unit="K", description="hottest winding temperature"),
        Metric(name="omega_min", kind="min", of="omega", unit="rad/s", description="lowest speed"),
        Metric(name="i_max", kind="max", of="i", unit="A", description="peak current"),
        Metric(name="overtemp_s", kind="time_above", of="T_w", threshold="T_max", unit="s",
               description="time above the winding temperature limit"),
    ),
    start_state={"i": 0.0, "omega": 0.0, "T_w": 298.15},
    example=ExampleSweep(horizon_s=5 * MINUTE_S, step_s=0.002, dimensions=[
        {"name": "R_th", "target": "param", "mode": "scale", "low": 0.7, "high": 1.3},
        {"name": "load", "target": "input", "low": 0.0, "high": 6.0},  # 20 A: ~80 K in 5 min
        {"name": "T_amb", "target": "input", "low": 273.15, "high": 313.15},
    ]),
    excitation={  # voltage and load levels held for a second: excites current, speed and heating
        "V": RandomLevels(levels=[24.0, 36.0, 48.0], hold_s=1.0),
        "tau_load": RandomLevels(low=0.0, high=10.0, hold_s=1.0, seed=1),
        "T_amb": Constant(value=298.15),
    },
))
