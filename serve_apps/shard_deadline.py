"""Deadlines on twin shard calls, so that one hung shard costs its own twins only.

A shard can be alive to Ray and answer nothing: its process stopped (SIGSTOP, a frozen VM), deadlocked
or stalled for seconds. Calls to it queue without end, and each request waiting on one holds an
admission slot of the Ingress replica (`serve_apps.admission`): a few such requests and the replica
refused every request of every tenant as "overloaded", its health route included, with its CPU idle.

So a call that a shard leaves unanswered past its deadline (`ServeConfig.shard_read_timeout_s`,
`shard_write_timeout_s`) opens that shard's breaker in the replica until the call completes: reads
of its twins are answered from their last durable state, marked stale (as while a killed shard
restarts), time-travel reads and writes (telemetry, drift clears, asset changes) are refused at once with
503 ``twin_unavailable`` and `Retry-After`. A write refused after its deadline may still be applied when
the shard answers; resending telemetry is safe (events are idempotent: `raytwin.contracts.TelemetryEvent`),
and the SDK does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from raytwin import metrics
from serve_apps.errors import ApiError
from serve_apps.unawaited import orphan

log = logging.getLogger("raytwin.serve")

T = TypeVar("T")

RETRY_AFTER_S = 2
"""`Retry-After` of a refusal: a stalled shard that comes back answers within seconds."""


class TwinUnavailable(ApiError):
    """503: the twin's shard leaves calls unanswered (hung or stalled); retry after `Retry-After`."""

    status, code = 503, "twin_unavailable"


class ShardBreakers:
    """The shards (by index) that left a call unanswered past its deadline, each until that call completes;
    per replica, on its event loop only."""

    def __init__(self, shards: int = 0) -> None:
        self._unanswered: dict[int, asyncio.Future] = {}
        # exported at 0 from the start, or a replica's first unanswered call to a shard would not show in `increase()`
        metrics.SHARD_UNANSWERED.zero(*({"shard": str(i)} for i in range(shards)))

    def is_open(self, index: int) -> bool:
        return index in self._unanswered

    def trip(self, index: int, call: asyncio.Future, deadline_s: float) -> None:
        """Open shard `index`'s breaker until `call` (unanswered after `deadline_s`) completes."""
        orphan(call, f"call to twin shard {index} past its {deadline_s:g} s deadline")
        if index in self._unanswered:
            return
        self._unanswered[index] = call
        metrics.SHARD_UNANSWERED.inc(shard=str(index))
        log.warning("event=shard_unanswered shard=%d deadline_s=%g: its twins are read from the store (stale) and "
                    "their writes refused with 503 until it answers", index, deadline_s)

        def closed(_: asyncio.Future) -> None:
            if self._unanswered.get(index) is not call:
                return
            del self._unanswered[index]  # the next call tries the shard again (and trips this again if it is late)
            if (lost := _unanswered_failure(call)) is None:
                log.info("event=shard_answered shard=%d: its twins are live again", index)
            else:
                log.warning("event=shard_call_failed shard=%d error=%s: Ray gave up the late call (the process is "
                            "unreachable, dead or restarting), so the shard has not answered; its next call tries it "
                            "again", index, lost)

        call.add_done_callback(closed)

    def refuse_if_open(self, index: int, asset_id: str) -> None:
        if index in self._unanswered:
            raise _refusal(asset_id, "leaves calls unanswered")

    async def within(self, index: int, asset_id: str, call: Callable[[], Awaitable[T]], deadline_s: float) -> T:
        """The answer of `call()` (not made while the breaker is open: 503); after `deadline_s` without one, 503
        (the call goes on, the breaker open until it ends)."""
        self.refuse_if_open(index, asset_id)
        pending = asyncio.ensure_future(call())
        try:
            done, _ = await asyncio.wait({pending}, timeout=deadline_s)
        except asyncio.CancelledError:  # the client went away: the call goes on (a write is not undone), unawaited
            orphan(pending, f"call to the shard of twin {asset_id}")
            raise
        if not done:
            self.trip(index, pending, deadline_s)
            raise _refusal(asset_id, f"has not answered within {deadline_s:g} s")
        return pending.result()


def _unanswered_failure(call: asyncio.Future) -> str | None:
    """What ended `call` without the shard answering: cancelled, or failed by Ray for want of the process
    (`RayActorError`: unreachable, as a stopped one is, dead or restarting); None for an answer, a result or an
    error the shard raised."""
    from ray.exceptions import RayActorError

    if call.cancelled():
        return "cancelled"
    exc = call.exception()
    return type(exc).__name__ if isinstance(exc, RayActorError) else None


def _refusal(asset_id: str, why: str) -> TwinUnavailable:
    return TwinUnavailable(f"the shard holding twin {asset_id} {why} (a hung or stalled process; other twins are "
                           f"unaffected); retry after {RETRY_AFTER_S} s. A write may still be applied when it answers: "
                           "resending telemetry is safe (events are idempotent); read the asset before repeating "
                           "another change", headers={"Retry-After": str(RETRY_AFTER_S)})
