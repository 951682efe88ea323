"""A store read with a deadline, for health probes and write gates: an S3 endpoint that hangs must not hang them.

fsspec's reads have no deadline of their own (a frozen endpoint holds one for minutes). The read runs in a daemon
thread of its own; callers wait for it at most their deadline, then answer that the store is not answering. At most
one read is in flight: probes every second against a hung store share it, never pile up threads. Why no thread
pool: `concurrent.futures` refuses new work once the interpreter starts exiting (the backend's store watch then
failed with a traceback at every exit) and joins its workers there, so a hung read held the process's exit."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Generic, TypeVar

from serve_apps.store_errors import store_failure, unavailable

T = TypeVar("T")


class BoundedRead(Generic[T]):
    """`read()` of the store, waited for at most a deadline per call (`StoreUnavailable` past it or on a store
    failure); one call in flight at a time, shared by whoever waits meanwhile."""

    def __init__(self, read: Callable[[], T], what: str):
        self._read, self.what = read, what
        self._lock = threading.Lock()
        self._pending: Future[T] | None = None

    def __call__(self, timeout_s: float) -> T:
        with self._lock:
            if self._pending is None:
                self._pending = Future()
                threading.Thread(target=self._run, args=(self._pending,), name="store-probe", daemon=True).start()
            pending = self._pending
        try:
            return pending.result(timeout=timeout_s)
        except FutureTimeout:
            raise unavailable(f"a read of {self.what} did not answer within {timeout_s:g} s", "timeout") from None
        except Exception as exc:
            raise store_failure(exc) or exc from None
        finally:
            with self._lock:
                if self._pending is pending and pending.done():  # the next call reads afresh
                    self._pending = None

    def _run(self, pending: Future[T]) -> None:
        try:
            pending.set_result(self._read())
        except BaseException as exc:  # noqa: BLE001 - the caller's to answer, in its thread
            pending.set_exception(exc)
