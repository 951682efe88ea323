"""The OPC UA client side of a connector: one session to one server, its monitored items, commands.

Why this shape:
- **Reconnect with backoff.** Any loss (server restart, network, refused session) tears the session down and
  reconnects after `backoff_initial_s`, doubling up to `backoff_max_s` (with jitter, so a fleet of connectors
  does not hammer a restarted server in step), the first connection included. A new subscription makes the
  server send every item's current value again: re-deliveries with their original source timestamps, which
  the twins count as duplicates (`connectors.opcua.values`).
- **Backfill.** Changes made while no subscription existed are not queued by OPC UA; with `backfill_s` the
  session reads them from the nodes' history (HistoryRead) after subscribing (overlap, not a gap). Without
  it, a resubscription after a loss or after a restart of the connector's process is reported as an error
  naming the gap (only each node's latest value arrives), so an operator learns of it from `last_error`
  instead of from a twin that skipped changes.
- **Only where the reach policy allows.** A tenant's connector (`reach`) resolves the server's name once per
  connection attempt and connects the socket to an address the policy allows (`connectors.reach`), never
  resolving it again; the endpoint URL, which names the server in the session, stays the declared one.
- **Bounded memory, no silent drops.** asyncua's publish loop must never block, so value changes are handed
  to the pump (`put`, which blocks when the pump is full) by one feeder task through a worker thread, in
  order. When `max_outstanding` changes are received and not yet durable, the subscription's publishing is
  switched off (`SetPublishingMode`): the server then keeps new values in each monitored item's own queue
  (`queue_size`; beyond it OPC UA discards the oldest) until half have become durable, and publishing is
  switched on again. The connector holds at most `max_outstanding` plus one publish response. With
  `backfill_s`, switching publishing on again (a resume, the end of backpressure) reads each node's history
  after its newest durable change, so what a queue discarded is read back (and nothing already durable, which
  counted as outstanding again and kept an idle session switching publishing off and on; nor a reading refused
  as from a clock ahead, stamped after that start, that the server received by the newest refusal made durable:
  a full queue's discards among them are read back by the recovery below); without it, a value
  the server flags as following an overflow is reported as an error, and so is publishing off for longer than
  `queue_size` sampling intervals (some servers, asyncua's among them, never flag an overflow).
- **Full queues are read back.** A publish response carrying as many values of one item as the queue the server
  granted it (its queue was full, so the server may have discarded older ones, usually without flagging it)
  makes that node suspect;
  with `backfill_s` its history is read back (`connectors.opcua.recovery`), and what cannot be is an error.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from asyncua import Client, ua
from asyncua.common.subscription import Subscription

from connectors.commands import OutcomeUnknown, Refused
from connectors.kinds import ignore
from connectors.mapping import DeadLetter
from connectors.opcua.config import OPC_UA_PORT, CommandNode, MappedNode, OpcUaSpec
from connectors.opcua.recovery import OVERFLOW, QueueWatch, Suspect
from connectors.opcua.targets import node_type, unit_problem
from connectors.opcua.values import NodeType, clock_ahead, command_variant, source, to_row
from connectors.reach import Reach
from connectors.sink import Inbound
from connectors.spec import Credentials
from raytwin import metrics

log = logging.getLogger("raytwin.connectors")
LOSS = (OSError, ConnectionError, asyncio.TimeoutError, ua.UaError)
"""What a lost or refused connection raises (asyncua's status-code errors are `UaError`s)."""
STAMP_PRECISION = timedelta(milliseconds=1)
"""How far a historian may round a source timestamp it stores (some keep milliseconds)."""
HISTORY_LAG_S = 1.0
"""How long a history read that misses a value the subscription delivered waits before it reads again (a
historian may store a value after its subscribers got it), before the loss is reported."""
AFTER_DURABLE = timedelta(microseconds=1)
"""A backfill reads from just after each node's newest durable change (a microsecond, the finest asyncua's source
times and the twins' sequence tell apart): read from it, every resume handed each node's newest change over again,
a duplicate outstanding until durable, and with as many nodes as half `max_outstanding` those duplicates alone
held publishing again at the end of backpressure, round after round for good on an idle server."""
IDENTITY_REFUSALS = frozenset({"BadUserAccessDenied", "BadIdentityTokenInvalid", "BadIdentityTokenRejected"})
"""How a server refuses a session's user (ActivateSession): a wrong username or password, or none where it needs one."""
NODE_FIXES = {
    "BadNodeIdUnknown": "the server has no node of this id: check node_id against the server's address space (browse "
                        "it with an OPC UA client), then declare the connector again",
    "BadAttributeIdInvalid": "the node has no value (it is no variable): declare a variable's node id",
    "BadNotReadable": "the node is not readable: the server's access rights for it",
    "BadUserAccessDenied": "the server does not let the connector's user read it: its access rights for that user",
}
"""Why a server refuses to monitor a node, by status code, and the fix (only the code was shown)."""


def unmonitorable(code: str) -> str:
    """A monitored item's refusal (its status code's name) with its fix, where known."""
    return f"{code} ({NODE_FIXES[code]})" if code in NODE_FIXES else code


def connect_problem(endpoint: str, exc: BaseException, credentials: bool) -> str:
    """What `exc` says went wrong with the session at `endpoint`, and the fix where it is the connector's to make
    (`credentials`: whether it has a username or password). Only asyncua's words were shown: a wrong password read
    "User does not have permission to perform the requested operation", nothing listening "[Errno 111] ..."."""
    what, url = f"{type(exc).__name__}: {exc}", urlsplit(endpoint)
    if isinstance(exc, ConnectionRefusedError):
        port = url.port or OPC_UA_PORT
        return (f"{what}: server {url.hostname}:{port} refused the TCP connection (nothing listens on port {port}): "
                "check the endpoint's host and port, and that the server runs")
    if isinstance(exc, socket.gaierror):
        return (f"{what}: cannot resolve {url.hostname!r}: check the endpoint and the DNS of the nodes that run "
                "connectors")
    if type(exc).__name__ not in IDENTITY_REFUSALS:
        return what
    if not credentials:
        return (f"{what}: the server refuses a session without a user, and this connector has no credentials: declare "
                "it again with a username and password")
    return (f"{what}: the server refused the session's user: check the connector's username and password (declare it "
            "again with the right ones), then that the server lets this user open a session")


class NothingMonitored(ConnectionError):
    """No declared node can be monitored (ids the server does not know, namespaces it lacks): the session serves
    nothing, so it is not connected (it was, and no alert fired while its twins got nothing) and retries with
    backoff, for a server whose address space comes back."""


class _Client(Client):
    """asyncua's client, connecting a tenant's connector only where its `reach` allows."""

    reach: Reach | None = None  # None: the operator's connector, which reaches any host

    async def connect_socket(self) -> None:
        """With a `reach`, the server's name is resolved once for this attempt and the socket connected to an
        address it allows: asyncua resolving it again could get another answer (DNS rebinding:
        169.254.169.254). Every (re)connect comes here; the endpoint URL (hello, session) keeps the name."""
        if self.reach is None:
            return await super().connect_socket()
        url = self.server_url
        error: OSError | None = None
        for info in await asyncio.to_thread(self.reach.vetted, url.hostname, url.port or OPC_UA_PORT):
            try:
                return await self.uaclient.connect_socket(info[4][0], info[4][1])  # the address and port vetted
            except OSError as exc:  # (a timeout is one) the next vetted address, as a name's addresses are tried
                error = exc
        raise error


class _Handler:
    """asyncua calls this from its publish loop (data changes are the session's own: `_Subscription`)."""

    def __init__(self, session: OpcUaSession):
        self.session = session

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        self.session._error(f"the server reported subscription status {status.Status.name}")


class _Subscription(Subscription):
    """asyncua's subscription, whose data changes the session takes whole, per publish response (how many values
    of one item a response carries tells whether that item's queue was full), for the items the session created
    (`items`, kept from asyncua's own requests and results, not its internals); asyncua handles the rest (status
    changes)."""

    def __init__(self, client: Client, params: ua.CreateSubscriptionParameters, session: OpcUaSession):
        super().__init__(client.uaclient.session, params, _Handler(session))
        self.session = session
        self.items: dict[int, ua.NodeId] = {}  # client handle -> node, of the monitored items created

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        message = publish_result.NotificationMessage
        notifications = message.NotificationData or []
        changes = [item for n in notifications if isinstance(n, ua.DataChangeNotification)
                   for item in n.MonitoredItems or []]
        self.session._published([(nid, item.Value) for item in changes
                                 if (nid := self.items.get(item.ClientHandle)) is not None and item.Value is not None])
        rest = [n for n in notifications if not isinstance(n, ua.DataChangeNotification)]
        await super().publish_callback(replace(publish_result, NotificationMessage=replace(
            message, NotificationData=rest if message.NotificationData is not None else None)))

    async def recreate(self) -> None:
        """asyncua re-creates a subscription the server dropped (its stale-subscription watchdog, or a reconnect
        that could not transfer it) with the items asyncua created, and it created none of these: the session
        subscribes again itself (and backfills the gap) instead of being left with a subscription of no items."""
        self.session._error("the server dropped the subscription; subscribing again")
        self.session._lost.set()


class OpcUaSession:
    """Runs one connector's OPC UA side in the current event loop until `stop()`."""

    def __init__(self, spec: OpcUaSpec, credentials: Credentials, put: Callable[[Inbound], None], *,
                 gap_since: datetime | None = None, on_connected: Callable[[], None] = ignore,
                 reach: Reach | None = None):
        """`gap_since`: when an earlier process of this connector was last alive (its subscription ended then,
        give or take the connector's heartbeat), a gap to report at the first subscription without backfill;
        `on_connected`: called (in a worker thread) at each subscription, before the session reports connected;
        `reach`: where a tenant's connector may connect, checked at every connection attempt (None: anywhere)."""
        self.spec, self.credentials, self.put, self.on_connected = spec, credentials, put, on_connected
        self.reach = reach
        self.errors, self.last_error, self.last_error_at = 0, None, None
        self._state = "starting"
        self.backpressure_pauses = 0
        self.connects = 0
        """Connects completed: subscribed, and with `backfill_s` the history read back. `connected()` is true from
        the subscription on, before the backfill and before the current values arrive."""
        self._received = 0
        self._durable = 0  # incremented by the pump's thread (one writer; int updates are atomic under the GIL)
        self._handoff: deque[Inbound] = deque()
        self._wake = asyncio.Event()
        self._lost = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._paused = False
        self._held = False  # publishing off for backpressure
        self._publishing = False  # the mode the server's subscription is in
        self._off_since: tuple[float, str] | None = None  # (monotonic time, why) publishing went off
        self._mode_lock = asyncio.Lock()
        self._client: Client | None = None
        self._sub: _Subscription | None = None
        self._nodes: dict[ua.NodeId, list[MappedNode]] = {}  # a server node may be declared in two spellings
        self._types: dict[ua.NodeId, NodeType] = {}  # command nodes' types and units, read once per connection
        self._namespaces: list[str] = []  # the server's namespace array, read at each connect
        self._ahead: set[ua.NodeId] = set()  # nodes whose device clock was reported ahead in this connection
        self._newest: dict[str, datetime] = {}  # node id -> newest durable source timestamp (for backfill)
        self._refused: dict[str, datetime] = {}  # node id -> newest ServerTimestamp of a durable refusal as ahead
        # items whose server queue may have discarded values
        self._watch = QueueWatch(spec.queue_size, timedelta(seconds=spec.backfill_s))
        self._recovering: asyncio.Task | None = None
        self._unsubscribed_since = gap_since  # when the last subscription (this process's or an earlier one's) ended
        self._after_restart = gap_since is not None

    # ------------------------------------------------------------------ lifecycle ----
    async def run(self) -> None:
        """Connect, subscribe and hand value changes over until `stop()`; every loss is followed by a reconnect."""
        feeder = asyncio.create_task(self._feed())
        delay = self.spec.backoff_initial_s
        try:
            while not self._stop.is_set():
                try:
                    await self._connect()
                    delay = self.spec.backoff_initial_s
                    await _first(self._lost.wait(), self._stop.wait())
                    if not self._stop.is_set():
                        self._error("connection lost; reconnecting with backoff")
                except LOSS as exc:
                    self._error(f"{self._problem(exc)}; retrying in {delay:.1f} s")
                except Exception as exc:  # noqa: BLE001 - e.g. a certificate asyncua cannot parse: said, and retried
                    self._error(f"{type(exc).__name__}: {exc}; retrying in {delay:.1f} s")
                    log.exception("event=opcua_connect_failed connector=%s/%s", self.spec.tenant, self.spec.name)
                if self._sub is not None and self._unsubscribed_since is None:
                    self._unsubscribed_since = datetime.now(UTC)
                await self._disconnect()
                if self._stop.is_set():
                    break
                self._set_state("backoff")
                await _first(asyncio.sleep(delay * random.uniform(0.8, 1.2)), self._stop.wait())
                delay = min(delay * 2, self.spec.backoff_max_s)
        finally:
            await self._disconnect()
            if self._recovering is not None:
                self._recovering.cancel()
            self._set_state("stopped")
            self._wake.set()
            await feeder

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def set_paused(self, paused: bool) -> None:
        """Paused: the server keeps new values in each item's queue (`queue_size`, oldest dropped beyond)."""
        self._paused = paused
        self._report_connected()
        await self._apply_publishing()

    def connected(self) -> bool:
        """Subscribed and receiving. A paused session keeps its subscription (publishing off) but receives nothing,
        so it is not connected, as a paused MQTT connector (disconnected from its broker) is not: it read connected
        while paused, and the two kinds' statuses and `raytwin_connector_connected` disagreed."""
        return self.state == "connected" and not self._paused

    @property
    def state(self) -> str:
        """starting, connecting, connected, backoff (waiting to reconnect) or stopped."""
        return self._state

    def _set_state(self, state: str) -> None:
        self._state = state
        self._report_connected()

    def _report_connected(self) -> None:
        metrics.CONNECTOR_CONNECTED.set(1.0 if self.connected() else 0.0,
                                        connector=f"{self.spec.tenant}/{self.spec.name}")

    @property
    def held(self) -> bool:
        """Publishing is switched off for backpressure (too many changes not yet durable)."""
        return self._held

    def outstanding(self) -> int:
        """Value changes received and not yet durable (handed to the pump, or waiting to be)."""
        return self._received - self._durable

    def _problem(self, exc: BaseException) -> str:
        creds = self.credentials
        return connect_problem(self.spec.endpoint, exc, bool(creds.username or creds.password))

    def _error(self, message: str) -> None:
        self.errors += 1
        self.last_error, self.last_error_at = message, datetime.now(UTC)
        log.warning("event=opcua_error tenant=%s connector=%s endpoint=%s error=%r", self.spec.tenant,
                    self.spec.name, self.spec.endpoint, message)

    # ----------------------------------------------------------------- connection ----
    async def _connect(self) -> None:
        spec = self.spec
        self._set_state("connecting")
        self._lost.clear()
        # asyncua probes the server every `watchdog_intervall` with that as the probe's timeout (default 1 s):
        # a server or host busy for a second would count as lost, and a reconnect loses the changes made
        # before the new subscription exists (seen under load in the `opcua` benchmark). A closed socket is
        # still noticed at once; a silent server within a request timeout, as any request.
        client = _Client(spec.endpoint, timeout=spec.request_timeout_s, watchdog_intervall=spec.request_timeout_s)
        client.reach = self.reach
        client.session_timeout = int(spec.session_timeout_s * 1000)
        creds = self.credentials.revealed()
        if creds["username"] is not None:
            client.set_user(creds["username"])
        if creds["password"] is not None:
            client.set_password(creds["password"])
        if spec.security:
            await client.set_security_string(spec.security)

        async def lost(exc: Exception) -> None:
            self._lost.set()

        client.connection_lost_callback = lost
        self._client, self._types, self._ahead = client, {}, set()
        await client.connect()
        self.last_error = self.last_error_at = None  # connected again: what went wrong before is over
        self._namespaces = await client.get_namespace_array()
        self._nodes = {}
        for n in spec.nodes:  # one node that cannot be resolved is reported, as one the server does not know
            try:
                self._nodes.setdefault(self._resolve(n.node_id), []).append(n)
            except LookupError as exc:
                self._error(str(exc))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=spec.publishing_interval_ms, RequestedLifetimeCount=10_000,
            RequestedMaxKeepAliveCount=client.get_keepalive_count(spec.publishing_interval_ms),
            MaxNotificationsPerPublish=spec.batch_size, PublishingEnabled=not (self._paused or self._held), Priority=0)
        self._publishing = params.PublishingEnabled
        self._off_since = None if self._publishing else (time.monotonic(), self._why_off())
        self._sub = await self._subscribe(client, params)
        unmonitored = await self._monitor(client)
        if len(unmonitored) == len(self._nodes):  # (the nodes whose namespace is gone are reported already)
            raise NothingMonitored(f"none of the {len(spec.nodes)} declared node(s) can be monitored on this server "
                                   f"({'; '.join(unmonitored[:3]) or 'no node id resolves'}): check the node ids "
                                   "against the server's address space")
        await asyncio.to_thread(self.on_connected)
        self._set_state("connected")
        await self._apply_publishing()  # in case pause or backpressure changed while the subscription was created
        if spec.backfill_s:
            await self._backfill()
        elif self._unsubscribed_since is not None:
            self._report_gap(self._unsubscribed_since)
        self._unsubscribed_since, self._after_restart = None, False
        for message in unmonitored:  # last: `last_error` names the node to fix, not the gap reported above
            self._error(message)
        self.connects += 1
        log.info("event=opcua_connected tenant=%s connector=%s endpoint=%s items=%d", spec.tenant, spec.name,
                 spec.endpoint, len(self._nodes))

    async def _monitor(self, client: Client) -> list[str]:
        """Create a monitored item per node (through asyncua's request, whose results carry each item's granted
        queue: a server may revise `queue_size` down, and counting a full queue by the size asked for missed every
        full queue); the nodes that cannot be monitored, said."""
        sub = self._sub
        sub.items = dict(enumerate(self._nodes, start=1))  # before the request: values may come before its answer
        if not sub.items:
            return []
        results = await client.uaclient.create_monitored_items(ua.CreateMonitoredItemsParameters(
            SubscriptionId=sub.subscription_id, TimestampsToReturn=ua.TimestampsToReturn.Both,
            ItemsToCreate=[self._monitored_item(nid, handle) for handle, nid in sub.items.items()]))
        unmonitored = []
        for (handle, nid), result in zip(list(sub.items.items()), results):
            if not result.StatusCode.is_good():
                del sub.items[handle]
                unmonitored.append(f"node {_named(self._nodes[nid])} cannot be monitored: "
                                   f"{unmonitorable(result.StatusCode.name)}")
                continue
            self._watch.grant(nid, result.RevisedQueueSize)
            if result.RevisedQueueSize < self.spec.queue_size:
                log.info("event=opcua_queue_revised tenant=%s connector=%s node=%s queue_size=%d granted=%d",
                         self.spec.tenant, self.spec.name, _named(self._nodes[nid]), self.spec.queue_size,
                         result.RevisedQueueSize)
        return unmonitored

    def _monitored_item(self, nid: ua.NodeId, handle: int) -> ua.MonitoredItemCreateRequest:
        """A monitored item reporting every new sample: the trigger StatusValueTimestamp makes a new source
        timestamp a change even when the value repeats (OPC UA's default, StatusValue, would drop a reading
        equal to the previous one, and the twin would miss an event)."""
        params = ua.MonitoringParameters(
            ClientHandle=handle, SamplingInterval=self.spec.sampling_interval_ms, QueueSize=self.spec.queue_size,
            DiscardOldest=True, Filter=ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp))
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(NodeId=nid, AttributeId=ua.AttributeIds.Value),
            MonitoringMode=ua.MonitoringMode.Reporting, RequestedParameters=params)

    async def _subscribe(self, client: Client, params: ua.CreateSubscriptionParameters) -> _Subscription:
        """`client.create_subscription`, with a `_Subscription` (asyncua takes no subscription class)."""
        sub = _Subscription(client, params, self)
        sub.set_overflow_disconnect_handler(client.uaclient.notify_transport_lost)
        results = await sub.init()
        if revised := client.get_subscription_revised_params(params, results):
            await sub.update(revised)
        client._subscriptions.append(sub)  # as create_subscription does: asyncua's stale-subscription watchdog
        return sub

    async def _backfill(self) -> None:
        """Read what each node's history holds after the newest change made durable here (after a restart of
        the connector: since `backfill_s` before the node's current value). Runs after subscribing, so
        history and subscription overlap instead of leaving a gap; the overlap is duplicates."""
        for nid, nodes in self._nodes.items():
            newest = [self._newest.get(n.node_id) for n in nodes]
            start = None if None in newest else min(newest) + AFTER_DURABLE
            refused = [self._refused.get(n.node_id) for n in nodes]
            if start is None:
                current = await self._connected_client().get_node(nid).read_data_value(raise_on_bad_status=False)
                if current.SourceTimestamp is None:
                    continue
                start = current.SourceTimestamp - timedelta(seconds=self.spec.backfill_s)
            try:
                await self._read_history(nid, Suspect(start, None), None if None in refused else min(refused))
            except ua.UaStatusCodeError as exc:  # e.g. BadHistoryOperationUnsupported: not historized
                self._error(f"node {_named(nodes)}: no history to backfill from ({type(exc).__name__})")
        self._recover_soon()  # what queues discarded before a loss is read after the reconnect

    async def _read_history(self, nid: ua.NodeId, read: Suspect,
                            refused: datetime | None = None) -> frozenset[datetime]:
        """Hand over `nid`'s history from `read.since` (None: `backfill_s` before now), leaving out values the
        server received before `read.after` (already received, or their successors were) and, with `refused`,
        values refused as from a clock ahead that it received by then (their refusals are durable); returns what
        of `read.expect` the history did not hold."""
        start = read.since or datetime.now(UTC) - timedelta(seconds=self.spec.backfill_s)
        history = await self._connected_client().get_node(nid).read_raw_history(start, None, return_bounds=False)
        kept = [dv for dv in history
                if (read.after is None or dv.ServerTimestamp is None or dv.ServerTimestamp >= read.after)
                and not _refused_by(dv, refused)]
        for dv in kept:
            self._on_value(nid, dv)
        log.info("event=opcua_backfill tenant=%s connector=%s node=%s since=%s changes=%d", self.spec.tenant,
                 self.spec.name, _named(self._nodes[nid]), start.isoformat(), len(kept))
        stored = [dv.SourceTimestamp for dv in history if dv.SourceTimestamp is not None]
        return frozenset(t for t in read.expect if not any(abs(h - t) <= STAMP_PRECISION for h in stored))

    def _published(self, values: list[tuple[ua.NodeId, ua.DataValue]]) -> None:
        """A publish response's data changes, in order: items whose queue was full are read back, every value is
        handed out."""
        by_node: dict[ua.NodeId, list[ua.DataValue]] = {}
        for nid, dv in values:
            by_node.setdefault(nid, []).append(dv)
        if self._watch.published(by_node):
            self._recover_soon()
        for nid, dv in values:
            self._on_value(nid, dv)

    def _recover_soon(self) -> None:
        """With `backfill_s`, read the suspect items' history, one read at a time (marks made meanwhile join the
        next round, so a queue that stays full costs one HistoryRead per item and round trip, not per publish)."""
        if self.spec.backfill_s and (self._recovering is None or self._recovering.done()):
            self._recovering = self._loop.create_task(self._recover())

    async def _recover(self) -> None:
        while self._client is not None and (suspects := self._watch.take()):
            for nid, read in suspects.items():
                if nid not in self._nodes:
                    continue
                try:
                    if missing := await self._read_history(nid, read):  # a historian may store it a bit later
                        await asyncio.sleep(HISTORY_LAG_S)
                        if missing := await self._read_history(nid, replace(read, expect=missing)):
                            self._unrecovered(nid, read, f"its history does not hold the value stamped "
                                              f"{min(missing).isoformat()} that the server sent after them "
                                              "(not historized, or before backfill_s)")
                except ua.UaStatusCodeError as exc:
                    self._unrecovered(nid, read, f"its history cannot be read ({type(exc).__name__}: {exc})")
                except LOSS:  # read again after the reconnect (`_backfill` calls here)
                    for left, again in suspects.items():
                        self._watch.mark(left, again)
                    return

    def _unrecovered(self, nid: ua.NodeId, read: Suspect, why: str) -> None:
        """What a full queue may have discarded cannot be read back: said, naming the node and the gap."""
        since = "backfill_s before now" if read.since is None else read.since.isoformat()
        received = "" if read.after is None else f", received by the server after {read.after.isoformat()}"
        queue = self._watch.described(self._watch.size(nid))
        self._error(f"node {_named(self._nodes[nid])}: its server queue ({queue}) was full, so value changes stamped "
                    f"after {since}{received} may have been discarded, and {why}; "
                    "raise queue_size (above the changes per publishing interval) or historize the node")

    def _report_gap(self, since: datetime) -> None:
        """Without `backfill_s`, changes made while no subscription existed are gone to this connector."""
        now = datetime.now(UTC)
        log.warning("event=opcua_gap tenant=%s connector=%s endpoint=%s since=%s until=%s restart=%s", self.spec.tenant,
                    self.spec.name, self.spec.endpoint, since.isoformat(), now.isoformat(), self._after_restart)
        seconds, at = (now - since).total_seconds(), since.isoformat(timespec="seconds")
        gap = (f"after a restart of this connector's process (the one before was last seen {seconds:.1f} s before, "
               f"at {at})" if self._after_restart else f"after {seconds:.1f} s without a subscription (since {at})")
        self._error(f"subscribed again {gap}: value changes made in that time were not read, only each node's "
                    f"latest value; set backfill_s to read them from the server's history")

    def _resolve(self, node_id: str) -> ua.NodeId:
        """A configured node id; one with a namespace URI (`nsu=`) gets this server's index for that URI (the
        namespace array read at connect). `LookupError` naming the node and the server's namespaces if it has
        no such URI (e.g. a PLC project renamed)."""
        nid = ua.NodeId.from_string(node_id)
        uri = getattr(nid, "NamespaceUri", None)
        if not uri:
            return nid
        if uri not in self._namespaces:
            raise LookupError(f"node {node_id}: the server has no namespace {uri!r} (its namespaces: "
                              f"{', '.join(self._namespaces)}); correct the node id's nsu= or the server's "
                              "namespace URI")
        return ua.NodeId(nid.Identifier, self._namespaces.index(uri), nid.NodeIdType)

    def _connected_client(self) -> Client:
        """This connection's client; `ConnectionError` once it is gone (stopped or lost while a backfill reads)."""
        if (client := self._client) is None:
            raise ConnectionError("disconnected")
        return client

    async def _disconnect(self) -> None:
        client, self._client, self._sub = self._client, None, None
        if client is None:
            return
        try:
            await asyncio.wait_for(client.disconnect(), self.spec.request_timeout_s)
        except Exception:  # noqa: BLE001 - the server is gone already: only the socket is left to close
            client.disconnect_socket()

    # ---------------------------------------------------------------- the stream ----
    def _on_value(self, nodeid: ua.NodeId, dv: ua.DataValue) -> None:
        nodes = self._nodes.get(nodeid, [])
        overflowed = dv.StatusCode is not None and dv.StatusCode.value & OVERFLOW == OVERFLOW
        if nodes and overflowed and not self.spec.backfill_s:
            self._error(f"node {_named(nodes)}: the server's queue for it overflowed (more than "
                        f"{self._watch.described(self._watch.size(nodeid))} changes while publishing was off): older "
                        "changes were discarded; "
                        "raise queue_size or set backfill_s to read them from the server's history")
        ahead = clock_ahead(dv)
        if nodes and nodeid not in self._ahead and ahead:  # once per node and connection
            self._ahead.add(nodeid)
            self._error(f"node {_named(nodes)}: {ahead}; its readings are dead-lettered until then")
        for node in nodes:  # every mapping of the node is fed (two spellings may map it to two assets)
            out = to_row(self.spec.name, node, dv)
            if out is None:  # a status without a value: nothing to deliver
                continue
            rows, dead = ([], [out]) if isinstance(out, DeadLetter) else ([out], [])
            self._received += 1
            ack = functools.partial(self._on_durable, node.node_id, dv.SourceTimestamp,
                                    dv.ServerTimestamp if ahead else None)
            self._handoff.append(Inbound(source(self.spec.name, node), rows, dead, ack))
        self._wake.set()
        # The pump's thread may acknowledge between this comparison and the hold, reading no hold and releasing
        # nothing; the change just received reaches the pump only after this returns (the feeder runs on this
        # thread), so its acknowledgement, after the hold, releases it.
        if self.outstanding() >= self.spec.max_outstanding and not self._held:
            self._held = True
            self.backpressure_pauses += 1
            log.info("event=opcua_backpressure tenant=%s connector=%s outstanding=%d", self.spec.tenant,
                     self.spec.name, self.outstanding())
            self._switch_soon()

    def _on_durable(self, node_id: str, at: datetime | None, refused: datetime | None) -> None:
        """The pump's acknowledgement (its thread): this change is durable (applied, duplicate or dead letter);
        `refused`: the ServerTimestamp of a change refused as from a clock ahead (`_backfill` leaves such out)."""
        self._durable += 1
        if at is not None:  # a time ahead of our clock was dead-lettered: it must not move the backfill start
            at = min(at, datetime.now(UTC))
            if node_id not in self._newest or at > self._newest[node_id]:
                self._newest[node_id] = at
        if refused is not None and (node_id not in self._refused or refused > self._refused[node_id]):
            self._refused[node_id] = refused
        if self._held and self.outstanding() <= self.spec.max_outstanding // 2:
            self._loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        if self._held and self.outstanding() <= self.spec.max_outstanding // 2:
            self._held = False
            self._switch_soon()

    def _switch_soon(self) -> None:
        """`_apply_publishing` in the background (asyncua's publish loop and the pump's acknowledgements must not
        wait for it), its outcome retrieved by `_switched`."""
        self._loop.create_task(self._apply_publishing()).add_done_callback(self._switched)

    def _switched(self, task: asyncio.Task) -> None:
        """A background switch that failed (in the history read after switching on: a failed SetPublishingMode is
        handled in `_apply_publishing`) reconnects, and the reconnect backfills again. A read cut short by `stop()`
        is no error. Either way nothing is left for asyncio to log as "Task exception was never retrieved"."""
        if task.cancelled() or (exc := task.exception()) is None:
            return
        if isinstance(exc, LOSS) and self._stop.is_set():
            return
        self._error(f"switching publishing failed ({type(exc).__name__}: {exc}); reconnecting")
        if not isinstance(exc, LOSS):
            log.error("event=opcua_switch_failed connector=%s/%s", self.spec.tenant, self.spec.name, exc_info=exc)
        self._lost.set()

    async def _apply_publishing(self) -> None:
        """Bring the server's publishing mode to the wanted one. Requests go one at a time and each re-reads
        what is wanted, so quick off/on/off flips cannot overtake each other and leave the wrong mode."""
        async with self._mode_lock:
            want = not (self._paused or self._held)
            sub = self._sub
            if sub is None or want == self._publishing:
                return  # (no subscription: the next one is created in the wanted mode)
            try:
                await sub.set_publishing_mode(want)
                self._publishing = want
                off, self._off_since = self._off_since, None if want else (time.monotonic(), self._why_off())
            except LOSS as exc:
                self._error(f"could not switch publishing {'on' if want else 'off'}: {exc}")
                self._lost.set()
                return
        if want and self.spec.backfill_s:  # what each item's queue discarded meanwhile (beyond `queue_size`)
            await self._backfill()
        elif want and off is not None:
            self._check_queues(time.monotonic() - off[0], off[1])

    def _why_off(self) -> str:
        return "paused" if self._paused else "backpressure"

    def _check_queues(self, off_s: float, why: str) -> None:
        """Without `backfill_s`, what an item's queue discarded while publishing was off is lost. A server should
        flag the first value after such a discard (Overflow, checked in `_on_value`), but some never do (asyncua's
        server): so a time off longer than the smallest granted queue's sampling intervals, in which a node
        sampled at that rate could have changed more often than its queue holds, is reported whatever the server
        says."""
        size = self._watch.smallest()
        covered_s = size * self.spec.sampling_interval_ms / 1000
        if off_s <= covered_s:
            return
        rate = (f"sampling_interval_ms {self.spec.sampling_interval_ms:g} covers {covered_s:g} s" if covered_s else
                "sampling_interval_ms 0, the server's fastest, bounds no time")
        self._error(f"publishing was off for {off_s:.1f} s ({why}), longer than {self._watch.described(size)} "
                    f"at {rate}: a node that changed more than {size} times meanwhile lost its oldest "
                    "changes, and the server may not say so (asyncua's never flags an overflow); set backfill_s to "
                    "read them back from the server's history, or raise queue_size")

    async def _feed(self) -> None:
        """Hand value changes to the pump in arrival order; `put` may block (a full pump), so in a thread."""
        while True:
            if not self._handoff:
                if self._stop.is_set():
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(self._handoff)
            self._handoff.clear()
            await asyncio.to_thread(self._put_all, batch)

    def _put_all(self, batch: list[Inbound]) -> None:
        for message in batch:
            self.put(message)

    # ------------------------------------------------------------------ commands ----
    async def write_command(self, target: CommandNode, correlation_id: str, value: float | bool,
                            within_s: float) -> str:
        """Write `value` (in the target's unit), in the node's own data type, then the correlation id, within
        `within_s`; the server's status for both is the acknowledgement. The id is written only once the value was
        accepted, so a controller never sees a new command id beside a set point that did not change. Raises
        `ValueError` (nothing written: the node's type cannot hold the value, or it declares another unit than the
        target's), `Refused` (a bad status), `OutcomeUnknown` once a write was requested and its answer did not come
        (a timeout, the connection lost: the server may have written it; before, "not sent", which invited a second
        send), or a connection error (nothing requested)."""
        requested: list[str] = []
        try:
            return await asyncio.wait_for(self._write_command(target, correlation_id, value, requested), within_s)
        except Refused:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever ended the wait, only what was requested decides
            if not requested:
                raise
            raise OutcomeUnknown(f"server {self.spec.endpoint} did not answer the write of {requested[-1]} "
                                 f"({type(exc).__name__}: {str(exc) or f'no answer within {within_s:g} s'}): it may "
                                 "have written it") from exc

    async def _write_command(self, target: CommandNode, correlation_id: str, value: float | bool,
                             requested: list[str]) -> str:
        """`write_command`'s writes, each node named in `requested` before its request goes out."""
        client = self._client
        if client is None or self.state != "connected":
            raise ConnectionError(f"not connected to {self.spec.endpoint} ({self.state})")
        try:
            node, id_node = self._resolve(target.node_id), self._resolve(target.correlation_node_id)
        except LookupError as exc:
            raise ValueError(str(exc)) from None
        if (known := self._types.get(node)) is None:
            known = self._types[node] = await node_type(client, node)
        if problem := unit_problem(target.node_id, target.unit, known.unit):
            raise ValueError(problem)
        variant = command_variant(target.node_id, value, known)
        stamp = datetime.now(UTC)
        written = []
        for nid, text, v in ((node, target.node_id, variant),
                             (id_node, target.correlation_node_id, ua.Variant(correlation_id, ua.VariantType.String))):
            requested.append(text)
            code = (await client.uaclient.write_attributes([nid], [ua.DataValue(v, SourceTimestamp=stamp)],
                                                           ua.AttributeIds.Value))[0]
            written.append(f"{text}: {code.name}")
            if not code.is_good():
                detail = ", ".join(written + ([f"{target.correlation_node_id}: not written"] if nid == node else []))
                raise Refused(f"server {self.spec.endpoint} answered the write with {detail}")
        return ", ".join(written)


def _refused_by(dv: ua.DataValue, refused: datetime | None) -> bool:
    """Whether `dv` is a reading refused as from a clock ahead that the server received by `refused`, a node's newest
    such refusal made durable: the server receives a node's values in order, so it was handed over before, or it is
    one a full queue discarded, which that queue's recovery reads back (`connectors.opcua.recovery`)."""
    return refused is not None and clock_ahead(dv) is not None and dv.ServerTimestamp <= refused


def _named(nodes: list[MappedNode]) -> str:
    """A server node as declared (all its spellings, when it was declared more than once)."""
    return " = ".join(n.node_id for n in nodes)


async def _first(*aws: Any) -> None:
    """Wait until the first of `aws` completes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
