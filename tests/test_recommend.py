"""Recommendations (sweeps/recommend.py), checked by an independent forward simulation.

The reference below integrates the 2R2C equations written out here (not the model's code) with
scipy's `solve_ivp` at a tight tolerance, driven by the reference kit's weather written out here too,
with the heating either the proposed schedule (zero-order hold per block) or the baseline thermostat
(proportional, saturated), and measures energy and time outside the comfort band on a 60 s grid.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import solve_ivp
from typer.testing import CliRunner

from sweeps.recommend import (
    Bound,
    Control,
    Ensemble,
    RecommendError,
    RecommendSpec,
    load_recommendation,
    recommend,
    recorded_recommendation,
)
from sweeps.recommend_cli import recommend_app
from sweeps.runs import rerun

DAY = 86400.0
C_IN, C_M, R_IM, R_MO, R_IO, F_SOL = 2.0e6, 2.0e7, 2.0e-3, 5.0e-3, 1.0e-2, 0.3
LOW, HIGH = 292.15, 297.15  # comfort band, K
SETPOINT, GAIN, Q_MAX = 296.15, 5000.0, 10000.0  # baseline thermostat: constant 23 degC setpoint
START = {"T_in": 294.15, "T_m": 293.15}


def weather(t: float) -> tuple[float, float]:
    """Outdoor temperature (daily sinusoid around 5 degC, peak at 15:00) and sun (half-sine, noon peak)."""
    return (278.15 + 5.0 * math.sin(2 * math.pi * (t - 9 * 3600) / DAY),
            max(0.0, 2000.0 * math.sin(2 * math.pi * (t - 6 * 3600) / DAY)))


def reference(heating, horizon_s: float) -> dict[str, float]:
    """Energy [kWh] and time outside the band [s] of `heating(t, T_in)` in an independent integration."""
    def rhs(t, x):
        t_in, t_m = x
        t_out, sun = weather(t)
        q = heating(t, t_in)
        return [((t_m - t_in) / R_IM + (t_out - t_in) / R_IO + q + F_SOL * sun) / C_IN,
                ((t_in - t_m) / R_IM + (t_out - t_m) / R_MO) / C_M]

    grid = np.arange(0.0, horizon_s + 1.0, 60.0)
    sol = solve_ivp(rhs, (0.0, horizon_s), [START["T_in"], START["T_m"]], t_eval=grid, rtol=1e-8, atol=1e-8,
                    max_step=300.0)
    t_in = sol.y[0]
    power = np.array([heating(t, x) for t, x in zip(grid, t_in)])
    energy = float(np.sum(power[:-1]) * 60.0 / 3.6e6)
    outside = float(np.sum((t_in[1:] < LOW) | (t_in[1:] > HIGH)) * 60.0)
    return {"energy_kwh": energy, "outside_s": outside, "T_in_min": float(t_in.min()), "T_in_max": float(t_in.max())}


def thermostat(t: float, t_in: float) -> float:
    return min(max(GAIN * (SETPOINT - t_in), 0.0), Q_MAX)


def planned(answer):
    starts, values, period = np.asarray(answer.action.starts_s), np.asarray(answer.action.values), answer.action.period_s
    return lambda t, t_in: float(values[np.searchsorted(starts, t % period, side="right") - 1])


def spec(**changes) -> RecommendSpec:
    fields = dict(model="thermal_rc", tenant="acme", asset_id="zone-1", start_state=START,
                  inputs={"setpoint": SETPOINT}, horizon_s=7 * DAY, step_s=600.0,
                  control=Control(input="Q_h", block_s=3600.0, lower=0.0, upper=Q_MAX), objective="energy_kwh",
                  constraints=[Bound(of="T_in", low=LOW, high=HIGH, margin=0.2)],
                  iterations=250, ensemble=Ensemble(rel_std={"R_io": 0.05, "C_in": 0.1}, size=8, seed=3))
    return RecommendSpec(**(fields | changes))


@pytest.fixture(scope="module")
def week(tmp_path_factory):
    runs = str(tmp_path_factory.mktemp("runs"))
    record, answer = recorded_recommendation(spec(), runs=runs)
    return runs, record, answer


def test_a_weeks_gradient_recommendation_saves_ten_percent_with_no_more_discomfort(week):
    _, _, answer = week
    base, plan = reference(thermostat, 7 * DAY), reference(planned(answer), 7 * DAY)
    assert plan["energy_kwh"] <= 0.9 * base["energy_kwh"], (plan, base)
    assert plan["outside_s"] <= base["outside_s"] == 0.0, (plan, base)
    assert LOW <= plan["T_in_min"] and plan["T_in_max"] <= HIGH
    assert all(0.0 <= v <= Q_MAX for v in answer.action.values) and len(answer.action.values) == 168
    # the answer's own figures agree with the reference (coarse 600 s steps against solve_ivp)
    assert answer.change_pct == pytest.approx(100 * (plan["energy_kwh"] / base["energy_kwh"] - 1), abs=1.5)
    assert answer.change_band.q05 <= answer.change_band.q50 <= answer.change_band.q95 < 0.0
    assert answer.uncertainty.startswith("declared")


def test_a_recommendation_is_a_recorded_run_that_reruns_bit_for_bit(week):
    runs, record, answer = week
    assert record.kind == "recommendation" and answer.run_id == record.run_id
    assert record.summary["platforms"] == ["cpu"]  # where the gradient search ran: a rerun elsewhere says so
    assert load_recommendation(record.run_id, runs=runs) == answer
    report = rerun(record.run_id, runs=runs)
    assert report.identical and report.caveats == [], report.differing
    shown = CliRunner().invoke(recommend_app, ["show", record.run_id, "--runs", runs])
    assert shown.exit_code == 0 and f"{answer.change_pct:+.1f} %" in shown.output, shown.output
    assert CliRunner().invoke(recommend_app, ["show", "sweep-nope", "--runs", runs]).exit_code == 2


@pytest.mark.usefixtures("ray_session")
def test_the_sampled_search_runs_a_sweep_and_keeps_the_band(tmp_path):
    two_days = spec(horizon_s=2 * DAY, method="sampled", samples=512, seed=1,
                    control=Control(input="Q_h", block_s=6 * 3600.0, period_s=DAY, lower=0.0, upper=6000.0))
    answer, search = recommend(two_days, str(tmp_path / "out"))
    assert answer.search["samples"] == 512 and answer.search["within_bounds"] >= 1
    assert search.platforms == ["cpu"]  # the driver's and the sweep's chunks'
    assert all(0.0 <= v <= 6000.0 for v in answer.action.values) and len(answer.action.values) == 4
    plan = reference(planned(answer), 2 * DAY)
    assert plan["outside_s"] == 0.0 and LOW <= plan["T_in_min"] and plan["T_in_max"] <= HIGH, plan
    assert (tmp_path / "out" / "search" / "part-000000.parquet").exists()


def test_bad_requests_say_what_to_change():
    with pytest.raises(RecommendError, match="objective 'heat' is not a metric"):
        recommend(spec(objective="heat", iterations=1))
    with pytest.raises(ValueError, match="lower .* must be below upper"):
        Control(input="Q_h", lower=5.0, upper=1.0)
    with pytest.raises(ValueError, match="either calibration_run .* or rel_std"):
        Ensemble()


def test_the_band_draws_from_the_calibrations_covariance(tmp_path):
    """The ensemble's log-factors have the calibration's relative stds and correlation (4,096 members)."""
    from sweeps.calibration import CalibrationResult
    from sweeps.recommend import _ensemble_scales

    rel, corr = [0.1, 0.05], [[1.0, -0.8], [-0.8, 1.0]]
    result = CalibrationResult(model_ref="thermal_rc", free=["R_io", "C_in"], parameters={"R_io": 0.01, "C_in": 2e6},
                               std={"R_io": 1e-3, "C_in": 1e5}, rel_std={"R_io": rel[0], "C_in": rel[1]},
                               correlation=corr, weighted_rmse=1.0, rmse={"T_in": 0.05}, n_samples=100,
                               tune_best={}, tune_best_loss=1.0, tune_trials=1, tune_trials_stopped=0, refined=True)
    (tmp_path / "calibration-1" / "output").mkdir(parents=True)
    (tmp_path / "calibration-1" / "output" / "calibration.json").write_text(result.model_dump_json())
    ensemble = Ensemble(calibration_run="calibration-1", size=4096, seed=0)
    names, factors, source = _ensemble_scales(spec(ensemble=ensemble), {"R_io": 0.01, "C_in": 2e6, "C_m": 2e7},
                                              str(tmp_path), None)
    assert names == ["R_io", "C_in"] and np.all(factors[0] == 1.0) and "calibration-1" in source
    logs = np.log(factors[1:])
    assert np.allclose(logs.std(axis=0), rel, rtol=0.05) and abs(np.corrcoef(logs.T)[0, 1] + 0.8) < 0.03
    with pytest.raises(RecommendError, match="no calibration result for run 'calibration-2'"):
        _ensemble_scales(spec(ensemble=Ensemble(calibration_run="calibration-2")), {}, str(tmp_path), None)


def test_an_ensemble_member_whose_thermostat_rings_at_the_step_is_refused_before_the_search(tmp_path):
    """Only the nominal model's step was checked: at 720 s (its loop's limit 804 s) an ensemble with C_in
    +-50 % had members whose thermostat rang, and their baselines went into the change band unchecked."""
    from raytwin.sim.checks import UnstableStepError

    wide = spec(step_s=720.0, ensemble=Ensemble(rel_std={"C_in": 0.5}, size=8, seed=3))
    with pytest.raises(UnstableStepError, match=r"step 720 s makes the sampled feedback loop unstable: Q_h = "
                                                r"heater_gain \(setpoint - T_in\).* at C_in="):
        recommend(wide, runs=str(tmp_path))


def tanks(**changes) -> RecommendSpec:
    """Half an hour of the two tanks from h2 = 0.4 m; the baseline pumps a constant 1.2e-4 m^3/s."""
    fields = dict(model="two_tank", tenant="acme", asset_id="tank-1", start_state={"h1": 0.5, "h2": 0.4},
                  horizon_s=1800.0, step_s=2.0, objective="pumped_m3", iterations=60, learning_rate=0.05,
                  control=Control(input="q_in", block_s=300.0, lower=0.0, upper=2.0e-4),
                  inputs={"q_in_mean": 1.2e-4, "q_in_swing": 0.0},
                  constraints=[Bound(of="h2", low=5.0, high=6.0, margin=0.01)],
                  ensemble=Ensemble(rel_std={"a1": 0.05}, size=4))
    return RecommendSpec(**(fields | changes))


def test_a_band_no_schedule_reaches_is_refused_saying_by_how_much_and_what_to_change():
    """h2 in [5, 6] m is out of reach of the pump's box: the answer was 201 'feasible' (feasible_fraction 1.0,
    feasibility being "no worse than the baseline", itself always outside), a plan outside the band the whole
    horizon that pumped 67 % more than the baseline and overflowed the tanks."""
    from sweeps.recommend import InfeasibleRecommendation

    with pytest.raises(InfeasibleRecommendation) as refused:
        recommend(tanks())
    message = str(refused.value)
    assert message.startswith("the constraints cannot be met: the best schedule found (gradient) h2 leaves its band "
                              "[5, 6] m for 1800 of 1800 s and misses it by "), message
    assert "widen the band, the control's box (q_in in [0, 0.0002]) or the horizon (1800 s)" in message
    assert "set best_effort to true to accept this schedule" in message  # it gets closer than the baseline
    [violation] = refused.value.details
    assert (violation["of"], violation["unit"], violation["outside_s"], violation["baseline_outside_s"]) == (
        "h2", "m", 1800.0, 1800.0)
    assert 0.0 < violation["miss"] < 0.99 * violation["baseline_miss"] <= 5.0 - 0.4

    answer, _ = recommend(tanks(best_effort=True))  # asked for: answered, labelled as what it is
    assert answer.status == "best_effort" and answer.feasible_fraction == 0.0 and answer.no_worse_fraction == 1.0
    assert [v.model_dump(mode="json") for v in answer.violations] == [violation]
    assert answer.recommended["outside_h2_s"] == 1800.0
    assert violation["miss"] == pytest.approx(5.0 - answer.recommended["highest_h2"])  # its closest approach
    from sweeps.recommend_cli import _describe

    assert _describe(answer).startswith("BEST EFFORT, the bands are not met (the plan only gets closer to them than "
                                        "the baseline): h2 leaves its band [5, 6] m for 1800 of 1800 s")


def test_a_schedule_no_closer_to_the_band_than_the_baseline_is_refused_even_as_a_best_effort():
    from sweeps.recommend import InfeasibleRecommendation

    starved = Control(input="q_in", block_s=300.0, lower=0.0, upper=1.0e-5)  # the tanks drain: farther from 5 m
    with pytest.raises(InfeasibleRecommendation, match=r"best_effort would not accept this schedule either: it is "
                                                       r"farther from a band than the baseline, or as close at no "
                                                       r"better"):
        recommend(tanks(control=starved, best_effort=True))


def test_a_schedule_worse_than_a_baseline_that_keeps_the_bands_is_refused():
    """One Adam step from the box's middle (1e-4 m^3/s) pumps more than the baseline's 2e-5, which keeps h2 <= 10 m."""
    low_flow = {"q_in_mean": 2.0e-5, "q_in_swing": 0.0}
    with pytest.raises(RecommendError, match=r"the best schedule found is worse than the baseline: pumped_m3 .* "
                                             r"keep the baseline; to search further, give more iterations \(1\)"):
        recommend(tanks(inputs=low_flow, iterations=1, constraints=[Bound(of="h2", high=10.0)]))


def test_keeping_a_band_the_baseline_leaves_may_cost_more_than_the_baseline():
    """At 2e-5 m^3/s the baseline lets h2 sink below 0.45 m; keeping it there takes more water: feasible, +change."""
    keep = tanks(inputs={"q_in_mean": 2.0e-5, "q_in_swing": 0.0}, start_state={"h1": 0.5, "h2": 0.5},
                 constraints=[Bound(of="h2", low=0.45, margin=0.01)], iterations=200)
    answer, _ = recommend(keep)
    assert answer.status == "feasible" and answer.violations == [] and answer.change > 0.0
    assert answer.baseline["outside_h2_s"] > 0.0 == answer.recommended["outside_h2_s"]
    assert answer.recommended["lowest_h2"] >= 0.45 and answer.feasible_fraction > 0.0


def test_a_plan_feasible_on_the_nominal_model_is_held_to_the_share_of_members_asked():
    """A plan that keeps h2 >= 0.45 m on the nominal parameters but in half of an uncertain ensemble was answered
    'feasible' with feasible_fraction 0.5 alone: `min_feasible_fraction` makes the share a requirement."""
    from sweeps.recommend import InfeasibleRecommendation

    keep = tanks(inputs={"q_in_mean": 2.0e-5, "q_in_swing": 0.0}, start_state={"h1": 0.5, "h2": 0.5},
                 constraints=[Bound(of="h2", low=0.45, margin=0.01)], iterations=200,
                 ensemble=Ensemble(rel_std={"a1": 0.1, "a2": 0.1}, size=16, seed=1))
    answer, _ = recommend(keep.model_copy(update={"min_feasible_fraction": 0.5}))
    assert answer.status == "feasible" and answer.feasible_fraction == 0.5
    with pytest.raises(InfeasibleRecommendation, match=r"keeps every band on the model's parameters but in only 8 of "
                                                       r"the ensemble's 16 members \(50%\), below min_feasible_fraction "
                                                       r"0.9 \(h2 leaves its band in 8 of 16\): give the bands a margin") as refused:
        recommend(keep.model_copy(update={"min_feasible_fraction": 0.9}))
    assert refused.value.details == [{"of": "h2", "members_outside": 8, "members": 16}]


def test_one_bound_per_state():
    with pytest.raises(ValueError, match=r"one bound per state \(give low and high in it\)"):
        tanks(constraints=[Bound(of="h2", low=0.1), Bound(of="h2", high=0.9)])


@pytest.mark.usefixtures("ray_session")
def test_the_sampled_search_refuses_an_unreachable_band_or_answers_its_closest_sample_as_a_best_effort(tmp_path):
    sampled = dict(method="sampled", samples=64, seed=2,
                   control=Control(input="q_in", block_s=900.0, lower=0.0, upper=2.0e-4))
    with pytest.raises(RecommendError, match="none of the 64 sampled schedules keeps the states within the bounds"
                                             ".*or best_effort=true for the schedule closest to them"):
        recommend(tanks(**sampled), str(tmp_path / "refused"))
    answer, _ = recommend(tanks(**sampled, best_effort=True), str(tmp_path / "best"))
    assert answer.status == "best_effort" and answer.search["within_bounds"] == 0
    assert answer.violations[0].miss < answer.violations[0].baseline_miss
