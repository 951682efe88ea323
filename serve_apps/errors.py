"""One JSON error shape for every 4xx/5xx answer, whatever raised it.

``{"error": {"code": "not_found", "message": "...", "details": [...], "request_id": "..."}}``

Domain code raises `ApiError` subclasses; FastAPI's request validation, Starlette's HTTP errors
and unexpected exceptions are translated by `install_error_handlers`. Errors raised inside a
backend deployment arrive wrapped in Ray's `RayTaskError`; `unwrap` recovers the original.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from raytwin.statestore import StoreFenced
from raytwin.storage import scrub_locations
from serve_apps.resend import advice

log = logging.getLogger("raytwin.serve")


class ApiError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, details: list[Any] | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.headers = headers or {}

    def __reduce__(self):  # keep message/details/headers across Ray's pickling
        return (type(self), (self.message, self.details, self.headers))

    def message_for(self, request: Request) -> str:
        """The message answered to `request` (some errors advise by what the request was)."""
        return self.message


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PreconditionFailed(ApiError):
    """An `If-Match` / `If-None-Match` condition did not hold: nothing was changed."""

    status, code = 412, "precondition_failed"


class Gone(ApiError):
    status, code = 410, "gone"


def removed_from_store(what: str, remedy: str) -> Gone:
    """410 for stored outputs (a run's file, a job's results) no longer in the store, for one wording across routes:
    retention (the lifecycle policy's ``keep_runs``, `raytwin.lifecycle.prune`) or an operator removed them."""
    return Gone(f"{what} no longer in the store (removed by retention or by hand); {remedy}")


class TooDeeplyNested(ApiError):
    status, code = 400, "too_deeply_nested"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(ApiError):
    status, code = 422, "invalid_request"


class Infeasible(ApiError):
    """A recommendation whose best plan leaves a state's band: `details` says which, for how long, by how much
    (or, for a plan that keeps them on the model's parameters but in too few ensemble members, how many leave
    each: `min_feasible_fraction`)."""

    status, code = 422, "infeasible"


class ClientIdInUse(Conflict):
    """A connector whose MQTT client id another connector, of any tenant, holds: the broker would hand one the
    other's session (each connection kicking the other off), so the store lets one connector hold each id."""

    code = "client_id_in_use"


class NoLiveState(Conflict):
    """A run from "live" of a twin that has applied no event (by then): its state is only the prior."""

    code = "no_live_state"


class Diverged(ApiError):
    """A valid scenario whose simulation left the finite numbers (e.g. a step too large for the solver)."""

    status, code = 422, "diverged"


class RateLimited(ApiError):
    status, code = 429, "rate_limited"


class ServiceUnavailable(ApiError):
    """The server cannot answer any request now for a reason its operator must fix (not load)."""

    status, code = 503, "unavailable"


BACKEND_RETRY_AFTER_S = 5
"""`Retry-After` when the backend replica died: Serve starts another, which reopens the store in seconds."""


class BackendUnavailable(ApiError):
    """503: the backend replica handling the request died (Serve starts another); retry after `Retry-After`.

    Whether the request took effect is unknown, so the answer says whether resending it is safe: `lost` where the
    route knows better, else what the request is (`serve_apps.resend.advice`: a read, an idempotent write, ...)."""

    status, code = 503, "backend_unavailable"

    def __init__(self, cause: str, lost: str | None = None):
        super().__init__(f"the backend process handling this request was lost ({cause})",
                         headers={"Retry-After": str(BACKEND_RETRY_AFTER_S)})
        self.cause, self.lost = cause, lost

    def __reduce__(self):
        return (type(self), (self.cause, self.lost))

    def message_for(self, request: Request) -> str:
        return f"{self.message}; {self.lost or advice(request)}; retry after {BACKEND_RETRY_AFTER_S} s"



class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[Any] = []
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before sending it again (where a resend can succeed)",
                               "schema": {"type": "integer"}}}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} | ({"headers": RETRY_AFTER} if status in (429, 503) else {})
    for status, text in (
        (400, "JSON body nested deeper than the parser's limit (`too_deeply_nested`)"),
        (401, "Missing or unknown API key"), (403, "Role not allowed"), (404, "Not found (or another tenant's)"),
        (410, "Removed by retention (`gone`): history before the retention cut (time travel), changes past the change "
              "log's retention, or a run's or job's stored outputs (retention removed the run record)"),
        (412, "An `If-Match` or `If-None-Match` precondition failed (`precondition_failed`)"),
        (413, "Body too large"),
        (415, "A request body that is not `Content-Type: application/json`"),
        (422, "Invalid request (`invalid_request`), or a scenario whose simulation diverged (`diverged`)"),
        (429, "Rate limited (`rate_limited`), or telemetry refused while the twin shards are behind (`backlogged`); "
              "`Retry-After` says when to send again"),
        (500, "A fault of the server's (`internal`): nothing to change in the request; quote its `request_id`"),
        (503, "At capacity (`overloaded`): refused before any work; retry after `Retry-After` seconds; "
              "`store_fenced`: another service took the store over (a reshard, a takeover): resend the request to "
              "the service that holds it now; "
              "`twin_unavailable`: the twin's shard leaves calls unanswered (telemetry refused after its deadline may "
              "still be applied: resend it after `Retry-After`, events are idempotent); `backend_unavailable`: the "
              "backend replica handling the request died (the message says whether resending is safe); or "
              "`store_unavailable`: the store failed (a full disk, a read-only directory, an S3 endpoint "
              "refusing or not answering): resend after `Retry-After` as the message advises; or "
              "`unavailable`: the "
              "server cannot check keys (its keys file is invalid) until its operator fixes it"),
    )
}


CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": ErrorResponse, "description": (
    "Conflicts with the resource's current state (`conflict`): the operation's description says when")}}
"""For the routes that answer 409 (`responses=CONFLICT`); `ERROR_RESPONSES` are every route's."""


def unwrap(exc: BaseException) -> BaseException:
    """The exception a backend deployment raised, without Ray's `RayTaskError` wrapper."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc


class _RefusalsWithoutTraceback(logging.Filter):
    """Serve's replica logs every exception its method raises with its traceback at ERROR (``Request failed.``): for
    the backend's refusals (an `ApiError` under 500: an unknown asset, a conflict) that is ~40 lines a refusal, which
    any tenant can repeat at will to flood the log and bury real faults. Such a record is kept as one INFO line
    naming the refusal, and a store outage's 503 `store_unavailable` as one WARNING line naming its error class
    (an outside test's read-only store: ~100 lines a request, the same each time); other exceptions keep their
    traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ApiError) and exc.status < 500:
            _one_line(record, logging.INFO, exc, "")
        elif exc is not None and (outage := _store_outage(exc)) is not None:
            _one_line(record, logging.WARNING, outage, f" reason={outage.error}")
        return True


def _store_outage(exc: BaseException) -> ApiError | None:
    """`exc` as the 503 `store_unavailable` it is answered with, if it is the store's outage."""
    from serve_apps.store_errors import StoreUnavailable, store_failure  # (it builds on this module's ApiError)

    return exc if isinstance(exc, StoreUnavailable) else store_failure(exc)


def _one_line(record: logging.LogRecord, level: int, refusal: ApiError, more: str) -> None:
    """`record` as one `event=backend_request_refused` line at `level`, without the traceback."""
    record.levelno, record.levelname = level, logging.getLevelName(level)
    record.msg, record.args = "event=backend_request_refused status=%d code=%s error=%s%s", (
        refusal.status, refusal.code, type(unwrap(record.exc_info[1])).__name__, more)
    record.exc_info = record.exc_text = None


_REFUSALS_FILTER = _RefusalsWithoutTraceback()


def log_refusals_without_traceback() -> None:
    """Install `_RefusalsWithoutTraceback` on Serve's logger (once a process): the backend replica calls it."""
    serve_logger = logging.getLogger("ray.serve")
    if _REFUSALS_FILTER not in serve_logger.filters:
        serve_logger.addFilter(_REFUSALS_FILTER)


def error_body(code: str, message: str, details: list[Any] | None, request_id: str | None) -> dict[str, Any]:
    """The error shape as JSON: an answer's body, and the data of a stream's final `error` event."""
    body = ErrorResponse(error=ErrorBody(code=code, message=message, details=details or [], request_id=request_id))
    return body.model_dump(mode="json")


def error_response(request: Request | None, status: int, code: str, message: str,
                   details: list[Any] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None) if request is not None else None
    return JSONResponse(error_body(code, message, details, request_id), status_code=status, headers=headers)


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 410: "gone", 412: "precondition_failed",
                 413: "payload_too_large",
                 415: "unsupported_media_type", 429: "rate_limited"}


def _path_methods(request: Request) -> list[str]:
    """Every method the routes of the request's path take: Starlette's 405 names those of the path's first route
    only (`Allow: GET` for `/v1/assets/{asset_id}`, which takes PUT and DELETE too)."""
    return sorted({m for route in request.app.router.routes if route.matches(request.scope)[0] != Match.NONE
                   for m in getattr(route, "methods", None) or ()})


def _record_store_failure(request: Request, err: ApiError, cause: BaseException | None = None) -> None:
    """Log and count a request answered 503 `store_unavailable` (`event=store_unavailable`,
    `metrics.STORE_FAILURES`: a write when the request changes something, a read otherwise), whether the store's
    failure `cause` was raised as such or as the 503 made of it (a change record the store refused: no line named
    it). The log keeps the failure's own text, store locations included: the operator's."""
    from raytwin.store_failures import FAILURE_CLASSES, count
    from serve_apps.store_errors import StoreUnavailable  # (it builds on this module's ApiError)

    if not isinstance(err, StoreUnavailable):
        return
    failure = f"{type(cause).__name__}: {cause}" if cause is not None else err.message
    log.error("event=store_unavailable request_id=%s path=%s error=%s failure=%s",
              getattr(request.state, "request_id", None), request.url.path, err.error, failure)
    if err.error in FAILURE_CLASSES:
        count("read" if request.method in ("GET", "HEAD") else "write", err.error)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        err = unwrap(exc)
        if not isinstance(err, ApiError):
            return await unexpected(request, exc)
        _record_store_failure(request, err)
        return error_response(request, err.status, err.code, err.message_for(request), err.details, err.headers)

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        body_error = getattr(request.state, "body_error", None)  # set by `json_route.JsonRoute`: reported after auth
        if body_error is not None:
            return await api_error(request, body_error)
        details = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"]) or "<body>"
        message = f"{where}: {first['msg']}" + (f" (and {len(details) - 1} more)" if len(details) > 1 else "")
        return error_response(request, 422, "invalid_request", message, details)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        message, headers = str(exc.detail), exc.headers
        methods = _path_methods(request)
        if exc.status_code == 405 and methods:
            message = f"{request.method} is not a method of {request.url.path}: it takes {', '.join(methods)}"
            headers = {**(headers or {}), "Allow": ", ".join(methods)}
        elif exc.status_code == 404 and not methods:
            message = (f"no route {request.method} {request.url.path}: the API's routes are under /v1, listed at "
                       "/docs and /openapi.json")
        return error_response(request, exc.status_code, code, message, headers=headers)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        err = unwrap(exc)
        if isinstance(err, ApiError):
            _record_store_failure(request, err)
            return error_response(request, err.status, err.code, err.message_for(request), err.details, err.headers)
        if isinstance(err, StoreFenced):  # another service took the store: an operator's act, not a bug
            log.error("event=store_fenced request_id=%s path=%s error=%s", getattr(request.state, "request_id", None),
                      request.url.path, err)
            return error_response(request, 503, "store_fenced", f"this service no longer holds its store "
                                  f"({scrub_locations(str(err))}); its operator must restart it (`raytwin serve` on "
                                  "the store) before it can write")
        from serve_apps.store_errors import store_failure  # (it builds on this module's ApiError)

        store = store_failure(exc)  # (a `StoreIOError`, raised here or in another process)
        if store is not None:  # a full disk, an S3 outage: the operator's to fix, the client's to resend
            _record_store_failure(request, store, err)
            return error_response(request, store.status, store.code, store.message_for(request), headers=store.headers)
        log.exception("event=unhandled_error request_id=%s path=%s", getattr(request.state, "request_id", None),
                      request.url.path, exc_info=err)
        return error_response(request, 500, "internal", "internal error; quote the request_id when reporting it")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)  # (what the middlewares themselves raise)
    app.add_middleware(AnswerUnhandled, handler=unexpected)  # added first: the innermost middleware


class AnswerUnhandled:
    """Pure ASGI middleware: answers an exception no route handled with `handler` (`unexpected`: a 503
    `store_unavailable`, a 500 `internal`) inside the other middlewares, so that the request observer counts and
    logs the status the client gets and the answer carries ``X-RayTwin-Request-ID``. Starlette runs an `Exception`
    handler in its outermost layer, after them: a read-only store's 503s were counted and logged as 500, without
    the header, and Serve logged a traceback for each."""

    def __init__(self, app: ASGIApp, handler: Callable[[Request, Exception], Awaitable[Response]]):
        self.app, self.handler = app, handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sender(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sender)
        except Exception as exc:
            if started:  # a streamed answer cut short: nothing else can be sent
                raise
            answer = await self.handler(Request(scope, receive), exc)
            await answer(scope, receive, sender)
