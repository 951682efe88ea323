"""The stateful side of the API: catalog, model registry, live twins and scenario jobs.

One replica (`num_replicas=1`) owns everything that must be consistent: catalog writes are
serialised under a lock and written through to the store (conditional writes compare and set
there), a twin is registered exactly when its asset is created, the job queue has one FIFO, and
every change is recorded in the tenant's change log (`serve_apps.changes`) before it is
acknowledged. The HTTP ingress replicas stay stateless and
autoscale; they call this deployment through a `DeploymentHandle`. The heavy work is elsewhere:
twins are Ray actors (`actors.service.TwinService` shards), scenario jobs are Ray tasks.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import math
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import ray
from ray import serve

from actors.lease import ray_cluster
from actors.retype import RetypeFailed
from actors.service import ShardUnanswered
from actors.state import TwinState, UnknownTwin
from connectors.manager import connector_tenants, stop_connector_actors
from raytwin import metrics
from raytwin.compat import IncompatibleReplay
from raytwin.contracts import Asset, AssetType, RelationshipKind, StartedFrom, TelemetryEvent
from raytwin.graph import Direction
from raytwin.logs import component_logging
from raytwin.query import Expr, Record
from raytwin.lifecycle import LifecycleError, ModelLifecycle, UnknownModel
from raytwin.registry import ModelArtifact, ModelRegistry, RegistryError
from raytwin.renewal_watch import RenewalWatch
from raytwin.sim.cpu import cpu_only
from raytwin.statestore import Lease, StoreFenced
from raytwin.storage import filesystem, remove_stale_temp_files
from serve_apps import asset_queries
from serve_apps.admission import BacklogGate
from serve_apps.asset_moves import AssetMoves
from serve_apps.audit import AuditLog
from serve_apps.bulk import BulkWork, Caller
from serve_apps.catalog import Catalog
from serve_apps.changes import ChangeLog, ChangePage
from serve_apps.conditional import Precondition
from serve_apps.config import ServeConfig
from serve_apps.connector_ops import ConnectorOps
from serve_apps.errors import Conflict, Gone, NotFound, Unprocessable, log_refusals_without_traceback, unwrap
from serve_apps.promotions import finish_interrupted_swaps
from serve_apps.evolution import TypeEvolution
from serve_apps.job_listing import JobPage, page
from serve_apps.jobs import Job, JobQueue, JobRecord, Work
from serve_apps.query_schemas import AssetGraph, BulkRequest
from serve_apps.recalibration import TenantState
from serve_apps.recalibration_jobs import RecalibrationJobs
from serve_apps.schemas import AssetPage, AssetTypePage, StoreFence
from serve_apps.shadow_conclusions import conclude_running
from serve_apps.store_errors import UNAVAILABLE_REASONS, StoreUnavailable, store_failure, unavailable
from serve_apps.shard_deadline import RETRY_AFTER_S, TwinUnavailable
from serve_apps.store_probe import BoundedRead
from serve_apps.twin_writes import TwinWrites
from serve_apps.type_models import register_published, registered
from serve_apps.type_usage import refuse_held_type, twins_running
from serve_apps.unawaited import outlived

log = logging.getLogger("raytwin.serve.backend")
FENCE_CHECK_S = 1.0
"""How long a read of the store's lease answers `Backend.check_writable` (one small file read per second at most)."""
FENCE_READ_S = 5.0
"""The longest a write waits for the store's lease before it is refused (503 `store_unavailable`): a hung S3."""
RENEWAL_STALL_S = 15.0
"""Health says the store takes no writes once the shards' lease heartbeat (rewritten every 2 s) stayed the same
this long between two probes: several renewals failed (a full disk, a read-only store) or every shard is down."""
NO_WRITES = ("the store takes no writes (a full disk, a read-only or unwritable store: the shards log "
             "event=lease_heartbeat_failed with the error)")
FENCE_WATCH_S = 5.0
"""How often the backend reads the lease to stop its connectors once another cluster's service holds the store."""
CONNECTOR_CHANGES_S = 1.0
"""How often the backend records the twin changes its tenants' connectors made: their readings reach the shards
without an ingest call of this backend, which records telemetry's (`Backend._record_connector_changes`)."""
CONNECTOR_TENANTS_S = 10.0
"""How often the backend asks Ray's GCS which tenants have a connector actor (`connector_tenants`, a listing of every
named actor): the pass every `CONNECTOR_CHANGES_S` reads the shards of the tenants last found, and a service with no
connector asks its shards nothing."""
SHADOW_CONCLUDE_S = 2.0
"""How often the backend looks for finished shadow evaluations to record: a question to each shard."""
TEMP_SWEEP_S = 6 * 3600.0
"""How often the backend removes the hidden files that writers killed before their rename left on a local store
(`_sweep_temp_files`), besides at its start: the shards restart without it."""
LIFECYCLE_AUDIT_S = 240.0
"""How often every model's whole lifecycle log is verified (`_audit_lifecycles`): an edit to an older record is
reported within this long (plus one audit's run). Under `raytwin.lifecycle.FULL_VERIFY_S`, so that the backend's
requests (asset creates and updates, type deletes) check only the records appended since (`ModelLifecycle.current`)
and none of them pays for a whole verify."""


def holds(now: Lease | None, mine: Lease) -> bool:
    """Whether the store's lease as read (`now`) is still `mine`: not taken over, not released."""
    return now is not None and not now.released and now.fence == mine.fence


def fence_of(now: Lease | None, mine: Lease) -> StoreFence | None:
    """Why `mine` no longer holds the store whose lease reads `now` (None while it does): one small file read
    and no shard call, so that health reports a fenced service at once, where each of its writes fails (503
    `store_fenced`)."""
    if holds(now, mine):
        return None
    if now is None or now.released:
        return StoreFence(reason=f"this service's lease on its store (epoch {mine.epoch}) was released: its writes "
                                 "are refused; restart it (`raytwin serve` on the store)")
    return StoreFence(reason=f"service {now.owner} (epoch {now.epoch}) took the store over from this service "
                             f"(epoch {mine.epoch}): its writes are refused; send requests to that service, or "
                             "restart this one on the store once that one stopped",
                      holder=now.owner, epoch=now.epoch, acquired_at=now.acquired_at, acquired_by=now.acquired_by)


def held_by(held: Lease | None, fence: StoreFence | None) -> str | None:
    """Why no connector may start once the store's lease reads `held`, which fences this service by `fence`
    (`fence_of`; None: they may): another service holds the store, or this service's lease was released. No lease
    found holds nothing: maybe a read that missed it, not known to be for good (nor does a read that failed, which
    raises before this)."""
    if fence is None or held is None:
        return None
    return "this service no longer holds its store, so it starts no connector: " + fence.reason


def _type_of(model_ref: str) -> tuple[str, str]:
    """(type name, type version) of a model reference ``name@version`` (empty strings where it has none)."""
    type_name, _, type_version = model_ref.partition("@")
    return type_name, type_version


def _twin_change(s: TwinState) -> dict[str, Any]:
    """The fields every change about a twin carries."""
    type_name, type_version = _type_of(s.model_ref)
    return {"asset_id": s.asset_id, "type_name": type_name, "type_version": type_version, "revision": s.revision}


def _drift_change(s: TwinState) -> dict[str, Any]:
    """`twin.drift`: the twin's drift flag was raised or cleared."""
    d = s.divergence
    return {**_twin_change(s), "kind": "twin.drift",
            "data": {"drift": d.drift, "diverged": d.diverged, "nis_mean": d.nis_mean, "nis_last": d.nis_last,
                     "drift_score": d.drift_score, "event_time": s.event_time.isoformat() if s.event_time else None}}


class Backend:
    _watch_stop: threading.Event | None = None
    """Set to end the store watch (`close`); None: no watch was started."""

    def __init__(self, config: ServeConfig):
        from actors.service import TwinService

        component_logging()
        log_refusals_without_traceback()  # a refusal raised to Serve is one line, not a traceback a tenant repeats
        self.config = config
        self.catalog = Catalog(config.store_url, config.storage_options)
        self.twins = TwinService(config.url("twins"), shards=config.twin_shards,
                                 namespace=config.namespace, storage_options=config.storage_options or None,
                                 lease_wait_s=config.store_lease_wait_s, own_shards=True)
        # once: this process re-records it (`raytwin.metrics`)
        metrics.SHARDS_CONFIGURED.set(config.twin_shards, **config.service_tags())
        self.changes = self._change_log()
        self.jobs = JobQueue(config, config.max_concurrent_jobs, on_finish=self._job_finished,
                             fence=self.check_writable)
        self._started = datetime.now(UTC)  # jobs that ended before (a restart failed some) are `_catch_up_jobs`'
        self.audit = AuditLog(config.store_url, config.storage_options)  # bulk jobs audit each item
        self._lease_reads = BoundedRead(self.twins.store.read_lease, "the store's lease")  # probes: a deadline
        self.connector_ops = ConnectorOps(self.twins, config.connectors, config.connector_tls_dir,
                                          config.connector_hosts, self.audit, self._connector_fence)
        self.type_evolution = TypeEvolution(self)
        self._lock = threading.Lock()  # the catalog's; never held while a shard is waited for
        self._twin_writes = TwinWrites()  # one backend write per twin, each within its deadline
        self._publish = threading.Lock()
        self._fence: StoreFence | None = None
        self._fence_checked = -math.inf  # when the lease was last read (`check_writable`)
        for tenant in {*self.catalog.tenants(), *(t for t, _, _ in self.catalog.tombstones)}:  # first of all appends,
            record_lost_catalog_changes(self.changes, self.catalog, tenant,  # once the log's fence can be read
                                        self._unregister_deleted)
        self._beat_reads = BoundedRead(self.twins.store.read_heartbeat, "the store's lease heartbeat")
        self._renewals = RenewalWatch(RENEWAL_STALL_S)
        self._concluded: set[str] = set()  # the shadow evaluations recorded (run ids; `_conclude_shadows`)
        self._start_store_watch()
        threading.Thread(target=self._sweep_temp_files, name="temp-sweep", daemon=True).start()
        self._twin_marks: dict[tuple[str, str], tuple[int, bool]] = {}  # last published (revision, drift)
        self._applying: Counter[tuple[str, str]] = Counter()  # twins an API batch is applied to now (`apply`)
        self._registries: dict[str, ModelRegistry] = {}
        threading.Thread(target=self._conclude_shadows, name="shadow-conclusions", daemon=True).start()
        threading.Thread(target=self._audit_lifecycles, name="lifecycle-audit", daemon=True).start()
        self.backlog = BacklogGate(config.admission.telemetry_backlog_events, config.admission.retry_after_s)
        self.recalibration = RecalibrationJobs(config, self.twins, self.changes, self.audit, self.check_writable)
        for tenant in self.catalog.tenants():  # relaunch what a restart interrupted; act on what it missed
            try:
                self.recalibration.trigger.resume(tenant)
            except Exception:  # noqa: BLE001 - one tenant's trigger state must not keep every tenant's API down
                log.exception("event=recalibration_resume_failed tenant=%s", tenant)
            try:  # a promotion recorded before a crash whose swap of the twins was not
                finish_interrupted_swaps(ModelLifecycle(self._registry(tenant)), self.twins.models, tenant, self.audit,
                                         config.shard_read_timeout_s)
            except Exception:  # noqa: BLE001 - the API serves meanwhile; the next start tries again
                log.exception("event=interrupted_swaps_unfinished tenant=%s", tenant)
        self.moves = AssetMoves(self)  # twins moved to a type version their catalog write did not follow
        self.moves.settle_all()
        threading.Thread(target=self._follow_changes, args=(sorted({*self.catalog.tenants(), *self.jobs.listed}),),
                         name="change-catch-up", daemon=True).start()

    def _change_log(self) -> ChangeLog:
        """The service's change log, fenced as its other writes are (`check_writable`): a service that lost its store
        appending beside the successor's log would number changes twice and report what is the successor's."""
        c = self.config
        return ChangeLog(c.url("changes"), c.storage_options, memory=c.change_memory, retention_s=c.change_retention_s,
                         fence=self.check_writable, epoch=self.twins.lease.epoch)

    def _registry(self, tenant: str) -> ModelRegistry:
        if tenant not in self._registries:
            self._registries[tenant] = ModelRegistry(self.config.url("registry", tenant),
                                                     self.config.storage_options or None)
        return self._registries[tenant]

    def _artifact(self, tenant: str, asset: Asset) -> ModelArtifact:
        """The model of the asset's type version, read from the registry (no copy kept: a version that retention
        removed, from the Ingress replica's process, must not be found here)."""
        return registered(self._registry(tenant), f"{asset.type_name}@{asset.type_version}")

    # ---- asset types -------------------------------------------------------------------
    def put_type(self, tenant: str, asset_type: AssetType, pre: Precondition, published_by: str) -> tuple[bool, int]:
        """Store the type and register its model (its default parameters, `published_by` the key: the four-eyes
        rule keeps it from approving its own content) as ``name@version``; (created, revision). All or nothing:
        an FMU outside the tenant's registry, or a version the registry holds as another model (409,
        `serve_apps.type_models`), is refused before anything is written.

        The order, catalog checks, registry, catalog: the catalog's checks (412, 409, 422) come first so that a
        refused type leaves no registry version behind, and the model is registered before the catalog (and the
        change log) names the version, so no twin is created on a version whose model is not the type's. A crash
        between the two leaves a registered model that nothing names; the same POST again finds that model
        there, takes it as it is and writes the catalog."""
        self.check_writable()
        try:
            self._registry(tenant).check_fmu_store(asset_type.key, asset_type.simulator)
            asset_type.check_units()
        except (RegistryError, ValueError) as exc:
            raise Unprocessable(str(unwrap(exc))) from None
        with self._lock:
            if self.catalog.check_type(tenant, asset_type, pre):  # outside the log's lock: a model check takes seconds
                register_published(self._registry(tenant), asset_type, published_by)

            def write(seq: int) -> list[dict[str, Any]]:
                if not self.catalog.put_type(tenant, asset_type, seq, pre):
                    return []
                return [_type_change("asset_type.created", asset_type)]

            created = bool(self.changes.write(tenant, write))
            return created, self.catalog.revision(tenant, "types", asset_type.key)

    def get_type(self, tenant: str, name: str, version: str) -> tuple[AssetType, int]:
        """The type and its revision."""
        with self._lock:
            t = self.catalog.get_type(tenant, name, version)
            return t, self.catalog.revision(tenant, "types", t.key)

    def list_types(self, tenant: str, name: str | None) -> list[AssetType]:
        with self._lock:
            return self.catalog.list_types(tenant, name)

    def page_types(self, tenant: str, name: str | None, limit: int, cursor: str | None) -> AssetTypePage:
        """A page of the tenant's types (`serve_apps.listing`)."""
        with self._lock:
            types, next_cursor = self.catalog.page_types(tenant, name, limit, cursor)
        return AssetTypePage(asset_types=types, next_cursor=next_cursor)

    def delete_type(self, tenant: str, name: str, version: str, pre: Precondition) -> None:
        """Delete a type version nothing uses: refused (409) while assets name it (the catalog), while the model
        lifecycle needs it or twins hot-swapped to it run it (`serve_apps.type_usage`), each with what to do. A retry
        of a delete cut short (its change's log write or its tombstone's removal failed) finishes that delete first
        (`_flush_pending_delete`), then answers 404 as any delete of no type."""
        self.check_writable()
        with self._lock:
            if self._flush_pending_delete(tenant, "types", f"{name}@{version}"):
                self._forget_deleted(tenant, "types", f"{name}@{version}")
            self.catalog.check_delete_type(tenant, name, version, pre)  # 412, 404, 409 before the shards are asked
        running = twins_running(self.twins.models, tenant, f"{name}@{version}", self.config.shard_read_timeout_s)
        with self._lock:  # what may have changed while the shards answered, checked again where the delete is
            self.catalog.check_delete_type(tenant, name, version, pre)
            refuse_held_type(ModelLifecycle(self._registry(tenant)), running, name, version)
            self.changes.write(tenant, lambda seq: [
                _type_change("asset_type.deleted", self.catalog.delete_type(tenant, name, version, seq, pre))])
            self._forget_deleted(tenant, "types", f"{name}@{version}")

    # ---- assets ------------------------------------------------------------------------
    def create_asset(self, asset: Asset, initial_state: dict[str, float] | None, pre: Precondition) -> int:
        """Create the asset and register its twin; its revision. A delete of its id left unfinished is finished first
        (`_finish_pending_asset_delete`): the new twin would otherwise attach to the deleted one, state and all.

        The asset is recorded first, then its twin registered (outside the catalog's lock, `serve_apps.twin_writes`):
        a registration the shard refuses deletes the asset again (`_undo_create`); one it leaves unanswered past
        `shard_create_timeout_s` is 503, outcome unknown, and the asset stays: deleted once the shard answers only if
        it refused the twin, so that neither is ever left without the other."""
        self.check_writable()
        timeout_s = self.config.shard_create_timeout_s
        with self._twin_writes.one(asset.tenant, asset.id, timeout_s):
            self._finish_pending_asset_delete(asset.tenant, asset.id)
            with self._lock:
                self._require_production(asset)
                checked: list[ModelArtifact] = []  # the model, once the twin's registration is known to fit it

                def write(seq: int) -> list[dict[str, Any]]:
                    asset_type = self.catalog.create_asset(asset, seq, pre)
                    try:
                        if initial_state is not None and set(initial_state) != set(asset_type.states):
                            raise Unprocessable(f"initial_state must give exactly {sorted(asset_type.states)} "
                                                f"(got {sorted(initial_state)})")
                        checked.append(self._checked_artifact(asset, initial_state))
                    except Exception:
                        self.catalog.delete_asset(asset.tenant, asset.id, None)
                        raise
                    return [_asset_change("asset.created", asset)]

                (change,) = self.changes.write(asset.tenant, write)

            def refused(outcome: Future) -> None:
                if outcome.exception() is not None:
                    self._undo_create(asset)

            try:
                self._twin_writes.wait(
                    asset.tenant, asset.id,
                    lambda: self.twins.register(asset, checked[0], initial_state=initial_state, timeout_s=timeout_s),
                    f"GET /v1/assets/{asset.id} before creating it again: the asset stays once its twin registers, and "
                    "is deleted (asset.deleted) if the shard refuses the twin", refused)
            except TwinUnavailable:
                raise
            except Exception:  # no asset without its twin
                self._undo_create(asset)
                raise
            return change.seq

    def _undo_create(self, asset: Asset) -> None:
        """Delete the asset just created (recorded: `asset.deleted`), its twin refused by the shard."""
        with self._lock:
            self.changes.write(asset.tenant, lambda seq: [
                _asset_change("asset.deleted", self.catalog.delete_asset(asset.tenant, asset.id, seq))])
            self._forget_deleted(asset.tenant, "assets", asset.id)

    def update_asset(self, asset: Asset, pre: Precondition) -> int:
        """Replace the asset if `pre` holds (compare-and-set under the lock); its new revision.

        Another type version retypes its twin (`TwinService.retype`, all or nothing) after every check of the
        write and before it: a twin that cannot move (a history that does not replay on the version: 422; a
        replay that fails: 409) leaves the asset and its twin as they were, and nothing is recorded. Why not the
        catalog first: it then named a version the twin did not run, and a PUT sent again saw no change of
        version and never moved the twin. The move is journaled before the twin moves (`serve_apps.asset_moves`):
        a failed catalog write after it (a store error, a crash) is finished at the backend's start or before the
        asset's next read or write, and the same PUT again finishes it too (the retype is then a no-op). The twin's
        move is waited for outside the catalog's lock, `shard_create_timeout_s` at most (`_retype_twin`)."""
        self.check_writable()
        with self._twin_writes.one(asset.tenant, asset.id, self.config.shard_create_timeout_s):
            with self._lock:
                self.moves.settle(asset.tenant, asset.id)  # a move left unrecorded first: this write comes after it
                self.type_evolution.require_version(asset.tenant, [asset.type_name], asset.type_version)
                try:
                    current: Asset | None = self.catalog.get_asset(asset.tenant, asset.id)
                except NotFound:  # the write answers for it (404, or 412 under If-Match)
                    current = None
                retype = current is not None and (current.type_name, current.type_version) != (asset.type_name,
                                                                                              asset.type_version)
                if retype:
                    self._require_production(asset)
                artifact = self._checked_artifact(asset, None)  # metadata the twin would refuse: 422, nothing changed
                if retype:
                    self.catalog.check_update(asset, pre)  # 404, 412 or 422 before the twin moves
                    self.moves.begin(asset, "retype")
            if retype:
                self._retype_twin(asset, artifact)

            def write(seq: int) -> list[dict[str, Any]]:
                self.catalog.update_asset(asset, seq, pre)
                return [_asset_change("asset.updated", asset)]

            with self._lock:
                try:
                    (change,) = self.changes.write(asset.tenant, write)
                except Exception:
                    if retype:
                        log.error("event=retype_not_recorded tenant=%s asset=%s type_version=%s: the twin runs the "
                                  "new version, the catalog still names %s; recorded at the backend's start or before "
                                  "the asset's next read or write", asset.tenant, asset.id, asset.type_version,
                                  current.type_version, exc_info=True)
                    raise
                self.moves.end(asset.tenant, asset.id)
                return change.seq

    def _retype_twin(self, asset: Asset, artifact: ModelArtifact) -> None:
        """The twin on `asset`'s type version (`TwinService.retype`), its refusals as the API's errors (the journaled
        move dropped: nothing moved; any other error leaves it journaled, the twin may have moved). Left unanswered
        past `shard_create_timeout_s`: 503, outcome unknown, the move journaled and settled once the shard answers
        (written to the catalog if the twin moved, dropped if not)."""
        tenant, asset_id = asset.tenant, asset.id
        try:
            self._twin_writes.wait(
                tenant, asset_id, lambda: self.twins.retype(asset, artifact, self.config.shard_create_timeout_s),
                f"GET /v1/assets/{asset_id} before sending the change again: its type_version says whether the twin "
                "moved (written there once the shard answers)", functools.partial(self._settle_late_move, tenant,
                                                                                 asset_id))
        except (IncompatibleReplay, RetypeFailed) as exc:
            with self._lock:
                self.moves.end(tenant, asset_id)
            if isinstance(exc, IncompatibleReplay):
                raise Unprocessable(exc.explain(f"POST /v1/assets/{asset_id}/migrate"),
                                    details=[{"where": d.where, "change": d.change} for d in exc.differences]) from None
            raise Conflict(str(unwrap(exc))) from None

    def _settle_late_move(self, tenant: str, asset_id: str, _: Future) -> None:
        """Settle the journaled move of an asset whose twin's shard answered its move late (`TwinWrites.wait`):
        written to the catalog if the twin moved, dropped if not (`serve_apps.asset_moves`)."""
        with self._lock:
            self.moves.settle(tenant, asset_id)

    def _require_production(self, asset: Asset) -> None:
        """`Conflict` unless the asset's version may run on a new twin: once its model has a production
        version, only that one; once that version was archived and none replaced it, none (an approver promotes
        one first); before the first promotion (bootstrap), any version that is not archived. Promotion swaps a
        model's twins to production; a twin created on (or moved to) a candidate nobody approved, or an
        archived version, would run what no approver let run."""
        try:
            state = ModelLifecycle(self._registry(asset.tenant)).current(asset.type_name)
        except UnknownModel:  # no model of the type's name: the catalog and the registry answer (404) for its type
            return
        except LifecycleError as exc:  # a broken transition log: which version may run is unknown
            raise Conflict(str(unwrap(exc))) from None
        name, version, production = asset.type_name, asset.type_version, state.production
        if production is not None and production != version:
            raise Conflict(
                f"{name}@{version} is not the production version of model {name} ({production}), and twins of a "
                f"model under the lifecycle run its production version: use type_version {production!r}, or "
                f"promote {version} first")
        if production is None and state.had_production:
            raise Conflict(
                f"model {name} has no production version (the last one was archived), and twins of a model under "
                f"the lifecycle run its production version: an approver promotes a version first (POST "
                f"/v1/models/{name}/versions/{{version}}/transitions with \"to\": \"production\")")
        if (known := state.versions.get(version)) is not None and known.stage == "archived":
            raise Conflict(f"{name}@{version} is archived, and an archived version runs on no new twin: use a "
                           f"candidate or staging version of {name}, or register a new version")

    def _checked_artifact(self, asset: Asset, initial_state: dict[str, float] | None) -> ModelArtifact:
        """The asset's model, once its twin's registration is known to fit it: a filter name, noise
        metadata or prior the model refuses is the client's to fix (422), found before anything changes."""
        from actors.recovery import RegistrationError, check_registration

        artifact = self._artifact(asset.tenant, asset)
        try:
            check_registration(asset, artifact, initial_state, None)
        except RegistrationError as exc:
            raise Unprocessable(str(unwrap(exc))) from None
        return artifact

    def get_asset(self, tenant: str, asset_id: str) -> Asset:
        with self._lock:
            self._settle_move(tenant, asset_id)
            return self.catalog.get_asset(tenant, asset_id)

    def get_asset_revision(self, tenant: str, asset_id: str) -> tuple[Asset, int]:
        """The asset and its revision (its ETag); a journaled move of it settled first (`serve_apps.asset_moves`)."""
        with self._lock:
            self._settle_move(tenant, asset_id)
            return self.catalog.get_asset(tenant, asset_id), self.catalog.revision(tenant, "assets", asset_id)

    def _settle_move(self, tenant: str, asset_id: str) -> None:
        """A read's settling of a journaled move of the asset (under the lock), unless a write of its twin runs or is
        left unanswered (`TwinWrites.idle`): that move may still land, and is settled by its own write."""
        if self._twin_writes.idle(tenant, asset_id):
            self.moves.try_settle(tenant, asset_id)

    def list_assets(self, tenant: str, type_name: str | None, type_version: str | None, related_to: str | None,
                    relationship: RelationshipKind | None) -> list[Asset]:
        with self._lock:
            return self.catalog.list_assets(tenant, type_name, type_version, related_to, relationship)

    def page_assets(self, tenant: str, type_name: str | None, type_version: str | None, related_to: str | None,
                    relationship: RelationshipKind | None, limit: int, cursor: str | None) -> AssetPage:
        """A page of `list_assets` (`serve_apps.listing`)."""
        with self._lock:
            assets, next_cursor = self.catalog.page_assets(tenant, type_name, type_version, related_to, relationship,
                                                           limit, cursor)
        return AssetPage(assets=assets, next_cursor=next_cursor)

    # ---- queries (serve_apps/asset_queries.py) ---------------------------------------------
    def query_candidates(self, tenant: str, expr: Expr, reads: list[tuple[str, str]]) -> list[Record]:
        """The catalog pass, after checking the state names the query `reads` against the tenant's types."""
        with self._lock:
            asset_queries.check_state_names(self.catalog, tenant, expr, reads)
            return asset_queries.candidates(self.catalog, tenant, expr)

    def asset_graph(self, tenant: str, asset_id: str, direction: Direction, kinds: list[str],
                    depth: int) -> AssetGraph:
        with self._lock:
            return asset_queries.graph(self.catalog, tenant, asset_id, direction, kinds, depth)

    def query_cursor_secret(self) -> bytes:
        return asset_queries.cursor_secret(self.config.store_url, self.config.storage_options)

    def delete_asset(self, tenant: str, asset_id: str, pre: Precondition) -> None:
        """Delete the asset and unregister its twin. A retry of a delete whose unregister failed finishes that delete
        first (`_finish_pending_asset_delete`), then answers 404 as any delete of no asset."""
        self.check_writable()
        with self._twin_writes.one(tenant, asset_id, self.config.shard_write_timeout_s):
            self._finish_pending_asset_delete(tenant, asset_id)
            with self._lock:
                self.changes.write(tenant, lambda seq: [
                    _asset_change("asset.deleted", self.catalog.delete_asset(tenant, asset_id, seq, pre))])
            self._finish_asset_delete(tenant, asset_id)

    def _flush_pending_delete(self, tenant: str, kind: str, key: str) -> bool:
        """Whether a delete of the asset or type (`kind` "assets" or "types") is unfinished, as its tombstone shows (its
        change's log write, an asset twin's unregister or the tombstone's removal failed: the client got the error or
        a success with the tombstone kept); its change written to the log first (a write of it that failed): without
        the tombstone, a crash after would leave nothing to record it from. The caller, holding the lock, finishes it
        rather than leave it until the next backend's start."""
        if (tenant, kind, key) not in self.catalog.tombstones:
            return False
        self.changes.flush([tenant])
        return True

    def _finish_pending_asset_delete(self, tenant: str, asset_id: str) -> None:
        """`_flush_pending_delete` of the asset, then `_finish_asset_delete` (its twin waited for outside the lock)."""
        with self._lock:
            pending = self._flush_pending_delete(tenant, "assets", asset_id)
        if pending:
            self._finish_asset_delete(tenant, asset_id)

    def _finish_asset_delete(self, tenant: str, asset_id: str) -> None:
        """What follows a recorded asset delete: its twin unregistered (`shard_write_timeout_s` at most, outside the
        lock), then `_twin_stopped`; a failed unregister raises and keeps the tombstone for a retry or the next
        backend's start. One left unanswered is 503 (`serve_apps.twin_writes`), the rest done once the shard answers."""
        def stopped(outcome: Future) -> None:
            if outcome.exception() is None:  # (a twin it did not find is gone too)
                self._twin_stopped(tenant, asset_id)

        self._twin_writes.wait(tenant, asset_id, lambda: self._unregister_deleted(tenant, asset_id),
                               "the asset is deleted (recorded); its twin stops once the shard answers, and a DELETE "
                               "then answers 404", stopped)
        self._twin_stopped(tenant, asset_id)

    def _twin_stopped(self, tenant: str, asset_id: str) -> None:
        """The end of an asset delete once its twin is gone: its tombstone removed, its move and twin marks dropped."""
        with self._lock:
            self._forget_deleted(tenant, "assets", asset_id)  # after the twin: a crash before, the next start ends it
            self.moves.end(tenant, asset_id)  # a move of it left unrecorded is moot
        with self._publish:
            self._twin_marks.pop((tenant, asset_id), None)

    def _unregister_deleted(self, tenant: str, asset_id: str) -> None:
        """Unregister the twin of a deleted asset, if it is still registered, within `shard_write_timeout_s`
        (`ShardUnanswered` past it): the delete is done (its tombstone and change written) and answered as such when
        no twin is found, as after a shard killed mid-`unregister`, whose call Ray resent to the restarted shard, or a
        crash that cut a delete short (`record_lost_catalog_changes`)."""
        with suppress(UnknownTwin):
            self.twins.unregister(tenant, asset_id, self.config.shard_write_timeout_s)

    def _forget_deleted(self, tenant: str, kind: str, key: str) -> None:
        """Remove a delete's tombstone once its change is recorded and its twin unregistered
        (`Catalog.forget_deleted`); a failure is logged only: the delete is done and recorded, and its tombstone, kept,
        is removed by a retry of the delete (`_flush_pending_delete`) or the next backend's start."""
        try:
            self.catalog.forget_deleted(tenant, kind, key)
        except Exception as exc:  # noqa: BLE001 - answered as the delete it is; cleaned at the next start
            log.warning("event=catalog_tombstone_kept tenant=%s %s=%s error=%s: %s", tenant, kind, key,
                        type(exc).__name__, exc)

    # ---- change log -------------------------------------------------------------------
    def change_heads(self, tenants: list[str]) -> dict[str, int]:
        return self.changes.heads(tenants)

    def changes_after(self, tenant: str, after: int, limit: int) -> ChangePage:
        """From memory only: streams read older changes from the store themselves."""
        return self.changes.read(tenant, after, limit)

    def _job_finished(self, job: JobRecord) -> None:
        """Record the job's change; refused once another service holds the store (the log's fence): that service's
        start failed the job in its record (the queue saves no end once fenced), and its catch-up records that
        (`_catch_up_jobs`)."""
        try:
            self.changes.record(job.tenant, [_job_change(job)])
        except StoreFenced as exc:
            log.warning("event=job_change_held job_id=%s tenant=%s state=%s: %s", job.job_id, job.tenant, job.state,
                        exc)

    def type_of(self, tenant: str, asset_id: str) -> AssetType:
        """The asset's type, from the catalog (for validating telemetry): no registry read, so that telemetry neither
        waits on a store that hangs nor pays three store reads per request before the shard's breaker answers."""
        asset = self.get_asset(tenant, asset_id)
        with self._lock:
            return self.catalog.get_type(tenant, asset.type_name, asset.type_version)

    def model_of(self, tenant: str, asset_id: str, model_ref: str) -> ModelArtifact:
        """The registered model `model_ref` of the asset (what its twin runs, for scenarios: a promotion swaps it);
        410 if retention removed it (`_refuse_if_pruned`)."""
        self.get_asset(tenant, asset_id)  # 404 for unknown and other tenants' assets
        try:
            return registered(self._registry(tenant), model_ref)
        except RegistryError:
            self._refuse_if_pruned(tenant, asset_id, model_ref)
            raise

    def _refuse_if_pruned(self, tenant: str, asset_id: str, model_ref: str) -> None:
        """410 naming the retention that removed `model_ref`, a version the twin ran (in a store pruned by a
        version of RayTwin whose retention did not keep the versions twins' history needs): what runs from
        that time need is gone for good, which a retry never changes."""
        removed = ModelLifecycle(self._registry(tenant)).removal(model_ref)
        if removed is not None:
            raise Gone(f"{model_ref}, the model twin {asset_id} ran at that time, was removed by retention (model "
                       f"prune by {removed.actor} at {removed.time.isoformat(timespec='seconds')}) and cannot run "
                       "again: start from a later start_time that the twin's current model applied, or give an "
                       "explicit start_state (it runs the current model)")

    # ---- twins ---------------------------------------------------------------------------
    async def ingest(self, tenant: str, events: list[TelemetryEvent]) -> dict[str, Any]:
        """`apply`, admitted by the backlog bound first (429 `Backlogged`, nothing accepted). Async so that
        admission runs on arrival, not when a thread of Serve's pool frees up."""
        release = self.backlog.reserve(len(events))
        work = asyncio.ensure_future(asyncio.to_thread(self.apply, tenant, events))
        work.add_done_callback(lambda _: release())
        # a caller that goes away does not stop accepted events being applied, nor hears of their failure: logged
        return await outlived(work, f"applying {len(events)} accepted events of tenant {tenant}", logging.ERROR)

    def apply(self, tenant: str, events: list[TelemetryEvent]) -> dict[str, Any]:
        """Apply events, then record the new state (and a flipped drift flag) of each twin they changed; refused
        first (503) while too many of the tenant's changes wait for a failed write (`ChangeLog.check_room`)."""
        self.changes.check_room(tenant)
        assets = sorted({e.asset_id for e in events})
        for asset_id in assets:
            if (tenant, asset_id) not in self._twin_marks:  # first write since start: what was the drift flag?
                self._mark(tenant, asset_id)
        applying = Counter((tenant, asset_id) for asset_id in assets)
        with self._publish:
            self._applying += applying
        try:
            report = self.twins.ingest(tenant, events, states=True)
            if report.states:
                self._publish_twins(tenant, report.states)
            else:  # a resend of duplicates: a change a failed write kept is written now, if the store takes it
                self._flush_changes([tenant])
        finally:
            with self._publish:
                self._applying -= applying
        return report.model_dump(mode="json", exclude={"states"})

    def _flush_changes(self, tenants: list[str] | None = None) -> None:
        """Write the changes whose write failed (`ChangeLog.flush`); a failure is logged, retried later; none once
        fenced."""
        if not self.changes.unwritten():
            return
        try:
            self.changes.flush(tenants)
        except StoreFenced:  # never written here: the successor's catch-up records them (the fence watch logs it)
            return
        except Exception as exc:  # noqa: BLE001 - the store still fails: the next append or pass tries again
            log.warning("event=change_flush_failed error=%s: %s", type(exc).__name__, exc)

    def clear_drift(self, tenant: str, asset_id: str) -> dict[str, Any]:
        """Clear the twin's drift alarm (durably, `actors.service.TwinService.clear_drift`) and record
        `twin.drift` when the flag fell; the state keeps its revision (no event was applied)."""
        self.get_asset(tenant, asset_id)  # 404 for unknown and other tenants' assets
        if (tenant, asset_id) not in self._twin_marks:
            self._mark(tenant, asset_id, timeout_s=self.config.shard_read_timeout_s)
        timeout_s = self.config.shard_write_timeout_s

        def cleared(outcome: Future) -> None:  # past the deadline: its change recorded once the shard answers
            if outcome.exception() is None and (late := outcome.result()) is not None:
                self._record_clear(tenant, asset_id, late)

        with self._twin_writes.one(tenant, asset_id, timeout_s):
            try:
                s = self._twin_writes.wait(
                    tenant, asset_id, lambda: self.twins.clear_drift(tenant, asset_id, timeout_s),
                    "GET the twin's divergence: its drift flag says whether the clear was applied", cleared)
            except UnknownTwin:
                raise NotFound(f"asset {asset_id} has no live twin") from None
        self._record_clear(tenant, asset_id, s)
        return s.model_dump(mode="json")

    def _record_clear(self, tenant: str, asset_id: str, s: TwinState) -> None:
        """Record `twin.drift` for a drift clear that lowered the twin's flag (state `s`, after the clear)."""
        with self._publish:
            revision, drift = self._twin_marks.get((tenant, asset_id), (-1, False))
            queued = None
            if drift and not s.divergence.drift and s.revision >= revision:
                queued = self.changes.submit(tenant, [_drift_change(s)])
                self._twin_marks[(tenant, asset_id)] = (s.revision, False)
        if queued is not None:
            self.changes.commit(tenant, queued)

    def _mark(self, tenant: str, asset_id: str, live: TwinState | None = None,
              timeout_s: float | None = None) -> None:
        """Start the twin's mark, which its changes are published relative to, at what the change log last recorded
        of it (`ChangeLog.recorded_mark`). At its current state (`live`, read if not given) for a log from before the
        recorded marks, assumed recorded; and for a state older than its log (a store copied file by file, its log
        newer than its twins' snapshots), whose next batches would otherwise be taken as old ones and dropped. The
        read waits `timeout_s` at most (503 `TwinUnavailable` past it, nothing done); None (telemetry's `apply`):
        as long as the batch's ingest after it does, so that a batch its hung shard answers late is still applied
        then (the Ingress has answered 503 by its deadline: resending telemetry is safe)."""
        recorded = self.changes.recorded_mark(tenant, asset_id)
        if live is None:
            try:
                live = self.twins.state(tenant, asset_id, timeout_s)
            except UnknownTwin:
                return
            except ray.exceptions.GetTimeoutError:  # a hung shard: the write that needs the mark is refused
                raise TwinUnavailable(f"the shard holding twin {asset_id} left the read of its state unanswered within "
                                      f"{timeout_s:g} s (a hung or stalled process; other twins are unaffected): "
                                      f"nothing was done; retry after {RETRY_AFTER_S} s",
                                      headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        if recorded is None or (live.revision < recorded[0] and not live.stale):
            recorded = (live.revision, live.divergence.drift)
        self._twin_marks.setdefault((tenant, asset_id), recorded)

    def _catch_up_changes(self, tenants: list[str], jobs_done: set[str]) -> list[str]:
        """`_catch_up_jobs` (unless in `jobs_done`, which it adds to) then `_catch_up` each tenant once; returns the
        tenants that failed, which `_follow_changes` tries again (a twin's batch meanwhile is published relative to the
        recorded marks anyway, and the jobs caught up are those that ended before the start)."""
        failed = []
        for tenant in tenants:
            try:
                self.check_writable()  # never beside a successor holding the store
                if tenant not in jobs_done:
                    self._catch_up_jobs(tenant)
                    jobs_done.add(tenant)
                self._catch_up(tenant)
            except StoreFenced:  # the successor holding the store catches up (the fence watch logs it)
                failed.append(tenant)
            except Exception as exc:  # noqa: BLE001 - tried again; the twins' next batches are recorded meanwhile
                # says it is retried: seen at every start while shards come up, a bare GetTimeoutError read as a fault
                log.warning("event=change_catch_up_failed tenant=%s retry_in_s=%g error=%s: %s (a twin shard "
                            "starting or restarting, or the store failing: tried again until it passes)",
                            tenant, FENCE_WATCH_S, type(exc).__name__, exc)
                failed.append(tenant)
        return failed

    def _follow_changes(self, tenants: list[str]) -> None:
        """`_catch_up_changes` at the start (readiness does not wait), then every `CONNECTOR_CHANGES_S` until `close`
        `_record_connector_changes` of the tenants caught up, the others' catch-up tried again every `FENCE_WATCH_S`:
        a tenant whose shard does not come back holds back its own connectors' changes only. One thread, so that the
        two never record one tenant's twins at once. Which tenants have a connector is asked of Ray's GCS every
        `CONNECTOR_TENANTS_S` only, not at every pass of every backend."""
        jobs_done: set[str] = set()
        pending, tried_at = self._catch_up_changes(tenants, jobs_done), time.monotonic()
        connected: set[str] = set()
        asked_at = -math.inf
        while not self._watch_stop.wait(CONNECTOR_CHANGES_S):
            if pending and time.monotonic() - tried_at >= FENCE_WATCH_S:
                pending, tried_at = self._catch_up_changes(pending, jobs_done), time.monotonic()
            if time.monotonic() - asked_at >= CONNECTOR_TENANTS_S:
                connected, asked_at = self._connector_tenants(connected), time.monotonic()
            self._record_connector_changes(connected.difference(pending))

    def _connector_tenants(self, last: set[str]) -> set[str]:
        """The tenants with a connector actor now (`connector_tenants`); `last`, the ones found before, while Ray's
        GCS does not answer (asked again `CONNECTOR_TENANTS_S` later)."""
        try:
            return connector_tenants(self.twins.router.namespace)
        except Exception as exc:  # noqa: BLE001 - Ray's GCS not answering: the tenants found before are kept
            log.info("event=connector_tenants_unread error=%s: %s", type(exc).__name__, exc)
            return last

    def _record_connector_changes(self, tenants: set[str]) -> None:
        """Record the states and drift flags that the connectors of `tenants` moved, as telemetry's are: a connector's
        readings go to the shards directly (`connectors.sink.TwinSink`), so before, a twin fed by a device showed no
        `twin.state` or `twin.drift` on the change stream, nor started the drift trigger, until the backend's next
        start. For each tenant, the shards answer every twin's (revision, drift flag) (`TwinService.marks`) and
        `_catch_up` reads the states of those that moved past their marks only. A tenant that fails (a shard
        restarting, the store failing) is tried again at the next pass; none once another service holds the store."""
        for tenant in sorted(tenants):
            try:
                self.check_writable()
                marks = self.twins.marks(tenant, self.config.shard_read_timeout_s)
                if moved := [a for a, mark in marks.items() if self._twin_marks.get((tenant, a)) != mark]:
                    self._catch_up(tenant, moved)
            except StoreFenced:  # the successor holding the store records them
                return
            except Exception as exc:  # noqa: BLE001 - the changes stay ahead of the log's marks: the next pass
                log.info("event=connector_changes_deferred tenant=%s error=%s: %s", tenant, type(exc).__name__, exc)

    def _catch_up(self, tenant: str, asset_ids: list[str] | None = None) -> None:
        """Record the current state of each of the tenant's twins (of `asset_ids` alone, if given) whose revision or
        drift flag got ahead of what the change log last recorded of it (changes a failed write kept, lost with a
        backend that stopped before the store took writes again; a connector's readings), through `_publish_twins` as
        telemetry's are: nothing twice, no revision out of order. A log from before the recorded marks takes the
        twins' current states as recorded instead (`ChangeLog.adopt`), as the backends before them did. Raises while
        a twin's shard restarts (its state is then its last durable one, maybe behind): the caller tries again."""
        states = self._live_states(tenant, asset_ids)
        if stale := [s.asset_id for s in states if s.stale]:
            raise RuntimeError(f"the shards of twins {stale[:5]} restart (their live state is not known yet)")
        if self.changes.recorded(tenant) is None:
            self.changes.adopt(tenant, {s.asset_id: (s.revision, s.divergence.drift) for s in states})
            return
        for s in states:
            if (tenant, s.asset_id) not in self._twin_marks:
                self._mark(tenant, s.asset_id, s)
        self._publish_twins(tenant, states, skip_applying=True)

    def _catch_up_jobs(self, tenant: str) -> None:
        """Record the change of each of the tenant's jobs that ended before this backend started (one a restart failed
        too) whose change the log lacks (`ChangeLog.recorded_jobs`): a change whose write failed, lost with a backend
        that stopped before the store took writes again, or a crash between the job's record and its change. Once
        each: a job that ended at or after the log's jobs' floor is known to have one or not; one that ended before
        it is taken as recorded. The floor stays where the last catch-up left it until this one is done
        (`ChangeLog.settle_jobs`), however much later the jobs this backend records meanwhile end (a service down for
        hours). A log whose jobs are not known (a checkpoint from before them) takes every job as recorded instead
        (`ChangeLog.adopt_jobs`). Jobs that end after the start are recorded as they end (`_job_finished`), never
        here. Raises before anything is recorded (the marks unreadable)."""
        written = self.changes.recorded_jobs(tenant)
        ended = list(self.jobs.ended)  # a copy: the event loop adds jobs as they end
        if written is None:
            self.changes.adopt_jobs(tenant, self._ended_of(tenant, ended))
        else:
            floor = () if written.floor is None else (written.floor,)
            before = self._ended_of(tenant, ended[bisect_left(ended, floor):bisect_left(ended, (self._started,))])
            if lost := [_job_change(self.jobs.jobs[job_id]) for job_id in before if job_id not in written.ended]:
                log.info("event=job_changes_caught_up tenant=%s jobs=%d", tenant, len(lost))
                try:
                    self.changes.record(tenant, lost)
                except Exception:  # noqa: BLE001 - kept and logged by the log, written with its next append (`_commit`)
                    pass
        self.changes.settle_jobs(tenant)

    def _ended_of(self, tenant: str, ended: list[tuple[datetime, str]]) -> dict[str, datetime]:
        """Job id -> end of the tenant's jobs among `ended` (`JobQueue.ended`: finished ones, oldest first), less
        those retention removed meanwhile."""
        jobs = ((t, self.jobs.jobs.get(job_id)) for t, job_id in ended)
        return {job.job_id: t for t, job in jobs if job is not None and job.tenant == tenant}

    def _live_states(self, tenant: str, asset_ids: list[str] | None = None) -> list[TwinState]:
        """The state of each of the tenant's twins (of `asset_ids`, if given), less those deleted meanwhile: one shard
        call per shard and `actors.service.STATES_BATCH` twins (`TwinService.states`), not one per twin; each within
        `shard_read_timeout_s` (a hung shard held the change-following thread, every tenant's, for good)."""
        if asset_ids is None:
            asset_ids = self.twins.assets(tenant, self.config.shard_read_timeout_s)
        return self.twins.states(tenant, asset_ids, timeout_s=self.config.shard_read_timeout_s)

    def _publish_twins(self, tenant: str, states: list[TwinState], skip_applying: bool = False) -> None:
        """One `twin.state` change per twin whose revision moved past the last one recorded, plus
        `twin.drift` when its flag flipped. The states come with the ingest call's report (no second
        call to the shard), or `_catch_up`'s reads. Under the lock a state older than the last recorded one is
        dropped, so a twin's revisions only grow on the stream when ingests of one twin run concurrently (a state
        may then stand for several batches: the latest one wins). At the recorded revision, only a lowered flag is
        recorded (`twin.drift`): a clear, which applies no event, whose change was lost; a raised one at the same
        revision is a state read before that clear. `skip_applying` (catch-ups): a twin an API batch is applied to now
        is left to that batch's own call, which answers once its change is on the store; recorded here, the call
        would find it recorded and answer before the write landed."""
        with self._publish:
            drafts: list[dict[str, Any]] = []
            for s in states:
                asset_id = s.asset_id
                if skip_applying and (tenant, asset_id) in self._applying:
                    continue
                revision, drift = self._twin_marks.get((tenant, asset_id), (-1, False))
                d = s.divergence
                if s.revision == revision and drift and not d.drift:
                    drafts.append(_drift_change(s))
                    self._twin_marks[(tenant, asset_id)] = (s.revision, False)
                if s.revision <= revision:
                    continue
                drafts.append({**_twin_change(s), "kind": "twin.state", "data": {
                    "event_time": s.event_time.isoformat() if s.event_time else None, "state": s.state, "std": s.std,
                    "events_applied": s.events_applied, "drift": d.drift, "diverged": d.diverged,
                    "drift_score": d.drift_score if d.drift_score is not None and math.isfinite(d.drift_score)
                    else None}})
                if d.drift != drift:
                    drafts.append(_drift_change(s))
                self._twin_marks[(tenant, asset_id)] = (s.revision, d.drift)
            if not drafts:
                return
            queued = self.changes.submit(tenant, drafts)  # in revision order; written outside the lock
        try:
            self.changes.commit(tenant, queued)
        except Exception as exc:
            failure = store_failure(exc)
            if failure is None:
                raise
            raise StoreUnavailable(f"the events were applied, but their change record was not written yet "
                                   f"({failure.message}); the change log writes it once the store takes writes "
                                   "again", error=failure.error) from None
        if any(d["kind"] == "twin.drift" and d["data"]["drift"] for d in drafts) or \
                self.recalibration.trigger.waiting(tenant):  # a latch, or triggers waiting for event time
            try:  # reads the log in order from its cursor; the events are applied and recorded whatever happens
                self.recalibration.trigger.poll(tenant)
            except Exception:
                log.exception("event=recalibration_poll_failed tenant=%s", tenant)

    def flush(self) -> None:
        self.twins.flush()

    async def live_twins(self, tenant: str, timeout_s: float) -> int | None:
        """Live twins of `tenant`, as its shards count them; None when one leaves the count unanswered for
        `timeout_s` (a hung shard: a thread waits that long, never the replica's event loop)."""
        try:
            return len(await asyncio.to_thread(self.twins.assets, tenant, timeout_s))
        except ray.exceptions.GetTimeoutError:
            return None

    async def shards_answering(self, timeout_s: float, stuck_s: float) -> int:
        """How many twin shards answer within `timeout_s`, none stuck in one call over `stuck_s`
        (`TwinService.shards_answering`; a thread waits, never the replica's event loop)."""
        return await asyncio.to_thread(self.twins.shards_answering, timeout_s, stuck_s)

    def store_fence(self, timeout_s: float = FENCE_READ_S) -> StoreFence | None:
        """Why this service no longer holds its store (None while it does): see `fence_of`. The lease read waits
        at most `timeout_s` (`StoreUnavailable` then, or on a store failure): a probe must answer in time. A lease
        read that shows the store taken holds the connectors (`_fence_read`), so that every path that checks the
        fence (`check_writable`, at most `FENCE_CHECK_S` old) stops connector starts, not only the store watch."""
        return self._fence_read(self._lease_reads(timeout_s))

    def _fence_read(self, held: Lease | None) -> StoreFence | None:
        """`fence_of` the lease as read (`held`), and once it shows another service holding the store or its release
        (`held_by`), no connector starts here from then on, not even for a status read (`ConnectorOps.hold`, cheap
        once held): one started beside the successor's would write to the store and connect under the same MQTT
        client ids."""
        fence = fence_of(held, self.twins.lease)
        if (why := held_by(held, fence)) is not None:
            self.connector_ops.hold(why)
        return fence

    def _connector_fence(self) -> str | None:
        """Why no declared connector may start now (`held_by`; None: they may), from a read of the store's lease
        right before each start (`Connectors.start_declared`, while `connector_ops` is being made: it holds itself
        on a reason). A read that fails raises: that connector is not started (logged), as for a spec unread."""
        held = self._lease_reads(FENCE_READ_S)
        return held_by(held, fence_of(held, self.twins.lease))

    def probe_store(self, timeout_s: float) -> StoreFence | None:
        """`store_fence` for the health probes, all within `timeout_s`, and `StoreUnavailable` too once the shards'
        lease heartbeat stopped changing: see `_probe`."""
        deadline = time.monotonic() + timeout_s
        return self._probe(self._lease_reads(timeout_s), deadline)

    def _probe(self, lease: Lease | None, deadline: float) -> StoreFence | None:
        """What the health probes find of the store whose lease reads `lease`, by `deadline` (monotonic): the fence,
        or `StoreUnavailable` once the shards' lease heartbeat stopped changing (`RenewalWatch`): a store that
        refuses writes still answers reads. Then the shards are asked in the time left: with none answering, none
        renews it, and the reason says so (`shards_down`) rather than blaming the store."""
        fence = fence_of(lease, self.twins.lease)
        if fence is not None:
            return fence
        beat = self._beat_reads(max(deadline - time.monotonic(), 0.0))
        stalled = self._renewals.quiet_for(beat, time.monotonic())
        if stalled is None:
            return None
        unchanged = f"the shards' lease heartbeat, rewritten every 2 s, has not changed for {stalled:.0f} s"
        if (left := deadline - time.monotonic()) <= 0:  # no time left to ask the shards: either cause
            raise unavailable(unchanged, "no_writes", f"{NO_WRITES} or every twin shard is down")
        if not self.twins.shards_answering(left, self.config.readiness_stuck_s):  # none renews it: not the store
            raise StoreUnavailable(f"no twin shard answers ({unchanged}): the shards are down, not necessarily the "
                                   "store (ops/README.md#shards-down)", error="shards_down")
        raise unavailable(unchanged, "no_writes", NO_WRITES)

    def _start_store_watch(self) -> None:
        """Run `_watch_store` on a daemon thread until `close`, which this process's exit calls too (`atexit`): a
        watch running on into the interpreter's teardown failed there with tracebacks."""
        self._watch_stop = threading.Event()
        self._watch_thread = threading.Thread(target=self._watch_store, name="store-watch", daemon=True)
        atexit.register(self.close)
        self._watch_thread.start()

    def close(self) -> None:
        """Stop the store watch, waiting at most `FENCE_READ_S` for a pass in progress to end, and the recalibrations'
        deferred launches. The twins stay: they are the service's (`TwinService.close` releases them), and another
        replica of it may start."""
        if self._watch_stop is None or self._watch_stop.is_set():
            return
        atexit.unregister(self.close)
        self._watch_stop.set()
        if (recalibration := getattr(self, "recalibration", None)) is not None:  # (a constructor that failed first)
            recalibration.trigger.close()  # its deferred launches: the next backend relaunches their jobs
        if (changes := getattr(self, "changes", None)) is not None:
            changes.checkpoint(force=True)  # the next start reads no log tail
        if self._watch_thread is not threading.current_thread():
            self._watch_thread.join(FENCE_READ_S)

    def __del__(self) -> None:
        """Serve's graceful shutdown of the replica calls it: the store watch stops with the backend."""
        self.close()

    def _watch_store(self) -> None:
        """Every `FENCE_WATCH_S` until `close`: a pass over the store's lease (`_watch_pass`), then write the changes
        a failed write kept, so the stream gets them once the store is back even if no request comes."""
        metrics.STORE_FENCED.set(0)
        connectors_stopped = False
        while not self._watch_stop.wait(FENCE_WATCH_S):
            connectors_stopped = self._watch_pass(connectors_stopped)
            self._flush_changes()
            self.changes.checkpoint()  # the recorded marks, at most every `CHECKPOINT_S`

    def _sweep_temp_files(self) -> None:
        """Now, then every `TEMP_SWEEP_S` until `close`: remove what writers killed between a record's write and its
        rename (`raytwin.storage.replace_file`) left anywhere in the store (the shards', the catalog's, the change
        log's...), once no live writer's can be (`raytwin.storage.remove_stale_temp_files`): each kept its record's
        size of disk for good."""
        fs, root = filesystem(self.config.store_url, self.config.storage_options)
        while True:
            try:
                if removed := remove_stale_temp_files(fs, root):
                    log.info("event=stale_temp_files_removed count=%d", removed)
            except Exception:  # noqa: BLE001 - the next pass tries again; such a file holds only its disk space
                log.warning("event=stale_temp_sweep_failed", exc_info=True)
            if self._watch_stop.wait(TEMP_SWEEP_S):
                return

    def _supervise_connectors(self) -> None:
        """Start the connectors waiting for a client id whose holder let it go on another replica (or whose start
        failed: `ConnectorOps.supervise`)."""
        try:
            self.connector_ops.supervise()
        except Exception:  # noqa: BLE001 - the next pass tries again; the connectors stay down meanwhile
            log.warning("event=connector_supervise_failed", exc_info=True)

    def _conclude_shadows(self) -> None:
        """Every `SHADOW_CONCLUDE_S` (a daemon thread of its own; a shard that leaves its reads unanswered past
        `shard_read_timeout_s` fails the round, logged, and the next tries again): record the
        shadow evaluations that finished on the lifecycle log (`serve_apps.shadow_conclusions`), the service's
        write, not a reader's; one that fails (the store down) is tried again next time. Until `close`; none while
        another service holds the store (`check_writable`): the successor records them."""
        while not self._watch_stop.wait(SHADOW_CONCLUDE_S):
            try:
                self.check_writable()
                conclude_running(self.twins.models, lambda tenant: ModelLifecycle(self._registry(tenant)),
                                 self.audit, self._concluded, self.config.shard_read_timeout_s)
            except StoreFenced:  # the fence watch exports and logs it
                continue
            except ray.exceptions.GetTimeoutError:  # a shard starting or busy (compiling a twin's kernel): no fault
                log.warning("event=shadow_conclusion_deferred retry_in_s=%g: a twin shard left the read of its shadow "
                            "evaluations unanswered within shard_read_timeout_s (starting, restarting or busy): tried "
                            "again next round", SHADOW_CONCLUDE_S)
            except Exception:  # noqa: BLE001 - the next round tries again; the evaluations keep their state meanwhile
                log.warning("event=shadow_conclusion_failed", exc_info=True)

    def _audit_lifecycles(self) -> None:
        """At the start, then every `LIFECYCLE_AUDIT_S` until `close`, verify each tenant's model lifecycle logs whole:
        requests check only new records, and this finds an edit to an old one (logged as
        ``event=lifecycle_chain_broken``; the model's transitions are refused until its log verifies again). After each
        round, how many logs are broken is exported (`metrics.LIFECYCLE_LOGS_BROKEN`, the alert
        RayTwinLifecycleLogBroken); a tenant whose round failed (the store down) counts as its last round found it."""
        broken: dict[str, int] = {}  # by tenant
        while True:
            tenants = self.catalog.tenants()
            broken = {tenant: n for tenant, n in broken.items() if tenant in tenants}
            for tenant in tenants:
                try:
                    broken[tenant] = len(ModelLifecycle(self._registry(tenant)).audit())
                except Exception:  # noqa: BLE001 - the store down: the next round tries again
                    log.warning("event=lifecycle_audit_failed tenant=%s", tenant, exc_info=True)
            metrics.LIFECYCLE_LOGS_BROKEN.set(float(sum(broken.values())))
            if self._watch_stop.wait(LIFECYCLE_AUDIT_S):
                return

    def _watch_pass(self, connectors_stopped: bool) -> bool:
        """Read the store's lease once, waiting at most `FENCE_READ_S` (one read that hangs must not stop the watch
        for good), and with it export the store's state (`_export_store_state`) and `_watch_fence`, and while this
        service holds the store, `_supervise_connectors` (never beside a successor). Whether the connectors are
        stopped now."""
        deadline = time.monotonic() + FENCE_READ_S
        try:
            lease = self._lease_reads(FENCE_READ_S)
        except StoreUnavailable as exc:  # the store fails or hangs: whether this service is fenced is not known
            self._export_unavailable(exc.error)
            log.warning("event=fence_watch_failed error=%s", exc.message)
            return connectors_stopped
        except Exception:  # noqa: BLE001 - a lease unreadable as one: the next pass tries again
            log.warning("event=fence_watch_failed", exc_info=True)
            return connectors_stopped
        self._export_store_state(lease, deadline)
        stopped = self._watch_fence(lease, connectors_stopped)
        if holds(lease, self.twins.lease):
            self._supervise_connectors()
        return stopped

    def _watch_fence(self, held: Lease | None, connectors_stopped: bool) -> bool:
        """Export whether the service is fenced by the lease as read (`held`; `metrics.STORE_FENCED`, for an alert
        and the dashboard: its writes all fail while health's anonymous answer stays terse), and once a service of
        another Ray cluster holds the store, stop this service's connectors (unless `connectors_stopped`): detached,
        they would keep receiving and sending beside the successor's, under the same MQTT client ids. A successor in
        this cluster shares them by name, so they stay. Either way, from then on no connector starts here, not even
        for a status read (`_fence_read`, before the stop: none starts again after it). Whether the connectors
        are stopped now."""
        fenced = self._fence_read(held) is not None
        metrics.STORE_FENCED.set(1 if fenced else 0)
        if connectors_stopped or not fenced or held is None or held.released or held.cluster == ray_cluster():
            return connectors_stopped  # a released lease has no successor whose connectors would run beside these
        try:
            count = stop_connector_actors(self.config.namespace)
        except Exception:  # noqa: BLE001 - a Ray hiccup: the next pass tries again
            log.warning("event=fence_watch_failed", exc_info=True)
            return connectors_stopped
        log.warning("event=store_fenced_connectors_stopped holder=%s epoch=%d connectors=%d", held.owner,
                    held.epoch, count)
        return True

    def _export_store_state(self, lease: Lease | None, deadline: float) -> None:
        """Export what the health probes find of the store whose lease reads `lease` (`_probe`, by `deadline`) for
        the alert's operators, the dashboard and `raytwin status`, which reach no health route."""
        try:
            self._probe(lease, deadline)
            reason = None
        except StoreUnavailable as exc:
            reason = exc.error
        except Exception:  # noqa: BLE001 - another failure (a heartbeat unreadable as one): the next pass tries again
            log.warning("event=store_state_unknown", exc_info=True)
            return
        self._export_unavailable(reason)

    @staticmethod
    def _export_unavailable(reason: str | None) -> None:
        """`metrics.STORE_UNAVAILABLE`: 1 for `reason` (None: the store is available), 0 for the other reasons."""
        for r in UNAVAILABLE_REASONS:
            metrics.STORE_UNAVAILABLE.set(1.0 if r == reason else 0.0, reason=r)

    def check_writable(self, fresh: bool = False) -> None:
        """`StoreFenced` (503 `store_fenced`) once another service took the store over: a fenced service must not
        act beside its successor (send a command, start a connector, queue or record a run), not only leave the
        twins alone (their shards refuse by themselves). The lease is read at most every `FENCE_CHECK_S`, so a write
        may follow a takeover by that long; `fresh` reads it now, for a decision that would replace the successor's
        for good: a job's end or cancel, a command's approval or refusal (`ConnectorOps.DECISIONS`), a model's
        transition or rollback (`serve_apps.deps.writable_now`), a recalibration's end or relaunch, a checkpoint of the
        change log's recorded marks (`ChangeLog.checkpoint`, a close's too). A read that finds the store taken holds
        the connectors too (`store_fence`), ahead of the store watch's next pass."""
        now = time.monotonic()
        if fresh or now - self._fence_checked >= FENCE_CHECK_S:
            self._fence, self._fence_checked = self.store_fence(), now
        if self._fence is not None:
            raise StoreFenced(self._fence.reason)

    def recalibrations(self, tenant: str) -> TenantState:
        """The tenant's pending, running and recently finished drift recalibrations."""
        return self.recalibration.state(tenant)

    # ---- connectors and commands (serve_apps/connector_ops.py) ----------------------------
    def connector(self, op: str, *args: Any) -> Any:
        if op not in ConnectorOps.OPS:
            raise ValueError(f"unknown connector operation {op!r}")
        if op not in ConnectorOps.READS:
            self.check_writable(fresh=op in ConnectorOps.DECISIONS)
        return getattr(self.connector_ops, op)(*args)

    # ---- schema evolution: migrations and deprecation marks (serve_apps/evolution.py) ----------
    def evolution(self, op: str, *args: Any) -> Any:
        if op not in TypeEvolution.OPS:
            raise ValueError(f"unknown schema evolution operation {op!r}")
        if op in TypeEvolution.WRITES:
            self.check_writable()
        return getattr(self.type_evolution, op)(*args)

    # ---- jobs (async: they run on the replica's event loop, which owns the queue) ---------
    @property
    def _jobs(self) -> JobQueue:
        """The job queue, its retention passes running (they start on the event loop of the first job call)."""
        self.jobs.expire_periodically()
        return self.jobs

    async def submit_job(self, tenant: str, key_id: str, asset_id: str, model_ref: str, content_hash: str,
                         work: Work, start_time: datetime | None = None, start: StartedFrom = StartedFrom()) -> Job:
        self.check_writable()
        return self._jobs.submit(tenant, key_id, asset_id, model_ref, content_hash, work, start_time, start)

    async def submit_bulk(self, caller: Caller, request: BulkRequest, asset_ids: list[str], job_id: str) -> Job:
        self.check_writable()
        return self._jobs.submit_bulk(BulkWork(caller, request, asset_ids, self, self.audit, job_id))

    async def cancel_job(self, tenant: str, job_id: str, key_id: str) -> Job:
        self.check_writable(fresh=True)  # a cancel writes the job's record and its change over the successor's
        return self._jobs.cancel(tenant, job_id, key_id)

    async def get_job(self, tenant: str, job_id: str) -> JobRecord:
        """The record, store location included: routes answer its `status()`."""
        return self._jobs.get(tenant, job_id)

    async def job_status(self, tenant: str, job_id: str) -> Job:
        """The job's status as answered: while queued, its place and what it waits for; once succeeded, whether its
        result files are still in the store (retention removes a sweep's with its run record)."""
        job = self._jobs.get(tenant, job_id)
        if job.state == "succeeded":  # reads the store: off the event loop
            return await asyncio.to_thread(job.stored_status, self.config)
        return self.jobs.status(job)

    async def list_jobs(self, tenant: str, state: str | None, limit: int, cursor: str | None) -> JobPage:
        """A page of the tenant's jobs, newest first."""
        shown, next_cursor = page(self._jobs.listed.get(tenant, []), self.jobs.jobs.__getitem__, state, limit, cursor)
        return JobPage(jobs=[self.jobs.status(job) for job in shown], next_cursor=next_cursor)

    async def job_stats(self, tenant: str | None = None) -> dict[str, Any]:
        return self._jobs.stats(tenant)


BackendDeployment = serve.deployment(Backend, name="Backend", num_replicas=1, max_ongoing_requests=64,
                                     ray_actor_options=cpu_only({"num_cpus": 0}))


def _job_change(job: JobRecord) -> dict[str, Any]:
    """`job.succeeded`, `job.failed`, `job.cancelled`: the job ended."""
    type_name, type_version = _type_of(job.model_ref)
    return {"kind": f"job.{job.state}", "asset_id": job.asset_id or None, "type_name": type_name or None,
            "type_version": type_version or None, "revision": None,  # None: a bulk job is about no one asset
            "data": job.model_dump(mode="json", include={"job_id", "kind", "state", "finished", "error", "run_id",
                                                        "scenarios", "n_steps", "compute_s"})}


def record_lost_catalog_changes(changes: ChangeLog, catalog: Catalog, tenant: str,
                                unregister: Callable[[str, str], None]) -> None:
    """Record, at its revision, the change of each catalog entry or tombstone newer than the tenant's change log (a
    crash between the catalog file and its log segment, or a failed segment write kept by a backend that stopped),
    from the catalog, the source of truth, as the change its record names (`Catalog.written_as`): an asset's
    `asset.created`, `asset.updated` (also a record from before it was named) or `asset.deleted`, a type's
    `asset_type.created` or `asset_type.deleted`; then finish the deletes (`unregister` each deleted asset's twin,
    which a crash between the log and the twin left registered) and remove their tombstones; a delete whose twin's
    shard leaves the unregister unanswered (`ShardUnanswered`: hung) keeps its tombstone for the next start or a
    retry of the delete, and the backend starts (it raised, and a hung shard kept the whole service down). Its number
    left without a change (the log only continued after it) read as changes deleted by the retention to every stream
    behind it: 410 `gone`, a resync of everything, and the change never sent."""
    head = changes.head(tenant)
    live = [(revision, kind, key) for (t, kind, key), revision in catalog.revisions.items() if t == tenant]
    deleted = [(revision, kind, key) for (t, kind, key), (revision, _) in catalog.tombstones.items() if t == tenant]
    for revision, kind, key in sorted(r for r in [*live, *deleted] if r[0] > head):
        changes.reserve(tenant, revision - 1)  # (a number before it whose change was overwritten stays a hole)
        changes.record(tenant, [_lost_change(catalog, tenant, kind, key)])
        log.info("event=catalog_change_recovered tenant=%s %s=%s revision=%d", tenant, kind, key, revision)
    for _, kind, key in deleted:
        if kind == "assets":
            try:
                unregister(tenant, key)
            except ShardUnanswered as exc:
                log.warning("event=deleted_twin_unregister_deferred tenant=%s asset=%s error=%r: its tombstone stays "
                            "until the next start or a retry of the delete", tenant, key, str(exc))
                continue
        catalog.forget_deleted(tenant, kind, key)


def _lost_change(catalog: Catalog, tenant: str, kind: str, key: str) -> dict[str, Any]:
    """The change draft of catalog entry (or tombstone) `key` of `kind` as it is on the store."""
    if (tombstone := catalog.tombstones.get((tenant, kind, key))) is not None:
        deleted = tombstone[1]
        return (_asset_change("asset.deleted", deleted) if isinstance(deleted, Asset)
                else _type_change("asset_type.deleted", deleted))
    if kind == "assets":
        return _asset_change(f"asset.{catalog.written_as(tenant, key)}", catalog.get_asset(tenant, key))
    return _type_change("asset_type.created", catalog.types[tenant][key])


def _asset_change(kind: str, asset: Asset) -> dict[str, Any]:
    return {"kind": kind, "asset_id": asset.id, "type_name": asset.type_name, "type_version": asset.type_version,
            "data": {"asset": asset.model_dump(mode="json")}}


def _type_change(kind: str, asset_type: AssetType) -> dict[str, Any]:
    return {"kind": kind, "type_name": asset_type.name, "type_version": asset_type.version,
            "data": {"asset_type": asset_type.model_dump(mode="json")}}
