"""`Connectors`: the driver-side facade (API, CLI, config) over a twin service's connectors.

Every call is addressed by (tenant, name): another tenant's connector or command is missing,
not forbidden. A declaration is checked against its kind and the tenant's registered twins
before anything is stored or started.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import ray

from actors.ingest import ShardRouter
from connectors.commands import Command, CommandError, CommandLedger, CommandStatus, Settling
from connectors.commands import unaudited as unaudited_settlement
from connectors.kinds import AssetTypes, kind_of, parse_spec
from connectors.reach import Reach
from connectors.runtime import (ACTOR_PREFIX, ACTOR_SEPARATOR, MARKERS, ConnectorActor, ConnectorState,
                               ConnectorStatus, actor_name, legacy_actor_name)
from connectors.spec import ConnectorSpec, ConnectorStore, Credentials, SessionTaken, UnknownConnector
from connectors.tenant_files import Spec, TenantFiles
from raytwin import metrics
from raytwin.contracts import AssetType, Quantity
from raytwin.sealing import SealingError
from raytwin.statestore import StateStore

log = logging.getLogger("raytwin.connectors")


class InvalidConnector(ValueError):
    """A declaration that cannot work (unknown assets, bad topics): the message lists every problem."""


START_RETRY_S = 30.0
"""How long a connector whose actor could not start is reported down before its start is tried again (each
try is a new worker process: a reader listing connectors must not start one per request)."""
ANSWER_S = 30.0
"""How long a call to a connector's actor (a status, pause, resume or approval) is waited for: a hung actor held the
backend's thread for good. Past it, `unanswered` tells a slow connector from one whose process answers nothing."""
PROBE_S = 2.0
"""How long a late call's connector gets to answer its status (it runs beside the actor's other calls)."""
START_CHECK_S = 10.0
"""How long `Connectors.start_declared` waits for the connectors it started to answer, so that one that cannot
start is exported as down at once (a slower one is found by the next call that asks it)."""


class ConnectorUnanswered(RuntimeError):
    """A connector's actor left a call unanswered within `ANSWER_S`; the message says whether it is slow (it still
    answers its status), restarting, or answers nothing (stopped, hung or unreachable)."""


def unanswered(handle: Any, name: str, what: str) -> ConnectorUnanswered:
    """Why the connector `name` (actor `handle`) left `what` unanswered within `ANSWER_S`, from a status probe
    (`PROBE_S`; the status runs beside its other calls) and Ray's control store."""
    from actors.failover import actor_restarting

    try:
        ray.get(handle.status.remote(), timeout=PROBE_S)
        state = "slow: it still answers its status, and the call waits behind its other work"
    except ray.exceptions.RayActorError:
        state = "down: its process died"
    except ray.exceptions.GetTimeoutError:
        state = ("restarting: its process died and Ray starts it again" if actor_restarting(handle) else
                 "not answering at all: its process is stopped, hung or unreachable")
    return ConnectorUnanswered(f"connector {name!r} left {what} unanswered within {ANSWER_S:g} s; it is {state}")


class ConnectorDown(RuntimeError):
    """A declared connector whose actor cannot start (e.g. its TLS files were removed since); `why` says why."""

    def __init__(self, name: str, why: str, since: datetime):
        super().__init__(f"connector {name!r} cannot start: {why}; declare it again or delete it")
        self.name, self.why, self.since = name, why, since

    def __reduce__(self):
        return (type(self), (self.name, self.why, self.since))


def stop_connector_actors(namespace: str, legacy: bool = False) -> int:
    """Kill every connector actor of a service's Ray `namespace` (declarations stay in the store); how many. For a
    service that stops or lost its store: its detached connectors would go on receiving and sending beside the
    service that holds the store now, under the same MQTT client ids (the two kick each other off the broker).
    `legacy`: only those an earlier version named ambiguously (`connectors.runtime.legacy_actor_name`), for a service
    that starts where they run: it starts its connectors under their names now, beside them otherwise."""
    names = [name for name in _connector_actors(namespace) if not legacy or legacy_actor_name(name)]
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:  # gone meanwhile
            pass
    return len(names)


def _connector_actors(namespace: str) -> list[str]:
    """The names of the connector actors of a service's Ray `namespace` (one question to Ray's GCS)."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == namespace and a["name"].startswith(ACTOR_PREFIX)]


def connector_tenants(namespace: str) -> set[str]:
    """The tenants with a connector actor in a service's Ray `namespace`: those whose twins take readings that no
    API call carries (`serve_apps.backend.Backend._record_connector_changes` records their changes)."""
    return {name[len(ACTOR_PREFIX):].split(ACTOR_SEPARATOR, 1)[0] for name in _connector_actors(namespace)
            if not legacy_actor_name(name)}


def anywhere(tenant: str, name: str) -> Reach | None:
    """No reach policy: the connector connects to any host (the operator's, the CLI's and tests' own)."""
    return None


def paths(tenant: str, name: str) -> TenantFiles | None:
    """No tenant directory: the connector's files are the paths it names (the operator's, the CLI's, tests')."""
    return None


def _asset_type(raw: dict[str, Any]) -> AssetType:
    """A registered twin's asset type as stored (validated when it was registered, so constructed, not validated
    again: that would load its simulator); its measurable quantities typed, as declarations are checked against
    their names and units."""
    quantities = {kind: {name: Quantity.model_construct(**q) for name, q in raw.get(kind, {}).items()}
                  for kind in ("inputs", "outputs")}
    return AssetType.model_construct(**{**raw, **quantities})


@dataclass(frozen=True)
class _Down:
    """A connector kept from running: tried again at `retry_at` (monotonic; inf: not by a call), `why` since `since`;
    `waits_for`: the client id another connector holds, which it gets once that one lets it go."""

    retry_at: float
    why: str
    since: datetime
    waits_for: str | None = None


Audited = Callable[[ConnectorSpec], AbstractContextManager[dict[str, Any]]]
"""How a start nobody asked for is audited: the context to start `spec`'s connector in (its intent written before,
its outcome after, with what the body put in the dict)."""


def unaudited(spec: ConnectorSpec) -> AbstractContextManager[dict[str, Any]]:
    """No audit log (the CLI's and tests' `Connectors`)."""
    return nullcontext({})


def _waiting(key: str) -> str:
    """Why a connector whose client id another connector holds is down, and what starts it: its own tenant reads it,
    so it never says whose connector that is."""
    return (f"{key} is in use by another connector, declared earlier: this one starts by itself once that one lets "
            "the id go (it is deleted, or declared with another client id); or give this one another client id")


def _log_held(tenant: str, name: str, exc: ConnectorDown) -> None:
    log.warning("event=connector_starts_held tenant=%s connector=%s reason=%r: it and those after it are not started",
                tenant, name, exc.why)


def _died_because(exc: BaseException) -> str:
    """The last line of an actor's death: its constructor's exception (Ray puts the traceback before it)."""
    return next((line.strip() for line in reversed(str(exc).splitlines()) if line.strip()), type(exc).__name__)


class Connectors:
    """Create, pause, resume, inspect and delete connectors feeding the twins behind `router`."""

    def __init__(self, router: ShardRouter, assets: Any = None,
                 reach: Callable[[str, str], Reach | None] = anywhere,
                 files: Callable[[str, str], TenantFiles | None] = paths):
        """`assets(tenant) -> list[str]`: the tenant's registered twins (e.g. `TwinService.assets`); `reach(tenant,
        name)`: the hosts a connector may connect to, enforced by its process at every connection attempt;
        `files(tenant, name)`: where the files it names are (kept as names, opened as paths)."""
        self.router, self._assets, self._reach, self._files = router, assets, reach, files
        self.store = ConnectorStore(router.store_url, router.storage_options)
        self.twins = StateStore(router.store_url, router.storage_options)
        self.ledger = CommandLedger(router.store_url, router.storage_options)
        self._down: dict[tuple[str, str], _Down] = {}
        self._answered: dict[tuple[str, str], ConnectorStatus] = {}  # each one's last status (`statuses`)
        self._held: _Down | None = None  # why no call starts an actor any more (`hold`)
        # a start, `hold` and a delete's beginning: none starts an actor after `hold` returned, nor once a delete of its
        # connector began (none of them calls another while holding it)
        self._starts = threading.Lock()
        self._deleting: set[tuple[str, str]] = set()  # connectors whose delete runs: no actor of theirs starts

    def create(self, spec: ConnectorSpec | dict[str, Any], credentials: Credentials | None = None) -> ConnectorStatus:
        """Check, store and start a connector (an existing one of that name is replaced and restarted)."""
        spec = spec if isinstance(spec, ConnectorSpec) else parse_spec(spec)
        problems = kind_of(spec.kind).problems(self._opened(spec), self._asset_types(spec.tenant))
        if (files := self._files(spec.tenant, spec.name)) is not None:
            problems = [files.shown(problem, spec) for problem in problems]  # the tenant's names, not our paths
        if problems:
            raise InvalidConnector(f"connector {spec.name!r}: " + "; ".join(problems))
        replaced = self._declared(spec.tenant, spec.name)
        previous = self._old_credentials(replaced) if replaced and replaced.session_key() else None
        if key := spec.session_key():
            self.store.claim(key, spec.tenant, spec.name)
        self._kill(spec.tenant, spec.name)
        self._answered.pop((spec.tenant, spec.name), None)  # (a new declaration's figures start anew)
        self.store.save(spec, credentials or Credentials())
        if replaced and replaced.session_key() not in (None, key):  # its old client id: ended and passed on
            self._let_go(replaced, previous)
        self._up(spec.tenant, spec.name)
        try:
            status = self._ask(spec.tenant, spec.name, "status")
        except ConnectorDown as exc:  # it cannot start: not kept, or every later call would fail
            self._kill(spec.tenant, spec.name)
            self.store.delete(spec.tenant, spec.name)
            self._up(spec.tenant, spec.name)
            if replaced and replaced.session_key() == key:  # the replaced one's session, which may hold messages
                self._let_go(replaced, previous)
            elif key:  # claimed for this declaration, which never connected
                self._pass_on(key, spec.tenant, spec.name)
            raise InvalidConnector(f"connector {spec.name!r} could not start, so it was not kept: {exc.why}") from None
        log.info("event=connector_created tenant=%s connector=%s kind=%s", spec.tenant, spec.name, spec.kind)
        return status

    def _old_credentials(self, spec: ConnectorSpec) -> Credentials | None:
        """The credentials stored for `spec`, to end its session with once it is replaced; None where no configured
        key opens them any more (a key rotated out): a declaration with new credentials must still be taken, and
        the session, which cannot be ended then, stays claimed (`_let_go`)."""
        try:
            return self.store.credentials(spec.tenant, spec.name)
        except SealingError:
            log.warning("event=connector_credentials_unreadable tenant=%s connector=%s", spec.tenant, spec.name)
            return None

    def _asset_types(self, tenant: str) -> AssetTypes:
        """The tenant's twins (live, from the shards) with the asset types they were registered with."""
        if not self._assets:
            return {}
        records = self.twins.registrations_of(tenant)
        return {a: _asset_type(records[a]["artifact"]["asset_type"]) if a in records else None
                for a in self._assets(tenant)}

    def _opened(self, spec: Spec) -> Spec:
        """`spec` naming the paths of the files it names, to open them (`InvalidConnector`: names that are no
        files of its tenant)."""
        if (files := self._files(spec.tenant, spec.name)) is None:
            return spec
        try:
            return files.opened(spec)
        except ValueError as exc:
            raise InvalidConnector(f"connector {spec.name!r}: {exc}") from None

    def _declared(self, tenant: str, name: str) -> ConnectorSpec | None:
        try:
            return self.spec(tenant, name)
        except UnknownConnector:
            return None

    def _actor(self, tenant: str, name: str):
        """The connector's actor, started if it does not run (a declared connector's: the caller checked)."""
        return ConnectorActor.options(name=actor_name(tenant, name), namespace=self.router.namespace,
                                      get_if_exists=True, lifetime="detached").remote(
            self.router.store_url, self.router, tenant, name, self.router.storage_options, self._reach(tenant, name),
            self._files(tenant, name))

    def _kill(self, tenant: str, name: str) -> None:
        try:
            handle = ray.get_actor(actor_name(tenant, name), namespace=self.router.namespace)
        except ValueError:
            return
        try:
            ray.get(handle.stop.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - it is killed below anyway
            log.warning("event=connector_stop_failed tenant=%s connector=%s", tenant, name)
        ray.kill(handle, no_restart=True)

    def hold(self, why: str) -> None:
        """Start no connector actor from now on, for `why`: this service lost its store to another, and a connector
        started again (by a status read: `status` starts one that is not running) would write to the store and
        connect beside the successor's. Those running still answer; one not running is `down` with `why`. Once
        this returns, no call of this object starts an actor (the caller stops those running after it). Called
        again (each fence check finds it), it returns at once: the first `why` stands, and no start waits on it."""
        if self._held is not None:  # set once, never cleared: no lock needed to see it
            return
        with self._starts:
            if self._held is None:
                self._held = _Down(math.inf, why, datetime.now(UTC))

    def _handle(self, tenant: str, name: str):
        """The connector's actor, started if it does not run (`_actor`) unless it is down (`_startable`);
        `UnknownConnector` if it is not declared (read before the lock: a store read that hangs must not hold up
        `hold`, which the store watch calls)."""
        self.store.spec_json(tenant, name)
        with self._starts:
            self._startable(tenant, name)
            return self._actor(tenant, name)

    def _ask(self, tenant: str, name: str, method: str) -> ConnectorStatus:
        """`method` of the connector's actor; `ConnectorDown` if the actor cannot start (not tried again for
        `START_RETRY_S`) or may not (`hold`); `ConnectorUnanswered` past `ANSWER_S`."""
        handle = self._handle(tenant, name)
        try:
            answer = ray.get(getattr(handle, method).remote(), timeout=ANSWER_S)
        except ray.exceptions.ActorDiedError as exc:
            raise self._failed(tenant, name, exc) from None
        except ray.exceptions.GetTimeoutError:
            raise unanswered(handle, name, f"its {method}") from None
        self._up(tenant, name)
        return answer

    def _startable(self, tenant: str, name: str) -> None:
        """`ConnectorDown` while the connector is down and not to be tried again yet: no call starts its actor
        then (one refused at start, e.g. for a client id another connector holds, would kick that one off), nor
        while this object is held (`_unheld`); `UnknownConnector` while it is being deleted (`delete`)."""
        self._not_deleting(tenant, name)
        if (down := self._down.get((tenant, name))) is not None and time.monotonic() < down.retry_at:
            raise ConnectorDown(name, down.why, down.since)
        self._unheld(tenant, name)

    def _not_deleting(self, tenant: str, name: str) -> None:
        """`UnknownConnector` while the connector's delete runs (`delete`), as once it is deleted."""
        if (tenant, name) in self._deleting:
            raise UnknownConnector(f"no connector {name!r} for tenant {tenant!r}: it is being deleted")

    def _unheld(self, tenant: str, name: str) -> None:
        """`ConnectorDown` while this object is held (`hold`) and the connector does not run: none starts then."""
        if (held := self._held) is not None and not self._running(tenant, name):
            raise ConnectorDown(name, held.why, held.since)

    def _failed(self, tenant: str, name: str,
                exc: ray.exceptions.ActorDiedError) -> ConnectorDown | UnknownConnector:
        """Record and export that the connector's actor died starting (not tried again for `START_RETRY_S`), unless
        the connector is deleted (`UnknownConnector`): an actor a read started right before a delete dies reading
        the declaration gone, after the delete cleared the connector's down state, and was marked down for good,
        its gauge set. Asked after marking it, so that a delete's clearing before the mark is not undone."""
        why = _died_because(exc)
        since = self._mark_down(tenant, name, time.monotonic() + START_RETRY_S, why, "failed")
        if self._declared(tenant, name) is None:
            self._up(tenant, name)
            return UnknownConnector(f"no connector {name!r} for tenant {tenant!r}: it was deleted while it started")
        log.error("event=connector_down tenant=%s connector=%s error=%r", tenant, name, why)
        return ConnectorDown(name, why, since)

    def _mark_down(self, tenant: str, name: str, retry_at: float, why: str, reason: str,
                   waits_for: str | None = None) -> datetime:
        """Keep the connector listed as down with `why` (`waits_for`: the client id it waits for), and export it
        (`metrics.CONNECTOR_NOT_STARTED`): no process of its own counts its down time, so without this no alert and
        no `raytwin status` would see it."""
        since = datetime.now(UTC)
        self._down[(tenant, name)] = _Down(retry_at, why, since, waits_for)
        metrics.set_not_started(f"{tenant}/{name}", reason)
        return since

    def _up(self, tenant: str, name: str) -> None:
        """The connector runs again, or is gone: no longer down."""
        if self._down.pop((tenant, name), None) is not None:
            metrics.set_not_started(f"{tenant}/{name}", None)

    def pause(self, tenant: str, name: str) -> ConnectorStatus:
        return self._ask(tenant, name, "pause")

    def resume(self, tenant: str, name: str) -> ConnectorStatus:
        return self._ask(tenant, name, "resume")

    def status(self, tenant: str, name: str) -> ConnectorStatus:
        """Its actor's status; for a declaration whose actor cannot start, a status saying why (so that it
        can still be seen among the tenant's connectors, and deleted)."""
        try:
            status = self._ask(tenant, name, "status")
        except ConnectorDown as exc:
            return self._cannot_start(tenant, name, exc)
        self._answered[(tenant, name)] = status
        return status

    def statuses(self, tenant: str, names: Sequence[str]) -> dict[str, ConnectorStatus]:
        """`status` of each of the connectors `names` still declared (one deleted meanwhile is left out), asked of
        their actors at once and waited for within one `ANSWER_S`: one that leaves it unanswered is listed
        `unanswered`, saying why. Asked one by one, each waited its own `ANSWER_S` and the first hung connector
        failed the whole listing (503)."""
        out: dict[str, ConnectorStatus] = {}
        asked: dict[str, tuple[Any, ray.ObjectRef]] = {}
        for name in names:
            try:
                handle = self._handle(tenant, name)
            except UnknownConnector:
                continue
            except ConnectorDown as exc:
                out[name] = self._cannot_start(tenant, name, exc)
            else:
                asked[name] = handle, handle.status.remote()
        refs = [ref for _, ref in asked.values()]
        answered = set(ray.wait(refs, num_returns=len(refs), timeout=ANSWER_S)[0]) if refs else set()
        for name, (handle, ref) in asked.items():
            if ref not in answered:
                why = str(unanswered(handle, name, "its status"))
                out[name] = self._not_running(tenant, name, ConnectorState.unanswered, why, datetime.now(UTC),
                                              self._answered.get((tenant, name)))
                continue
            try:
                out[name] = self._answered[(tenant, name)] = ray.get(ref)
            except ray.exceptions.ActorDiedError as exc:
                failed = self._failed(tenant, name, exc)
                if isinstance(failed, ConnectorDown):
                    out[name] = self._cannot_start(tenant, name, failed)
            else:
                self._up(tenant, name)
        return {name: out[name] for name in names if name in out}

    def _cannot_start(self, tenant: str, name: str, down: ConnectorDown) -> ConnectorStatus:
        """The status of a declared connector whose actor cannot start (`down`), saying why."""
        return self._not_running(tenant, name, ConnectorState.down, f"cannot start: {down.why}", down.since)

    def _not_running(self, tenant: str, name: str, state: ConnectorState, why: str, since: datetime,
                     last: ConnectorStatus | None = None) -> ConnectorStatus:
        """The status of a connector whose process does not answer, in `state` for `why`, so that it can still be
        seen among the tenant's connectors, and deleted: the figures of `last` (its last answered status), else
        zeros."""
        if last is not None:
            return last.model_copy(update={"state": state, "connected": False, "errors": last.errors + 1,
                                           "last_error": why, "last_error_at": since, "draining": False})
        return ConnectorStatus(
            tenant=tenant, name=name, kind=self.spec(tenant, name).kind, state=state,
            connected=False, messages=0, acknowledged=0, pending=0, accepted=0, duplicates=0, rejected=0,
            dead_lettered=0, errors=1, last_error=why, last_error_at=since,
            lag_s=None, newest_event_time=None, event_age_s=None)

    def spec(self, tenant: str, name: str) -> ConnectorSpec:
        """The declaration (never the credentials), a tenant's files by the names it gave."""
        spec = parse_spec(self.store.spec_json(tenant, name), stored=True)
        return spec if self._files(tenant, name) is None else TenantFiles.named(spec)

    def names(self, tenant: str) -> list[str]:
        return self.store.names(tenant)

    def delete(self, tenant: str, name: str, audited: Settling = unaudited_settlement) -> None:
        """Stop the connector, settle its open commands, each in `audited`'s context (`CommandLedger.settle_deleted`:
        none would ever be sent, answered or expired otherwise), remove its declaration and credentials, discard its
        session at the source and pass its client id on (`_let_go`). No call starts its actor meanwhile (`_startable`):
        an approval that did (its approver's retry) sent a command the settling read proposed, and the settling's
        record ("not sent") could land over it; nor is a command proposed through it (`propose`)."""
        spec = self.spec(tenant, name)
        credentials = self.store.credentials(tenant, name)
        with self._starts:  # a start under way has its actor by then, and it is killed below
            self._deleting.add((tenant, name))
        try:
            self._kill(tenant, name)
            self.ledger.settle_deleted(tenant, name, kind_of(spec.kind).answered_by_send, audited)
            self.store.delete(tenant, name)
        finally:
            self._deleting.discard((tenant, name))
        self._up(tenant, name)
        self._answered.pop((tenant, name), None)
        self._let_go(spec, credentials)

    def _let_go(self, spec: ConnectorSpec, credentials: Credentials | None) -> None:
        """Discard the session of `spec` (deleted, or declared again with another client id) at its source and pass
        its client id on (`_pass_on`), if it holds that id. A session that could not be discarded (the broker
        unreachable, or its `credentials` unreadable: None) stays claimed by its name: its queued messages must never
        reach a connector of another tenant that names the same client id."""
        tenant, name, key = spec.tenant, spec.name, spec.session_key()
        ours = key is None or self._claimed(key, tenant, name)
        try:
            ended = ours and credentials is not None and kind_of(spec.kind).end_session(
                self._opened(spec), credentials, self._reach(tenant, name))
        except InvalidConnector:  # its files are no longer its tenant's: it cannot connect to end the session
            ended = False
        if not ours:  # declared before client ids were claimed: ending the session would end its holder's
            log.info("event=connector_session_left tenant=%s connector=%s session=%r: held by another connector",
                     tenant, name, key)
        elif key and ended:
            self._pass_on(key, tenant, name)
        elif key:
            log.warning("event=connector_session_kept tenant=%s connector=%s session=%r: claimed until a "
                        "connector of this name is declared and deleted again with the source reachable",
                        tenant, name, key)

    def _pass_on(self, key: str, tenant: str, name: str) -> None:
        """Give up client id `key`, held by (tenant, name): to the earliest-declared connector down waiting for it,
        which holds it then (`start_waiting` starts it), or to none."""
        waiting = [d for d, down in list(self._down.items()) if down.waits_for == key and d != (tenant, name)
                   and (spec := self._declared(*d)) is not None and spec.session_key() == key]
        heir = min(waiting, key=self._declared_order, default=None)
        self.store.release(key, tenant, name, to=heir)
        if heir is not None:  # whose connectors they are is the operator's to read, never either tenant's
            log.info("event=connector_session_passed_on session=%r tenant=%s connector=%s to_tenant=%s to=%s", key,
                     tenant, name, *heir)

    def _claimed(self, key: str, tenant: str, name: str) -> bool:
        """Whether (tenant, name) holds session `key`, claiming it if no connector does."""
        try:
            self.store.claim(key, tenant, name)
        except SessionTaken:
            return False
        return True

    def _earliest_first(self) -> list[tuple[str, str]]:
        """Every stored (tenant, name), the earliest declared first: of declarations stored before client ids were
        claimed that share one, the earliest claims it (not the first by name, which a squatter could choose)."""
        declared = [(tenant, name) for tenant in self.store.tenants() for name in self.names(tenant)]
        return sorted(declared, key=self._declared_order)

    def _declared_order(self, declared: tuple[str, str]) -> tuple[float, tuple[str, str]]:
        """When (tenant, name) was declared (never: last), then its names: what orders connectors sharing an id."""
        when = self.store.declared_at(*declared)
        return (when.timestamp() if when else math.inf), declared

    def _refused(self, spec: ConnectorSpec,
                 refuse: Callable[[ConnectorSpec], str | None] | None) -> tuple[str, str | None] | None:
        """Why a stored declaration may not run, and the client id it waits for where that is why: its kind's rules
        added since it was stored (`Kind.stored_refusal`), `refuse`'s reason, or its session held by another connector
        (claimed now if no connector holds it: declarations of older versions)."""
        if why := kind_of(spec.kind).stored_refusal(spec) or (refuse(spec) if refuse is not None else None):
            return why, None
        if (key := spec.session_key()) and not self._claimed(key, spec.tenant, spec.name):
            return _waiting(key), key
        return None

    def start_declared(self, refuse: Callable[[ConnectorSpec], str | None] | None = None,
                       fence: Callable[[], str | None] = lambda: None) -> int:
        """Start the actor of every stored declaration that has none (a service started again on its store:
        connectors run without anyone asking for them, a paused one stays paused); how many it asked for.
        A declaration whose actor cannot be created is logged, not fatal: the others still start. One that its
        kind or `refuse` gives a reason for (a rule added or a policy changed since it was declared) is not started:
        it is listed as down with that reason until it is declared again or deleted. Nor is one whose session (MQTT
        client id) another connector holds (two declarations of versions that claimed none: the earlier declared keeps
        it), until that one lets the id go (`start_waiting`).

        A running actor that must not go on (`_outdated`: another reach policy or files directory than the current
        ones, or an older version's, which writes no index markers) is restarted, and every such actor is stopped
        before any is started: a new one marks its tenant's indexes complete (`CommandLedger.index`,
        `StateStore.mark_dead_letter_sources`) at its start, and what an older one wrote after that no index read
        would find. `fence` is asked right before each connector is stopped or started: why this service may start
        none (another service took its store over since it took the lease; None: it holds the store). A reason holds
        this object (`hold`) and ends the pass: nothing more is stopped (that would stop the successor's, in the same
        Ray cluster) or started, and no actor starts after `hold` returned, however it was held."""
        started: dict[tuple[str, str], ray.ObjectRef] = {}
        for tenant, name in self._stop_outdated(refuse, fence):
            try:
                self._fenced(name, fence)
                with self._starts:  # held by another thread since the check above: none starts once `hold` returned
                    self._unheld(tenant, name)
                    started[(tenant, name)] = self._actor(tenant, name).status.remote()
            except ConnectorDown as exc:
                _log_held(tenant, name, exc)
                break
            except Exception:  # noqa: BLE001 - one broken declaration must not keep the service down
                log.exception("event=connector_start_failed tenant=%s connector=%s", tenant, name)
        self._check_started(started)
        return len(started)

    def _stop_outdated(self, refuse: Callable[[ConnectorSpec], str | None] | None,
                       fence: Callable[[], str | None]) -> list[tuple[str, str]]:
        """`start_declared`'s first pass: stop the actor of each declaration refused (listed as down, `_refused`) or
        `_outdated`; the declarations to start, the earliest declared first (none once `fence` holds this object)."""
        startable = []
        for tenant, name in self._earliest_first():
            try:
                self._fenced(name, fence)
                spec = self.spec(tenant, name)
                if refused := self._refused(spec, refuse):
                    why, waits_for = refused
                    self._kill(tenant, name)  # one still running from before a backend restart, too
                    self._mark_down(tenant, name, math.inf, why, "refused", waits_for)
                    log.warning("event=connector_refused tenant=%s connector=%s reason=%r", tenant, name, why)
                    continue
                if self._outdated(tenant, name):
                    self._kill(tenant, name)
                startable.append((tenant, name))
            except ConnectorDown as exc:
                _log_held(tenant, name, exc)
                return []
            except Exception:  # noqa: BLE001 - one broken declaration must not keep the service down
                log.exception("event=connector_start_failed tenant=%s connector=%s", tenant, name)
        return startable

    def _fenced(self, name: str, fence: Callable[[], str | None]) -> None:
        """`ConnectorDown` once this object is held (`hold`), asking `fence` first while it is not: a reason holds it."""
        if self._held is None and (reason := fence()) is not None:
            self.hold(reason)
        if (held := self._held) is not None:
            raise ConnectorDown(name, held.why, held.since)

    def start_waiting(self, audited: Audited = unaudited) -> list[tuple[str, str]]:
        """Start the connectors down for a client id another connector held that hold it now: passed on to them
        when its holder let it go (`_pass_on`, in this process or another replica's), or claimed now, the earliest
        declared first, where no connector holds it (one still held is only read, every pass). Each start is audited by `audited`, its intent first: a store
        that does not take it leaves the connector down for the next pass. One another replica started is only
        no longer listed as down. The supervisor's pass: after a deletion or declaration, and every few seconds
        (`serve_apps.backend`); which connectors it started."""
        started = []
        waiting = {d: down.waits_for for d, down in list(self._down.items()) if down.waits_for}  # (a snapshot)
        for (tenant, name), key in sorted(waiting.items(), key=lambda item: self._declared_order(item[0])):
            spec = self._declared(tenant, name)
            if spec is None or spec.session_key() != key:  # deleted or declared again meanwhile (another replica)
                self._up(tenant, name)
            elif self.store.holder(key) in (None, (tenant, name)) and self._claimed(key, tenant, name):
                try:
                    if self._start_waiting(spec, audited):
                        started.append((tenant, name))
                except Exception:  # noqa: BLE001 - no intent written: still waiting, for the next pass; an actor
                    # that died starting is down as any such (`_failed`), and tried again after START_RETRY_S
                    log.exception("event=connector_start_failed tenant=%s connector=%s", tenant, name)
        return started

    def _start_waiting(self, spec: ConnectorSpec, audited: Audited) -> bool:
        """Start the connector of `spec`, which holds its client id now, unless another replica did: whether this
        call started it."""
        tenant, name = spec.tenant, spec.name
        if self._running(tenant, name):
            self._up(tenant, name)
            return False
        with audited(spec) as outcome:
            self._up(tenant, name)
            outcome["state"] = self._ask(tenant, name, "status").state.value
        log.info("event=connector_started_with_its_id tenant=%s connector=%s session=%r", tenant, name,
                 spec.session_key())
        return True

    def _running(self, tenant: str, name: str) -> bool:
        """Whether the connector's actor exists (a replica started it)."""
        try:
            ray.get_actor(actor_name(tenant, name), namespace=self.router.namespace)
        except ValueError:
            return False
        return True

    def _check_started(self, started: dict[tuple[str, str], ray.ObjectRef]) -> None:
        """Mark down the connectors whose actor died starting (their status calls, for up to `START_CHECK_S`)."""
        if not started:
            return
        ray.wait(list(started.values()), num_returns=len(started), timeout=START_CHECK_S)
        for (tenant, name), ref in started.items():
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.ActorDiedError as exc:
                self._failed(tenant, name, exc)
            except ray.exceptions.GetTimeoutError:  # still starting: the next call that asks it finds out
                pass
            except ray.exceptions.RayError as exc:  # e.g. the node lost: not fatal, the next call asks again
                log.warning("event=connector_start_unknown tenant=%s connector=%s error=%r", tenant, name, exc)
            else:
                self._up(tenant, name)

    def _outdated(self, tenant: str, name: str) -> bool:
        """Whether the connector's running actor, if any, must be restarted: it enforces another reach policy than
        `self._reach`'s, opens its files in another directory than `self._files`'s, or writes other index markers
        than this version's (`MARKERS`; an older version's, kept running across an in-place upgrade of the Serve
        application: connector actors are detached)."""
        try:
            handle = ray.get_actor(actor_name(tenant, name), namespace=self.router.namespace)
        except ValueError:
            return False  # none runs
        try:  # asked at once: one wait, not three in turn
            markers, reach, files = ray.get([handle.markers.remote(), handle.reach.remote(), handle.files.remote()],
                                            timeout=30)
        except (AttributeError, ray.exceptions.RayError):  # an older version's actor (no `markers`), or a dying one
            return True
        return markers != MARKERS or reach != self._reach(tenant, name) or files != self._files(tenant, name)

    def stop_all(self, tenant: str) -> None:
        """Stop the tenant's connector actors (declarations stay; `handle` starts them again)."""
        for name in self.names(tenant):
            self._kill(tenant, name)

    # ------------------------------------------------------------------ commands ----
    def propose(self, tenant: str, connector: str, asset_id: str, name: str, value: dict[str, Any],
                by: str, recommendation_id: str | None = None, command_id: str | None = None) -> Command:
        """Record a command for an asset this tenant's connector serves; nothing is sent before approval. None for a
        connector being deleted (`_not_deleting`): its delete settles the proposals it reads, not one made after."""
        spec = self.spec(tenant, connector)
        if self._assets and asset_id not in set(self._assets(tenant)):
            raise UnknownConnector(f"no asset {asset_id!r} for tenant {tenant!r}")
        if problem := kind_of(spec.kind).command_problem(spec, asset_id, name, value):
            raise InvalidConnector(f"command {name!r} for {asset_id}: {problem}")
        self._not_deleting(tenant, connector)  # last: a delete that begins after it may miss this proposal alone
        return self.ledger.propose(tenant, connector, asset_id, name, value, by, recommendation_id, command_id)

    def approve(self, tenant: str, command_id: str, by: str) -> Command:
        """Approve (by another key than the proposer's) and send through the connector's actor, waiting `ANSWER_S` at
        most: past it the outcome is unknown (`ConnectorUnanswered`), and the approval is never sent again by this
        call: it stays queued in the actor, which takes it at most once, and the command's history says what the
        connector did once it did."""
        command = self.ledger.get(tenant, command_id)
        try:
            handle = self._handle(tenant, command.connector)
        except UnknownConnector:  # deleted by a version that left its commands open (or while this one was read)
            raise UnknownConnector(f"no connector {command.connector!r} for tenant {tenant!r}: command {command_id} "
                                   "cannot be sent through it; refuse the command (a refusal needs no connector), "
                                   "or declare the connector again and approve it") from None
        try:
            return ray.get(handle.approve.remote(tenant, command.id, by), timeout=ANSWER_S)
        except ray.exceptions.GetTimeoutError:
            now = self.ledger.get(tenant, command_id)
            raise ConnectorUnanswered(
                f"outcome unknown: {unanswered(handle, command.connector, f'the approval of command {command_id}')}; "
                f"the command is {now.status.value} now, and the connector takes the approval at most once when it "
                "gets to it: read the command for its status before approving again, never propose it "
                "again meanwhile") from None
        except ray.exceptions.RayActorError:  # its process died: the restarted one settles the record, never resends
            now = self.ledger.get(tenant, command_id)
            if now.status is CommandStatus.proposed:  # it stopped before it took the approval: nothing was sent
                raise CommandError(f"connector {command.connector!r} stopped before it took the approval of command "
                                   f"{command_id}: nothing was sent and it is still proposed; approve it again once "
                                   "the connector is back") from None
            raise CommandError(f"outcome unknown: connector {command.connector!r} stopped while approving command "
                               f"{command_id} (it is {now.status.value}); it is never sent again: read the command "
                               "for its final status") from None

    def refuse(self, tenant: str, command_id: str, by: str, reason: str) -> Command:
        return self.ledger.refuse(tenant, command_id, by, reason)

    def commands(self, tenant: str, asset_id: str | None = None) -> list[Command]:
        return self.ledger.list(tenant, asset_id)

    def command(self, tenant: str, command_id: str) -> Command:
        return self.ledger.get(tenant, command_id)
