"""The store failing (a full disk, a read-only or unreadable directory, an S3 endpoint refusing or not answering)
as what it is to a client: 503 `store_unavailable` with `Retry-After`, not 500 `internal`.

A 500 says the server has a bug and producers may drop the request; a store outage passes by itself or by an
operator's act, and the request is worth resending. The message names the error class and what to check."""

from __future__ import annotations

import errno
from functools import partial
from typing import Literal

from starlette.requests import Request

from raytwin.storage import scrub_locations
from raytwin.store_failures import FAILURE_CLASSES, FailureClass, StoreIOError
from serve_apps.errors import ApiError, unwrap
from serve_apps.resend import advice

Reason = FailureClass | Literal["no_writes", "shards_down"]
"""Why the store is unavailable: a class of its failure, or no_writes (its writes stopped landing, no error seen);
shards_down: no shard renews its lease heartbeat, the store itself may be fine (the health probes' reason)."""
UNAVAILABLE_REASONS: tuple[Reason, ...] = (*FAILURE_CLASSES, "no_writes")
"""The reasons the store itself is unavailable (`metrics.STORE_UNAVAILABLE`)."""

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
    """`exc` (as raised, perhaps wrapped by Ray) as a 503 when it is the store being unavailable: a `StoreIOError`
    (`raytwin.store_failures.store_io`: every store read and write raises its outages so, and the type survives
    Ray's pickling of another process's error). None: another failure, answered as such (a bug's 500), though it
    be an OSError: one raised elsewhere (an FMU's library, a connector's broker) would send its operator to a
    healthy store."""
    cause = unwrap(exc)
    if not isinstance(cause, StoreIOError):
        return None
    if cause.error in ("unreachable", "timeout"):
        hint = _UNREACHABLE
    else:
        hint = _HINTS.get(cause.errno or 0, "the store failed an I/O operation: check its disk or endpoint")
    return unavailable(f"{cause.failure}: {scrub_locations(str(cause))}", cause.error, hint)


def store_outage(exc: BaseException) -> bool:
    """Whether `exc` is the store being unavailable: a `StoreIOError` (`store_failure`), or the 503 made of one (an
    audit intent the store refused: `serve_apps.audit_steps.begin`)."""
    return isinstance(exc, StoreUnavailable) or store_failure(exc) is not None


def unavailable(cause: str, error: Reason, hint: str = _UNREACHABLE) -> StoreUnavailable:
    """The 503 for a store failure of class `error` described by `cause` (no store location: scrubbed by the
    caller)."""
    return StoreUnavailable(f"the store is unavailable ({cause}): {hint}", error=error)
