"""The pump between a protocol adapter and the sink: bounded, batched, acknowledge-after-durable.

An adapter's receive thread `put`s mapped messages; when the queue is full (`max_queued` messages,
or `max_queued_bytes` of them as received) it blocks, so the source (the broker's in-flight window,
the OPC UA subscription) is held back instead of memory growing, until the message's source no longer
awaits it (`Inbound.abandoned`: MQTT's connection lost, or a pause). The pump's thread takes up to
`batch_size` events, or whatever arrived within `linger_s` of the oldest, delivers them and only
then acknowledges each message. A failed delivery (shards restarting, the store unreachable) is
retried with backoff, never dropped and never acknowledged, so a message leaves the source's care
only once its events are durable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

from connectors.sink import Inbound, TwinSink
from raytwin import metrics

log = logging.getLogger("raytwin.connectors")
RETRY_MIN_S, RETRY_MAX_S = 0.2, 10.0
MAX_QUEUED, MAX_QUEUED_BYTES = 10_000, 64 << 20
"""The queue's bounds: messages, and their bytes as received (`Inbound.size`); one message always fits."""
HELD_CHECK_S = 0.5
"""How often a `put` waiting for room asks whether its message is still awaited (`Inbound.abandoned`)."""


@dataclass
class PumpStats:
    """Counters since the connector (process) started, and the latest delivery error (until a delivery works)."""

    messages: int = 0
    acknowledged: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    delivery_errors: int = 0
    last_error: str | None = None
    last_error_at: datetime | None = None
    newest_event_time: datetime | None = None

    def event_age_s(self) -> float | None:
        """Seconds between the server's clock and the newest applied event's own time (None: none yet): how fresh the
        twins' data is, not how far behind its source the connector is (`Pump.lag_s`): replayed or backfilled history
        is as old as its event times (~336 days for a year-old replay), however fast it is taken."""
        if self.newest_event_time is None:
            return None
        return max(0.0, (datetime.now(UTC) - self.newest_event_time).total_seconds())


class Pump:
    """Moves `Inbound` messages into `sink` in batches, acknowledging each after its delivery."""

    def __init__(self, sink: TwinSink, name: str, *, batch_size: int = 1000, linger_s: float = 0.02,
                 max_queued: int = MAX_QUEUED, max_queued_bytes: int = MAX_QUEUED_BYTES):
        self.sink, self.name = sink, name
        self.batch_size, self.linger_s = batch_size, linger_s
        self.max_queued, self.max_queued_bytes = max_queued, max_queued_bytes
        self.stats = PumpStats()
        self._queue: deque[Inbound] = deque()
        self._delivering: list[Inbound] = []  # the batch being delivered, until it is acknowledged
        self._queued_bytes = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pump-{name}", daemon=True)
        self._thread.start()

    def put(self, message: Inbound) -> None:
        """Called from the adapter's receive thread; blocks while the queue is full (backpressure), and gives the
        message up, unqueued, once its source no longer awaits it (`Inbound.abandoned`, asked every `HELD_CHECK_S`)."""
        with self._changed:
            while self._queue and (len(self._queue) >= self.max_queued
                                   or self._queued_bytes + message.size > self.max_queued_bytes):
                if self._stop.is_set() or message.abandoned():
                    return
                self._changed.wait(HELD_CHECK_S)
            self._queue.append(message)
            self._queued_bytes += message.size
            self._changed.notify_all()

    def _get(self, timeout_s: float) -> Inbound | None:
        """The oldest queued message, waiting at most `timeout_s` for one (None: none came)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            message = self._queue.popleft()
            self._queued_bytes -= message.size
            self._changed.notify_all()
            return message

    def pending(self) -> int:
        """Messages received and not yet acknowledged (queued or being delivered)."""
        return self.stats.messages - self.stats.acknowledged

    def lag_s(self) -> float:
        """Seconds the oldest message handed over and not yet acknowledged (durable) has waited since the connector
        received it (0.0: none waits): how far behind its source the connector is, whatever times its events carry."""
        with self._changed:  # (the queue's lock; `_delivering` is replaced whole, never emptied in place)
            waiting = self._delivering or self._queue
            oldest = waiting[0].received if waiting else None
        return 0.0 if oldest is None else max(0.0, time.monotonic() - oldest)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if batch:
                self._deliver(batch)

    def _take(self) -> list[Inbound]:
        if (first := self._get(0.2)) is None:
            return []
        batch, events = [first], len(first.rows)
        self._delivering = batch  # (filled in place: the lag counts from its oldest while it lingers)
        deadline = time.monotonic() + self.linger_s
        while events < self.batch_size:
            if (item := self._get(max(0.0, deadline - time.monotonic()))) is None:
                break
            batch.append(item)
            events += len(item.rows)
        self.stats.messages += len(batch)
        metrics.CONNECTOR_MESSAGES.inc(len(batch), connector=self.name, outcome="received")
        return batch

    def _deliver(self, batch: list[Inbound]) -> None:
        wait = RETRY_MIN_S
        while not self._stop.is_set():
            try:
                delivery = self.sink.deliver(batch)
                break
            except Exception as exc:  # noqa: BLE001 - retried: the messages stay unacknowledged meanwhile
                self.stats.delivery_errors += 1
                metrics.CONNECTOR_MESSAGES.inc(connector=self.name, outcome="delivery_errors")
                self.stats.last_error = f"delivery failed: {type(exc).__name__}: {str(exc)[:300]}"
                self.stats.last_error_at = datetime.now(UTC)
                log.warning("event=connector_delivery_failed connector=%s messages=%d retry_in_s=%.1f error=%r",
                            self.name, len(batch), wait, self.stats.last_error)
                self._stop.wait(wait)
                wait = min(RETRY_MAX_S, wait * 2)
        else:
            return  # stopping: not acknowledged, so the source delivers them again
        for message in batch:
            message.ack()
        self._delivering = []
        s, r = self.stats, delivery.report
        s.last_error = s.last_error_at = None  # delivered: a failure before is over
        s.acknowledged += len(batch)
        s.accepted += r.accepted
        s.duplicates += r.duplicates + delivery.redelivered
        s.rejected += r.rejected
        s.dead_lettered += delivery.dead_lettered
        newest = delivery.newest_event_time
        if newest and (s.newest_event_time is None or newest > s.newest_event_time):
            s.newest_event_time = newest
            metrics.CONNECTOR_NEWEST_EVENT.set(newest.timestamp(), connector=self.name)
        for outcome, n in (("acknowledged", len(batch)), ("accepted", r.accepted),
                           ("duplicates", r.duplicates + delivery.redelivered),
                           ("rejected", r.rejected), ("dead_lettered", delivery.dead_lettered)):
            if n:
                metrics.CONNECTOR_MESSAGES.inc(n, connector=self.name, outcome=outcome)
        metrics.DEAD_LETTERS.inc(delivery.unmapped, stage="connector", reason="mapping")  # (0 is skipped)
        metrics.DEAD_LETTERS.inc(delivery.dead_lettered - delivery.unmapped, stage="connector", reason="invalid")
