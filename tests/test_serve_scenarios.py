"""Scenario bounds and finite results without Ray or HTTP: `Scenario.check_against` and `scenarios.run`."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from pydantic import ValidationError

from raytwin.contracts import AssetType, ContractError, Scenario
from raytwin.models import Model, Output, Param, State, UnstableStepError
from raytwin.sim import THERMAL_RC
from serve_apps.errors import Diverged
from serve_apps.scenarios import PreparedScenario, run

THERMAL = AssetType.from_model(THERMAL_RC)  # T_out in [173.15, 373.15] K, Q_h in [-1e8, 1e8] W, Q_sol in [0, 1e8] W


def scenario(t_out: dict, start_state: dict | str = "live", q_h: dict | None = None) -> Scenario:
    """24 hourly steps."""
    return Scenario.model_validate({
        "asset_id": "zone-1", "start_state": start_state, "horizon_s": 24 * 3600.0, "step_s": 3600.0,
        "inputs": {"T_out": t_out, "Q_h": q_h or {"kind": "constant", "value": 0.0, "unit": "W"},
                   "Q_sol": {"kind": "constant", "value": 0.0, "unit": "W"}}})


def test_inputs_are_checked_over_the_horizon_in_the_types_units():
    # 99 degC is 372.15 K (inside), 101 degC is 374.15 K (outside [173.15, 373.15] K)
    scenario({"kind": "constant", "value": 99.0, "unit": "degC"}).check_against(THERMAL)
    with pytest.raises(ContractError, match=r"input T_out spans \[374.15, 374.15\] K .*outside the plausible range"):
        scenario({"kind": "constant", "value": 101.0, "unit": "degC"}).check_against(THERMAL)
    # a sinusoid only leaves the range at its peak (hour 6 of 24): evaluated, not just its mean
    swing = {"kind": "sinusoid", "mean": 280.0, "amplitude": 100.0, "period_s": 86400.0, "unit": "K"}
    with pytest.raises(ContractError, match=r"T_out spans \[180, 380\] K"):
        scenario(swing).check_against(THERMAL)
    overflow = {"kind": "constant", "value": 1.7e308, "unit": "MW"}  # finite, but not in W
    with pytest.raises(ContractError, match=r"input Q_h spans \[inf, inf\] W"):
        scenario({"kind": "constant", "value": 280.0, "unit": "K"}, q_h=overflow).check_against(THERMAL)
    series = {"kind": "series", "values": [280.0] * 23 + [1e4], "unit": "K"}
    with pytest.raises(ContractError, match="T_out spans"):
        scenario(series).input_series(THERMAL)


def test_explicit_start_states_are_checked_and_live_ones_are_not():
    ok = {"kind": "constant", "value": 280.0, "unit": "K"}
    scenario(ok).check_against(THERMAL)
    with pytest.raises(ContractError, match=r"start_state.T_m=-1.7e\+308 K outside the plausible range \[173.15, "):
        scenario(ok, start_state={"T_in": 293.0, "T_m": -1.7e308}).check_against(THERMAL)


def test_start_time_takes_rfc3339_or_a_datetime_never_unix_seconds():
    base = scenario({"kind": "constant", "value": 280.0, "unit": "K"}).model_dump()
    assert Scenario.model_validate({**base, "start_time": "2026-01-05T13:00:00+01:00"}).start_time == datetime(
        2026, 1, 5, 12, tzinfo=UTC)
    assert Scenario.model_validate({**base, "start_time": datetime(2026, 1, 5, tzinfo=UTC)}).start_time.day == 5
    for bad in (0.5, "0.5", "1767614520", "2026-01-05T12:00:00"):
        with pytest.raises(ValidationError, match="RFC 3339"):
            Scenario.model_validate({**base, "start_time": bad})


BLOW_UP = Model(
    name="blow_up", version="1.0.0", description="dx/dt = x^2: infinite in finite time (t = 1/x0), whatever the step",
    states=(State("x", "-", "", nominal=1.0),), inputs=(), params=(Param("a", "-", 1.0, 0.5, 2.0),),
    outputs=(Output("x", "-"),), coefficients=lambda p: p, derivative=lambda x, u, c: (c[0] * x[0] * x[0],),
    output=lambda x, u, c: (x[0],), default_dt=0.01)


def test_a_diverging_run_raises_instead_of_returning_nan():
    def prepared(simulator: str, x0: list[float], inputs: np.ndarray, step_s: float, params: list[float]):
        return PreparedScenario(simulator=simulator, model_ref=f"{simulator}@1", content_hash="0" * 64, step_s=step_s,
                                x0=np.array(x0), inputs=inputs, params=np.asarray(params, np.float64), overrides={})

    thermal = ("thermal_rc", [294.0, 291.0], np.tile([278.15, 0.0, 0.0], (200, 1)))
    assert np.isfinite(run(prepared(*thermal, 60.0, THERMAL_RC.param_vector())).states).all()
    with pytest.raises(UnstableStepError, match="step 100000 s is beyond the RK4 stability limit 8656 s"):
        run(prepared(*thermal, 1e5, THERMAL_RC.param_vector()))  # refused before it can diverge
    with pytest.raises(Diverged, match=r"state x.* not finite at step \d+") as info:
        run(prepared("tests.test_serve_scenarios:BLOW_UP", [1.0], np.zeros((200, 0)), 0.01, [1.0]))
    assert 90 < info.value.details[0]["step"] <= 200 and info.value.details[0]["states"] == ["x"]
