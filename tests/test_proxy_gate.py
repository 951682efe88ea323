"""The proxy gate (serve_apps/proxy_gate.py) and the Serve environment RayTwin starts with (serve_env.py).

In process, without Ray: saturation is deterministic (handlers block on an event), never timed. That the
gate runs inside Serve's proxy is Serve's callback contract, checked here with Serve's own validator; a
real proxy runs it in `python -m benchmarks run overload` (a fresh Ray per setting is ~1-2 min on 2 cores,
too slow for the suite).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
from ray.serve._private.http_util import _apply_middlewares, validate_http_proxy_callback_return

from cluster.manifests import WRITABLE_ENV, render_raycluster
from cluster.spec import KEYS_FILE, parse_spec
from serve_apps import proxy_gate, serve_env
from serve_apps.admission import Admission
from serve_apps.config import Autoscaling
from serve_apps.limits import CLIENT_ID_HEADER, BodyLimitMiddleware, ClientRequestIdMarker
from serve_apps.proxy_gate import ProxyGate, proxy_middlewares
from tests.fixtures_cluster import spec_data
from tests.test_serve_overload import BlockingApp, _until


def _client(gate: ProxyGate) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://proxy")


async def _fill(gate: ProxyGate, app: BlockingApp, http: httpx.AsyncClient, n: int) -> list[asyncio.Task]:
    held = [asyncio.create_task(http.get("/block")) for _ in range(n)]
    await _until(lambda: app.blocked == n)
    assert gate.in_flight == n
    return held


def test_beyond_the_limit_the_proxy_refuses_at_once_with_retry_after_and_recovers() -> None:
    async def run() -> None:
        app = BlockingApp()
        gate = ProxyGate(app, max_in_flight=3, retry_after_s=2)
        async with _client(gate) as http:
            held = await _fill(gate, app, http, 3)
            refused = await http.post("/v1/assets/a/telemetry", content=b"{}")  # answered while 3 are held
            assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
            error = refused.json()["error"]
            assert error["code"] == "overloaded" and error["details"] == [{"retry_after_s": 2}]
            assert len(error["request_id"]) == 32 and "limit of 3 requests in flight" in error["message"]
            assert app.blocked == 3  # the app never saw it
            app.release.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]
            assert gate.in_flight == 0
            assert (await http.get("/v1/health")).status_code == 200

    asyncio.run(run())


def test_while_refusing_the_gate_holds_its_saturated_limit_then_returns_to_the_full_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_gate, "CALM_S", 0.2)

    async def run() -> None:
        app = BlockingApp()
        gate = ProxyGate(app, max_in_flight=3, saturated_in_flight=2)
        async with _client(gate) as http:
            held = await _fill(gate, app, http, 3)  # below capacity the full depth is admitted
            first = await http.get("/v1/assets")
            assert first.status_code == 503 and "limit of 3 requests" in first.json()["error"]["message"]
            app.release.set()
            await asyncio.gather(*held)
            app.release.clear()
            app.blocked = 0
            held = await _fill(gate, app, http, 2)  # within CALM_S of the refusal: 2 in flight is the limit
            second = await http.get("/v1/assets")
            assert second.status_code == 503 and "limit of 2 requests" in second.json()["error"]["message"]
            await asyncio.sleep(0.3)  # CALM_S without a refusal: the full limit again
            held.append(asyncio.create_task(http.get("/block")))
            await _until(lambda: app.blocked == 3)
            assert gate.in_flight == 3
            app.release.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]

    asyncio.run(run())


def test_the_saturated_limit_is_never_above_the_full_one() -> None:
    assert ProxyGate(BlockingApp(), max_in_flight=2, saturated_in_flight=5).saturated_in_flight == 2
    assert ProxyGate(BlockingApp(), max_in_flight=4).saturated_in_flight == 4


def test_serve_probes_and_the_change_stream_pass_a_full_gate() -> None:
    async def run() -> None:
        app = BlockingApp()
        gate = ProxyGate(app, max_in_flight=1)
        async with _client(gate) as http:
            held = await _fill(gate, app, http, 1)
            for path in ("/-/healthz", "/-/routes", "/v1/changes", "/raytwin/v1/changes"):
                assert (await http.get(path)).status_code == 200, path
            assert (await http.get("/v1/assets")).status_code == 503
            app.release.set()
            await asyncio.gather(*held)

    asyncio.run(run())


def test_a_failing_request_frees_its_place() -> None:
    async def failing(scope, receive, send) -> None:
        raise RuntimeError("replica gone")

    async def run() -> None:
        gate = ProxyGate(failing, max_in_flight=1)
        for _ in range(2):
            with pytest.raises(RuntimeError):
                await gate({"type": "http", "path": "/v1/assets", "method": "GET"}, None, None)
        assert gate.in_flight == 0

    asyncio.run(run())


@pytest.mark.parametrize("server", ["proxy", "replica"])
def test_refusals_are_recorded_under_the_gate_that_refused(monkeypatch: pytest.MonkeyPatch, server: str) -> None:
    recorded: list[tuple[str, float, dict]] = []

    def counter(name: str) -> SimpleNamespace:
        return SimpleNamespace(inc=lambda n=1, **tags: recorded.append((name, n, tags)),
                               zero=lambda *tag_sets: recorded.extend((name, 0, tags) for tags in tag_sets))

    monkeypatch.setattr(proxy_gate, "metrics", SimpleNamespace(ADMISSION_REFUSED=counter("refused"),
                                                               HTTP_REQUESTS=counter("requests")))

    async def run() -> None:
        app = BlockingApp()
        gate = ProxyGate(app, max_in_flight=1, server=server)
        async with _client(gate) as http:
            held = await _fill(gate, app, http, 1)
            await asyncio.gather(*(http.get("/v1/assets") for _ in range(3)))
            app.release.set()
            await asyncio.gather(*held)

    asyncio.run(run())
    assert recorded == [("refused", 0, {"gate": server, "reason": "in_flight"}),  # exported at 0 first
                        *[("refused", 1, {"gate": server, "reason": "in_flight"}),
                          ("requests", 1, {"route": "refused", "method": "GET", "status": "503"})] * 3]


def test_serves_callback_builds_the_gate_from_the_proxys_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(proxy_gate.MAX_IN_FLIGHT_ENV, "7")
    monkeypatch.setenv(proxy_gate.RETRY_AFTER_ENV, "3")
    [marker, middleware] = validate_http_proxy_callback_return(proxy_middlewares())  # Serve's own check of the hook
    assert marker.cls is ClientRequestIdMarker  # Serve wraps the gate around it: the gate is outermost
    gate = middleware.cls(BlockingApp(), *middleware.args, **middleware.kwargs)
    assert (gate.max_in_flight, gate.saturated_in_flight, gate.retry_after_s) == (7, 7, 3)  # unset: no lower limit
    monkeypatch.setenv(proxy_gate.SATURATED_IN_FLIGHT_ENV, "5")
    [_, middleware] = proxy_middlewares()
    assert middleware.cls(BlockingApp(), *middleware.args, **middleware.kwargs).saturated_in_flight == 5
    monkeypatch.setenv(proxy_gate.REPLICA_MAX_IN_FLIGHT_ENV, "2")
    monkeypatch.setattr(proxy_gate, "_in_replica", lambda: True)  # Serve calls the hook in a replica's own server
    [_, middleware] = proxy_middlewares()
    gate = middleware.cls(BlockingApp(), *middleware.args, **middleware.kwargs)
    assert (gate.max_in_flight, gate.saturated_in_flight, gate.server) == (2, 2, "replica")
    monkeypatch.undo()
    assert not proxy_gate._in_replica()  # this test's process is no Serve replica
    module, _, function = serve_env.environment()[serve_env.PROXY_CALLBACK_ENV].partition(":")
    assert (module, function) == (proxy_gate.__name__, proxy_middlewares.__name__)
    monkeypatch.setenv(proxy_gate.MAX_IN_FLIGHT_ENV, "lots")
    with pytest.raises(ValueError, match="RAYTWIN_PROXY_MAX_IN_FLIGHT must be a whole number, at least 1"):
        proxy_middlewares()
    monkeypatch.setenv(proxy_gate.MAX_IN_FLIGHT_ENV, "0")
    with pytest.raises(ValueError, match="at least 1, got '0'"):
        proxy_middlewares()


def test_the_app_behind_serve_records_the_clients_request_id_never_the_one_serve_makes_up() -> None:
    """Serve's own middleware (run here as Serve stacks it, inside the proxy callback's) fills a missing
    X-Request-ID with an id of its own before the app sees the request."""
    seen: list[tuple[list, str | None]] = []

    async def app(scope, receive, send) -> None:
        seen.append((scope["headers"], scope["state"]["client_request_id"]))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def ids(stack, *sent: dict[str, str]) -> list[str | None]:
        seen.clear()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=stack), base_url="http://proxy") as http:
            for headers in sent:
                await http.get("/v1/assets", headers=headers)
        return [client_id for _, client_id in seen]

    async def run() -> None:
        behind_serve = BodyLimitMiddleware(app, 1024, behind_serve=True)
        proxy = _apply_middlewares(behind_serve, proxy_middlewares())
        forged = {"X-RayTwin-Client-Request-ID": "forged"}
        assert await ids(proxy, {}, {"X-Request-ID": "trace-1", **forged}, {"X-Request-ID": "a b"}) == [
            None, "trace-1", None]
        made_up, marked = dict(seen[0][0])[b"x-request-id"], seen[1][0]
        assert made_up and [v for k, v in marked if k == CLIENT_ID_HEADER] == [b"trace-1"]  # the forged one replaced
        # without the callback the app cannot tell Serve's id from the client's: it records neither
        assert await ids(_apply_middlewares(behind_serve, []), {}, {"X-Request-ID": "trace-2"}) == [None, None]
        assert await ids(BodyLimitMiddleware(app, 1024), {"X-Request-ID": "trace-3"}, {}) == ["trace-3", None]

    asyncio.run(run())


def test_a_body_over_the_limit_is_counted_in_the_requests_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 413 is answered before routing, outside the request observer: it was logged but never counted, so the
    Requests panel and `ray_raytwin_http_requests_total` showed no 413 at all, declared or streamed."""
    from raytwin import metrics

    counted: list[dict[str, str]] = []
    monkeypatch.setattr(metrics.Metric, "inc", lambda m, value=1.0, **tags: counted.append(
        tags) if m is metrics.HTTP_REQUESTS else None)

    async def app(scope, receive, send) -> None:
        raise AssertionError("a body over the limit reached the app")

    async def run() -> None:
        transport = httpx.ASGITransport(app=BodyLimitMiddleware(app, 16))
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as http:
            assert (await http.post("/v1/assets/a/telemetry", content=b"x" * 17)).status_code == 413

    asyncio.run(run())
    assert counted == [{"route": "unmatched", "method": "POST", "status": "413"}]


def test_the_gate_is_sized_to_the_ingress_deployment_at_its_largest() -> None:
    assert proxy_gate.DEFAULT_MAX_IN_FLIGHT == 4 * 4  # ServeConfig's defaults
    env = serve_env.environment(Autoscaling(max_replicas=2), Admission(max_concurrent=5, retry_after_s=3))
    assert env == {serve_env.PROXY_CALLBACK_ENV: serve_env.PROXY_CALLBACK,
                   proxy_gate.MAX_IN_FLIGHT_ENV: str(2 * 5),
                   proxy_gate.SATURATED_IN_FLIGHT_ENV: str(2 * 4),  # one fewer per replica while refusing
                   proxy_gate.REPLICA_MAX_IN_FLIGHT_ENV: "5",  # a replica's own HTTP server: that replica alone
                   proxy_gate.REPLICA_SATURATED_IN_FLIGHT_ENV: "4",
                   proxy_gate.RETRY_AFTER_ENV: "3"}
    one_slot = serve_env.environment(Autoscaling(max_replicas=3), Admission(max_concurrent=1))
    assert one_slot[proxy_gate.SATURATED_IN_FLIGHT_ENV] == "3"  # never below one per replica


def test_the_serve_environment_reaches_local_ray_and_every_kuberay_container_unless_overridden() -> None:
    environ = {serve_env.PROXY_CALLBACK_ENV: ""}  # an operator who turned the gate off
    serve_env.apply(serve_env.environment(), environ)
    assert environ == {**serve_env.environment(), serve_env.PROXY_CALLBACK_ENV: ""}
    spec = spec_data(env={proxy_gate.RETRY_AFTER_ENV: "5"})
    spec["serve"] = {"args": {"autoscaling": {"max_replicas": 3}}}
    manifest = render_raycluster(parse_spec(spec))["spec"]
    containers = [manifest["headGroupSpec"]["template"]["spec"]["containers"][0],
                  *(g["template"]["spec"]["containers"][0] for g in manifest["workerGroupSpecs"])]
    for container in containers:
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env == {"RAYTWIN_API_KEYS_FILE": KEYS_FILE,  # the spec's keys_secret, mounted
                       serve_env.PROXY_CALLBACK_ENV: serve_env.PROXY_CALLBACK, proxy_gate.RETRY_AFTER_ENV: "5",
                       proxy_gate.MAX_IN_FLIGHT_ENV: str(3 * 4), proxy_gate.SATURATED_IN_FLIGHT_ENV: str(3 * 3),
                       proxy_gate.REPLICA_MAX_IN_FLIGHT_ENV: "4", proxy_gate.REPLICA_SATURATED_IN_FLIGHT_ENV: "3",
                       **WRITABLE_ENV}  # caches under the writable /tmp of a read-only root

