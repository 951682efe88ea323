"""How many change streams one Ingress replica holds open, in all and per tenant.

A change stream is one ongoing request of its replica for as long as its client listens (hours), and
it is not gated by the admission (serve_apps/README.md, "Overload"). Unbounded, ~130 idle streams of
one reader key took every request slot of four replicas (4 x `max_ongoing_requests`) and every other
request of every tenant hung without an answer. So a replica holds at most `Admission.max_streams`
(fewer than its `max_ongoing_requests`: the rest stay for other requests) and one tenant at most
`max_streams_per_tenant` of them; beyond, a new stream is refused at once (503 `overloaded`, 429
`rate_limited`, with `Retry-After`), and the client reconnects later or on another replica.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import AsyncIterator

from raytwin import metrics
from serve_apps.admission import Admission
from serve_apps.errors import ApiError, RateLimited


class StreamsOverloaded(ApiError):
    status, code = 503, "overloaded"


class StreamSlots:
    """This replica's open streams (its event loop only: no locks)."""

    def __init__(self, limits: Admission):
        if limits.max_streams is None:
            raise ValueError("Admission.max_streams is unset: take the limits of a ServeConfig, which sets it")
        self.limits, self.max_streams = limits, limits.max_streams
        self.open: Counter[str] = Counter()  # tenant -> open streams
        metrics.ADMISSION_REFUSED.zero(*({"gate": "streams", "reason": r} for r in ("replica", "tenant")))

    def hold(self, tenant: str, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """`stream`, holding a slot of `tenant` until it ends, fails or is dropped; refused when none is free."""
        retry = {"Retry-After": str(self.limits.retry_after_s)}
        details = [{"retry_after_s": self.limits.retry_after_s}]
        if sum(self.open.values()) >= self.max_streams:
            metrics.ADMISSION_REFUSED.inc(gate="streams", reason="replica")
            raise StreamsOverloaded(f"this replica has {self.max_streams} change streams open, its limit; "
                                    f"retry after {self.limits.retry_after_s} s", details, retry)
        if self.open[tenant] >= self.limits.max_streams_per_tenant:
            metrics.ADMISSION_REFUSED.inc(gate="streams", reason="tenant")
            raise RateLimited(f"your tenant has {self.open[tenant]} change streams open on this replica, its limit "
                              f"({self.limits.max_streams_per_tenant}): close one, or filter one stream by "
                              "asset_id/type_name/kind instead of opening several", details, retry)
        self.open[tenant] += 1
        slot = _Slot(self.open, tenant)
        held = _held(stream, slot)
        weakref.finalize(held, slot.release)  # also a stream dropped before its first frame
        return held


class _Slot:
    def __init__(self, open_streams: Counter[str], tenant: str):
        self.open_streams, self.tenant, self.held = open_streams, tenant, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.open_streams[self.tenant] -= 1
            if self.open_streams[self.tenant] <= 0:
                del self.open_streams[self.tenant]


async def _held(stream: AsyncIterator[str], slot: _Slot) -> AsyncIterator[str]:
    try:
        async for frame in stream:
            yield frame
    finally:
        slot.release()
