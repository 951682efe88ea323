"""Schema evolution of asset types: the compatibility matrix (in-process), the registration's 422,
twin migrations over HTTP (renamed state, unit change, audit, exact reverse, recovery after a restart),
telemetry for the old version, and Deprecation/Sunset headers.

The HTTP tests run the real FastAPI app and the real `Backend` in this process (twin shards are Ray
actors of the session's Ray), without Serve: routes and backend are the same code Serve runs."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import pytest
import ray

from raytwin.compat import (
    IncompatibleReplay,
    IncompatibleVersion,
    bump,
    check_version,
    compare_types,
    previous_version,
    range_differences,
    replay_differences,
    require_plausible,
    required_bump,
)
from raytwin.contracts import AssetType, ParameterSpec, Quantity
from raytwin.migration import FixedValue, FromState, MigrationError, plan_migration
from raytwin.registry import ModelArtifact
from raytwin.sim import THERMAL_RC, TWO_TANK
from tests.fixtures_connectors import wait_for
from tests.fixtures_serve import NODE_BROKERS, TEST_MODELS, InProcessHandle
from tests.schema_models import ROOM_HEAT, ROOM_SURFACE, ROOM_V1, ROOM_V2

THERMAL = AssetType.from_model(THERMAL_RC)
V1, V2 = AssetType.from_model(ROOM_V1), AssetType.from_model(ROOM_V2)


def changed(t: AssetType, version: str, **update) -> AssetType:
    """`t` as another version with fields replaced (without the simulator check: only the comparison
    is under test here)."""
    return t.model_copy(update={"version": version, **update})


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


P = THERMAL.parameters
R_ENV = next(iter(P))  # a parameter to play with
MATRIX = [
    # (what, new parameters/variables, expected (where, change, breaking) set, smallest bump)
    ("identical", {}, set(), "patch"),
    ("parameter default", {"parameters": {**P, R_ENV: P[R_ENV].model_copy(update={"default": P[R_ENV].upper})}},
     {(f"parameters.{R_ENV}", "default", False)}, "patch"),
    ("parameter added", {"parameters": {**P, "extra": ParameterSpec(unit="W", default=1.0, lower=0.0, upper=2.0)}},
     {("parameters.extra", "added", False)}, "minor"),
    ("output added", {"outputs": {**THERMAL.outputs, "T_m": Quantity(unit="K")}}, {("outputs.T_m", "added", False)},
     "minor"),
    ("state removed", {"states": without(THERMAL.states, "T_m")}, {("states.T_m", "removed", True)}, "major"),
    ("state added", {"states": {**THERMAL.states, "T_x": Quantity(unit="K")}}, {("states.T_x", "added", True)}, "major"),
    ("input renamed", {"inputs": {**without(THERMAL.inputs, "Q_h"), "Q_heat": THERMAL.inputs["Q_h"]}},
     {("inputs.Q_h", "removed", True), ("inputs.Q_heat", "added", True)}, "major"),
    ("parameter removed", {"parameters": without(P, R_ENV)}, {(f"parameters.{R_ENV}", "removed", True)}, "major"),
    ("unit dimension", {"inputs": {**THERMAL.inputs, "T_out": Quantity(unit="W")}},
     {("inputs.T_out", "dimension", True)}, "major"),
    ("unit, same dimension, same range", {"states": {**THERMAL.states, "T_in": Quantity(
        unit="degC", lower=THERMAL.states["T_in"].lower - 273.15, upper=THERMAL.states["T_in"].upper - 273.15)}},
     {("states.T_in", "unit", False)}, "patch"),
    ("range narrowed", {"states": {**THERMAL.states, "T_in": THERMAL.states["T_in"].model_copy(
        update={"upper": THERMAL.states["T_in"].upper - 1.0})}}, {("states.T_in", "narrowed", True)}, "major"),
    ("range widened", {"states": {**THERMAL.states, "T_in": THERMAL.states["T_in"].model_copy(
        update={"upper": THERMAL.states["T_in"].upper + 1.0})}}, {("states.T_in", "widened", False)}, "patch"),
    ("parameter bounds narrowed", {"parameters": {**P, R_ENV: P[R_ENV].model_copy(
        update={"lower": P[R_ENV].default})}}, {(f"parameters.{R_ENV}", "narrowed", True)}, "major"),
]


@pytest.mark.parametrize("what,update,expected,need", MATRIX, ids=[m[0] for m in MATRIX])
def test_the_compatibility_matrix(what, update, expected, need):
    new = changed(THERMAL, "1.0.1", **update)
    changes = compare_types(THERMAL, new)
    assert {(c.where, c.change, c.breaking) for c in changes} == expected
    assert required_bump(changes) == need
    assert [c.breaking for c in changes] == sorted((c.breaking for c in changes), reverse=True)  # breaking first
    for version, have in (("1.0.1", "patch"), ("1.1.0", "minor"), ("2.0.0", "major")):
        candidate = changed(new, version)
        if ("patch", "minor", "major").index(have) >= ("patch", "minor", "major").index(need):
            assert check_version(THERMAL, candidate) == changes
        else:
            with pytest.raises(IncompatibleVersion) as err:
                check_version(THERMAL, candidate)
            assert all(c.fix for c in err.value.changes) and f"need a {need} bump" in str(err.value)


REPLAY = [
    # (what, new variables, what keeps the history from replaying unchanged on the new version)
    ("identical", {}, []),
    ("output added", {"outputs": {**THERMAL.outputs, "T_m": Quantity(unit="K")}}, []),
    ("input added", {"inputs": {**THERMAL.inputs, "Q_int": Quantity(unit="W")}}, []),
    ("state added", {"states": {**THERMAL.states, "T_x": Quantity(unit="K")}}, [("states.T_x", "added")]),
    ("state renamed", {"states": {"T_air": THERMAL.states["T_in"], "T_m": THERMAL.states["T_m"]}},
     [("states.T_in", "removed"), ("states.T_air", "added")]),
    ("unit, same dimension", {"inputs": {**THERMAL.inputs, "T_out": Quantity(unit="degC")}},
     [("inputs.T_out", "unit")]),
    ("input removed", {"inputs": without(THERMAL.inputs, "Q_sol")}, [("inputs.Q_sol", "removed")]),
    ("output become an input", {"outputs": {}, "inputs": {**THERMAL.inputs, "T_in": Quantity(unit="K")}},
     [("outputs.T_in", "kind")]),
]


@pytest.mark.parametrize("what,update,expected", REPLAY, ids=[r[0] for r in REPLAY])
def test_a_type_change_in_place_needs_the_same_states_and_every_measurement_in_the_same_unit(what, update, expected):
    """What a twin's history, replayed as logged on a new version's model, needs of that version."""
    assert [(d.where, d.change) for d in replay_differences(THERMAL, changed(THERMAL, "2.0.0", **update))] == expected


def test_a_type_change_in_place_needs_ranges_that_hold_the_replayed_states_and_the_readings():
    """The example of the report (T_in's upper bound 294 K; readings at 294.15 and 295.15 K, the replay ending at
    294.65 K after passing 294.2 K) is refused, naming the state and the output, the values and the new range, and
    what to do; a state only passed along the replay is named where; a state that is not a number (a diverged
    filter) is in no range and not checked; a narrowing that still holds the states and readings is taken."""
    t_in = {"T_in": Quantity(unit="K", lower=173.15, upper=294.0)}
    narrow = changed(THERMAL, "3.0.0", states={**THERMAL.states, **t_in}, outputs={**THERMAL.outputs, **t_in})
    readings = [{"T_in": 293.5, "T_out": 280.0}, {"T_in": 294.15, "T_out": 280.0}, {"T_in": 295.15}]
    along = [("2026-01-01T00:40:00+00:00", {"T_in": 294.2, "T_m": 293.0}), ("01:20", {"T_in": 293.8, "T_m": 293.0})]
    with pytest.raises(IncompatibleReplay) as refused:
        require_plausible("zone-1", THERMAL.key, narrow, {"T_in": 294.65, "T_m": 293.0}, along, readings)
    assert [d.message for d in refused.value.differences] == [
        "states.T_in: the replay ends at 294.65 K (and passed 294.2 K at 2026-01-01T00:40:00+00:00), outside the "
        "plausible range [173.15, 294] K of 3.0.0",
        "outputs.T_in: 2 logged readings (294.15, 295.15 K) outside the plausible range [173.15, 294] K of 3.0.0"]
    assert "move it with TwinService.migrate" in str(refused.value)
    assert "or publish a version whose plausible ranges hold them" in str(refused.value)
    assert [d.message for d in range_differences(narrow, {"T_in": 293.0}, along, [])] == [
        "states.T_in: the replay passed 294.2 K at 2026-01-01T00:40:00+00:00, outside the plausible range "
        "[173.15, 294] K of 3.0.0"]
    assert [d.where for d in range_differences(narrow, {"T_in": float("nan")}, [], readings)] == ["outputs.T_in"]
    require_plausible("zone-1", THERMAL.key, narrow, {"T_in": 293.9}, along[1:], readings[:1])


def test_versions_are_compared_as_numbers_against_the_newest_older_one():
    assert bump("1.9.0", "1.10.0") == "minor" and bump("1.2.3", "2.0.0") == "major" and bump("1.2.3", "1.2.3") == "none"
    assert previous_version("1.10.0", ["1.9.0", "1.2.0", "2.0.0"]) == "1.9.0"
    assert previous_version("1.0.0", ["1.2.0"]) is None


def test_a_state_mapping_is_checked_whole_and_converts_units():
    plan = plan_migration({"T": "K"}, {"T_air": "degC"}, {"T_air": FromState(from_="T")})
    assert plan.apply({"T": 300.0}) == {"T_air": pytest.approx(300.0 - 273.15, abs=1e-12)}
    assert plan.apply_std({"T": 0.5}) == {"T_air": 0.5}  # a spread has no offset
    assert {k: v.from_ for k, v in plan.inverse().items()} == {"T": "T_air"}
    mm = plan_migration({"h": "m"}, {"h": "mm", "k": "W"}, {"k": FixedValue(value=2.0, unit="kW")})
    assert mm.apply({"h": 1.5}) == {"h": pytest.approx(1500.0), "k": 2000.0} and mm.inverse() is None  # k: no source
    with pytest.raises(MigrationError) as err:
        plan_migration({"T": "K", "P": "W"}, {"T_air": "degC", "Q": "J", "Z": "K"},
                       {"T_air": FromState(from_="P"), "Q": FixedValue(value=1.0, unit="K"), "nope": FromState(from_="T")})
    message = str(err.value)
    for expected in ("['nope'] are not states of the target version", "T_air: cannot convert P [W] to [degC]",
                     "Q: cannot convert 'K' to 'J'", "target state 'Z' has no source"):
        assert expected in message


def test_a_fixed_value_outside_the_target_types_plausible_range_is_refused():
    """A migrated twin must not start from a state its telemetry would be refused for (5000 K ended at -65 K)."""
    target, kelvin = AssetType.from_model(THERMAL_RC), {"T_in": "K", "T_m": "K"}
    with pytest.raises(MigrationError, match=r"states.T_in=5000 K outside the plausible range \[173.15, 473.15\] K"):
        plan_migration(kelvin, kelvin, {"T_in": FixedValue(value=5000.0, unit="K")}, target)
    assert plan_migration(kelvin, kelvin, {"T_in": FixedValue(value=25.0, unit="degC")}, target).apply(
        {"T_in": 290.0, "T_m": 291.0}) == {"T_in": pytest.approx(298.15), "T_m": 291.0}


# ----------------------------------------------------------------------------------- HTTP ----
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)


@pytest.fixture(scope="module")
def api(ray_session, tmp_path_factory):
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from raytwin import metrics
    from raytwin.storage import filesystem
    from serve_apps.api import create_api
    from serve_apps.audit import AuditLog
    from serve_apps.auth import KeyStore, create_key
    from serve_apps.backend import Backend
    from serve_apps.config import ServeConfig
    from serve_apps.deps import BackendClient, Services
    from serve_apps.limits import TokenBuckets
    from serve_apps.twin_reads import TwinReader

    root = tmp_path_factory.mktemp("schema")
    keys_file = root / "keys.json"
    keys = {name: create_key(keys_file, tenant, role, owner=name)[1] for name, tenant, role in (
        ("admin", "acme", "admin"), ("reader", "acme", "reader"), ("writer", "acme", "writer"),
        ("other", "globex", "admin"))}
    config = ServeConfig(store_url=str(root / "store"), keys_file=str(keys_file), twin_shards=1, rate_per_s=1000,
                         rate_burst=1000, state_cache_s=0, namespace=f"schema-{root.name}",
                         connector_hosts=NODE_BROKERS,  # tests/test_client.py's connectors: a port on this machine
                         model_packages=TEST_MODELS)
    with pytest.MonkeyPatch.context() as patch:  # this process is a Ray driver: no gauge of its own in the export
        patch.setattr(metrics, "SHARDS_CONFIGURED", SimpleNamespace(set=lambda value, **tags: None))
        backend = Backend(config)
    app = create_api()
    app.state.services = Services(
        config=config, keys=KeyStore(config.keys_file), backend=BackendClient(InProcessHandle(backend)),
        audit=AuditLog(config.store_url), buckets=TokenBuckets(1000, 1000), fs=filesystem(config.store_url)[0],
        twins=TwinReader(config), changes=None, change_store=None)
    try:
        with TestClient(app) as client:
            yield client, {name: {"Authorization": f"Bearer {key}"} for name, key in keys.items()}, backend
        for asset_id in backend.twins.assets("acme"):
            backend.twins.unregister("acme", asset_id)
    finally:
        backend.close()  # its store watch: no thread left running on beside the next modules'


def room_events(start: int, n: int, temp_k: float, v2: bool = False, at: datetime = T0) -> list[dict]:
    """One a minute from `at` (sequence 0)."""
    name, unit, value = ("T_air", "degC", temp_k - 273.15) if v2 else ("T", "K", temp_k)
    return [{"sequence": start + k, "event_time": (at + timedelta(minutes=start + k)).isoformat(),
             "measurements": {name: {"value": value, "unit": unit}, "T_out": {"value": 5.0, "unit": "degC"},
                              "Q": {"value": 1000.0, "unit": "W"}}} for k in range(n)]


@pytest.fixture(scope="module")
def rooms(api):
    """room@1.0.0, room@2.0.0 and two rooms on 1.0.0 (room-1 with telemetry)."""
    client, auth, _ = api
    assert client.post("/v1/asset-types", json=V1.model_dump(mode="json"), headers=auth["admin"]).status_code == 201
    assert client.post("/v1/asset-types", json=V2.model_dump(mode="json"), headers=auth["admin"]).status_code == 201
    for asset in ("room-1", "room-2"):
        r = client.post("/v1/assets", json={"id": asset, "type_name": "room", "type_version": "1.0.0",
                                            "initial_state": {"T": 293.15}}, headers=auth["admin"])
        assert r.status_code == 201, r.text
    for asset in ("room-1", "room-2"):  # the same history: room-2 stays on 1.0.0 as the reference
        r = client.post(f"/v1/assets/{asset}/telemetry", json={"events": room_events(0, 5, 294.0)},
                        headers=auth["writer"])
        assert r.json()["accepted"] == 5, r.text
    return "room-1"


def test_registration_refuses_a_breaking_change_without_a_major_version(api, rooms):
    client, auth, _ = api
    minor = V2.model_copy(update={"version": "1.1.0"}).model_dump(mode="json")
    r = client.post("/v1/asset-types", json=minor, headers=auth["admin"])
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and "room@1.1.0 is a minor bump from 1.0.0" in error["message"]
    assert {(d["where"], d["change"]) for d in error["details"]} == {
        ("states.T", "removed"), ("outputs.T", "removed"), ("states.T_air", "added")}
    assert all("2.0.0" in d["fix"] for d in error["details"])
    assert client.get("/v1/asset-types/room/1.1.0", headers=auth["reader"]).status_code == 404  # nothing written
    report = client.post("/v1/asset-types/compatibility", json=minor, headers=auth["admin"]).json()
    assert report["previous_version"] == "1.0.0" and report["required_bump"] == "major"
    # another tenant has no room@1.0.0: its 1.1.0 is a first version
    assert client.post("/v1/asset-types", json=minor, headers=auth["other"]).status_code == 201


def test_a_migration_renames_converts_is_audited_and_reverses_exactly(api, rooms):
    client, auth, backend = api
    before = client.get("/v1/assets/room-1/state", headers=auth["reader"]).json()
    r = client.put("/v1/assets/room-1", json={"type_name": "room", "type_version": "2.0.0"}, headers=auth["admin"])
    assert r.status_code == 422, r.text  # its history replayed unconverted: a room read 294.55 degC
    assert ("differs from room@1.0.0 in states.T removed (or renamed), states.T_air added, inputs.T_out (K -> degC), "
            "outputs.T removed (or renamed)") in r.json()["error"]["message"]
    assert "POST /v1/assets/room-1/migrate" in r.json()["error"]["message"]
    r = client.post("/v1/assets/room-1/migrate", json={"type_version": "2.0.0"}, headers=auth["admin"])
    assert r.status_code == 422 and "target state 'T_air' has no source" in r.json()["error"]["message"]
    r = client.post("/v1/assets/room-1/migrate", json={"type_version": "2.0.0", "states": {
        "T_air": {"value": 3.0, "unit": "W"}}}, headers=auth["admin"])
    assert r.status_code == 422 and "cannot convert 'W' to 'degC'" in r.json()["error"]["message"]
    assert client.post("/v1/assets/room-1/migrate", json={"type_version": "2.0.0", "states": {"T_air": {"from": "T"}}},
                       headers=auth["reader"]).status_code == 403
    assert client.post("/v1/assets/room-1/migrate", json={"type_version": "2.0.0", "states": {"T_air": {"from": "T"}}},
                       headers=auth["other"]).status_code == 404

    r = client.post("/v1/assets/room-1/migrate", json={"type_version": "2.0.0", "states": {"T_air": {"from": "T"}}},
                    headers=auth["admin"])
    assert r.status_code == 200, r.text
    moved = r.json()
    assert moved["state_before"] == before["state"] and moved["twin_revision"] == before["revision"] == 5
    assert moved["state_after"]["T_air"] == pytest.approx(before["state"]["T"] - 273.15, abs=1e-9)
    assert r.headers["etag"].startswith(f'"{moved["revision"]}-') and moved["asset"]["type_version"] == "2.0.0"
    now = client.get("/v1/assets/room-1/state", headers=auth["reader"]).json()
    assert now["state"] == moved["state_after"] and now["model_ref"] == "room@2.0.0"
    assert now["std"]["T_air"] == pytest.approx(before["std"]["T"])
    assert client.get("/v1/assets/room-1", headers=auth["reader"]).json()["type_version"] == "2.0.0"
    migrations = [a for a in backend_audit(api) if a["action"] == "asset.migrate"]  # each attempt: intent, outcome
    assert [(a["phase"], a["details"].get("status")) for a in migrations] == [
        ("intent", None), ("outcome", "refused")] * 2 + [("intent", None), ("outcome", "done")]
    intent, audit = migrations[-2:]
    assert intent["details"] == {"to_version": "2.0.0", "mapping": audit["details"]["mapping"]}
    assert audit["target"] == "room-1" and audit["details"]["mapping"]["states"] == {"T_air": {"from": "T"}}
    assert audit["details"]["state_after"] == moved["state_after"]
    assert (audit["details"]["from_version"], audit["details"]["to_version"]) == ("1.0.0", "2.0.0")

    back = client.post("/v1/assets/room-1/migrate", json=moved["inverse"], headers=auth["admin"])
    assert back.status_code == 200, back.text
    restored = client.get("/v1/assets/room-1/state", headers=auth["reader"]).json()
    assert restored["state"] == before["state"] and restored["covariance"] == before["covariance"]  # exactly
    assert restored["model_ref"] == "room@1.0.0" and restored["revision"] == 5


def backend_audit(api) -> list[dict]:
    client, auth, _ = api
    return client.get("/v1/audit", headers=auth["admin"]).json()


def test_a_migrated_twin_keeps_ingesting_refuses_its_past_and_recovers_the_same(api, rooms):
    client, auth, backend = api
    r = client.post("/v1/assets/room-1/migrate", json={"type_version": "2.0.0", "states": {"T_air": {"from": "T"}}},
                    headers=auth["admin"])
    assert r.status_code == 200, r.text
    applied = r.json()["twin_revision"]
    r = client.post("/v1/assets/room-1/telemetry", json={"events": room_events(5, 4, 295.0, v2=True)},
                    headers=auth["writer"])
    assert r.json()["accepted"] == 4, r.text
    late = room_events(2, 1, 294.0, v2=True)
    late[0]["sequence"] = 99  # a new event, timed before the migration
    r = client.post("/v1/assets/room-1/telemetry", json={"events": late}, headers=auth["writer"]).json()
    assert r["rejected"] == 1 and "before migration" in r["reasons"][0]["reason"]
    old_names = client.post("/v1/assets/room-1/telemetry", json={"events": room_events(20, 1, 295.0)},
                            headers=auth["writer"]).json()
    assert old_names["rejected"] == 1 and "'T' is not part of asset type room@2.0.0" in old_names["reasons"][0]["reason"]
    live = client.get("/v1/assets/room-1/state", headers=auth["reader"]).json()
    assert live["revision"] == applied + 4 and live["model_ref"] == "room@2.0.0"
    # the reference: room-2 never migrated and got the same events in K. One state, the same linear ODE
    # and noise in either unit: the migrated twin (its state, variance, filter time and held inputs
    # carried over) tracks it exactly, up to rounding
    r = client.post("/v1/assets/room-2/telemetry", json={"events": room_events(5, 4, 295.0)}, headers=auth["writer"])
    assert r.json()["accepted"] == 4, r.text
    reference = client.get("/v1/assets/room-2/state", headers=auth["reader"]).json()
    assert live["state"]["T_air"] == pytest.approx(reference["state"]["T"] - 273.15, abs=1e-6)
    assert live["std"]["T_air"] == pytest.approx(reference["std"]["T"], rel=1e-9)

    # restarted, the shard rebuilds the twin from the store (registration, migration point, log) exactly
    backend.flush()
    ray.kill(backend.twins.shard_for("acme", "room-1"), no_restart=False)
    deadline = time.monotonic() + 120
    while (again := client.get("/v1/assets/room-1/state", headers=auth["reader"]).json())["stale"]:
        assert time.monotonic() < deadline, "the shard did not come back"  # read from the store meanwhile
        time.sleep(0.2)
    assert again["state"] == live["state"] and again["revision"] == live["revision"]


def test_deprecated_type_versions_and_api_versions_announce_a_sunset(api, rooms):
    client, auth, backend = api
    sunset = "2027-06-30T00:00:00Z"
    r = client.put("/v1/asset-types/room/1.0.0/deprecation", json={
        "deprecated_at": "2026-12-01T00:00:00Z", "sunset": sunset, "link": "https://example.com/room-2"},
        headers=auth["admin"])
    assert r.status_code == 200, r.text
    deprecated_at = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
    for path in ("/v1/asset-types/room/1.0.0", "/v1/assets/room-2"):  # room-2 is on 1.0.0
        got = client.get(path, headers=auth["reader"])
        assert got.headers["deprecation"] == f"@{deprecated_at}", path
        assert parsedate_to_datetime(got.headers["sunset"]) == datetime(2027, 6, 30, tzinfo=UTC)
        assert got.headers["sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
        assert got.headers["link"] == '<https://example.com/room-2>; rel="deprecation"'
    assert "deprecation" not in client.get("/v1/asset-types/room/2.0.0", headers=auth["reader"]).headers
    assert "deprecation" not in client.get("/v1/asset-types/room/1.0.0", headers=auth["other"]).headers  # tenants apart
    assert client.put("/v1/asset-types/room/1.0.0/deprecation", json={"deprecated_at": "2026-12-01T00:00:00Z"},
                      headers=auth["writer"]).status_code == 403
    assert any(a["action"] == "asset_type.deprecate" for a in backend_audit(api))
    assert client.delete("/v1/asset-types/room/1.0.0/deprecation", headers=auth["admin"]).status_code == 204
    assert "deprecation" not in client.get("/v1/assets/room-2", headers=auth["reader"]).headers

    from serve_apps.deprecation import Deprecation

    svc = client.app.state.services
    client.app.state.services = dataclasses.replace(svc, config=svc.config.model_copy(update={
        "api_deprecation": Deprecation(deprecated_at=datetime(2026, 11, 1, tzinfo=UTC),
                                       sunset=datetime(2027, 1, 1, tzinfo=UTC))}))
    try:
        got = client.get("/v1/assets/room-2", headers=auth["reader"])
        assert got.status_code == 200 and got.headers["deprecation"] == f"@{int(datetime(2026, 11, 1, tzinfo=UTC).timestamp())}"
        assert got.headers["sunset"] == "Fri, 01 Jan 2027 00:00:00 GMT"
        assert "deprecation" in client.get("/v1/health").headers
        assert "deprecation" not in client.get("/openapi.json").headers  # not an API version's resource
    finally:
        client.app.state.services = svc


def test_a_deprecation_link_adds_nothing_to_the_link_header_and_a_sunset_follows_the_deprecation(api, rooms):
    client, auth, _ = api
    url, since = "/v1/asset-types/room/1.0.0/deprecation", "2026-12-01T00:00:00Z"
    for link, named in (('https://a.com/>;rel="alternate",<https://evil.example/', """'"' ',' ';' '<' '>'"""),
                        ("https://a.com/a b", "' '"), ("https://a.com/\u00fcber", "'\u00fc'")):
        r = client.put(url, json={"deprecated_at": since, "link": link}, headers=auth["admin"])
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert f"characters not allowed in link: {named} " in message and "percent-encode" in message
    r = client.put(url, json={"deprecated_at": since, "sunset": "2020-06-30T00:00:00Z"}, headers=auth["admin"])
    assert r.status_code == 422 and "sunset 2020-06-30T00:00:00+00:00 is before deprecated_at" in r.text, r.text
    assert "deprecation" not in client.get("/v1/asset-types/room/1.0.0", headers=auth["reader"]).headers
    ok = client.put(url, json={"deprecated_at": since, "sunset": since, "link": "https://a.com/x?y=%2C%20"},
                    headers=auth["admin"])
    assert ok.status_code == 200 and ok.headers["link"] == '<https://a.com/x?y=%2C%20>; rel="deprecation"'
    assert client.delete(url, headers=auth["admin"]).status_code == 204


def test_a_stored_deprecation_mark_that_fails_the_checks_is_skipped_with_an_error_logged(tmp_path, caplog):
    import json

    from serve_apps.deprecation import Deprecation, TypeDeprecations

    marks = TypeDeprecations(str(tmp_path))
    marks.put("acme", "room@2.0.0", Deprecation(deprecated_at=datetime(2026, 12, 1, tzinfo=UTC)))
    old = tmp_path / "deprecations" / "acme" / "room@1.0.0.json"  # written before links were checked
    old.write_text(json.dumps({"deprecated_at": "2026-12-01T00:00:00Z", "link": "https://a.com/>,<https://b.example/"}))
    reloaded = TypeDeprecations(str(tmp_path))
    assert reloaded.get("acme", "room@1.0.0") is None and reloaded.get("acme", "room@2.0.0") is not None
    assert "event=deprecation_skipped" in caplog.text and "room@1.0.0.json" in caplog.text


def test_artifacts_of_types_with_the_default_policy_keep_their_hash():
    art = ModelArtifact(name="room", version="1.0.0", asset_type=V1, parameters={"R": 0.01, "C": 1e6})
    assert b"telemetry_policy" not in art.body()
    refusing = art.model_copy(update={"asset_type": V1.model_copy(update={"telemetry_policy": "refuse"})})
    assert b'"telemetry_policy":"refuse"' in refusing.body() and refusing.content_hash != art.content_hash


def test_telemetry_for_an_older_version_is_accepted_or_refused_as_the_type_says(api, rooms):
    client, auth, _ = api
    assert client.get("/v1/assets/room-1", headers=auth["reader"]).json()["type_version"] == "2.0.0"  # accepts
    old = {"X-RayTwin-Type-Version": "1.0.0", **auth["writer"]}
    inputs_only = [{**e, "measurements": without(e["measurements"], "T")} for e in room_events(30, 2, 295.0)]
    r = client.post("/v1/assets/room-1/telemetry", json={"events": inputs_only}, headers=old)
    assert r.status_code == 200 and r.json()["accepted"] == 2, r.text  # T_out and Q are still 2.0.0's
    r = client.post("/v1/assets/room-1/telemetry", json={"events": room_events(32, 1, 295.0)}, headers=old).json()
    assert r["rejected"] == 1 and "'T' is not part of asset type room@2.0.0" in r["reasons"][0]["reason"]

    strict = V2.model_copy(update={"version": "2.1.0", "telemetry_policy": "refuse"}).model_dump(mode="json")
    assert client.post("/v1/asset-types", json=strict, headers=auth["admin"]).status_code == 201
    r = client.post("/v1/assets/room-2/migrate", json={"type_version": "2.1.0", "states": {"T_air": {"from": "T"}}},
                    headers=auth["admin"])
    assert r.status_code == 200, r.text
    r = client.post("/v1/assets/room-2/telemetry", json={"events": inputs_only}, headers=old)
    assert r.status_code == 422 and "telemetry_policy: refuse" in r.json()["error"]["message"]
    assert r.json()["error"]["details"][0]["current"] == "2.1.0"
    fresh = [{**e, "sequence": e["sequence"] + 100} for e in room_events(30, 2, 295.0, v2=True)]
    r = client.post("/v1/assets/room-2/telemetry", json={"events": fresh},
                    headers={"X-RayTwin-Type-Version": "2.1.0", **auth["writer"]})
    assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
    for version, why in (("3.0.0", "does not exist"), ("2.0.0", None)):
        r = client.post("/v1/assets/room-1/telemetry", json={"events": fresh[:1]},
                        headers={"X-RayTwin-Type-Version": version, **auth["writer"]})
        assert (r.status_code == 422 and why in r.json()["error"]["message"]) if why else r.status_code == 200


def bulk_job(api, body: dict) -> dict:
    """The finished bulk job `body` submitted as admin."""
    client, auth, _ = api
    accepted = client.post("/v1/bulk", json=body, headers=auth["admin"])
    assert accepted.status_code == 202, accepted.text

    def ended() -> dict | None:
        job = client.get(accepted.json()["status_url"], headers=auth["reader"]).json()
        return job if job["state"] in ("succeeded", "failed") else None

    return wait_for(ended, f"bulk job {accepted.json()['job_id']} ended")  # its twins move on a busy shard


def test_bulk_jobs_refuse_a_missing_version_at_submission_name_api_paths_and_keep_internal_errors_in_the_log(
        api, rooms, monkeypatch, caplog):
    """A bulk retype to a version its assets' type lacks is a 422 at submission, as one migration is (not
    a job that fails later). A job's status names its report by API path, never by store location; one
    that fails on an unexpected error says so without the error's text (a store path here), which the
    log keeps, and its report is a 409 that says it failed (no report will come)."""
    client, auth, backend = api
    admin, store = auth["admin"], backend.config.store_url
    refused = client.post("/v1/bulk", json={"q": 'type == "room"', "action": "retype", "type_version": "9.9.9"},
                          headers=admin)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["message"] == ("asset type room@9.9.9 does not exist; publish it first "
                                                  "(POST /v1/asset-types)")

    tag = {"q": 'id == "room-2"', "action": "tag", "set": {"bulk": "yes"}}
    done = bulk_job(api, tag)
    assert done["report_url"] == f"/v1/jobs/{done['job_id']}/report" and "result_url" not in done
    assert client.get(done["report_url"], headers=auth["reader"]).json()["items"][0]["outcome"] == "changed"

    def broken(asset, pre):
        raise PermissionError(13, "Permission denied", f"{store}/catalog/acme/assets/room-2.json")

    monkeypatch.setattr(backend, "update_asset", broken)
    with caplog.at_level(logging.ERROR, logger="raytwin.serve.jobs"):
        failed = bulk_job(api, {**tag, "set": {"bulk": "again"}})
    assert failed["error"] == "internal error (PermissionError); quote the job_id when reporting it"
    assert store not in json.dumps(failed) and f"{store}/catalog" in caplog.text and failed["job_id"] in caplog.text
    report = client.get(failed["report_url"], headers=auth["reader"])
    assert report.status_code == 409 and report.json()["error"]["message"] == (
        f"job {failed['job_id']} failed: {failed['error']}; a failed job has no report (`bulk` in "
        f"GET /v1/jobs/{failed['job_id']} counts the items done before it failed)")


def test_a_migration_moves_no_asset_off_its_models_production_version(api):
    """Under the lifecycle, twins run the production version: a migration to another one (a candidate nobody
    approved) is refused as creating or replacing an asset on it is, and so is any once the production version
    was archived (none is approved then)."""
    from raytwin.lifecycle import Actor, ModelLifecycle

    client, auth, backend = api
    for version in (V1, V2):
        body = version.model_copy(update={"name": "hall"}).model_dump(mode="json")
        assert client.post("/v1/asset-types", json=body, headers=auth["admin"]).status_code == 201
    r = client.post("/v1/assets", json={"id": "hall-1", "type_name": "hall", "type_version": "1.0.0",
                                        "initial_state": {"T": 293.15}}, headers=auth["admin"])
    assert r.status_code == 201, r.text
    lifecycle = ModelLifecycle(backend._registry("acme"))
    author, approver = Actor(id="alice", tenant="acme"), Actor(id="bob", tenant="acme", roles=frozenset({"approver"}))
    lifecycle.submit("hall@1.0.0", author, "first fit")
    lifecycle.transition("hall@1.0.0", "staging", author, "checked")
    lifecycle.transition("hall@1.0.0", "production", approver, "approved")
    r = client.post("/v1/assets/hall-1/migrate", json={"type_version": "2.0.0", "states": {"T_air": {"from": "T"}}},
                    headers=auth["admin"])
    assert r.status_code == 409 and "hall@2.0.0 is not the production version of model hall (1.0.0)" in r.text
    assert client.get("/v1/assets/hall-1", headers=auth["reader"]).json()["type_version"] == "1.0.0"
    lifecycle.transition("hall@1.0.0", "archived", approver, "found wrong")  # no production version now
    r = client.post("/v1/assets/hall-1/migrate", json={"type_version": "2.0.0", "states": {"T_air": {"from": "T"}}},
                    headers=auth["admin"])
    assert r.status_code == 409 and "model hall has no production version (the last one was archived)" in r.text
    assert client.get("/v1/assets/hall-1", headers=auth["reader"]).json()["type_version"] == "1.0.0"


def narrowed_t(t: AssetType, upper: float) -> AssetType:
    """`t` with the plausible range of its state and output T capped at `upper` K."""
    capped = {"T": t.states["T"].model_copy(update={"upper": upper})}
    return t.model_copy(update={"states": {**t.states, **capped}, "outputs": {**t.outputs, **capped}})


WARDS = [  # versions of a type of their own, apart from the rooms the other tests move
    AssetType.from_model(ROOM_V1, name="ward"),
    AssetType.from_model(ROOM_SURFACE, name="ward"),  # 1.1.0: a second sensor; the rest as 1.0.0
    AssetType.from_model(TWO_TANK, name="ward", version="2.0.0"),  # another model: tank levels, a pump's inflow
    AssetType.from_model(ROOM_HEAT, name="ward"),  # 3.0.0: the input Q renamed Q_heat
    narrowed_t(AssetType.from_model(ROOM_V1, name="ward", version="4.0.0"), 293.5),  # 1.0.0, T at most 293.5 K
]


def test_a_type_version_changes_in_place_only_to_one_its_twins_history_replays_on_unchanged(api):
    """A PUT (or bulk retype) to another version of the asset's type replays its twin's logged history on the
    new model as logged. A version of another model (a room's temperatures replayed on two tanks: the twin read
    levels 0, diverged) or without one of its measurements is refused, naming each difference and the migrate
    endpoint; one that only adds a sensor is taken, and the replayed twin is durable at once: read from the
    store (while its shard is down or restarting) it answered its prior, revision 0, as if it had no data."""
    from actors.recovery import durable_state

    client, auth, backend = api
    admin, reader = auth["admin"], auth["reader"]
    for t in WARDS:
        assert client.post("/v1/asset-types", json=t.model_dump(mode="json"), headers=admin).status_code == 201
    start = T0 - timedelta(hours=1)
    history = room_events(0, 130, 294.0, at=start)  # 130 min, more than the allowed lateness: some of it sealed
    for ward in ("ward-1", "ward-2"):  # the same history: ward-2 stays on 1.0.0 as the reference
        r = client.post("/v1/assets", json={"id": ward, "type_name": "ward", "type_version": "1.0.0",
                                            "initial_state": {"T": 293.15}}, headers=admin)
        assert r.status_code == 201, r.text
        r = client.post(f"/v1/assets/{ward}/telemetry", json={"events": history}, headers=auth["writer"])
        assert r.json()["accepted"] == 130, r.text
    before = client.get("/v1/assets/ward-1/state", headers=reader).json()

    for version, differences in (
            ("2.0.0", [("states.T", "removed"), ("states.h1", "added"), ("states.h2", "added"),
                       ("inputs.T_out", "removed"), ("inputs.Q", "removed"), ("outputs.T", "removed")]),
            ("3.0.0", [("inputs.Q", "removed")])):
        r = client.put("/v1/assets/ward-1", json={"type_name": "ward", "type_version": version}, headers=admin)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert [(d["where"], d["change"]) for d in error["details"]] == differences
        assert f"cannot be replayed unchanged on ward@{version}, which differs from ward@1.0.0 in " in error["message"]
        assert "inputs.Q removed (or renamed)" in error["message"]
        assert "move it with POST /v1/assets/ward-1/migrate" in error["message"]
    r = client.put("/v1/assets/ward-1", json={"type_name": "ward", "type_version": "4.0.0"}, headers=admin)
    assert r.status_code == 422, r.text  # a range that excludes the live state and the logged readings
    error = r.json()["error"]
    assert [(d["where"], d["change"]) for d in error["details"]] == [("states.T", "range"), ("outputs.T", "range")]
    assert ("outputs.T: 130 logged readings (294, 294, 294, ... K) outside the plausible range [173.15, 293.5] K "
            "of 4.0.0") in error["message"] and "move it with POST /v1/assets/ward-1/migrate" in error["message"]
    assert client.get("/v1/assets/ward-1", headers=reader).json()["type_version"] == "1.0.0"
    now = client.get("/v1/assets/ward-1/state", headers=reader).json()
    assert (now["model_ref"], now["revision"], now["state"]) == (before["model_ref"], 130, before["state"])

    refused = bulk_job(api, {"q": 'type == "ward"', "action": "retype", "type_version": "3.0.0"})
    items = client.get(refused["report_url"], headers=reader).json()["items"]
    assert [(i["asset_id"], i["outcome"]) for i in items] == [("ward-1", "failed"), ("ward-2", "failed")]
    assert all("inputs.Q removed" in i["error"] and "POST /v1/assets/" in i["error"] for i in items)

    r = client.put("/v1/assets/ward-1", json={"type_name": "ward", "type_version": "1.1.0"}, headers=admin)
    assert r.status_code == 200, r.text
    moved = client.get("/v1/assets/ward-1/state", headers=reader).json()
    assert (moved["model_ref"], moved["revision"]) == ("ward@1.1.0", 130)
    # the same estimate to within what a second output changes in the drift detector's thresholds
    assert moved["state"]["T"] == pytest.approx(before["state"]["T"], abs=1e-3)
    # what a read answers while the shard is down: the replay's sealed state, as for the never retyped twin
    stale, reference = (durable_state(backend.twins.store, "acme", ward) for ward in ("ward-1", "ward-2"))
    assert stale.stale and stale.model_ref == "ward@1.1.0"
    assert stale.revision == reference.revision == 64  # the checkpoint (every 64) over an hour before the last
    assert stale.event_time == reference.event_time == start + timedelta(minutes=63)
    then = client.get("/v1/assets/ward-1/state", params={"at": stale.event_time.isoformat()}, headers=reader).json()
    assert (then["revision"], then["model_ref"]) == (64, "ward@1.1.0")
    assert stale.state == pytest.approx(then["state"], abs=1e-9) and stale.std == pytest.approx(then["std"], abs=1e-9)

    done = bulk_job(api, {"q": 'type == "ward"', "action": "retype", "type_version": "1.1.0"})
    items = client.get(done["report_url"], headers=reader).json()["items"]
    assert [(i["asset_id"], i["outcome"]) for i in items] == [("ward-1", "unchanged"), ("ward-2", "changed")]
    assert client.get("/v1/assets/ward-2/state", headers=reader).json()["model_ref"] == "ward@1.1.0"


def test_a_retype_whose_twin_cannot_move_changes_nothing_and_one_left_unrecorded_is_finished_by_a_resend(
        api, monkeypatch):
    """The catalog was written first: a type version change whose twin could not move (its replay raised) left
    the asset on the new version and the twin on the old one, and the same PUT again saw no change of version
    and never moved the twin. The twin moves first now: its failure is a 409 that changes nothing (no revision,
    no change recorded), and a catalog write that fails after the twin moved is finished by the same PUT again."""
    from actors.retype import RetypeFailed
    from serve_apps.catalog import NO_PRECONDITION

    client, auth, backend = api
    admin, reader = auth["admin"], auth["reader"]
    for t in (ROOM_V1, ROOM_SURFACE):  # a type of its own, apart from the rooms the other tests move
        body = AssetType.from_model(t, name="wing").model_dump(mode="json")
        assert client.post("/v1/asset-types", json=body, headers=admin).status_code == 201
    r = client.post("/v1/assets", json={"id": "wing-1", "type_name": "wing", "type_version": "1.0.0",
                                        "initial_state": {"T": 293.15}}, headers=admin)
    assert r.status_code == 201, r.text
    r = client.post("/v1/assets/wing-1/telemetry", json={"events": room_events(0, 20, 294.0)}, headers=auth["writer"])
    assert r.json()["accepted"] == 20, r.text
    etag, head = client.get("/v1/assets/wing-1", headers=reader).headers["etag"], backend.changes.head("acme")
    before = client.get("/v1/assets/wing-1/state", headers=reader).json()
    move = {"type_name": "wing", "type_version": "1.1.0"}

    def diverged(asset, artifact, timeout_s=None):
        raise RetypeFailed("twin acme/wing-1 stays on its type version, serving as before: replaying its history "
                           "on wing@1.1.0 failed (FloatingPointError: diverged), and nothing was changed")

    monkeypatch.setattr(backend.twins, "retype", diverged)
    r = client.put("/v1/assets/wing-1", json=move, headers=admin)
    assert r.status_code == 409 and r.json()["error"]["message"].startswith("twin acme/wing-1 stays on its type"), r.text
    got = client.get("/v1/assets/wing-1", headers=reader)
    assert (got.json()["type_version"], got.headers["etag"], backend.changes.head("acme")) == ("1.0.0", etag, head)
    assert client.get("/v1/assets/wing-1/state", headers=reader).json() == before
    monkeypatch.undo()

    def store_down(*args):
        raise OSError("catalog store unreachable")

    monkeypatch.setattr(backend.catalog, "update_asset", store_down)
    wing = backend.get_asset("acme", "wing-1").model_copy(update={"type_version": "1.1.0"})
    with pytest.raises(OSError):
        backend.update_asset(wing, NO_PRECONDITION)  # the twin moved, the catalog did not
    assert client.get("/v1/assets/wing-1/state", headers=reader).json()["model_ref"] == "wing@1.1.0"
    assert client.get("/v1/assets/wing-1", headers=reader).json()["type_version"] == "1.0.0"
    monkeypatch.undo()
    r = client.put("/v1/assets/wing-1", json=move, headers=admin)
    assert r.status_code == 200, r.text
    assert client.get("/v1/assets/wing-1", headers=reader).json()["type_version"] == "1.1.0"
    moved = client.get("/v1/assets/wing-1/state", headers=reader).json()
    assert (moved["model_ref"], moved["revision"]) == ("wing@1.1.0", 20)


def test_a_migrated_twin_read_while_its_shard_is_down_answers_its_migrated_state(api):
    """Read from the store (its shard down or restarting), a migrated twin answered the previous version's last
    snapshot under the new version's names: a room at 294 K read T_air 294 degC, at that snapshot's revision.
    Until it has a snapshot of its own, it answers what it does live: its mapped state at the migration point."""
    from actors.recovery import durable_state

    client, auth, backend = api
    admin, reader = auth["admin"], auth["reader"]
    for version in (V1, V2):  # a type of its own, apart from the rooms the other tests move
        body = version.model_copy(update={"name": "annex"}).model_dump(mode="json")
        assert client.post("/v1/asset-types", json=body, headers=admin).status_code == 201
    r = client.post("/v1/assets", json={"id": "annex-1", "type_name": "annex", "type_version": "1.0.0",
                                        "initial_state": {"T": 293.15}}, headers=admin)
    assert r.status_code == 201, r.text
    history = room_events(0, 130, 294.0, at=T0 - timedelta(hours=1))  # more than the allowed lateness: a snapshot
    r = client.post("/v1/assets/annex-1/telemetry", json={"events": history}, headers=auth["writer"])
    assert r.json()["accepted"] == 130, r.text
    assert durable_state(backend.twins.store, "acme", "annex-1").revision == 64  # 1.0.0's, in K
    r = client.post("/v1/assets/annex-1/migrate", json={"type_version": "2.0.0", "states": {"T_air": {"from": "T"}}},
                    headers=admin)
    assert r.status_code == 200, r.text
    live = client.get("/v1/assets/annex-1/state", headers=reader).json()
    stale = durable_state(backend.twins.store, "acme", "annex-1").model_dump(mode="json")
    assert stale["stale"] and live["state"]["T_air"] == pytest.approx(294.0 - 273.15, abs=0.5)
    for field in ("model_ref", "revision", "event_time", "state", "std", "covariance", "divergence"):
        assert stale[field] == live[field], field


class _Crash(BaseException):
    """The backend's process dying at that point: nothing after it runs, no handler catches it."""


def test_a_type_delete_asks_the_shards_without_the_backend_lock_and_refuses_when_they_do_not_answer(api, monkeypatch):
    """The delete asked the shards whether twins run the version while holding the backend's lock: one hung shard
    stalled that delete and every write waiting on the lock. Asked without the lock now, with a deadline: the
    catalog stays usable meanwhile, and a shard that does not answer is a 503 that deleted nothing."""
    import threading

    from serve_apps.catalog import NO_PRECONDITION
    from serve_apps.shard_deadline import TwinUnavailable

    client, auth, backend = api
    assert client.post("/v1/asset-types", json={**V1.model_dump(mode="json"), "version": "1.0.9"},
                       headers=auth["admin"]).status_code == 201
    asked, answer, outcome = threading.Event(), threading.Event(), []

    class HungShards:
        def twins_running(self, tenant: str, ref: str, timeout_s: float) -> list[str]:
            asked.set()
            answer.wait(60)  # the test lets it "time out" once the lock was shown free
            raise ray.exceptions.GetTimeoutError(f"no answer within {timeout_s} s")

    def delete() -> None:
        try:
            backend.delete_type("acme", "room", "1.0.9", NO_PRECONDITION)
        except Exception as exc:  # noqa: BLE001 (the refusal is the outcome under test)
            outcome.append(exc)

    monkeypatch.setattr(type(backend.twins), "models", property(lambda self: HungShards()))
    deleting = threading.Thread(target=delete)
    deleting.start()
    try:
        assert asked.wait(60)
        assert "1.0.9" in [t.version for t in backend.list_types("acme", "room")]  # the lock is free meanwhile
    finally:
        answer.set()
        deleting.join(60)
    (refused,) = outcome
    assert isinstance(refused, TwinUnavailable) and refused.headers["Retry-After"]
    assert refused.message.startswith("asset type room@1.0.9 was not deleted: a twin shard did not answer within ")
    assert "1.0.9" in [t.version for t in backend.list_types("acme", "room")]  # nothing was deleted
    monkeypatch.undo()
    backend.delete_type("acme", "room", "1.0.9", NO_PRECONDITION)  # the shards answer: deleted
    assert "1.0.9" not in [t.version for t in backend.list_types("acme", "room")]


def test_a_twin_moved_before_a_catalog_write_that_did_not_follow_is_recorded_by_the_backend(api, monkeypatch):
    """The twin moves before the catalog is written: a failed catalog write, or a backend killed in between, left
    the twin on the new type version and the asset on the old until the same PUT was sent again, and nothing
    reconciled them at start. The move (a retype, a migration) is journaled now: a running backend records it on
    the asset's next read, a restarted one at start (audited as the system's, `recovered`); a move whose twin never
    moved is dropped.
    Another tenant's assets (globex), last in the module: the second backend bumps that tenant's revisions, and its
    changes take numbers the fixture's backend gives next, whose segments are then refused as another log's
    (`serve_apps.changes.ChangeStore.write`): a test after it failed with 503 `store_fenced`."""
    from contextlib import closing

    from raytwin.migration import MigrationRequest
    from serve_apps.backend import Backend
    from serve_apps.catalog import NO_PRECONDITION

    client, auth, backend = api
    admin = auth["other"]
    for t in (ROOM_V1, ROOM_SURFACE):
        body = AssetType.from_model(t, name="hall").model_dump(mode="json")
        assert client.post("/v1/asset-types", json=body, headers=admin).status_code == 201
    halls = ("hall-1", "hall-2", "hall-3", "hall-4")
    for hall in halls:
        r = client.post("/v1/assets", json={"id": hall, "type_name": "hall", "type_version": "1.0.0",
                                            "initial_state": {"T": 293.15}}, headers=admin)
        assert r.status_code == 201, r.text
        r = client.post(f"/v1/assets/{hall}/telemetry", json={"events": room_events(0, 12, 294.0)}, headers=admin)
        assert r.json()["accepted"] == 12, r.text
    moved = {hall: backend.get_asset("globex", hall).model_copy(update={"type_version": "1.1.0"}) for hall in halls}

    def crash(*args):
        raise _Crash

    def store_down(*args):
        raise OSError("catalog store unreachable")

    monkeypatch.setattr(backend.catalog, "update_asset", store_down)
    with pytest.raises(OSError):
        backend.update_asset(moved["hall-1"], NO_PRECONDITION)  # the twin moved, the catalog write failed
    with pytest.raises(OSError):  # a migration: the twin moved, the catalog write failed
        backend.evolution("migrate", "globex", "hall-4", MigrationRequest(type_version="1.1.0"), NO_PRECONDITION)
    monkeypatch.setattr(backend.catalog, "update_asset", crash)
    with pytest.raises(_Crash):
        backend.update_asset(moved["hall-2"], NO_PRECONDITION)  # the twin moved, the backend died
    monkeypatch.setattr(backend.twins, "retype", crash)
    with pytest.raises(_Crash):
        backend.update_asset(moved["hall-3"], NO_PRECONDITION)  # died after the journal, before the twin moved
    monkeypatch.undo()
    twin_versions = {hall: backend.twins.state("globex", hall).model_ref for hall in halls}
    assert twin_versions == {"hall-1": "hall@1.1.0", "hall-2": "hall@1.1.0", "hall-3": "hall@1.0.0",
                             "hall-4": "hall@1.1.0"}
    head = backend.changes.head("globex")

    got = client.get("/v1/assets/hall-1", headers=admin)  # the running backend records it on the next read
    assert got.json()["type_version"] == "1.1.0" and got.headers["etag"].startswith(f'"{head + 1}-')
    assert client.get("/v1/assets/hall-4", headers=admin).json()["type_version"] == "1.1.0"
    assert backend.changes.head("globex") == head + 2

    with closing(Backend(backend.config)) as restarted:  # what a new backend process finds in the store
        assert restarted.get_asset("globex", "hall-2").type_version == "1.1.0"
        assert restarted.get_asset("globex", "hall-3").type_version == "1.0.0"  # its twin never moved: nothing to do
        assert not restarted.moves.pending and not restarted.moves.fs.glob(f"{restarted.moves.root}/*/*.json")
        changes = restarted.changes.store.read("globex", head, 10)  # the durable log
        assert [(c.kind, c.asset_id, c.type_version) for c in changes] == [
            ("asset.updated", hall, "1.1.0") for hall in ("hall-1", "hall-4", "hall-2")]
        recovered = [a for a in client.get("/v1/audit", headers=admin).json()
                     if a["details"].get("recovered") and a["phase"] == "outcome"]  # each after its intent
        assert [(a["action"], a["target"], a["key_id"], a["details"]["from_version"], a["details"]["to_version"])
                for a in recovered] == [("asset.update", "hall-1", "system", "1.0.0", "1.1.0"),
                                        ("asset.migrate", "hall-4", "system", "1.0.0", "1.1.0"),
                                        ("asset.update", "hall-2", "system", "1.0.0", "1.1.0")]
        assert restarted.twins.state("globex", "hall-2").model_ref == "hall@1.1.0"
