"""The FastAPI application: routes under /v1, errors, auth, limits and request metrics.

`create_api()` builds the app without touching Ray; an ingress replica attaches its `Services`
(`app.state.services`) before serving. That keeps the OpenAPI document reproducible
(`create_api().openapi()`) and the routes free of deployment wiring.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Header, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from raytwin import metrics
from serve_apps import (
    routes_catalog,
    routes_changes,
    routes_commands,
    routes_connectors,
    routes_evolution,
    routes_models,
    routes_query,
    routes_recalibration,
    routes_recommendations,
    routes_runs,
    routes_scenarios,
    routes_shadow,
    routes_twins,
)
from serve_apps.admission import Admission, AdmissionGate
from serve_apps.auth import BEARER_CHALLENGE, parse_credentials
from serve_apps.deprecation import ApiDeprecationHeaders
from serve_apps.deps import SVC, Services, audit_refusal
from serve_apps.errors import ERROR_RESPONSES, ApiError, Forbidden, Unauthorized, install_error_handlers
from serve_apps.json_route import JsonRoute
from serve_apps.limits import BodyLimitMiddleware
from serve_apps.private_answers import PrivateAnswers
from serve_apps.refused_credentials import log_refused_credential
from serve_apps.request_log import log_answer
from serve_apps.schemas import Health, StoreFence
from serve_apps.store_errors import StoreUnavailable

API_VERSION = "1.0.0"
CLIENT_CLOSED = 499
"""The status recorded for a request whose client went away before an answer (nginx's, as Serve logs it): not
a server error, so it does not burn the availability SLO's budget."""
SHARD_UNANSWERED = ("a twin shard left the count of live twins unanswered within shard_read_timeout_s: it is down, "
                    "restarting, hung or stopped; its twins' reads are stale and their writes refused "
                    "(`raytwin status`, ops/README.md#shards-down)")
"""Health's `reason` for `degraded` when the store is fine and a shard is why."""
NO_SHARD_ANSWERS = ("no twin shard answers within readiness_timeout_s: every one is down, restarting, stopped or "
                    "stuck in a call (`raytwin status`, ops/README.md#no-shard)")
"""Readiness's `reason` for `unavailable` when the store is fine and the shards are why."""


def create_api(max_body_bytes: int = 1_048_576, admission: Admission | None = None,
               behind_serve: bool = False) -> FastAPI:
    """The API; `admission`: the replica's overload gate (`serve_apps.admission`), outermost, so a
    refusal costs neither the body nor authentication. None: no gate (OpenAPI, in-process use).
    `behind_serve`: in a Serve replica, where Serve may have made up the ``X-Request-ID`` (see
    `serve_apps.limits.BodyLimitMiddleware`)."""
    app = FastAPI(
        title="RayTwin API", version=API_VERSION, responses=ERROR_RESPONSES,
        description=("Live digital twins and what-if scenarios. Authenticate with `Authorization: Bearer <key>`; "
                     "send bodies as `Content-Type: application/json`. Credentials are checked before the body. "
                     "The server decides ingest times and request ids (`X-RayTwin-Request-ID`, also in error "
                     "bodies and the audit log). Errors: `{\"error\": {code, message, details, request_id}}`."),
    )
    app.router.route_class = JsonRoute
    install_error_handlers(app)
    app.add_exception_handler(Forbidden, audit_refusal)
    app.add_exception_handler(Unauthorized, log_refused_credential)
    app.add_middleware(RequestObserver)
    app.add_middleware(ApiDeprecationHeaders)
    app.add_middleware(PrivateAnswers)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, behind_serve=behind_serve)
    if admission is not None:
        app.add_middleware(AdmissionGate, limits=admission)
    _ops_routes(app)
    for routes in (routes_catalog, routes_evolution, routes_twins, routes_scenarios, routes_models, routes_shadow,
                   routes_changes, routes_query):
        routes.register(app)
    for router in (routes_connectors.router, routes_commands.router, routes_recalibration.router,
                   routes_recommendations.router, routes_runs.router):
        app.include_router(router)
    return app


class RequestObserver:
    """Pure ASGI middleware: per-request metrics (route template, status, latency), recorded through
    `raytwin.metrics` so every replica's counts reach Ray's metrics export.

    Pure ASGI rather than ``@app.middleware("http")``: Starlette's `BaseHTTPMiddleware` runs the
    rest of the app in a separate task with a memory stream per request, which cost more CPU
    than the whole state route (README, "Performance"). Errors and state changes are logged with
    RayTwin's request id (`serve_apps.request_log`); Serve's access log has every request under
    Serve's own id.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status, started = 500, False

        async def send_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError:  # the client went away first: no server error (nginx's 499, as Serve logs it)
            if not started:
                status = CLIENT_CLOSED
            raise
        finally:
            seconds = time.perf_counter() - t0
            route, method = getattr(scope.get("route"), "path", "unmatched"), scope["method"]
            metrics.HTTP_REQUESTS.inc(route=route, method=method, status=str(status))
            metrics.HTTP_LATENCY.observe(seconds, route=route, method=method)
            log_answer(scope, status, seconds, route)


def _ops_routes(app: FastAPI) -> None:
    @app.get("/v1/health", response_model=Health, tags=["operations"], response_model_exclude_none=True)
    async def health(authorization: str | None = Header(None, description="`Bearer <API key>` (optional)"),
                     x_api_key: str | None = Header(None, description="The API key (optional)"),
                     svc: Services = SVC) -> Health:
        """Liveness, no API key needed (the backend answered); with a valid key also the caller's tenant's twin
        and job counts (an unknown key, or a credential that holds none such as `Authorization: Basic ...`: 401,
        as on every route; no credential at all: liveness alone). Counts summed over tenants would show every
        tenant's activity to anyone. Twins are counted by their shards: one that leaves the count unanswered past `shard_read_timeout_s` makes the
        status `degraded`, without `live_twins` (still 200: the service is alive). A service whose store another
        service took over (every write refused, 503 `store_fenced`) is `fenced` without asking the shards; with a
        key, `fenced` says why and which service holds the store now (not to anonymous callers: it names hosts). A
        store that fails or does not answer a read of its lease within `readiness_timeout_s` (an S3 outage), or
        takes no writes (a full disk: the shards' lease heartbeat stopped changing) makes it `degraded` with `reason` (still 200: a restart fixes no store, and a liveness probe must
        not restart every pod during an S3 brownout)."""
        key = parse_credentials(authorization, x_api_key)  # a credential that holds no key: 401, as on every route
        try:
            who = svc.keys.authenticate(key) if key else None
        except ApiError:  # the keys cannot be checked: still alive, counts for nobody
            who, key = None, None
        if key and who is None:  # a monitor holding a revoked or mistyped key must learn it, not read "ok"
            raise Unauthorized("unknown API key (leave it out for liveness alone)", headers=BEARER_CHALLENGE)
        jobs = await svc.backend.call("job_stats", who.tenant if who else None)
        fenced, store_down = await _store_fence(svc)
        if who is None:  # the store's URL and its holder's host are for the service's users only
            return Health(status="fenced" if fenced else "degraded" if store_down else "ok", reason=store_down)
        count = None if fenced else await svc.backend.call("live_twins", who.tenant, svc.config.shard_read_timeout_s)
        status = "fenced" if fenced else "ok" if count is not None and not store_down else "degraded"
        silent = SHARD_UNANSWERED if status == "degraded" and count is None else None
        return Health(status=status, tenant=who.tenant, live_twins=count, jobs=jobs["states"], fenced=fenced,
                      reason=store_down or silent)

    @app.get("/v1/health/ready", response_model=Health, tags=["operations"], response_model_exclude_none=True,
             responses={503: {"model": Health, "description": "Not ready: `fenced` or `unavailable`"}})
    async def ready(response: Response, svc: Services = SVC) -> Health:
        """Readiness, for a load balancer's health check or an orchestrator's readiness probe; no API key, and, like
        anonymous health, only a status (HEAD too). 200 `ok` while the service holds its store and a twin shard answers
        within `readiness_timeout_s` (0.5 s: a probe's own timeout is often 1 s); 503 `fenced` once another service took its store over (every write would fail with
        `store_fenced`) or `unavailable` when no shard answers (every one down, restarting, stopped, or stuck in one
        call over `readiness_stuck_s`, 120 s), or when the store fails, does not answer a read of its lease within
        `readiness_timeout_s` or takes no writes (`reason` says why: a full disk, an S3 endpoint down or hung). A shard answers beside its work: one busy with a backlog is ready.
        `/v1/health` stays the liveness check: a fenced or shardless service is alive, and restarting it fixes
        neither."""
        fenced, store_down = await _store_fence(svc)
        if fenced:
            status = "fenced"
        elif store_down or not await svc.backend.call("shards_answering", svc.config.readiness_timeout_s,
                                                      svc.config.readiness_stuck_s):
            status = "unavailable"
        else:
            return Health(status="ok")
        response.status_code = 503
        return Health(status=status, reason=store_down or (NO_SHARD_ANSWERS if status == "unavailable" else None))

    for path, probe in (("/v1/health", health), ("/v1/health/ready", ready)):  # load balancers and probes send HEAD
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)


async def _store_fence(svc: Services) -> tuple[StoreFence | None, str | None]:
    """(why the service lost its store, why the store does not answer or takes no writes): the store reads wait
    at most `readiness_timeout_s`, so a hung or refusing store never hangs nor fails a probe
    (`Backend.probe_store`)."""
    try:
        return await svc.backend.call("probe_store", svc.config.readiness_timeout_s), None
    except StoreUnavailable as exc:
        return None, exc.message
