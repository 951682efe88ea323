"""The durable sink: mapped messages -> the twins' ingestion path and the dead-letter store.

`TwinSink.deliver` returns only once every event of the batch is durable in its twin's log and
applied (the shards log before they apply and before they answer), and every dead letter is
written. A connector acknowledges a message to its source only after that, so a crash at any
point leaves the message unacknowledged and the source delivers it again; the twins count the
re-delivery as a duplicate. End to end that is at-least-once delivery with an exactly-once effect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from actors.ingest import DEFAULT_MAX_IN_FLIGHT, Dispatcher, ShardRouter
from actors.state import IngestReport
from actors.telemetry import validated_table
from connectors.mapping import DeadLetter
from raytwin.contracts import TelemetryEvent

log = logging.getLogger("raytwin.connectors")


@dataclass
class Inbound:
    """One received message, mapped: its events, its dead letters and how to acknowledge it."""

    source: str
    events: list[TelemetryEvent]
    dead: list[DeadLetter]
    ack: Callable[[], None]
    received_at: float = 0.0
    """`time.monotonic()` when it arrived (for the connector's lag)."""


@dataclass
class Delivery:
    """What one `deliver` did: the twins' report and how many dead letters the mapping wrote."""

    report: IngestReport = field(default_factory=IngestReport)
    dead_lettered: int = 0
    newest_event_time: datetime | None = None


class TwinSink:
    """Feeds one tenant's twins of the service reached through `router` (a `TwinService`'s)."""

    def __init__(self, router: ShardRouter, tenant: str, *, batch_size: int,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT):
        self.router, self.tenant = router, tenant
        self.batch_size, self.max_in_flight = batch_size, max_in_flight
        self._handles: list | None = None

    def deliver(self, messages: Sequence[Inbound]) -> Delivery:
        """Make the messages' events durable and applied and their dead letters durable; raises if
        any part failed (then nothing may be acknowledged: the source re-delivers, the twins dedupe)."""
        dead = [d.row() for m in messages for d in m.dead]
        events = [e for m in messages for e in m.events]
        if dead:
            self.router.store().write_dead_letters(self.tenant, dead)
            log.warning("event=connector_dead_letters tenant=%s count=%d first_source=%s first_reason=%r",
                        self.tenant, len(dead), messages[0].source if messages else "", dead[0]["reason"][:200])
        delivery = Delivery(dead_lettered=len(dead))
        if events:
            delivery.report = self._ingest(events)
            delivery.newest_event_time = max(e.event_time for e in events)
        return delivery

    def _ingest(self, events: list[TelemetryEvent]) -> IngestReport:
        if self._handles is None:
            self._handles = [self.router.handle(i) for i in range(self.router.shards)]
        dispatcher = Dispatcher(self.router, self.tenant, max_in_flight=self.max_in_flight,
                                batch_size=self.batch_size, handles=self._handles)
        try:
            dispatcher.send(validated_table(events))
            return dispatcher.finish()
        except Exception:
            self._handles = None  # the service may have been restarted: look its shards up again
            raise
