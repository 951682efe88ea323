"""The store failing (a full disk, a read-only or unreadable directory, an S3 endpoint refusing or not answering)
as what it is to a client: 503 `store_unavailable` with `Retry-After`, not 500 `internal`.

A 500 says the server has a bug and producers may drop the request; a store outage passes by itself or by an
operator's act, and the request is worth resending. The message names the error class and what to check."""

from __future__ import annotations

import errno
import re
import traceback
from functools import partial
from typing import TYPE_CHECKING, Literal

from starlette.requests import Request

from raytwin.storage import scrub_locations
from raytwin.store_failures import FAILURE_CLASSES, FailureClass, StoreIOError, failure_class
from serve_apps.errors import ApiError, unwrap
from serve_apps.resend import advice

if TYPE_CHECKING:
    from ray.exceptions import RayTaskError

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
    """`exc` (as raised, perhaps wrapped by Ray) as a 503 when it is the store being unavailable: a
    `StoreIOError` of the storage layer (by its type, in this process or another), or a failure of a class
    `raytwin.store_failures.failure_class` knows raised by the store's libraries under RayTwin's other modules
    (`raised_by_store`). None: another failure, answered as such (a bug's 500)."""
    cause = unwrap(exc)
    if isinstance(cause, StoreIOError):
        error, failure = cause.error, cause.failure
    else:
        error, failure = failure_class(cause), type(cause).__name__
        if error is None or not raised_by_store(exc):
            return None
    if error in ("unreachable", "timeout"):
        hint = _UNREACHABLE
    else:
        hint = _HINTS.get(getattr(cause, "errno", None) or 0,
                          "the store failed an I/O operation: check its disk or endpoint")
    return unavailable(f"{failure}: {scrub_locations(str(cause))}", error, hint)


_STORE_CODE = re.compile(r"[/\\](?:fsspec|s3fs|aiobotocore|botocore|pyarrow)[/\\]"
                         r"|[/\\]raytwin[/\\](?:storage|statestore|logsegments)\.py$")
"""The storage layer's files: fsspec and its S3 stack, pyarrow's file I/O, RayTwin's store modules (whose own
operations raise `StoreIOError`; the modules above them call fsspec and pyarrow directly)."""
_FRAME_FILE = re.compile(r'^\s*File "([^"]+)", line', re.MULTILINE)


def raised_by_store(exc: BaseException) -> bool:
    """Whether `exc`, no `StoreIOError`, came out of the storage layer (`_STORE_CODE` on its way up): the modules
    that call fsspec and pyarrow directly (the catalog, the change log, the registry...) raise its failures
    untyped. An OSError or a connection error raised elsewhere (an FMU's library, a connector's broker, another
    service) is no store outage, and a 503 `store_unavailable` would send its operator to a healthy store. Another
    process's error (the backend's) has lost its traceback to Ray's pickling: Ray's text of it (in the
    `RayTaskError`'s) says."""
    files = [frame.filename for e in {exc, unwrap(exc)} for frame in traceback.extract_tb(e.__traceback__)]
    for wrapper in _ray_wrappers(exc):
        files += _FRAME_FILE.findall(str(wrapper))  # its text: Ray's copy of the other process's traceback
    return any(_STORE_CODE.search(name) for name in files)


def _ray_wrappers(exc: BaseException) -> list[RayTaskError]:
    """The `RayTaskError`s around `exc`: its own (it is one), or those it was unwrapped from and raised in the
    handling of (`deps.BackendClient.call`: `raise unwrap(exc) from None` keeps them as its `__context__`)."""
    from ray.exceptions import RayTaskError  # here: the client imports this module's neighbours without Ray

    context = exc.__context__
    outer = context if isinstance(context, RayTaskError) and unwrap(context) is exc else exc
    wrappers = []
    while isinstance(outer, RayTaskError):
        wrappers.append(outer)
        outer = outer.cause
    return wrappers


def unavailable(cause: str, error: Reason, hint: str = _UNREACHABLE) -> StoreUnavailable:
    """The 503 for a store failure of class `error` described by `cause` (no store location: scrubbed by the
    caller)."""
    return StoreUnavailable(f"the store is unavailable ({cause}): {hint}", error=error)
