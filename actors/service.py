"""`TwinService`: the driver-side facade over the twin shards of one state store.

Creating a service creates (or attaches to) its named shard actors; every method routes by the
stable (tenant, asset) hash, so any number of service objects in any processes agree on where a
twin lives. Tenants are isolated by key: a twin is addressed by (tenant, asset_id) everywhere.

One service writes a store: it holds the store's lease (`raytwin.statestore.Lease`), and its
shards write with the lease's epoch. Why: a second service with another shard count routes twins
to other shards, and each set of shards would log events and write snapshots the other never
sees, so recovery would miss events for good. Service objects in one Ray cluster with the same
shard count and namespace are the same service (the Serve backend, the CLI, a driver restarted
after a crash): they attach. Anything else is refused until it takes the store over
(`takeover=True`), which stops the holder's shards and fences any it cannot reach, or, for a
service of another Ray cluster, until that service stops renewing its heartbeat (`actors.lease`).
The Serve backend attaches to the lease but not to shards another process started
(`own_shards`, `owned_shard`): those end with that process and run its code, such as an
outgoing replica's during an upgrade of the Serve application.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from datetime import date, datetime
from typing import Any

import pyarrow as pa
import ray
from pydantic import TypeAdapter
from ray.exceptions import GetTimeoutError, RayTaskError

from actors.ingest import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LINGER_S,
    DEFAULT_MAX_IN_FLIGHT,
    Dispatcher,
    ShardRouter,
    ingest_parquet,
    ingest_rows,
    ingest_stream,
    table_batches,
)
from actors.failover import actor_restarting, compilation_cache
from actors.lease import StoreLeased, acquire_lease, release_lease, stop_actors
from actors.live_models import LiveModels
from actors.recovery import durable_state, registration_record
from actors.routing import shard_index, shard_name
from actors.shard import TwinShardActor
from actors.state import IngestReport, TwinState, UnknownTwin
from actors.telemetry import ROW_COLUMN, validated_table
from raytwin import metrics
from raytwin.compat import IncompatibleReplay, require_replayable
from raytwin.contracts import Asset, Identifier, TelemetryEvent
from raytwin.migration import MigrationPlan
from raytwin.registry import ModelArtifact
from raytwin.sim.cpu import cpu_only
from raytwin.statestore import StateStore, to_micros

_IDENTIFIER = TypeAdapter(Identifier)
_RESTARTING = object()
"""`TwinService._live`'s answer for a call to a shard found restarting."""
STATES_BATCH = 1000
"""Twins per call of `TwinService.states`: bounds a reply (0.36 MB for 1,000 twins of a two-state model, pickled)."""
log = logging.getLogger("raytwin.twins")


class ShardUnanswered(GetTimeoutError):
    """A twin shard left a call unanswered past its deadline (hung or stalled): the call stays queued there and may
    still be applied, so its outcome is unknown until `outcome` (the call's answer, or its error) completes. Why not
    a bare timeout: a caller must not undo or repeat a write the shard may still apply (`serve_apps.twin_writes`)."""

    def __init__(self, message: str, outcome: Future):
        super().__init__(message)
        self.outcome = outcome


def answered(ref: Any, timeout_s: float | None, what: str) -> Any:
    """`ray.get(ref)` within `timeout_s` (None: however long); `ShardUnanswered` past it."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        raise ShardUnanswered(f"{what} left unanswered within {timeout_s:g} s", ref.future()) from None


_STARTED: set[Any] = set()
"""The shard actors `owned_shard` started in this process."""


def owned_shard(start: Callable[[], Any], name: str, namespace: str) -> Any:
    """The shard actor `name` as started by this process (`start` starts it, and fails if the name is taken).
    One started by another process is stopped and started again here, recovering its twins from the store: such
    an actor (not detached) ends with the process that started it, and runs that process's code. Why: during an
    upgrade of the Serve application, the new backend replica starts while the old one still drains its requests;
    attached to the old one's shards, it served twins with the old code, and once the old replica exited every
    twin call failed for good (`ActorDiedError`: the owner died), until the backend was restarted again. The old
    replica's calls in flight fail as on a shard crash: what a shard acknowledged is in the store. The store's
    lease is the same (one Ray cluster, one service), and the old shard is gone before its successor starts."""
    try:
        running = ray.get_actor(name, namespace=namespace)
    except ValueError:
        running = None
    if running is not None and running in _STARTED:
        return running
    if running is not None:
        log.warning("event=shard_replaced shard=%s namespace=%s reason=started_by_another_process", name, namespace)
        stop_actors([name], namespace)
    handle = start()
    _STARTED.add(handle)
    return handle


class TwinService:
    """Live twins over a state store at `store_url` (local directory or fsspec URL)."""

    def __init__(
        self,
        store_url: str,
        *,
        shards: int = 4,
        allowed_lateness_s: float = 3600.0,
        snapshot_every: int = 500,
        namespace: str = "raytwin",
        storage_options: dict | None = None,
        detached: bool = False,
        checkpoint_every: int = 64,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_task_retries: int = 5,
        takeover: bool = False,
        stale_after_s: float = 0.25,
        lease_wait_s: float | None = None,
        own_shards: bool = False,
    ):
        """`takeover=True` takes the store from the service holding its lease: after that
        service crashed, or to change the shard count (stop, take over, every twin recovered).
        `own_shards=True` (the Serve backend): shards another process started are replaced by this process's
        (`owned_shard`), not attached to; not with `detached`, whose shards outlive whoever started them.
        `lease_wait_s`: how long a store served by another Ray cluster is waited for (its holder
        stopping) before `StoreLeased` (None: `actors.lease.EXPIRY_S`, a crash's silence).
        `stale_after_s`: a read not answered by then is answered from the store, marked stale,
        if the twin's shard is restarting (see `state`)."""
        if shards < 1 or snapshot_every < 1 or allowed_lateness_s < 0 or stale_after_s <= 0:
            raise ValueError("need shards >= 1, snapshot_every >= 1, allowed_lateness_s >= 0 and stale_after_s > 0")
        if own_shards and detached:
            raise ValueError("own_shards is for shards that end with their process: pass detached=False")
        self.stale_after_s = stale_after_s
        self.router = ShardRouter(store_url, shards, namespace, storage_options)
        self.store = StateStore(store_url, storage_options)
        self.lease = acquire_lease(self.store, shards, namespace, takeover, wait_s=lease_wait_s)
        self.max_in_flight, self.batch_size = max_in_flight, batch_size

        def start(i: int) -> Any:
            return TwinShardActor.options(**cpu_only(compilation_cache(dict(
                name=shard_name(store_url, i, shards),
                namespace=namespace,
                get_if_exists=not own_shards,
                lifetime="detached" if detached else None,
                max_restarts=-1,
                max_task_retries=max_task_retries,
            )))).remote(
                store_url, i, shards, allowed_lateness_s=allowed_lateness_s, snapshot_every=snapshot_every,
                checkpoint_every=checkpoint_every, storage_options=storage_options, fence=self.lease.fence,
                namespace=namespace,
            )

        self._shards = [owned_shard(functools.partial(start, i), shard_name(store_url, i, shards), namespace)
                        if own_shards else start(i) for i in range(shards)]

    def _shard(self, tenant: str, asset_id: str):
        return self._shards[shard_index(tenant, asset_id, self.router.shards)]

    def shard_for(self, tenant: str, asset_id: str):
        """The named actor handle that holds this twin (stable: a crc32 hash of tenant/asset)."""
        return self._shard(tenant, asset_id)

    @property
    def shard_handles(self) -> list:
        return list(self._shards)

    @property
    def models(self) -> LiveModels:
        """Shadow evaluations and hot swaps of this service's twins (`actors.live_models`)."""
        return LiveModels(self._shards)

    # ----------------------------------------------------------------- twins ----
    def register(self, asset: Asset, artifact: ModelArtifact, initial_state: dict[str, float] | None = None,
                 initial_std: dict[str, float] | None = None, timeout_s: float | None = None) -> None:
        """Create the twin of `asset` (or attach to it if registered identically before); `ShardUnanswered` past
        `timeout_s` (None: no deadline), as for `retype`, `unregister`, `clear_drift` and `state_at`."""
        record = registration_record(asset, artifact, initial_state, initial_std)
        answered(self._shard(asset.tenant, asset.id).register.remote(asset.tenant, asset.id, record), timeout_s,
                 f"the registration of twin {asset.id}")

    def register_many(self, twins: list[tuple[Asset, ModelArtifact]]) -> int:
        """Register many twins with one call per shard (default priors); returns how many were new."""
        by_shard: dict[int, list] = {}
        for a, artifact in twins:
            item = (a.tenant, a.id, registration_record(a, artifact, None, None))
            by_shard.setdefault(shard_index(a.tenant, a.id, self.router.shards), []).append(item)
        return sum(ray.get([self._shards[i].register_many.remote(items) for i, items in by_shard.items()]))

    def migrate(self, asset: Asset, artifact: ModelArtifact, plan: MigrationPlan,
                timeout_s: float | None = None) -> tuple[TwinState, TwinState]:
        """Move the twin of `asset` (already carrying its new type version) to `artifact`'s model,
        its state mapped by `plan`, at a clean point in its shard; (state before, state after)."""
        target = registration_record(asset, artifact, None, None)
        found = answered(self._shard(asset.tenant, asset.id).migrate.remote(asset.tenant, asset.id, target, plan),
                         timeout_s, f"the migration of twin {asset.id} to {artifact.ref}")
        if found is None:
            raise UnknownTwin(f"no twin {asset.id!r} for tenant {asset.tenant!r}")
        return found

    def retype(self, asset: Asset, artifact: ModelArtifact, timeout_s: float | None = None) -> None:
        """The twin of `asset`, whose type version changed, on `artifact`'s model: its history replayed
        from the same prior (`initial_state`/`initial_std` kept where the new model has those states; a
        migrated twin's from its migration's mapped state and point, `actors.retype.carried`).
        All or nothing (`actors.retype`): if it raises, the twin is on its old version, serving as before.
        `raytwin.compat.IncompatibleReplay`, naming each difference, for a version the twin's logged history
        does not replay on unchanged (checked here, so every caller is: the HTTP API maps it to 422), or whose
        plausible ranges exclude a reading the replay applies or a state it replays into (checked by the shard
        on the replay itself, `actors.retype.plausible`, raised here as such); `migrate` moves such a twin,
        mapping its state."""
        old = self.store.load_registration(asset.tenant, asset.id)
        if old is None:
            raise UnknownTwin(f"no twin {asset.id!r} for tenant {asset.tenant!r}")
        require_replayable(asset.id, ModelArtifact.model_validate(old["artifact"]).asset_type, artifact.asset_type)
        states = set(artifact.model().state_names)
        keep = lambda prior: prior if prior and set(prior) <= states else None  # noqa: E731
        record = registration_record(asset, artifact, keep(old.get("initial_state")), keep(old.get("initial_std")))
        try:
            found = answered(self._shard(asset.tenant, asset.id).retype.remote(asset.tenant, asset.id, record),
                             timeout_s, f"the move of twin {asset.id} to {artifact.ref}")
        except IncompatibleReplay as exc:  # Ray's wrapper of the shard's, which is an instance of it too
            raise exc.cause if isinstance(exc, RayTaskError) else exc from None
        if not found:
            raise UnknownTwin(f"no twin {asset.id!r} for tenant {asset.tenant!r}")

    def unregister(self, tenant: str, asset_id: str, timeout_s: float | None = None) -> None:
        if not answered(self._shard(tenant, asset_id).unregister.remote(tenant, asset_id), timeout_s,
                        f"the stop of twin {asset_id}"):
            raise UnknownTwin(f"no twin {asset_id!r} for tenant {tenant!r}")

    def assets(self, tenant: str, timeout_s: float | None = None) -> list[str]:
        """The tenant's twins; `ray.exceptions.GetTimeoutError` when a shard has not answered within `timeout_s`."""
        return sorted(a for part in ray.get([s.assets.remote(tenant) for s in self._shards], timeout=timeout_s)
                      for a in part)

    def marks(self, tenant: str, timeout_s: float | None = None) -> dict[str, tuple[int, bool]]:
        """(revision, drift flag) of each of the tenant's twins (`TwinShard.marks`), all shards asked at once;
        `ray.exceptions.GetTimeoutError` when one has not answered within `timeout_s`."""
        return {a: mark for part in ray.get([s.marks.remote(tenant) for s in self._shards], timeout=timeout_s)
                for a, mark in part.items()}

    def shards_answering(self, timeout_s: float, stuck_s: float) -> int:
        """How many shards answer the readiness probe within `timeout_s` (all asked at once) and are making
        progress: 0 means no twin can be read or written (the readiness route). The probe runs beside the shard's
        calls (`TwinShardProcess.probe`), so a shard busy with a backlog answers at once; one dead, restarting or
        stopped (SIGSTOP) does not, and one whose current call has run over `stuck_s` (a store read that never
        returns, a deadlock) counts as not answering, logged as `event=shard_stuck`."""
        calls = {s.probe.remote(): i for i, s in enumerate(self._shards)}
        done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=timeout_s)
        answering = 0
        for call in done:
            try:
                busy = ray.get(call)
            except ray.exceptions.RayError:
                continue
            if busy is not None and busy.running_s > stuck_s:
                log.warning("event=shard_stuck shard=%d call=%s running_s=%.1f stuck_s=%g", calls[call], busy.call,
                            busy.running_s, stuck_s)
                continue
            answering += 1
        return answering

    def state(self, tenant: str, asset_id: str, timeout_s: float | None = None) -> TwinState:
        """The twin's live state; while its shard restarts, its last durable state (latest snapshot)
        with `stale=True` instead of waiting for the restart (seconds). `GetTimeoutError` when a live shard leaves
        it unanswered for `timeout_s` (None: however long)."""
        shard = self._shard(tenant, asset_id)
        state = self._live(shard, shard.state.remote(tenant, asset_id), timeout_s)
        if state is not _RESTARTING:
            return self._found(tenant, asset_id, state)
        log.info("event=stale_read tenant=%s asset=%s", tenant, asset_id)
        state = self._found(tenant, asset_id, durable_state(self.store, tenant, asset_id))
        metrics.STALE_READS.inc(read="state")
        return state

    def states(self, tenant: str, asset_ids: list[str], batch: int = STATES_BATCH,
               timeout_s: float | None = None) -> list[TwinState]:
        """`state` of each of the tenant's twins among `asset_ids` (unknown ones left out), with one call per shard
        for each `batch` of its twins, all sent at once, rather than one per twin; the twins of a shard that
        restarts, their last durable states (`stale=True`). `GetTimeoutError` when a live shard leaves a call
        unanswered for `timeout_s` (a hung one held the caller for good)."""
        by_shard: dict[int, list[str]] = {}
        for asset_id in asset_ids:
            by_shard.setdefault(shard_index(tenant, asset_id, self.router.shards), []).append(asset_id)
        calls = [(self._shards[i], ids[k:k + batch]) for i, ids in by_shard.items() for k in range(0, len(ids), batch)]
        refs = [shard.full_states.remote(tenant, ids) for shard, ids in calls]
        out: list[TwinState] = []
        for (shard, ids), ref in zip(calls, refs, strict=True):
            if (found := self._live(shard, ref, timeout_s)) is _RESTARTING:
                log.info("event=stale_read tenant=%s assets=%d", tenant, len(ids))
                found = [s for s in (durable_state(self.store, tenant, a) for a in ids) if s is not None]
                metrics.STALE_READS.inc(len(found), read="state")
            out.extend(found)
        return out

    def _live(self, shard: Any, ref: Any, timeout_s: float | None = None) -> Any:
        """The answer of `shard` to the call `ref`, `_RESTARTING` once the shard is found restarting (a busy shard
        that is alive is waited for `timeout_s`, then `GetTimeoutError`; however long without one)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                return ray.get(ref, timeout=self.stale_after_s if deadline is None else
                               max(0.0, min(self.stale_after_s, deadline - time.monotonic())))
            except ray.exceptions.GetTimeoutError:
                if actor_restarting(shard):
                    return _RESTARTING
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            except ray.exceptions.ActorUnavailableError:  # refused by the restarting shard (its call retries spent)
                return _RESTARTING

    def clear_drift(self, tenant: str, asset_id: str, timeout_s: float | None = None) -> TwinState:
        """Acknowledge a twin's drift alarm: its detector restarts from zero (a persisting fault is
        flagged again after its detection delay); returns the twin's state after the clear."""
        ref = self._shard(tenant, asset_id).clear_drift.remote(tenant, asset_id)
        return self._found(tenant, asset_id, answered(ref, timeout_s, f"the drift clear of twin {asset_id}"))

    def state_at(self, tenant: str, asset_id: str, t: datetime, timeout_s: float | None = None) -> TwinState:
        """The state after every event with event time <= `t` (timezone-aware)."""
        if t.tzinfo is None:
            raise ValueError("state_at needs a timezone-aware datetime")
        ref = self._shard(tenant, asset_id).state_at.remote(tenant, asset_id, to_micros(t))
        return self._found(tenant, asset_id, answered(ref, timeout_s, f"the past state of twin {asset_id}"))

    @staticmethod
    def _found(tenant: str, asset_id: str, state: TwinState | None) -> TwinState:
        if state is None:
            raise UnknownTwin(f"no twin {asset_id!r} for tenant {tenant!r}")
        return state

    # ------------------------------------------------------------- ingestion ----
    def _dispatcher(self, tenant: str, states: bool = False) -> Dispatcher:
        return Dispatcher(self.router, self._tenant(tenant), max_in_flight=self.max_in_flight,
                          batch_size=self.batch_size, handles=self._shards, states=states)

    @staticmethod
    def _tenant(tenant: str) -> str:
        return _IDENTIFIER.validate_python(tenant)

    def ingest(self, tenant: str, events: list[TelemetryEvent] | pa.Table, states: bool = False) -> IngestReport:
        """Ingest events (or a telemetry table); returns once all are durable and applied.
        `states`: the report carries the new states of the twins that changed."""
        if isinstance(events, pa.Table):
            return ingest_rows(self.router, self._tenant(tenant), table_batches(events, self.batch_size),
                               max_in_flight=self.max_in_flight, batch_size=self.batch_size, states=states)
        dispatcher = self._dispatcher(tenant, states)
        table = validated_table(events)  # each row's position rides along, for the rejects to name (`Reject.index`)
        try:
            dispatcher.send(table.append_column(ROW_COLUMN, pa.array(range(table.num_rows), pa.int64())))
        except BaseException:
            dispatcher.abandon()
            raise
        return dispatcher.finish()

    def ingest_parquet(self, tenant: str, url: str, storage_options: dict[str, Any] | None = None) -> IngestReport:
        """Ingest a Parquet file/dataset in a Ray task near the data (streamed in batches)."""
        return ray.get(ingest_parquet.remote(self.router, self._tenant(tenant), url, storage_options,
                                             self.batch_size, self.max_in_flight))

    def ingest_stream(self, tenant: str, source: Iterable[dict[str, Any]],
                      linger_s: float = DEFAULT_LINGER_S) -> IngestReport:
        """Consume an iterator of event dicts (e.g. `actors.ingest.ndjson_http_source(url)`) until it
        ends; an event waits at most `linger_s` for others to share its batch."""
        return ingest_stream(self.router, self._tenant(tenant), source, self.batch_size, self.max_in_flight,
                             linger_s)

    def flush(self) -> None:
        """Wait until everything ingested is applied, persist sealed snapshots and close the log's
        open segments (`raytwin.logsegments`: compaction takes closed ones)."""
        ray.get([s.flush.remote() for s in self._shards])

    def dead_letters(self, tenant: str | None = None, limit: int | None = None, day: date | None = None) -> pa.Table:
        """The dead letters of `tenant` (None: every tenant's), oldest first: all of them, or the newest `limit`
        (of one UTC `day`), read from the partitions that hold them alone (`StateStore.newest_dead_letters`; a
        tenant with a poison device may have millions)."""
        if limit is None and day is None:
            return self.store.read_dead_letters(tenant)
        return self.store.newest_dead_letters(tenant, limit, day=None if day is None else day.isoformat())

    def close(self) -> None:
        """Kill the shard actors (their state stays in the store; a new service recovers it) and
        release the store's lease, so that any service may start on it."""
        for s in self._shards:
            ray.kill(s, no_restart=True)
        self._shards = []
        release_lease(self.store, self.lease.fence)

