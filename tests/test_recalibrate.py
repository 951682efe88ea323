"""`sweeps.recalibration.recalibrate` on a local Ray: what a drift-triggered fit hands its approvers."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow.parquet as pq

from raytwin.contracts import AssetType
from raytwin.lifecycle import ModelLifecycle
from raytwin.recalibration import DriftTrigger, RecalibrationPolicy
from raytwin.registry import POLICY_SET_BY, ModelRegistry
from raytwin.sim import TWO_TANK
from sweeps.calibration import MISFIT_RMSE
from sweeps.recalibration import WARNINGS, RecalibrationWork, recalibrate
from sweeps.synthetic import synthetic_telemetry
from tests.test_calibration import CASES


def test_a_candidate_whose_fit_does_not_match_the_data_is_submitted_saying_so(ray_session, tmp_path):
    """A recalibration whose fit had weighted RMSE far above 1 submitted its candidate as if it fitted: the
    misfit warning stayed in the run record, which an approver reading the transition never opened."""
    case = CASES["two_tank"]
    true = case["true"]
    pq.write_table(synthetic_telemetry("two_tank", true, case["x0"], 900, 1.0, case["noise"], 1), tmp_path / "w.parquet")
    registry = ModelRegistry(str(tmp_path / "registry"))
    wrong = {**true, "a2": 0.9 * true["a2"]}  # a fixed parameter 10 % off: a1 cannot make up for it
    registry.register("tank", "1.0.0", AssetType.from_model(TWO_TANK, name="tank"), wrong)
    trigger = DriftTrigger(seq=1, asset_id="tank-1", type_name="tank", type_version="1.0.0",
                           event_time=datetime(2026, 1, 1, tzinfo=UTC), drift_score=3.0, nis_mean=9.0, nis_last=9.0)
    work = RecalibrationWork(
        job_key="job-1", tenant="acme", asset_id="tank-1", model_ref="tank@1.0.0", candidate_version="1.0.1",
        telemetry=str(tmp_path / "w.parquet"), start_state=case["x0"],
        policy=RecalibrationPolicy(free=["a1"], max_trials=1, noise_std=case["noise"]),
        triggers=[trigger], registry_url=str(tmp_path / "registry"), runs_url=str(tmp_path / "runs"),
        policy_set_by="key-ops")

    done = recalibrate(work)
    (warning,) = done.warnings
    assert warning.startswith("the fit does not match the data: weighted RMSE")
    assert float(registry.get("tank@1.0.1").metadata["weighted_rmse"]) > MISFIT_RMSE
    assert registry.get("tank@1.0.1").metadata[WARNINGS] == warning
    assert registry.get("tank@1.0.1").metadata[POLICY_SET_BY] == "key-ops"  # four eyes: it may not approve it
    (submitted,) = [r for r in ModelLifecycle(registry).records("tank") if r.version == "1.0.1"]
    assert submitted.to_stage == "candidate" and submitted.reason.endswith(f"; WARNING: {warning}")
    assert (done.seq, done.hash) == (submitted.seq, submitted.hash)  # what the submission's audit record carries

    again = recalibrate(work)  # a relaunch that finds the candidate registered keeps the warning
    assert again.resumed and again.warnings == [warning]
    assert (again.seq, again.hash) == (submitted.seq, submitted.hash)  # the record the crashed attempt wrote


def test_a_candidate_fitted_under_a_policy_stored_without_its_setter_is_approved_by_no_key(tmp_path):
    """A policy stored before `set_by` was kept names no setter, so its candidate named none and four eyes could
    not exclude the key that set it: that key alone could promote the fit of its own policy. No approver may
    promote such a candidate now (any may be the setter); under automatic promotion it goes as any writer's."""
    from types import SimpleNamespace
    from unittest import mock

    import pytest

    import sweeps.recalibration
    from raytwin.lifecycle import Actor, ApprovalRequired, LifecyclePolicy
    from raytwin.recalibration import PolicyStore

    policy = RecalibrationPolicy(free=["a1"], max_trials=1)
    (tmp_path / "policies" / "acme").mkdir(parents=True)
    (tmp_path / "policies" / "acme" / "tank.json").write_text(policy.model_dump_json())  # the old format
    stored = PolicyStore(str(tmp_path / "policies")).get_stored("acme", "tank")
    assert stored is not None and stored.set_by is None
    registry = ModelRegistry(str(tmp_path / "registry"))
    registry.register("tank", "1.0.0", AssetType.from_model(TWO_TANK, name="tank"), CASES["two_tank"]["true"])
    trigger = DriftTrigger(seq=1, asset_id="tank-1", type_name="tank", type_version="1.0.0",
                           event_time=datetime(2026, 1, 1, tzinfo=UTC), drift_score=3.0, nis_mean=9.0, nis_last=9.0)
    work = RecalibrationWork(
        job_key="job-legacy", tenant="acme", asset_id="tank-1", model_ref="tank@1.0.0", candidate_version="1.0.1",
        telemetry=str(tmp_path / "w.parquet"), start_state=CASES["two_tank"]["x0"], policy=stored.policy,
        triggers=[trigger], registry_url=str(tmp_path / "registry"), runs_url=str(tmp_path / "runs"),
        policy_set_by=stored.set_by)
    fit = SimpleNamespace(run_id="calibration-20260101T000000Z-0a1b2c3d",  # the fit itself is not under test
                          summary={"parameters": CASES["two_tank"]["true"], "weighted_rmse": 1.0})
    with mock.patch.object(sweeps.recalibration, "recorded_calibration", lambda *a, **k: fit):
        recalibrate(work)
    assert POLICY_SET_BY not in registry.get("tank@1.0.1").metadata
    lifecycle = ModelLifecycle(registry)
    lifecycle.transition("tank@1.0.1", "staging", Actor(id="key-ops", tenant="acme"), "fit checked")
    for key in ("key-ops", "key-other"):
        with pytest.raises(ApprovalRequired, match=(
                rf"^tank@1.0.1 was fitted by a drift recalibration under a policy stored before its setter was kept: "
                rf"{key} may have set it, and no approver can be told apart from that key \(four eyes\). PUT the "
                r"recalibration policy of tank again")):
            lifecycle.transition("tank@1.0.1", "production", Actor(id=key, tenant="acme", roles={"approver"}), "ok")
    lifecycle.set_policy("acme", LifecyclePolicy(auto_promote=True))
    promoted = lifecycle.transition("tank@1.0.1", "production", Actor(id="key-ops", tenant="acme"), "policy allows")
    assert promoted.automatic
