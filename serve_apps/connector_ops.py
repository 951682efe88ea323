"""The backend's side of the connector and command routes: `connectors.manager.Connectors` with the
API's errors (404 for anything of another tenant, 422 for declarations that cannot work, 409 for
command transitions that are not allowed and 409 `client_id_in_use` for an MQTT client id another connector
holds) and the connectors declared in the service's config.

Declared connectors (`ServeConfig.connectors`) take their credentials from environment variables
of the backend replica (`credentials_env`, e.g. from a Kubernetes Secret), never from the config.

A connector down because another connector holds its MQTT client id starts once that one lets the id go
(`supervise`, after every deletion and declaration and at the backend's every store watch pass), audited in its
tenant's log as the system's `connector.start`, which never says whose connector held the id.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from connectors.commands import Command, CommandError, UnknownCommand
from connectors.commands import unaudited as unaudited_settlement
from connectors.kinds import UnknownKind, parse_spec
from connectors.manager import (ConnectorDown, Connectors, ConnectorUnanswered, InvalidConnector,
                                stop_connector_actors, unaudited)
from connectors.spec import ConnectorSpec, Credentials, SessionTaken, UnknownConnector
from raytwin.contracts import describe_error
from connectors.reach import Reach
from connectors.tenant_files import TenantFiles
from serve_apps.audit import AuditLog
from serve_apps.audit_steps import audited, by_system
from serve_apps.errors import ApiError, ClientIdInUse, Conflict, NotFound, Unprocessable, unwrap
from serve_apps.listing import page

if TYPE_CHECKING:
    from actors.service import TwinService

log = logging.getLogger("raytwin.serve.connectors")
CONNECTOR_RETRY_AFTER_S = 5
"""`Retry-After` of a connector that left a call unanswered (`ConnectorUnanswered`)."""


class ConnectorUnavailable(ApiError):
    """503: the connector's actor left the call unanswered within `connectors.manager.ANSWER_S`; the message says
    whether it is slow or answers nothing, and for an approval that its outcome is unknown."""

    status, code = 503, "connector_unavailable"


def _api_errors(call: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except (UnknownConnector, UnknownCommand, PermissionError) as exc:
            raise NotFound(str(unwrap(exc))) from None
        except ValidationError as exc:
            raise Unprocessable(f"connector: {describe_error(exc)}") from None
        except (InvalidConnector, UnknownKind) as exc:
            raise Unprocessable(str(unwrap(exc))) from None
        except SessionTaken as exc:
            raise ClientIdInUse(str(unwrap(exc))) from None
        except CommandError as exc:
            raise Conflict(str(unwrap(exc))) from None
        except ConnectorDown as exc:
            raise Conflict(str(exc)) from None
        except ConnectorUnanswered as exc:
            raise ConnectorUnavailable(str(exc), headers={"Retry-After": str(CONNECTOR_RETRY_AFTER_S)}) from None
    wrapped.__doc__ = call.__doc__
    return wrapped


def missing_credentials(declaration: dict[str, Any]) -> list[str]:
    """The environment variables a connector declared in the service config names for its credentials
    that this process lacks (`raytwin serve` checks before it deploys; the backend logs and skips it)."""
    return sorted(v for v in (declaration.get("credentials_env") or {}).values() if v not in os.environ)


class ConnectorOps:
    """What the `Backend` deployment runs for the routes (results as JSON-ready dicts)."""

    OPS = frozenset({"create", "pause", "resume", "view", "list_all", "delete", "propose", "approve", "refuse",
                     "commands", "command"})
    READS = frozenset({"view", "list_all", "commands", "command"})
    """The operations that change nothing (a fenced service still answers them, and starts no connector for them:
    `hold`)."""
    DECISIONS = frozenset({"approve", "refuse"})
    """The operations that decide a command for good (approve sends it): the backend reads the store's lease for each
    (`Backend.check_writable(fresh=True)`), as a verdict up to a second old let a service taken over approve or refuse
    a command its successor had refused or approved."""

    def __init__(self, twins: TwinService, declared: list[dict[str, Any]], tls_dir: str | None = None,
                 hosts: list[str] | None = None, audit: AuditLog | None = None,
                 fence: Callable[[], str | None] = lambda: None):
        """`audit`: where the starts nobody asked for are audited (`supervise`; None: nowhere, tests). `fence`: why
        this service may start no connector (None: it holds its store), asked right before each declared connector
        starts (`Connectors.start_declared`): `twins` took the store's lease before this object is made, and a
        takeover in the seconds since would otherwise start them all beside the successor's until the backend's
        store watch stopped them (the default, no check: the CLI's and tests' own)."""
        self.files, self.reach, self.audit = TenantFiles(tls_dir), Reach(hosts), audit
        self._supervising = threading.Lock()  # one pass at a time (two would start one connector twice), and none
        # beside a create or delete (`_unsupervised`)
        self.operators = {(d.get("tenant"), d.get("name")) for d in declared}  # declared in the service config
        self.connectors = Connectors(twins.router, twins.assets, self._reach_of, self._files_of)
        stop_connector_actors(twins.router.namespace, legacy=True)  # an earlier version's: restarted under new names
        for declaration in declared:
            try:
                self._declare(declaration)
            except Exception:  # noqa: BLE001 - one device connector's missing secret must not take the API down
                log.exception("event=connector_declaration_failed connector=%r", declaration.get("name"))
        self.connectors.start_declared(self._refusal, fence)  # those created through the API before a restart, too

    def hold(self, why: str) -> None:
        """Start no connector from now on, not even for a read (`Connectors.hold`): this service lost its store."""
        self.connectors.hold(why)

    def _reach_of(self, tenant: str, name: str) -> Reach | None:
        """The policy a connector runs under, its process checking it at every connection attempt (a name can
        resolve elsewhere after it was checked here); the operator's own (config) reach any host."""
        return None if (tenant, name) in self.operators else self.reach

    def _files_of(self, tenant: str, name: str) -> TenantFiles | None:
        """Where a tenant's connector finds the files it names (their names are kept, shown and sent back as given;
        `connectors.tenant_files`); the operator's (config) name paths."""
        return None if (tenant, name) in self.operators else self.files

    def _refusal(self, spec: ConnectorSpec) -> str | None:
        """Why a stored connector of a tenant may not run under this service's policy (its host list may
        have been set or narrowed since it was created)."""
        if (reach := self._reach_of(spec.tenant, spec.name)) is None or (source := spec.source()) is None:
            return None
        return reach.refusal(*source)

    def supervise(self) -> list[tuple[str, str]]:
        """Start the connectors waiting for a client id their holder let go (`Connectors.start_waiting`): here, or
        on another replica, or a start that failed; which it started."""
        with self._supervising:
            return self.connectors.start_waiting(self._audited_start)

    def _audited_start(self, spec: ConnectorSpec) -> AbstractContextManager[dict[str, Any]]:
        """A waiting connector's start, the system's act in its tenant's audit log: only what that tenant knew
        already (its id was in use by another connector), never whose connector held it or what it did."""
        if self.audit is None:
            return unaudited(spec)
        return audited(self.audit, by_system(spec.tenant, "connector.start", spec.name, {
            "kind": spec.kind, "reason": f"{spec.session_key()} is no longer in use by another connector"}))

    def _unsupervised(self) -> AbstractContextManager[object]:
        """No supervision pass meanwhile (`supervise`'s lock): a pass reads a waiting connector's declaration, then
        starts its actor, which reads the declaration itself; a delete or a new declaration in between (the store
        watch's pass beside the route) left a deleted connector's actor started after the delete stopped it, or the
        replaced declaration running under the new one's name (a create answers with the actor that runs), its old
        client id included."""
        return self._supervising

    def _supervised(self) -> None:
        """`supervise` after a deletion or declaration that may have let a client id go, on a thread of its own: the
        request that let it go answers as soon whether a connector waited for the id or not (its tenant must not
        learn of another's connector by the time it takes), and a failure is only logged (the backend's next pass
        tries again)."""
        threading.Thread(target=self._supervise_logged, name="connector-supervise", daemon=True).start()

    def _supervise_logged(self) -> None:
        try:
            self.supervise()
        except Exception:  # noqa: BLE001 - the store watch's pass starts it
            log.exception("event=connector_supervise_failed")

    def _declare(self, declaration: dict[str, Any]) -> None:
        missing = missing_credentials(declaration)
        if missing:
            raise ValueError(f"connector {declaration.get('name')!r}: set the environment variable(s) {missing} "
                             "on the backend replica (they hold its credentials)")
        spec = {k: v for k, v in declaration.items() if k != "credentials_env"}
        env = declaration.get("credentials_env") or {}
        self.connectors.create(spec, Credentials(**{field: os.environ[var] for field, var in env.items()}))

    def _refuse_operators(self, tenant: str, name: str, verb: str) -> None:
        """A connector declared in the service config is the operator's: a tenant key replaced it (dropping the
        operator's credentials: the device feed was down until the next restart) or deleted it."""
        if (tenant, name) in self.operators:
            raise Conflict(f"connector {name!r} is declared in the service's configuration by its operator: a key "
                           f"cannot {verb} it (ask the operator to change the declaration, or use another name)")

    @_api_errors
    def create(self, tenant: str, spec: dict[str, Any], credentials: Credentials | None) -> dict[str, Any]:
        self._refuse_operators(tenant, spec.get("name"), "replace")
        declared = parse_spec({**spec, "tenant": tenant})
        if (source := declared.source()) is not None and (why := self.reach.refusal(*source)):
            raise Unprocessable(f"connector {declared.name!r}: {why}")
        with self._unsupervised():
            created = self.connectors.create(declared, credentials)
        self._supervised()  # its earlier client id, if it changed, may have gone to a connector waiting for it
        return self.view(tenant, created.name) | {"status": created.model_dump(mode="json")}

    @_api_errors
    def view(self, tenant: str, name: str) -> dict[str, Any]:
        """The declaration and status (never the credentials: they are not part of a spec)."""
        return {"spec": self.connectors.spec(tenant, name).model_dump(mode="json"),
                "status": self.connectors.status(tenant, name).model_dump(mode="json")}

    @_api_errors
    def list_all(self, tenant: str, limit: int, cursor: str | None) -> dict[str, Any]:
        """A page of the tenant's connectors with their statuses, in name order (`serve_apps.listing`): the
        statuses of that page's connectors alone are asked for."""
        statuses, next_cursor = page("connectors", self.connectors.names(tenant),
                                     lambda names: self._statuses(tenant, names), limit, cursor)
        return {"connectors": statuses, "next_cursor": next_cursor}

    def _statuses(self, tenant: str, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The statuses of the connectors `names` that still exist (one deleted since it was listed is left out),
        asked at once: one whose process does not answer is listed `unanswered` (`Connectors.statuses`)."""
        statuses = self.connectors.statuses(tenant, names)
        return {name: status.model_dump(mode="json") for name, status in statuses.items()}

    @_api_errors
    def pause(self, tenant: str, name: str) -> dict[str, Any]:
        return self.connectors.pause(tenant, name).model_dump(mode="json")

    @_api_errors
    def resume(self, tenant: str, name: str) -> dict[str, Any]:
        return self.connectors.resume(tenant, name).model_dump(mode="json")

    @_api_errors
    def delete(self, tenant: str, name: str) -> None:
        self._refuse_operators(tenant, name, "delete")
        with self._unsupervised():
            self.connectors.delete(tenant, name, self._audited_settlement)
        self._supervised()

    def _audited_settlement(self, command: Command) -> AbstractContextManager[dict[str, Any]]:
        """A command a connector's delete settles (`Connectors.delete`), the system's act in its tenant's audit log."""
        if self.audit is None:
            return unaudited_settlement(command)
        step = command.history[-1]
        return audited(self.audit, by_system(command.tenant, "command.settle", command.id, {
            "connector": command.connector, "asset_id": command.asset_id, "settled_as": step.status.value,
            "reason": step.detail}))

    @_api_errors
    def propose(self, tenant: str, connector: str, asset_id: str, name: str, value: dict[str, Any],
                by: str, recommendation_id: str | None = None, command_id: str | None = None) -> dict[str, Any]:
        return self.connectors.propose(tenant, connector, asset_id, name, value, by, recommendation_id,
                                       command_id).model_dump(mode="json")

    @_api_errors
    def approve(self, tenant: str, command_id: str, by: str) -> dict[str, Any]:
        """Approve and send; the approving key's resend (its answer was lost: a backend replica died) answers the
        command as it is now, never sending it again, where a 409 "only a proposed command ..." invited a new one."""
        command = self.connectors.command(tenant, command_id)
        if command.approved_by != by:
            command = self.connectors.approve(tenant, command_id, by)
        return command.model_dump(mode="json")

    @_api_errors
    def refuse(self, tenant: str, command_id: str, by: str, reason: str) -> dict[str, Any]:
        return self.connectors.refuse(tenant, command_id, by, reason).model_dump(mode="json")

    @_api_errors
    def commands(self, tenant: str, asset_id: str | None, limit: int, cursor: str | None) -> dict[str, Any]:
        """A page of the tenant's commands (of one asset if given) in id order (`serve_apps.listing`): the ids are
        listed, and only the page's records (and one more) are read, a window at a time."""
        ledger = self.connectors.ledger
        commands, next_cursor = page("commands", ledger.ids(tenant, asset_id),
                                     lambda ids: ledger.read(tenant, list(ids), asset_id), limit, cursor)
        return {"commands": [c.model_dump(mode="json") for c in commands], "next_cursor": next_cursor}

    @_api_errors
    def command(self, tenant: str, command_id: str) -> dict[str, Any]:
        return self.connectors.command(tenant, command_id).model_dump(mode="json")
