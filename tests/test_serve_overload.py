"""Overload: the ingress gate refuses fast with Retry-After and recovers; the telemetry endpoint answers
429 while the shards are behind and loses nothing it accepted (serve_apps/admission.py).

Saturation is made deterministic, never timed: handlers block on an event (gate units) or the twin
shard's process is stopped with SIGSTOP (through Serve's HTTP proxy) until the test lets it go.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from pydantic import ValidationError

from raytwin.contracts import AssetType
from raytwin.sim import THERMAL_RC
from serve_apps.admission import Admission, AdmissionGate, Backlogged, BacklogGate
from serve_apps.auth import create_key
from serve_apps.config import ServeConfig
from tests.fixtures_serve import deployed
from tests.ray_metrics import total, wait_until

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


# ------------------------------------------------------------------ the gate, in process ----
class BlockingApp:
    """An ASGI app whose ``/block`` requests wait until `release` is set; others answer at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.blocked = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["path"] == "/block":
            self.blocked += 1
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


async def _until(check) -> None:
    while not check():
        await asyncio.sleep(0)


def _client(gate: AdmissionGate) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://gate")


def _assert_overloaded(resp: httpx.Response, retry_after: int) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == str(retry_after)
    error = resp.json()["error"]
    assert error["code"] == "overloaded" and error["request_id"] and "retry after" in error["message"]


def test_gate_refuses_when_full_serves_its_queue_in_order_and_recovers():
    async def scenario() -> None:
        app = BlockingApp()
        gate = AdmissionGate(app, Admission(max_concurrent=1, max_queued=1, max_wait_s=3600, retry_after_s=2))
        async with _client(gate) as http:
            holder = asyncio.create_task(http.get("/block"))
            await _until(lambda: app.blocked == 1)
            waiter = asyncio.create_task(http.get("/next"))
            await _until(lambda: len(gate.waiters) == 1)
            _assert_overloaded(await http.get("/refused"), retry_after=2)  # queue full: refused at once
            assert (await http.get("/v1/changes")).status_code == 200  # long-lived streams are not gated
            assert (await http.get("/v1/health")).status_code == 200  # nor is health: full is not dead
            assert not waiter.done()
            app.release.set()
            assert (await holder).status_code == 200
            assert (await waiter).status_code == 200  # the freed slot went to the waiter
            assert (await http.get("/after")).status_code == 200  # recovered
        assert gate.running == 0 and not gate.waiters

    asyncio.run(scenario())


def test_gate_refuses_a_request_whose_wait_exceeds_the_budget():
    async def scenario() -> None:
        app = BlockingApp()
        gate = AdmissionGate(app, Admission(max_concurrent=1, max_queued=8, max_wait_s=0.01, retry_after_s=1))
        async with _client(gate) as http:
            assert (await http.get("/warm")).status_code == 200  # a measured service time
            holder = asyncio.create_task(http.get("/block"))
            await _until(lambda: app.blocked == 1)
            _assert_overloaded(await http.get("/late"), retry_after=1)  # the slot never frees within 10 ms
            assert not gate.waiters
            gate.service_s = 1.0  # requests now hold a slot for a second: any wait is expected to blow the budget
            _assert_overloaded(await http.get("/expected-late"), retry_after=1)
            app.release.set()
            assert (await holder).status_code == 200
            assert (await http.get("/after")).status_code == 200
        assert gate.running == 0

    asyncio.run(scenario())


def test_a_waiter_whose_client_goes_away_leaves_the_queue():
    async def scenario() -> None:
        app = BlockingApp()
        gate = AdmissionGate(app, Admission(max_concurrent=1, max_queued=1, max_wait_s=3600))
        async with _client(gate) as http:
            holder = asyncio.create_task(http.get("/block"))
            await _until(lambda: app.blocked == 1)
            waiter = asyncio.create_task(http.get("/gone"))
            await _until(lambda: len(gate.waiters) == 1)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            assert not gate.waiters
            queued = asyncio.create_task(http.get("/queued"))  # its place is free again
            await _until(lambda: len(gate.waiters) == 1)
            app.release.set()
            assert (await queued).status_code == 200
            await holder
        assert gate.running == 0 and not gate.waiters

    asyncio.run(scenario())


def test_admission_settings_serve_would_refuse_are_refused_first():
    with pytest.raises(ValidationError, match="proxy_max_queued"):
        Admission(proxy_max_queued=0)
    assert ServeConfig(store_url="s", keys_file="k", admission={"max_wait_s": 0.02}).admission.max_wait_s == 0.02


def test_backlog_gate_admits_whole_batches_up_to_the_bound():
    gate = BacklogGate(max_events=10, retry_after_s=3)
    first = gate.reserve(25)  # more than the bound, but nothing pending: admitted
    with pytest.raises(Backlogged) as refused:
        gate.reserve(1)
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "3"}
    first()
    first()  # releasing twice releases once
    assert gate.pending == 0
    held = [gate.reserve(4), gate.reserve(6)]
    with pytest.raises(Backlogged):
        gate.reserve(1)
    held[0]()
    gate.reserve(4)
    assert gate.pending == 10


# -------------------------------------------------------- through Serve's HTTP proxy ----
@pytest.fixture(scope="module")
def service(serve_proxy, tmp_path_factory):
    """Serve with tiny limits: 2 requests per replica at once, no queue, a backlog of 10 events."""
    root = tmp_path_factory.mktemp("overload")
    keys_file = root / "keys.json"
    _, key = create_key(keys_file, "acme", "admin", owner="admin")
    config = {"store_url": str(root / "store"), "keys_file": str(keys_file), "twin_shards": 1, "state_cache_s": 0,
              "rate_per_s": 1e6, "rate_burst": 1_000_000, "namespace": "raytwin-overload-tests",
              "autoscaling": {"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 8},
              "admission": {"max_concurrent": 2, "max_queued": 0, "max_wait_s": 0, "telemetry_backlog_events": 10},
              "shard_read_timeout_s": 3.0, "shard_write_timeout_s": 6.0}
    with deployed(config, "raytwin-overload"), httpx.Client(
            base_url=serve_proxy, headers={"Authorization": f"Bearer {key}"}, timeout=120.0) as http:
        r = http.post("/v1/asset-types", json=AssetType.from_model(THERMAL_RC).model_dump(mode="json"))
        assert r.status_code == 201, r.text
        r = http.post("/v1/assets", json={"id": "zone-1", "type_name": "thermal_rc", "type_version": THERMAL_RC.version,
                                          "initial_state": {"T_in": 293.0, "T_m": 292.0}})
        assert r.status_code == 201, r.text
        yield http, config


def _events(start: int, n: int = 10) -> dict:
    return {"events": [{"sequence": k, "event_time": (T0 + timedelta(minutes=k)).isoformat(),
                        "measurements": {"T_in": {"value": 293.0 + 0.01 * k, "unit": "K"},
                                         "T_out": {"value": 5.0, "unit": "degC"}}} for k in range(start, start + n)]}


@contextmanager
def stopped_shard(config: dict) -> Iterator[None]:
    """The twin shard's process, stopped (SIGSTOP) for the block: everything sent to it waits."""
    import ray

    from actors.routing import shard_name

    shard = ray.get_actor(shard_name(f"{config['store_url']}/twins", 0, 1), namespace=config["namespace"])
    pid = ray.get(shard.pid.remote())
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _first_done(futures: dict) -> tuple[object, httpx.Response, object]:
    """(key, answer) of the request answered first while the other is held, and the held one's key."""
    done, held = wait(futures, return_when=FIRST_COMPLETED)
    assert len(done) == 1 and len(held) == 1
    (first,), (other,) = done, held
    return futures[first], first.result(), futures[other]


def test_shards_behind_get_429_then_the_gate_refuses_with_503_and_nothing_accepted_is_lost(service, ray_metrics_port):
    http, config = service
    assert http.post("/v1/assets/zone-1/telemetry", json=_events(0)).json()["accepted"] == 10
    post = lambda start: http.post("/v1/assets/zone-1/telemetry", json=_events(start))  # noqa: E731
    get = lambda: http.get("/v1/assets/zone-1/state")  # noqa: E731
    with ThreadPoolExecutor(4) as pool, stopped_shard(config):
        # one batch of 10 fills the backlog bound of 10 and waits for the stopped shard; the other is refused
        posts = {pool.submit(post, start): start for start in (10, 20)}
        refused, backlogged, _ = _first_done(posts)
        assert backlogged.status_code == 429 and backlogged.headers["retry-after"] == "1", backlogged.text
        error = backlogged.json()["error"]
        assert error["code"] == "backlogged" and error["details"][0]["backlog_events"] == 10
        # the held batch holds one of the replica's 2 slots, a read the other: the next request is shed
        gets = {pool.submit(get): i for i in range(2)}
        _, overloaded, _ = _first_done(gets)
        _assert_overloaded(overloaded, retry_after=1)
    held = [f for f in posts if posts[f] != refused][0].result()
    assert held.status_code == 200 and held.json()["accepted"] == 10
    assert all(f.result().status_code in (200, 503) for f in gets)
    again = http.post("/v1/assets/zone-1/telemetry", json=_events(refused)).json()
    assert (again["accepted"], again["duplicates"]) == (10, 0)  # the refused batch had not been accepted
    state = get()  # recovered at once; every accepted event applied
    assert state.status_code == 200 and state.json()["events_applied"] == 30
    wait_until(ray_metrics_port, lambda s: total(s, "ray_raytwin_admission_refused_total", gate="telemetry",
                                                  reason="backlog") >= 1
               and total(s, "ray_raytwin_admission_refused_total", gate="ingress") >= 1, "the refusals counted")


def test_a_hung_shard_is_read_stale_and_refuses_telemetry_until_it_answers_then_nothing_is_lost(service):
    """A shard alive to Ray but answering nothing (SIGSTOP: a frozen process) held every request to its twins
    without end, each holding an admission slot: a few of them and the replica refused everything, health
    included. Now a call it leaves unanswered past its deadline opens its breaker in the replica. (Health and
    readiness, not gated, are asked while the telemetry waits: each waits for the shard on its own deadline.)"""
    http, config = service
    post = lambda start: http.post("/v1/assets/zone-1/telemetry", json=_events(start))  # noqa: E731
    applied = http.get("/v1/assets/zone-1/state").json()["events_applied"]
    with ThreadPoolExecutor(2) as pool, stopped_shard(config):
        health, ready = pool.submit(http.get, "/v1/health"), pool.submit(http.get, "/v1/health/ready")
        late = post(100)  # waits out shard_write_timeout_s
        assert late.status_code == 503 and late.headers["retry-after"] == "2", late.text
        error = late.json()["error"]
        assert error["code"] == "twin_unavailable" and "resending telemetry is safe" in error["message"]
        read = http.get("/v1/assets/zone-1/state")  # the breaker is open: from the store at once
        assert read.status_code == 200 and read.headers["raytwin-stale"] == "true" and read.json()["stale"]
        refused = post(110)  # at once, before any work
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "twin_unavailable"
        cleared = http.post("/v1/assets/zone-1/drift/clear", json={"reason": "checked"})  # held a slot 23 s
        assert cleared.status_code == 503 and cleared.json()["error"]["code"] == "twin_unavailable", cleared.text
        what_if = http.post("/v1/scenarios", json={  # ran from the snapshot as if it were the live state
            "asset_id": "zone-1", "horizon_s": 600.0, "step_s": 60.0,
            "inputs": {n: {"kind": "constant", "value": 0.0, "unit": "W"} for n in ("Q_h", "Q_sol")}
            | {"T_out": {"kind": "constant", "value": 5.0, "unit": "degC"}}})
        assert what_if.status_code == 503 and "its live state is not known" in what_if.json()["error"]["message"]
        health = health.result()  # alive; its twin count left unanswered (shard_read_timeout_s)
        assert health.status_code == 200 and health.json()["status"] == "degraded", health.text
        ready = ready.result()  # its only shard answers no probe: out of the load balancer
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable", ready.text
        assert "no twin shard answers" in ready.json()["reason"], ready.text  # (the shards', not the store's)
    for _ in range(600):  # the held batch is applied when the shard answers, which closes the breaker
        state = http.get("/v1/assets/zone-1/state")
        if not state.json()["stale"]:
            break
    assert state.status_code == 200 and "raytwin-stale" not in state.headers
    assert http.get("/v1/health/ready").status_code == 200
    resent = [post(start).json() for start in (100, 110)]
    assert [(r["accepted"], r["duplicates"]) for r in resent] == [(0, 10), (10, 0)]  # late: applied; refused: not
    assert http.get("/v1/assets/zone-1/state").json()["events_applied"] == applied + 20
