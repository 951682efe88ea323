"""Exceptions of the RayTwin client, one per error code of the API's error shape.

The server answers every 4xx/5xx with ``{"error": {code, message, details, request_id}}``
(serve_apps/README.md, "Errors"); `from_response` turns it into the matching subclass, so callers
catch `PreconditionFailed` or `NotFound` instead of comparing status codes.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import ValidationError


class RayTwinError(Exception):
    """Base class: the client could not get an answer (network, timeout), the API refused, or a call or
    an answer did not fit the API's contracts."""


class InvalidArgument(RayTwinError, ValueError):
    """An argument no server can accept, refused before anything is sent: e.g. a path id that is not an
    identifier (the server decodes ``%2F`` before routing, so ``zone-1/state`` would reach another route)."""


class UnexpectedAnswer(RayTwinError):
    """The server answered, but not in the shape of the client's models (the server's contracts as of
    this client's version): usually a client and a server of different versions. `errors` are pydantic's,
    one per field that did not fit."""

    SHOWN = 5  # fields named in the message (an answer of another route mismatches in every field)

    def __init__(self, request: str, error: ValidationError, request_id: str | None = None):
        self.errors = error.errors(include_url=False, include_input=False)
        self.request_id = request_id
        fields = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in self.errors[:self.SHOWN])
        more = f"; and {len(self.errors) - self.SHOWN} more" if len(self.errors) > self.SHOWN else ""
        super().__init__(
            f"{request}: the server's answer did not match the client's contract: {fields}{more}. "
            "Use the client of the server's version (raytwin on both ends from one release); if they match, "
            "report it" + (f" with request_id {request_id}" if request_id else ""))


class CorruptDownload(RayTwinError):
    """A downloaded file's bytes do not have the hash the server recorded for them: a transfer cut short, or,
    when a second download brings the same bytes, a file damaged in the store (rerun the run to make it again)."""


class OutcomeUnknown(RayTwinError):
    """A compare-and-set write (`if_match`, `expected_revision`) whose answer was lost in the network was
    sent again, and the server refused the resend because the resource changed (`refusal`, its 412 or
    409): by this write's first try, or by another writer. Do not simply re-apply it (a read-modify-write
    would apply twice): read the resource and check whether it already holds your change."""

    def __init__(self, request: str, refusal: ApiError):
        self.refusal = refusal
        self.request_id = refusal.request_id
        super().__init__(
            f"{request}: the first try's answer was lost and the resend was refused ({refusal.status} "
            f"{refusal.code}: {refusal.message}): the first try may have been applied; read the resource and "
            "check whether it holds your change before you apply it again")


def _where(loc: tuple[int | str, ...]) -> str:
    """A field's place in the answer, as in JSON paths: ``items[0].state``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".") or "(the answer)"


class ApiError(RayTwinError):
    status = 0
    code = "error"

    def __init__(self, status: int, code: str, message: str, details: list[Any] | None = None,
                 request_id: str | None = None, retry_after_s: float | None = None):
        super().__init__(f"{status} {code}: {message}" + (f" (request_id {request_id})" if request_id else ""))
        self.status, self.code, self.message = status, code, message
        self.details = details or []
        self.request_id = request_id
        self.retry_after_s = retry_after_s


class BadRequest(ApiError):
    code = "bad_request"


class Unauthorized(ApiError):
    code = "unauthorized"


class Forbidden(ApiError):
    code = "forbidden"


class NotFound(ApiError):
    code = "not_found"


class Conflict(ApiError):
    code = "conflict"


class Gone(ApiError):
    code = "gone"


class PreconditionFailed(ApiError):
    """An If-Match / If-None-Match condition did not hold; `current_revision` is the resource's now."""

    code = "precondition_failed"

    @property
    def current_revision(self) -> int | None:
        return next((d.get("current_revision") for d in self.details if isinstance(d, dict)), None)


class PayloadTooLarge(ApiError):
    code = "payload_too_large"


class InvalidRequest(ApiError):
    """422: `invalid_request` or `diverged` (a scenario whose simulation left the finite numbers)."""

    code = "invalid_request"


class RateLimited(ApiError):
    code = "rate_limited"


class Unavailable(ApiError):
    """503: the service is overloaded or starting (retried by the client before it is raised), or the process
    applying the request was lost (`backend_unavailable`, `twin_unavailable`): retried only for calls that are
    safe to resend, raised at once for others, whose message says how to check whether it took effect."""

    code = "unavailable"


class ServerError(ApiError):
    code = "internal"


_BY_CODE: dict[str, type[ApiError]] = {c.code: c for c in (
    BadRequest, Unauthorized, Forbidden, NotFound, Conflict, Gone, PreconditionFailed, PayloadTooLarge,
    InvalidRequest, RateLimited, Unavailable, ServerError)}
_BY_CODE.update({"diverged": InvalidRequest, "too_deeply_nested": BadRequest, "unsupported_media_type": BadRequest})
_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                                         409: Conflict, 410: Gone, 412: PreconditionFailed, 413: PayloadTooLarge,
                                         422: InvalidRequest, 429: RateLimited, 503: Unavailable}


def retry_after_s(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (the API sends delta-seconds), or None."""
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _error_body(response: httpx.Response) -> dict[str, Any] | None:
    """The API's error shape's ``error`` object, or None when a proxy or load balancer answered instead."""
    try:
        body = response.json()["error"]
        return {"code": str(body["code"]), "message": str(body["message"]), "details": body.get("details") or [],
                "request_id": body.get("request_id")}
    except (ValueError, KeyError, TypeError):
        return None


def error_code(response: httpx.Response) -> str | None:
    """The API's error code of an error answer (None: not the API's shape)."""
    body = _error_body(response)
    return None if body is None else body["code"]


def from_response(response: httpx.Response) -> ApiError:
    """The exception for an error answer, from the API's error shape (or the status when the body is not it)."""
    body = _error_body(response)
    if body is None:  # not RayTwin's shape: a proxy or load balancer answered
        code, message, details, request_id = "", response.text[:500] or response.reason_phrase, [], None
    else:
        code, message, details, request_id = body["code"], body["message"], body["details"], body["request_id"]
    cls = _BY_CODE.get(code) or _BY_STATUS.get(response.status_code) or (
        ServerError if response.status_code >= 500 else ApiError)
    return cls(response.status_code, code or cls.code, message, details, request_id, retry_after_s(response))
