"""Commands back to assets: a durable record per command, whose state only moves forward.

proposed -> approved -> sending -> sent -> acknowledged | failed | expired    (or proposed -> refused)

Why each rule:
- **Approval required, by someone else.** A command moves a physical asset; the key that proposed
  it (a person, or a recommender) may not approve it (four eyes).
- **Never sent twice.** `claim` moves an approved command to *sending* and persists that before the
  adapter publishes; a command found in *sending* (the connector crashed mid-send) is marked failed
  with "outcome unknown", never re-sent: a duplicate setpoint can do more harm than a missing one.
  Devices should still ignore a correlation id they have executed (MQTT QoS 1 may duplicate).
- **Tenant-checked.** Records live under their tenant and are looked up by (tenant, id): another
  tenant's command is indistinguishable from a missing one, and a connector only sends its own
  tenant's commands.
- **Never waiting for good.** A sent command no asset acknowledges within its connector's `ack_timeout_s`
  is *expired*: whether the asset executed it is unknown, and an operator must look. An answer that comes
  after that is kept (`ack`, and a history entry saying it was late) but the command stays expired: a
  status that turns back to acknowledged long after people acted on "expired" would mislead them.
- **Never open for good.** A connector's delete settles its open commands, by ``system`` (`settle_deleted`): no
  process of it would send, answer or expire them any more.
- **Audited.** Every transition is kept in the record's history with who and when.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext, suppress
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from raytwin.contracts import Identifier
from raytwin.statestore import WholeMarker
from raytwin.storage import cat_existing, filesystem, replace_file, write_markers, write_once
from raytwin.store_failures import store_io

log = logging.getLogger("raytwin.connectors")
CommandValue = Annotated[dict[Identifier, float | int | str | bool], Field(min_length=1, max_length=64)]


class CommandStatus(StrEnum):
    proposed = "proposed"
    approved = "approved"
    sending = "sending"
    sent = "sent"
    acknowledged = "acknowledged"
    failed = "failed"
    refused = "refused"
    expired = "expired"


class CommandError(RuntimeError):
    """A command transition that is not allowed (the message says which and why)."""


class Unconfirmed(TimeoutError):
    """A command handed to the protocol's client that the source did not confirm in time: it may still be
    delivered (the client keeps it), so it is recorded as sent, and the asset's answer still counts."""


class Refused(RuntimeError):
    """The source took the command and answered that it refused it (the message is its answer): the command was
    sent, not "not sent", and part of it may have taken effect (e.g. one of the two nodes of an OPC UA write)."""


class OutcomeUnknown(RuntimeError):
    """A command whose request reached the source, or may have, and whose answer never came (a write timed out, the
    connection was lost meanwhile): recorded failed as "outcome unknown", never "not sent", which would invite a second
    send that may actuate twice."""


class UnknownCommand(KeyError):
    """No such command for this tenant (another tenant's looks the same)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Transition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    status: CommandStatus
    at: datetime
    by: str
    detail: str | None = None


class Command(BaseModel):
    """One command to one asset through one connector, and everything that happened to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    correlation_id: str
    tenant: Identifier
    connector: Identifier
    asset_id: Identifier
    name: Identifier = Field(description="what to do, e.g. `setpoint`")
    value: CommandValue
    status: CommandStatus
    proposed_by: str
    approved_by: str | None = None
    recommendation_id: str | None = Field(None, description="the recommendation run this command issues (`POST "
                                          "/v1/assets/{id}/recommendations/{rid}/issue`): approving it needs a key "
                                          "with the approver grant")
    ack: dict[str, Any] | None = Field(None, description="the asset's acknowledgement, as it sent it")
    ack_deadline: datetime | None = Field(None, description="when a sent command that no asset acknowledged "
                                          "expires (sent + the connector's ack_timeout_s)")
    history: list[Transition]

    def moved(self, status: CommandStatus, by: str, detail: str | None = None, **changes: Any) -> Command:
        step = Transition(status=status, at=datetime.now(UTC), by=by, detail=detail)
        return self.model_copy(update={"status": status, "history": [*self.history, step], **changes})


UNSETTLED = frozenset({CommandStatus.approved, CommandStatus.sending, CommandStatus.sent})
"""The statuses a connector settles after a restart or awaits an answer in (with *expired*, until its late answer)."""


def is_unsettled(command: Command) -> bool:
    """Whether its connector may still act on it: settle it after a restart, or record an asset's answer."""
    return command.status in UNSETTLED or (command.status is CommandStatus.expired and command.ack is None)


def _was_unsettled(command: Command) -> bool:
    """Whether it was unsettled before its latest transition (an expired one moves again only to take its answer)."""
    return len(command.history) > 1 and command.history[-2].status in UNSETTLED | {CommandStatus.expired}


def _saves_claimed(claimed: Command, same: bool) -> bool:
    """Whether a decider that lost the claim to `claimed` (`same`: its own key's same decision) saves it over a record
    it read proposed: a refusal, final, always; an approval only on its approver's retry, which runs in the
    connector's actor, one call at a time, after the approval's first try ended. Why not another's approval: its
    approver claims and sends it right after saving it, and a read of the record from before that save put
    *approved* back over *sending* or *sent* (a refusal and an approval racing): the asset's answer was then dropped
    and a restart failed it as "not sent", inviting a second proposal of what was sent. Left proposed, that approval's
    record waits for its approver's retry (which sends it), and every other decision is refused meanwhile; a delete of
    its connector, which no retry reaches after, saves and settles it (`settle_deleted`)."""
    return same or claimed.status is CommandStatus.refused


def _failed_by_restart(command: Command, stopped: str = "the connector stopped") -> str | None:
    """Why its connector's end (`stopped`: a restart, `CommandLedger.recover`; a delete, `settle_deleted`) fails
    `command`, or None."""
    if command.status is CommandStatus.approved:
        return f"not sent: {stopped} before sending; propose it again"
    if command.status is CommandStatus.sending:
        return f"outcome unknown: {stopped} while sending; not re-sent"
    if command.status is CommandStatus.sent and (command.history[-1].detail or "").startswith("unconfirmed"):
        return f"outcome unknown: {stopped} before the broker confirmed the command; not re-sent"
    return None


ANSWER_OF_THE_SEND = {"status": "ok", "detail": "the source accepted the command (it is recorded sent only once it "
                      "had), and the connector stopped before it recorded the answer, whose detail is lost"}
"""The answer a restarted connector records on a command it finds sent, of a kind answered by the send itself
(`CommandLedger.recover`)."""

Settling = Callable[[Command], AbstractContextManager[dict[str, Any]]]
"""How the system's settlement of a command is audited (`CommandLedger.settle_deleted`): the context its write runs in,
given the command as settled (its intent written before, its outcome after, with what the body put in the dict)."""


def unaudited(command: Command) -> AbstractContextManager[dict[str, Any]]:
    """No audit log (the CLI's and tests' ledgers)."""
    return nullcontext({})


SYSTEM = "system"
"""Who settles a deleted connector's commands (`CommandLedger.settle_deleted`): neither a key nor the connector."""


def _ended(command: Command, by: str, stopped: str, answered_by_send: bool) -> Command | None:
    """`command` as its connector's end (`stopped`) leaves it: failed (`_failed_by_restart`), or, left sent by a kind
    whose send is the answer, acknowledged (`ANSWER_OF_THE_SEND`); None: unchanged."""
    if reason := _failed_by_restart(command, stopped):
        return command.moved(CommandStatus.failed, by, reason)
    if answered_by_send and command.status is CommandStatus.sent:
        return command.moved(CommandStatus.acknowledged, by, ANSWER_OF_THE_SEND["detail"], ack=ANSWER_OF_THE_SEND)
    return None


def _expired_by_delete(command: Command, deleted: str) -> Command | None:
    """A sent command whose connector was deleted before its asset answered, expired; None for any other."""
    if command.status is not CommandStatus.sent:
        return None
    return command.moved(CommandStatus.expired, SYSTEM, f"{deleted} before asset {command.asset_id} answered: whether "
                         "it executed the command is unknown; check the asset")


class CommandLedger:
    """The command records of a state store (`{store}/connectors/commands/tenant=T/<id>.json`), and their index.

    Proposals are new files; every later transition of a connector's commands is made by that
    connector's actor, one call at a time, so read-check-write needs no lock.

    The index (`tenant=T/index/`) holds empty markers named by command id, so that a query reads the records it
    answers with and no others: `asset_id=A/` has one for each of the asset's commands, written before its record;
    `connector=C/` one for each of connector C's unsettled commands (`is_unsettled`), written before the record that
    makes it so and removed after the record that settles it (or by `recover`, once its late answer is no longer
    awaited). A marker without its record (a proposal that failed) or whose command is settled (its removal failed)
    is skipped, so a crash between the two writes changes no answer. `_complete` says every command has its markers:
    a tenant without a command yet gets it before its first proposal's markers (`_first_proposal`); one whose
    commands were written before the index (no `_complete`) is read whole, as it was, until a connector of it starts
    and indexes them (`index`). Complete only while every writer marks: a starting backend restarts an older
    version's connector actors first (`connectors.runtime.MARKERS`); what is not covered (a rollback to a version
    without the index, then an upgrade again): connectors/README.md, "writers of an older version"."""

    def __init__(self, store_url: str, storage_options: dict[str, Any] | None = None):
        self.fs, root = filesystem(store_url, storage_options)
        self.root = f"{root}/connectors/commands"
        self._indexed = WholeMarker(self.fs, self._index)  # every command of the tenant has its index markers
        self._proposed: set[str] = set()  # the tenants this ledger has proposed for (`_first_proposal`)

    def _path(self, tenant: str, command_id: str) -> str:
        return f"{self.root}/tenant={tenant}/{command_id}.json"

    def _index(self, tenant: str, key: str = "") -> str:
        """The index folder of `tenant`, or of its `key` (``asset_id=A``, ``connector=C``)."""
        return f"{self.root}/tenant={tenant}/index" + (f"/{key}" if key else "")

    def _save(self, command: Command) -> Command:
        open_markers = self._index(command.tenant, f"connector={command.connector}")
        if is_unsettled(command) and not _was_unsettled(command):  # before the record: no reader misses it
            write_markers(self.fs, open_markers, [command.id])
        replace_file(self.fs, self._path(command.tenant, command.id), command.model_dump_json().encode())
        if _was_unsettled(command) and not is_unsettled(command):  # after it: a stale one is only skipped
            self._unmark(open_markers, [command.id])
        log.info("event=command_%s tenant=%s command=%s correlation_id=%s connector=%s asset=%s by=%s",
                 command.status.value, command.tenant, command.id, command.correlation_id, command.connector,
                 command.asset_id, command.history[-1].by)
        return command

    def propose(self, tenant: str, connector: str, asset_id: str, name: str, value: dict[str, Any],
                by: str, recommendation_id: str | None = None, command_id: str | None = None) -> Command:
        """A new proposed command; `command_id`: one the caller chose (to audit its intent before), else a new one."""
        command = Command(id=command_id or uuid.uuid4().hex, correlation_id=uuid.uuid4().hex, tenant=tenant,
                          connector=connector, asset_id=asset_id, name=name, value=value,
                          status=CommandStatus.proposed, proposed_by=by, recommendation_id=recommendation_id,
                          history=[Transition(status=CommandStatus.proposed, at=datetime.now(UTC), by=by)])
        self._first_proposal(tenant)
        write_markers(self.fs, self._index(tenant, f"asset_id={asset_id}"), [command.id])  # before its record
        return self._save(command)

    @store_io("read")
    def get(self, tenant: str, command_id: str) -> Command:
        try:
            return Command.model_validate_json(self.fs.cat_file(self._path(tenant, command_id)))
        except FileNotFoundError:
            raise UnknownCommand(f"no command {command_id!r} for tenant {tenant!r}") from None

    @store_io("read")
    def list(self, tenant: str, asset_id: str | None = None) -> list[Command]:
        """The tenant's commands (optionally of one asset: its own alone are read), oldest first."""
        if asset_id is None:
            return self._read(tenant, None)
        return [c for c in self._read(tenant, f"asset_id={asset_id}") if c.asset_id == asset_id]

    @store_io("read")
    def ids(self, tenant: str, asset_id: str | None = None) -> list[str]:
        """The ids of the tenant's commands (of one asset: its index markers, once the tenant is indexed; else every
        id), sorted, listed without reading a record: the keys `GET /v1/commands` pages (`serve_apps.listing`)."""
        if asset_id is not None and self._indexed.holds(tenant):
            names = self._listed(self._index(tenant, f"asset_id={asset_id}"))
        else:
            names = self._records(tenant)
        return sorted(name.rsplit("/", 1)[-1].removesuffix(".json") for name in names)

    @store_io("read")
    def read(self, tenant: str, ids: list[str], asset_id: str | None = None) -> dict[str, Command]:
        """Those of the commands `ids` that exist (of `asset_id` if given: an id may be any of the tenant's), by id,
        read in one batch."""
        bodies = cat_existing(self.fs, [self._path(tenant, command_id) for command_id in ids]).values()
        found = (Command.model_validate_json(body) for body in bodies)
        return {c.id: c for c in found if asset_id in (None, c.asset_id)}

    @store_io("read")
    def unsettled(self, tenant: str, connector: str) -> list[Command]:
        """The connector's unsettled commands (`is_unsettled`; once indexed, less the expired ones whose answer
        `recover` stopped awaiting), oldest first, those alone read: what its restarted process acts on."""
        return [c for c in self._read(tenant, f"connector={connector}") if c.connector == connector and is_unsettled(c)]

    def _read(self, tenant: str, key: str | None) -> list[Command]:
        """The tenant's commands that index `key` marks (None, or the index not complete: all of them), oldest first."""
        if key is not None and self._indexed.holds(tenant):
            names = self._listed(self._index(tenant, key))
            paths = [self._path(tenant, name.rsplit("/", 1)[-1]) for name in names]
        else:
            paths = self._records(tenant)
        found = [Command.model_validate_json(body) for body in cat_existing(self.fs, paths).values()]
        return sorted(found, key=lambda c: (c.history[0].at, c.id))

    def _records(self, tenant: str) -> list[str]:
        """The paths of the tenant's command records, listed afresh."""
        return [p for p in self._listed(f"{self.root}/tenant={tenant}") if p.endswith(".json")]

    def _listed(self, folder: str) -> list[str]:
        try:
            return self.fs.ls(folder, detail=False, refresh=True)
        except FileNotFoundError:
            return []

    def _unmark(self, folder: str, names: list[str]) -> None:
        """Remove the markers `names` of `folder` (one gone already is no error: it was stale at worst)."""
        for name in names:
            with suppress(FileNotFoundError):
                self.fs.rm_file(f"{folder}/{name}")

    @store_io("write")
    def index(self, tenant: str) -> None:
        """Write the index markers of a tenant's commands written before the index, then `_complete`, unless it is
        complete already: a tenant's commands are read whole once (as every per-asset query and connector start did
        before). Commands proposed or moved meanwhile write their own markers (a stale one is skipped)."""
        def backfill() -> None:
            marked: dict[str, list[str]] = {}
            for c in self._read(tenant, None):
                marked.setdefault(f"asset_id={c.asset_id}", []).append(c.id)
                if is_unsettled(c):
                    marked.setdefault(f"connector={c.connector}", []).append(c.id)
            for key, ids in marked.items():
                write_markers(self.fs, self._index(tenant, key), ids)

        self._indexed.complete(tenant, backfill)

    def _first_proposal(self, tenant: str) -> None:
        """Before this ledger's first proposal for `tenant`: a tenant without a command record is indexed (`_complete`
        written), so that its queries read its markers alone from its first command on, not every command until a
        connector of it starts. Written only where the listing finds no record, it never claims markers for a
        record without them: records are marked before they are written since the index, and those written before it
        are there to be listed (none is written any more); a crash before the first marker leaves it true of no
        command. A record found, of either kind, leaves the tenant to `index` (a no-op where another proposal's check
        marked it). Checked once per ledger and tenant (its records listed once)."""
        if tenant not in self._proposed and not self._indexed.holds(tenant) and not self._records(tenant):
            self._indexed.mark(tenant)
        self._proposed.add(tenant)

    def approve(self, tenant: str, command_id: str, by: str) -> Command:
        command = self.get(tenant, command_id)
        if command.status is not CommandStatus.proposed:
            raise CommandError(f"command {command_id} is {command.status.value}: only a proposed command can be "
                               "approved (propose a new one to send again)")
        if by == command.proposed_by:
            raise CommandError(f"command {command_id} was proposed by {by}: another key must approve it (four eyes)")
        return self._decide(command.moved(CommandStatus.approved, by, approved_by=by))

    def refuse(self, tenant: str, command_id: str, by: str, reason: str) -> Command:
        command = self.get(tenant, command_id)
        if command.status is not CommandStatus.proposed:
            raise CommandError(f"command {command_id} is {command.status.value}: only a proposed command can be "
                               "refused")
        return self._decide(command.moved(CommandStatus.refused, by, reason))

    def _decision(self, tenant: str, command_id: str) -> str:
        return f"{self.root}/tenant={tenant}/decisions/{command_id}.json"

    @store_io("write")
    def _decide(self, decided: Command) -> Command:
        """Save the one decision (approved or refused) a proposed command gets, claimed first by an exclusive create of
        its copy (`write_once`): of two deciders that both read it proposed (an approval in the connector's actor and a
        refusal in the backend; a backend fenced between its lease read and this write and its successor), one
        decides and the other is refused, where the later record replaced the earlier and a refused command could be
        sent. A claimed decision whose record is still proposed (its decider stopped, or its record's write failed,
        between the two writes) is saved then (`_saves_claimed`); the same key's same decision is that decision,
        tried again."""
        path = self._decision(decided.tenant, decided.id)
        try:
            write_once(self.fs, path, decided.model_dump_json().encode())
        except FileExistsError:
            earlier = Command.model_validate_json(self.fs.cat_file(path))
            same = (earlier.status, earlier.history[-1].by) == (decided.status, decided.history[-1].by)
            if _saves_claimed(earlier, same) and self.get(decided.tenant, decided.id).status is CommandStatus.proposed:
                self._save(earlier)
            if not same:
                raise CommandError(f"command {decided.id} was {earlier.status.value} by {earlier.history[-1].by} "
                                   "already: a command gets one decision") from None
            return earlier
        return self._save(decided)

    def _unsaved_approval(self, command: Command) -> Command | None:
        """The approval claimed for `command`, read proposed (`_decide`), whose record its connector's actor stopped
        before saving, for a delete (`settle_deleted`): only its approver's retry saves it otherwise, and that retry
        finds no connector once it is deleted, so the command stayed proposed and every refusal lost to the claim.
        Saved over the record read (unlike another decider's read, `_saves_claimed`) as the delete stopped the actor
        first, which alone saves and sends approvals; read again just before, the record still proposed."""
        try:
            claimed = Command.model_validate_json(self.fs.cat_file(self._decision(command.tenant, command.id)))
        except FileNotFoundError:
            return None
        if claimed.status is not CommandStatus.approved:
            return None
        return claimed if self.get(command.tenant, command.id).status is CommandStatus.proposed else None

    def claim(self, tenant: str, command_id: str, connector: str) -> Command:
        """approved -> sending, persisted before anything is sent; refuses anything else (never twice)."""
        command = self.get(tenant, command_id)
        if command.connector != connector:
            raise CommandError(f"command {command_id} is for connector {command.connector!r}, not {connector!r}")
        if command.status is not CommandStatus.approved:
            raise CommandError(f"command {command_id} is {command.status.value}: only an approved command is sent, "
                               "and only once")
        return self._save(command.moved(CommandStatus.sending, f"connector:{connector}"))

    def sent(self, command: Command, ack_timeout_s: float, detail: str | None = None) -> Command:
        """sending -> sent, to be acknowledged within `ack_timeout_s` (its `ack_deadline`)."""
        sent = command.moved(CommandStatus.sent, f"connector:{command.connector}", detail)
        return self._save(sent.model_copy(update={
            "ack_deadline": sent.history[-1].at + timedelta(seconds=ack_timeout_s)}))

    def expire(self, tenant: str, command_id: str, deadline: datetime, answer_lost: str | None = None) -> Command:
        """sent -> expired, its `deadline` passed without an acknowledgement (anything else: unchanged);
        `answer_lost`: where the asset's answer went that its connector received and could not record on it (it gave
        up), which the detail says instead of "no acknowledgement", the asset having answered."""
        command = self.get(tenant, command_id)
        if command.status is not CommandStatus.sent:
            return command
        by = deadline.isoformat(timespec='seconds')
        return self._save(command.moved(
            CommandStatus.expired, f"connector:{command.connector}",
            f"no acknowledgement from asset {command.asset_id} by {by} (the connector's ack_timeout_s): whether it "
            "executed the command is unknown; check the asset" if answer_lost is None else
            f"no acknowledgement recorded by {by}: {answer_lost}"))

    def failed(self, command: Command, reason: str) -> Command:
        return self._save(command.moved(CommandStatus.failed, f"connector:{command.connector}", reason))

    def acknowledged(self, tenant: str, command_id: str, ack: dict[str, Any], ok: bool) -> Command:
        """Record the asset's answer (the first one counts; a repeated ack changes nothing). One that comes after
        the command expired is kept, and it stays expired."""
        command = self.get(tenant, command_id)
        answer = f"the asset answered: {str(ack.get('detail') or ack.get('status'))[:300]}"
        if command.status is CommandStatus.expired and command.ack is None:
            return self._save(command.moved(CommandStatus.expired, f"asset:{command.asset_id}",
                                            f"late acknowledgement ({'ok' if ok else answer}) after the deadline: "
                                            "the command stays expired", ack=ack))
        if command.status not in (CommandStatus.sending, CommandStatus.sent):
            return command
        status = CommandStatus.acknowledged if ok else CommandStatus.failed
        return self._save(command.moved(status, f"asset:{command.asset_id}", None if ok else answer, ack=ack))

    def recover(self, tenant: str, connector: str, answers_kept: timedelta | None = None,
                answered_by_send: bool = False) -> list[Command]:
        """After a connector (re)starts: its commands left in *sending*, or *sent* unconfirmed (the client that
        kept them is gone), are failed as "outcome unknown" (they may or may not have reached the asset, and are
        never re-sent), those left *approved* (it stopped between the approval and the claim) as not sent:
        nothing is sent before the claim is persisted. `answered_by_send` (the connector's kind answers a command
        with its send's result, `Kind.answered_by_send`: OPC UA's write statuses, a send returning only once the
        server accepted both writes): a command left *sent* is acknowledged (`ANSWER_OF_THE_SEND`), its answer lost
        with the process between the send and its record (before, it waited for an answer no source gives again, then
        expired as unanswered by the asset). The tenant's commands are indexed first (`index`), and the expired ones
        whose late answer is no longer awaited (expired more than `answers_kept` ago; None: all are) leave the
        connector's index, so that its starts read what they act on alone."""
        self.index(tenant)
        mine = self.unsettled(tenant, connector)
        if answers_kept is not None:
            given_up = datetime.now(UTC) - answers_kept
            self._unmark(self._index(tenant, f"connector={connector}"), [
                c.id for c in mine if c.status is CommandStatus.expired and c.history[-1].at <= given_up])
        return [self._save(moved) for c in mine
                if (moved := _ended(c, f"connector:{connector}", "the connector stopped", answered_by_send))]

    def settle_deleted(self, tenant: str, connector: str, answered_by_send: bool = False,
                       audited: Settling = unaudited) -> list[Command]:
        """Settle the commands of `connector`, being deleted: no process of it will send, answer or expire them any
        more, and each would stay open for good. By ``system``, each detail naming the delete, each in `audited`'s
        context: a proposed one is refused, the one decision claimed as any (one decided meanwhile keeps that decision,
        its decider settles it), unless a key's approval was claimed for it and never saved (`_unsaved_approval`): that
        approval is saved, as its key's, and the command failed "not sent" as any approved one; one it held is failed
        or acknowledged as a restart would (`recover`), and one sent that its asset has not answered is expired
        (whether it executed is unknown); no late answer is awaited any more (its connector index emptied). Proposals
        are not indexed by connector, so the tenant's records are read whole (a delete is rare). Called before the declaration is removed, so a delete cut short and tried again
        finishes it; the commands it settled."""
        self.index(tenant)
        deleted = f"connector {connector!r} was deleted"
        settled = []
        for c in self._read(tenant, None):
            if c.connector != connector:
                continue
            if c.status is CommandStatus.proposed and (approval := self._unsaved_approval(c)):
                c = self._save(approval)  # its key's decision, then settled as any approved one (not sent)
            if c.status is CommandStatus.proposed:
                moved = c.moved(CommandStatus.refused, SYSTEM, f"{deleted}: a command proposed through it can no "
                                "longer be sent; propose it again through another connector")
            elif not (moved := _ended(c, SYSTEM, deleted, answered_by_send) or _expired_by_delete(c, deleted)):
                continue
            with audited(moved) as outcome:
                try:
                    settled.append(self._decide(moved) if c.status is CommandStatus.proposed else self._save(moved))
                except CommandError as exc:  # decided meanwhile: that decision stands
                    outcome.update(status="refused", reason=str(exc))
        folder = self._index(tenant, f"connector={connector}")
        self._unmark(folder, [path.rsplit("/", 1)[-1] for path in self._listed(folder)])
        return settled
