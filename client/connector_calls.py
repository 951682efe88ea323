"""The connector and command operations: connectors to device protocols (create, list, inspect, pause,
resume, delete) and commands back to assets (propose, approve or refuse, list with acknowledgements).
Sync and async clients share them like `client.calls.Endpoints`.

`ConnectorStatus` lives in a module that imports Ray (`connectors.runtime`), and the connector view
in a FastAPI route module: both are loaded on the first such answer, not on `import client`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import TYPE_CHECKING, Any

from client.calls import Call, Sender, _lazy, _model, _models, _nothing, _present
from connectors.commands import Command
from connectors.spec import Credentials
from serve_apps.schemas import CommandPage, DeadLetterPage

if TYPE_CHECKING:
    from connectors.runtime import ConnectorStatus
    from serve_apps.routes_connectors import ConnectorPage, ConnectorView

_STATUS = "connectors.runtime:ConnectorStatus"


class ConnectorCalls(Sender):
    # ---- connectors -------------------------------------------------------------------------------
    def create_connector(self, spec: Mapping[str, Any], credentials: Credentials | None = None) -> ConnectorView:
        """Check a declaration (connectors/README.md; its tenant is the key's), store it and start the
        connector; one of the same name is replaced, so a resend is safe. `credentials` are write-only:
        sent once, never in an answer (admin)."""
        body = {"spec": {k: v for k, v in spec.items() if k != "tenant"},
                "credentials": credentials.revealed() if credentials is not None else None}
        return self._send(Call("POST", "/v1/connectors", _lazy("serve_apps.routes_connectors:ConnectorView"),
                               json=body, idempotent=True))

    def connectors(self, limit: int = 100, cursor: str | None = None) -> ConnectorPage:
        """A page of the tenant's connectors with their statuses, in name order; pass its `next_cursor` back as
        `cursor` for the next page (`iter_connectors` walks them all)."""
        return self._send(connectors_call(limit, cursor))

    def connector(self, name: str) -> ConnectorView:
        """The declaration (never the credentials) and status: connected, messages, pending, lag_s, errors."""
        return self._send(Call("GET", "/v1/connectors/{name}", _lazy("serve_apps.routes_connectors:ConnectorView"),
                               idempotent=True, path_params={"name": name}))

    def connector_dead_letters(self, name: str, day: date | None = None, limit: int = 100,
                               cursor: str | None = None) -> DeadLetterPage:
        """A page of the connector's dead letters (of one UTC day if given, `limit` at most 1000), newest first:
        each message that did not become telemetry, with its source and reason, and what was refused (the message
        as received, or the reading as mapped when the data contract or the twin refused it; its first 4 KiB).
        Pass its `next_cursor` back as `cursor` for the next page (`iter_connector_dead_letters` walks them all)."""
        return self._send(dead_letters_call(name, day, limit, cursor))

    def pause_connector(self, name: str) -> ConnectorStatus:
        """Stop receiving; the source keeps what arrives meanwhile (admin)."""
        return self._send(Call("POST", "/v1/connectors/{name}/pause", _lazy(_STATUS), idempotent=True,
                               path_params={"name": name}))

    def resume_connector(self, name: str) -> ConnectorStatus:
        """Receive again, starting with what the source kept meanwhile (admin)."""
        return self._send(Call("POST", "/v1/connectors/{name}/resume", _lazy(_STATUS), idempotent=True,
                               path_params={"name": name}))

    def delete_connector(self, name: str) -> None:
        """Stop the connector and remove its declaration and credentials; its commands' records stay (admin)."""
        return self._send(Call("DELETE", "/v1/connectors/{name}", _nothing, path_params={"name": name}))

    # ---- commands ---------------------------------------------------------------------------------
    def propose_command(self, connector: str, asset_id: str, name: str, value: Mapping[str, Any]) -> Command:
        """Record a command for an asset through `connector`; nothing is sent before another admin
        key approves it. Not resent after a network error (a resend would propose it twice)."""
        return self._send(Call("POST", "/v1/commands", _model(Command), json={
            "connector": connector, "asset_id": asset_id, "name": name, "value": dict(value)}))

    def approve_command(self, command_id: str) -> Command:
        """Approve (an admin key other than the proposer's) and send once: `sent` or `failed`; a
        command already decided is a Conflict, except for this key's own approval, answered as the command
        is now: so it is resent safely (after a network error, or a 503 when the server's backend died
        mid-approval), sending nothing twice."""
        return self._send(Call("POST", "/v1/commands/{command_id}/approve", _model(Command), idempotent=True,
                               path_params={"command_id": command_id}))

    def refuse_command(self, command_id: str, reason: str) -> Command:
        """Refuse a proposed command (admin); it is never sent."""
        return self._send(Call("POST", "/v1/commands/{command_id}/refuse", _model(Command), json={"reason": reason},
                               path_params={"command_id": command_id}))

    def commands(self, asset_id: str | None = None, limit: int = 100, cursor: str | None = None) -> CommandPage:
        """A page of the tenant's commands (of one asset if given) in id order, with history and acknowledgement;
        pass its `next_cursor` back as `cursor` for the next page (`iter_commands` walks them all)."""
        return self._send(commands_call(asset_id, limit, cursor))

    def command(self, command_id: str) -> Command:
        return self._send(Call("GET", "/v1/commands/{command_id}", _model(Command), idempotent=True,
                               path_params={"command_id": command_id}))


def connectors_call(limit: int, cursor: str | None) -> Call[ConnectorPage]:
    """A page of the tenant's connectors (`ConnectorCalls.connectors`, `client.pages.connector_pager`)."""
    return Call("GET", "/v1/connectors", _lazy("serve_apps.routes_connectors:ConnectorPage"), idempotent=True,
                params=_present(limit=limit, cursor=cursor))


def dead_letters_call(name: str, day: date | None, limit: int, cursor: str | None) -> Call[DeadLetterPage]:
    """A page of a connector's dead letters (`ConnectorCalls.connector_dead_letters`,
    `client.pages.dead_letter_pager`)."""
    return Call("GET", "/v1/connectors/{name}/dead-letters", _model(DeadLetterPage), idempotent=True,
                path_params={"name": name}, params=_present(day=day.isoformat() if day is not None else None,
                                                            limit=limit, cursor=cursor))


def commands_call(asset_id: str | None, limit: int, cursor: str | None) -> Call[CommandPage]:
    """A page of the tenant's commands (`ConnectorCalls.commands`, `client.pages.command_pager`)."""
    return Call("GET", "/v1/commands", _model(CommandPage), idempotent=True,
                params=_present(asset_id=asset_id, limit=limit, cursor=cursor))
