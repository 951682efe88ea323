"""The model lifecycle over HTTP (serve_apps/routes_models.py): keys with and without the approver grant,
four eyes, another tenant, compare-and-set, rollback, the log's check and the audit trail."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fixtures_connectors import wait_for
from tests.fixtures_serve import tenant_keys
from tests.test_serve_api import THERMAL_TYPE, assert_error

V1, V2 = THERMAL_TYPE["version"], "9.9.9"
KEYS = (("admin", "acme", "admin", ()), ("author", "acme", "writer", ("approver",)),
        ("approver", "acme", "writer", ("approver",)), ("writer", "acme", "writer", ()),
        ("reader", "acme", "reader", ()), ("other", "globex", "admin", ("approver",)),
        ("chief", "acme", "admin", ("approver",)))


@dataclass
class Api:
    http: httpx.Client
    keys: dict[str, str]
    store: Path

    def headers_for(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}


@pytest.fixture(scope="module")
def client(serve_default):
    """The API on the shared Serve proxy (shared with tests/test_serve_recalibration.py, whose tenants are others),
    one asset type in two versions (both registered as thermal_rc models)."""
    serve_proxy, root = serve_default
    keys = tenant_keys(root, KEYS)
    with httpx.Client(base_url=serve_proxy, timeout=120.0) as http:
        api = Api(http, keys, root / "store")
        for version in (V1, V2):
            r = http.post("/v1/asset-types", json={**THERMAL_TYPE, "version": version},
                          headers=api.headers_for("admin"))
            assert r.status_code == 201, r.text
        yield api


def _recorded_run(runs: Path, model: str = "thermal_rc") -> str:
    """A run record of the tenant's of `model` (a sweep whose simulation is skipped: only the record matters)."""
    from types import SimpleNamespace
    from unittest import mock

    import sweeps.runs
    from sweeps import Dimension, ScenarioSpace, SweepSpec

    param = {"two_tank": "a1", "thermal_rc": "R_io"}[model]
    space = ScenarioSpace(method="random", n=2, dimensions=[Dimension(name=param, target="param", mode="scale",
                                                                      low=0.9, high=1.1)])
    with mock.patch.object(sweeps.runs, "run_sweep", lambda *a, **k: SimpleNamespace(
            outputs={}, n_scenarios=2, n_diverged=0, n_chunks=1, elapsed_s=0.1, scenarios_per_s=20.0, platforms=["cpu"])):
        return sweeps.runs.recorded_sweep(SweepSpec(model=model, space=space, horizon_s=10.0, step_s=1.0),
                                          runs=str(runs)).run_id


def _move(api: Api, who: str, version: str, to: str, model: str = "thermal_rc", **body) -> httpx.Response:
    return api.http.post(f"/v1/models/{model}/versions/{version}/transitions", headers=api.headers_for(who),
                         json={"to": to, "reason": f"{who}: {to}", **body})


def _publish(api: Api, model: str, *versions: str) -> None:
    for version in versions:
        assert api.http.post("/v1/asset-types", json={**THERMAL_TYPE, "name": model, "version": version},
                             headers=api.headers_for("admin")).status_code == 201


def _promote(api: Api, model: str, version: str) -> None:
    """`version` submitted, staged and approved: a test's own model in production, so that the test needs no
    earlier test's promotions (each passes alone)."""
    for who, to in (("author", "candidate"), ("author", "staging"), ("approver", "production")):
        answer = _move(api, who, version, to, model=model)
        assert answer.status_code == 201, answer.text


def test_promotion_needs_a_second_approver_and_rolls_back(client):
    api, http = client, client.http
    status = http.get("/v1/models/thermal_rc/lifecycle", headers=api.headers_for("reader")).json()
    assert [(v["version"], v["stage"], v["submitted"]) for v in status["versions"]] == [
        (V1, "candidate", False), (V2, "candidate", False)]
    evidence = {"run_ids": [_recorded_run(api.store / "runs" / "acme")], "fit_report": "s3://reports/fit-1.json"}
    tanks = _recorded_run(api.store / "runs" / "acme", "two_tank")
    for bad, why in (({"run_ids": ["calibration-20260105T120000Z-1a2b3c4d"]}, "no run 'calibration-2026"),
                     ({"run_ids": [tanks]}, f"run '{tanks}' ran two_tank@1.0.0, not a version of thermal_rc: cite runs"),
                     ({"shadow_metrics": {"nis_ratio": 0.8}}, "evidence.shadow_metrics is recorded by the system"),
                     (evidence, None)):
        answer = _move(api, "author", V1, "candidate", evidence=bad)  # checked before anything is recorded
        if why is not None:
            assert why in assert_error(answer, 422, "invalid_request")["message"]
    assert answer.status_code == 201
    assert _move(api, "author", V1, "staging").status_code == 201
    assert "four eyes" in assert_error(_move(api, "author", V1, "production"), 403, "forbidden")["message"]
    assert "'approver' role" in assert_error(_move(api, "writer", V1, "production"), 403, "forbidden")["message"]
    assert_error(_move(api, "reader", V1, "production"), 403, "forbidden")
    first = _move(api, "approver", V1, "production")
    approver_id = api.keys["approver"].split("_")[1]  # rtk_<key_id>_<secret>: the audit names the key, never the secret
    assert first.status_code == 201 and (first.json()["actor"], first.json()["actor_roles"]) == ("approver",
                                                                                                 ["approver"])

    # another tenant sees no such model, and cannot submit one of ours
    assert_error(http.get("/v1/models/thermal_rc/lifecycle", headers=api.headers_for("other")), 404, "not_found")
    missing = assert_error(_move(api, "other", V2, "candidate"), 404, "not_found")["message"]
    assert missing == f"no model thermal_rc@{V2} in this registry"  # never where the server's registry lies

    assert _move(api, "author", V2, "candidate").status_code == 201
    assert _move(api, "author", V2, "staging").status_code == 201
    revision = http.get("/v1/models/thermal_rc/lifecycle", headers=api.headers_for("reader")).json()["revision"]
    assert "reload and retry" in assert_error(_move(api, "approver", V2, "production",
                                                    expected_revision=revision - 1), 409, "conflict")["message"]
    second = _move(api, "approver", V2, "production", expected_revision=revision)
    assert second.status_code == 201 and second.json()["displaced"] == V1
    err = assert_error(_move(api, "approver", V1, "production"), 409, "conflict")
    assert "archived versions are never promoted again" in err["message"]

    assert_error(http.post("/v1/models/thermal_rc/rollback", json={"reason": "x"},
                           headers=api.headers_for("writer")), 403, "forbidden")
    back = http.post("/v1/models/thermal_rc/rollback", json={"reason": "innovations drifted"},
                     headers=api.headers_for("approver"))
    assert back.status_code == 201 and (back.json()["version"], back.json()["displaced"]) == (V1, V2)

    log = http.get("/v1/models/thermal_rc/lifecycle/log", headers=api.headers_for("reader")).json()
    assert [r["action"] for r in log] == ["submit", "stage", "promote", "submit", "stage", "promote", "rollback"]
    assert log[0]["evidence"] == {**evidence, "shadow_metrics": {}, "triggers": []}  # served with the empty ones
    assert all(r["prev_hash"] == p["hash"] for p, r in zip(log, log[1:]))
    check = http.get("/v1/models/thermal_rc/lifecycle/verify", params={"expected_head": log[-1]["hash"]},
                     headers=api.headers_for("reader")).json()
    assert check == {"ok": True, "records": 7, "head_hash": log[-1]["hash"], "first_bad_record": None,
                     "message": None}
    audit = http.get("/v1/audit", headers=api.headers_for("admin")).json()
    promoted = [a for a in audit if a["action"] == "model.promote" and a["phase"] == "outcome"
                and a["details"]["status"] == "done"]  # refused attempts leave their refused outcomes too
    assert [a["target"] for a in promoted] == [f"thermal_rc@{V1}", f"thermal_rc@{V2}"]
    assert {a["details"]["hash"] for a in promoted} == {first.json()["hash"], second.json()["hash"]}
    assert {a["key_id"] for a in promoted} == {approver_id}


def test_bad_inputs_are_refused_with_reasons(client):
    api, http = client, client.http
    bad_evidence = _move(api, "author", V2, "archived", evidence={"run_ids": ["not a run"]})
    assert "run_ids" in assert_error(bad_evidence, 422, "invalid_request")["message"]
    assert_error(_move(api, "author", "1.0", "staging"), 422, "invalid_request")
    assert_error(http.get("/v1/models/..keys/lifecycle", headers=api.headers_for("reader")), 422,
                 "invalid_request")
    nonsense = http.put("/v1/lifecycle-policy", json={"keep_archived": -3}, headers=api.headers_for("admin"))
    assert "keep_archived" in assert_error(nonsense, 422, "invalid_request")["message"]
    assert_error(http.put("/v1/lifecycle-policy", json={"auto_promote": True}, headers=api.headers_for("writer")),
                 403, "forbidden")
    ok = http.put("/v1/lifecycle-policy", json={"keep_archived": 2}, headers=api.headers_for("admin"))
    assert ok.status_code == 200 and http.get("/v1/lifecycle-policy", headers=api.headers_for("reader")).json() \
        == {"auto_promote": False, "keep_archived": 2, "keep_runs": 20, "shadow_auto_stage_margin": None}
    assert http.get("/v1/lifecycle-policy", headers=api.headers_for("other")).json()["keep_archived"] == 5


def test_new_twins_run_the_production_version_and_prune_keeps_versions_assets_name(client):
    """V1 is production and V2 archived (its own model, so it passes alone): a twin is neither created on V2 nor
    moved to it (no approver let it run); retention keeps a version while an asset names it."""
    api, http = client, client.http
    model = "pruned_rc"
    _publish(api, model, V1, V2)
    _promote(api, model, V1)
    assert [_move(api, "author", V2, to, model=model).status_code for to in ("candidate", "archived")] == [201] * 2
    assert http.put("/v1/lifecycle-policy", json={"keep_archived": 0},
                    headers=api.headers_for("admin")).status_code == 200
    refused = assert_error(http.post("/v1/assets", json={"id": "zone-v2", "type_name": model,
                                                         "type_version": V2}, headers=api.headers_for("admin")),
                           409, "conflict")["message"]
    assert refused == (f"{model}@{V2} is not the production version of model {model} ({V1}), and twins of a "
                       f"model under the lifecycle run its production version: use type_version '{V1}', or promote "
                       f"{V2} first")
    asset = {"type_name": model, "type_version": V1}
    assert http.post("/v1/assets", json={"id": "zone-v1", **asset}, headers=api.headers_for("admin")).status_code == 201
    moved = http.put("/v1/assets/zone-v1", json={**asset, "type_version": V2}, headers=api.headers_for("admin"))
    assert "is not the production version" in assert_error(moved, 409, "conflict")["message"]
    assert http.get("/v1/assets/zone-v1", headers=api.headers_for("reader")).json()["type_version"] == V1
    assert http.put("/v1/assets/zone-v1", json={**asset, "metadata": {"site": "north"}},  # same version: fine
                    headers=api.headers_for("admin")).status_code == 200
    assert_error(http.post(f"/v1/models/{model}/prune", headers=api.headers_for("writer")), 403, "forbidden")
    assert http.delete("/v1/assets/zone-v1", headers=api.headers_for("admin")).status_code == 204
    removed = http.post(f"/v1/models/{model}/prune", headers=api.headers_for("admin")).json()
    assert removed["versions_removed"] == [V2]
    (record,) = removed["records"]  # each removal's log record, and its audit record tied to it by hash
    log = http.get(f"/v1/models/{model}/lifecycle/log", headers=api.headers_for("reader")).json()
    assert record == log[-1] and (record["action"], record["version"]) == ("prune", V2)
    (audited,) = [a for a in http.get("/v1/audit", headers=api.headers_for("admin")).json()
                  if a["action"] == "model.prune" and a["phase"] == "outcome" and a["target"] == model]
    assert audited["details"]["removed"] == [{"version": V2, "seq": record["seq"], "hash": record["hash"]}]
    status = http.get(f"/v1/models/{model}/lifecycle", headers=api.headers_for("reader")).json()
    assert [(v["version"], v["stage"], v["pruned"]) for v in status["versions"]] == [
        (V1, "production", False), (V2, "archived", True)]


def test_shadow_evaluation_is_recorded_and_promotion_hot_swaps_twins(client):
    """A candidate shadowed on a live twin over HTTP: its comparison is read, recorded once on the log
    by the system principal; promoting it swaps the twin for events from the promotion on."""
    from datetime import UTC, datetime, timedelta

    api, http = client, client.http
    V3 = "9.9.10"
    assert http.post("/v1/asset-types", json={**THERMAL_TYPE, "version": V3},
                     headers=api.headers_for("admin")).status_code == 201
    assert http.post("/v1/assets", json={"id": "zone-sh", "type_name": "thermal_rc", "type_version": V1},
                     headers=api.headers_for("admin")).status_code == 201
    start = datetime.now(UTC) - timedelta(hours=1)

    def send(ks: range, at=lambda k: start + timedelta(minutes=5 * k)) -> dict:
        evs = [{"asset_id": "zone-sh", "sequence": k, "event_time": at(k).isoformat(),
                "measurements": {"T_in": {"value": 293.0 + 0.01 * k, "unit": "K"},
                                 "T_out": {"value": 5.0, "unit": "degC"}}} for k in ks]
        r = http.post("/v1/assets/zone-sh/telemetry", json={"events": evs}, headers=api.headers_for("writer"))
        assert r.status_code == 200, r.text
        return r.json()

    url = f"/v1/models/thermal_rc/versions/{V3}/shadow"
    send(range(0, 4))
    assert_error(http.get(url, headers=api.headers_for("reader")), 404, "not_found")
    assert "asset_ids or sample" in assert_error(http.post(url, json={"events": 5}, headers=api.headers_for(
        "writer")), 400, "bad_request")["message"]
    assert_error(http.post(url, json={"sample": 1, "events": 5}, headers=api.headers_for("reader")), 403, "forbidden")
    # registered, never submitted (it reads as a candidate): its verdict could never be recorded, which the service
    # retried every few seconds with a traceback; refused before anything starts
    unsubmitted = assert_error(http.post(url, json={"sample": 1, "events": 5}, headers=api.headers_for("writer")),
                               409, "conflict")["message"]
    assert unsubmitted.startswith(f"thermal_rc@{V3} was registered but never submitted: submit it first (POST "
                                  f"/v1/models/thermal_rc/versions/{V3}/transitions with \"to\": \"candidate\")")
    assert _move(api, "author", V3, "candidate").status_code == 201
    unknown = assert_error(http.post(url, json={"asset_ids": ["no-such"], "events": 5},
                                     headers=api.headers_for("writer")), 404, "not_found")["message"]
    assert unknown == "no twin no-such for tenant 'acme'"
    started = http.post(url, json={"sample": 1, "events": 5}, headers=api.headers_for("writer"))
    assert started.status_code == 201 and started.json()["asset_ids"] == ["zone-sh"], started.text
    twice = assert_error(http.post(url, json={"asset_ids": ["zone-sh"], "events": 5},
                                   headers=api.headers_for("writer")), 409, "conflict")  # raised in the shard actor
    assert twice["message"] == (f"a shadow evaluation of thermal_rc@{V3} is already running (run "
                                f"{started.json()['run_id']}); stop it first to start another")
    send(range(4, 7))
    running = http.get(url, headers=api.headers_for("reader")).json()
    assert not running["report"]["done"] and running["recorded"] == []
    assert running["report"]["comparison"]["candidate"]["events"] == 3
    send(range(7, 12))
    done = wait_for(lambda: (read := http.get(url, headers=api.headers_for("reader")).json())["recorded"] and read,
                    "the service records the finished evaluation (a read does not)")
    assert done["report"]["done"] and [r["action"] for r in done["recorded"]] == ["evaluate"]
    assert done["recorded"][0]["actor"] == "system" and done["recorded"][0]["evidence"]["shadow_metrics"]["events"] == 5
    assert http.get(url, headers=api.headers_for("reader")).json()["recorded"] == done["recorded"]  # recorded once
    assert http.delete(url, headers=api.headers_for("writer")).status_code == 204

    # promotion: the twin runs V3 for events from now on; before, V1 applied them
    assert _move(api, "author", V3, "staging").status_code == 201
    assert _move(api, "approver", V3, "production").status_code == 201
    send(range(12, 13), at=lambda k: datetime.now(UTC) + timedelta(seconds=30))
    state = http.get("/v1/assets/zone-sh/state", headers=api.headers_for("reader")).json()
    assert state["model_ref"] == f"thermal_rc@{V3}" and state["events_applied"] == 13
    what_if = {"asset_id": "zone-sh", "horizon_s": 600.0, "step_s": 60.0,
               "inputs": {n: {"kind": "constant", "value": 0.0, "unit": "W"} for n in ("Q_h", "Q_sol")}
               | {"T_out": {"kind": "constant", "value": 5.0, "unit": "degC"}}}
    for origin in ("live", {"T_in": 293.0, "T_m": 292.0}):  # the model the twin runs now, not the catalog's V1
        run = http.post("/v1/scenarios", json={**what_if, "start_state": origin}, headers=api.headers_for("writer"))
        assert run.status_code == 200 and run.json()["model_ref"] == f"thermal_rc@{V3}", run.text
    before = http.get("/v1/assets/zone-sh/state", params={"at": (start + timedelta(minutes=56)).isoformat()},
                      headers=api.headers_for("reader")).json()
    assert before["model_ref"] == f"thermal_rc@{V1}" and before["events_applied"] == 12
    swaps = [a for a in http.get("/v1/audit", headers=api.headers_for("admin")).json() if a["action"] == "model.swap"]
    assert swaps[-1]["details"]["swapped"] == ["zone-sh"] and swaps[-1]["details"]["refused"] == {}
    assert http.get("/v1/models/thermal_rc/lifecycle/verify", headers=api.headers_for("reader")).json()["ok"]


def test_the_publisher_of_a_version_may_not_approve_it(client):
    """Four eyes over the content: an approver who published a version's declaration and parameters cannot
    promote it, even when another key submitted it."""
    api, http = client, client.http
    own = "9.9.20"
    assert http.post("/v1/asset-types", json={**THERMAL_TYPE, "version": own},
                     headers=api.headers_for("chief")).status_code == 201
    assert _move(api, "writer", own, "candidate").status_code == 201
    assert _move(api, "writer", own, "staging").status_code == 201
    refused = assert_error(_move(api, "chief", own, "production"), 403, "forbidden")["message"]
    assert refused.startswith(f"chief is the publisher (its declaration and parameters) of thermal_rc@{own} and "
                              "may not approve it (four eyes)")


def test_only_an_approver_turns_automatic_promotion_on_or_off(client):
    """`auto_promote` decides whether production needs a second key at all: an admin without the approver
    grant could switch it on, promote its own version alone and switch it off again."""
    api, http = client, client.http
    refused = assert_error(http.put("/v1/lifecycle-policy", json={"auto_promote": True},
                                    headers=api.headers_for("admin")), 403, "forbidden")["message"]
    assert refused.startswith("turning auto_promote on needs the 'approver' grant")
    assert http.get("/v1/lifecycle-policy", headers=api.headers_for("reader")).json()["auto_promote"] is False
    for on in (True, False):
        assert http.put("/v1/lifecycle-policy", json={"auto_promote": on},
                        headers=api.headers_for("chief")).status_code == 200
    assert http.put("/v1/lifecycle-policy", json={"keep_runs": 7},  # the rest of the policy: any admin
                    headers=api.headers_for("admin")).status_code == 200


def test_a_version_fitted_on_some_twins_is_promoted_over_the_fleet_only_when_asked(client):
    """A drift recalibration of one zone became, once approved, every zone's model: zone-1, which never drifted,
    ran R_io fitted on zone-2's window, with only zone-2's fit before the approver."""
    from raytwin.lifecycle import Actor, Evidence, ModelLifecycle
    from raytwin.recalibration import DriftTrigger
    from raytwin.registry import ModelRegistry

    api, http = client, client.http
    model, production, fitted = "fitted_rc", V1, "9.9.30"
    _publish(api, model, production, fitted)
    _promote(api, model, production)
    asset = {"type_name": model, "type_version": production, "initial_state": {"T_in": 293.0, "T_m": 292.0}}
    for zone in ("zone-drifted", "zone-healthy"):
        assert http.post("/v1/assets", json={"id": zone, **asset}, headers=api.headers_for("admin")).status_code == 201
    trigger = DriftTrigger(seq=1, asset_id="zone-drifted", type_name=model, type_version=production,
                           event_time=None, drift_score=3.0, nis_mean=4.5, nis_last=4.0)
    ModelLifecycle(ModelRegistry(str(api.store / "registry" / "acme"))).submit(  # as the recalibration does
        f"{model}@{fitted}", Actor(id="recalibration", tenant="acme"), "drift of zone-drifted",
        Evidence(triggers=[trigger]))
    assert _move(api, "author", fitted, "staging", model=model).status_code == 201
    refused = assert_error(_move(api, "approver", fitted, "production", model=model), 409, "conflict")["message"]
    assert refused.startswith(f"{model}@{fitted} was fitted on the telemetry of zone-drifted (a drift "
                              f"recalibration); promotion swaps every twin of {model}, so ")
    assert "zone-healthy" in refused and 'send "fleet": true if they share them' in refused
    assert http.get(f"/v1/models/{model}/lifecycle", headers=api.headers_for("reader")).json()["production"] == \
        production  # nothing moved
    assert _move(api, "approver", fitted, "production", model=model, fleet=True).status_code == 201
    swaps = [a for a in http.get("/v1/audit", headers=api.headers_for("admin")).json() if a["action"] == "model.swap"]
    assert set(swaps[-1]["details"]["swapped"]) == {"zone-drifted", "zone-healthy"}


def test_retention_keeps_what_twins_run_and_their_history_applied_and_promotions_say_who_swapped(client):
    """A twin swapped 1.0.0 -> 1.1.0 -> 1.3.0 refuses 2.0.0 and 2.1.0 (another state layout): it runs 1.3.0,
    archived and not the rollback target, and its history was applied by 1.1.0, which no asset names. Retention
    removed both (it kept only what the catalog names), breaking the twin's runs; it keeps them now, and removes
    what no twin needs. A version an earlier retention removed answers 410, never a 500. Each promotion's answer
    says which twins swapped and why the others did not."""
    from datetime import UTC, datetime, timedelta
    from time import sleep

    from raytwin.contracts import AssetType
    from raytwin.lifecycle import Actor, ModelLifecycle
    from raytwin.registry import ModelRegistry
    from raytwin.sim import TWO_TANK

    api, http = client, client.http
    model, asset = "retained", "ret-1"
    tank = AssetType.from_model(TWO_TANK).model_dump(mode="json")
    for version, body in (("1.0.0", THERMAL_TYPE), ("1.1.0", THERMAL_TYPE), ("1.2.0", THERMAL_TYPE),
                          ("1.3.0", THERMAL_TYPE), ("2.0.0", tank), ("2.1.0", tank)):
        r = http.post("/v1/asset-types", json={**body, "name": model, "version": version},
                      headers=api.headers_for("admin"))
        assert r.status_code == 201, r.text

    def move(version: str, to: str) -> httpx.Response:
        return http.post(f"/v1/models/{model}/versions/{version}/transitions", json={"to": to, "reason": to},
                         headers=api.headers_for("approver" if to == "production" else "author"))

    def promote(version: str) -> dict:
        assert move(version, "candidate").status_code == 201 and move(version, "staging").status_code == 201
        answer = move(version, "production")
        assert answer.status_code == 201, answer.text
        return answer.json()["twins"]

    def send(k: int) -> datetime:
        """One reading after the last swap's boundary (server time), applied by the version swapped in."""
        sleep(0.2)
        at = datetime.now(UTC)
        r = http.post(f"/v1/assets/{asset}/telemetry", headers=api.headers_for("writer"), json={"events": [
            {"sequence": k, "event_time": at.isoformat(), "measurements": {"T_in": {"value": 293.0, "unit": "K"},
                                                                           "T_out": {"value": 5.0, "unit": "degC"}}}]})
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
        return at

    assert promote("1.0.0") == {"swapped": [], "refused": {}, "unfinished": None}
    assert http.post("/v1/assets", json={"id": asset, "type_name": model, "type_version": "1.0.0",
                                         "initial_state": {"T_in": 293.0, "T_m": 292.0}},
                     headers=api.headers_for("admin")).status_code == 201
    send(1)
    assert promote("1.1.0") == {"swapped": [asset], "refused": {}, "unfinished": None}
    era_1_1 = send(2)
    assert promote("1.3.0") == {"swapped": [asset], "refused": {}, "unfinished": None}
    send(3)
    for version in ("2.0.0", "2.1.0"):
        refused = promote(version)
        assert refused["swapped"] == [] and list(refused["refused"]) == [asset]
        assert "a swap needs the same inputs and outputs" in refused["refused"][asset]
    assert move("1.2.0", "candidate").status_code == 201 and move("1.2.0", "archived").status_code == 201
    status = http.get(f"/v1/models/{model}/lifecycle", headers=api.headers_for("reader")).json()
    assert (status["production"], status["rollback_target"]) == ("2.1.0", "2.0.0")
    state = http.get(f"/v1/assets/{asset}/state", headers=api.headers_for("reader")).json()
    assert state["model_ref"] == f"{model}@1.3.0"

    assert http.put("/v1/lifecycle-policy", json={"keep_archived": 0},
                    headers=api.headers_for("admin")).status_code == 200
    pruned = http.post(f"/v1/models/{model}/prune", headers=api.headers_for("admin"))
    assert pruned.status_code == 200 and pruned.json()["versions_removed"] == ["1.2.0"], pruned.text
    registry = ModelRegistry(str(api.store / "registry" / "acme"))
    assert registry.versions(model) == ["1.0.0", "1.1.0", "1.3.0", "2.0.0", "2.1.0"]
    what_if = {"asset_id": asset, "start_state": "live", "horizon_s": 600.0, "step_s": 60.0,
               "inputs": {n: {"kind": "constant", "value": 0.0, "unit": "W"} for n in ("Q_h", "Q_sol")}
               | {"T_out": {"kind": "constant", "value": 5.0, "unit": "degC"}}}
    for start in (None, era_1_1 + timedelta(milliseconds=1)):  # the twin now (1.3.0) and in the 1.1.0 era
        run = http.post("/v1/scenarios", json={**what_if, "start_time": start and start.isoformat()},
                        headers=api.headers_for("writer"))
        assert run.status_code == 200, run.text
    assert run.json()["model_ref"] == f"{model}@1.1.0"

    # a store whose retention (an earlier release's) removed a version the twin's history needs
    ModelLifecycle(registry).prune(model, Actor(id="old-release", tenant="acme"), in_use={"1.0.0", "1.3.0"})
    assert registry.versions(model) == ["1.0.0", "1.3.0", "2.0.0", "2.1.0"]  # 2.0.0: the rollback target
    past = http.get(f"/v1/assets/{asset}/state", params={"at": (era_1_1 + timedelta(milliseconds=1)).isoformat()},
                    headers=api.headers_for("reader"))
    assert past.status_code == 200 and past.json()["model_ref"] == f"{model}@1.1.0"  # the store keeps its artifact
    gone = assert_error(http.post("/v1/scenarios", json={**what_if, "start_time": (
        era_1_1 + timedelta(milliseconds=1)).isoformat()}, headers=api.headers_for("writer")), 410, "gone")
    assert gone["message"].startswith(f"{model}@1.1.0, the model twin {asset} ran at that time, was removed by "
                                      "retention (model prune by old-release at ")
    assert "give an explicit start_state" in gone["message"]
    assert http.put("/v1/lifecycle-policy", json={"keep_archived": 5},
                    headers=api.headers_for("admin")).status_code == 200


def test_the_cli_does_not_change_the_lifecycle_of_the_store_the_service_serves(client):
    """`raytwin registry promote` on the served store moved production while the twins kept the old version and
    the audit log missed it: the running service's shards renew the store's lease, and the CLI refuses (here a
    rollback), naming the route; nothing moves. Reading stays open."""
    from typer.testing import CliRunner

    from raytwin.cli import app

    api, http = client, client.http
    registry = str(api.store / "registry" / "acme")
    before = http.get("/v1/models/thermal_rc/lifecycle", headers=api.headers_for("reader")).json()
    cli = CliRunner()
    refused = cli.invoke(app, ["registry", "rollback", "thermal_rc", "--registry", registry, "--tenant", "acme",
                               "--actor", "bob", "--role", "approver", "--reason", "via the CLI"])
    assert refused.exit_code == 1 and "a running service holds" in refused.output
    assert "POST /v1/models/thermal_rc/rollback" in refused.output
    assert http.get("/v1/models/thermal_rc/lifecycle", headers=api.headers_for("reader")).json() == before
    status = cli.invoke(app, ["registry", "status", "thermal_rc", "--registry", registry])
    # the CLI prints `none` without a production version (this test alone, before the module's promotions)
    assert status.exit_code == 0 and f"production: {before['production'] or 'none'};" in status.output


def test_a_type_version_the_lifecycle_or_a_twin_uses_is_not_deleted(client):
    """The catalog's assets keep the type version their twin was created on, and a promotion's swap does not change
    it: deleting the production version answered 204, and afterwards no twin of the model could be created (its
    version did not exist; any other was not production). Refused while the lifecycle needs a version or a twin
    runs it, each reason with its remedy; an archived version nothing runs is deleted."""
    api, http = client, client.http
    model, old, new, spare = "thermal_del", "1.0.0", "1.1.0", "1.2.0"
    admin = api.headers_for("admin")

    def move(who: str, version: str, to: str) -> None:
        r = http.post(f"/v1/models/{model}/versions/{version}/transitions", headers=api.headers_for(who),
                      json={"to": to, "reason": f"{who}: {to}"})
        assert r.status_code == 201, r.text

    def refusal(version: str) -> str:
        return assert_error(http.delete(f"/v1/asset-types/{model}/{version}", headers=admin), 409,
                            "conflict")["message"]

    for version in (old, new, spare):
        assert http.post("/v1/asset-types", json={**THERMAL_TYPE, "name": model, "version": version},
                         headers=admin).status_code == 201
    assert http.post("/v1/assets", json={"id": "zone-del", "type_name": model, "type_version": old},
                     headers=admin).status_code == 201
    for version in (old, new):
        move("author", version, "candidate")
        move("author", version, "staging")
        move("approver", version, "production")  # new: the twin is swapped to it, its asset still names old
    assert http.get("/v1/assets/zone-del", headers=admin).json()["type_version"] == old

    assert refusal(new) == (
        f"asset type {model}@{new} is in use and was not deleted: {model}@{new} is the production version of "
        f"model {model}: new twins of {model} are created on it; promote another version to production first "
        f"(POST /v1/models/{model}/versions/{{version}}/transitions); twins zone-del run {model}@{new} (a "
        f"promotion swapped them to it; their assets still name the type version they were created on); promote "
        f"another version of {model} first, which swaps them to it")
    assert "is used by assets ['zone-del']" in refusal(old)  # the catalog's reason comes first
    created = http.post("/v1/assets", json={"id": "zone-del-2", "type_name": model, "type_version": new},
                        headers=admin)
    assert created.status_code == 201, created.text  # the production version is still there to create twins on

    move("author", spare, "candidate")
    assert refusal(spare) == (
        f"asset type {model}@{spare} is in use and was not deleted: {model}@{spare} is a candidate version of model "
        f"{model} and may still be promoted to production; archive it first (POST /v1/models/{model}/versions/"
        f"{spare}/transitions with {{\"to\": \"archived\"}})")
    move("author", spare, "archived")
    assert http.delete(f"/v1/asset-types/{model}/{spare}", headers=admin).status_code == 204

    for asset_id in ("zone-del", "zone-del-2"):
        assert http.delete(f"/v1/assets/{asset_id}", headers=admin).status_code == 204
    assert "is the rollback target of model" in refusal(old)  # no asset left; a rollback makes it production
    assert refusal(new).endswith(f"(POST /v1/models/{model}/versions/{{version}}/transitions)")  # no twin runs it


def test_a_shadow_runs_only_on_twins_of_the_candidates_model(client):
    """A candidate of model other_rc shadowed on a twin of another model (host_rc) was accepted, compared with
    host_rc's production and recorded by the system as evidence on other_rc's log; refused now, naming the twin."""
    api, http = client, client.http
    _publish(api, "other_rc", "1.1.0")
    _publish(api, "host_rc", V1)
    _promote(api, "host_rc", V1)
    assert _move(api, "writer", "1.1.0", "candidate", model="other_rc").status_code == 201
    assert http.post("/v1/assets", json={"id": "zone-foreign", "type_name": "host_rc", "type_version": V1},
                     headers=api.headers_for("admin")).status_code == 201
    url = "/v1/models/other_rc/versions/1.1.0/shadow"
    refused = assert_error(http.post(url, json={"asset_ids": ["zone-foreign"], "events": 5},
                                     headers=api.headers_for("writer")), 409, "conflict")["message"]
    assert refused.startswith("twin(s) zone-foreign run no version of model other_rc: a shadow evaluation compares "
                              "other_rc@1.1.0 with its own model's production version")
    assert_error(http.get(url, headers=api.headers_for("reader")), 404, "not_found")  # nothing started
    assert "no twin of model other_rc" in assert_error(http.post(url, json={"sample": 1, "events": 5},
                                                                 headers=api.headers_for("writer")), 400,
                                                       "bad_request")["message"]


def test_no_new_twin_runs_an_unapproved_or_archived_version_once_production_was_archived(client):
    """Archiving the production version (found wrong) left model archived_rc without one, and the API then
    created twins on any version: the candidate nobody approved, and the version just archived. Before the
    first promotion (bootstrap) twins run any version that is not archived."""
    api, http = client, client.http
    model, admin = "archived_rc", api.headers_for("admin")
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        assert http.post("/v1/asset-types", json={**THERMAL_TYPE, "name": model, "version": version},
                         headers=admin).status_code == 201
    move = lambda who, version, to: http.post(  # noqa: E731
        f"/v1/models/{model}/versions/{version}/transitions", json={"to": to, "reason": f"{who}: {to}"},
        headers=api.headers_for(who))
    create = lambda asset_id, version: http.post("/v1/assets", headers=admin, json={  # noqa: E731
        "id": asset_id, "type_name": model, "type_version": version})
    assert move("writer", "1.2.0", "candidate").status_code == 201 and move("writer", "1.2.0", "archived").status_code == 201
    assert create("ar-boot", "1.0.0").status_code == 201  # bootstrap: no version was ever approved
    assert assert_error(create("ar-rejected", "1.2.0"), 409, "conflict")["message"] == (
        f"{model}@1.2.0 is archived, and an archived version runs on no new twin: use a candidate or staging "
        f"version of {model}, or register a new version")
    for version in ("1.0.0", "1.1.0"):
        assert move("writer", version, "candidate").status_code == 201
    assert move("writer", "1.0.0", "staging").status_code == 201 and move("approver", "1.0.0", "production").status_code == 201
    assert move("approver", "1.0.0", "archived").status_code == 201  # found wrong: no production version now
    no_production = (f"model {model} has no production version (the last one was archived), and twins of a model "
                     f"under the lifecycle run its production version: an approver promotes a version first (POST "
                     f"/v1/models/{model}/versions/{{version}}/transitions with \"to\": \"production\")")
    for version in ("1.1.0", "1.0.0"):  # the candidate nobody approved, the version just archived
        assert assert_error(create(f"ar-{version}", version), 409, "conflict")["message"] == no_production
    retyped = http.put("/v1/assets/ar-boot", headers=admin, json={"type_name": model, "type_version": "1.1.0"})
    assert assert_error(retyped, 409, "conflict")["message"] == no_production
    assert move("writer", "1.1.0", "staging").status_code == 201 and move("approver", "1.1.0", "production").status_code == 201
    assert create("ar-approved", "1.1.0").status_code == 201


def test_a_shadow_of_a_candidate_archived_meanwhile_is_still_read(client):
    """Archiving a candidate while its evaluation ran made every read of the evaluation 409 ("evidence is
    recorded for candidate, staging and production versions only"); it answers the report, records nothing,
    says why and points to DELETE."""
    from datetime import UTC, datetime, timedelta

    api, http = client, client.http
    model = "dropped_rc"
    _publish(api, model, "1.0.0", "1.1.0")
    move = lambda who, version, to: http.post(  # noqa: E731
        f"/v1/models/{model}/versions/{version}/transitions", json={"to": to, "reason": f"{who}: {to}"},
        headers=api.headers_for(who)).status_code
    assert [move("writer", "1.0.0", "candidate"), move("writer", "1.0.0", "staging"),
            move("approver", "1.0.0", "production"), move("writer", "1.1.0", "candidate")] == [201] * 4
    assert http.post("/v1/assets", json={"id": "zone-dropped", "type_name": model, "type_version": "1.0.0"},
                     headers=api.headers_for("admin")).status_code == 201
    url = f"/v1/models/{model}/versions/1.1.0/shadow"
    assert http.post(url, json={"asset_ids": ["zone-dropped"], "events": 3},
                     headers=api.headers_for("writer")).status_code == 201
    assert move("writer", "1.1.0", "archived") == 201
    start = datetime.now(UTC) - timedelta(hours=1)
    events = [{"sequence": k, "event_time": (start + timedelta(minutes=5 * k)).isoformat(),
               "measurements": {"T_in": {"value": 293.0 + 0.01 * k, "unit": "K"},
                                "T_out": {"value": 5.0, "unit": "degC"}}} for k in range(4)]
    assert http.post("/v1/assets/zone-dropped/telemetry", json={"events": events},
                     headers=api.headers_for("writer")).status_code == 200
    read = http.get(url, headers=api.headers_for("reader"))
    assert read.status_code == 200 and read.json()["report"]["done"] and read.json()["recorded"] == [], read.text
    assert read.json()["not_recorded"] == (
        f"{model}@1.1.0 was archived since the evaluation started: the lifecycle records evidence for candidate, "
        f"staging and production versions only, so this comparison is not recorded; DELETE {url} to end the "
        "evaluation")
    log = http.get(f"/v1/models/{model}/lifecycle/log", headers=api.headers_for("reader")).json()
    assert [r["action"] for r in log] == ["submit", "stage", "promote", "submit", "archive"]
    assert http.delete(url, headers=api.headers_for("writer")).status_code == 204


def test_if_match_makes_a_transition_conditional_on_the_lifecycle_etag(client):
    """If-Match on a transition or a rollback was ignored: a client using HTTP's compare-and-set believed its
    transition conditional while a stale one applied. GET .../lifecycle's ETag is the log's revision and the start
    of its head hash; If-Match with it is expected_revision, answered 412 like the API's other preconditions. The
    head hash: after a restore of the store from an earlier copy, new transitions reused the revisions of those
    lost with the restore, and an ETag from before matched a log the client never read."""
    api, http = client, client.http
    model = "cas_rc"
    _publish(api, model, "1.0.0", "1.1.0")
    url = f"/v1/models/{model}/versions/{{}}/transitions"
    writer = lambda tag: {**api.headers_for("writer"), "If-Match": tag}  # noqa: E731
    status = http.get(f"/v1/models/{model}/lifecycle", headers=api.headers_for("reader"))
    empty = status.headers["etag"]
    assert status.json()["revision"] == -1 and empty == f'"-1-{status.json()["head_hash"][:12]}"'
    first = http.post(url.format("1.0.0"), json={"to": "candidate", "reason": "fit"}, headers=writer(empty))
    assert first.status_code == 201 and first.headers["etag"] == f'"0-{first.json()["hash"][:12]}"', first.text
    assert http.get(f"/v1/models/{model}/lifecycle", headers=api.headers_for("reader")).headers["etag"] == \
        first.headers["etag"]
    for condition, status in (({"If-Match": empty}, 412), ({"If-Match": first.headers["etag"]}, 200),
                              ({"If-None-Match": first.headers["etag"]}, 304), ({"If-None-Match": empty}, 200)):
        read = http.get(f"/v1/models/{model}/lifecycle", headers={**api.headers_for("reader"), **condition})
        assert read.status_code == status, (condition, read.text)  # the read evaluates both, as the catalog's do
    stale = assert_error(http.post(url.format("1.1.0"), json={"to": "candidate", "reason": "fit"},
                                   headers=writer(empty)), 412, "precondition_failed")["message"]
    assert stale == (f'{model} is at revision 0, not -1: another transition came first; reload and retry; nothing was '
                     f'changed (If-Match: {empty} did not hold): GET .../lifecycle again and send its ETag')
    restored = assert_error(http.post(url.format("1.1.0"), json={"to": "candidate", "reason": "fit"},
                                      headers=writer('"0-000000000000"')), 412, "precondition_failed")["message"]
    assert restored.startswith(f"{model}'s log at revision 0 has head hash {first.json()['hash'][:12]}, not "
                               "000000000000: other records than those read (the store was restored from an earlier "
                               "copy since)")
    assert http.get(f"/v1/models/{model}/lifecycle", headers=api.headers_for("reader")).json()["revision"] == 0
    assert "is not one lifecycle ETag" in assert_error(http.post(
        url.format("1.1.0"), json={"to": "candidate", "reason": "fit"}, headers=writer("*")), 400, "bad_request")["message"]
    both = http.post(url.format("1.1.0"), json={"to": "candidate", "reason": "fit", "expected_revision": 3},
                     headers=writer('"0"'))
    assert "name different revisions" in assert_error(both, 400, "bad_request")["message"]
    rollback = http.post(f"/v1/models/{model}/rollback", json={"reason": "back"},
                         headers={**api.headers_for("approver"), "If-Match": empty})
    assert_error(rollback, 412, "precondition_failed")
    bare = http.post(url.format("1.1.0"), json={"to": "candidate", "reason": "fit"}, headers=writer('"0"'))
    assert bare.headers["etag"] == f'"1-{bare.json()["hash"][:12]}"'  # a bare revision (older clients) still holds


def test_an_unknown_model_is_404_on_every_lifecycle_route(client):
    """The log answered 200 [] and the check 200 ok for a model that does not exist, and a rollback 409."""
    api, http = client, client.http
    for path in ("lifecycle", "lifecycle/log", "lifecycle/verify"):
        missing = http.get(f"/v1/models/no_such_model/{path}", headers=api.headers_for("reader"))
        assert assert_error(missing, 404, "not_found")["message"] == "no model no_such_model"
    assert_error(http.post("/v1/models/no_such_model/rollback", json={"reason": "back"},
                           headers=api.headers_for("approver")), 404, "not_found")


def test_a_rollback_sent_twice_goes_back_once_and_unhonoured_preconditions_are_refused(client):
    """A rollback without expected_revision sent twice (a retry after a timeout, two approvers answering one
    incident) went back two versions; naming the version it leaves (`from_version`), the second answers 409 and
    nothing moves. If-None-Match on a transition was ignored: refused with 400, nothing recorded."""
    api, http = client, client.http
    model = "retry_rc"
    _publish(api, model, "1.0.0", "1.1.0", "1.2.0")
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        for who, to in (("writer", "candidate"), ("writer", "staging"), ("approver", "production")):
            r = http.post(f"/v1/models/{model}/versions/{version}/transitions", json={"to": to, "reason": to},
                          headers=api.headers_for(who))
            assert r.status_code == 201, r.text
    url, back = f"/v1/models/{model}/rollback", {"reason": "innovations drifted", "from_version": "1.2.0"}
    first = http.post(url, json=back, headers=api.headers_for("approver"))
    assert first.status_code == 201 and (first.json()["version"], first.json()["displaced"]) == ("1.1.0", "1.2.0")
    again = assert_error(http.post(url, json=back, headers=api.headers_for("chief")), 409, "conflict")["message"]
    assert again.startswith(f"{model}@1.2.0 is no longer the production version of {model} (production is 1.1.0): "
                            f"rollback record {first.json()['seq']} by {first.json()['actor']} at ")
    assert again.endswith("moved it out; nothing was changed (a rollback sent again goes back no further). Read GET "
                          f"/v1/models/{model}/lifecycle before deciding on another move")
    typo = assert_error(http.post(url, json={**back, "from_version": "7.7.7"}, headers=api.headers_for("chief")),
                        409, "conflict")["message"]
    assert typo == (f"{model}@7.7.7 is not the production version of {model} (production is 1.1.0); nothing was "
                    f"changed: name the production version as from_version (see GET /v1/models/{model}/lifecycle)")
    status = http.get(f"/v1/models/{model}/lifecycle", headers=api.headers_for("reader")).json()
    assert (status["production"], status["revision"]) == ("1.1.0", first.json()["seq"])

    for header, path, body in (("If-None-Match", f"/v1/models/{model}/versions/1.1.0/transitions",
                                {"to": "archived", "reason": "x"}), ("If-Unmodified-Since", url, {"reason": "x"})):
        refused = assert_error(http.post(path, json=body, headers={**api.headers_for("approver"), header: "*"}),
                               400, "bad_request")
        assert refused["message"].startswith(f"{header}: * is not a condition a lifecycle transition or rollback "
                                             "honours") and "Send If-Match with the ETag" in refused["message"]
    assert http.get(f"/v1/models/{model}/lifecycle", headers=api.headers_for("reader")).json() == status
