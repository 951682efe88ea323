"""The FastAPI application: routes under /v1, errors, auth, limits and metrics.

`create_api()` builds the app without touching Ray; an ingress replica attaches its `Services`
(`app.state.services`) before serving. That keeps the OpenAPI document reproducible
(`create_api().openapi()`) and the routes free of deployment wiring.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_apps import routes_catalog, routes_changes, routes_scenarios, routes_twins
from serve_apps.deps import SVC, Services
from serve_apps.errors import (
    ERROR_RESPONSES,
    ApiError,
    TooDeeplyNested,
    Unprocessable,
    UnsupportedMediaType,
    install_error_handlers,
)
from serve_apps.limits import BodyLimitMiddleware
from serve_apps.schemas import Health

API_VERSION = "1.0.0"
MAX_JSON_DEPTH = 200
"""Nesting levels a JSON body may have: pydantic-core's parser refuses deeper documents (a fixed
limit of its own, pinned by tests/test_serve_api.py); RayTwin's bodies need fewer than 10."""


def create_api(max_body_bytes: int = 1_048_576) -> FastAPI:
    app = FastAPI(
        title="RayTwin API", version=API_VERSION, responses=ERROR_RESPONSES,
        description=("Live digital twins and what-if scenarios. Authenticate with `Authorization: Bearer <key>`; "
                     "send bodies as `Content-Type: application/json`. Credentials are checked before the body. "
                     "The server decides ingest times and request ids (`X-RayTwin-Request-ID`, also in error "
                     "bodies and the audit log). Errors: `{\"error\": {code, message, details, request_id}}`."),
    )
    app.router.route_class = JsonRoute
    install_error_handlers(app)
    app.add_middleware(RequestObserver)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    _ops_routes(app)
    for routes in (routes_catalog, routes_twins, routes_scenarios, routes_changes):
        routes.register(app)
    return app


class JsonRoute(APIRoute):
    """A route whose JSON body is parsed once, and whose body errors are answered after authentication.

    FastAPI parses a body before it runs the route's dependencies, so a malformed body got 422
    before the credentials were looked at, telling an anonymous caller about the schema. Here a
    body that is not declared JSON (415 `unsupported_media_type`), nests deeper than
    `MAX_JSON_DEPTH` (400 `too_deeply_nested`) or is malformed (422 `invalid_request`) is handed
    on as *no* body, its error kept in ``request.state.body_error``: the dependencies
    (credentials, rate limit, role) run first and may answer 401/429/403; otherwise the missing
    (required) body fails validation and the validation handler answers with the kept error.
    A good body is parsed once, by pydantic-core (faster than `json.loads`, refuses NaN and
    Infinity, bounded recursion), and FastAPI gets the parsed value.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def parse_then_handle(request: Request) -> Response:
            return await handler(await _parsed(request))

        return parse_then_handle


class _ParsedRequest(Request):
    """A request whose body was read and parsed already (FastAPI asks for both)."""

    def __init__(self, request: Request, body: bytes, value: Any):
        super().__init__(request.scope, request.receive)
        self._raw, self._value = body, value

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._value


async def _parsed(request: Request) -> Request:
    body = await request.body()
    if not body:
        return request  # FastAPI reports a missing required body, after the dependencies
    content_type = request.headers.get("content-type", "")
    error: ApiError
    if not _is_json(content_type):
        error = UnsupportedMediaType(f"the body must be JSON sent with `Content-Type: application/json` "
                                     f"(got {content_type or 'no Content-Type'!r})")
    else:
        try:
            return _ParsedRequest(request, body, pydantic_core.from_json(body, allow_inf_nan=False))
        except ValueError as exc:
            if "recursion limit" in str(exc):
                error = TooDeeplyNested(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels",
                                        details=[{"max_depth": MAX_JSON_DEPTH}])
            else:
                error = Unprocessable(f"<body>: malformed JSON: {exc}", details=[
                    {"loc": ["body"], "msg": f"JSON decode error: {exc}", "type": "json_invalid"}])
    request.state.body_error = error
    return _ParsedRequest(request, b"", None)


def _is_json(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json``, with any parameters (charset)."""
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class RequestObserver:
    """Pure ASGI middleware: per-request metrics (route template, status, latency).

    Pure ASGI rather than ``@app.middleware("http")``: Starlette's `BaseHTTPMiddleware` runs the
    rest of the app in a separate task with a memory stream per request, which cost more CPU
    than the whole state route (README, "Performance"). The per-request log line is Serve's
    access log (request id, method, route, status, latency; on by default, see README).
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - t0
            path = getattr(scope.get("route"), "path", "unmatched")
            svc = getattr(scope["app"].state, "services", None)
            if svc is not None:
                svc.metrics.observe_request(scope["method"], path, status, seconds)


def _ops_routes(app: FastAPI) -> None:
    @app.get("/v1/health", response_model=Health, tags=["operations"])
    async def health(svc: Services = SVC) -> Health:
        """Liveness and the cluster-wide counts (no API key needed)."""
        jobs = await svc.backend.call("job_stats")
        return Health(status="ok", live_twins=await svc.backend.call("live_twins"), jobs=jobs["states"])

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
    async def metrics(svc: Services = SVC) -> Response:
        """Prometheus metrics of the replica that answers, plus cluster-wide twin and job gauges."""
        svc.metrics.set_cluster(await svc.backend.call("live_twins"), await svc.backend.call("job_stats"))
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)
