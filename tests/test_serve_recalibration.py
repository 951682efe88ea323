"""Drift-triggered recalibration over HTTP: policies (admin only, per tenant, checked against the model,
audited), and a twin whose model has the wrong R_io latching its drift alarm, which starts exactly one
calibration that registers a candidate near the truth with the trigger as evidence."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.fixtures_serve import tenant_keys
from tests.test_serve_api import THERMAL_TYPE, assert_error

KEYS = (("admin", "recalco", "admin", ()), ("writer", "recalco", "writer", ()), ("reader", "recalco", "reader", ()),
        ("other", "recalgx", "admin", ()))
T0 = datetime(2026, 2, 1, tzinfo=UTC)
POLICY = {"free": ["R_io"], "noise_std": {"T_in": 0.05}, "window_s": 86400.0, "max_trials": 1,
          "max_concurrent_jobs": 1, "cooldown_s": 86400.0}  # settle_s: null, the day after the latch is fitted


@pytest.fixture(scope="module")
def api(serve_default):
    """The API on the shared Serve proxy (shared with tests/test_serve_lifecycle.py, whose tenants are others)."""
    serve_proxy, root = serve_default
    keys = tenant_keys(root, KEYS)
    with httpx.Client(base_url=serve_proxy, timeout=120.0) as http:
        http.headers_for = lambda name: {"Authorization": f"Bearer {keys[name]}"}  # type: ignore[attr-defined]
        r = http.post("/v1/asset-types", json=THERMAL_TYPE, headers=http.headers_for("admin"))
        assert r.status_code == 201, r.text
        yield http, root / "store"


def _put(http, who: str, body: dict, type_name: str = "thermal_rc") -> httpx.Response:
    return http.put(f"/v1/recalibration-policies/{type_name}", json=body, headers=http.headers_for(who))


def test_policies_need_an_admin_stay_in_their_tenant_and_refuse_nonsense(api):
    http, _ = api
    url = "/v1/recalibration-policies/thermal_rc"
    none_set = assert_error(http.get(url, headers=http.headers_for("reader")), 404, "not_found")
    assert none_set["message"].endswith("PUT one (admin)")
    unpublished = assert_error(http.get("/v1/recalibration-policies/no_such_type", headers=http.headers_for("reader")),
                               404, "not_found")  # a PUT would be 404 too (below): publish the type first
    assert "PUT one" not in unpublished["message"]
    assert "publish the type (POST /v1/asset-types)" in unpublished["message"]
    assert_error(_put(http, "writer", POLICY), 403, "forbidden")
    details = assert_error(_put(http, "admin", {**POLICY, "cooldown_s": -1}), 422, "invalid_request")
    assert "cooldown_s" in str(details)
    assert "R_xx" in assert_error(_put(http, "admin", {**POLICY, "free": ["R_xx"]}), 422,
                                  "invalid_request")["message"]
    assert_error(_put(http, "admin", POLICY, "no_such_type"), 404, "not_found")
    r = _put(http, "admin", POLICY)
    assert r.status_code == 200, r.text
    stored = http.get(url, headers=http.headers_for("reader")).json()
    assert stored["free"] == ["R_io"] and stored["cooldown_s"] == 86400.0
    # another tenant neither sees nor sets it (its PUT names a type it does not have)
    assert_error(http.get(url, headers=http.headers_for("other")), 404, "not_found")
    assert_error(_put(http, "other", {**POLICY, "enabled": False}), 404, "not_found")
    assert http.get(url, headers=http.headers_for("reader")).json() == stored
    audit = http.get("/v1/audit", headers=http.headers_for("admin")).json()
    assert [(a["target"], a["phase"]) for a in audit if a["action"] == "recalibration_policy.update"] == [
        ("thermal_rc", "intent"), ("thermal_rc", "outcome")]


def test_a_drift_latch_starts_one_calibration_whose_candidate_is_near_the_truth(api):
    from benchmarks.drift import CASES, streams
    from raytwin.registry import ModelRegistry
    from raytwin.sim import THERMAL_RC

    http, store = api
    assert _put(http, "admin", POLICY).status_code == 200
    r = http.post("/v1/assets", headers=http.headers_for("admin"), json={
        "id": "zone-1", "type_name": "thermal_rc", "type_version": THERMAL_TYPE["version"],
        "initial_state": {"T_in": 293.15, "T_m": 292.15}})
    assert r.status_code == 201, r.text
    # the building's R_io is half the registered model's from the start: a day of 5-minute telemetry
    case = dataclasses.replace(CASES[0], days=2.0, fault_at_s=0.0)
    t, rows, flt = streams(case, 1, noise=False, fault=("R_io", 0.5), seed=2)
    units = {name: q["unit"] for name, q in {**THERMAL_TYPE["inputs"], **THERMAL_TYPE["outputs"]}.items()}
    events = [{"sequence": k, "event_time": (T0 + timedelta(seconds=float(s))).isoformat(),
               "measurements": {n: {"value": float(v), "unit": units[n]} for n, v in zip(flt.measured_names, row)}}
              for k, (s, row) in enumerate(zip(t, rows[0]))]
    batches = [events[k:k + 48] for k in range(0, len(events), 48)]
    latched_at = None
    for k, batch in enumerate(batches):  # until a day after the latch (it stays latched: no new trigger)
        r = http.post("/v1/assets/zone-1/telemetry", headers=http.headers_for("writer"), json={"events": batch})
        assert r.status_code == 200 and r.json()["accepted"] == len(batch), r.text
        if latched_at is None and http.get("/v1/assets/zone-1/divergence",
                                           headers=http.headers_for("reader")).json()["drift"]:
            latched_at = k
            pending = http.get("/v1/recalibrations", headers=http.headers_for("reader")).json()
            assert not pending["running"] and pending["pending"], pending  # waits for the day after the latch
        if latched_at is not None and k >= latched_at + 6:  # 6 batches of 4 h
            break
    assert latched_at is not None and k == latched_at + 6

    deadline = time.monotonic() + 900  # a wait for the job, not a timing assertion
    while not (state := http.get("/v1/recalibrations", headers=http.headers_for("reader")).json())["finished"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    assert not state["running"] and not state["pending"]
    (job,) = state["finished"]
    assert job["state"] == "succeeded", job["error"]
    assert (job["asset_id"], job["candidate"]) == ("zone-1", "thermal_rc@1.0.1")

    truth = 0.5 * THERMAL_RC.param_vector()[THERMAL_RC.param_names.index("R_io")]
    candidate = ModelRegistry(str(store / "registry" / "recalco")).get("thermal_rc@1.0.1")
    assert candidate.parameters["R_io"] == pytest.approx(truth, rel=0.03)
    (setter,) = {a["key_id"] for a in http.get("/v1/audit", headers=http.headers_for("admin")).json()
                 if a["action"] == "recalibration_policy.update"}
    assert http.headers_for("admin")["Authorization"].startswith(f"Bearer rtk_{setter}_")
    assert candidate.metadata["policy_set_by"] == "admin"  # who chose what to fit (its key's owner) may not approve it

    lifecycle = http.get("/v1/models/thermal_rc/lifecycle", headers=http.headers_for("reader")).json()
    assert [(v["version"], v["stage"], v["author"]) for v in lifecycle["versions"]] == [
        ("1.0.0", "candidate", None), ("1.0.1", "candidate", "recalibration")]
    (record,) = http.get("/v1/models/thermal_rc/lifecycle/log", headers=http.headers_for("reader")).json()
    evidence = record["evidence"]
    assert evidence["run_ids"] == [job["run_id"]] and evidence["fit_report"] is None  # no store location
    run = http.get(f"/v1/runs/{job['run_id']}", headers=http.headers_for("reader")).json()
    assert run["kind"] == "calibration" and run["asset_id"] == "zone-1" and "calibration.json" in run["outputs"]
    fit = http.get(f"/v1/runs/{job['run_id']}/files/calibration.json", headers=http.headers_for("reader")).json()
    assert fit["tune_trials"] == POLICY["max_trials"]  # the policy's compute budget, visible in the evidence
    (trigger,) = evidence["triggers"]
    assert trigger["asset_id"] == "zone-1" and trigger["drift_score"] >= 1.0
    assert T0 < datetime.fromisoformat(trigger["event_time"]) <= T0 + timedelta(days=1)
    assert job["window_end"] == (datetime.fromisoformat(trigger["event_time"]) + timedelta(days=1)).isoformat() \
        .replace("+00:00", "Z")
    assert http.get("/v1/models/thermal_rc/lifecycle/verify", headers=http.headers_for("reader")).json()["ok"]
    audit = [(a["action"], a["key_id"], a["target"], a.get("phase")) for a in http.get(
        "/v1/audit", headers=http.headers_for("admin")).json() if a["key_id"] == "system"]  # as requests are
    assert audit == [("recalibration.start", "system", "thermal_rc@1.0.0", "intent"),
                     ("recalibration.start", "system", "thermal_rc@1.0.0", "outcome"),
                     ("model.submit", "system", "thermal_rc@1.0.1", None)]
    (submit,) = [a for a in http.get("/v1/audit", headers=http.headers_for("admin")).json()
                 if a["action"] == "model.submit"]  # the lifecycle record it audits, as every transition's
    assert (submit["details"]["seq"], submit["details"]["hash"]) == (record["seq"], record["hash"])
    # the other tenant sees none of it
    assert http.get("/v1/recalibrations", headers=http.headers_for("other")).json()["finished"] == []
