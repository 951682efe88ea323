"""The durable sink: mapped messages -> the twins' ingestion path and the dead-letter store.

`TwinSink.deliver` returns only once every event of the batch is durable in its twin's log and
applied (the shards log before they apply and before they answer), and every dead letter is
written. A connector acknowledges a message to its source only after that, so a crash at any
point leaves the message unacknowledged and the source delivers it again; the twins count the
re-delivery as a duplicate. End to end that is at-least-once delivery with an exactly-once effect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from actors.ingest import DEFAULT_MAX_IN_FLIGHT, Dispatcher, ShardRouter, validate_batch
from actors.state import IngestReport
from actors.telemetry import SOURCE_COLUMN
from connectors.mapping import DeadLetter, bounded, led
from connectors.seen_letters import SeenLetters

log = logging.getLogger("raytwin.connectors")


@dataclass
class Inbound:
    """One received message, mapped: its telemetry rows (JSON-shaped, not yet contract-checked), its
    dead letters and how to acknowledge it."""

    source: str
    rows: list[dict[str, Any]]
    dead: list[DeadLetter]
    ack: Callable[[], None]
    size: int = 0
    """The bytes of the message as received, which the pump's memory bound counts (0: negligible)."""
    received: float = field(default_factory=time.monotonic)
    """When the connector received it (`time.monotonic`): the pump's lag counts from it (`Pump.lag_s`)."""
    abandoned: Callable[[], bool] = field(default=lambda: False)
    """Asked by a full pump while it waits for room: whether the source no longer awaits the message (MQTT: the
    connection it came on is lost, or a pause began), which then gives it up, unqueued and unacknowledged, for the
    source to send again (`connectors.mqtt.MqttAdapter._abandoned`)."""


@dataclass
class Delivery:
    """What one `deliver` did: the twins' report and how many dead letters the mapping wrote."""

    report: IngestReport = field(default_factory=IngestReport)
    dead_lettered: int = 0
    unmapped: int = 0
    """Of `dead_lettered`, the readings the mapping could not read (the others: rows the contract refused)."""
    redelivered: int = 0
    """Dead letters of the mapping written before (a re-delivered reading, `connectors.seen_letters`): not again."""
    newest_event_time: datetime | None = None


def _applied(valid: pa.Table, report: IngestReport) -> pa.Table:
    """The rows of `valid` the twins did not refuse (unknown twin, too late, conflict): the connector's newest
    event time, its lag, counts only what reached a twin. Rejections come back by idempotency key."""
    if not report.rejected:
        return valid
    refused = {r.idempotency_key for r in report.reasons if r.idempotency_key is not None}
    if len(refused) < report.rejected:
        return valid.slice(0, 0)  # some rejection without its key: which rows were applied is unknown
    return valid.filter(pc.invert(pc.is_in(valid.column("idempotency_key"), value_set=pa.array(sorted(refused)))))


def _sourced(valid: pa.Table, sources: list[str]) -> pa.Table:
    return valid.append_column(SOURCE_COLUMN, pa.array(sources, pa.string()))


class TwinSink:
    """Feeds one tenant's twins of the service reached through `router` (a `TwinService`'s)."""

    def __init__(self, router: ShardRouter, tenant: str, *, batch_size: int,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, seen: SeenLetters | None = None):
        """`seen`: the connector's dead letters already written (a restarted connector's, from the store)."""
        self.router, self.tenant = router, tenant
        self.seen = seen if seen is not None else SeenLetters()
        self.batch_size, self.max_in_flight = batch_size, max_in_flight
        self._handles: list | None = None

    def deliver(self, messages: Sequence[Inbound]) -> Delivery:
        """Make the messages' events durable and applied and their dead letters durable; raises if
        any part failed (then nothing may be acknowledged: the source re-delivers, the twins dedupe)."""
        valid, rejects = self._checked(messages)
        letters = [d for m in messages for d in m.dead]
        fresh = self.seen.fresh(letters)
        dead = [d.row() for d in fresh] + rejects
        if dead:
            try:
                self.router.store().write_dead_letters(self.tenant, dead)
            except Exception:
                self.seen.forget(fresh)
                raise
            log.warning("event=connector_dead_letters tenant=%s count=%d first_reason=%r", self.tenant, len(dead),
                        dead[0]["reason"][:300])
        delivery = Delivery(dead_lettered=len(dead), unmapped=len(fresh), redelivered=len(letters) - len(fresh))
        if valid.num_rows:
            delivery.report = self._ingest(valid)
            applied = _applied(valid, delivery.report)
            if applied.num_rows:
                delivery.newest_event_time = pc.max(applied.column("event_time")).as_py()
        return delivery

    @staticmethod
    def _checked(messages: Sequence[Inbound]) -> tuple[pa.Table, list[dict[str, str | None]]]:
        """The contract check of all rows at once (`validate_batch`: column-wise from 32 rows); only when
        some row fails, again per source, so that each dead letter's reason names the topic (or node) it
        came from. The valid rows carry their source (`SOURCE_COLUMN`) for the same in what the shards refuse."""
        valid, rejects = validate_batch([r for m in messages for r in m.rows])
        if not rejects:  # every row valid, in order
            return _sourced(valid, [m.source for m in messages for _ in m.rows]), []
        by_source: dict[str, list[dict[str, Any]]] = {}
        for m in messages:
            by_source.setdefault(m.source, []).extend(m.rows)
        parts, rejects = [], []
        for source, rows in by_source.items():
            part, refused = validate_batch(rows)
            parts.append(_sourced(part, [source] * part.num_rows))
            rejects += [bounded({**r, "reason": led(source, r["reason"])}) for r in refused]
        return pa.concat_tables(parts), rejects

    def _ingest(self, table: pa.Table) -> IngestReport:
        if self._handles is None:
            self._handles = [self.router.handle(i) for i in range(self.router.shards)]
        dispatcher = Dispatcher(self.router, self.tenant, max_in_flight=self.max_in_flight,
                                batch_size=self.batch_size, handles=self._handles)
        try:
            dispatcher.send(table)
            return dispatcher.finish()
        except Exception:
            self._handles = None  # the service may have been restarted: look its shards up again
            raise
