"""Scenario bounds and finite results without Ray or HTTP: `Scenario.check_against` and `scenarios.run`."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from pydantic import ValidationError

from raytwin.contracts import AssetType, ContractError, Scenario
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


def test_a_diverging_run_raises_instead_of_returning_nan():
    model = THERMAL_RC
    inputs = np.tile([278.15, 0.0, 0.0], (200, 1))

    def prepared(step_s: float) -> PreparedScenario:
        return PreparedScenario(simulator=model.name, model_ref="thermal_rc@1", content_hash="0" * 64, step_s=step_s,
                                x0=np.array([294.0, 291.0]), inputs=inputs,
                                params=np.asarray(model.param_vector({}), np.float64), overrides={})

    assert np.isfinite(run(prepared(60.0)).states).all()
    with pytest.raises(Diverged, match=r"state T_in.* not finite at step \d+") as info:
        run(prepared(1e5))  # far beyond RK4's stability limit (~8.7e3 s)
    assert 0 < info.value.details[0]["step"] <= 200 and "T_in" in info.value.details[0]["states"]
