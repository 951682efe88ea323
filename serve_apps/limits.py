"""Protection for replicas: a body-size limit, a per-key token bucket and a command value's size limit.

The body limit is enforced twice: on ``Content-Length`` (refused before reading) and on the bytes
actually streamed (chunked uploads or a lying header), so a replica never buffers more than the
limit. Rate limits are token buckets per API key *per ingress replica*: with N replicas a key may
get up to N times the configured rate cluster-wide (documented; a shared limiter would put a
network round trip on every request).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from raytwin import metrics
from serve_apps.errors import PayloadTooLarge
from serve_apps.request_log import log_answer


REQUEST_ID_HEADER = b"x-raytwin-request-id"
CLIENT_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
"""What is kept of a client's ``X-Request-ID``: 1-128 printable ASCII characters, no spaces."""
X_REQUEST_ID = b"x-request-id"
CLIENT_ID_HEADER = b"x-raytwin-client-request-id"
"""How the client's own ``X-Request-ID`` reaches an app behind Serve (`ClientRequestIdMarker`): empty
when the client sent none."""


class ClientRequestIdMarker:
    """Pure ASGI middleware for Serve's HTTP servers: copies the client's ``X-Request-ID`` to
    `CLIENT_ID_HEADER` (empty when it sent none), replacing any such header the client sent.

    Serve's own ``RequestIdMiddleware`` (Ray 2.60, ``serve/_private/http_util.py``) fills a missing
    ``X-Request-ID`` with an id it makes up before the request reaches a replica, so the app cannot
    tell the client's id from Serve's. Serve applies the proxy callback's middlewares (see
    `serve_apps.proxy_gate.proxy_middlewares`) outside its own, so this one sees the request as the
    client sent it; the proxy forwards the changed headers to the replica with the request.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != CLIENT_ID_HEADER]
            given = next((v for k, v in headers if k.lower() == X_REQUEST_ID), b"")
            scope = {**scope, "headers": [*headers, (CLIENT_ID_HEADER, given)]}
        await self.app(scope, receive, send)


def client_request_id_middlewares() -> list[Middleware]:
    """A Serve proxy callback with `ClientRequestIdMarker` alone, for a Serve without RayTwin's overload gate
    (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_apps.limits:client_request_id_middlewares``); RayTwin's
    own callback, `serve_apps.proxy_gate.proxy_middlewares`, includes it."""
    return [Middleware(ClientRequestIdMarker)]


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for bodies over `max_bytes`; gives every request a server-made id.

    The request id (``request.state.request_id``) is generated here, whatever the client sends:
    it is what the audit log, error bodies and the ``X-RayTwin-Request-ID`` response header
    carry. The client's own ``X-Request-ID`` is kept as ``request.state.client_request_id`` only
    if it matches `CLIENT_REQUEST_ID`, else dropped: a client cannot choose, forge or bloat the ids
    in the audit log. `behind_serve`: the app runs in a Serve replica, where ``X-Request-ID`` may be
    one Serve made up, so the client's id is read from `CLIENT_ID_HEADER` (none without the proxy
    callback that sets it); else (in-process) ``X-Request-ID`` is the client's.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, behind_serve: bool = False):
        self.app = app
        self.max_bytes = max_bytes
        self.client_id_header = (CLIENT_ID_HEADER if behind_serve else X_REQUEST_ID).decode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = uuid.uuid4().hex
        given = headers.get(self.client_id_header)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["client_request_id"] = given if given and CLIENT_REQUEST_ID.fullmatch(given) else None

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((REQUEST_ID_HEADER, request_id.encode()))
            await send(message)

        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, send_with_id, request_id, declared)
            return
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send_with_id, request_id, f">{self.max_bytes}")
                return
            body.append(chunk)
            more = message.get("more_body", False)
        replay = {"type": "http.request", "body": b"".join(body), "more_body": False}
        sent = False

        async def replay_receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return replay
            return await receive()

        await self.app(scope, replay_receive, send_with_id)

    async def _refuse(self, scope: Scope, send: Send, request_id: str, size: str) -> None:
        # refused before routing, so before the request observer: logged and counted here (the Requests panel by
        # route and status showed no 413 at all)
        log_answer(scope, 413, 0.0, "unmatched")
        metrics.HTTP_REQUESTS.inc(route="unmatched", method=scope["method"], status="413")
        body = json.dumps({"error": {
            "code": "payload_too_large",
            "message": f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes: split it into "
                       "smaller requests (e.g. a telemetry batch into several, each sent with its own idempotency "
                       "key; the service's `max_body_bytes` sets the limit)",
            "details": [{"limit_bytes": self.max_bytes}], "request_id": request_id,
        }}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class TokenBuckets:
    """One token bucket per key: `rate` tokens/s refill, at most `burst` stored."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0.0 if a request may proceed now, else the seconds until a token is available."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(wait_s: float) -> str:
        return str(max(1, math.ceil(wait_s)))


def require_value_fits(value: dict[str, Any], limit_bytes: int, remedy: str = "send fewer or shorter arguments"
                       ) -> None:
    """413 for a command value over `limit_bytes` as compact UTF-8 JSON (`ServeConfig.max_command_value_bytes`),
    checked before the proposal is audited: each audited action writes its details twice (intent, then outcome),
    and a value is stored with the command and sent to the asset, so an unbounded one (300 kB were taken) costs all
    of these."""
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    if size > limit_bytes:
        raise PayloadTooLarge(f"the command's value is {size:,} bytes as JSON, over the limit of {limit_bytes:,} "
                              f"(max_command_value_bytes): {remedy}; nothing was recorded")
