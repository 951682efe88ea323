"""The cheapest refusal on Serve's proxy path: a concurrency gate inside each Serve HTTP proxy.

Serve's proxy spends ~2 ms of CPU on every request it routes, refusals from ``max_queued_requests``
included (request id, router, metrics, access log: benchmarks/RESULTS.md, "Overload through Serve's
proxy"), so past capacity its own core saturates on refusals and admitted requests queue behind
them. `ProxyGate` runs in the proxy as its outermost ASGI middleware (Serve's
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` hook, set by `serve_apps.serve_env`): when
``RAYTWIN_PROXY_MAX_IN_FLIGHT`` requests are in flight through this proxy, the next one gets 503
``overloaded`` with ``Retry-After`` before Serve parses, routes or logs it.

The limit (`max_in_flight`) is what the Ingress deployment works on at its largest: ``max_replicas`` x
``max_concurrent``; a request beyond it would only wait, and waiting adds latency without adding
throughput (measured against 4 and 24 more per replica: benchmarks/RESULTS.md, "Overload through
Serve's proxy"). Below ``max_replicas`` the replicas' own gate refuses the
rest (after the hop) while Serve scales out; a lower limit would stop the autoscaler from ever seeing
enough ongoing requests to add replicas.

While it is refusing, the gate admits ``RAYTWIN_PROXY_SATURATED_IN_FLIGHT`` (`saturated_in_flight`: one
request fewer per replica) until `CALM_S` passes without a refusal: past capacity each request more in
flight only adds its service time to every admitted request's wait (Little's law), while below capacity
the full depth absorbs bursts instead of refusing them.

Serve calls the same hook for an Ingress replica's own HTTP server when replicas answer HTTP themselves
(direct ingress, and Serve's HAProxy mode, where HAProxy forwards to those servers): there the gate
sits in front of Serve's hand-off to the app and is sized to one replica (``RAYTWIN_REPLICA_MAX_IN_FLIGHT``,
``RAYTWIN_REPLICA_SATURATED_IN_FLIGHT``), since each replica's server sees only its own requests. Without
it, past capacity requests queued in the replica's server for seconds before the app's own gate could
refuse them (benchmarks/RESULTS.md, "HAProxy in front of the replicas").

Serve's health and route probes (``/-/...``), the change stream (long-lived SSE) and ``/v1/health`` pass ungated.
Refusals are counted in ``raytwin_admission_refused_total{gate="proxy", reason="in_flight"}``
(``gate="replica"`` for a replica's own server, so an operator sees which one shed); `raytwin.metrics`
sums them in the process and hands Ray the sums twice a second, so a refusal costs no Ray call.
"""

from __future__ import annotations

import asyncio
import os
import uuid

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from raytwin import metrics
from serve_apps.admission import UNGATED_PATHS, Admission, overload_body
from serve_apps.config import Autoscaling
from serve_apps.limits import client_request_id_middlewares

MAX_IN_FLIGHT_ENV = "RAYTWIN_PROXY_MAX_IN_FLIGHT"
SATURATED_IN_FLIGHT_ENV = "RAYTWIN_PROXY_SATURATED_IN_FLIGHT"
REPLICA_MAX_IN_FLIGHT_ENV = "RAYTWIN_REPLICA_MAX_IN_FLIGHT"
REPLICA_SATURATED_IN_FLIGHT_ENV = "RAYTWIN_REPLICA_SATURATED_IN_FLIGHT"
RETRY_AFTER_ENV = "RAYTWIN_PROXY_RETRY_AFTER_S"


def max_in_flight(autoscaling: Autoscaling, admission: Admission) -> int:
    """The proxy's limit for an Ingress deployment with these settings (see the module docstring)."""
    return autoscaling.max_replicas * admission.max_concurrent


def saturated_in_flight(autoscaling: Autoscaling, admission: Admission) -> int:
    """The proxy's limit while it refuses: one request fewer per replica (at least one). Measured on one
    replica (benchmarks/RESULTS.md, "A lower limit while refusing"): at 2x and 5x capacity the admitted
    p95 fell from 22-35 to 18-26 ms for ~6 % fewer answers, with no refusals at half load."""
    return autoscaling.max_replicas * max(1, admission.max_concurrent - 1)


ONE_REPLICA = Autoscaling(min_replicas=1, max_replicas=1)
"""What a replica's own HTTP server sizes its gate for: the replica alone."""
DEFAULT_MAX_IN_FLIGHT = max_in_flight(Autoscaling(), Admission())
DEFAULT_REPLICA_MAX_IN_FLIGHT = max_in_flight(ONE_REPLICA, Admission())
DEFAULT_RETRY_AFTER_S = Admission().retry_after_s
CALM_S = 1.0
"""After a refusal the gate holds its saturated limit until this long has passed without one."""
UNGATED_SUFFIXES = tuple(UNGATED_PATHS)
"""The proxy sees the full path, the app's route prefix included."""
SERVE_PATHS = "/-/"
"""Serve's own probes (``/-/healthz``, ``/-/routes``): never refused, or an overloaded proxy looks dead."""


class ProxyGate:
    """Pure ASGI middleware: refuse (503 + ``Retry-After``) beyond `max_in_flight` requests in flight,
    and beyond `saturated_in_flight` (default: the same) while it is refusing: once the service is at
    capacity, fewer requests in flight keep admitted requests' queueing short, while below capacity the
    full depth absorbs bursts instead of refusing them. The gate stays saturated until `CALM_S` passes
    without a refusal.

    A place is held until Serve's ASGI call returns, a little after the response's last byte (Serve's own
    work per request): freeing it with the last byte was measured (2026-12-04, benchmarks/RESULTS.md, "HAProxy
    in front of the replicas") and let in more than the server could finish: ~16 % fewer answers at 5x
    capacity through the proxy, more refusals at 1x. So a client that sends the next request the moment an
    answer arrives can be refused at a limit of 1.

    Runs on the proxy's event loop only, so plain counters need no lock.
    """

    def __init__(self, app: ASGIApp, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 retry_after_s: int = DEFAULT_RETRY_AFTER_S, saturated_in_flight: int | None = None,
                 server: str = "proxy"):
        self.app = app
        self.server = server  # named in refusals: "proxy", or "replica" for a replica's own HTTP server
        self.max_in_flight = max_in_flight
        self.saturated_in_flight = min(saturated_in_flight or max_in_flight, max_in_flight)
        self.saturated_until = float("-inf")  # event-loop time until which the saturated limit holds
        self.retry_after = str(retry_after_s).encode()
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        metrics.ADMISSION_REFUSED.zero({"gate": server, "reason": "in_flight"})  # a first burst shows in rate()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._ungated(scope["path"]):
            await self.app(scope, receive, send)
            return
        now = asyncio.get_running_loop().time()
        limit = self.saturated_in_flight if now < self.saturated_until else self.max_in_flight
        if self.in_flight >= limit:
            self.saturated_until = now + CALM_S
            await self._refuse(scope["method"], send, limit)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    @staticmethod
    def _ungated(path: str) -> bool:
        """Serve's probes, and the change stream and health route under any application route prefix."""
        return path.startswith(SERVE_PATHS) or path.endswith(UNGATED_SUFFIXES)

    async def _refuse(self, method: str, send: Send, limit: int) -> None:
        metrics.ADMISSION_REFUSED.inc(gate=self.server, reason="in_flight")
        metrics.HTTP_REQUESTS.inc(route="refused", method=method, status="503")
        body = overload_body("overloaded", f"the service is at capacity (this {self.server}'s limit of {limit} "
                             f"requests in flight); retry after {self.retry_after_s} s",
                             uuid.uuid4().hex, self.retry_after_s)
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", self.retry_after)]})
        await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_apps.proxy_gate:proxy_middlewares``):
    `serve_apps.limits.ClientRequestIdMarker` (the client's own request id), then the gate, sized by
    ``RAYTWIN_PROXY_MAX_IN_FLIGHT``, ``RAYTWIN_PROXY_SATURATED_IN_FLIGHT`` (unset: no lower limit while refusing)
    and ``RAYTWIN_PROXY_RETRY_AFTER_S`` from the proxy's environment; in a replica's own HTTP server by the
    ``RAYTWIN_REPLICA_*`` pair instead."""
    server, (full, saturated, default) = (
        ("replica", (REPLICA_MAX_IN_FLIGHT_ENV, REPLICA_SATURATED_IN_FLIGHT_ENV, DEFAULT_REPLICA_MAX_IN_FLIGHT))
        if _in_replica() else ("proxy", (MAX_IN_FLIGHT_ENV, SATURATED_IN_FLIGHT_ENV, DEFAULT_MAX_IN_FLIGHT)))
    limit = _setting(full, default)
    return [*client_request_id_middlewares(),  # Serve wraps each in the next: the gate stays outermost
            Middleware(ProxyGate, max_in_flight=limit, retry_after_s=_setting(RETRY_AFTER_ENV, DEFAULT_RETRY_AFTER_S),
                       saturated_in_flight=_setting(saturated, limit), server=server)]


def _in_replica() -> bool:
    """Whether Serve calls the hook for a replica's own HTTP server (it does so in the replica's process)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:
        return False
    return True


def _setting(env: str, default: int) -> int:
    raw = os.environ.get(env)
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{env} must be a whole number, at least 1, got {raw!r}; unset it for {default}")
    return int(raw)
