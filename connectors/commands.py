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
- **Audited.** Every transition is kept in the record's history with who and when.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from raytwin.contracts import Identifier
from raytwin.storage import filesystem, replace_file
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


class CommandLedger:
    """The command records of a state store (`{store}/connectors/commands/tenant=T/<id>.json`).

    Proposals are new files; every later transition of a connector's commands is made by that
    connector's actor, one call at a time, so read-check-write needs no lock."""

    def __init__(self, store_url: str, storage_options: dict[str, Any] | None = None):
        self.fs, root = filesystem(store_url, storage_options)
        self.root = f"{root}/connectors/commands"

    def _path(self, tenant: str, command_id: str) -> str:
        return f"{self.root}/tenant={tenant}/{command_id}.json"

    def _save(self, command: Command) -> Command:
        replace_file(self.fs, self._path(command.tenant, command.id), command.model_dump_json().encode())
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
        return self._save(command)

    @store_io("read")
    def get(self, tenant: str, command_id: str) -> Command:
        try:
            return Command.model_validate_json(self.fs.cat_file(self._path(tenant, command_id)))
        except FileNotFoundError:
            raise UnknownCommand(f"no command {command_id!r} for tenant {tenant!r}") from None

    @store_io("read")
    def list(self, tenant: str, asset_id: str | None = None) -> list[Command]:
        """The tenant's commands (optionally of one asset), oldest first."""
        try:
            paths = self.fs.ls(f"{self.root}/tenant={tenant}", detail=False)
        except FileNotFoundError:
            return []
        found = [Command.model_validate_json(self.fs.cat_file(p)) for p in paths if p.endswith(".json")]
        return sorted((c for c in found if asset_id in (None, c.asset_id)), key=lambda c: c.history[0].at)

    def approve(self, tenant: str, command_id: str, by: str) -> Command:
        command = self.get(tenant, command_id)
        if command.status is not CommandStatus.proposed:
            raise CommandError(f"command {command_id} is {command.status.value}: only a proposed command can be "
                               "approved (propose a new one to send again)")
        if by == command.proposed_by:
            raise CommandError(f"command {command_id} was proposed by {by}: another key must approve it (four eyes)")
        return self._save(command.moved(CommandStatus.approved, by, approved_by=by))

    def refuse(self, tenant: str, command_id: str, by: str, reason: str) -> Command:
        command = self.get(tenant, command_id)
        if command.status is not CommandStatus.proposed:
            raise CommandError(f"command {command_id} is {command.status.value}: only a proposed command can be "
                               "refused")
        return self._save(command.moved(CommandStatus.refused, by, reason))

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

    def expire(self, tenant: str, command_id: str, deadline: datetime) -> Command:
        """sent -> expired, its `deadline` passed without an acknowledgement (anything else: unchanged)."""
        command = self.get(tenant, command_id)
        if command.status is not CommandStatus.sent:
            return command
        return self._save(command.moved(
            CommandStatus.expired, f"connector:{command.connector}",
            f"no acknowledgement from asset {command.asset_id} by {deadline.isoformat(timespec='seconds')} "
            "(the connector's ack_timeout_s): whether it executed the command is unknown; check the asset"))

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

    def recover(self, tenant: str, connector: str) -> list[Command]:
        """After a connector (re)starts: its commands left in *sending*, or *sent* unconfirmed (the client that
        kept them is gone), are failed as "outcome unknown" (they may or may not have reached the asset, and are
        never re-sent), those left *approved* (it stopped between the approval and the claim) as not sent:
        nothing is sent before the claim is persisted."""
        reasons = {CommandStatus.sending: "outcome unknown: the connector stopped while sending; not re-sent",
                   CommandStatus.approved: "not sent: the connector stopped before sending; propose it again",
                   CommandStatus.sent: "outcome unknown: the connector stopped before the broker confirmed the "
                                       "command; not re-sent"}
        return [self.failed(c, reasons[c.status]) for c in self.list(tenant) if c.connector == connector and (
            c.status in (CommandStatus.sending, CommandStatus.approved)
            or (c.status is CommandStatus.sent and (c.history[-1].detail or "").startswith("unconfirmed")))]
