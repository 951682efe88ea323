"""Recommendations over HTTP (serve_apps/routes_recommendations.py): ask, read back, issue as a command
that only another key with the approver grant can approve, audited; another tenant gets 404.

The real API app and services with the `Backend`'s connector operations in-process (as in
tests/test_connectors_mqtt.py), a real MQTT broker, and two-tank twins whose live state starts the plan
(pump-1's from one telemetry event; pump-0 has none).
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

import pytest

from actors import UnknownTwin
from raytwin.contracts import AssetType
from raytwin.registry import ModelRegistry
from raytwin.sim import TWO_TANK
from serve_apps.conditional import state_etag
from serve_apps.errors import NotFound
from tests.fixtures_connectors import tank_twins, wait_for
from tests.fixtures_serve import NODE_BROKERS, InProcessHandle
from tests.test_connectors_mqtt import PAYLOAD, T0, Publisher, as_event, broker, plant_spec  # noqa: F401

KEYS = (("writer", "acme", "writer", ()), ("approver", "acme", "admin", ("approver",)),
        ("admin", "acme", "admin", ()), ("reader", "acme", "reader", ()), ("other", "globex", "admin", ("approver",)))
REQUEST = {"horizon_s": 1800.0, "step_s": 2.0, "objective": "pumped_m3", "iterations": 60, "learning_rate": 0.05,
           "control": {"input": "q_in", "block_s": 300.0, "lower": 0.0, "upper": 2.0e-4},
           "inputs": {"q_in_mean": 1.2e-4, "q_in_swing": 0.0},
           "constraints": [{"of": "h2", "low": 0.3, "high": 0.8, "margin": 0.01}],
           "ensemble": {"rel_std": {"a1": 0.05}, "size": 4}}


@pytest.fixture(scope="module")
def api(ray_session, broker, tmp_path_factory):  # noqa: F811 (the broker fixture)
    from fastapi.testclient import TestClient

    from raytwin.storage import filesystem
    from serve_apps.api import create_api
    from serve_apps.audit import AuditLog
    from serve_apps.auth import KeyStore, create_key
    from serve_apps.backend import Backend
    from serve_apps.config import ServeConfig
    from serve_apps.connector_ops import ConnectorOps
    from serve_apps.deps import BackendClient, Services
    from serve_apps.limits import TokenBuckets

    root = tmp_path_factory.mktemp("recommend-api")
    keys_file = root / "keys.json"
    keys = {name: create_key(keys_file, tenant, role, grants, owner=name) for name, tenant, role, grants in KEYS}
    config = ServeConfig(store_url=str(root / "store"), keys_file=str(keys_file), rate_per_s=1000, rate_burst=1000,
                         connector_hosts=NODE_BROKERS)  # the tenant's connector: to the broker on this machine
    artifact = ModelRegistry(config.url("registry", "acme")).register("tank", "1.0.0", AssetType.from_model(TWO_TANK))

    with tank_twins(tmp_path_factory, {"acme": ["pump-1", "pump-0"], "globex": ["pump-9"]}) as twins:
        assert twins.ingest("acme", [as_event("pump-1", 0)]).accepted == 1  # pump-1 has a live estimate
        class TankBackend:  # the Backend's connector method over real ConnectorOps, and the assets' model
            connector = Backend.connector
            connector_ops = ConnectorOps(twins, [], hosts=config.connector_hosts)

            def check_writable(self, fresh: bool = False) -> None:
                """This stand-in's store has no other service."""

            def model_of(self, tenant: str, asset_id: str, model_ref: str):
                if asset_id not in twins.assets(tenant):
                    raise NotFound(f"asset {asset_id} not found")
                return artifact

        class LiveStates:  # what `TwinReader.state` answers, from the twin service
            async def state(self, tenant: str, asset_id: str, at=None) -> dict:
                try:
                    return twins.state(tenant, asset_id).model_dump(mode="json")
                except UnknownTwin as exc:
                    raise NotFound(str(exc)) from None

        backend = TankBackend()
        spec = {k: v for k, v in plant_spec(broker.port, name="site").items() if k != "tenant"}
        spec["routes"] = [{"topic": "site/+/telemetry", "asset_level": 1, "payload": PAYLOAD,
                           "command_topic": "site/{asset_id}/cmd"}]
        spec["ack_topic"] = "site/+/ack"
        backend.connector_ops.create("acme", spec, None)
        app = create_api()
        app.state.services = Services(
            config=config, keys=KeyStore(config.keys_file), backend=BackendClient(InProcessHandle(backend)),
            audit=AuditLog(config.store_url), buckets=TokenBuckets(1000, 1000), fs=filesystem(config.store_url)[0],
            twins=LiveStates(), changes=None, change_store=None)
        with TestClient(app) as client:
            wait_for(lambda: backend.connector_ops.view("acme", "site")["status"]["connected"], "connected")
            yield client, {n: {"Authorization": f"Bearer {key}"} for n, (_, key) in keys.items()}, \
                {n: record.key_id for n, (record, _) in keys.items()}, app.state.services
        backend.connector_ops.connectors.stop_all("acme")


@pytest.fixture(scope="module")
def recommendation(api):
    client, auth, _, _ = api
    r = client.post("/v1/assets/pump-1/recommendations", json=REQUEST, headers=auth["writer"])
    assert r.status_code == 201, r.text
    return r.json()


def test_a_recommendation_from_the_live_state_is_read_back_by_its_tenant_only(api, recommendation):
    client, auth, _, svc = api
    answer = recommendation
    live = asyncio.run(svc.twins.state("acme", "pump-1"))
    assert answer["start_state"] == pytest.approx(live["state"])  # the twin's live state, and its time
    assert live["revision"] == 1 and datetime.fromisoformat(answer["start_time"]) == T0
    assert (answer["start_revision"], answer["start_etag"]) == (1, state_etag(live))  # as GET .../state tags it
    assert answer["status"] == "feasible" and answer["violations"] == []
    assert answer["run_id"].startswith("recommendation-") and len(answer["action"]["values"]) == 6
    assert all(0.0 <= v <= 2.0e-4 for v in answer["action"]["values"])
    assert answer["change"] < 0.0 and answer["recommended"]["outside_h2_s"] == 0.0
    url = f"/v1/assets/pump-1/recommendations/{answer['run_id']}"
    assert client.get(url, headers=auth["reader"]).json() == answer
    assert client.get(url, headers=auth["other"]).status_code == 404
    assert client.get(f"/v1/assets/pump-2/recommendations/{answer['run_id']}", headers=auth["reader"]).status_code == 404
    assert client.post("/v1/assets/pump-9/recommendations", json=REQUEST, headers=auth["writer"]).status_code == 404
    assert client.post("/v1/assets/pump-1/recommendations", json=REQUEST, headers=auth["reader"]).status_code == 403
    bad = client.post("/v1/assets/pump-1/recommendations", json={**REQUEST, "objective": "nope"}, headers=auth["writer"])
    assert bad.status_code == 422 and "is not a metric" in bad.json()["error"]["message"]
    actions = [r.action for r in svc.audit.records("acme")]
    assert "recommendation.create" in actions


def test_issuing_needs_an_approver_who_is_not_the_issuer(api, broker, recommendation):  # noqa: F811
    client, auth, key_ids, svc = api
    device = Publisher(broker.port, answer=True)
    device.listen("site/+/cmd")
    rid = recommendation["run_id"]
    issue = f"/v1/assets/pump-1/recommendations/{rid}/issue"
    assert client.post(issue, json={"connector": "site"}, headers=auth["other"]).status_code == 404
    r = client.post(issue, json={"connector": "site"}, headers=auth["writer"])
    assert r.status_code == 201, r.text
    command = r.json()
    assert (command["status"], command["proposed_by"], command["value"]["recommendation"]) == (
        "proposed", "writer", rid)  # its owner
    assert command["value"]["status"] == "feasible"  # what its approver sees
    assert json.loads(command["value"]["values"]) == recommendation["action"]["values"]
    assert datetime.fromisoformat(command["value"]["start_time"]) == datetime.fromisoformat(
        recommendation["start_time"])  # what starts_s count from
    approve = f"/v1/commands/{command['id']}/approve"
    assert client.post(approve, headers=auth["writer"]).status_code == 403  # not an admin
    no_grant = client.post(approve, headers=auth["admin"])
    assert no_grant.status_code == 403 and "'approver' grant" in no_grant.json()["error"]["message"]
    assert client.post(approve, headers=auth["other"]).status_code == 404  # another tenant's approver
    own = client.post(issue, json={"connector": "site"}, headers=auth["approver"]).json()
    assert client.post(f"/v1/commands/{own['id']}/approve", headers=auth["approver"]).status_code == 409  # four eyes
    sent = client.post(approve, headers=auth["approver"])
    assert sent.status_code == 200 and sent.json()["status"] == "sent", sent.text
    wait_for(lambda: client.get(f"/v1/commands/{command['id']}", headers=auth["reader"]).json()["status"]
             == "acknowledged", "the device acknowledged the schedule")
    device.close()
    assert [b["correlation_id"] for _, b in device.received] == [command["correlation_id"]]
    audit = [(r.action, r.key_id) for r in svc.audit.records("acme")]
    assert ("recommendation.issue", key_ids["writer"]) in audit and ("command.approve", key_ids["approver"]) in audit


def test_the_first_block_alone_is_issued_for_a_command_that_takes_one_value(api, broker, recommendation):  # noqa: F811
    """An OPC UA command node takes `{"value", "unit"}`, not a schedule (it refused the issued schedule with a 422
    and no way out): `part: first_block` proposes the first block's value alone. The command names the
    recommendation, so approving it still needs the approver grant though its value no longer carries the id."""
    from connectors.opcua.config import CommandNode
    from serve_apps.routes_recommendations import command_value
    from sweeps.recommend import Recommendation

    client, auth, key_ids, _ = api
    rid, action = recommendation["run_id"], recommendation["action"]
    node = CommandNode(asset_id="pump-1", name="inflow", node_id="ns=2;s=q_in", correlation_node_id="ns=2;s=cid",
                       unit=action["unit"], lower=0.0, upper=2.0e-4)
    answer = Recommendation.model_validate(recommendation)
    assert "an OPC UA command's value is" in node.value_problem(command_value(answer))
    assert node.value_problem(command_value(answer, "first_block")) is None

    device = Publisher(broker.port, answer=True)
    device.listen("site/+/cmd")
    r = client.post(f"/v1/assets/pump-1/recommendations/{rid}/issue",
                    json={"connector": "site", "name": "inflow", "part": "first_block"}, headers=auth["writer"])
    assert r.status_code == 201, r.text
    command = r.json()
    assert command["value"] == {"value": action["values"][0], "unit": action["unit"]}
    assert (command["recommendation_id"], command["proposed_by"]) == (rid, "writer")
    approve = f"/v1/commands/{command['id']}/approve"
    no_grant = client.post(approve, headers=auth["admin"])
    assert no_grant.status_code == 403 and "'approver' grant" in no_grant.json()["error"]["message"]
    sent = client.post(approve, headers=auth["approver"])
    assert sent.status_code == 200 and sent.json()["status"] == "sent", sent.text
    wait_for(lambda: [b["value"] for _, b in device.received] == [command["value"]], "the device got the value")
    device.close()


def test_the_recommend_commands_ask_read_back_and_issue_through_the_api(api, recommendation, tmp_path):
    from typer.testing import CliRunner

    from raytwin.cli import app
    from tests.fixtures_http import served

    client, auth, _, _ = api
    request = tmp_path / "request.json"
    request.write_text(json.dumps({**REQUEST, "iterations": 20}))
    with served(client.app) as url:
        def run(role: str, *args: str):
            key = auth[role]["Authorization"].removeprefix("Bearer ")
            return CliRunner().invoke(app, ["recommend", *args, "--api-url", url], env={"RAYTWIN_API_KEY": key})

        asked = run("writer", "ask", "pump-1", str(request), "--json")
        assert asked.exit_code == 0, asked.output
        answer = json.loads(asked.stdout)  # stdout: a Ray worker's log line, forwarded to this process's stderr, may land meanwhile
        assert answer["asset_id"] == "pump-1" and answer["change"] < 0.0 and answer["run_id"] != recommendation["run_id"]
        got = run("reader", "get", "pump-1", recommendation["run_id"])
        assert got.exit_code == 0 and got.stdout.startswith(f"recommendation {recommendation['run_id']}\npumped_m3: ")
        issued = run("writer", "issue", "pump-1", recommendation["run_id"], "--connector", "site")
        assert issued.exit_code == 0, issued.output
        command = json.loads(issued.stdout)
        assert command["status"] == "proposed" and command["value"]["recommendation"] == recommendation["run_id"]
        refused = run("reader", "ask", "pump-1", str(request))
        assert refused.exit_code == 1 and refused.output.startswith("error 403 forbidden: ")
        hidden = run("other", "get", "pump-1", recommendation["run_id"])
        assert hidden.exit_code == 1 and "error 404 not_found: " in hidden.output


UNREACHABLE = {**REQUEST, "constraints": [{"of": "h2", "low": 5.0, "high": 6.0, "margin": 0.01}]}
"""A band no inflow within the pump's box reaches in half an hour (the tester's request)."""


def test_a_band_the_plan_cannot_meet_is_422_infeasible_or_a_labelled_best_effort(api, tmp_path):
    """It was 201 with feasible_fraction 1.0 and a plan outside the band the whole horizon that pumped 67 % more
    than the baseline: issued as a set point, it would overfill the tanks."""
    from typer.testing import CliRunner

    from raytwin.cli import app
    from tests.fixtures_http import served

    client, auth, _, svc = api
    refused = client.post("/v1/assets/pump-1/recommendations", json=UNREACHABLE, headers=auth["writer"])
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "infeasible" and "h2 leaves its band [5, 6] m for 1800 of 1800 s" in error["message"]
    assert "widen the band, the control's box (q_in in [0, 0.0002]) or the horizon" in error["message"]
    assert "set best_effort to true" in error["message"]
    [violation] = error["details"]
    assert violation["outside_s"] == violation["baseline_outside_s"] == 1800.0
    assert 0.0 < violation["miss"] < violation["baseline_miss"]

    asked = client.post("/v1/assets/pump-1/recommendations", json={**UNREACHABLE, "best_effort": True},
                        headers=auth["writer"])
    assert asked.status_code == 201, asked.text
    answer = asked.json()
    assert answer["status"] == "best_effort" and answer["violations"] == [violation]
    assert answer["feasible_fraction"] == 0.0 and answer["recommended"]["outside_h2_s"] == 1800.0
    assert ("recommendation.create", "best_effort") in [(r.action, r.details.get("status"))
                                                        for r in svc.audit.records("acme")]
    request = tmp_path / "unreachable.json"
    request.write_text(json.dumps(UNREACHABLE))
    with served(client.app) as url:
        key = auth["writer"]["Authorization"].removeprefix("Bearer ")
        cli = CliRunner().invoke(app, ["recommend", "ask", "pump-1", str(request), "--api-url", url],
                                 env={"RAYTWIN_API_KEY": key})
        assert cli.exit_code == 1 and "error 422 infeasible: the constraints cannot be met" in cli.output, cli.output
        got = CliRunner().invoke(app, ["recommend", "get", "pump-1", answer["run_id"], "--api-url", url],
                                 env={"RAYTWIN_API_KEY": key})
        warned = f"recommendation {answer['run_id']}\nBEST EFFORT, the bands are not met"
        assert got.exit_code == 0 and got.stdout.startswith(warned), got.output


GRID = {"method": "grid", "dimensions": [{"name": "a1", "target": "param", "mode": "scale", "values": [1.0]}]}
SWEEP = {"horizon_s": 600.0, "step_s": 2.0, "inputs": {"q_in_mean": 1.0e-4, "q_in_swing": 0.0}, "space": GRID}
SCENARIO = {"horizon_s": 60.0, "step_s": 2.0, "inputs": {"q_in": {"kind": "constant", "value": 1.0e-4}}}


def test_a_twin_without_telemetry_has_no_live_state_to_run_from(api):
    """pump-0 never had an event: its "live" state is the asset's prior, and a recommendation (201), a sweep and a
    scenario (200, `start_time` the server's clock now) ran from it as if it were the twin's estimate now."""
    client, auth, _, _ = api
    for path, body in (("/v1/assets/pump-0/recommendations", REQUEST),
                       ("/v1/sweeps?mode=sync", {"asset_id": "pump-0", **SWEEP}),
                       ("/v1/scenarios?mode=sync", {"asset_id": "pump-0", **SCENARIO})):
        refused = client.post(path, json=body, headers=auth["writer"])
        assert refused.status_code == 409, (path, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "no_live_state" and error["details"] == [{"revision": 0, "event_time": None}]
        assert error["message"].startswith("twin pump-0 has applied no telemetry event yet: its state is only its "
                                           "prior (the asset's initial_state)"), error["message"]
        assert "give an explicit start_state" in error["message"]
    live = client.post("/v1/sweeps?mode=sync", json={"asset_id": "pump-1", **SWEEP}, headers=auth["writer"])
    assert live.status_code == 200 and datetime.fromisoformat(live.json()["start_time"]) == T0, live.text
    at = "2026-12-01T08:00:00Z"  # an explicit state's clock, as for a scenario
    explicit = client.post("/v1/assets/pump-0/recommendations", headers=auth["writer"],
                           json={**REQUEST, "start_state": {"h1": 0.5, "h2": 0.5}, "start_time": at})
    assert explicit.status_code == 201, explicit.text
    assert datetime.fromisoformat(explicit.json()["start_time"]) == datetime.fromisoformat(at)


def test_a_plan_and_a_sweep_from_a_drifting_twin_say_so(api, monkeypatch):
    """A twin whose drift alarm is latched (its model no longer explains the asset) gave a recommendation and a
    sweep exactly like a healthy twin's: they carry the warning now, in the answer, the run record read back and
    the issued command's value, which is what its approver sees."""
    client, auth, _, svc = api
    healthy = svc.twins

    class Drifting:
        async def state(self, tenant: str, asset_id: str, at=None) -> dict:
            twin = await healthy.state(tenant, asset_id, at)
            return {**twin, "divergence": {**twin["divergence"], "drift": True, "nis_mean": 531.0}}

    monkeypatch.setattr(svc, "twins", Drifting())
    r = client.post("/v1/assets/pump-1/recommendations", json={**REQUEST, "iterations": 20}, headers=auth["writer"])
    assert r.status_code == 201, r.text
    warning, = r.json()["warnings"]
    assert warning.startswith("twin pump-1's drift alarm is latched (NIS mean 531.0): its model no longer explains")
    rid = r.json()["run_id"]
    assert client.get(f"/v1/assets/pump-1/recommendations/{rid}", headers=auth["reader"]).json()["warnings"] == [
        warning]
    issued = client.post(f"/v1/assets/pump-1/recommendations/{rid}/issue", json={"connector": "site"},
                         headers=auth["writer"])
    assert issued.status_code == 201 and issued.json()["value"]["warnings"] == warning, issued.text
    monkeypatch.setattr(svc, "twins", healthy)
    assert client.post("/v1/assets/pump-1/recommendations", json={**REQUEST, "iterations": 20},
                       headers=auth["writer"]).json()["warnings"] == []


def test_no_recommendation_is_asked_for_or_issued_unaudited(api, recommendation):
    """Asking for a recommendation (a recorded run) and issuing one (a command proposed) were audited after they took
    place: a store failing in between left them with no record. Where the store cannot take the intent, nothing is
    run or proposed (503); done, each leaves its intent and its outcome with one action id."""
    from tests.fixtures_serve import AuditWrites

    client, auth, _, svc = api
    rid = recommendation["run_id"]
    runs = svc.config.url("runs", "acme")
    before = (svc.fs.find(runs), client.get("/v1/commands", headers=auth["reader"]).json())
    store, svc.audit.fs = svc.audit.fs, AuditWrites(svc.audit.fs, ok=0)
    try:
        asked = client.post("/v1/assets/pump-1/recommendations", json=REQUEST, headers=auth["writer"])
        issued = client.post(f"/v1/assets/pump-1/recommendations/{rid}/issue", json={"connector": "site"},
                             headers=auth["writer"])
    finally:
        svc.audit.fs = store
    for answer, audited in ((asked, "recommendation.create of pump-1"), (issued, "recommendation.issue of pump-1")):
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "store_unavailable", answer.text
        assert answer.json()["error"]["message"].startswith(f"{audited} was not done"), answer.text
    assert (svc.fs.find(runs), client.get("/v1/commands", headers=auth["reader"]).json()) == before

    issued = client.post(f"/v1/assets/pump-1/recommendations/{rid}/issue", json={"connector": "site"},
                         headers=auth["writer"]).json()
    records = svc.audit.records("acme", limit=10_000)
    by_id = {(r.action_id, r.phase): r for r in records if r.action_id is not None}
    for action, outcome in (("recommendation.create", lambda r: r.details.get("run_id") == rid),
                            ("recommendation.issue", lambda r: r.details.get("command_id") == issued["id"])):
        (done,) = [r for r in records if r.action == action and r.phase == "outcome" and outcome(r)]
        intent = by_id[(done.action_id, "intent")]
        assert (intent.action, intent.target) == (action, "pump-1") and intent.details.items() <= done.details.items()
    assert done.details["correlation_id"] == issued["correlation_id"] and intent.details["command_id"] == issued["id"]
