"""Overload protection: shed excess work at the edge, fast, instead of queueing it until it times out.

Three layers, each refusing before any work is done, each answering with ``Retry-After``:

1. Serve's proxy queue (``max_queued_requests`` of the Ingress deployment, `Admission.proxy_max_queued`):
   requests waiting at a proxy for a free Ingress replica slot (``max_ongoing_requests``) beyond
   that many get 503 from the proxy itself, the cheapest refusal (no hop to a replica).
2. `AdmissionGate`, in every Ingress replica: at most `Admission.max_concurrent` requests are
   worked on at once; up to `Admission.max_queued` more wait, each for at most
   `Admission.max_wait_s`. A request whose expected wait (its place in the queue times the
   measured time a request holds a slot) exceeds that budget is refused at once (503
   ``overloaded``), so admitted requests keep their latency and refused ones learn it in
   milliseconds.
3. `BacklogGate`, in the backend: telemetry events accepted over HTTP and not yet applied by the
   twin shards are bounded; a batch that would exceed the bound gets 429 ``backlogged`` before any
   of it is accepted, so a flood is slowed at the edge, memory stays bounded, and every accepted
   event is applied.

In front of all three, `serve_apps.proxy_gate` bounds the requests in flight through each Serve proxy
and refuses beyond it inside the proxy, before Serve routes the request: the cheapest refusal.

Refusals are counted in ``raytwin_admission_refused_total{gate, reason}`` (`raytwin.metrics`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import ASGIApp, Receive, Scope, Send

from raytwin import metrics
from serve_apps.errors import ApiError

SERVICE_TIME_WEIGHT = 0.1
"""Weight of the newest request in the moving average of the time a request holds a slot."""
UNGATED_PATHS = frozenset({"/v1/changes", "/v1/health", "/v1/health/ready"})
"""Never gated: long-lived streams (the SSE change stream: a stream would hold a slot for hours, so a few
open streams would shut a replica; Serve's `max_ongoing_requests` and `max_streams` bound them per replica)
and the health routes (a liveness probe must not take a full replica for a dead one: restarting it sheds
its work onto the others; nor a readiness probe take it out of the load balancer for being busy)."""


class Admission(BaseModel):
    """Admission control of the HTTP API (see serve_apps/README.md, "Overload")."""

    model_config = ConfigDict(extra="forbid")
    max_concurrent: int = Field(4, ge=1, description="Requests an Ingress replica works on at once: fewer keep "
                                "latency low under overload, more raise a replica's throughput (serve_apps/README.md, "
                                "\"Overload\"); the autoscaling target follows it unless set.")
    max_queued: int = Field(24, ge=0, description="Requests that may wait in a replica for a slot; more are "
                            "refused at once. With `max_concurrent` it should not exceed the Ingress "
                            "`max_ongoing_requests` (32), or Serve's proxy queues them instead.")
    max_wait_s: float = Field(0.05, ge=0, description="Longest a request waits in a replica for a slot; one "
                              "expected to wait longer is refused at once.")
    proxy_max_queued: int = Field(32, ge=-1, description="Serve's `max_queued_requests` of the Ingress: requests "
                                  "waiting at each proxy for a replica beyond this get 503 (-1: no limit).")
    retry_after_s: int = Field(1, ge=1, description="`Retry-After` of every overload refusal [s].")
    telemetry_backlog_events: int = Field(50_000, ge=1, description="Events accepted over HTTP and not yet "
                                          "applied by the shards, at most; a batch beyond it gets 429.")
    max_streams: int | None = Field(None, ge=1, description="Change streams an Ingress replica holds open, at most "
                                    "(503 beyond): below the Ingress `max_ongoing_requests`, whose other slots stay "
                                    "for requests (serve_apps/stream_slots.py). None: half of it.")
    max_streams_per_tenant: int = Field(8, ge=1, description="Change streams one tenant holds open on an Ingress "
                                        "replica, at most (429 beyond).")

    @field_validator("proxy_max_queued")
    @classmethod
    def _serve_accepts(cls, value: int) -> int:
        if value == 0:
            raise ValueError("proxy_max_queued must be -1 (no limit) or at least 1 (Serve's max_queued_requests)")
        return value


class Backlogged(ApiError):
    """The shards are behind: the batch was not accepted; send it again after `Retry-After`."""

    status, code = 429, "backlogged"


def overload_body(code: str, message: str, request_id: str, retry_after_s: int) -> bytes:
    """The API's error shape (`serve_apps.errors.ErrorResponse`) for a refusal made below FastAPI."""
    return json.dumps({"error": {"code": code, "message": message,
                                 "details": [{"retry_after_s": retry_after_s}], "request_id": request_id}}).encode()


class AdmissionGate:
    """Pure ASGI middleware: a concurrency limit with a short, deadline-bounded FIFO queue.

    Runs on the replica's event loop only (no locks). A slot freed by a finished request is
    handed straight to the oldest waiter, so the queue is served in order and never starved.
    Refusals (503 ``overloaded`` + ``Retry-After``) happen before the body is read. `UNGATED_PATHS` pass.
    """

    def __init__(self, app: ASGIApp, limits: Admission):
        self.app = app
        self.limits = limits
        self.running = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.service_s = 0.0  # moving average of the time a request holds a slot (0 until one finished)
        # at 0 before the first refusal, so a replica's first burst shows in rate() (`Metric.zero`)
        metrics.ADMISSION_REFUSED.zero(*({"gate": "ingress", "reason": r} for r in ("queue_full", "wait_budget")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].removeprefix(scope.get("root_path", "")) in UNGATED_PATHS:
            await self.app(scope, receive, send)
            return
        refused = await self._acquire()
        if refused is not None:
            await self._refuse(scope, send, refused)
            return
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            held = time.perf_counter() - t0
            self.service_s = held if not self.service_s else (
                (1 - SERVICE_TIME_WEIGHT) * self.service_s + SERVICE_TIME_WEIGHT * held)
            self._release()

    def expected_wait_s(self, position: int) -> float:
        """How long the `position`-th waiter (1 = next) should wait, at the measured service time."""
        return position * self.service_s / self.limits.max_concurrent

    async def _acquire(self) -> str | None:
        """Take a slot (None) or say why not: ``queue_full`` or ``wait_budget``."""
        limits = self.limits
        if self.running < limits.max_concurrent and not self.waiters:
            self.running += 1
            return None
        if len(self.waiters) >= limits.max_queued:
            return "queue_full"
        if self.expected_wait_s(len(self.waiters) + 1) > limits.max_wait_s:
            return "wait_budget"
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(slot)
        try:
            await asyncio.wait({slot}, timeout=limits.max_wait_s)
        except asyncio.CancelledError:  # the client went away: give back a slot handed over meanwhile
            self._abandon(slot)
            raise
        if slot.done():
            return None
        self._abandon(slot)
        return "wait_budget"

    def _abandon(self, slot: asyncio.Future[None]) -> None:
        if slot.done():
            self._release()
        else:
            slot.cancel()
            self.waiters.remove(slot)

    def _release(self) -> None:
        """Hand the slot to the oldest waiter, or free it."""
        while self.waiters:
            slot = self.waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.running -= 1

    async def _refuse(self, scope: Scope, send: Send, reason: str) -> None:
        metrics.ADMISSION_REFUSED.inc(gate="ingress", reason=reason)
        metrics.HTTP_REQUESTS.inc(route="refused", method=scope["method"], status="503")
        retry = self.limits.retry_after_s
        message = (f"the service is at capacity ({self.limits.max_concurrent} requests in progress, "
                   f"{len(self.waiters)} waiting); retry after {retry} s")
        body = overload_body("overloaded", message, uuid.uuid4().hex, retry)
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry).encode())]})
        await send({"type": "http.response.body", "body": body})


class BacklogGate:
    """Bounds the telemetry events accepted and not yet applied (thread-safe; one per backend).

    A batch is admitted whole or not at all, and always when nothing is pending, so any batch up to
    ``max_events_per_batch`` is eventually accepted however small the bound.
    """

    def __init__(self, max_events: int, retry_after_s: int):
        self.max_events, self.retry_after_s = max_events, retry_after_s
        self.pending = 0
        self._lock = threading.Lock()
        metrics.ADMISSION_REFUSED.zero({"gate": "telemetry", "reason": "backlog"})
        metrics.TELEMETRY_BACKLOG.set(0)  # a true 0, not "no data": the panel told no backend from no backlog

    def reserve(self, events: int) -> Callable[[], None]:
        """Hold `events` of the backlog until the returned function is called (once they are applied);
        `Backlogged` (429) if they would exceed the bound."""
        with self._lock:
            pending = self.pending
            refused = bool(pending) and pending + events > self.max_events
            if not refused:
                self.pending = pending = pending + events
        if refused:
            metrics.ADMISSION_REFUSED.inc(gate="telemetry", reason="backlog")
            raise Backlogged(f"the twin shards are behind ({pending} events accepted and not yet applied, bound "
                             f"{self.max_events}); nothing of this batch was accepted: send it again after "
                             f"{self.retry_after_s} s", details=[{"retry_after_s": self.retry_after_s,
                                                                 "backlog_events": pending}],
                             headers={"Retry-After": str(self.retry_after_s)})
        metrics.TELEMETRY_BACKLOG.set(pending)
        return functools.partial(self._release, events, threading.Event())

    def _release(self, events: int, released: threading.Event) -> None:
        with self._lock:
            if released.is_set():
                return
            released.set()
            self.pending -= events
            pending = self.pending
        metrics.TELEMETRY_BACKLOG.set(pending)
