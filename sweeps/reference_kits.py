"""Sweep kits of the three reference models, written as a model package's author would write theirs.

Each is plain data on the public API (`sweeps.kits`, `raytwin.signals`, `raytwin.scenario_metrics`): named, sweepable parameters, one signal per
model input, metrics, a start state, an example sweep and the excitation used for synthetic
calibration data. `register_kit` makes each its model's kit.
"""

from __future__ import annotations

import jax.numpy as jnp

from raytwin.sim import BATTERY_ECM, THERMAL_RC, TWO_TANK, Model
from raytwin.scenario_metrics import Metric
from raytwin.signals import DAY_S, TWO_PI, Proportional, RandomLevels, RandomWalk, Sinusoid, Square
from sweeps.kits import ExampleSweep, Kit, KitParameter, register_kit

HOUR_S = 3600.0
SCALE_30 = {"mode": "scale", "low": 0.7, "high": 1.3}


def _values_of(model: Model, name: str) -> dict[str, float]:
    """The plausible range of a kit parameter that takes values of the model's variable `name` (the
    setpoint of a state, the mean of an input, a threshold on an output): that variable's."""
    var = next(v for v in (*model.states, *model.inputs, *model.outputs) if v.name == name)
    return {"lower": var.lower, "upper": var.upper}


THERMAL = register_kit(Kit(
    model=THERMAL_RC,
    parameters={
        "T_out_mean": KitParameter(default=278.15, unit="K", description="daily mean outdoor temperature",
                                   **_values_of(THERMAL_RC, "T_out")),
        "T_out_amplitude": KitParameter(default=5.0, unit="K", description="daily outdoor swing (peak at 15:00)"),
        "solar_peak": KitParameter(default=2000.0, unit="W", description="solar gain at noon (half-sine by day)",
                                   **_values_of(THERMAL_RC, "Q_sol")),
        "setpoint": KitParameter(default=294.15, unit="K", description="thermostat setpoint",
                                 **_values_of(THERMAL_RC, "T_in")),
        "heater_gain": KitParameter(default=5000.0, unit="W/K", description="proportional thermostat gain", lower=0.0),
        "Q_h_max": KitParameter(default=10000.0, unit="W", description="heater capacity",
                                **_values_of(THERMAL_RC, "Q_h")),
        "comfort_low": KitParameter(default=292.15, unit="K", description="lower edge of the comfort band",
                                    **_values_of(THERMAL_RC, "T_in")),
        "comfort_high": KitParameter(default=297.15, unit="K", description="upper edge of the comfort band",
                                     **_values_of(THERMAL_RC, "T_in")),
    },
    inputs={
        "T_out": Sinusoid(mean="T_out_mean", amplitude="T_out_amplitude", period_s=DAY_S, phase_s=-9 * HOUR_S,
                          clock=True),
        "Q_h": Proportional(state="T_in", setpoint="setpoint", gain="heater_gain", lower=0.0, upper="Q_h_max"),
        "Q_sol": Sinusoid(amplitude="solar_peak", period_s=DAY_S, phase_s=-6 * HOUR_S, lower=0.0, clock=True),
    },
    metrics=(
        Metric(name="T_in_max", kind="max", of="T_in", unit="K", description="peak indoor temperature"),
        Metric(name="T_in_min", kind="min", of="T_in", unit="K", description="lowest indoor temperature"),
        Metric(name="energy_kwh", kind="integral", of="Q_h", scale=1 / 3.6e6, unit="kWh",
               description="heating energy used"),
        Metric(name="discomfort_s", kind="time_outside", of="T_in", low="comfort_low", high="comfort_high",
               unit="s", description="time outside the comfort band"),
    ),
    start_state={"T_in": 293.15, "T_m": 291.15},
    example=ExampleSweep(horizon_s=7 * DAY_S, step_s=60.0, dimensions=[
        {"name": "C_in", "target": "param", **SCALE_30},
        {"name": "Q_h_max", "target": "input", "low": 3000.0, "high": 10000.0},
        {"name": "R_io", "target": "param", **SCALE_30},
        {"name": "T_out_mean", "target": "input", "low": 263.15, "high": 283.15},
    ]),
    excitation={  # hourly random heating levels, a wandering outdoor temperature, daily sun
        "T_out": RandomWalk(start=278.15, step_std=1.0, hold_s=HOUR_S, lower=253.15, upper=303.15),
        "Q_h": RandomLevels(levels=[0.0, 3000.0, 6000.0], hold_s=HOUR_S, seed=1),
        "Q_sol": Sinusoid(amplitude=2000.0, period_s=DAY_S, phase_s=-6 * HOUR_S, lower=0.0),
    },
))

BATTERY = register_kit(Kit(
    model=BATTERY_ECM,
    parameters={
        "current_a": KitParameter(default=2.5, unit="A", description="discharge pulse current",
                                  **_values_of(BATTERY_ECM, "i")),
        "pulse_period_s": KitParameter(default=600.0, unit="s", description="pulse period"),
        "duty": KitParameter(default=0.5, unit="-", description="fraction of each period under load", lower=0.0,
                             upper=1.0),
        "v_limit": KitParameter(default=3.2, unit="V", description="undervoltage limit",
                                **_values_of(BATTERY_ECM, "v_terminal")),
    },
    inputs={"i": Square(high="current_a", period_s="pulse_period_s", duty="duty")},
    metrics=(
        Metric(name="soc_min", kind="min", of="soc", unit="-", description="lowest state of charge"),
        Metric(name="v_terminal_min", kind="min", of="v_terminal", unit="V", description="lowest terminal voltage"),
        Metric(name="undervoltage_s", kind="time_below", of="v_terminal", threshold="v_limit", unit="s",
               description="time below the voltage limit"),
        Metric(name="charge_ah", kind="integral", of="i", absolute=True, scale=1 / 3600.0, unit="Ah",
               description="charge throughput"),
    ),
    start_state={"soc": 0.9, "v1": 0.0, "v2": 0.0},
    example=ExampleSweep(horizon_s=HOUR_S, step_s=1.0, dimensions=[
        {"name": "q", "target": "param", "mode": "scale", "low": 0.8, "high": 1.0},
        {"name": "r0", "target": "param", "mode": "scale", "low": 1.0, "high": 2.0},
        {"name": "current_a", "target": "input", "low": 1.0, "high": 7.5},
    ]),
    excitation={"i": RandomLevels(levels=[0.0, 0.0, 1.0, 2.5, 5.0, -2.5], hold_s=60.0)},  # pulses and rests
))


def _tank_inflow(t, x, p):
    """A custom JAX input: the pump's mean inflow with a relative square-wave swing."""
    square = jnp.sign(jnp.sin((TWO_PI / p["swing_period_s"]) * t))
    return p["q_in_mean"] * (1.0 + p["q_in_swing"] * square)


TANKS = register_kit(Kit(
    model=TWO_TANK,
    parameters={
        "q_in_mean": KitParameter(default=1.0e-4, unit="m^3/s", description="mean pump inflow",
                                  **_values_of(TWO_TANK, "q_in")),
        "q_in_swing": KitParameter(default=0.5, unit="-", description="relative square-wave swing of the inflow"),
        "swing_period_s": KitParameter(default=1800.0, unit="s", description="period of the inflow square wave"),
        "h_limit": KitParameter(default=0.8, unit="m", description="overflow level", **_values_of(TWO_TANK, "h1")),
    },
    inputs={"q_in": _tank_inflow},
    metrics=(
        Metric(name="h1_max", kind="max", of="h1", unit="m", description="peak upper level"),
        Metric(name="h2_max", kind="max", of="h2", unit="m", description="peak lower level"),
        Metric(name="overflow_s", kind="time_above", of=["h1", "h2"], threshold="h_limit", unit="s",
               description="time with a level above the overflow limit"),
        Metric(name="pumped_m3", kind="integral", of="q_in", unit="m^3", description="volume pumped in"),
    ),
    start_state={"h1": 0.3, "h2": 0.3},
    example=ExampleSweep(horizon_s=2 * HOUR_S, step_s=1.0, dimensions=[
        {"name": "a1", "target": "param", "mode": "scale", "low": 0.8, "high": 1.2},
        {"name": "q_in_mean", "target": "input", "low": 5e-5, "high": 1.5e-4},
    ]),
    excitation={"q_in": RandomLevels(low=0.3e-4, high=1.6e-4, hold_s=300.0)},  # 5-minute random inflow levels
))
