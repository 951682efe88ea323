"""Sweep kits: for each reference model, how its inputs are generated and what is measured.

A kit turns a scenario into (a) input signals generated *inside* the scan from a few per-scenario
input parameters (so no input arrays are stored or transferred) and (b) summary metrics folded
step by step into the scan carry (so no trajectory is kept). Extremes include the start state;
durations count the steps taken (state at the end of each step). Everything is elementwise over
scalars, so `vmap` batches it and XLA fuses it with the RK4 step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from raytwin.sim import BATTERY_ECM, THERMAL_RC, TWO_TANK, Model

DAY_S = 86400.0
TWO_PI = 2.0 * math.pi
Params = dict[str, Any]  # input parameters of one scenario, by name


@dataclass(frozen=True)
class Quantity:
    name: str
    unit: str
    description: str


@dataclass(frozen=True, eq=False)
class SweepKit:
    """Inputs and metrics of one model for what-if sweeps (see module docstring).

    ``inputs(t, x, ip)`` gives the model inputs at time t in state x; ``init(x0, ip)`` the
    accumulator; ``update(acc, x_next, u, coeffs, ip, dt)`` folds one step; ``finalize(acc, dt)``
    the metrics in `metrics` order.
    """

    model: Model
    input_params: dict[str, tuple[float, str, str]]  # name -> (default, unit, description)
    start_state: dict[str, float]
    metrics: tuple[Quantity, ...]
    inputs: Callable[[Any, tuple, Params], tuple]
    init: Callable[[tuple, Params], tuple]
    update: Callable[[tuple, tuple, tuple, tuple, Params, Any], tuple]
    finalize: Callable[[tuple, Any], tuple]

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics)

    def default_inputs(self) -> dict[str, float]:
        return {k: v[0] for k, v in self.input_params.items()}


def _count(flag, like):
    return flag.astype(like.dtype)


# ------------------------------------------------------------------------------ thermal ----
def _thermal_inputs(t, x, ip):
    t_out = ip["T_out_mean"] + ip["T_out_amplitude"] * jnp.sin((TWO_PI / DAY_S) * (t - 9.0 * 3600.0))
    q_sol = ip["solar_peak"] * jnp.maximum(jnp.sin((TWO_PI / DAY_S) * (t - 6.0 * 3600.0)), 0.0)
    q_h = jnp.clip(ip["heater_gain"] * (ip["setpoint"] - x[0]), 0.0, ip["Q_h_max"])
    return (t_out, q_h, q_sol)


def _thermal_init(x0, ip):
    zero = jnp.zeros_like(x0[0])
    return (x0[0], x0[0], zero, zero)


def _thermal_update(acc, x_next, u, coeffs, ip, dt):
    t_max, t_min, energy_j, outside = acc
    t_in = x_next[0]
    out_of_band = (t_in < ip["comfort_low"]) | (t_in > ip["comfort_high"])
    return (
        jnp.maximum(t_max, t_in), jnp.minimum(t_min, t_in), energy_j + u[1] * dt, outside + _count(out_of_band, t_in)
    )


def _thermal_finalize(acc, dt):
    t_max, t_min, energy_j, outside = acc
    return (t_max, t_min, energy_j / 3.6e6, outside * dt)


THERMAL_KIT = SweepKit(
    model=THERMAL_RC,
    input_params={
        "T_out_mean": (278.15, "K", "daily mean outdoor temperature"),
        "T_out_amplitude": (5.0, "K", "daily outdoor swing (peak at 15:00)"),
        "solar_peak": (2000.0, "W", "solar gain at noon (half-sine by day)"),
        "setpoint": (294.15, "K", "thermostat setpoint"),
        "heater_gain": (5000.0, "W/K", "proportional thermostat gain"),
        "Q_h_max": (10000.0, "W", "heater capacity"),
        "comfort_low": (292.15, "K", "lower edge of the comfort band"),
        "comfort_high": (297.15, "K", "upper edge of the comfort band"),
    },
    start_state={"T_in": 293.15, "T_m": 291.15},
    metrics=(
        Quantity("T_in_max", "K", "peak indoor temperature"),
        Quantity("T_in_min", "K", "lowest indoor temperature"),
        Quantity("energy_kwh", "kWh", "heating energy used"),
        Quantity("discomfort_s", "s", "time outside the comfort band"),
    ),
    inputs=_thermal_inputs,
    init=_thermal_init,
    update=_thermal_update,
    finalize=_thermal_finalize,
)


# ------------------------------------------------------------------------------ battery ----
def _battery_inputs(t, x, ip):
    period = ip["pulse_period_s"]
    on = jnp.mod(t, period) < ip["duty"] * period
    return (jnp.where(on, ip["current_a"], 0.0 * ip["current_a"]),)


def _battery_init(x0, ip):
    zero = jnp.zeros_like(x0[0])
    return (x0[0], jnp.full_like(x0[0], jnp.inf), zero, zero)


def _battery_update(acc, x_next, u, coeffs, ip, dt):
    soc_min, v_min, below, charge_ah = acc
    (v,) = BATTERY_ECM.output(x_next, u, coeffs)
    return (
        jnp.minimum(soc_min, x_next[0]),
        jnp.minimum(v_min, v),
        below + _count(v < ip["v_limit"], v),
        charge_ah + jnp.abs(u[0]) * (dt / 3600.0),
    )


def _battery_finalize(acc, dt):
    soc_min, v_min, below, charge_ah = acc
    return (soc_min, v_min, below * dt, charge_ah)


BATTERY_KIT = SweepKit(
    model=BATTERY_ECM,
    input_params={
        "current_a": (2.5, "A", "discharge pulse current"),
        "pulse_period_s": (600.0, "s", "pulse period"),
        "duty": (0.5, "-", "fraction of each period under load"),
        "v_limit": (3.2, "V", "undervoltage limit"),
    },
    start_state={"soc": 0.9, "v1": 0.0, "v2": 0.0},
    metrics=(
        Quantity("soc_min", "-", "lowest state of charge"),
        Quantity("v_terminal_min", "V", "lowest terminal voltage"),
        Quantity("undervoltage_s", "s", "time below the voltage limit"),
        Quantity("charge_ah", "Ah", "charge throughput"),
    ),
    inputs=_battery_inputs,
    init=_battery_init,
    update=_battery_update,
    finalize=_battery_finalize,
)


# ----------------------------------------------------------------------------- two tank ----
def _tank_inputs(t, x, ip):
    square = jnp.sign(jnp.sin((TWO_PI / ip["swing_period_s"]) * t))
    return (ip["q_in_mean"] * (1.0 + ip["q_in_swing"] * square),)


def _tank_init(x0, ip):
    zero = jnp.zeros_like(x0[0])
    return (x0[0], x0[1], zero, zero)


def _tank_update(acc, x_next, u, coeffs, ip, dt):
    h1_max, h2_max, overflow, pumped = acc
    h1, h2 = x_next
    over = (h1 > ip["h_limit"]) | (h2 > ip["h_limit"])
    return (jnp.maximum(h1_max, h1), jnp.maximum(h2_max, h2), overflow + _count(over, h1), pumped + u[0] * dt)


def _tank_finalize(acc, dt):
    h1_max, h2_max, overflow, pumped = acc
    return (h1_max, h2_max, overflow * dt, pumped)


TWO_TANK_KIT = SweepKit(
    model=TWO_TANK,
    input_params={
        "q_in_mean": (1.0e-4, "m^3/s", "mean pump inflow"),
        "q_in_swing": (0.5, "-", "relative square-wave swing of the inflow"),
        "swing_period_s": (1800.0, "s", "period of the inflow square wave"),
        "h_limit": (0.8, "m", "overflow level"),
    },
    start_state={"h1": 0.3, "h2": 0.3},
    metrics=(
        Quantity("h1_max", "m", "peak upper level"),
        Quantity("h2_max", "m", "peak lower level"),
        Quantity("overflow_s", "s", "time with a level above the overflow limit"),
        Quantity("pumped_m3", "m^3", "volume pumped in"),
    ),
    inputs=_tank_inputs,
    init=_tank_init,
    update=_tank_update,
    finalize=_tank_finalize,
)

KITS: dict[str, SweepKit] = {k.model.name: k for k in (THERMAL_KIT, BATTERY_KIT, TWO_TANK_KIT)}


def get_kit(simulator: str) -> SweepKit:
    try:
        return KITS[simulator]
    except KeyError:
        raise ValueError(f"no sweep kit for simulator {simulator!r}; available: {sorted(KITS)}") from None
