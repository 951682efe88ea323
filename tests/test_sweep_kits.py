"""Sweep kits declared as data: signals, metrics, validation, generic fallbacks and divergence."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.sweep_kits import HANDWRITTEN_THERMAL_KIT
from raytwin.sim import THERMAL_RC, TWO_TANK, simulate
from sweeps.engine import Bases, chunk_metrics
from raytwin.scenario_metrics import CustomMetric, Metric
from raytwin.signals import (
    Constant,
    PiecewiseLinear,
    Proportional,
    RandomLevels,
    RandomWalk,
    Schedule,
    Series,
    Sinusoid,
    Square,
    Step,
    signal_function,
)
from sweeps.kits import Kit, KitParameter, example_sweep, kit_for
from sweeps.reference_kits import THERMAL
from sweeps.space import Dimension
from sweeps.synthetic import excitation, generic_excitation


def _eval(sig, t, state=None, params=None, horizon_s=None):
    return np.asarray(signal_function(sig, horizon_s=horizon_s)(jnp.asarray(t), state or {}, params or {}))


def test_signals_evaluate_as_declared(tmp_path):
    t = np.arange(0.0, 2 * 86400.0, 600.0)
    p = {"mean": 280.0, "on": 5.0}
    np.testing.assert_allclose(_eval(Constant(value="mean"), t, params=p), 280.0)
    np.testing.assert_allclose(_eval(Sinusoid(mean="mean", amplitude=5.0, period_s=86400.0, phase_s=-9 * 3600.0),
                                     t, params=p), 280.0 + 5.0 * np.sin(2 * np.pi * (t - 9 * 3600) / 86400), atol=1e-9)
    half = _eval(Sinusoid(amplitude=2.0, lower=0.0), t)
    assert half.min() == 0.0 and half.max() == pytest.approx(2.0, rel=1e-6)
    day = _eval(Schedule(starts_s=[0.0, 8 * 3600.0, 18 * 3600.0], values=[1.0, "on", 1.0]), t, params=p)
    np.testing.assert_array_equal(day, np.where((t % 86400 >= 8 * 3600) & (t % 86400 < 18 * 3600), 5.0, 1.0))
    np.testing.assert_array_equal(_eval(Step(before=0.0, after="on", at_s=3600.0), t, params=p),
                                  np.where(t < 3600.0, 0.0, 5.0))
    np.testing.assert_array_equal(_eval(Square(high="on", period_s=1200.0, duty=0.25), t, params=p),
                                  np.where(t % 1200.0 < 300.0, 5.0, 0.0))
    np.testing.assert_allclose(_eval(PiecewiseLinear(times_s=[0.0, 86400.0], values=[0.0, 10.0]), t),
                               np.minimum(t / 8640.0, 10.0))
    np.testing.assert_allclose(_eval(Proportional(state="T_in", setpoint="mean", gain=2.0, upper=4.0), t,
                                     state={"T_in": 279.0}, params=p), 2.0)  # 2 x (280 - 279), under 4
    walk = _eval(RandomWalk(start=10.0, step_std=1.0, hold_s=3600.0, lower=8.0, seed=3), t, horizon_s=t[-1])
    assert walk[0] == 10.0 and walk.min() >= 8.0 and len(set(walk[:6])) == 1  # held for an hour
    assert not np.array_equal(walk, _eval(RandomWalk(start=10.0, step_std=1.0, hold_s=3600.0, seed=4), t,
                                          horizon_s=t[-1]))
    levels = _eval(RandomLevels(levels=[0.0, 3.0], hold_s=1800.0), t, horizon_s=t[-1])
    assert set(levels) == {0.0, 3.0}
    path = tmp_path / "weather.parquet"
    pq.write_table(pa.table({"t_s": [0.0, 3600.0, 7200.0], "T_out": [270.0, 280.0, 275.0]}), path)
    np.testing.assert_allclose(_eval(Series(path=str(path), column="T_out"), np.array([0.0, 1800.0, 7200.0, 9e4])),
                               [270.0, 275.0, 275.0, 275.0])
    with pytest.raises(ValueError, match="needs the horizon"):
        _eval(RandomLevels(low=0.0, high=1.0, hold_s=60.0), t)


def test_data_metrics_equal_numpy_on_the_simulated_trajectory():
    """Every metric kind over a state, an input and an output, and a custom metric, against NumPy."""
    dt, n = 300.0, 288
    kit = Kit(
        model=THERMAL_RC,
        parameters={"warm": KitParameter(default=293.0, unit="K")},
        inputs={"T_out": Sinusoid(mean=278.0, amplitude=6.0), "Q_h": Step(before=2000.0, after=0.0, at_s=43200.0),
                "Q_sol": Constant(value=500.0)},
        metrics=(
            Metric(name="min", kind="min", of="T_in"), Metric(name="max", kind="max", of="T_in"),
            Metric(name="mean", kind="mean", of="T_m"), Metric(name="final", kind="final", of="T_in"),
            Metric(name="kwh", kind="integral", of="Q_h", scale=1 / 3.6e6),
            Metric(name="above", kind="time_above", of="T_in", threshold="warm"),
            Metric(name="below", kind="time_below", of=["T_in", "T_m"], threshold=292.0),
            Metric(name="outside", kind="time_outside", of="T_out", low=274.0, high=282.0),
            CustomMetric("peak_gap", init=lambda x0, p: jnp.zeros_like(x0["T_in"]),
                         update=lambda a, v, p, dt: jnp.maximum(a, v["T_in"] - v["T_m"]), finalize=lambda a, dt: a),
        ),
        start_state={"T_in": 293.15, "T_m": 291.15},
    )
    compiled = kit.compile(dt * n)
    bases = Bases(kit.states0, THERMAL_RC.default_params(), kit.default_inputs())
    got = chunk_metrics(compiled, bases, [Dimension(name="warm", target="input", values=[293.0])],
                        np.array([[293.0]]), dt, n, 1, "float64")
    t = dt * np.arange(n)
    u = np.column_stack([278.0 + 6.0 * np.sin(2 * np.pi * t / 86400), np.where(t < 43200, 2000.0, 0.0),
                         np.full(n, 500.0)])
    x = simulate(THERMAL_RC, [293.15, 291.15], u, THERMAL_RC.param_vector(), dt, dtype=jnp.float64)
    t_in, t_m = x[:, 0], x[:, 1]
    expected = {
        "min": t_in.min(), "max": t_in.max(), "mean": t_m[1:].mean(), "final": t_in[-1],
        "kwh": u[:, 1].sum() * dt / 3.6e6, "above": dt * np.sum(t_in[1:] > 293.0),
        "below": dt * np.sum((t_in[1:] < 292.0) | (t_m[1:] < 292.0)),
        "outside": dt * np.sum((u[:, 0] < 274.0) | (u[:, 0] > 282.0)), "peak_gap": np.max(t_in[1:] - t_m[1:]),
    }
    assert expected["above"] > 0 and expected["below"] > 0 and expected["outside"] > 0
    for name, value in expected.items():
        assert got[name][0] == pytest.approx(value, rel=1e-9, abs=1e-9), name
    assert not got["diverged"][0]


def test_the_data_thermal_kit_computes_what_the_handwritten_one_did():
    dims = [Dimension(name="C_in", target="param", mode="scale", values=[0.7, 1.3]),
            Dimension(name="T_out_mean", target="input", values=[265.0, 280.0]),
            Dimension(name="Q_h_max", target="input", values=[1000.0, 10000.0])]  # a small heater: too cold
    rows = np.array([[0.7, 265.0, 1000.0], [1.3, 280.0, 10000.0]])
    kit = THERMAL.compile()
    bases = Bases(kit.start_state, THERMAL_RC.default_params(), kit.default_inputs())
    data = chunk_metrics(kit, bases, dims, rows, 60.0, 1440, 2, "float64")
    hand = chunk_metrics(HANDWRITTEN_THERMAL_KIT, bases, dims, rows, 60.0, 1440, 2, "float64")
    for name in kit.metric_names:
        np.testing.assert_allclose(data[name], hand[name], rtol=1e-12, atol=1e-9)
    assert data["energy_kwh"][0] > 0 and data["discomfort_s"][0] > 0


@pytest.mark.parametrize(("change", "message"), [
    (dict(inputs={"T_out": Constant(value=280.0)}), r"inputs must give exactly \['T_out', 'Q_h', 'Q_sol'\]"),
    (dict(metrics=(Metric(name="x", kind="max", of="T_nope"),)), r"metric x: unknown variable\(s\) \['T_nope'\]"),
    (dict(metrics=(Metric(name="x", kind="time_above", of="T_in", threshold="limit"),)),
     r"undeclared parameter\(s\) \['limit'\]"),
    (dict(inputs={"T_out": Constant(value=280.0), "Q_h": Proportional(state="T_x", setpoint=1.0, gain=1.0),
                  "Q_sol": Constant(value=0.0)}), "input Q_h: unknown state 'T_x'"),
    (dict(excitation={"T_out": Constant(value="p"), "Q_h": Constant(value=0.0), "Q_sol": Constant(value=0.0)},
          parameters={"p": KitParameter(default=1.0)}), "excitation signals are open loop"),
    (dict(start_state={"T_in": 290.0}), r"start_state must give exactly \['T_in', 'T_m'\]"),
    # a metric "scenario" replaced the output's scenario indices, "diverged" was lost under the flag, and quantiles
    # left a dotted name out as a dimension's column
    *[(dict(metrics=(Metric(name=n, kind="max", of="T_in"),)), rf"metric name\(s\) \['{n}'\] would clash with the "
       r"output's columns \['scenario', 'diverged'\] and a dimension's") for n in ("scenario", "diverged", "T_in.max")],
    # a unit that does not label the scaled value: joules reported as kWh, kelvin as degC
    (dict(metrics=(Metric(name="energy_kwh", kind="integral", of="Q_h", unit="kWh"),)),
     r"metric energy_kwh: its value is in W\*s times scale 1, not kWh: give scale=2.777777778e-07 for kWh"),
    (dict(metrics=(Metric(name="cold_h", kind="time_below", of="T_in", threshold=292.0, unit="h"),)),
     r"metric cold_h: its value is in s times scale 1, not h: give scale=0.0002777777778 for h"),
    (dict(metrics=(Metric(name="T_in_min", kind="min", of="T_in", unit="degC"),)),
     "metric T_in_min: its value is in K; degC is offset from it, which scale cannot give: label it K"),
])
def test_kits_refuse_bad_declarations_naming_the_model_and_field(change, message):
    base = dict(model=THERMAL_RC, inputs={"T_out": Constant(value=280.0), "Q_h": Constant(value=0.0),
                                          "Q_sol": Constant(value=0.0)},
                metrics=(Metric(name="T_in_max", kind="max", of="T_in"),))
    with pytest.raises(ValueError, match=f"kit for thermal_rc: {message}"):
        Kit(**{**base, **change})


def test_metrics_refuse_inconsistent_fields():
    with pytest.raises(ValueError, match="threshold is for time_above/time_below"):
        Metric(name="x", kind="time_above", of="T_in")
    with pytest.raises(ValueError, match="takes one variable"):
        Metric(name="x", kind="max", of=["h1", "h2"])
    with pytest.raises(ValueError, match="low and high are for time_outside"):
        Metric(name="x", kind="time_outside", of="T_in", low=1.0)


def test_a_model_without_a_kit_gets_one_from_its_declaration():
    """No per-model code: held nominal inputs, state extremes, an example sweep and an excitation."""
    model = dataclasses.replace(TWO_TANK, name="my_tanks", inputs=(
        dataclasses.replace(TWO_TANK.inputs[0], nominal=1e-4, lower=0.0),))
    kit = kit_for(model)
    assert kit.parameters["q_in"].default == 1e-4 and kit.states0 == {"h1": 0.5, "h2": 0.5}
    compiled = kit.compile()
    assert compiled.metric_names == ("h1_min", "h1_max", "h1_final", "h2_min", "h2_max", "h2_final")
    example = example_sweep(kit)
    assert (example.horizon_s, example.step_s) == (1000.0, 1.0)
    assert [(d.name, d.target, d.low, d.high) for d in example.dimensions] == [
        ("a1_tank", "param", 0.7, 1.3), ("a2_tank", "param", 0.7, 1.3), ("a1", "param", 0.7, 1.3),
        ("q_in", "input", 0.7, 1.3)]
    (signal,) = generic_excitation(model).values()
    assert (signal.low, signal.high, signal.hold_s) == pytest.approx((0.5e-4, 1.5e-4, 60.0))
    u = excitation(model, 600, 1.0, seed=2)
    assert u.shape == (600, 1) and 0.5e-4 <= u.min() < u.max() <= 1.5e-4 and len(np.unique(u)) == 10
    bases = Bases(kit.states0, model.default_params(), kit.default_inputs())
    got = chunk_metrics(compiled, bases, [Dimension(name="q_in", target="input", mode="scale", values=[1.0, 2.0])],
                        np.array([[1.0], [2.0]]), 1.0, 600, 2, "float64")
    assert got["h1_max"][1] > got["h1_max"][0] >= 0.5 and not got["diverged"].any()


def test_a_derived_example_scales_each_value_within_its_range():
    """`raytwin sweep example` of a model without a kit scaled every value by 0.7..1.3, and its own check refused
    an input whose plausible range is narrower (a temperature of 283.15 K in [230, 330] K: 0.7 is 198 K)."""
    narrow = dataclasses.replace(TWO_TANK.inputs[0], nominal=1e-4, lower=0.9e-4, upper=1.2e-4)
    kit = kit_for(dataclasses.replace(TWO_TANK, name="my_narrow_tanks", inputs=(narrow,)))
    (q_in,) = [d for d in example_sweep(kit).dimensions if d.target == "input"]
    assert (q_in.low, q_in.high) == (0.9, 1.2)
    assert narrow.lower <= q_in.low * narrow.nominal and q_in.high * narrow.nominal <= narrow.upper
    pinned = dataclasses.replace(narrow, lower=1e-4, upper=1e-4 * (1 + 1e-6))  # no room to scale: not swept
    kit = kit_for(dataclasses.replace(TWO_TANK, name="my_pinned_tanks", inputs=(pinned,)))
    assert [d.target for d in example_sweep(kit).dimensions] == ["param", "param", "param"]


def test_unstable_parameters_are_flagged_per_scenario_never_reported_as_results():
    """Admissible thermal parameters (C_in 1e5, R_im 2e-4) diverge at the default 60 s step (to
    ~1e266 K unchecked): that scenario is flagged and gets NaN metrics; its neighbour is unaffected."""
    kit = THERMAL.compile()
    assert THERMAL_RC.params[0].lower <= 1e5 and THERMAL_RC.params[2].lower <= 2e-4  # admissible values
    bases = Bases(kit.start_state, THERMAL_RC.default_params(), kit.default_inputs())
    dims = [Dimension(name="C_in", target="param", values=[1e5, 2e6]),
            Dimension(name="R_im", target="param", values=[2e-4, 2e-3])]
    rows = np.array([[1e5, 2e-4], [2e6, 2e-3]])
    for dtype in ("float32", "float64"):
        got = chunk_metrics(kit, bases, dims, rows, 60.0, 1440, 2, dtype)
        assert got["diverged"].tolist() == [True, False]
        assert all(math.isnan(got[m][0]) and math.isfinite(got[m][1]) for m in kit.metric_names)
    stable = chunk_metrics(kit, bases, dims, rows, 10.0, 8640, 2, "float64")  # a smaller step is stable
    assert not stable["diverged"].any()


def test_a_sweep_spec_declares_its_own_signals_and_metrics_as_data(tmp_path):
    """A recorded weather series for T_out and a new metric with a new, swept threshold: JSON only."""
    from sweeps.runner import compiled_kit, prepare
    from sweeps.space import ScenarioSpace
    from sweeps.spec import SweepSpec

    weather = tmp_path / "weather.parquet"
    pq.write_table(pa.table({"t_s": [0.0, 43200.0, 86400.0], "T_out": [265.0, 285.0, 270.0]}), weather)
    spec = SweepSpec.model_validate_json(SweepSpec(
        model="thermal_rc", horizon_s=86400.0, step_s=300.0, inputs={"hot": 294.0},
        signals={"T_out": Series(path=str(weather), column="T_out")},
        metrics=[Metric(name="hot_s", kind="time_above", of="T_in", threshold="hot", unit="s"),
                 Metric(name="T_out_mean", kind="mean", of="T_out", unit="K")],
        space=ScenarioSpace(method="grid", dimensions=[Dimension(name="hot", target="input", values=[293.0, 299.0])]),
    ).model_dump_json())
    kit = compiled_kit(spec, "thermal_rc")
    assert kit.metric_names == ("hot_s", "T_out_mean") and compiled_kit(spec, "thermal_rc") is kit  # compiled once
    _, bases = prepare(spec)
    got = chunk_metrics(kit, bases, spec.space.dimensions, spec.space.rows(0, 2), 300.0, 288, 2, "float64")
    t = 300.0 * np.arange(288)
    assert got["T_out_mean"][0] == pytest.approx(np.interp(t, [0, 43200, 86400], [265, 285, 270]).mean(), rel=1e-12)
    assert got["hot_s"][0] > got["hot_s"][1] == 0.0  # the thermostat holds 294.15 K: above 293, never above 299
    with pytest.raises(ValueError, match=r"undeclared parameter\(s\) \['warm'\].*give their values in inputs"):
        SweepSpec(model="thermal_rc", horizon_s=3600.0, step_s=60.0, space=spec.space, inputs={"hot": 1.0},
                  metrics=[Metric(name="w", kind="time_above", of="T_in", threshold="warm")])
    with pytest.raises(ValueError, match=r"signals for unknown input\(s\) \['T_sky'\]"):
        SweepSpec(model="thermal_rc", horizon_s=3600.0, step_s=60.0, space=spec.space, inputs={"hot": 1.0},
                  signals={"T_sky": Constant(value=250.0)})
