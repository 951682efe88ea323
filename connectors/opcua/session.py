"""The OPC UA client side of a connector: one session to one server, monitored items, batches into a sink.

Why this shape:
- **Reconnect with backoff.** Any loss (server restart, network, refused session) tears the session down and
  reconnects after `backoff_initial_s`, doubling up to `backoff_max_s` (with jitter, so a fleet of connectors
  does not hammer a restarted server in step). A fresh subscription makes the server send every item's current
  value again; those are re-deliveries with their original source timestamps, de-duplicated by the twins.
- **Bounded memory, no silent drops.** Notifications wait in one buffer. When it holds `max_buffered` of them
  the subscription's publishing is switched off (`SetPublishingMode`); the server then keeps new values in each
  monitored item's own queue (`queue_size`, oldest discarded beyond it: OPC UA's semantics) until the buffer
  has drained to half and publishing is switched on again. The buffer never holds more than `max_buffered`
  plus one publish response (at most `queue_size` values per item).
- **Durable before counted.** A batch leaves the buffer only after the sink returned (events durable in the
  twins' log and applied, dead letters written); a failed delivery is retried with backoff, in order.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from asyncua import Client, ua
from asyncua.common.subscription import Subscription

from actors.state import IngestReport
from connectors.opcua.config import CommandNode, MappedNode, OpcUaConfig
from connectors.opcua.values import Rejected, to_event
from raytwin import units
from raytwin.contracts import TelemetryEvent

log = logging.getLogger("raytwin.connectors.opcua")
LOSS = (OSError, ConnectionError, asyncio.TimeoutError, ua.UaError)
"""What a lost or refused connection raises (asyncua's status-code errors are `UaError`s)."""


class Sink(Protocol):
    """Where batches go; `deliver` returns once the events are durable and applied (blocking)."""

    def deliver(self, events: list[TelemetryEvent], dead_letters: list[dict[str, str]]) -> IngestReport: ...


class NotConnected(RuntimeError):
    """The connector has no session to its server right now; nothing was written."""


@dataclass
class Counters:
    """What `status()` reports besides the state; all monotonic since the connector (process) started."""

    received: int = 0
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    no_value: int = 0
    reconnects: int = 0
    delivery_failures: int = 0
    backpressure_pauses: int = 0
    commands_acked: int = 0
    commands_failed: int = 0


@dataclass(frozen=True)
class CommandResult:
    """The outcome of writing one command: `acked` (the server accepted both writes, or already holds this
    correlation id: sent before, never written twice) or `failed` with the server's status names."""

    correlation_id: str
    status: str
    detail: str
    already_sent: bool = False


class _Handler:
    """asyncua calls these from its publish loop; they only append (never await), so order is kept."""

    def __init__(self, session: OpcUaSession):
        self.session = session

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.session._on_value(node.nodeid, data.monitored_item.Value)

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        log.warning("event=opcua_status_change connector=%s status=%s", self.session.config.name, status.Status.name)


class OpcUaSession:
    """Runs one connector's OPC UA side in the current event loop until `stop()`."""

    def __init__(self, config: OpcUaConfig, sink: Sink):
        self.config, self.sink = config, sink
        self.counters = Counters()
        self.state = "starting"
        self.last_error: str | None = None
        self.unavailable: dict[str, str] = {}  # node id -> why its monitored item could not be created
        self._buffer: deque[tuple[MappedNode, ua.DataValue, float]] = deque()
        self._wake = asyncio.Event()
        self._lost = asyncio.Event()
        self._stop = asyncio.Event()
        self._user_paused = False
        self._bp_paused = False
        self._client: Client | None = None
        self._sub: Subscription | None = None
        self._resolved: dict[ua.NodeId, MappedNode] = {}
        self._newest: dict[str, datetime] = {}  # node id -> newest durable source timestamp

    # ------------------------------------------------------------------ lifecycle ----
    async def run(self) -> None:
        """Connect, subscribe and deliver until `stop()`; every loss is followed by a reconnect."""
        consumer = asyncio.create_task(self._consume())
        delay = self.config.backoff_initial_s
        try:
            while not self._stop.is_set():
                try:
                    await self._connect()
                    delay = self.config.backoff_initial_s
                    await _first(self._lost.wait(), self._stop.wait())
                    if not self._stop.is_set():
                        self._fail("connection lost")
                except LOSS as exc:
                    self._fail(f"{type(exc).__name__}: {exc}")
                await self._disconnect()
                if self._stop.is_set():
                    break
                self.counters.reconnects += 1
                self.state = "backoff"
                await _first(asyncio.sleep(delay * random.uniform(0.8, 1.2)), self._stop.wait())
                delay = min(delay * 2, self.config.backoff_max_s)
        finally:
            await self._disconnect()
            self._wake.set()
            await consumer  # delivers what is buffered, then ends
            self.state = "stopped"

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def pause(self) -> None:
        """Stop publishing: the server holds new values in each item's queue (`queue_size`) until `resume()`."""
        self._user_paused = True
        await self._apply_publishing()

    async def resume(self) -> None:
        self._user_paused = False
        await self._apply_publishing()

    def status(self) -> dict[str, Any]:
        oldest = self._buffer[0][2] if self._buffer else None
        return {
            "name": self.config.name, "kind": "opcua", "tenant": self.config.tenant, "endpoint": self.config.endpoint,
            "state": "paused" if self._user_paused and self.state == "connected" else self.state,
            "connected": self.state == "connected", "buffered": len(self._buffer),
            "lag_s": 0.0 if oldest is None else time.monotonic() - oldest,
            "backpressure": self._bp_paused, "last_error": self.last_error,
            "unavailable_nodes": dict(self.unavailable), **asdict(self.counters),
        }

    def _fail(self, reason: str) -> None:
        self.last_error = reason
        log.warning("event=opcua_disconnected connector=%s endpoint=%s reason=%s", self.config.name,
                    self.config.endpoint, reason)

    # ----------------------------------------------------------------- connection ----
    async def _connect(self) -> None:
        cfg = self.config
        self.state = "connecting"
        self._lost.clear()
        client = Client(cfg.endpoint, timeout=cfg.request_timeout_s)
        client.session_timeout = int(cfg.session_timeout_s * 1000)
        if cfg.username is not None:
            client.set_user(cfg.username)
            client.set_password(cfg.password.get_secret_value())
        if cfg.security:
            await client.set_security_string(cfg.security)

        async def lost(exc: Exception) -> None:
            self._lost.set()

        client.connection_lost_callback = lost
        self._client = client
        await client.connect()
        self._resolved = {await self._resolve(n.node_id): n for n in cfg.nodes}
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=cfg.publishing_interval_ms, RequestedLifetimeCount=10_000,
            RequestedMaxKeepAliveCount=client.get_keepalive_count(cfg.publishing_interval_ms),
            MaxNotificationsPerPublish=cfg.batch_size, PublishingEnabled=not self._publishing_off(), Priority=0)
        self._sub = await client.create_subscription(params, _Handler(self))
        nodes = [client.get_node(nid) for nid in self._resolved]
        results = await self._sub.subscribe_data_change(nodes, queuesize=cfg.queue_size,
                                                        sampling_interval=cfg.sampling_interval_ms)
        self.unavailable = {self._resolved[n.nodeid].node_id: r.name for n, r in zip(nodes, results)
                            if isinstance(r, ua.StatusCode)}
        for node_id, why in self.unavailable.items():
            log.error("event=opcua_node_unavailable connector=%s node=%s status=%s", cfg.name, node_id, why)
        self.state = "connected"
        log.info("event=opcua_connected connector=%s endpoint=%s items=%d", cfg.name, cfg.endpoint,
                 len(nodes) - len(self.unavailable))

    async def _resolve(self, node_id: str) -> ua.NodeId:
        """A configured node id with a namespace URI (`nsu=`) resolved to this server's namespace index."""
        nid = ua.NodeId.from_string(node_id)
        uri = getattr(nid, "NamespaceUri", None)
        if uri:
            return ua.NodeId(nid.Identifier, await self._client.get_namespace_index(uri), nid.NodeIdType)
        return nid

    async def _disconnect(self) -> None:
        client, self._client, self._sub = self._client, None, None
        if client is None:
            return
        try:
            await asyncio.wait_for(client.disconnect(), self.config.request_timeout_s)
        except Exception:  # already gone: the socket is closed below either way
            client.disconnect_socket()

    # ---------------------------------------------------------------- the stream ----
    def _on_value(self, nodeid: ua.NodeId, dv: ua.DataValue) -> None:
        node = self._resolved.get(nodeid)
        if node is None:
            return
        self.counters.received += 1
        self._buffer.append((node, dv, time.monotonic()))
        self._wake.set()
        if len(self._buffer) >= self.config.max_buffered and not self._bp_paused:
            self._bp_paused = True
            self.counters.backpressure_pauses += 1
            log.info("event=opcua_backpressure connector=%s buffered=%d", self.config.name, len(self._buffer))
            asyncio.get_running_loop().create_task(self._apply_publishing())

    def _publishing_off(self) -> bool:
        return self._user_paused or self._bp_paused

    async def _apply_publishing(self) -> None:
        sub = self._sub
        if sub is None:
            return  # the next subscription is created with the current mode
        try:
            await sub.set_publishing_mode(not self._publishing_off())
        except LOSS as exc:
            self._lost.set()
            log.warning("event=opcua_publishing_mode_failed connector=%s error=%s", self.config.name, exc)

    async def _consume(self) -> None:
        """Take batches off the buffer (up to `batch_size`, waiting `linger_s` for company) into the sink."""
        cfg = self.config
        while True:
            if not self._buffer:
                if self._stop.is_set():
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._buffer) < cfg.batch_size and not self._stop.is_set():
                await asyncio.sleep(cfg.linger_s)
            batch = [self._buffer[i] for i in range(min(cfg.batch_size, len(self._buffer)))]
            await self._deliver(batch)
            for _ in batch:
                self._buffer.popleft()
            if self._bp_paused and len(self._buffer) <= cfg.max_buffered // 2:
                self._bp_paused = False
                await self._apply_publishing()

    async def _deliver(self, batch: list[tuple[MappedNode, ua.DataValue, float]]) -> None:
        events: list[TelemetryEvent] = []
        dead: list[dict[str, str]] = []
        for node, dv, _ in batch:
            out = to_event(node, dv)
            if out is None:
                self.counters.no_value += 1
            elif isinstance(out, Rejected):
                dead.append(out.dead_letter(self.config.name))
            else:
                events.append(out)
        if not events and not dead:
            return
        delay = self.config.backoff_initial_s
        while True:
            try:
                report = await asyncio.to_thread(self.sink.deliver, events, dead)
                break
            except Exception as exc:  # the store or the twins are unavailable: retry the same batch, in order
                self.counters.delivery_failures += 1
                log.warning("event=opcua_delivery_failed connector=%s events=%d error=%s", self.config.name,
                            len(events), f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.backoff_max_s)
        self.counters.applied += report.accepted
        self.counters.duplicates += report.duplicates
        self.counters.rejected += report.rejected + len(dead)
        for ev in events:
            key = ev.idempotency_key
            if key not in self._newest or ev.event_time > self._newest[key]:
                self._newest[key] = ev.event_time

    # ------------------------------------------------------------------ commands ----
    async def send_command(self, target: CommandNode, correlation_id: str, value: float, unit: str) -> CommandResult:
        """Write `value` (converted from `unit` to the target's unit) and the correlation id in one Write request.

        Never twice: if the correlation node already holds this id, the command went out before (a retry after
        a crash or a lost reply) and is acknowledged without writing again."""
        client = self._client
        if client is None or self.state != "connected":
            raise NotConnected(f"connector {self.config.name!r} is not connected to {self.config.endpoint} "
                               f"({self.state}); the command was not written")
        converted = units.to_unit(value, unit, target.unit)
        value_node, corr_node = await self._resolve(target.node_id), await self._resolve(target.correlation_node_id)
        current = await client.get_node(corr_node).read_data_value(raise_on_bad_status=False)
        if current.Value is not None and current.Value.Value == correlation_id:
            self.counters.commands_acked += 1
            return CommandResult(correlation_id, "acked", f"{target.correlation_node_id} already holds this id",
                                 already_sent=True)
        stamp = datetime.now(UTC)
        codes = await client.uaclient.write_attributes(
            [value_node, corr_node],
            [ua.DataValue(ua.Variant(converted, ua.VariantType.Double), SourceTimestamp=stamp),
             ua.DataValue(ua.Variant(correlation_id, ua.VariantType.String), SourceTimestamp=stamp)],
            ua.AttributeIds.Value)
        ok = all(c.is_good() for c in codes)
        detail = ", ".join(f"{n}: {c.name}" for n, c in zip((target.node_id, target.correlation_node_id), codes))
        if ok:
            self.counters.commands_acked += 1
        else:
            self.counters.commands_failed += 1
        log.info("event=opcua_command connector=%s asset=%s command=%s correlation_id=%s status=%s detail=%s",
                 self.config.name, target.asset_id, target.name, correlation_id, "acked" if ok else "failed", detail)
        return CommandResult(correlation_id, "acked" if ok else "failed", detail)


async def _first(*aws: Any) -> None:
    """Wait until the first of `aws` completes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
