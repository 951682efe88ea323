"""The store failing, in classes an operator acts on: a full disk, a read-only or unwritable store, disk I/O errors,
an S3 endpoint refusing or not answering.

One classification for every layer: the API answers these 503 `store_unavailable` (`serve_apps.store_errors`,
for a `StoreIOError` only), and `metrics.STORE_FAILURES` counts them by class wherever a
store operation fails (API requests, the shards' lease heartbeat), so the alert and the dashboard name the cause.

Every store read and write raises them as `StoreIOError` (`store_io`): the storage layer (`raytwin.storage`'s
helpers, `StateStore`, the log's segments) and the modules that call fsspec or pyarrow directly (the catalog, the
change and audit logs, the registry, jobs, runs...). The same OSError raised elsewhere (an FMU's library, a
connector's broker) is no store outage, and the type tells them apart in this process and in another one (Ray
hands the caller the pickled error)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from raytwin import metrics

FailureClass = Literal["disk_full", "read_only", "permission", "io", "unreachable", "timeout"]
FAILURE_CLASSES: tuple[FailureClass, ...] = ("disk_full", "read_only", "permission", "io", "unreachable", "timeout")
"""The `error` tag of `metrics.STORE_FAILURES`: each has one remedy (ops/README.md, *Store failing*)."""
Operation = Literal["read", "write"]
OPERATIONS: tuple[Operation, ...] = ("read", "write")

NOT_OUTAGES = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)
"""OSErrors about one path's presence: the store answered (a missing file is the caller's or a bug's, not an outage)."""

_BY_ERRNO: dict[int, FailureClass] = {errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_full", errno.EROFS: "read_only",
                                      errno.EACCES: "permission", errno.EPERM: "permission"}


def _remote_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """botocore's read timeouts, and its connection and HTTP client errors (some are no OSError), where botocore is
    installed."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, ReadTimeoutError
    except ImportError:
        return (), ()
    return (ReadTimeoutError,), (BotoConnectionError, HTTPClientError)


class StoreIOError(OSError):
    """The store failed an `operation` as an outage of class `error`: raised by `store_io` from the `failure` (its
    type's name; it is the `__cause__` in the raising process), whose errno and text it keeps. An OSError still, for
    the callers that handle one."""

    def __init__(self, *args: object, operation: Operation = "read", error: FailureClass = "io",
                 failure: str = "OSError"):
        super().__init__(*args)
        self.operation, self.error, self.failure = operation, error, failure  # (pickled with it: Ray's copies)


@contextmanager
def store_io(operation: Operation) -> Iterator[None]:
    """Raise an outage (`failure_class`) of the store's I/O inside as `StoreIOError` (a decorator too): around
    store reads and writes only, never other work that may raise an OSError (an FMU's library, a broker, a local
    key file). A generator's body must use it inside: decorating one wraps only its creation."""
    try:
        yield
    except StoreIOError:
        raise
    except Exception as exc:
        error = failure_class(exc)
        if error is None:
            raise
        args = (exc.errno, exc.strerror) if isinstance(exc, OSError) and exc.errno is not None else (str(exc),)
        raise StoreIOError(*args, operation=operation, error=error, failure=type(exc).__name__) from exc


def failure_class(exc: BaseException) -> FailureClass | None:
    """The class of `exc` as a store failure; None for an error that is no outage (a missing path, Ray's own
    errors, though some are OSErrors: `GetTimeoutError` is a `TimeoutError`)."""
    from ray.exceptions import RayError

    if isinstance(exc, StoreIOError):
        return exc.error
    if isinstance(exc, (*NOT_OUTAGES, RayError)):
        return None
    timeouts, unreachable = _remote_errors()
    if isinstance(exc, (TimeoutError, *timeouts)):  # (a read timeout is an HTTP client error too: asked first)
        return "timeout"
    if isinstance(exc, (ConnectionError, *unreachable)):
        return "unreachable"
    if isinstance(exc, OSError):
        return _BY_ERRNO.get(exc.errno or 0, "io")
    return None


def count(operation: Operation, error: FailureClass) -> None:
    """Count one failed store operation (`metrics.STORE_FAILURES`)."""
    metrics.STORE_FAILURES.inc(operation=operation, error=error)


def zero_counts(operation: Operation) -> None:
    """Export `operation`'s failure series at 0 where a process starts doing it (see `Metric.zero`): the first
    failures of an outage then show in `rate()`, and so in the alert."""
    metrics.STORE_FAILURES.zero(*({"operation": operation, "error": e} for e in FAILURE_CLASSES))
