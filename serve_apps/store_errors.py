"""The store failing (a full disk, a read-only or unreadable directory, an S3 endpoint refusing or not answering)
as what it is to a client: 503 `store_unavailable` with `Retry-After`, not 500 `internal`.

A 500 says the server has a bug and producers may drop the request; a store outage passes by itself or by an
operator's act, and the request is worth resending. The message names the error class and what to check."""

from __future__ import annotations

import errno
from functools import partial
from typing import Literal

from starlette.requests import Request

from raytwin.store_failures import FAILURE_CLASSES, FailureClass, failure_class
from serve_apps.errors import ApiError, scrub_locations
from serve_apps.resend import advice

Reason = FailureClass | Literal["no_writes"]
"""Why the store is unavailable: a class of its failure, or no_writes (its writes stopped landing, no error seen)."""
UNAVAILABLE_REASONS: tuple[Reason, ...] = (*FAILURE_CLASSES, "no_writes")

STORE_RETRY_AFTER_S = 5
"""`Retry-After` of a store failure: a brownout or a cleanup takes seconds to minutes; producers keep resending."""

_NOT_PERMITTED = ("the service may not write the store: check the store's owner and permissions (or its S3 "
                  "credentials and bucket policy)")
_HINTS = {
    errno.ENOSPC: "the store's disk is full: free space on it (or grow the volume)",
    errno.EDQUOT: "the store's disk quota is used up: free space or raise the quota",
    errno.EROFS: "the store's filesystem is read-only: remount it read-write",
    errno.EACCES: _NOT_PERMITTED,
    errno.EPERM: _NOT_PERMITTED,
    errno.EIO: "the store's disk reports I/O errors: check the disk",
}
_UNREACHABLE = ("the store does not answer or refuses connections: check that its endpoint (S3, "
                "RAYTWIN_S3_ENDPOINT_URL) is up and reachable from the cluster")


class StoreUnavailable(ApiError):
    """503: the store failed a read or write the request needs; nothing about the request is wrong. Resending is
    safe where the request's own advice says so (`serve_apps.resend.advice`: telemetry is idempotent)."""

    status, code = 503, "store_unavailable"

    def __init__(self, message: str, details: list | None = None, headers: dict[str, str] | None = None, *,
                 error: Reason):
        super().__init__(message, details, headers or {"Retry-After": str(STORE_RETRY_AFTER_S)})
        self.error = error  # for the operators' counts (`metrics.STORE_FAILURES`, `metrics.STORE_UNAVAILABLE`)

    def __reduce__(self):  # `error` too, across Ray's pickling
        return (partial(type(self), error=self.error), (self.message, self.details, self.headers))

    def message_for(self, request: Request) -> str:
        return f"{self.message}; {advice(request)}; retry after {self.headers.get('Retry-After')} s"


def store_failure(exc: BaseException) -> StoreUnavailable | None:
    """`exc` as a 503 when it is the store being unavailable (None: another failure, a bug's 500; see
    `raytwin.store_failures.failure_class`)."""
    error = failure_class(exc)
    if error is None:
        return None
    if error in ("unreachable", "timeout"):
        hint = _UNREACHABLE
    else:
        hint = _HINTS.get(getattr(exc, "errno", None) or 0,
                          "the store failed an I/O operation: check its disk or endpoint")
    return unavailable(f"{type(exc).__name__}: {scrub_locations(str(exc))}", error, hint)


def unavailable(cause: str, error: Reason, hint: str = _UNREACHABLE) -> StoreUnavailable:
    """The 503 for a store failure of class `error` described by `cause` (no store location: scrubbed by the
    caller)."""
    return StoreUnavailable(f"the store is unavailable ({cause}): {hint}", error=error)
