"""Asset queries, graph walks and bulk jobs over real HTTP (Ray Serve, live twins), through httpx and
the SDK; the language itself is tested against brute force in tests/test_query.py."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import ray

from actors.routing import shard_name
from client import AsyncRayTwinClient, RayTwinClient
from client.errors import InvalidRequest
from tests.test_serve_api import THERMAL_TYPE, api, assert_error, auth, http  # noqa: F401  (module fixtures)

VERSION = THERMAL_TYPE["version"]
EXAMPLE = 'type == "thermal_rc" and metadata.site == "north" and state.T_in > 298.15'
# id -> (metadata, relationships, T_in): the expected answers below are read off this table
ZONES = {
    "site-1": ({"kind": "site"}, [], 290.0),
    "z1": ({"site": "north"}, [("part_of", "site-1")], 300.0),
    "z2": ({"site": "north"}, [("part_of", "site-1")], 297.0),
    "z3": ({"site": "south"}, [], 301.0),
    "z4": ({"site": "north"}, [], 299.5),
    "z5": ({}, [], 305.0),
    "ahu-1": ({"site": "north"}, [("part_of", "site-1"), ("feeds", "z1"), ("feeds", "z2")], 295.0),
}


def create(http, headers, asset_id: str, metadata: dict, rels: list, t_in: float) -> None:
    body = {"id": asset_id, "type_name": "thermal_rc", "type_version": VERSION, "metadata": metadata,
            "relationships": [{"kind": k, "target": t} for k, t in rels],
            "initial_state": {"T_in": t_in, "T_m": 290.0}}
    r = http.post("/v1/assets", json=body, headers=headers)
    assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def zones(api, http):  # noqa: F811
    """Tenant acme: the ZONES table; tenant globex: one zone that matches every acme query."""
    for name in ("admin", "other"):
        assert http.post("/v1/asset-types", json=THERMAL_TYPE, headers=auth(api, name)).status_code == 201
    for asset_id, (metadata, rels, t_in) in ZONES.items():
        create(http, auth(api, "admin"), asset_id, metadata, rels, t_in)
    create(http, auth(api, "other"), "zg", {"site": "north"}, [], 300.0)
    return ZONES


def query(http, headers, **body):
    r = http.post("/v1/query", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def test_query_filters_on_catalog_and_live_state(api, http, zones):  # noqa: F811
    reader = auth(api, "reader")
    page = query(http, reader, q=EXAMPLE, sort=["-state.T_in"], fields=["metadata.site", "state.T_in"])
    assert page == {"matched": 2, "next_cursor": None, "items": [
        {"id": "z1", "metadata": {"site": "north"}, "state": {"T_in": 300.0}},
        {"id": "z4", "metadata": {"site": "north"}, "state": {"T_in": 299.5}}]}
    feeders = query(http, reader, q='relationships.feeds == "z2" or metadata.site in ["south"]')
    assert [i["id"] for i in feeders["items"]] == ["ahu-1", "z3"]
    assert feeders["items"][0]["relationships"] == {"part_of": ["site-1"], "feeds": ["z1", "z2"]}
    assert [i["id"] for i in query(http, reader, q="not exists(metadata.site)")["items"]] == ["site-1", "z5"]


def test_pages_follow_the_cursor_and_cursors_are_checked(api, http, zones):  # noqa: F811
    reader, other = auth(api, "reader"), auth(api, "other")
    body = {"q": "state.T_in > 0", "sort": ["-state.T_in"], "fields": ["state.T_in"], "limit": 3}
    seen, cursors = [], [None]
    while True:
        page = query(http, reader, **body, cursor=cursors[-1])
        assert page["matched"] == len(ZONES)
        seen += [i["id"] for i in page["items"]]
        if page["next_cursor"] is None:
            break
        cursors.append(page["next_cursor"])
    assert seen == sorted(ZONES, key=lambda a: -ZONES[a][2]) and len(cursors) == 3
    first_cursor = cursors[1]
    err = assert_error(http.post("/v1/query", json={**body, "cursor": first_cursor[:-3] + "abc"}, headers=reader),
                       422, "invalid_request")
    assert err["details"][0]["in"] == "cursor" and "altered" in err["message"]
    err = assert_error(http.post("/v1/query", json={**body, "cursor": first_cursor}, headers=other),
                       422, "invalid_request")  # another tenant's cursor, same query: refused
    assert "another query" in err["message"]


def test_malformed_queries_get_422_with_the_position(api, http, zones):  # noqa: F811
    reader = auth(api, "reader")
    q = 'type == "thermal_rc" and'
    err = assert_error(http.post("/v1/query", json={"q": q}, headers=reader), 422, "invalid_request")
    assert err["details"] == [{"in": "q", "position": len(q), "reason": err["details"][0]["reason"]}]
    assert "expected a field" in err["message"] and f"at character {len(q)}" in err["message"]
    err = assert_error(http.post("/v1/query", json={"q": "", "sort": ["id", "colour"]}, headers=reader),
                       422, "invalid_request")
    assert err["details"][0]["in"] == "sort[1]" and "unknown field 'colour'" in err["message"]
    assert_error(http.post("/v1/query", json={"q": "", "limit": 0}, headers=reader), 422, "invalid_request")


def test_queries_never_reach_another_tenant(api, http, zones):  # noqa: F811
    mine = query(http, auth(api, "other"), q=EXAMPLE, fields=["state"])
    assert mine["matched"] == 1 and mine["items"][0]["id"] == "zg"  # acme's z1, z4 match too, but are not theirs
    assert query(http, auth(api, "other"), q='id == "z1"')["matched"] == 0
    assert_error(http.get("/v1/assets/site-1/graph", headers=auth(api, "other")), 404, "not_found")


def test_graph_walks_descendants_ancestors_and_feeds_paths(api, http, zones):  # noqa: F811
    reader = auth(api, "reader")
    down = http.get("/v1/assets/site-1/graph", headers=reader).json()
    assert [(n["id"], n["depth"]) for n in down["nodes"]] == [("ahu-1", 1), ("z1", 1), ("z2", 1)]
    up = http.get("/v1/assets/z2/graph", params={"direction": "ancestors", "kind": "feeds"}, headers=reader).json()
    assert up["nodes"] == [{"id": "ahu-1", "depth": 1, "path": ["z2", "ahu-1"], "kinds": ["feeds"]}]
    deep = http.get("/v1/assets/z1/graph", params={"direction": "ancestors", "depth": 1}, headers=reader).json()
    assert [n["id"] for n in deep["nodes"]] == ["ahu-1", "site-1"] and deep["truncated"] is False
    assert_error(http.get("/v1/assets/z1/graph", params={"depth": 0}, headers=reader), 422, "invalid_request")


def test_the_sdk_iterates_pages_sync_and_async(api, zones):  # noqa: F811
    base, keys = api[0], api[1]
    order = sorted(ZONES, key=lambda a: -ZONES[a][2])
    with RayTwinClient(base, keys["reader"]) as sdk:
        items = list(sdk.query("exists(state.T_in)", sort=["-state.T_in"], fields=["state.T_in"], page_size=2))
        assert [i["id"] for i in items] == order and items[0]["state"] == {"T_in": 305.0}
        assert [n.id for n in sdk.asset_graph("z1", "ancestors", kinds=["feeds"]).nodes] == ["ahu-1"]
        with pytest.raises(InvalidRequest) as err:
            list(sdk.query("state.T_in >"))
        assert err.value.details[0]["position"] == len("state.T_in >")
        with pytest.raises(InvalidRequest) as err:  # a typo matched nothing (the backend's catalog pass refuses it)
            list(sdk.query("state.T_inn > 1"))
        assert err.value.details[0]["known"] == ["T_in", "T_m"]

    async def collect() -> list[str]:
        async with AsyncRayTwinClient(base, keys["reader"]) as aio:
            return [i["id"] async for i in aio.query("", sort=["-state.T_in"], page_size=3)]

    assert asyncio.run(collect()) == order


def finished(http, headers, job_id: str) -> dict:
    """The job once it left the queue (polled; the job itself decides when)."""
    for _ in range(1200):
        job = http.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} still {job['state']}")


def test_bulk_tag_runs_as_a_job_with_a_report_of_each_item(api, http, zones):  # noqa: F811
    writer, reader = auth(api, "writer"), auth(api, "reader")
    body = {"q": 'metadata.site == "north" and state.T_in > 298.15', "action": "tag", "set": {"band": "warm"}}
    r = http.post("/v1/bulk", json=body, headers=writer)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["total"] == 2 and accepted["status_url"] == f"/v1/jobs/{accepted['job_id']}"
    job = finished(http, reader, accepted["job_id"])
    assert job["state"] == "succeeded" and job["kind"] == "bulk"
    assert job["bulk"] == {"total": 2, "done": 2, "changed": 2, "unchanged": 0, "failed": 0}
    report = http.get(accepted["report_url"], headers=reader).json()
    assert [(i["asset_id"], i["outcome"]) for i in report["items"]] == [("z1", "changed"), ("z4", "changed")]
    results = assert_error(http.get(f"/v1/jobs/{accepted['job_id']}/results", headers=reader), 404, "not_found")
    assert results["message"].endswith(f"its outcome per asset is at /v1/jobs/{accepted['job_id']}/report")
    z1 = http.get("/v1/assets/z1", headers=reader)
    assert z1.json()["metadata"] == {"site": "north", "band": "warm"}
    assert z1.headers["etag"].startswith(f'"{report["items"][0]["revision"]}-')  # "<revision>-<digest>"
    assert [i["id"] for i in query(http, reader, q='metadata.band == "warm"')["items"]] == ["z1", "z4"]

    # again: nothing to change; metadata the twin refuses fails its items only
    again = http.post("/v1/bulk", json={**body, "q": 'id in ["z1", "z2"]'}, headers=writer).json()
    refused = http.post("/v1/bulk", json={"q": 'id == "z3"', "action": "tag", "set": {"filter": "particle"}},
                        headers=writer).json()
    assert finished(http, reader, again["job_id"])["bulk"]["unchanged"] == 1
    outcomes = http.get(again["report_url"], headers=reader).json()["items"]
    assert [(i["asset_id"], i["outcome"]) for i in outcomes] == [("z1", "unchanged"), ("z2", "changed")]
    assert finished(http, reader, refused["job_id"])["bulk"]["failed"] == 1
    (item,) = http.get(refused["report_url"], headers=reader).json()["items"]
    assert item["outcome"] == "failed" and "filter='particle' is not a filter" in item["error"]

    audit = http.get("/v1/audit", headers=auth(api, "admin")).json()
    updates = [a for a in audit if a["action"] == "asset.update" and a["details"]["bulk"]["job_id"] ==
               accepted["job_id"]]  # each item audited before it acts: its intent, then its outcome
    assert sorted((a["target"], a["phase"]) for a in updates) == [
        ("z1", "intent"), ("z1", "outcome"), ("z4", "intent"), ("z4", "outcome")]
    assert all(a["role"] == "writer" for a in updates)
    assert all(a["details"]["status"] == "done" for a in updates if a["phase"] == "outcome")
    assert any(a["action"] == "bulk.submit" and a["target"] == accepted["job_id"] for a in audit)

    assert_error(http.post("/v1/bulk", json={"q": "", "action": "delete"}, headers=writer), 403, "forbidden")
    assert_error(http.post("/v1/bulk", json={"q": "", "action": "tag", "set": {"a": "b"}}, headers=reader),
                 403, "forbidden")
    err = assert_error(http.post("/v1/bulk", json={"q": "id ==", "action": "tag", "set": {"a": "b"}},
                                 headers=writer), 422, "invalid_request")
    assert err["details"][0]["position"] == 5
    both = assert_error(http.post("/v1/bulk", json={"q": "", "action": "tag", "set": {"site": "x", "floor": "2"},
                                                    "unset": ["floor"]}, headers=writer), 422, "invalid_request")
    assert "['floor'] in both `set` and `unset`" in both["message"]
    assert both["details"] == [{"in_set_and_unset": ["floor"]}]
    other = assert_error(http.get(f"/v1/jobs/{accepted['job_id']}/report", headers=auth(api, "other")),
                         404, "not_found")
    assert accepted["job_id"] in other["message"]


def test_while_the_twin_shard_restarts_queries_and_reads_answer_stale_state_and_say_so(api, http, zones):  # noqa: F811
    """Last in the module: it SIGKILLs the module's one twin shard. The query waits for no restart."""
    reader = auth(api, "reader")
    body = {"q": EXAMPLE, "sort": ["-state.T_in"], "fields": ["state.T_in"]}
    live = query(http, reader, **body)
    assert live["items"] == [{"id": "z1", "state": {"T_in": 300.0}}, {"id": "z4", "state": {"T_in": 299.5}}]
    shard = ray.get_actor(shard_name(f"{api[2] / 'store'}/twins", 0, 1), namespace="raytwin-serve-tests")
    os.kill(ray.get(shard.pid.remote()), signal.SIGKILL)
    time.sleep(0.2)  # past the ingress's state cache (0.1 s)
    r = http.post("/v1/query", json=body, headers=reader)
    assert r.status_code == 200 and r.headers.get("RayTwin-Stale") == "true", r.text
    assert r.json()["items"] == [{**item, "stale": True} for item in live["items"]]  # the twins' durable state
    one = http.get("/v1/assets/z1/state", headers=reader)
    assert one.status_code == 200 and one.headers.get("RayTwin-Stale") == "true" and one.json()["stale"]
    deadline = time.monotonic() + 120
    while (r := http.post("/v1/query", json=body, headers=reader)).headers.get("RayTwin-Stale"):
        assert time.monotonic() < deadline, "the restarted shard never answered"
        time.sleep(0.2)
    assert r.json() == live  # live again: no item says stale
