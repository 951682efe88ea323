"""Exceptions of the RayTwin client, one per error code of the API's error shape.

The server answers every 4xx/5xx with ``{"error": {code, message, details, request_id}}``
(serve_apps/README.md, "Errors"); `from_response` turns it into the matching subclass, so callers
catch `PreconditionFailed` or `NotFound` instead of comparing status codes. An answer without that shape came
from a proxy in front of RayTwin, not from RayTwin: it never means "not found" (`from_response`).
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import ValidationError


class RayTwinError(Exception):
    """Base class: the client could not get an answer (network, timeout), the API refused, or a call or
    an answer did not fit the API's contracts."""

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuilt as it is, class, message and attributes, where it crosses processes (a Ray task or a worker
        pool that calls the API): the default pickle calls the class with the message alone, which every error
        with its own arguments (`NotFound`, `OutcomeUnknown`, ...) refused, so the caller got a TypeError."""
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(cls: type[RayTwinError], args: tuple[Any, ...], state: dict[str, Any]) -> RayTwinError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


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


class MissingChecksum(RayTwinError):
    """A file's answer came without the SHA-256 header the server sends with every such file, so its bytes could not
    be checked: a proxy in front of RayTwin stripped the header, or the URL is not RayTwin's API. Let the header
    through the proxy (or fix the URL); ``verify=False`` accepts such a file unchecked."""


class OutcomeUnknown(RayTwinError):
    """A write that may have been applied, and the client could not learn whether it was: a try's answer was lost
    (the connection broke once the request was sent, a timeout, RayTwin's 503 `backend_unavailable` or
    `twin_unavailable`, a proxy's 500, 502 or 504) and the resends of a call that is safe to resend all failed too
    (connections refused while the service restarted, `overloaded`), or a compare-and-set's resend was refused
    because the resource changed (`refusal`, its 412 or 409: by this write's first try, or by another writer).

    The message says what to do. A telemetry batch: resend it as it was, with the same `idempotency_keys` (the
    server applies each event once and counts the others as duplicates); never drop it as refused. A
    compare-and-set: do not simply re-apply it (a read-modify-write would apply twice): read the resource and check
    whether it already holds your change. Any other write: check whether it took effect before sending it again.
    `refusal` is the server's last error (None: the last try got no answer, `cause` is its network error)."""

    def __init__(self, request: str, last: ApiError | httpx.TransportError, tries: int, advice: str,
                 idempotency_keys: tuple[str, ...] = ()):
        self.refusal = last if isinstance(last, ApiError) else None
        self.cause = None if isinstance(last, ApiError) else last
        self.request_id = self.refusal.request_id if self.refusal is not None else None
        self.idempotency_keys = idempotency_keys
        outcome = (f"was answered ({last.status} {last.code}: {last.message})" if isinstance(last, ApiError)
                   else f"got no answer ({last!r})")
        tried = "the try" if tries == 1 else f"{_tries(tries)}, the last"
        which = "it" if tries == 1 else "one of them"
        super().__init__(f"{request}: {tried} {outcome}, and {which} may have been applied; {advice}")


def _tries(n: int) -> str:
    return f"{n} {'try' if n == 1 else 'tries'}"


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
    """409: `conflict`, or `no_live_state` (a run from "live" of a twin that has applied no telemetry event)."""

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
    """422: `invalid_request`, `diverged` (a scenario whose simulation left the finite numbers) or `infeasible` (a
    recommendation whose best plan leaves a band: `details` says which, for how long and by how much)."""

    code = "invalid_request"


class RateLimited(ApiError):
    code = "rate_limited"


class Unavailable(ApiError):
    """The service is away or busy: RayTwin's 503 (overloaded or starting; retried by the client before it is
    raised), or an answer a proxy gave instead of RayTwin (`code` `NOT_RAYTWIN`: Serve's ``404 Path ... not found``
    while the app deploys or its ``408`` once its request timeout passed, a load balancer's 502, 503 or 504), or
    no connection at all (`Unreachable`). A 503 whose process applying the request was lost (`backend_unavailable`,
    `twin_unavailable`) is retried only for calls that are safe to resend, and raised at once for others, its
    message saying how to check whether it took effect; a proxy's 408 or 5xx to a write that is not resent, and a
    write safe to resend that may have been applied by an earlier try, raise `OutcomeUnknown` instead."""

    code = "unavailable"


class Unreachable(Unavailable):
    """No connection could be made on the client's last try (refused, a name that did not resolve, a connect
    timeout) and no earlier try may have been applied: nothing took effect, so the call may be sent again as it
    was, later (a restarting service refuses connections for a while). An `Unavailable`, so one ``except
    Unavailable`` catches every "the service is away, nothing applied, try later"."""

    code = "unreachable"

    def __init__(self, request: str, cause: httpx.TransportError, tries: int):
        self.cause = cause
        super().__init__(0, self.code, f"{request}: could not connect ({cause!r}); {_tries(tries)}, none took "
                                       "effect: send it again later (a restarting service refuses connections for a "
                                       "while), and check the URL if it persists")

    def __str__(self) -> str:
        return self.message  # no status: nothing answered


class ServerError(ApiError):
    code = "internal"


_BY_CODE: dict[str, type[ApiError]] = {c.code: c for c in (
    BadRequest, Unauthorized, Forbidden, NotFound, Conflict, Gone, PreconditionFailed, PayloadTooLarge,
    InvalidRequest, RateLimited, Unavailable, ServerError)}
_BY_CODE.update({"diverged": InvalidRequest, "infeasible": InvalidRequest, "no_live_state": Conflict,
                 "client_id_in_use": Conflict, "too_deeply_nested": BadRequest, "unsupported_media_type": BadRequest})
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


PROXY_TIMEOUT = 408
"""A proxy's bare status once its wait for RayTwin's answer ran out (Serve's `request_timeout_s`): RayTwin may
still have applied the request."""
NOT_RAYTWIN = "not_raytwin"
"""The `code` of an error answer without RayTwin's error body: a proxy or load balancer in front of it answered."""


def from_response(response: httpx.Response) -> ApiError:
    """The exception for an error answer, from the API's error shape. An answer without it is not RayTwin's, so
    its status says nothing about the resource: a 404 (Serve's proxy while the app deploys: no route yet), a 408
    (Serve's proxy gave up waiting for the answer) or a 5xx is `Unavailable`; other statuses map by status (an auth proxy's 401, a body limit's 413). Its code is
    `NOT_RAYTWIN`, never one of RayTwin's (a bare 404 is not `not_found`: the asset may well exist)."""
    status, body = response.status_code, _error_body(response)
    if body is None:
        cls = Unavailable if status in (404, PROXY_TIMEOUT) or status >= 500 else _BY_STATUS.get(status, ApiError)
        text = " ".join(response.text[:500].split()) or response.reason_phrase
        return cls(status, NOT_RAYTWIN, f"{text} (a proxy answered, not RayTwin: the service may be deploying or "
                                        "restarting; if it persists, check that the URL is RayTwin's API)",
                   retry_after_s=retry_after_s(response))
    return from_error(status, body, retry_after_s(response))


def from_error(status: int, body: dict[str, Any], retry_after: float | None = None) -> ApiError:
    """The exception for the error shape's ``error`` object `body` (``code``, ``message``, ``details``,
    ``request_id``) with `status`: an error answer's, or a change stream's final `error` event's."""
    code = str(body.get("code") or "")
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return cls(status, code or cls.code, str(body.get("message", "")), body.get("details") or [],
               body.get("request_id"), retry_after)
