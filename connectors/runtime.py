"""The connector actor: one restartable Ray actor per declared connector.

It rebuilds itself from the store every time it starts (declaration, credentials, running or
paused), so Ray restarting it after a crash (`max_restarts=-1`) is the recovery: the source
re-delivers what was not acknowledged and the twins de-duplicate. Commands are approved and
sent through this actor, one call at a time, which is what makes "never sent twice" hold
without a distributed lock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field

from actors.ingest import ShardRouter
from connectors.commands import Command, CommandLedger, CommandStatus, OutcomeUnknown, Refused, Unconfirmed
from connectors.kinds import kind_of, parse_spec
from connectors.mapping import DeadLetter
from connectors.pump import Pump
from connectors.reach import Reach
from connectors.seen_letters import SeenLetters
from connectors.sink import Inbound, TwinSink
from connectors.spec import ConnectorStore, Desired
from connectors.tenant_files import TenantFiles
from raytwin import metrics
from raytwin.logs import component_logging

log = logging.getLogger("raytwin.connectors")
DOWN_TICK_S = 1.0
ALIVE_EVERY_S = 10.0
"""How often a running connector records that it is alive: a restarted one's gap starts within this of the time."""
LATE_ACK_KEPT = timedelta(days=1)
"""How long after it expired a command's late answer is still matched and recorded on it: the connector keeps
each such command in memory meanwhile, so not for good."""
SEEN_MARGIN_S = 3600.0
"""How much earlier than its backfill's reach a restarted connector looks for its dead letters: a value's dead letter
is written when it arrives, which a controller clock ahead of the service's puts before its source timestamp."""
ALIVE_JOIN_S = 30.0
ANSWER_WRITE_TRIES = 300
"""How often an asset's answer is written to its command's record (once when it arrives, then once a tick: about
5 minutes) before it is given up: dead-lettered with the answer (the source's message acknowledged once that is
written) and said in `last_error`. Tried for good, one record that cannot be written (a deleted or unreadable one, a
store refusing it) held its message unacknowledged forever, and every pause waited out its drain for it."""
STATUS_GROUP = "status"
"""The actor's concurrency group of `status` alone (one thread): every other call runs one at a time, in the default
group, which is what keeps a command from being sent twice."""
MARKERS = 1
"""Which index markers this version's connector process writes beside what it stores: 1, a command's in the ledger's
index (`connectors.commands.CommandLedger`) and its dead letters' sources (`raytwin.statestore`). Once a tenant's
index is marked complete, what a process of an older version writes there (one with none: no `markers` method) no
index read finds, so `Connectors.start_declared` restarts an actor whose `markers` differ. Raise it with a new index."""


@dataclass
class _Answer:
    """An asset's answer received and not yet in the ledger, with how to acknowledge each copy of it at the source
    once it is (MQTT: its message's PUBACK)."""

    command_id: str
    asset_id: str
    ack: dict[str, Any]
    ok: bool
    done: list[Callable[[], None]]
    deadline: datetime | None
    """Its command's expiry (None: it expired), put back if the answer is given up (`ANSWER_WRITE_TRIES`): the command
    then settles as unanswered."""
    tries: int = 0

    def acknowledge(self) -> None:
        """Acknowledge every copy of the answer at its source."""
        for done in self.done:
            done()


class ConnectorState(StrEnum):
    """What a connector does: its declared state (running, paused) while its process runs, else `down`
    (or `unanswered`, in a listing, while its process does not answer)."""

    running = "running"
    paused = "paused"
    down = "down"
    """Declared, and no process of it runs: the service's host policy refuses its host, or a rule added since it
    was declared refuses it (an MQTT `ack_topic` or route matching a command topic), or it cannot start (its
    files gone), or the service lost its store to another and starts no connector (`Connectors.hold`);
    `last_error` says why. Declared again (or the policy changed and the service restarted), it runs."""
    unanswered = "unanswered"
    """Its process left a listing's status call unanswered within `connectors.manager.ANSWER_S` (30 s): it is
    stopped, hung, unreachable or restarting; `last_error` says which, and the other figures are the last it
    answered (none: zeros). A listing asks every connector at once, so one such connector delays it by that
    deadline at most and fails no other's status."""


class ConnectorStatus(BaseModel):
    """What an operator needs to see: is it connected, is it keeping up, what went wrong."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str
    name: str
    kind: str
    state: ConnectorState
    connected: bool
    messages: int
    acknowledged: int
    pending: int
    accepted: int
    duplicates: int
    rejected: int
    dead_lettered: int
    errors: int
    last_error: str | None = Field(description="the latest error, until the connector connects or delivers again "
                                   "(`errors` keeps counting)")
    last_error_at: datetime | None = Field(None, description="when `last_error` happened (the server's clock, UTC)")
    lag_s: float | None = Field(description="seconds the oldest message received and not yet durable has waited "
                                "since the connector received it (0: none waits; None: no process runs): how far "
                                "behind its source the connector is, whatever times the events carry")
    newest_event_time: datetime | None
    event_age_s: float | None = Field(None, description="seconds from the newest applied event's own time "
                                      "(`newest_event_time`) to now: how fresh the twins' data is; large for replayed "
                                      "or backfilled history however promptly it is taken, so no measure of lag")
    draining: bool = Field(False, description="a pause is waiting (MQTT: at most `connectors.mqtt.PAUSE_DRAIN_S`) for "
                           "what the connector handed over to be acknowledged before it disconnects; `pending` counts "
                           "it down")


ACTOR_PREFIX = "raytwin-connector:"
ACTOR_SEPARATOR = "@"
"""What joins a connector's tenant and name in its actor's name: no identifier character, so the pair is read back
unambiguously (the `:` used before, an identifier character, made tenant `a`'s connector `b:c` and tenant `a:b`'s `c`
one actor: each tenant's creates, reads, pauses and deletes reached the other's connector)."""


def actor_name(tenant: str, name: str) -> str:
    """The Ray actor name of the tenant's connector `name`: one per (tenant, name), whatever their characters."""
    return f"{ACTOR_PREFIX}{tenant}{ACTOR_SEPARATOR}{name}"


def legacy_actor_name(actor: str) -> bool:
    """Whether `actor` is a connector actor named as before `ACTOR_SEPARATOR` (``raytwin-connector:<tenant>:<name>``),
    which cannot be told apart by tenant: a service started where such actors run stops them
    (`connectors.manager.stop_connector_actors`) and starts its connectors under their names now."""
    return actor.startswith(ACTOR_PREFIX) and ACTOR_SEPARATOR not in actor[len(ACTOR_PREFIX):]


class ConnectorRuntime:
    """The actor's body (a plain class, so it can also run in-process)."""

    def __init__(self, store_url: str, router: ShardRouter, tenant: str, name: str,
                 storage_options: dict[str, Any] | None = None, reach: Reach | None = None,
                 files: TenantFiles | None = None):
        """`reach`: the hosts a tenant's connector may connect to, checked at every connection attempt (None: any,
        the operator's); `files`: where a tenant's connector finds the files it names (None: they are paths);
        arguments, so a restart of the actor by Ray keeps them."""
        component_logging()
        # first: a start that fails below (a TLS file no longer its tenant's) left an old tenant's connector pages
        # reading every day of its dead letters, every day (those written before markers: read once for their sources)
        router.store().mark_dead_letter_sources(tenant)
        self._reach, self._files = reach, files
        store = ConnectorStore(store_url, storage_options)
        self.store, self.tenant, self.name = store, tenant, name
        self.spec = parse_spec(store.spec_json(tenant, name), stored=True)
        if files is not None:  # (ValueError: names that are no longer its tenant's files; it does not start)
            self.spec = files.opened(TenantFiles.named(self.spec))
        self.ledger = CommandLedger(store_url, storage_options)
        self._commands = threading.Lock()  # answers (receive thread), the tick and approvals' ledger writes take turns
        self._sending: set[str] = set()  # correlation ids claimed and being sent: their answers wait (`approve`)
        self.ledger.recover(tenant, name, LATE_ACK_KEPT, answered_by_send=kind_of(self.spec.kind).answered_by_send)
        mine = self.ledger.unsettled(tenant, name)
        now = datetime.now(UTC)
        self._deadlines = {c.correlation_id: self._deadline(c) for c in mine if c.status is CommandStatus.sent}
        self._late = {c.correlation_id: c.history[-1].at + LATE_ACK_KEPT for c in mine  # expired, for a late answer
                      if c.status is CommandStatus.expired and c.ack is None and c.history[-1].at + LATE_ACK_KEPT > now}
        self._awaiting = {c.correlation_id: (c.id, c.asset_id) for c in mine
                          if c.correlation_id in self._deadlines or c.correlation_id in self._late}
        self._answers: dict[str, _Answer] = {}  # by correlation id: received, their ledger write still to land
        self._unrecorded: dict[str, tuple[Command, str | None, str | None]] = {}  # sends whose outcome to write again
        self._ledger_error: tuple[str, datetime] | None = None  # an answer's or outcome's failed write, until one lands
        self._ledger_errors = 0
        self._given_up: list[Inbound] = []  # answers given up (`_give_up`), put in the pump outside `_commands`
        self._answers_lost: dict[str, str] = {}  # by correlation id: where a given-up answer went, said as it expires
        self._connected_once = store.had_connected(tenant, name)  # this declaration's source has a session of it
        # an earlier process that had connected ran until then (one that never had left no session to lose)
        predecessor_seen = store.last_alive(tenant, name) if self._connected_once else None
        sink = TwinSink(router, tenant, batch_size=self.spec.batch_size,
                        seen=self._seen_letters(router, predecessor_seen))
        self.pump = Pump(sink, f"{tenant}/{name}", batch_size=self.spec.batch_size, linger_s=self.spec.linger_s)
        store.mark_alive(tenant, name, datetime.now(UTC), self._connected_once)
        self.adapter = kind_of(self.spec.kind).adapter(self.spec, store.credentials(tenant, name), self.pump.put,
                                                       self._on_ack, predecessor_seen=predecessor_seen,
                                                       on_connected=self._on_connected, reach=reach)
        self.desired = store.desired(tenant, name)
        self._draining = False  # a pause is waiting for its adapter (`status` is answered meanwhile)
        metrics.CONNECTOR_CONNECTED.set(0.0, connector=self.pump.name)  # a series from the start
        metrics.zero_connector(self.pump.name)
        if self.desired is Desired.running:
            self.adapter.start()
        self._stopped = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name=f"down-{tenant}/{name}", daemon=True)
        self._ticker.start()
        log.info("event=connector_started tenant=%s connector=%s kind=%s state=%s", tenant, name, self.spec.kind,
                 self.desired.value)

    def _seen_letters(self, router: ShardRouter, predecessor_seen: datetime | None) -> SeenLetters:
        """After a restart of a connector that reads its source's history again (`backfill_s`), the dead letters
        it wrote within that history's reach, so they are not written again (`connectors.seen_letters`)."""
        backfill_s = getattr(self.spec, "backfill_s", 0)
        if predecessor_seen is None or not backfill_s:
            return SeenLetters()
        since = datetime.now(UTC) - timedelta(seconds=backfill_s + SEEN_MARGIN_S)
        return SeenLetters.recent(router.store(), self.tenant, self.name, since)

    def reach(self) -> Reach | None:
        """The policy this process enforces (`Connectors.start_declared` restarts one started under another)."""
        return self._reach

    def files(self) -> TenantFiles | None:
        """Where this process opens the files its declaration names (`Connectors.start_declared` compares)."""
        return self._files

    def markers(self) -> int:
        """The index markers this process writes (`MARKERS`; `Connectors.start_declared` compares)."""
        return MARKERS

    def pause(self) -> ConnectorStatus:
        """Stop receiving (the source keeps what arrives meanwhile: a persistent session, a subscription)."""
        self.store.set_desired(self.tenant, self.name, Desired.paused)
        self.desired = Desired.paused
        self._draining = True
        try:
            self.adapter.pause()
        finally:
            self._draining = False
        return self.status()

    def resume(self) -> ConnectorStatus:
        self.store.set_desired(self.tenant, self.name, Desired.running)
        self.desired = Desired.running
        self.adapter.resume()
        return self.status()

    def _tick(self) -> None:
        """Count the seconds this connector should receive and does not (the `RayTwinConnectorDown` alert):
        a counter, so the series a stopped process leaves in Ray's export for a while stops growing. Every
        `ALIVE_EVERY_S`, record that this process is alive: where the next one's gap starts if it dies."""
        last = alive = time.monotonic()
        while not self._stopped.wait(DOWN_TICK_S):
            now = time.monotonic()
            if self.desired is Desired.running and not self.adapter.connected():
                metrics.CONNECTOR_DOWN.inc(now - last, connector=self.pump.name)
            last = now
            metrics.CONNECTOR_LAG.set(self.pump.lag_s(), connector=self.pump.name)
            self._record_outcomes()
            self._record_answers()
            self._expire_overdue()
            if now - alive >= ALIVE_EVERY_S:
                alive = now
                try:
                    self.store.mark_alive(self.tenant, self.name, datetime.now(UTC), self._connected_once)
                except Exception as exc:  # noqa: BLE001 - a store hiccup only blurs a later gap's start
                    log.warning("event=connector_alive_failed tenant=%s connector=%s error=%r", self.tenant,
                                self.name, exc)

    def _on_connected(self) -> None:
        """The source has a session (a subscription) of this declaration now: recorded before the adapter reports
        connected, so that the next process, even if this one dies at once, knows there is one to find lost."""
        if self._connected_once:
            return
        try:
            self.store.mark_alive(self.tenant, self.name, datetime.now(UTC), True)
        except Exception as exc:  # noqa: BLE001 - tried again at the next connection; never ends the source's thread
            log.warning("event=connector_alive_failed tenant=%s connector=%s error=%r", self.tenant, self.name, exc)
            return
        self._connected_once = True

    def _deadline(self, command: Command) -> datetime:
        """When a sent command expires (one sent by an earlier version has no deadline: its sent time + the timeout)."""
        return command.ack_deadline or command.history[-1].at + timedelta(seconds=self.spec.ack_timeout_s)

    def _expire_overdue(self) -> None:
        """Sent commands past their deadline without an acknowledgement become `expired`; a late answer is still
        matched (and recorded on the expired command) for `LATE_ACK_KEPT`, then forgotten (logged unmatched)."""
        now = datetime.now(UTC)
        with self._commands:
            for correlation_id, deadline in [(c, d) for c, d in self._deadlines.items() if d <= now]:
                try:
                    self.ledger.expire(self.tenant, self._awaiting[correlation_id][0], deadline,
                                       self._answers_lost.get(correlation_id))
                except Exception as exc:  # noqa: BLE001 - a store hiccup: tried again at the next tick
                    log.warning("event=command_expire_failed tenant=%s connector=%s error=%r", self.tenant, self.name,
                                exc)
                    continue
                del self._deadlines[correlation_id]
                self._answers_lost.pop(correlation_id, None)
                self._late[correlation_id] = now + LATE_ACK_KEPT
            for correlation_id in [c for c, until in self._late.items() if until <= now]:
                del self._late[correlation_id]
                self._awaiting.pop(correlation_id, None)

    @ray.method(concurrency_group=STATUS_GROUP)
    def status(self) -> ConnectorStatus:
        """Answered while another call runs (`STATUS_GROUP`): a pause waits up to seconds for its acknowledgements,
        and a status queued behind it told nothing of it until it was over (`draining`)."""
        s = self.pump.stats
        return ConnectorStatus(
            tenant=self.tenant, name=self.name, kind=self.spec.kind, state=self.desired,
            connected=self.adapter.connected(), messages=s.messages, acknowledged=s.acknowledged,
            pending=self.pump.pending(), accepted=s.accepted, duplicates=s.duplicates, rejected=s.rejected,
            dead_lettered=s.dead_lettered, errors=s.delivery_errors + self.adapter.errors + self._ledger_errors,
            **self._last_error(), lag_s=self.pump.lag_s(), newest_event_time=s.newest_event_time,
            event_age_s=s.event_age_s(), draining=self._draining)

    def _last_error(self) -> dict[str, Any]:
        """The newest of the source's, the delivery's and the ledger's (answers, `_record`; send outcomes,
        `_record_outcome`) current errors. One read while its
        thread (the client's, the pump's) had set its message and not yet its time is left out: `status` runs beside
        them and beside the actor's other calls (`STATUS_GROUP`), and such a message, with the other's error, compared
        None with a time (a `TypeError` that failed the status)."""
        ledger_error, ledger_error_at = self._ledger_error or (None, None)
        current = [(at, message) for message, at in ((self.adapter.last_error, self.adapter.last_error_at),
                                                     (self.pump.stats.last_error, self.pump.stats.last_error_at),
                                                     (ledger_error, ledger_error_at))
                   if message is not None and at is not None]
        at, message = max(current, default=(None, None))
        return {"last_error": message, "last_error_at": at}

    @ray.method(max_task_retries=0)  # a retry on a restarted actor would find the command no longer proposed
    def approve(self, tenant: str, command_id: str, by: str) -> Command:
        """Approve a proposed command of this connector's tenant and send it: the approval (the one decision) and the
        claim are persisted before anything is sent, and a claimed command is never sent again. One the source
        did not confirm in time (`Unconfirmed`) is recorded as sent, with the reason: it may still arrive, and
        the asset's answer is recorded when it does. The send (MQTT: up to `broker.confirm_s` for the broker's
        confirmation) runs outside the command lock: held, it stopped the client's network thread at the first answer
        to arrive meanwhile (`_on_ack`), which then could not read the very confirmation awaited. Such an answer is
        kept and recorded once the send's outcome is (`_sent`)."""
        if tenant != self.tenant:
            raise PermissionError(f"connector {self.name!r} serves tenant {self.tenant!r}, not {tenant!r}")
        with self._commands:
            self.ledger.approve(tenant, command_id, by)
            command = self.ledger.claim(tenant, command_id, self.name)
            self._awaiting[command.correlation_id] = (command.id, command.asset_id)
            self._sending.add(command.correlation_id)
        detail = failure = None
        try:
            self.adapter.send(command)
        except Unconfirmed as exc:
            detail = f"unconfirmed: {str(exc)[:300]}"
        except Refused as exc:  # it reached the source, whose answer is final
            failure = f"sent and refused: {str(exc)[:300]}"
        except OutcomeUnknown as exc:  # it may have reached the source: never "not sent"
            failure = f"outcome unknown: {str(exc)[:300]}; not re-sent: check the asset"
        except Exception as exc:  # noqa: BLE001 - recorded on the command, which is then final
            failure = f"not sent: {type(exc).__name__}: {str(exc)[:300]}"
        with self._commands:
            self._unrecorded[command.correlation_id] = (command, detail, failure)
            return self._record_outcome(command.correlation_id)

    def _record_outcome(self, correlation_id: str) -> Command:
        """Write a send's outcome (`_sent`, under `_commands`), kept in `_unrecorded` until the ledger takes it: a
        failed write (a store outage) left the command *sending* in the ledger and awaited in memory without a
        deadline, unseen, until a restart failed it as "outcome unknown". Now each failure is a delivery error
        (`errors`, `last_error`, the `delivery_errors` metric), raised (the approval's own try answers its approver
        with it), and the outcome is written again every tick (`_record_outcomes`; its answers wait meanwhile, as
        during the send). A crash before it lands still fails the command as "outcome unknown"."""
        command, detail, failure = self._unrecorded[correlation_id]
        try:
            recorded = self._sent(command, detail, failure)
        except Exception as exc:
            log.warning("event=command_outcome_write_failed tenant=%s connector=%s command=%s error=%r", self.tenant,
                        self.name, command.id, exc)
            self._ledger_failed(f"command {command.id}'s send outcome ({'sent' if failure is None else 'failed'}) "
                                "could not be recorded on it (tried again every second; it reads sending until "
                                f"then): {type(exc).__name__}: {str(exc)[:300]}")
            raise
        del self._unrecorded[correlation_id]
        self._sending.discard(correlation_id)
        return recorded

    def _record_outcomes(self) -> None:
        """Write again the send outcomes whose ledger write failed (`_record_outcome`)."""
        with self._commands:
            for correlation_id in list(self._unrecorded):
                with suppress(Exception):  # counted and said by `_record_outcome`; tried again at the next tick
                    self._record_outcome(correlation_id)

    def _sent(self, command: Command, detail: str | None, failure: str | None) -> Command:
        """Record a send's outcome (under `_commands`): failed (`failure`), or sent, awaiting its answer until its
        deadline; then an answer that arrived during the send (recorded on a failed command, it changes nothing)."""
        correlation_id = command.correlation_id
        if failure is None:
            recorded = self.ledger.sent(command, self.spec.ack_timeout_s, detail)
        else:
            recorded = self.ledger.failed(command, failure)
        self._ledger_error = None  # the ledger takes writes again: a failure before is over
        if (answer := self._answers.get(correlation_id)) is not None:
            answer.deadline = recorded.ack_deadline
            self._record(correlation_id)
        elif failure is None:
            self._deadlines[correlation_id] = recorded.ack_deadline
        else:
            del self._awaiting[correlation_id]
        return recorded

    def _on_ack(self, correlation_id: str, ack: dict[str, Any], from_asset: str | None,
                done: Callable[[], None]) -> None:
        """Record an asset's answer on its command, then call `done` (MQTT: acknowledge the answer's message). The
        answer stays in memory until the ledger has it: removed first, a failed write (a store outage) left it only
        in a dead letter and its command expired as unanswered; now it is written again every tick
        (`_record_answers`), its command does not expire meanwhile, and a crash before it landed leaves its message
        unacknowledged, so the broker sends it again to the restarted connector."""
        with self._commands:
            command_id, asset_id = self._awaiting.get(correlation_id, (None, None))
            if command_id is None or from_asset not in (None, asset_id):
                log.warning("event=command_ack_unmatched tenant=%s connector=%s correlation_id=%.64s from_asset=%.64s",
                            self.tenant, self.name, correlation_id, from_asset)
                done()
                return
            if (waiting := self._answers.get(correlation_id)) is not None:  # a copy, sent again: the first counts
                waiting.done.append(done)
                return
            deadline = self._deadlines.pop(correlation_id, None)  # answered: neither expired nor forgotten meanwhile
            self._late.pop(correlation_id, None)
            ok = str(ack.get("status", "ok")).lower() in ("ok", "done", "accepted", "success")
            self._answers[correlation_id] = _Answer(command_id, asset_id, ack, ok, [done], deadline)
            if correlation_id not in self._sending:  # else recorded once the send's outcome is (`_sent`)
                self._record(correlation_id)

    def _record_answers(self) -> None:
        """Write again the answers whose ledger write failed (`_on_ack`); not those of commands being sent (`_sent`).
        The dead letters of those given up (`_give_up`) go to the pump after the command lock is released: its `put`
        blocks while the pump is full (backpressure, as in the very store outage that failed the writes), and held
        meanwhile, the lock stopped the client's network thread at the next answer (`_on_ack`) and every approval."""
        with self._commands:
            for correlation_id in [c for c in self._answers if c not in self._sending]:
                self._record(correlation_id)
            given_up, self._given_up = self._given_up, []
        for letter in given_up:
            self.pump.put(letter)

    def _record(self, correlation_id: str) -> None:
        """Write an answer to the ledger (under `_commands`); once it landed, forget its command and acknowledge the
        answer's copies. Writing it again after a write that landed unseen changes nothing: the ledger keeps the
        first answer. A failed write is a delivery error (`errors`, `last_error`, the `delivery_errors` metric);
        after `ANSWER_WRITE_TRIES` the answer is given up (`_give_up`)."""
        answer = self._answers[correlation_id]
        answer.tries += 1
        try:
            self.ledger.acknowledged(self.tenant, answer.command_id, answer.ack, answer.ok)
        except Exception as exc:  # noqa: BLE001 - a store hiccup: written again at the next tick
            log.warning("event=command_ack_write_failed tenant=%s connector=%s command=%s try=%d error=%r",
                        self.tenant, self.name, answer.command_id, answer.tries, exc)
            why = f"{type(exc).__name__}: {str(exc)[:300]}"
            self._ledger_failed(self._give_up(correlation_id, why) if answer.tries >= ANSWER_WRITE_TRIES else (
                f"asset {answer.asset_id}'s answer to command {answer.command_id} could not be recorded on it (try "
                f"{answer.tries} of {ANSWER_WRITE_TRIES}, one a second): {why}"))
            return
        self._ledger_error = None  # the ledger takes answers again: a failure before is over
        del self._answers[correlation_id], self._awaiting[correlation_id]
        self._answers_lost.pop(correlation_id, None)  # (a copy given up before, then one that landed)
        answer.acknowledge()

    def _ledger_failed(self, said: str) -> None:
        """Count a failed ledger write (an answer's, a send outcome's) as a delivery error (`errors`, the
        `delivery_errors` metric) and say it in `last_error` until a write lands."""
        self._ledger_errors += 1
        metrics.CONNECTOR_MESSAGES.inc(connector=self.pump.name, outcome="delivery_errors")
        self._ledger_error = (said, datetime.now(UTC))

    def _give_up(self, correlation_id: str, why: str) -> str:
        """Stop writing an answer its command's record does not take: dead-letter it (put in the pump by
        `_record_answers`, at the latest the next tick's, outside the command lock; the pump acknowledges its copies at
        the source once the dead letter is written) and put its command's deadline back, so that the command settles as
        unanswered (expired) rather than staying sent (connectors/README.md says what the operator does); the reason,
        which the caller says in `last_error`."""
        answer = self._answers.pop(correlation_id)
        reason = (f"asset {answer.asset_id}'s answer to command {answer.command_id} (correlation id {correlation_id}) "
                  f"could not be recorded on the command after {answer.tries} tries: {why}; given up: the answer is "
                  "this dead letter, and the command settles as unanswered")
        log.error("event=command_ack_given_up tenant=%s connector=%s command=%s error=%r", self.tenant, self.name,
                  answer.command_id, why)
        source = f"{self.spec.kind}://{self.name}/commands/{answer.command_id}"
        if answer.deadline is not None:
            self._deadlines[correlation_id] = answer.deadline
            self._answers_lost[correlation_id] = (
                f"asset {answer.asset_id} answered ({'ok' if answer.ok else 'not ok'}), and the answer could not be "
                f"recorded on this command after {answer.tries} tries ({why}); given up, it is the dead letter of "
                f"source {source} (GET /v1/connectors/{self.name}/dead-letters), which says what the asset answered")
        else:  # a late answer to an expired command, which stays expired
            del self._awaiting[correlation_id]
        raw = json.dumps(answer.ack, default=str).encode()
        self._given_up.append(Inbound(source, [], [DeadLetter.of(source, answer.asset_id, None, reason, raw)],
                                      answer.acknowledge))
        return reason

    def stop(self) -> None:
        self._stopped.set()
        self._ticker.join(ALIVE_JOIN_S)  # no `alive.json` written after this returns (a deletion follows a stop)
        self.adapter.stop()
        self.pump.stop()
        self.store.mark_alive(self.tenant, self.name, datetime.now(UTC), self._connected_once)


ConnectorActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3,
                            concurrency_groups={STATUS_GROUP: 1})(ConnectorRuntime)
