"""The HTTP API over real HTTP on loopback: Ray Serve with the app, httpx as the client."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from client import AsyncRayTwinClient, RayTwinClient, RetryPolicy
from raytwin.contracts import AssetType
from raytwin.signals import clock_seconds
from raytwin.sim import THERMAL_RC
from raytwin.sim.reference import model_rhs, reference_trajectory
from raytwin.storage import STALE_TEMP_S
from serve_apps.api import create_api
from serve_apps.json_route import MAX_JSON_DEPTH
from serve_apps.auth import create_key
from serve_apps.config import ServeConfig
from serve_apps.schemas import AssetCreate, AssetUpdate
from tests.fixtures_serve import deployed
from tests.ray_metrics import scrape, total, wait_until

THERMAL_TYPE = AssetType.from_model(THERMAL_RC).model_dump(mode="json")
T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
RATE_BURST = 60
PROBERS = 3
"""Reader keys of `test_credentials_are_checked_before_the_body`, taking turns by route: its ~120 requests of one
key emptied the key's bucket (`RATE_BURST`, 5/s) and the test waited ~13 s for refills; 3 keys need none."""


@pytest.fixture(scope="module")
def api(serve_proxy, tmp_path_factory):
    """The API on the shared Serve proxy, with keys for several tenants; yields (base URL, keys by name, data root)."""
    root = tmp_path_factory.mktemp("serve")
    keys_file = root / "keys.json"
    keys = {name: create_key(keys_file, tenant, role, owner=name)[1] for name, tenant, role in (
        ("admin", "acme", "admin"), ("writer", "acme", "writer"), ("reader", "acme", "reader"),
        ("other", "globex", "admin"), ("limited", "acme", "reader"),
        *((f"prober-{k}", "acme", "reader") for k in range(PROBERS)),
        ("readme", "initech", "admin"), ("motors", "motorco", "admin"),
        ("cas", "casco", "admin"), ("feeds", "feedco", "admin"), ("feeds-reader", "feedco", "reader"),
        ("drifts", "driftco", "admin"), ("drifts-reader", "driftco", "reader"),
        ("sdk", "sdkco", "admin"), ("sdk-readme", "sdkreadme", "admin"), ("fits", "fitco", "admin"),
    )}
    config = {"store_url": str(root / "store"), "keys_file": str(keys_file), "max_body_bytes": 64 * 1024,
              "rate_per_s": 5.0, "rate_burst": RATE_BURST, "sync_max_steps": 5_000, "twin_shards": 1,
              "namespace": "raytwin-serve-tests", "autoscaling": {"min_replicas": 1, "max_replicas": 1},
              "max_running_jobs_per_tenant": 2}  # acme's jobs use both slots (fair turns: tests/test_serve_jobs.py)
    left_by_killed_writers(root / "store")
    with deployed(config):
        yield serve_proxy, keys, root


KILLED = ".record.json.4242.{}.tmp"
"""The name `raytwin.storage.replace_file` gives its hidden file, with the hex of each of `left_by_killed_writers`."""


def left_by_killed_writers(store: Path) -> None:
    """What writers killed before their rename left in the store: a day old in the change log's folder, a minute old
    (a live writer's, maybe on another host) in the catalog's."""
    for folder, hex_, age_s in (("changes/acme", "a" * 32, STALE_TEMP_S + 100),
                                ("catalog/acme/assets", "b" * 32, 60.0)):
        path = store / folder / KILLED.format(hex_)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"{")
        os.utime(path, (time.time() - age_s,) * 2)


@pytest.fixture(scope="module")
def http(api):
    base = api[0]
    with httpx.Client(base_url=base, timeout=120.0) as client:
        yield client


def auth(api, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api[1][name]}"}


def assert_error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details", "request_id"}
    assert body["error"]["code"] == code and body["error"]["message"]
    assert body["error"]["request_id"] == resp.headers["x-raytwin-request-id"]
    return body["error"]


def _audited(api, http, answer: httpx.Response) -> list[dict]:
    """The audit records of the request `answer` answered (its request id): what a test reads of the tenant's log
    is its own, whichever tests ran before it."""
    request_id = answer.headers["x-raytwin-request-id"]
    return [r for r in http.get("/v1/audit", headers=auth(api, "admin")).json() if r.get("request_id") == request_id]


@pytest.fixture(scope="module")
def building(api, http):
    """An asset type, a building and a zone in it (tenant acme)."""
    admin = auth(api, "admin")
    r = http.post("/v1/asset-types", json=THERMAL_TYPE, headers=admin)
    assert r.status_code == 201, r.text
    for body in (
        {"id": "site-1", "type_name": "thermal_rc", "type_version": THERMAL_TYPE["version"]},
        {"id": "zone-1", "type_name": "thermal_rc", "type_version": THERMAL_TYPE["version"],
         "metadata": {"floor": "2"}, "relationships": [{"kind": "part_of", "target": "site-1"}],
         "initial_state": {"T_in": 293.0, "T_m": 292.0}},
    ):
        r = http.post("/v1/assets", json=body, headers=admin)
        assert r.status_code == 201, r.text
    return "zone-1"


def wild_events(n: int = 30, start: int = 10) -> list[dict]:
    """Telemetry for an asset's own route (no asset_id) whose T_in swings far from what its twin predicts: the twin's
    drift alarm latches."""
    return [{"sequence": start + k, "event_time": (T0 + timedelta(minutes=start + k)).isoformat(),
             "measurements": {"T_in": {"value": 280.0 if k % 2 else 320.0, "unit": "K"}}} for k in range(n)]


def events(n: int, start: int = 0, asset: str = "zone-1") -> list[dict]:
    return [{"asset_id": asset, "sequence": start + k, "event_time": (T0 + timedelta(minutes=start + k)).isoformat(),
             "measurements": {"T_in": {"value": 293.0 + 0.1 * k, "unit": "K"},
                              "T_out": {"value": 5.0, "unit": "degC"}}} for k in range(n)]


@pytest.fixture
def live_clock(api, http, building) -> None:
    """`building` with telemetry applied, so that it has a live state and its event time (where a run from "live" starts
    its clock; a twin without events has none: 409 `no_live_state`): the events `test_state_now_and_in_the_past`
    sends, sent again (duplicates after it, applied in a test run alone: it used to fail with no event time)."""
    report = http.post(f"/v1/assets/{building}/telemetry", json={"events": events(3, start=10)},
                       headers=auth(api, "writer")).json()
    assert report["accepted"] + report["duplicates"] == 3, report


# --------------------------------------------------------------------------------- tests ----
def test_openapi_is_committed_and_served(http):
    committed = json.loads((Path(__file__).parents[1] / "serve_apps" / "openapi.json").read_text())
    assert committed == create_api().openapi(), "regenerate with `raytwin serve openapi --out serve_apps/openapi.json`"
    served = http.get("/openapi.json")
    assert served.status_code == 200 and served.json()["paths"].keys() == committed["paths"].keys()
    assert http.get("/v1/health").json()["status"] == "ok"


def test_authentication_and_roles(api, http, building):
    assert http.get("/v1/health").json() == {"status": "ok"}  # liveness: no tenant's activity to anyone
    own = http.get("/v1/health", headers={"X-API-Key": api[1]["reader"]}).json()
    listed = http.get("/v1/assets", headers={"X-API-Key": api[1]["reader"]}).json()["assets"]
    assert own["tenant"] == "acme" and own["live_twins"] == len(listed) > 0 and "queued" in own["jobs"]
    other = http.get("/v1/health", headers={"X-API-Key": api[1]["other"]}).json()
    assert other["tenant"] == "globex" and other["live_twins"] < own["live_twins"]
    assert_error(http.get("/v1/health", headers={"X-API-Key": "rtk_nope_nope"}), 401, "unauthorized")  # not "ok"
    assert_error(http.get("/v1/assets"), 401, "unauthorized")
    assert_error(http.get("/v1/assets", headers={"Authorization": "Bearer rtk_nope_nope"}), 401, "unauthorized")
    assert http.get("/v1/assets", headers={"X-API-Key": api[1]["reader"]}).status_code == 200
    body = {"id": "zone-9", "type_name": "thermal_rc", "type_version": THERMAL_TYPE["version"]}
    assert_error(http.post("/v1/assets", json=body, headers=auth(api, "writer")), 403, "forbidden")
    assert_error(http.post(f"/v1/assets/{building}/telemetry", json={"events": events(1)},
                           headers=auth(api, "reader")), 403, "forbidden")


def test_asset_types_name_only_fmus_stored_in_the_servers_registry(api, http):
    """Validating an asset type resolves its simulator: an FMU URL outside the server's registry must
    be refused before anything is fetched (no server-side request forgery)."""
    for url in (f"http://169.254.169.254/latest/{'0' * 64}.fmu", f"/etc/{'1' * 64}.fmu",
                f"{api[2]}/store/registry/acme/../../../etc/{'2' * 64}.fmu"):
        err = assert_error(http.post("/v1/asset-types", json={**THERMAL_TYPE, "simulator": url},
                                     headers=auth(api, "admin")), 422, "invalid_request")
        assert "opens only FMUs stored in its registry" in err["message"], err
    kelvins = {**THERMAL_TYPE, "name": "zone_c", "states": {**THERMAL_TYPE["states"], "T_in": {"unit": "degC"}}}
    err = assert_error(http.post("/v1/asset-types", json=kelvins, headers=auth(api, "admin")), 422, "invalid_request")
    assert "states.T_in: unit 'degC' is not the simulator's 'K'" in err["message"], err  # its model computes in K


def test_a_type_version_the_registry_holds_as_another_model_is_refused_with_nothing_published(api, http):
    """A version fitted into the tenant's registry (a calibration's `register_as`) and then published as a type
    whose defaults differ: the catalog was written before the registry refused it (500), the same POST again
    answered 200, and twins on the version ran the fitted parameters, not the published ones."""
    from raytwin.registry import ModelRegistry

    fits, ref = auth(api, "fits"), "thermal_rc@1.1.0"
    published = {**THERMAL_TYPE, "version": "1.1.0"}
    fitted = {n: (p["default"] + p["upper"]) / 2 for n, p in THERMAL_TYPE["parameters"].items()}
    registered = ModelRegistry(str(Path(api[2]) / "store" / "registry" / "fitco")).register(
        "thermal_rc", "1.1.0", AssetType.model_validate(published), fitted, metadata={"calibrated_from": "a fit"})
    for _ in range(2):  # the same answer again: nothing was written the first time
        err = assert_error(http.post("/v1/asset-types", json=published, headers=fits), 409, "conflict")
        assert err["message"].startswith(f"asset type {ref} was not published: the tenant's model registry holds "
                                         f"{ref} as another model (parameter ")
        for name, spec in THERMAL_TYPE["parameters"].items():
            assert f"parameter {name}: registered {registered.parameters[name]}, new {spec['default']}" in \
                err["message"] and err["details"]
        assert f"publish {ref} with defaults equal to its parameters (" in err["message"]
        assert "POST /v1/models/thermal_rc/versions/1.1.0/transitions" in err["message"]
        assert http.get("/v1/asset-types?name=thermal_rc", headers=fits).json()["asset_types"] == []
        assert_error(http.post("/v1/assets", json={"id": "fit-1", "type_name": "thermal_rc", "type_version": "1.1.0"},
                               headers=fits), 422, "invalid_request")
    resolved = {**published, "parameters": {n: {**p, "default": registered.parameters[n]}
                                            for n, p in THERMAL_TYPE["parameters"].items()}}
    assert http.post("/v1/asset-types", json=resolved, headers=fits).status_code == 201  # the registered model
    assert http.post("/v1/assets", json={"id": "fit-1", "type_name": "thermal_rc", "type_version": "1.1.0"},
                     headers=fits).status_code == 201


def test_catalog_crud_and_queries(api, http, building):
    admin = auth(api, "admin")
    assert http.post("/v1/asset-types", json=THERMAL_TYPE, headers=admin).status_code == 200  # identical: no-op
    changed = {**THERMAL_TYPE, "description": "changed"}
    assert_error(http.post("/v1/asset-types", json=changed, headers=admin), 409, "conflict")
    assert [t["name"] for t in http.get("/v1/asset-types", headers=admin).json()["asset_types"]] == ["thermal_rc"]

    zone = http.get(f"/v1/assets/{building}", headers=admin).json()
    assert zone["tenant"] == "acme" and zone["metadata"] == {"floor": "2"}
    parts = http.get("/v1/assets", params={"related_to": "site-1", "relationship": "part_of"},
                     headers=admin).json()["assets"]
    assert [a["id"] for a in parts] == [building]
    assert http.get("/v1/assets", params={"relationship": "feeds"}, headers=admin).json() == {"assets": [],
                                                                                              "next_cursor": None}
    related = http.get("/v1/assets/site-1/relationships", headers=admin).json()
    assert related["incoming"] == [{"kind": "part_of", "source": building}]

    assert_error(http.delete("/v1/assets/site-1", headers=admin), 409, "conflict")  # zone-1 points at it
    assert_error(http.delete(f"/v1/asset-types/thermal_rc/{THERMAL_TYPE['version']}", headers=admin), 409, "conflict")
    update = {"type_name": "thermal_rc", "type_version": THERMAL_TYPE["version"], "metadata": {"floor": "3"},
              "relationships": [{"kind": "part_of", "target": "site-1"}]}
    assert http.put(f"/v1/assets/{building}", json=update, headers=admin).json()["metadata"] == {"floor": "3"}
    missing = {**update, "relationships": [{"kind": "feeds", "target": "nowhere"}]}
    assert_error(http.put(f"/v1/assets/{building}", json=missing, headers=admin), 422, "invalid_request")

    bad_start = {"id": "tmp-1", "type_name": "thermal_rc", "type_version": THERMAL_TYPE["version"],
                 "initial_state": {"T_in": 293.0}}
    assert_error(http.post("/v1/assets", json=bad_start, headers=admin), 422, "invalid_request")
    assert_error(http.get("/v1/assets/tmp-1", headers=admin), 404, "not_found")  # rolled back
    bad_filter = {**bad_start, "initial_state": None, "metadata": {"filter": "particle"}}
    err = assert_error(http.post("/v1/assets", json=bad_filter, headers=admin), 422, "invalid_request")
    assert "filter='particle' is not a filter; known: ['ekf', 'ukf']" in err["message"]
    assert_error(http.get("/v1/assets/tmp-1", headers=admin), 404, "not_found")
    for metadata, reason in [  # whatever the twin's filter would refuse is the client's to fix, said up front
        ({"measurement_std.T_in": "loud"}, "measurement_std.T_in='loud': not a number"),
        ({"process_std.T_nope": "0.1"}, "process_std.*: unknown name(s) ['T_nope']; expected ['T_in', 'T_m']"),
        ({"measurement_std.T_in": "-0.5"}, "measurement_std.*: {'T_in': -0.5} must be finite and >= 0"),
    ]:
        err = assert_error(http.post("/v1/assets", json={**bad_filter, "metadata": metadata}, headers=admin), 422,
                           "invalid_request")
        assert reason in err["message"], err["message"]
        assert_error(http.get("/v1/assets/tmp-1", headers=admin), 404, "not_found")
    hot = {**bad_start, "initial_state": {"T_in": 2930.0, "T_m": 292.0}}  # its telemetry would be refused there
    err = assert_error(http.post("/v1/assets", json=hot, headers=admin), 422, "invalid_request")
    assert "initial_state.T_in=2930 K outside the plausible range [173.15, 473.15] K" in err["message"], err["message"]
    assert_error(http.get("/v1/assets/tmp-1", headers=admin), 404, "not_found")
    err = assert_error(http.put(f"/v1/assets/{building}", json={**update, "metadata": {"input.T_out": "cold"}},
                                headers=admin), 422, "invalid_request")
    assert "input.T_out='cold': not a number" in err["message"]
    assert http.get(f"/v1/assets/{building}", headers=admin).json()["metadata"] == {"floor": "3"}  # unchanged
    r = http.post("/v1/assets", json={"id": "tmp-1", "type_name": "thermal_rc",
                                      "type_version": THERMAL_TYPE["version"]}, headers=admin)
    assert r.status_code == 201
    assert http.delete("/v1/assets/tmp-1", headers=admin).status_code == 204
    assert_error(http.get("/v1/assets/tmp-1", headers=admin), 404, "not_found")
    assert not (api[2] / "store/catalog/acme/assets/tmp-1.json").exists()  # its tombstone gone with its change logged


def test_the_backend_removes_what_killed_writers_left_and_no_live_writers_file(api):
    """A killed writer's hidden file stayed for good; the backend's start removes those a day old (`STALE_TEMP_S`),
    never a younger one (a live writer's, here or on another host)."""
    store = api[2] / "store"
    deadline = time.monotonic() + 30.0
    while (store / "changes/acme" / KILLED.format("a" * 32)).exists():
        assert time.monotonic() < deadline, "the backend's sweep left a day-old temp file"
        time.sleep(0.1)
    assert (store / "catalog/acme/assets" / KILLED.format("b" * 32)).exists()


def test_tenant_isolation_is_404(api, http, building):
    other = auth(api, "other")
    absent = assert_error(http.get("/v1/assets/no-such-asset", headers=other), 404, "not_found")
    foreign = assert_error(http.get(f"/v1/assets/{building}", headers=other), 404, "not_found")
    assert foreign["message"].replace(building, "X") == absent["message"].replace("no-such-asset", "X")
    assert http.get("/v1/assets", headers=other).json()["assets"] == []
    assert_error(http.get(f"/v1/assets/{building}/state", headers=other), 404, "not_found")
    assert_error(http.post(f"/v1/assets/{building}/telemetry", json={"events": events(1)}, headers=other),
                 404, "not_found")
    scenario = {"asset_id": building, "start_state": "live", "horizon_s": 600, "step_s": 60,
                "inputs": {"T_out": {"kind": "constant", "value": 278.0, "unit": "K"},
                           "Q_h": {"kind": "constant", "value": 0.0, "unit": "W"},
                           "Q_sol": {"kind": "constant", "value": 0.0, "unit": "W"}}}
    assert_error(http.post("/v1/scenarios", json=scenario, headers=other), 404, "not_found")
    assert_error(http.delete(f"/v1/assets/{building}", headers=other), 404, "not_found")


def test_telemetry_is_validated_and_idempotent(api, http, building):
    writer = auth(api, "writer")
    batch = events(5)
    batch.append({"sequence": 99, "event_time": T0.isoformat(), "measurements": {"pressure": {"value": 1.0,
                                                                                              "unit": "Pa"}}})
    first = http.post(f"/v1/assets/{building}/telemetry", json={"events": batch}, headers=writer)
    assert first.status_code == 200, first.text
    report = first.json()
    assert (report["accepted"], report["duplicates"], report["rejected"]) == (5, 0, 1)
    assert report["reasons"][0]["index"] == 5 and "pressure" in report["reasons"][0]["reason"]
    again = http.post(f"/v1/assets/{building}/telemetry", json={"events": batch}, headers=writer).json()
    assert (again["accepted"], again["duplicates"], again["rejected"]) == (0, 5, 1)
    # every rejected event is named by its position, whichever check refused it (the API's or the twin's)
    conflicting = {**batch[1], "measurements": {"T_in": {"value": 99.0, "unit": "degC"}}}
    old = {**batch[0], "sequence": 7, "event_time": (T0 - timedelta(hours=2)).isoformat()}
    mixed = http.post(f"/v1/assets/{building}/telemetry", headers=writer,
                      json={"events": [batch[5], conflicting, events(1, start=6)[0], old]}).json()
    assert (mixed["accepted"], mixed["rejected"]) == (1, 3)
    (invalid, conflict, late) = mixed["reasons"]
    assert [invalid["index"], conflict["index"], late["index"]] == [0, 1, 3] and "'pressure'" in invalid["reason"]
    assert conflict["reason"].startswith("conflict: ") and late["reason"].startswith("too late: event time ")
    assert "send events within the lateness window" in late["reason"]


def test_state_now_and_in_the_past(api, http, building):
    writer, reader = auth(api, "writer"), auth(api, "reader")
    # the telemetry test's first events again (duplicates after it), for a past state to read in a run of this alone
    http.post(f"/v1/assets/{building}/telemetry", json={"events": [*events(5), *events(3, start=10)]}, headers=writer)
    now = http.get(f"/v1/assets/{building}/state", headers=reader).json()
    assert now["asset_id"] == building and set(now["state"]) == {"T_in", "T_m"}
    assert datetime.fromisoformat(now["event_time"]) == T0 + timedelta(minutes=12)
    assert len(now["covariance"]) == 2 and now["revision"] >= 8
    past = http.get(f"/v1/assets/{building}/state", params={"at": (T0 + timedelta(minutes=2)).isoformat()},
                    headers=reader).json()
    assert past["revision"] < now["revision"]
    assert datetime.fromisoformat(past["event_time"]) <= T0 + timedelta(minutes=2)
    drift = http.get(f"/v1/assets/{building}/divergence", headers=reader).json()
    assert {"nis_mean", "drift", "residual_rms"} <= set(drift)
    assert_error(http.get(f"/v1/assets/{building}/state", params={"at": "yesterday"}, headers=reader),
                 422, "invalid_request")
    future = (datetime.now(UTC) + timedelta(days=365)).isoformat()  # answered with today's state, as if known
    err = assert_error(http.get(f"/v1/assets/{building}/state", params={"at": future}, headers=reader), 422,
                       "invalid_request")
    assert "is after the server's time" in err["message"]


def test_state_reads_see_writes_through_the_same_replica(api, http, building):
    """Reads may share a cached shard reply (state_cache_s), but never hide this replica's own writes."""
    writer, reader = auth(api, "writer"), auth(api, "reader")
    url = f"/v1/assets/{building}/state"
    before = http.get(url, headers=reader).json()["revision"]
    report = http.post(f"/v1/assets/{building}/telemetry", json={"events": events(2, start=30)}, headers=writer).json()
    assert report["accepted"] == 2
    assert http.get(url, headers=reader).json()["revision"] == before + 2
    assert_error(http.get(f"/v1/assets/{building}/state", headers=auth(api, "other")), 404, "not_found")


def test_http_targets_name_the_proxy_without_direct_ingress(api):
    from serve_apps.endpoints import http_targets

    assert [port for _, port in http_targets("raytwin")] == [int(api[0].rsplit(":", 1)[1])]


def _scenario(asset: str, n_steps: int, start_state="live") -> dict:
    return {"asset_id": asset, "start_state": start_state, "horizon_s": 60.0 * n_steps, "step_s": 60.0,
            "inputs": {"T_out": {"kind": "constant", "value": 5.0, "unit": "degC"},
                       "Q_h": {"kind": "schedule", "period_s": 3600.0, "starts_s": [0.0, 1800.0],
                               "values": [2000.0, 0.0], "unit": "W"},
                       "Q_sol": {"kind": "constant", "value": 0.0, "unit": "W"}},
            "parameter_overrides": {"R_io": 0.02}}


@pytest.mark.usefixtures("live_clock")
def test_sync_scenario_matches_an_independent_solver(api, http, building):
    x0 = {"T_in": 294.0, "T_m": 291.0}
    r = http.post("/v1/scenarios", json=_scenario(building, 120, x0), headers=auth(api, "writer"))
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["model_ref"] == f"thermal_rc@{THERMAL_TYPE['version']}" and len(run["content_hash"]) == 64
    got = np.column_stack([run["states"]["T_in"], run["states"]["T_m"]])
    params = THERMAL_RC.param_vector({"R_io": 0.02})
    t = 60.0 * np.arange(120)
    inputs = np.column_stack([np.full(120, 278.15), np.where(t % 3600 < 1800, 2000.0, 0.0), np.zeros(120)])
    ref = reference_trajectory(model_rhs(THERMAL_RC, params), np.array([294.0, 291.0]), inputs, 60.0)
    assert np.max(np.abs(got - ref)) < 1e-6
    assert np.max(np.abs(got[-1] - got[0])) > 0.1  # the scenario actually moved the state
    records = _audited(api, http, r)
    assert records and {(a["action"], a["tenant"], a["target"]) for a in records} == {
        ("scenario.run", "acme", building)}
    assert records[0]["details"]["model_ref"] == run["model_ref"] and len(records[0]["details"]["content_hash"]) == 64
    assert "jax" in records[0]["details"]["versions"] and records[0]["key_id"]
    assert "key" not in json.dumps(records).replace("key_id", "")  # the key id, never the key

    live = http.post("/v1/scenarios", json=_scenario(building, 10), headers=auth(api, "writer")).json()
    state = http.get(f"/v1/assets/{building}/state", headers=auth(api, "reader")).json()
    assert live["start_state"] == pytest.approx(state["state"])

    # a clock signal from the live state follows the wall clock of the state's time, not of midnight
    clocked = _scenario(building, 120)
    clocked["inputs"]["Q_h"] = {**clocked["inputs"]["Q_h"], "period_s": 25200.0, "starts_s": [0.0, 12600.0],
                                "clock": True}
    run = http.post("/v1/scenarios", json=clocked, headers=auth(api, "writer")).json()
    clock_s = clock_seconds(datetime.fromisoformat(state["event_time"]))
    assert clock_s % 25200.0 != 0.0  # else the clock would not show
    t = clock_s + 60.0 * np.arange(120)
    inputs = np.column_stack([np.full(120, 278.15), np.where(t % 25200 < 12600, 2000.0, 0.0), np.zeros(120)])
    x0 = np.array([run["start_state"]["T_in"], run["start_state"]["T_m"]])
    ref = reference_trajectory(model_rhs(THERMAL_RC, params), x0, inputs, 60.0)
    assert np.max(np.abs(np.column_stack([run["states"]["T_in"], run["states"]["T_m"]]) - ref)) < 1e-6

    # from an explicit state, start_time is where its clock starts (it was ignored: a Monday midnight)
    at = datetime(2026, 12, 3, 13, 0, 7, tzinfo=UTC)
    explicit = {**clocked, "start_state": {"T_in": 294.0, "T_m": 291.0}, "start_time": at.isoformat()}
    run = http.post("/v1/scenarios", json=explicit, headers=auth(api, "writer")).json()
    assert datetime.fromisoformat(run["start_time"]) == at  # the clock it ran on, echoed
    t = clock_seconds(at) + 60.0 * np.arange(120)
    inputs = np.column_stack([np.full(120, 278.15), np.where(t % 25200 < 12600, 2000.0, 0.0), np.zeros(120)])
    ref = reference_trajectory(model_rhs(THERMAL_RC, params), np.array([294.0, 291.0]), inputs, 60.0)
    assert np.max(np.abs(np.column_stack([run["states"]["T_in"], run["states"]["T_m"]]) - ref)) < 1e-6


def wait_for(http, job_id: str, headers: dict) -> dict:
    deadline = time.monotonic() + 180
    while (job := http.get(f"/v1/jobs/{job_id}", headers=headers).json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    return job


def _run_started(root: Path, before: set[Path]) -> str:
    """The id of a run, not among `before`, that began (its output folder made: it records itself whatever its end),
    waited for: a loaded machine may take many seconds to start one."""
    deadline = time.monotonic() + 180
    while not (began := [d.name for d in root.glob("store/runs/acme/*") if d not in before and (d / "output").is_dir()]):
        assert time.monotonic() < deadline, "no sweep run began within 180 s"
        time.sleep(0.2)
    return began[0]


def download(http, job_id: str, headers: dict) -> pa.Table:
    """A job's part files as one table, each checked against the SHA-256 its job recorded (a sweep's run record's), as
    its file listing names it too."""
    files = http.get(f"/v1/jobs/{job_id}/files", headers=headers).json()
    parts = [f for f in files if f["name"].startswith("part-")]
    assert parts
    answers = [http.get(f"/v1/jobs/{job_id}/files/{f['name']}", headers=headers) for f in parts]
    assert all(a.headers["X-RayTwin-SHA256"] == hashlib.sha256(a.content).hexdigest() == f["sha256"]
               for a, f in zip(answers, parts, strict=True))
    return pa.concat_tables(pq.read_table(pa.BufferReader(a.content)) for a in answers)


def test_async_scenario_job_runs_to_completion(api, http, building):
    writer = auth(api, "writer")
    x0 = {"T_in": 294.0, "T_m": 291.0}
    r = http.post("/v1/scenarios", params={"mode": "async"}, json=_scenario(building, 100, x0), headers=writer)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    records = _audited(api, http, r)
    assert {a["action"] for a in records} == {"scenario.submit"} and job_id in {a["details"].get("job_id")
                                                                               for a in records}
    job = wait_for(http, job_id, writer)
    assert job["state"] == "succeeded" and job["kind"] == "scenario", job
    assert job["results_url"] == f"/v1/jobs/{job_id}/results" and str(api[2]) not in json.dumps(job)  # no store path
    summary = http.get(job["results_url"], headers=writer).json()
    sync = http.post("/v1/scenarios", json=_scenario(building, 100, x0), headers=writer).json()
    assert summary["rows"][0]["T_in_final"] == pytest.approx(sync["states"]["T_in"][-1], rel=1e-12)
    assert summary["rows"][0]["T_m_max"] == pytest.approx(max(sync["states"]["T_m"]), rel=1e-12)
    table = download(http, job_id, writer)
    assert table.num_rows == 1 and table.column("param.R_io")[0].as_py() == 0.02
    assert_error(http.get(f"/v1/jobs/{job_id}", headers=auth(api, "other")), 404, "not_found")
    assert_error(http.get(f"/v1/jobs/{job_id}/files/../../keys.json", headers=writer), 404, "not_found")


def _sweep(asset: str, space: dict) -> dict:
    return {"asset_id": asset, "horizon_s": 6 * 3600.0, "step_s": 60.0, "space": space,
            "inputs": {"setpoint": 294.15}}


@pytest.mark.usefixtures("live_clock")
def test_sweeps_from_live_state_sync_and_async(api, http, building):
    writer = auth(api, "writer")
    grid = {"method": "grid", "dimensions": [{"name": "R_io", "target": "param", "mode": "scale",
                                              "values": [0.8, 1.0, 1.25]}]}
    r = http.post("/v1/sweeps", params={"mode": "sync"}, json=_sweep(building, grid), headers=writer)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["scenarios"] == 3 and len(result["rows"]) == 3 and result["run_id"]
    (done,) = [a for a in _audited(api, http, r) if a["action"] == "sweep.run" and a.get("phase") == "outcome"]
    assert (done["details"]["run_id"], done["details"]["sweep"]["space"]["method"]) == (result["run_id"], "grid")
    peaks = np.array([row["T_in_max"] for row in result["rows"]])
    band = next(q for q in result["quantiles"] if q["metric"] == "T_in_max")
    assert band["q0.5"] == pytest.approx(np.quantile(peaks, 0.5)) and band["count"] == 3
    energy = [row["energy_kwh"] for row in result["rows"]]
    assert energy[0] > energy[1] > energy[2]  # a leakier envelope (smaller R_io) needs more heating
    live = http.get(f"/v1/assets/{building}/state", headers=auth(api, "reader")).json()["state"]
    record = next(Path(api[2]).glob(f"store/runs/acme/{result['run_id']}/run.json"))
    assert json.loads(record.read_text())["spec"]["start_state"] == pytest.approx(live)
    state_now = http.get(f"/v1/assets/{building}/state", headers=auth(api, "reader"))
    event_time, started_from = state_now.json()["event_time"], (state_now.json()["revision"], state_now.headers["etag"])
    recorded = json.loads(record.read_text())["spec"]["start_time"]  # the kit's daily signals start there
    assert datetime.fromisoformat(recorded) == datetime.fromisoformat(event_time)
    assert datetime.fromisoformat(result["start_time"]) == datetime.fromisoformat(event_time)  # and it says so
    assert (result["start_revision"], result["start_etag"]) == started_from  # which state: compare with its ETag
    at = datetime(2026, 12, 3, 13, 0, 7, tzinfo=UTC)
    explicit = {**_sweep(building, grid), "start_state": {"T_in": 294.0, "T_m": 291.0}, "start_time": at.isoformat()}
    r = http.post("/v1/sweeps", params={"mode": "sync"}, json=explicit, headers=writer)
    assert r.status_code == 200 and datetime.fromisoformat(r.json()["start_time"]) == at, r.text
    assert r.json()["start_revision"] is None and r.json()["start_etag"] is None  # no twin state
    # site-1 never had an event: its prior ran as the live state, stamped with the server's clock now
    never = assert_error(http.post("/v1/sweeps", params={"mode": "sync"}, json=_sweep("site-1", grid), headers=writer),
                         409, "no_live_state")
    assert never["message"].startswith("twin site-1 has applied no telemetry event yet") and never["details"] == [
        {"revision": 0, "event_time": None}], never

    lhs = {"method": "lhs", "n": 40, "seed": 7, "dimensions": [
        {"name": "T_out_mean", "target": "input", "low": 268.0, "high": 283.0},
        {"name": "C_in", "target": "param", "mode": "scale", "low": 0.7, "high": 1.3}]}
    r = http.post("/v1/sweeps", params={"mode": "async"}, json=_sweep(building, lhs), headers=writer)
    assert r.status_code == 202, r.text
    assert "sweep.submit" in {a["action"] for a in _audited(api, http, r)}
    job = wait_for(http, r.json()["job_id"], writer)
    assert job["state"] == "succeeded" and job["kind"] == "sweep" and job["run_id"], job
    assert datetime.fromisoformat(job["start_time"]) == datetime.fromisoformat(event_time)
    assert (job["start_revision"], job["start_etag"]) == started_from
    with RayTwinClient(api[0], api[1]["writer"]) as sdk:  # the SDK's answer carries the clock and the state too
        answered = sdk.job_results(job["job_id"], limit=0)
        assert answered.start_time == datetime.fromisoformat(event_time)
        assert (answered.start_revision, answered.start_etag) == started_from
    table = download(http, job["job_id"], writer)
    assert table.num_rows == 40 and sorted(table.column("scenario").to_pylist()) == list(range(40))
    assert {"input.T_out_mean", "param.C_in", "T_in_min"} <= set(table.column_names)

    # retention removes the run record with its output (keep_runs): the job's results answered 500, not 410
    status = f"/v1/jobs/{job['job_id']}"
    assert job["results_removed"] is False
    shutil.rmtree(Path(api[2]) / "store" / "runs" / "acme" / job["run_id"])  # as `raytwin.lifecycle.prune` does
    assert http.get(status, headers=writer).json()["results_removed"] is True
    for path in (f"{status}/results", f"{status}/files", f"{status}/files/part-000000.parquet"):
        assert "submit the sweep again" in assert_error(http.get(path, headers=writer), 410, "gone")["message"]


@pytest.mark.usefixtures("live_clock")  # a twin without telemetry has no live state to run from
def test_queued_and_running_jobs_can_be_cancelled(api, http, building):
    """There was no way to stop a job short of stopping the server (DELETE 405, no cancel route)."""
    writer = auth(api, "writer")
    lhs = {"method": "lhs", "n": 10_000, "seed": 3, "dimensions": [{"name": "R_io", "target": "param",
                                                                     "mode": "scale", "low": 0.5, "high": 1.5}]}
    long = {**_sweep(building, lhs), "horizon_s": 60.0 * 1_000_000}  # 1e10 scenario-steps: minutes
    runs_before = set(Path(api[2]).glob("store/runs/acme/*"))
    submitted = [http.post("/v1/sweeps", params={"mode": "async"}, json=long, headers=writer) for _ in range(3)]
    assert all(r.status_code == 202 for r in submitted), submitted[0].text
    ids = [r.json()["job_id"] for r in submitted]  # two run (max_concurrent_jobs), one waits
    queued = http.post(f"/v1/jobs/{ids[2]}/cancel", headers=writer)
    assert queued.status_code == 200 and queued.json()["state"] == "cancelled", queued.text
    assert_error(http.post(f"/v1/jobs/{ids[2]}/cancel", headers=writer), 409, "conflict")
    assert_error(http.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(api, "other")), 404, "not_found")
    assert_error(http.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(api, "reader")), 403, "forbidden")
    started = _run_started(Path(api[2]), runs_before)  # so that a run record is there to say it was cancelled
    for job_id in ids[:2]:
        assert http.post(f"/v1/jobs/{job_id}/cancel", headers=writer).status_code == 200
    linked = []  # a cancelled job showed run_id null: its user could not find the run record saying so
    for job_id in ids:
        job = wait_for(http, job_id, writer)
        assert job["state"] == "cancelled" and job["error"].startswith("cancelled by key "), job
        assert_error(http.get(f"/v1/jobs/{job_id}/results", headers=writer), 409, "conflict")
        if job["run_id"] is None:  # its run never began: the job says so
            assert job["error"].endswith("so it has no run record"), job
        else:
            run = http.get(f"/v1/runs/{job['run_id']}", headers=auth(api, "reader"))
            assert run.status_code == 200 and run.json()["status"] == "cancelled", run.text
            linked.append(job["run_id"])
    assert "while queued: it never ran" in http.get(f"/v1/jobs/{ids[2]}", headers=writer).json()["error"]
    records = [json.loads(p.read_text()) for p in Path(api[2]).glob("store/runs/acme/*/run.json")]
    mine = [r for r in records if r["spec"]["horizon_s"] == long["horizon_s"]]
    assert started in {r["run_id"] for r in mine} and {r["status"] for r in mine} == {"cancelled"}, mine  # a run
    # that started recorded itself cancelled
    assert sorted(linked) == sorted(r["run_id"] for r in mine)  # each run record is linked from its job
    audit = http.get("/v1/audit", headers=auth(api, "admin")).json()
    cancels = [r["details"]["status"] for r in audit if r["action"] == "job.cancel" and r.get("phase") == "outcome"]
    assert cancels == ["done", "refused", "done", "done"]  # each after its intent; the 409 too


def test_an_errors_request_id_is_in_the_ingress_replicas_log_as_the_runbook_says(api, http):
    """The request id of an error body was in no log: Serve's access log carries Serve's own x-request-id. The
    Ingress writes one line per error under RayTwin's id, in the Ray logs of the node it runs on (ops/README.md)."""
    import ray

    denied = assert_error(http.post("/v1/asset-types", json={}, headers=auth(api, "reader")), 403, "forbidden")
    request_id = denied["request_id"]
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    deadline, found = time.monotonic() + 30, []
    while not found and time.monotonic() < deadline:
        found = [line for path in logs.rglob("*") if path.is_file()
                 for line in path.read_text(errors="replace").splitlines() if f"request_id={request_id}" in line]
        time.sleep(0.5)
    assert len(found) == 1, found  # one line, not a copy per handler
    assert "route=/v1/asset-types method=POST status=403 tenant=acme" in found[0], found


@pytest.mark.usefixtures("live_clock")  # a twin without telemetry has no live state to run from
def test_limits_and_error_shapes(api, http, building):
    writer = auth(api, "writer")
    big = {"events": events(1) * 2000}
    err = assert_error(http.post(f"/v1/assets/{building}/telemetry", json=big, headers=writer), 413,
                       "payload_too_large")
    assert "split it into smaller requests" in err["message"] and "max_body_bytes" in err["message"], err  # how to fix it, not only why

    def chunks():  # no Content-Length: the streamed size is what counts
        for _ in range(100):
            yield b" " * 1024

    streamed = http.post(f"/v1/assets/{building}/telemetry", content=chunks(),
                         headers={**writer, "Content-Type": "application/json"})
    assert_error(streamed, 413, "payload_too_large")
    bad = http.post(f"/v1/assets/{building}/telemetry", content=b'{"events": [', headers={
        **writer, "Content-Type": "application/json"})
    err = assert_error(bad, 422, "invalid_request")
    assert err["details"][0]["type"] == "json_invalid"
    assert_error(http.post("/v1/scenarios", json={"asset_id": building}, headers=writer), 422, "invalid_request")
    too_big = _scenario(building, 10_000, {"T_in": 294.0, "T_m": 291.0})
    assert_error(http.post("/v1/scenarios", params={"mode": "sync"}, json=too_big, headers=writer),
                 422, "invalid_request")
    # a sweep nobody could stop: 10,000 scenarios of 2e9 steps took 7.9 GB in a minute; one of 1e9 "succeeded"
    grid = {"method": "grid", "dimensions": [{"name": "R_io", "target": "param", "mode": "scale",
                                              "values": [0.9 + 0.01 * k for k in range(20)]}]}
    endless = {**_sweep(building, grid), "horizon_s": 60.0 * 2e9}
    err = assert_error(http.post("/v1/sweeps", params={"mode": "async"}, json=endless, headers=writer), 413,
                       "payload_too_large")
    assert "40,000,000,000 scenario-steps exceed the limit of 10,000,000,000" in err["message"]
    single = {**_sweep(building, {**grid, "dimensions": [{**grid["dimensions"][0], "values": [1.0]}]}),
              "horizon_s": 60.0 * 1e9}
    err = assert_error(http.post("/v1/sweeps", params={"mode": "async"}, json=single, headers=writer), 422,
                       "invalid_request")
    assert "beyond 16777216 steps (2^24" in err["message"]
    assert http.get("/v1/health").status_code == 200  # the replica survived all of it


def test_rate_limit_per_key(api, http):
    limited = auth(api, "limited")
    for _ in range(10 * RATE_BURST):  # drains unless requests are slower than the refill (5/s)
        r = http.get("/v1/asset-types", headers=limited)
        if r.status_code != 200:
            break
    assert_error(r, 429, "rate_limited")
    assert int(r.headers["Retry-After"]) >= 1
    assert http.get("/v1/asset-types", headers=auth(api, "reader")).status_code == 200  # other keys unaffected


def test_metrics_reach_rays_export_exactly(api, http, building, ray_metrics_port):
    """The API's metrics are Ray metrics: Ray's export shows each request, event and refusal once."""
    route = {"route": "/v1/assets/{asset_id}", "method": "GET", "status": "200"}
    before = scrape(ray_metrics_port)
    http.get(f"/v1/assets/{building}", headers=auth(api, "reader"))
    bad = {**events(1, start=60)[0], "measurements": {"T_in": {"value": 1.0, "unit": "furlong"}}}  # no unit
    misfit = {**events(1, start=61)[0], "measurements": {"T_in": {"value": 1.0, "unit": "W"}}}  # not a temperature
    http.post(f"/v1/assets/{building}/telemetry", json={"events": [*events(2, start=50), bad, misfit]},
              headers=auth(api, "writer"))

    def grown(name: str, by: int, **labels: str):
        return lambda s: total(s, name, **labels) >= total(before, name, **labels) + by

    checks = [grown("ray_raytwin_http_requests_total", 1, **route),
              grown("ray_raytwin_twin_events_total", 2, outcome="accepted"),
              grown("ray_raytwin_event_to_applied_seconds_count_total", 2),
              grown("ray_raytwin_ingest_to_applied_seconds_bucket_total", 2, le="+Inf"),
              grown("ray_raytwin_dead_letters_total", 1, stage="api", reason="invalid"),
              grown("ray_raytwin_dead_letters_total", 1, stage="api", reason="misfit")]
    after = wait_until(ray_metrics_port, lambda s: all(c(s) for c in checks), "the requests' metrics")
    for name, labels, by in (("ray_raytwin_http_requests_total", route, 1),
                             ("ray_raytwin_twin_events_total", {"outcome": "accepted"}, 2),
                             ("ray_raytwin_dead_letters_total", {"stage": "api"}, 2)):
        assert total(after, name, **labels) == total(before, name, **labels) + by, name  # exact, not at least
    assert total(after, "ray_raytwin_http_request_duration_seconds_count", route=route["route"]) >= 1
    assert total(after, "ray_raytwin_twins") >= 1 and "ray_raytwin_jobs" in after  # gauges stay exported
    ours = ServeConfig.model_construct(store_url=str(api[2] / "store"), namespace="raytwin-serve-tests").service_tags()
    for name in ("ray_raytwin_twins", "ray_raytwin_twin_events_total", "ray_raytwin_ingest_to_applied_seconds_bucket_total",
                 "ray_raytwin_jobs", "ray_raytwin_job_queue_oldest_submitted_timestamp_seconds"):
        assert any(ours.items() <= labels.items() for labels, _ in after[name]), name  # `raytwin status` picks by them
    assert "ray_serve_num_http_requests_total" in after  # Serve's proxy series the proxy-error alert divides by
    # exported at 0 by the Ingress from its start: its first stale reads and inline scenario show in `rate()`
    assert {lab["read"] for lab, _ in after.get("ray_raytwin_stale_reads_total", [])} == {"state", "query"}
    assert "scenario" in {lab["kind"] for lab, _ in after.get("ray_raytwin_scenario_steps_total", [])}
    assert http.get("/metrics").status_code == 404  # Prometheus scrapes Ray's export, not the API


def test_an_fmu_asset_sweeps_as_a_job_from_the_tenants_registry(api, http, reference_fmus):
    """A sweep of an asset whose simulator is a Reference FMU stored in the tenant's registry: always
    a job, checked before it is queued, its metrics table matching forward Euler at the FMU's fixed
    step (how the VanDerPol Reference FMU integrates), and refused to a tenant whose registry lacks it."""
    from raytwin.fmu import store_fmu

    admin, writer = auth(api, "admin"), auth(api, "writer")
    stored = store_fmu(reference_fmus[(2, "VanDerPol")], str(Path(api[2]) / "store" / "registry" / "acme"))
    vdp = AssetType.from_model(stored.declare(mu={"lower": 0.1, "upper": 5.0}),
                               name="vdp", version="1.0.0").model_dump(mode="json")
    err = assert_error(http.post("/v1/asset-types", json=vdp, headers=auth(api, "other")), 422, "invalid_request")
    assert "stored in its registry, under your tenant's" in err["message"], err  # another tenant's: never opened
    assert "vdp" not in {t["name"] for t in http.get("/v1/asset-types", headers=auth(api, "other")).json()["asset_types"]}
    assert http.post("/v1/asset-types", json=vdp, headers=admin).status_code == 201
    asset = {"id": "osc-1", "type_name": "vdp", "type_version": "1.0.0", "initial_state": {"x0": 2.0, "x1": 0.0},
             "metadata": {f"{kind}.{x}": "0.1" for kind in ("initial_std", "process_std", "measurement_std")
                          for x in ("x0", "x1")}}  # an FMU declares no filter noise: the asset gives it
    r = http.post("/v1/assets", json=asset, headers=admin)
    assert r.status_code == 201, r.text
    grid = {"method": "grid", "dimensions": [{"name": "mu", "target": "param", "values": [0.5, 1.0, 2.0]}]}
    sweep = {"asset_id": "osc-1", "horizon_s": 1.0, "step_s": 0.1, "start_state": {"x0": 2.0, "x1": 0.0},
             "space": grid}
    assert "always runs as a job" in assert_error(http.post("/v1/sweeps", params={"mode": "sync"}, json=sweep,
                                                            headers=writer), 422, "invalid_request")["message"]
    err = assert_error(http.post("/v1/sweeps", json={**sweep, "inputs": {"setpoint": 294.15}}, headers=writer),
                       422, "invalid_request")
    assert "unknown input(s) ['setpoint']" in err["message"], err
    assert_error(http.post("/v1/sweeps", json=sweep, headers=auth(api, "other")), 404, "not_found")

    r = http.post("/v1/sweeps", json=sweep, headers=writer)
    assert r.status_code == 202, r.text
    job = wait_for(http, r.json()["job_id"], writer)
    assert job["state"] == "succeeded" and job["kind"] == "sweep" and job["run_id"] and job["scenarios"] == 3, job
    table = download(http, job["job_id"], writer).sort_by("scenario")
    assert table.column("param.mu").to_pylist() == [0.5, 1.0, 2.0] and table.column("error").null_count == 3
    for mu, got in zip((0.5, 1.0, 2.0), table.column("x0_final").to_pylist()):
        x = np.array([2.0, 0.0])
        for _ in range(100):  # forward Euler, 0.01 s
            x = x + 0.01 * np.array([x[1], mu * (1 - x[0] ** 2) * x[1] - x[0]])
        assert got == pytest.approx(x[0], rel=1e-9), mu
    results = http.get(f"/v1/jobs/{job['job_id']}/results", headers=writer).json()
    band = next(q for q in results["quantiles"] if q["metric"] == "x0_final")
    assert band["count"] == 3 and results["model_ref"] == "vdp@1.0.0"
    assert_error(http.get(f"/v1/jobs/{job['job_id']}", headers=auth(api, "other")), 404, "not_found")
    audit = [a for a in http.get("/v1/audit", headers=admin).json() if a["details"].get("job_id") == job["job_id"]]
    assert [a["action"] for a in audit] == ["sweep.submit"] and audit[0]["details"]["model_ref"] == "vdp@1.0.0"


@pytest.mark.usefixtures("building")  # its asset type
def test_audit_log_records_changes_and_runs(api, http):
    """Each change is audited under the request id its answer carries (runs: the tests that run them read their
    records); the asset changed here is this test's own, so that it passes alone too."""
    admin, asset = auth(api, "admin"), {"type_name": "thermal_rc", "type_version": THERMAL_TYPE["version"]}
    answers = [http.post("/v1/assets", json={"id": "audited-1", **asset}, headers=admin),
               http.put("/v1/assets/audited-1", json={**asset, "metadata": {"floor": "1"}}, headers=admin),
               http.delete("/v1/assets/audited-1", headers=admin)]
    assert [a.status_code for a in answers] == [201, 200, 204], answers[-1].text
    for answer, action in zip(answers, ("asset.create", "asset.update", "asset.delete")):
        assert {(r["action"], r["target"], r["tenant"]) for r in _audited(api, http, answer)} == {
            (action, "audited-1", "acme")}
    assert_error(http.get("/v1/audit", headers=auth(api, "writer")), 403, "forbidden")
    theirs = http.get("/v1/audit", headers=auth(api, "other")).json()  # its own attempts only (a refused cancel)
    assert all(r["tenant"] == "globex" and r["details"].get("status") in (None, "refused") for r in theirs), theirs


# ------------------------------------------------------ hardening (issue 18: tried from outside) ----
def test_the_server_decides_ingest_time_and_refuses_future_events(api, http, building):
    writer = auth(api, "writer")
    url = f"/v1/assets/{building}/telemetry"
    before = http.get(f"/v1/assets/{building}/state", headers=auth(api, "reader")).json()
    future = "2099-01-01T00:00:00+00:00"
    forged = {**events(1, start=700)[0], "event_time": future, "ingest_time": future}
    err = assert_error(http.post(url, json={"events": [*events(1, start=701), forged]}, headers=writer),
                       422, "invalid_request")
    assert "ingest_time" in err["message"] and err["details"] == [{"index": 1, "field": "ingest_time"}]
    report = http.post(url, json={"events": [{**events(1, start=702)[0], "event_time": future}]},
                       headers=writer).json()
    assert (report["accepted"], report["rejected"]) == (0, 1) and "2099" in report["reasons"][0]["reason"]
    after = http.get(f"/v1/assets/{building}/state", headers=auth(api, "reader")).json()
    assert (after["revision"], after["event_time"]) == (before["revision"], before["event_time"])  # nothing applied


def test_the_audit_log_records_the_servers_request_id_and_only_the_clients_own(api, http, building):
    admin = auth(api, "admin")
    update = {"type_name": "thermal_rc", "type_version": THERMAL_TYPE["version"], "metadata": {"floor": "4"},
              "relationships": [{"kind": "part_of", "target": "site-1"}]}
    sent = {"client-trace-42": "client-trace-42", "x" * 8192: None, "a b": None, None: None}  # -> the client's
    ids = {}
    for client_id in sent:
        r = http.put(f"/v1/assets/{building}", json=update,
                     headers=admin if client_id is None else {**admin, "X-Request-ID": client_id})
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"]  # Serve's proxy made one up when the client sent none: not the client's
        ids[r.headers["x-raytwin-request-id"]] = sent[client_id]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(ids) == 4
    records = {r["request_id"]: r for r in http.get("/v1/audit", headers=admin).json()}
    assert {i: records[i]["client_request_id"] for i in ids} == ids
    assert not any(len(r.get("client_request_id") or "") > 128 for r in records.values())
    for day in ("2026-13-01", "2026-02-30"):
        err = assert_error(http.get("/v1/audit", params={"day": day}, headers=admin), 422, "invalid_request")
        assert f"{day} is not a calendar date" in err["message"] and "YYYY-MM-DD" in err["message"]
    leap_day = http.get("/v1/audit", params={"day": "2020-02-29"}, headers=admin)
    assert leap_day.status_code == 200 and leap_day.json() == []  # a calendar day without records


def _fixed(value_k: float, q_h: float = 0.0) -> dict:
    return {"T_out": {"kind": "constant", "value": value_k, "unit": "K"},
            "Q_h": {"kind": "constant", "value": q_h, "unit": "W"},
            "Q_sol": {"kind": "constant", "value": 0.0, "unit": "W"}}


@pytest.mark.usefixtures("live_clock")  # a twin without telemetry has no live state to run from
def test_scenario_values_are_bounded_and_results_finite(api, http, building):
    writer = auth(api, "writer")
    x0 = {"T_in": 294.0, "T_m": 291.0}
    base = {"asset_id": building, "start_state": x0, "horizon_s": 600.0, "step_s": 60.0, "inputs": _fixed(278.0)}
    for change, where in (
        ({"inputs": _fixed(1.7e308)}, "T_out"),
        ({"inputs": _fixed(278.0, q_h=-1.7e308)}, "Q_h"),
        ({"start_state": {"T_in": -1.7e308, "T_m": 291.0}}, "start_state.T_in"),
        ({"inputs": {**_fixed(278.0), "T_out": {"kind": "sinusoid", "mean": 278.0, "amplitude": 1e9,
                                                "period_s": 600.0, "unit": "K"}}}, "T_out"),
    ):
        err = assert_error(http.post("/v1/scenarios", params={"mode": "sync"}, json={**base, **change},
                                     headers=writer), 422, "invalid_request")
        assert where in err["message"] and "plausible range" in err["message"], err
    # in range, but a step far beyond RK4's stability limit: refused before it runs, sync or async (a
    # run that diverges anyway is answered 422 `diverged`: tests/test_serve_scenarios.py)
    unstable = {**base, "horizon_s": 200 * 1e5, "step_s": 1e5}
    for mode in ("sync", "async"):
        err = assert_error(http.post("/v1/scenarios", params={"mode": mode}, json=unstable, headers=writer),
                           422, "invalid_request")
        assert "step" in err["message"] and "stab" in err["message"], err
    # a step count no run can take is refused in a line (1e300 s of 1e-300 s steps overflowed into a 500)
    grid = {"method": "grid", "dimensions": [{"name": "R_io", "target": "param", "mode": "scale", "values": [1.0]}]}
    for path, body in (("/v1/scenarios", base), ("/v1/sweeps", {**_sweep(building, grid), "start_state": x0})):
        for horizon_s, step_s in ((1e300, 1e-300), (1e300, 1.0)):
            answer = http.post(path, params={"mode": "sync"}, headers=writer,
                               json={**body, "horizon_s": horizon_s, "step_s": step_s})
            err = assert_error(answer, 422, "invalid_request")
            assert "more than any run can take" in err["message"] and len(err["message"]) < 400, err
    sweep = {**_sweep(building, {"method": "grid", "dimensions": [
        {"name": "R_io", "target": "param", "mode": "scale", "values": [1.0]}]}), "start_state": {**x0, "T_m": -1e300}}
    assert "start_state.T_m" in assert_error(http.post("/v1/sweeps", json=sweep, headers=writer),
                                             422, "invalid_request")["message"]
    # a parameter outside its bounds (R_io in [1e-05, 1], 0.01 registered) or an implausible kit input:
    # refused before it runs or is queued, never a run whose results look valid
    r_io = {"method": "grid", "dimensions": [{"name": "R_io", "target": "param", "mode": "scale",
                                              "values": [-1.0, 1.0, 1e308]}]}
    for body, message in (
        (_sweep(building, r_io), "dimension param.R_io: scale -1, 1e+308 of R_io=0.01 K/W outside [0.001, 100] "
                                 "(R_io's bounds [1e-05, 1] K/W)"),
        ({**sweep, "start_state": x0, "inputs": {"setpoint": 1e308}},
         "inputs.setpoint=1e+308 outside setpoint's plausible range [173.15, 473.15] K"),
    ):
        for mode in ("sync", "async"):
            err = assert_error(http.post("/v1/sweeps", params={"mode": mode}, json=body, headers=writer),
                               422, "invalid_request")
            assert message in err["message"], err


def test_state_at_takes_only_rfc3339_date_times(api, http, building):
    reader = auth(api, "reader")
    url = f"/v1/assets/{building}/state"
    for at in ("0.5", "1767614520", "2026-01-05T12:02:00", "2026-01-05", "yesterday", "2026-01-05T12:02:00 00:00"):
        err = assert_error(http.get(url, params={"at": at}, headers=reader), 422, "invalid_request")
        assert err["message"].startswith("query.at:") and "RFC 3339" in err["message"], err
    for at in ("2026-01-05T12:02:00Z", "2026-01-05T13:02:00+01:00", "2026-01-05t12:02:00.5z"):
        assert http.get(url, params={"at": at}, headers=reader).status_code == 200, at
    scenario = {**_scenario(building, 10), "start_time": 0.5}  # a scenario's start_time likewise
    err = assert_error(http.post("/v1/scenarios", json=scenario, headers=auth(api, "writer")), 422, "invalid_request")
    assert "start_time" in err["message"] and "RFC 3339" in err["message"]


def test_json_bodies_need_a_json_content_type_and_bounded_nesting(api, http, building):
    writer = auth(api, "writer")
    url = f"/v1/assets/{building}/telemetry"
    body = json.dumps({"events": events(1, start=800)}).encode()
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {**writer, **({"Content-Type": content_type} if content_type else {})}
        err = assert_error(http.post(url, content=body, headers=headers), 415, "unsupported_media_type")
        assert "application/json" in err["message"]
    ok = http.post(url, content=body, headers={**writer, "Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200 and ok.json()["accepted"] == 1
    as_json = {**writer, "Content-Type": "application/json"}

    def nested(depth: int) -> bytes:
        return b'{"events": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    err = assert_error(http.post(url, content=nested(20_000), headers=as_json), 400, "too_deeply_nested")
    assert err["details"] == [{"max_depth": MAX_JSON_DEPTH}]
    assert_error(http.post(url, content=nested(MAX_JSON_DEPTH), headers=as_json), 422, "invalid_request")
    for literal in (b"NaN", b"Infinity", b"-Infinity"):  # what Python's json.dumps writes for non-finite floats
        err = assert_error(http.post(url, content=b'{"events": [{"value":\n ' + literal + b'}]}', headers=as_json), 422,
                           "invalid_request")
        assert err["details"][0]["type"] == "json_invalid"
        assert err["message"].startswith("<body>: NaN and Infinity are not JSON numbers and must not be sent (")
    other = assert_error(http.post(url, content=b'{"events": [{"value": Nope}]}', headers=as_json), 422,
                         "invalid_request")
    assert other["message"].startswith("<body>: malformed JSON: expected value at line 1 column 23")


READS = {"/v1/query"}  # POST for its body, a read: a reader may, so only the 401s apply


def _state_changing_routes() -> list[tuple[str, str]]:
    """(method, path) of every route that changes state, path parameters filled in (from the OpenAPI
    document: routes included from an `APIRouter` are not flattened into `app.routes`)."""
    return sorted((method.upper(), re.sub(r"{[^}]+}", "x", path)) for path, ops in create_api().openapi()["paths"].items()
                  for method in ops if method.upper() in {"POST", "PUT", "PATCH", "DELETE"})


def test_credentials_are_checked_before_the_body(api, http):
    routes = _state_changing_routes()
    assert ("POST", "/v1/assets/x/telemetry") in routes and len(routes) >= 8
    bodies = [(b'{"events": [', "application/json"), (b"id=zone-1", "application/x-www-form-urlencoded"),
              (b"[" * 5000, "application/json"), (b"", None)]
    for route, (method, path) in enumerate(routes):
        for content, content_type in bodies:
            ctype = {"Content-Type": content_type} if content_type else {}
            for headers, status, code in (({}, 401, "unauthorized"),
                                          ({"Authorization": "Bearer rtk_nope_nope"}, 401, "unauthorized"),
                                          (auth(api, f"prober-{route % PROBERS}"), 403, "forbidden")
                                          )[:2 if path in READS else 3]:
                r = http.request(method, path, content=content, headers={**headers, **ctype})
                while r.status_code == 429:  # more routes than PROBERS' buckets hold (RATE_BURST / 4 each) wait
                    time.sleep(float(r.headers["retry-after"]))
                    r = http.request(method, path, content=content, headers={**headers, **ctype})
                assert_error(r, status, code)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl, as the guide does")
def test_an_installed_model_package_is_served(api, http):
    """The example package's DC motor (examples/dcmotor), installed with pip: its asset type, an asset,
    telemetry in other units (rpm, degC) and its live state, through the API alone."""
    import raytwin_dcmotor as dcmotor  # installed with pip (./dev installs examples/dcmotor)
    motors = auth(api, "motors")
    r = http.post("/v1/asset-types", json=AssetType.from_model(dcmotor.DC_MOTOR).model_dump(mode="json"),
                  headers=motors)
    assert r.status_code == 201, r.text
    r = http.post("/v1/assets", json={"id": "motor-1", "type_name": "dc_motor", "type_version": "0.1.0",
                                      "initial_state": {"i": 0.0, "omega": 0.0, "T_w": 300.0}}, headers=motors)
    assert r.status_code == 201, r.text
    running = [{"asset_id": "motor-1", "sequence": k, "event_time": (T0 + timedelta(seconds=0.1 * k)).isoformat(),
                "measurements": {"V": {"value": 48.0, "unit": "V"}, "tau_load": {"value": 2.0, "unit": "N*m"},
                                 "T_amb": {"value": 25.0, "unit": "degC"}, "i": {"value": 6.9, "unit": "A"},
                                 "omega": {"value": 1418.0, "unit": "rpm"}, "T_w": {"value": 27.0, "unit": "degC"}}}
               for k in range(5)]
    r = http.post("/v1/assets/motor-1/telemetry", json={"events": running}, headers=motors)
    assert r.status_code < 300 and r.json()["accepted"] == 5, r.text
    state = http.get("/v1/assets/motor-1/state", headers=motors).json()
    assert set(state["state"]) == {"i", "omega", "T_w"} and state["revision"] >= 5
    assert abs(state["state"]["omega"] - 1418.0 * 2 * np.pi / 60) < 3.0  # 148.5 rad/s (steady state at 2 N*m)
    assert abs(state["state"]["T_w"] - 300.15) < 2.0


def test_the_readme_curl_examples_run_as_printed(api):
    """The quick start's curl commands, against this server and with a key of a tenant of their own."""
    readme = (Path(__file__).parents[1] / "serve_apps" / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [c for c in re.split(r"\n(?=\S)", block.replace("\\\n", " ")) if c.startswith("curl")]
    assert len(commands) == 4 and all("Content-Type: application/json" in c for c in commands if " -d " in c)
    env = {**os.environ, "KEY": api[1]["readme"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    host = api[0].removeprefix("http://")
    for command in commands:
        out = subprocess.run(["bash", "-c", command.replace("localhost:8000", host)], env=env, capture_output=True,
                             text=True, timeout=120, check=True).stdout
        assert "error" not in json.loads(out), (command, out)


# ------------------------------------------------------------ revisions, conditional writes ----
def test_reads_carry_revisions_as_etags_and_conditional_writes_compare_and_set(api, http):
    admin = auth(api, "cas")
    created = http.post("/v1/asset-types", json=THERMAL_TYPE, headers=admin)
    type_url = f"/v1/asset-types/thermal_rc/{THERMAL_TYPE['version']}"
    assert created.status_code == 201 and http.get(type_url, headers=admin).headers["etag"] == created.headers["etag"]
    assert_error(http.post("/v1/asset-types", json=THERMAL_TYPE, headers={**admin, "If-None-Match": "*"}),
                 412, "precondition_failed")
    body = {"id": "pump-1", "type_name": "thermal_rc", "type_version": THERMAL_TYPE["version"],
            "initial_state": {"T_in": 293.0, "T_m": 292.0}}
    r = http.post("/v1/assets", json=body, headers=admin)
    assert r.status_code == 201 and re.fullmatch(r'"\d+-[0-9a-f]{12}"', r.headers["etag"])
    assert http.get("/v1/assets/pump-1", headers=admin).headers["etag"] == r.headers["etag"]
    assert_error(http.post("/v1/assets", json=body, headers={**admin, "If-None-Match": "*"}),
                 412, "precondition_failed")
    assert_error(http.post("/v1/assets", json=body, headers=admin), 409, "conflict")  # unconditional: as before
    state = http.get("/v1/assets/pump-1/state", headers=admin)
    assert re.fullmatch(rf'W/"{state.json()["revision"]}-[0-9a-f]{{12}}"', state.headers["etag"])  # weak: a drift
    # clear changes the body too
    same = http.get("/v1/assets/pump-1", headers={**admin, "If-None-Match": r.headers["etag"]})
    assert same.status_code == 304 and same.content == b"" and same.headers["etag"] == r.headers["etag"]
    weakened = http.get("/v1/assets/pump-1", headers={**admin, "If-None-Match": "W/" + r.headers["etag"]})
    assert weakened.status_code == 304  # If-None-Match compares weakly (RFC 9110, 13.1.2): a proxy may weaken tags
    assert http.get(type_url, headers={**admin, "If-None-Match": f'"0", {created.headers["etag"]}'}).status_code == 304

    update = {"type_name": "thermal_rc", "type_version": THERMAL_TYPE["version"]}
    url, base = "/v1/assets/pump-1", api[0]
    for round_ in range(4):  # two writers with the same If-Match, released together: exactly one wins
        tag = http.get(url, headers=admin).headers["etag"]
        barrier = threading.Barrier(2)

        def put(writer: int, tag=tag, barrier=barrier) -> httpx.Response:
            with httpx.Client(base_url=base, timeout=60.0) as client:
                barrier.wait()
                return client.put(url, json={**update, "metadata": {"writer": str(writer), "round": str(round_)}},
                                  headers={**admin, "If-Match": tag})

        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(put, (0, 1)))
        assert sorted(a.status_code for a in answers) == [200, 412], [a.text for a in answers]
        won, lost = sorted(answers, key=lambda a: a.status_code)
        error = assert_error(lost, 412, "precondition_failed")
        assert error["details"][0]["current_revision"] == int(won.headers["etag"].strip('"').split("-")[0])
        now = http.get(url, headers={**admin, "If-None-Match": tag})  # the old tag is stale: a full answer
        assert now.status_code == 200 and now.headers["etag"] == won.headers["etag"] != tag
        assert now.json()["metadata"] == won.json()["metadata"]

    stale = {**admin, "If-Match": '"1"'}
    assert_error(http.delete(url, headers=stale), 412, "precondition_failed")
    nowhere = assert_error(http.put("/v1/assets/nowhere", json=update, headers={**admin, "If-Match": "*"}),
                           412, "precondition_failed")
    assert "asset nowhere does not exist" in nowhere["message"] and 'If-Match: "' not in nowhere["message"]
    made = http.put("/v1/assets/pump-2", json=update, headers={**admin, "If-None-Match": "*"})
    assert made.status_code == 201 and http.get("/v1/assets/pump-2/state", headers=admin).status_code == 200
    assert_error(http.put("/v1/assets/pump-2", json=update, headers={**admin, "If-None-Match": "*"}),
                 412, "precondition_failed")
    assert_error(http.get("/v1/assets/pump-2", headers=auth(api, "other")), 404, "not_found")
    current = http.get(url, headers=admin).headers["etag"]
    assert_error(http.delete(url, headers={**admin, "If-Match": "W/" + current}), 412, "precondition_failed")  # strong
    assert http.delete(url, headers={**admin, "If-Match": current}).status_code == 204
    recreated = http.post("/v1/assets", json=body, headers=admin)  # revisions only grow: an old ETag never matches
    assert int(recreated.headers["etag"].strip('"').split("-")[0]) > int(made.headers["etag"].strip('"').split("-")[0])


def test_telemetry_refuses_a_precondition_instead_of_ignoring_it(api, http, building):
    """Telemetry sent with a stale If-Match was applied: a client that sends one believes the write is conditional."""
    writer = auth(api, "writer")
    url = f"/v1/assets/{building}/telemetry"
    state = f"/v1/assets/{building}/state"
    before = http.get(state, headers=auth(api, "reader")).json()["revision"]
    batch = {"events": events(1, asset=building)}
    for header, value in (("If-Match", '"1"'), ("If-Match", "*"), ("If-None-Match", "*"),
                          ("If-Unmodified-Since", "Sat, 05 Dec 2026 12:00:00 GMT")):
        err = assert_error(http.post(url, json=batch, headers={**writer, header: value}), 412, "precondition_failed")
        assert "telemetry is not a conditional write" in err["message"] and f"{header}: {value}" in err["message"]
        assert "nothing was applied" in err["message"], err
    assert http.get(state, headers=auth(api, "reader")).json()["revision"] == before


# ---------------------------------------------------------------------------- change stream ----
def sse_events(resp: httpx.Response, n: int) -> list[dict]:
    """The next `n` events (frames with an `event:` line) of an open SSE response, fields parsed."""
    out: list[dict] = []
    frame: dict = {}
    for line in resp.iter_lines():
        if line == "":
            if "event" in frame:
                out.append(frame)
                if len(out) == n:
                    return out
            frame = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            frame[key] = json.loads(value) if key == "data" else value
    raise AssertionError(f"stream ended after {len(out)} of {n} events")


def read_changes(base: str, headers: dict, n: int, **params) -> list[dict]:
    with httpx.Client(base_url=base, timeout=120.0) as client:
        with client.stream("GET", "/v1/changes", params=params, headers=headers) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            return sse_events(resp, n)


def restart_ingress_replicas(http) -> None:
    """Kill every Ingress replica; Serve starts new ones (the test waits until one answers)."""
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Ingress" in a["name"]]
    assert replicas
    for a in replicas:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    for _ in range(600):
        try:
            if http.get("/v1/health", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("no Ingress replica came back")


def test_change_stream_is_complete_filterable_and_resumable_across_a_replica_restart(api, http):
    admin, reader, base = auth(api, "feeds"), auth(api, "feeds-reader"), api[0]
    assert_error(http.get("/v1/changes"), 401, "unauthorized")
    assert_error(http.get("/v1/changes", params={"kind": "twin.nope"}, headers=reader), 422, "invalid_request")
    assert_error(http.get("/v1/changes", headers={**reader, "Last-Event-ID": "99"}), 422, "invalid_request")

    with httpx.Client(base_url=base, timeout=120.0) as client:  # live, from now: sees the first change
        with client.stream("GET", "/v1/changes", headers=reader) as live:
            assert http.post("/v1/asset-types", json=THERMAL_TYPE, headers=admin).status_code == 201
            first = sse_events(live, 1)[0]
    assert (first["id"], first["event"]) == (f"1-{first['data']['generation']}", "asset_type.created")
    assert first["data"]["type_name"] == "thermal_rc"

    version = THERMAL_TYPE["version"]
    for body in ({"id": "f-1", "initial_state": {"T_in": 293.0, "T_m": 292.0}}, {"id": "f-2"}):
        r = http.post("/v1/assets", json={**body, "type_name": "thermal_rc", "type_version": version}, headers=admin)
        assert r.status_code == 201
    batch = events(3, asset="f-1")
    assert http.post("/v1/assets/f-1/telemetry", json={"events": batch}, headers=admin).json()["accepted"] == 3
    assert http.put("/v1/assets/f-2", json={"type_name": "thermal_rc", "type_version": version,
                                             "metadata": {"site": "north"}}, headers=admin).status_code == 200
    assert http.post("/v1/assets/f-1/telemetry", json={"events": wild_events()}, headers=admin).json()["accepted"] == 30
    job = http.post("/v1/scenarios", params={"mode": "async"}, json=_scenario("f-1", 50, {"T_in": 294.0, "T_m": 291.0}),
                    headers=admin)
    assert job.status_code == 202

    everything = read_changes(base, reader, 8, after=0)
    gen = everything[0]["data"]["generation"]  # the backend's: one run wrote them all
    assert [e["id"] for e in everything] == [f"{n}-{gen}" for n in range(1, 9)]  # no gap, no duplicate
    assert [e["event"] for e in everything] == ["asset_type.created", "asset.created", "asset.created", "twin.state",
                                                "asset.updated", "twin.state", "twin.drift", "job.succeeded"]
    assert [e["data"]["seq"] for e in everything] == list(range(1, 9))
    f1 = http.get("/v1/assets/f-1", headers=reader)
    assert f1.headers["etag"].startswith(f'"{everything[1]["data"]["revision"]}-')  # asset revision = its change's
    state = http.get("/v1/assets/f-1/state", headers=reader).json()
    assert everything[3]["data"]["revision"] == 3 and everything[5]["data"]["revision"] == state["revision"] == 33
    assert everything[5]["data"]["data"]["state"] == state["state"]
    assert everything[6]["data"]["data"]["drift"] is True and state["divergence"]["drift"] is True
    assert everything[7]["data"]["data"]["job_id"] == job.json()["job_id"]

    assert read_changes(base, {**reader, "Last-Event-ID": f"3-{gen}"}, 5) == everything[3:]  # resumes exactly
    only_f2 = read_changes(base, reader, 2, after=0, asset_id="f-2")
    assert [(e["id"], e["event"]) for e in only_f2] == [(f"3-{gen}", "asset.created"), (f"5-{gen}", "asset.updated")]
    twins = read_changes(base, reader, 3, after=0, kind="twin", type_name="thermal_rc")
    assert [e["id"] for e in twins] == [f"{n}-{gen}" for n in (4, 6, 7)]
    assert http.post("/v1/asset-types", json=THERMAL_TYPE, headers=auth(api, "cas")).status_code in (200, 201)
    other = read_changes(base, auth(api, "cas"), 1, after=0)  # another tenant's stream: its own changes only
    assert other[0]["event"] == "asset_type.created" and other[0]["data"]["asset_id"] is None

    with RayTwinClient(base, api[1]["feeds-reader"]) as sdk:  # the SDK follows the stream across the restart
        following = sdk.changes(after=6)
        assert [next(following).seq for _ in range(2)] == [7, 8]
        restart_ingress_replicas(http)  # the resume point is the log's sequence, not a replica's memory
        more = [{"sequence": 50, "event_time": (T0 + timedelta(minutes=50)).isoformat(),
                 "measurements": {"T_in": {"value": 300.0, "unit": "K"}}}]
        assert http.post("/v1/assets/f-1/telemetry", json={"events": more}, headers=admin).json()["accepted"] == 1
        resumed = read_changes(base, {**reader, "Last-Event-ID": "8"}, 1)  # a plain number, as before generations
        assert (resumed[0]["data"]["seq"], resumed[0]["event"], resumed[0]["data"]["revision"]) == (9, "twin.state", 34)
        after_restart = next(following)
        assert (after_restart.seq, after_restart.kind, after_restart.revision) == (9, "twin.state", 34)
        following.close()


@pytest.fixture(scope="module")
def drifting(api, http) -> str:
    """A twin of tenant driftco whose drift alarm latched (`wild_events`): its own tenant, so that no other test's
    changes or audit records are among the ones its test reads, and it reads none of theirs."""
    admin = auth(api, "drifts")
    assert http.post("/v1/asset-types", json=THERMAL_TYPE, headers=admin).status_code == 201
    r = http.post("/v1/assets", json={"id": "d-1", "type_name": "thermal_rc", "type_version": THERMAL_TYPE["version"],
                                      "initial_state": {"T_in": 293.0, "T_m": 292.0}}, headers=admin)
    assert r.status_code == 201, r.text
    for batch in (events(3, asset="d-1"), wild_events()):
        assert http.post("/v1/assets/d-1/telemetry", json={"events": batch}, headers=admin).json()["accepted"] == len(
            batch)
    return "d-1"


def test_clearing_a_drift_alarm_is_audited_streamed_and_tenant_isolated(api, http, drifting):
    admin, path = auth(api, "drifts"), f"/v1/assets/{drifting}/drift/clear"
    assert http.get(f"/v1/assets/{drifting}/divergence", headers=admin).json()["drift"] is True
    revision = http.get(f"/v1/assets/{drifting}/state", headers=admin).json()["revision"]
    assert_error(http.post(path, json={"reason": "x"}, headers=auth(api, "drifts-reader")), 403, "forbidden")
    assert_error(http.post(path, json={"reason": "x"}, headers=auth(api, "other")), 404, "not_found")
    assert_error(http.post(path, json={}, headers=admin), 422, "invalid_request")
    r = http.post(path, json={"reason": "sensor re-seated"}, headers=admin)
    assert r.status_code == 200 and r.headers["etag"].startswith(f'W/"{revision}-')
    assert (r.json()["drift"], r.json()["drift_score"], r.json()["revision"]) == (False, 0.0, revision)
    assert http.get(f"/v1/assets/{drifting}/divergence", headers=admin).json()["drift"] is False
    latched, cleared = read_changes(api[0], admin, 2, after=0, kind="twin.drift")
    assert [(c["data"]["revision"], c["data"]["data"]["drift"]) for c in (latched, cleared)] == [(revision, True),
                                                                                               (revision, False)]
    record = [a for a in http.get("/v1/audit", headers=admin).json() if a["action"] == "twin.drift_clear"]
    assert [(a["target"], a["phase"], a["details"]) for a in record] == [  # before it acts, and what came of it
        (drifting, "intent", {"reason": "sensor re-seated"}),
        (drifting, "outcome", {"reason": "sensor re-seated", "status": "done", "revision": revision})]


# ---------------------------------------------------------------------------------- the SDK ----
def test_the_python_client_against_the_server(api, http):
    from client.errors import NotFound, PreconditionFailed

    base, key = api[0], api[1]["sdk"]
    thermal = AssetType.model_validate(THERMAL_TYPE)
    with RayTwinClient(base, key, retry=RetryPolicy(attempts=6, backoff_s=0.05)) as sdk:
        published = sdk.create_asset_type(thermal)
        assert published.value == thermal and sdk.get_asset_type(thermal.name, thermal.version) == published
        created = sdk.create_asset(AssetCreate(id="s-1", type_name=thermal.name, type_version=thermal.version,
                                               initial_state={"T_in": 293.0, "T_m": 292.0}))
        assert created.revision > published.revision and sdk.get_asset("s-1") == created
        update = AssetUpdate(type_name=thermal.name, type_version=thermal.version, metadata={"site": "north"})
        moved = sdk.update_asset("s-1", update, if_match=created.etag)
        with pytest.raises(PreconditionFailed) as stale:
            sdk.update_asset("s-1", update, if_match=created.etag)
        assert stale.value.status == 412 and stale.value.current_revision == moved.revision
        with pytest.raises(NotFound) as missing:
            sdk.get_asset("s-9")
        assert missing.value.request_id and "s-9" in missing.value.message
        assert [a.id for a in sdk.list_assets(type_name=thermal.name).assets] == ["s-1"]

        batch = [{"sequence": k, "event_time": (T0 + timedelta(minutes=k)).isoformat(),
                  "measurements": {"T_in": {"value": 293.0 + 0.1 * k, "unit": "K"}}} for k in range(4)]
        assert sdk.send_telemetry("s-1", batch).accepted == 4
        again = sdk.send_telemetry("s-1", batch)  # a resent batch: every event recognised, none applied twice
        assert (again.accepted, again.duplicates) == (0, 4)
        state = sdk.state("s-1")
        assert state.revision == state.value.revision == 4 and set(state.value.state) == {"T_in", "T_m"}

        answers = []
        while sdk.retries == 0 and len(answers) < 20 * RATE_BURST:  # faster than 5/s: the key's bucket empties,
            answers.append(sdk.get_asset("s-1").revision)  # a 429 comes back, and the client waits it out
        assert sdk.retries > 0 and set(answers) == {moved.revision}

        kinds = [c.kind for c in itertools.islice(sdk.changes(after=0), 4)]
        assert kinds == ["asset_type.created", "asset.created", "asset.updated", "twin.state"]

    async def follow() -> tuple[int, list[int]]:
        async with AsyncRayTwinClient(base, key) as aio:
            state = await aio.state("s-1")
            seqs = []
            async for change in aio.changes(after=1, kinds=("asset",)):
                seqs.append(change.seq)
                if len(seqs) == 2:
                    break
            return state.revision, seqs

    assert asyncio.run(follow()) == (4, [2, 3])


def test_the_client_readme_runs_as_printed(api, capsys):
    """client/README.md's example, against this server and with a key of a tenant of its own."""
    from tests.guides import extract

    (block,) = [b for b in extract("client/README.md") if b.first_line == "from client import RayTwinClient"]
    code = block.text.replace("http://localhost:8000", api[0]).replace("rtk_...", api[1]["sdk-readme"])
    exec(compile(code, block.id, "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "changed meanwhile, now at revision 3" and printed[1].startswith("1 {'T_in': ")
    assert printed[2:] == ["1 asset_type.created None 1", "2 asset.created zone-1 2", "3 asset.updated zone-1 3",
                           "4 twin.state zone-1 1"]
