"""One family of scenario signals: each kind, parsed from a what-if scenario's JSON, evaluates to its
closed form (written here from the definition) both where the HTTP API checks and runs a scenario
(`Scenario.input_series`: the signal's formulas in float64 NumPy) and, as the same object, inside a
sweep kit's compiled input function (JAX, the one the engine fuses into its scan)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import jax.numpy as jnp
import numpy as np
import pytest
from pydantic import ValidationError

from raytwin.contracts import AssetType, ContractError, Scenario
from raytwin.scenario_metrics import Metric
from raytwin.signals import (
    CLOCK_INPUT, Constant, Proportional, Schedule, Series, Sinusoid, Square, clock_seconds, signal_function,
)
from raytwin.sim import THERMAL_RC
from sweeps.engine import Bases, chunk_metrics
from sweeps.kits import Kit
from sweeps.runner import compiled_kit, prepare
from sweeps.space import Dimension
from sweeps.spec import SweepSpec

THERMAL = AssetType.from_model(THERMAL_RC)
DT, N = 300.0, 2 * 288  # two days of 5-minute steps
T = DT * np.arange(N)
H = 3600.0


def _random_walk(seed: int) -> np.ndarray:
    """Hourly Gaussian steps from 280 K, saturated below at 278 K, then held for the hour."""
    steps = np.random.default_rng(seed).normal(0.0, 1.0, int(N * DT // H) + 1)
    levels, level = [], 280.0
    for s in np.concatenate([[0.0], steps[1:]]):
        level = max(level + s, 278.0)
        levels.append(level)
    return np.asarray(levels)[(T // H).astype(int)]


PER_STEP = 280.0 + np.cos(T / 7000.0)
CASES = {  # wire JSON of a T_out signal -> its values at T [K]
    "constant": ({"kind": "constant", "value": 281.5, "unit": "K"}, np.full(N, 281.5)),
    "sinusoid in degC": ({"kind": "sinusoid", "mean": 7.0, "amplitude": 5.0, "period_s": 86400.0,
                          "phase_s": -9 * H, "unit": "degC"},
                         273.15 + 7.0 + 5.0 * np.sin(2 * np.pi * (T - 9 * H) / 86400.0)),
    "daily schedule": ({"kind": "schedule", "starts_s": [0.0, 8 * H, 18 * H], "values": [275.0, 285.0, 278.0],
                        "unit": "K"},
                       np.select([T % 86400 < 8 * H, T % 86400 < 18 * H], [275.0, 285.0], 278.0)),
    "two-hour schedule": ({"kind": "schedule", "period_s": 2 * H, "starts_s": [0.0, 1800.0],
                           "values": [270.0, 290.0]}, np.where(T % (2 * H) < 1800.0, 270.0, 290.0)),
    "step": ({"kind": "step", "before": 275.0, "after": 285.0, "at_s": 40000.0},
             np.where(T < 40000.0, 275.0, 285.0)),
    "square": ({"kind": "square", "low": 275.0, "high": 285.0, "period_s": H, "duty": 0.25},
               np.where(T % H < 900.0, 285.0, 275.0)),
    "piecewise linear, saturated": ({"kind": "piecewise_linear", "times_s": [0.0, 43200.0, 86400.0],
                                     "values": [270.0, 290.0, 280.0], "upper": 285.0},
                                    np.minimum(np.interp(T, [0.0, 43200.0, 86400.0], [270.0, 290.0, 280.0]), 285.0)),
    "random walk": ({"kind": "random_walk", "start": 280.0, "step_std": 1.0, "hold_s": H, "lower": 278.0,
                     "seed": 5}, _random_walk(5)),
    "random levels": ({"kind": "random_levels", "levels": [275.0, 280.0, 285.0], "hold_s": 1800.0, "seed": 2},
                      np.random.default_rng(2).choice([275.0, 280.0, 285.0], int(N * DT // 1800.0) + 1)[
                          (T // 1800.0).astype(int)]),
    "series of per-step values": ({"kind": "series", "values": PER_STEP.tolist()}, PER_STEP),
}
ZERO_W = {"kind": "constant", "value": 0.0, "unit": "W"}


def _scenario(t_out: dict, seed: int = 0) -> Scenario:
    return Scenario.model_validate({"asset_id": "zone-1", "horizon_s": N * DT, "step_s": DT, "seed": seed,
                                    "inputs": {"T_out": t_out, "Q_h": ZERO_W, "Q_sol": ZERO_W}})


@pytest.mark.parametrize("case", CASES)
def test_each_signal_kind_matches_its_closed_form_on_both_paths(case):
    wire, expected = CASES[case]
    scenario = _scenario(wire)
    np.testing.assert_allclose(scenario.input_series(THERMAL)[:, 0], expected, rtol=1e-12)  # HTTP path, float64 NumPy

    signal = scenario.inputs["T_out"]  # the very object the HTTP request carried, in a sweep kit
    kit = Kit(model=THERMAL_RC, inputs={"T_out": signal, "Q_h": Constant(value=0.0), "Q_sol": Constant(value=0.0)},
              metrics=(Metric(name="T_out_max", kind="max", of="T_out"),), start_state={"T_in": 293.0, "T_m": 292.0})
    t_out, *_ = kit.compile(N * DT, DT).inputs(jnp.asarray(T), {}, {})  # float32, as sweeps run by default
    np.testing.assert_allclose(np.asarray(t_out), expected, rtol=2e-7)


def test_data_metrics_over_a_signal_run_in_the_fused_scan_equal_numpy():
    """The scan feeds each step the input at its start: metrics over the input see exactly `expected`."""
    wire, expected = CASES["sinusoid in degC"]
    metrics = (Metric(name="mean", kind="mean", of="T_out"), Metric(name="min", kind="min", of="T_out"),
               Metric(name="integral", kind="integral", of="T_out"),
               Metric(name="warm_s", kind="time_above", of="T_out", threshold=283.0))
    kit = Kit(model=THERMAL_RC, inputs={"T_out": _scenario(wire).inputs["T_out"], "Q_h": Constant(value=0.0),
                                        "Q_sol": Constant(value=0.0)},
              metrics=metrics, start_state={"T_in": 293.0, "T_m": 292.0})
    bases = Bases(kit.states0, THERMAL_RC.default_params(), {})
    got = chunk_metrics(kit.compile(N * DT, DT), bases, [Dimension(name="C_in", target="param", mode="scale", values=[1.0])],
                        np.array([[1.0]]), DT, N, 1, "float64")
    reference = {"mean": expected.mean(), "min": expected.min(), "integral": expected.sum() * DT,
                 "warm_s": DT * np.sum(expected > 283.0)}
    for name, value in reference.items():
        assert got[name][0] == pytest.approx(value, rel=1e-12), name


def test_a_scenario_seed_offsets_the_random_draws():
    wire, _ = CASES["random walk"]
    np.testing.assert_allclose(_scenario(wire, seed=3).input_series(THERMAL)[:, 0], _random_walk(5 + 3), rtol=1e-12)


def test_scenarios_take_numbers_from_the_request_only():
    """No file named by a request is read, no sweep parameter names, no feedback (a sweep's), with reasons."""
    with pytest.raises(ValidationError, match="not a file path: the server does not read files named by a request"):
        _scenario({"kind": "series", "path": "/etc/passwd", "column": "x"})
    with pytest.raises(ValidationError, match=r"\['mean'\] name sweep parameters; a scenario's signals take numbers"):
        _scenario({"kind": "constant", "value": "mean"})
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        _scenario({"kind": "proportional", "state": "T_in", "setpoint": 294.0, "gain": 5.0})
    with pytest.raises(ContractError, match="input 'T_out': unit 'W' is not 'K'"):
        _scenario({"kind": "constant", "value": 1.0, "unit": "W"}).check_against(THERMAL)
    with pytest.raises(ValidationError, match="give either values .* or path and column"):
        Series(values=[1.0], path="x.parquet", column="x")
    with pytest.raises(ValueError, match="series has 2 values for 3 steps"):  # in a sweep too
        signal_function(Series(values=[1.0, 2.0]), horizon_s=3.0, step_s=1.0)


def test_signals_compile_in_either_precision_and_convert_units_affinely():
    fn = signal_function(Constant(value=20.0, unit="degC", upper=15.0), unit="K")  # saturated in degC first
    assert float(fn(jnp.float32(0.0), None, {})) == pytest.approx(288.15)
    feedback = signal_function(Proportional(state="T_in", setpoint=294.0, gain=10.0, lower=0.0))
    assert float(feedback(0.0, {"T_in": jnp.float32(295.0)}, {})) == 0.0
    assert math.isclose(float(feedback(0.0, {"T_in": 293.5}, {})), 5.0)


def test_clock_signals_started_at_a_time_equal_the_unstarted_signal_at_that_time_of_week():
    """A sweep from a live twin at 12:07 saw its daily outdoor temperature and sun as at midnight: every clock
    signal is the same signal read at the time of week of the run's start plus t; others start at t = 0."""
    start = datetime(2026, 12, 3, 12, 7, tzinfo=UTC)  # a Thursday
    clock_s = clock_seconds(start)
    assert clock_s == 3 * 86400 + 12 * 3600 + 7 * 60 and clock_seconds(datetime(2026, 11, 30, tzinfo=UTC)) == 0.0
    t = np.arange(0.0, 2 * 86400, 450.0)
    ip = {"p": 1800.0}
    for sig in (Sinusoid(mean=5.0, amplitude=3.0, phase_s=-9 * 3600, clock=True),
                Schedule(period_s=86400 * 7, starts_s=[0.0, 3600.0 * 80], values=[1.0, 2.0], clock=True),
                Schedule(starts_s=[0.0, 8 * 3600, 18 * 3600], values=[1.0, 2.0, 1.0], phase_s=600.0, clock=True),
                Square(high=4.0, period_s="p", duty=0.25, phase_s=100.0, clock=True),
                Square(high=4.0, period_s=7000.0, duty=0.25, clock=True)):
            started = signal_function(sig, xp=np)(t, None, {**ip, CLOCK_INPUT: clock_s})
            np.testing.assert_allclose(started, signal_function(sig, xp=np)(clock_s + t, None, ip), atol=1e-9)
    relative = signal_function(Square(high=4.0, period_s=600.0, phase_s=100.0), xp=np)  # a pulse train from t = 0
    np.testing.assert_array_equal(relative(t, None, {CLOCK_INPUT: clock_s}), relative(t, None, {}))


def test_a_sweeps_start_time_is_a_traced_input_so_one_kernel_serves_every_start_time():
    """Live sweeps baked their start time into the kit, a static argument of the jitted kernel: each new start
    time compiled the kernel again and grew the caches. The clock is now a kit parameter: one kit (so one
    kernel) for every start time, whose metrics equal those of the same signals shifted by hand."""
    times = (datetime(2026, 12, 3, 12, 7, tzinfo=UTC), datetime(2026, 12, 5, 3, 30, tzinfo=UTC))
    metric = [Metric(name="T_out_mean", kind="mean", of="T_out"), Metric(name="sun", kind="integral", of="Q_sol")]
    common = dict(model="thermal_rc", horizon_s=6 * 3600.0, step_s=60.0, metrics=metric, space=ONE_SCENARIO)
    specs = [SweepSpec(**common, start_time=at) for at in times]
    kits = [s.kit("thermal_rc") for s in specs]
    assert kits[0] is kits[1] and compiled_kit(specs[0], "thermal_rc") is compiled_kit(specs[1], "thermal_rc")
    assert [s.kit_inputs(kits[0])[CLOCK_INPUT] for s in specs] == [clock_seconds(at) for at in times]
    for spec, at in zip(specs, times):
        day_s = clock_seconds(at) % 86400.0
        shifted = {name: sig.model_copy(update={"clock": False, "phase_s": sig.phase_s + day_s})
                   for name, sig in kits[0].inputs.items() if name != "Q_h"}
        got, want = _sweep_metrics(spec), _sweep_metrics(SweepSpec(**common, signals=shifted))
        for name in ("T_out_mean", "sun"):
            assert got[name][0] == pytest.approx(want[name][0], rel=1e-5), (at, name)
    assert _sweep_metrics(specs[0])["sun"][0] != pytest.approx(_sweep_metrics(specs[1])["sun"][0], rel=1e-2)


ONE_SCENARIO = {"method": "grid", "dimensions": [{"name": "C_in", "target": "param", "mode": "scale", "values": [1.0]}]}


def _sweep_metrics(spec) -> dict[str, np.ndarray]:
    simulator, bases = prepare(spec)
    return chunk_metrics(compiled_kit(spec, simulator), bases, spec.space.dimensions, spec.space.rows(0, 1),
                         spec.step_s, spec.n_steps, 1, "float32")


def test_the_clock_is_set_once():
    """`start_time` sets the clock: giving its value too, or sweeping it, would leave one of them unused."""
    common = dict(model="thermal_rc", horizon_s=3600.0, step_s=60.0, start_time=datetime(2026, 12, 3, tzinfo=UTC))
    with pytest.raises(ValidationError, match="inputs.clock_s and start_time both set the clock"):
        SweepSpec(**common, inputs={CLOCK_INPUT: 3600.0}, space=ONE_SCENARIO)
    hours = {"method": "grid", "dimensions": [{"name": CLOCK_INPUT, "target": "input", "mode": "absolute", "values": [0.0, 43200.0]}]}
    with pytest.raises(ValidationError, match="sweeps clock_s and start_time sets it"):
        SweepSpec(**common, space=hours)
    sun = [Metric(name="sun", kind="integral", of="Q_sol")]
    swept = SweepSpec(**{k: v for k, v in common.items() if k != "start_time"}, space=hours, metrics=sun)
    simulator, bases = prepare(swept)
    got = chunk_metrics(compiled_kit(swept, simulator), bases, swept.space.dimensions, swept.space.rows(0, 2),
                        swept.step_s, swept.n_steps, 2, "float32")["sun"]
    assert got[0] == 0.0 and got[1] > 0.0  # the hour from Monday midnight, from Monday noon
