"""`TwinShard`: one Ray actor holding many twins behind a per-asset API.

Why shards and not one actor per asset: an actor is a worker process (~100+ MB resident with JAX
loaded, seconds to start), so 10,000 per-asset actors cannot fit a 2-core machine; a twin inside
a shard is a few KB of Python objects. Routing is a stable hash (`actors.routing`).

Durability contract of `ingest`: accepted events are appended to the event log before the call
returns, so an acknowledged event is never lost. They are applied in memory first and the batch's
dead letters written before the log, those of events the filter refused too (they stay in the log: a
replay refuses them again), so no crash leaves a refused event logged without its dead letter; a write
that fails leaves memory ahead of the store, and those twins are rebuilt from it before the next
call. If the actor dies mid-call, Ray restarts it (``max_restarts=-1``) and retries the call
(``max_task_retries``); the constructor rebuilds every twin from snapshot + log, the retried events
already logged are then recognised as duplicates, so nothing is applied twice, and dead letters
written again replace their file (`dead_letter_stem`), so none is doubled, and keep its time, so none
moves in a connector's dead-letter listing (`serve_apps.dead_letters`).

Every writing call first checks the store's lease (`StateStore.check_lease`, one small file read)
against the shard's `fence` (the owner and epoch of its service's lease): a shard of a service that
was taken over, or of a second service started on the store, is refused with `StoreFenced`
instead of logging events and writing snapshots the lease holder's shards never see. A shard
process renews the lease's heartbeat (`actors.lease.renew_heartbeat`), by which a service in
another Ray cluster tells a live holder from a crashed one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import repeat
from operator import is_, ne
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from actors import retype as retyping
from actors.failover import process_age_s
from actors.heap import freeze_heap
from actors.lease import renew_heartbeat
from actors.migration import migrated_record
from actors.progress import Busy, CallClock, probe_call, probed_actor, timed_calls
from actors.recovery import Replaying, recover, recover_many
from actors.routing import shard_index, shard_prefix
from actors.shadow import ShadowBook
from actors.shard_models import LiveModelOps
from actors.state import IngestReport, Reject, TwinState
from actors.telemetry import (
    ROW_COLUMN,
    SOURCE_COLUMN,
    Entries,
    Normalized,
    bytes_table,
    normalize_entries,
    row_event,
    si_map,
    value_matrix,
)
from actors.twin import (
    CONFLICT,
    DUPLICATE,
    TOO_LATE,
    EventColumns,
    Pending,
    Refused,
    Restarted,
    Twin,
    apply_many,
    apply_next,
    conflict_reason,
    pendings,
    same_content,
)
from raytwin import metrics
from raytwin.contracts import AssetType, ContractError, describe_error, normalize_measurements
from raytwin.executables import kernel_counts
from raytwin.keyindex import Logged, LogKeyIndex, content_digest
from raytwin.logs import component_logging
from raytwin.migration import MigrationPlan
from raytwin.sim.cpu import start_single_core_backend
from raytwin.sim.discovery import simulator_label
from raytwin.statestore import (LOG_BATCH_SCHEMA, StateStore, StoreFenced, column_micros, dead_letter_stem,
                                 from_micros)
from raytwin.store_failures import zero_counts

log = logging.getLogger("raytwin.twins")

RECOVERY_RETRY_S = 2.0
"""Pause before a restarted shard whose recovery failed exits to be started again (no hot loop on the store)."""
SNAPSHOTS_PER_CALL = 8
"""Most snapshots one `ingest` call writes; the others stay due and are written by the next calls.
Why: a snapshot file costs ~0.4 ms, and twins that become due together (every twin of a restarted
shard) would all be written by one call, stalling it by tens of milliseconds. A snapshot only
shortens recovery: the log is what makes an event durable."""
TWIN_OUTCOMES = ("accepted", "duplicate", "rejected", "conflict")
"""The `outcome` tags of `metrics.TWIN_EVENTS`."""


def too_late_reason(event_us: int, twin: Twin) -> str:
    """A too-late event's dead-letter reason: what the window was and what a producer can do."""
    return (f"{TOO_LATE}: event time {from_micros(event_us).isoformat()} is more than the allowed lateness "
            f"({twin.lateness_us / 1e6:g} s) before the newest event time the twin applied "
            f"({from_micros(twin.max_time_us).isoformat()}), and the event is not in the log; a twin applies events in time order, "
            "so send events within the lateness window (the service's allowed_lateness_s)")


def before_recreation(ingest_us: int, floor_us: int) -> str:
    """The dead letter's reason for an event stamped no later than the deletion of its asset's previous
    twin: it cannot be told from that twin's history (`StateStore.save_deletion`), and only a clock behind
    the shard's stamps one so (the asset was created again after the deletion, and the event after that)."""
    return (f"clock_skew: ingest time {from_micros(ingest_us).isoformat()} is not after the deletion of the asset's previous twin at "
            f"{from_micros(floor_us).isoformat()}: the clock that stamped it is behind the twin's shard; send the event again")


def snapshot_phase(tenant: str, asset_id: str, every: int) -> int:
    """Where in each run of `every` events the twin's snapshot falls (0 <= phase < every): twins fed in
    lockstep (a fleet started together at one rate) would otherwise all reach `snapshot_every` in the
    same batch. A hash of the twin, independent of its shard's (`actors.routing`)."""
    digest = hashlib.blake2b(f"{tenant}/{asset_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % every


def asset_codes(asset_ids: pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """The distinct asset ids in order of first appearance, and each row's index among them: what Arrow's
    `dictionary_encode` and reading its dictionary give, at ~0.75x their cost for a live batch's ~100 rows."""
    index: dict[str, int] = {}
    code = [index.setdefault(a, len(index)) for a in asset_ids.to_pylist()]
    return list(index), np.array(code, dtype=np.int32)


def _rows_of(code: np.ndarray, n_assets: int) -> list[tuple[int, list[int]]]:
    """Each asset code's rows in batch order, by code."""
    if n_assets == len(code):  # one row a twin: a live batch's usual shape, no grouping
        return list(enumerate([i] for i in np.argsort(code).tolist()))
    rows_of: dict[int, list[int]] = {}  # plain lists: ~1 event a twin
    for i, c in enumerate(code.tolist()):
        rows_of.setdefault(c, []).append(i)
    return sorted(rows_of.items())


class _Rows:
    """A batch's columns `_admit` reads, as Python values (read once a call)."""

    def __init__(self, batch: pa.Table, misfit: np.ndarray):
        self.batch = batch
        self.keys = batch.column("idempotency_key").to_pylist()
        self.micros = column_micros(batch.column("event_time"))
        self.times = self.micros.tolist()
        self.sequences = batch.column("sequence").to_numpy().tolist()
        self.qualities = batch.column("quality").to_pylist()
        self.misfits = misfit.tolist() if misfit.any() else None  # None: no row misfits (the common case, one check)
        self._ingest_us: np.ndarray | None = None

    def misfit(self, i: int) -> bool:
        return self.misfits is not None and self.misfits[i]

    def pending(self, i: int, matrix: np.ndarray) -> Pending:
        """Row `i` as its twin holds it, with its values from the twin's filter columns `matrix`."""
        return Pending((self.times[i], self.sequences[i], self.keys[i]), matrix[i], self.qualities[i])

    def ingest_us(self) -> np.ndarray:
        """Each row's ingest time (read only for a twin registered again after a deletion: rare)."""
        if self._ingest_us is None:
            self._ingest_us = self.batch.column("ingest_time").cast(pa.int64()).to_numpy()
        return self._ingest_us


@dataclass
class Admission:
    """A batch's rows as `TwinShard._admit` decided them: accepted events per asset code and their
    rows, dead letters (row, reason; None: the contract's unit/name reason) and their causes
    counted by kind (the metric's low-cardinality reasons), duplicates and conflicts (re-used
    identities with other content, also among the dead letters) counted."""

    accepted: dict[int, list[Pending]] = field(default_factory=dict)
    accepted_rows: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str | None]] = field(default_factory=list)
    causes: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    conflicts: int = 0
    each_next: bool = False  # every accepted event applies as its twin's next (`Twin.takes_next`)
    columns: EventColumns | None = None  # the batch's columns, where each twin took its one row next on one filter


class TwinShard(LiveModelOps):
    """Holds the twins whose (tenant, asset) hashes to `index`; every method is per asset or batch."""

    def __init__(
        self,
        store_url: str,
        index: int,
        shards: int,
        *,
        allowed_lateness_s: float,
        snapshot_every: int,
        checkpoint_every: int = 64,
        storage_options: dict[str, Any] | None = None,
        fence: tuple[str, int] | None = None,
        namespace: str = "",  # the Ray namespace its service runs in: its metrics name it
    ):
        self.store = StateStore(store_url, storage_options)
        self.key_index = LogKeyIndex(self.store)  # loaded per partition on the first event beyond a twin's window
        self.fence = None if fence is None else (fence[0], fence[1])  # the service's lease (owner, epoch)
        self.index, self.shards = index, shards
        self.lateness_s, self.snapshot_every, self.checkpoint_every = allowed_lateness_s, snapshot_every, checkpoint_every
        self.twins: dict[tuple[str, str], Twin] = {}
        self.durable_revision: dict[tuple[str, str], int] = {}
        self.phases: dict[tuple[str, str], int] = {}  # each twin's `snapshot_phase`, once computed
        self.between: dict[tuple[str, str], tuple[int, int]] = {}  # (revision, durable) `_snapshot` found between points
        self.tag = str(index)  # the `shard` tag of its metrics
        self.service = metrics.service(namespace, shard_prefix(store_url))  # the tags naming its service (`SERVICE_TAGS`)
        self.tags = {**self.service, "shard": self.tag}  # those of its per-shard metrics
        self.stale: set[tuple[str, str]] = set()  # twins whose log write failed mid-batch
        self.newest_ingest_us = 0  # the latest ingest time this process logged (a deleted twin's history ends there)
        self.retyping: dict[tuple[str, str], dict[str, Any]] = {}  # committed retypes not finished: marked records
        self.restart_series: set[str] = set()  # the simulators whose `FILTER_RESTARTS` this process exported at 0
        started = time.perf_counter()
        metrics.STORE_DAMAGED_FILES.zero(*({"kind": k} for k in metrics.DAMAGED_KINDS))  # before recovery meets one
        self.shadows = ShadowBook(self.store, snapshot_every)  # shadow evaluations (`actors.shard_models`)
        mine = [(t, a, r) for t, a, r in self.store.registrations() if shard_index(t, a, shards) == index]
        recovered = recover_many(self.store, [r for *_, r in mine], allowed_lateness_s=allowed_lateness_s,
                                 checkpoint_every=checkpoint_every)
        for (tenant, asset_id, record), twin in zip(mine, recovered):
            self.twins[(tenant, asset_id)] = twin
            self.durable_revision[(tenant, asset_id)] = twin.restored_revision
            if retyping.pending(record):  # a crash interrupted its retype: the registration says it was committed
                self.retyping[(tenant, asset_id)] = record
                self._try_finish_retype((tenant, asset_id))
        self.drifting = {key for key, twin in self.twins.items() if twin.drift}
        shadowed = self.shadows.resume(self.twins)  # after the twins: a shadow catches up from the log
        metrics.TWINS.set(len(self.twins), **self.tags)
        metrics.TWINS_DRIFTING.set(len(self.drifting), **self.tags)
        metrics.SHARD_STARTED.set(time.time(), **self.tags)  # a new value per restart: a crash loop's count
        # exported at 0 now: a burst that creates a series would not show in `rate()` (`Metric.zero`)
        metrics.TWIN_EVENTS.zero(*({**self.tags, "outcome": o} for o in TWIN_OUTCOMES))
        metrics.zero_dead_letters("shard")
        self._zero_restarts(self.twins.values())
        zero_counts("write")  # its lease heartbeat's failures (`actors.lease.renew_heartbeat`)
        # a restarted shard's first batches (a backlog: the lag SLO's worst) count
        metrics.INGEST_TO_APPLIED.zero(self.service)
        metrics.EVENT_TO_APPLIED.zero(self.service)
        kernels = kernel_counts()
        log.info("event=shard_started shard=%d pid=%d twins=%d shadowed=%d process_age_s=%.2f recover_s=%.2f "
                 "kernels_loaded=%d kernels_compiled=%d", index, os.getpid(), len(self.twins), shadowed,
                 process_age_s(), time.perf_counter() - started, kernels["loaded"], kernels["compiled"])

    def _recover(self, record: dict[str, Any], until_us: int | None = None, replaying: Replaying | None = None
                 ) -> Twin:
        twin = recover(self.store, record, allowed_lateness_s=self.lateness_s,
                       checkpoint_every=self.checkpoint_every, until_us=until_us, replaying=replaying)
        self._zero_restarts([twin])  # a registered, retyped or migrated twin may run a simulator new to this shard
        return twin

    def _zero_restarts(self, twins: Iterable[Twin]) -> None:
        """Export `metrics.FILTER_RESTARTS` at 0 for the simulators of `twins` (each model version they run) that
        this process has not: a twin's first restart must show in `rate()`/`increase()`, which a series first seen
        at 1 hides (`Metric.zero`), and the alert on restarts reads `increase()`."""
        refs = {seg.artifact.asset_type.simulator for twin in twins for seg in twin.segments}
        labels = {simulator_label(ref) for ref in refs} - self.restart_series
        if labels:
            metrics.FILTER_RESTARTS.zero(*({"simulator": label} for label in sorted(labels)))
            self.restart_series |= labels

    # ------------------------------------------------------------------ twins ----
    def register(self, tenant: str, asset_id: str, record: dict[str, Any]) -> bool:
        """Create the twin (True) or attach to an identical registration (False)."""
        self.store.check_lease(self.fence)
        return self._register(tenant, asset_id, record)

    def _register(self, tenant: str, asset_id: str, record: dict[str, Any]) -> bool:
        existing = self.store.load_registration(tenant, asset_id)
        if existing is not None and retyping.unmarked(existing) != record:
            raise ValueError(f"twin {tenant}/{asset_id} is already registered with a different model or prior; "
                             "unregister it first")
        if (tenant, asset_id) in self.twins:
            return False
        if existing is None and asset_id in self.store.history_floors(tenant, [asset_id]):
            # registered again after `unregister`: a new twin, which recovery starts after the deleted one's
            # history; what that one derived goes first, should its deletion have stopped before removing it
            self.store.forget_twin(tenant, asset_id)
        self.store.mark_logged_assets(tenant)  # once per tenant: then a new twin's recovery reads none of the log
        twin = self._recover(record)
        self.store.save_registration(tenant, asset_id, record)
        self.twins[(tenant, asset_id)] = twin
        self.durable_revision[(tenant, asset_id)] = twin.restored_revision
        metrics.TWINS.set(len(self.twins), **self.tags)
        return existing is None

    def register_many(self, items: list[tuple[str, str, dict[str, Any]]]) -> int:
        """`register` for many twins in one call; returns how many were created."""
        self.store.check_lease(self.fence)
        return sum(self._register(*item) for item in items)

    def unregister(self, tenant: str, asset_id: str) -> bool:
        """Drop the twin and its registration. Its log stays, as history; a twin registered again under
        the same id starts afresh, after it (`StateStore.save_deletion`), and what it derived from that
        history (snapshots, drift clear, model swaps) is removed. The deletion is recorded and the removal
        done whether or not the twin was found: a shard killed after removing the registration, before
        recording the deletion, came back without the twin, so the call resent (Ray retries it on the restarted
        shard) recorded nothing, and the twin registered again resumed the deleted one's history."""
        self.store.check_lease(self.fence)
        self.shadows.forget(tenant, asset_id)  # first: a crash from here on leaves no orphaned shadow record
        found = self.twins.pop((tenant, asset_id), None) is not None
        for kept in (self.durable_revision, self.phases, self.between):  # per-twin bookkeeping, gone with it
            kept.pop((tenant, asset_id), None)
        self.retyping.pop((tenant, asset_id), None)  # what it would remove goes below
        self.store.delete_registration(tenant, asset_id)
        # its history ends at the latest ingest time logged here (a clock ahead of this one's too)
        self.store.save_deletion(tenant, asset_id, max(time.time_ns() // 1000, self.newest_ingest_us))
        self.store.forget_twin(tenant, asset_id)
        metrics.TWINS.set(len(self.twins), **self.tags)
        return found

    def retype(self, tenant: str, asset_id: str, record: dict[str, Any]) -> bool:
        """Put the twin on another type version's model (its asset's type version changed): its stored
        history replayed by the new model from `record`'s prior (a migrated twin's: from its migration's
        mapped state and point, `actors.retype.carried`), its state not mapped (`migrate` maps it). All or
        nothing, in the order `actors.retype` gives: the replay first, in memory (if it raises, or the new
        version's plausible ranges exclude a reading it applies or a state it reaches, `actors.retype.plausible`,
        the old twin stays registered and serving, and the error is the caller's); then the registration,
        marked with the replay's sealed snapshot, is the commit; then the swap and the removal of what the
        old model derived. The same retype again (a retried call) changes nothing. False: no such twin."""
        self.store.check_lease(self.fence)
        key = (tenant, asset_id)
        existing = self.store.load_registration(tenant, asset_id)
        if existing is None:
            return False
        record = retyping.carried(existing, record)
        if retyping.unmarked(existing) == record:  # done (a retried call), or committed and still to finish
            if key in self.retyping:
                self._finish_retype(key)
            return True
        twin = retyping.replayed(existing, record, self._recover)
        committed = retyping.marked(record, twin.sealed_snapshot())
        self.shadows.forget(tenant, asset_id)
        self.store.save_registration(tenant, asset_id, committed)
        self.twins[key], self.retyping[key], self.durable_revision[key] = twin, committed, 0
        (self.drifting.add if twin.drift else self.drifting.discard)(key)
        metrics.TWINS_DRIFTING.set(len(self.drifting & self.twins.keys()), **self.tags)
        log.info("event=twin_retyped tenant=%s asset=%s from=%s@%s to=%s revision=%d", tenant, asset_id,
                 existing["artifact"]["name"], existing["artifact"]["version"], twin.artifact.ref, twin.events_applied)
        self._try_finish_retype(key)
        return True

    def _finish_retype(self, key: tuple[str, str]) -> None:
        """Finish the twin's committed retype (`actors.retype.finish`); raises what the store raised."""
        self.store.check_lease(self.fence)
        self.durable_revision[key] = retyping.finish(self.store, *key, self.retyping[key])
        del self.retyping[key]

    def _try_finish_retype(self, key: tuple[str, str]) -> bool:
        """`_finish_retype`, a failure logged: the retype holds (its marked registration is the new version's),
        and the shard's next write of the twin's derived state (snapshot, drift clear, model swap) finishes it."""
        try:
            self._finish_retype(key)
            return True
        except Exception:
            log.warning("event=retype_unfinished shard=%d tenant=%s asset=%s: its registration is the new "
                        "version's; the old model's snapshots are removed by the twin's next write",
                        self.index, *key, exc_info=True)
            return False

    def _settle(self, key: tuple[str, str]) -> None:
        """Before the twin's derived state is written: its retype finished (raises if it cannot be),
        so that finishing it later cannot remove what the new model wrote."""
        if key in self.retyping:
            self._finish_retype(key)

    def migrate(self, tenant: str, asset_id: str, target: dict[str, Any],
                plan: MigrationPlan) -> tuple[TwinState, TwinState] | None:
        """Move the twin to another type version (`actors.migration`) between two ingest calls, so no
        event is half applied or lost; (state before, state after), None: no such twin."""
        self.store.check_lease(self.fence)
        self._refresh_stale()
        key = (tenant, asset_id)
        twin = self.twins.get(key)
        if twin is None:
            return None
        self._settle(key)
        record = migrated_record(self.store.load_registration(tenant, asset_id), target, twin, plan)
        self.store.save_registration(tenant, asset_id, record)
        self.twins[key] = self._recover(record)
        self.durable_revision[key] = self.twins[key].events_applied
        self.drifting.discard(key)  # the new version's drift detector starts afresh
        metrics.TWINS_DRIFTING.set(len(self.drifting & self.twins.keys()), **self.tags)
        log.info("twin_migrated tenant=%s asset=%s from=%s to=%s revision=%d", tenant, asset_id, twin.artifact.ref,
                 self.twins[key].artifact.ref, twin.events_applied)
        return twin.view(), self.twins[key].view()

    def assets(self, tenant: str) -> list[str]:
        return sorted(a for t, a in self.twins if t == tenant)

    def twin_count(self) -> int:
        """How many twins (of all tenants) this shard holds."""
        return len(self.twins)

    def _refresh_stale(self) -> None:
        if not self.stale:
            return
        keys = sorted(self.stale & self.twins.keys())
        for key, twin in zip(keys, recover_many(self.store, [self.store.load_registration(*k) for k in keys],
                                                allowed_lateness_s=self.lateness_s,
                                                checkpoint_every=self.checkpoint_every)):
            self.twins[key] = twin
        self.stale.clear()

    def state(self, tenant: str, asset_id: str) -> TwinState | None:
        self._refresh_stale()
        twin = self.twins.get((tenant, asset_id))
        return None if twin is None else twin.view()

    def states(self, tenant: str, asset_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The estimate and std of the tenant's twins among `asset_ids` held here (one call for a query
        over many twins instead of one per twin); unknown ids are left out."""
        return {s.asset_id: s.query_view() for s in self._views(tenant, asset_ids)}

    def marks(self, tenant: str) -> dict[str, tuple[int, bool]]:
        """(revision, drift flag) of each of the tenant's twins held here, without building their states: what the
        change log records of a twin, so the backend reads the states of the twins that moved only
        (`serve_apps.backend.Backend._record_connector_changes`)."""
        self._refresh_stale()
        return {a: (twin.events_applied, bool(twin.fs.divergence.drift)) for (t, a), twin in self.twins.items()
                if t == tenant}

    def full_states(self, tenant: str, asset_ids: list[str]) -> list[TwinState]:
        """`state` of each of the tenant's twins among `asset_ids` held here, in one call (the change log's catch-up
        reads every twin at a backend's start: not 100,000 calls at 100,000 twins); unknown ids are left out."""
        return self._views(tenant, asset_ids)

    def _views(self, tenant: str, asset_ids: list[str]) -> list[TwinState]:
        self._refresh_stale()
        twins = (self.twins.get((tenant, asset_id)) for asset_id in asset_ids)
        return [twin.view() for twin in twins if twin is not None]

    def clear_drift(self, tenant: str, asset_id: str) -> TwinState | None:
        """Acknowledge the twin's drift alarm (`actors.twin.Twin.clear_drift`); None: no such twin."""
        self._refresh_stale()
        twin = self.twins.get((tenant, asset_id))
        if twin is None:
            return None
        self.store.check_lease(self.fence)
        self._settle((tenant, asset_id))
        was = twin.drift
        if twin.last_key is not None:  # recorded first: a clear acknowledged is a clear a restart keeps
            self.store.save_drift_clear(tenant, asset_id, twin.last_key)
        twin.clear_drift()
        if not twin.drift:
            self.drifting.discard((tenant, asset_id))
        metrics.TWINS_DRIFTING.set(len(self.drifting & self.twins.keys()), **self.tags)
        log.info("drift_cleared tenant=%s asset=%s was_drifting=%s revision=%d", tenant, asset_id, was,
                 twin.events_applied)
        return twin.view()

    def state_at(self, tenant: str, asset_id: str, until_us: int) -> TwinState | None:
        """Time travel from the durable store (everything acknowledged is there)."""
        if (tenant, asset_id) not in self.twins:
            return None
        return self._recover(self.store.load_registration(tenant, asset_id), until_us).view()

    def pid(self) -> int:
        return os.getpid()

    def flush(self) -> int:
        """Persist every sealed checkpoint not yet durable and close the log's open segments (so a
        compaction can take them), and hand this process's metric counts to Ray (`raytwin.metrics.flush`: the
        service may stop the shard next); returns how many snapshots were written."""
        self.store.check_lease(self.fence)
        self.store.close_segments()
        metrics.flush()
        return sum(self._snapshot(key, force=True) for key in self.twins)

    # ------------------------------------------------------------------ ingestion ----
    def ingest(self, tenant: str, batch: pa.Table | bytes, states: bool = False) -> IngestReport:
        """Check a validated batch (`VALIDATED_SCHEMA`, or its IPC bytes: `actors.telemetry.table_bytes`,
        what the dispatcher sends) against each twin's asset type, apply the accepted events, write the
        dead letters, then log the events durably (see module docstring). Column-wise except for the
        per-event ordering and de-duplication decisions. Refused (`StoreFenced`) once the store's lease
        is not this shard's: it writes nothing then. `states`: the report carries
        the new state of every twin that accepted events (the API's change log records them)."""
        self.store.check_lease(self.fence)
        self._refresh_stale()
        batch = bytes_table(batch)
        assets, code = asset_codes(batch.column("asset_id"))
        twins = [self.twins.get((tenant, a)) for a in assets]
        entries = Entries.of(batch.column("measurements").combine_chunks())
        normalized, values = self._normalize(entries, twins, code)
        si_values = si_map(entries, normalized)
        adm = self._admit(tenant, batch, assets, twins, code, values, normalized.misfit, si_values)
        accepted = adm.accepted
        rejects = [self._reject(batch, i, reason, twins[code[i]]) for i, reason in adm.rejected]

        columns = [batch.column(n) for n in ("asset_id", "event_time", "sequence", "idempotency_key", "quality")]
        log_rows = pa.table([*columns, si_values, batch.column("ingest_time")], schema=LOG_BATCH_SCHEMA)
        if adm.accepted_rows != list(range(batch.num_rows)):  # else every row, in order: a live batch's usual case
            log_rows = log_rows.take(pa.array(adm.accepted_rows, pa.int64()))
        try:
            if adm.columns is not None:  # every twin of the batch takes its one row, in row order
                applied = apply_next(twins, [evs[0] for evs in accepted.values()], adm.columns)
            else:
                applied = apply_many([(twins[c], evs) for c, evs in accepted.items()], each_next=adm.each_next)
            refused = self._refused(tenant, batch, adm, assets, applied.refused)
            self._restarted(tenant, adm, assets, applied.restarted)
            rejects += refused
            if rejects:  # their file is named by their batch's ingest times: the same on a Ray retry
                retried = batch.column("ingest_time").cast(pa.int64()).to_numpy().tobytes()
                self.store.write_dead_letters(tenant, rejects, stem=dead_letter_stem(rejects, retried))
            n_accepted = self.store.append_log(tenant, log_rows, [assets[c] for c in accepted]) - len(refused)
        except Exception:
            # memory is ahead of the store (applied, none or part of the batch logged): rebuild those
            # twins from the store before the next call so memory holds exactly what a recovery replays
            self.stale.update((tenant, assets[c]) for c in accepted)
            raise
        positions = batch.column(ROW_COLUMN).to_pylist() if rejects and ROW_COLUMN in batch.column_names else None
        if self.shadows.shadows:
            self.shadows.observe(tenant, [(assets[c], evs) for c, evs in accepted.items()])
        self._observe_lag(log_rows)
        snapshots = 0
        durable, retyping, drifting, between = self.durable_revision, self.retyping, self.drifting, self.between
        for c in accepted:
            twin, key = twins[c], (tenant, assets[c])
            # one whose oldest checkpoint is not newer than its snapshot, or where `_snapshot` last found it between
            # two snapshot points (most calls), has none to write (`_snapshot`)
            if snapshots < SNAPSHOTS_PER_CALL and (key in retyping or (
                    (revision := twin.checkpoints[0].events_applied) > (last := durable[key])
                    and between.get(key) != (revision, last))):
                snapshots += self._snapshot(key)
            if twin.drift:
                drifting.add(key)
            elif drifting:
                drifting.discard(key)
        for outcome, count in zip(TWIN_OUTCOMES, (n_accepted, adm.duplicates, len(rejects) - adm.conflicts,
                                                  adm.conflicts), strict=True):
            metrics.TWIN_EVENTS.inc(count, **self.tags, outcome=outcome)
        for cause, count in adm.causes.items():
            metrics.DEAD_LETTERS.inc(count, stage="shard", reason=cause)
        metrics.TWINS_DRIFTING.set(len(self.drifting & self.twins.keys()), **self.tags)
        if rejects:
            log.info("event=rejected shard=%d tenant=%s count=%d first_reason=%r",
                     self.index, tenant, len(rejects), rejects[0]["reason"])
        return IngestReport(
            accepted=n_accepted, duplicates=adm.duplicates, rejected=len(rejects), conflicts=adm.conflicts,
            reasons=[Reject(idempotency_key=r["idempotency_key"], reason=r["reason"], index=positions and positions[i])
                     for r, (i, _) in zip(rejects, adm.rejected)],
            states=[twins[c].view() for c in accepted] if states else [],
        )

    def _refused(self, tenant: str, batch: pa.Table, adm: Admission, assets: list[str],
                 refused: list[Refused]) -> list[dict[str, str]]:
        """The dead letters of this batch's events the filter refused (`actors.twin.Refused`), each also moved
        from accepted to rejected in `adm`; each refusal logged as a warning. They stay in the log: a replay
        refuses them again (the same kernel), so a recovered twin equals the live one."""
        if not refused:
            return []
        rows = iter(adm.accepted_rows)  # in the order `_admit` accepted them: asset by asset
        row_of = {(assets[c], ev.key): next(rows) for c, evs in adm.accepted.items() for ev in evs}
        out = []
        for r in refused:
            row, reason = row_of.get((r.twin.asset_id, r.event.key)), r.reason()  # row None: an earlier batch's event
            log.warning("event=update_refused shard=%d tenant=%s asset=%s event_time=%s this_batch=%s reason=%r",
                        self.index, tenant, r.twin.asset_id, from_micros(r.event.key[0]).isoformat(), row is not None,
                        reason)
            if row is not None:
                adm.rejected.append((row, reason))
                adm.causes["non_finite"] += 1
                out.append(self._reject(batch, row, reason, r.twin))
        return out

    def _restarted(self, tenant: str, adm: Admission, assets: list[str], restarted: list[Restarted]) -> None:
        """Count and log each event of this batch the filter restarted a twin on (`actors.twin.Restarted`): its
        estimate started over from the state before a gap, which its state alone does not show as it happens. An
        earlier batch's event a late one re-applied was counted with its own batch."""
        if not restarted:
            return
        this_batch = {(assets[c], ev.key) for c, evs in adm.accepted.items() for ev in evs}
        for r in restarted:
            if (r.twin.asset_id, r.event.key) not in this_batch:
                continue
            metrics.FILTER_RESTARTS.inc(simulator=simulator_label(r.twin.artifact.asset_type.simulator))
            log.warning("event=filter_restarted shard=%d tenant=%s asset=%s event_time=%s gap_s=%.3f", self.index,
                        tenant, r.twin.asset_id, from_micros(r.event.key[0]).isoformat(), r.gap_s)

    def _observe_lag(self, applied: pa.Table) -> None:
        """Event time -> applied and ingest time -> applied of the rows just applied; the newest ingest time."""
        if applied.num_rows:
            now_us = time.time_ns() // 1000
            for column, metric in (("event_time", metrics.EVENT_TO_APPLIED), ("ingest_time", metrics.INGEST_TO_APPLIED)):
                us = column_micros(applied.column(column))
                metric.observe_many(np.maximum(now_us - us, 0) / 1e6, **self.service)
            self.newest_ingest_us = max(self.newest_ingest_us, int(us.max()))

    @staticmethod
    def _normalize(entries: Entries, twins: list[Twin | None], code: np.ndarray) -> tuple[Normalized, list[np.ndarray | None]]:
        """Measurements in their twin's asset type units; per asset (code), the SI value matrix of
        every row in its filter's columns (None for an unknown twin)."""
        targets: dict[int, int] = {}  # id of a twin's filter -> index in `columns`
        columns: list[tuple[AssetType, tuple[str, ...]]] = []
        asset_target = []  # a list, not an array: a NumPy item per twin costs more than the loop (~100 a call)
        for twin in twins:
            if twin is None:
                asset_target.append(-1)
                continue
            t = targets.setdefault(id(twin.filter), len(columns))
            if t == len(columns):
                columns.append((twin.artifact.asset_type, twin.filter.measured_names))
            asset_target.append(t)
        row_target = np.array(asset_target, dtype=np.int64)[code]
        normalized = normalize_entries(entries, row_target, columns)
        matrices = [value_matrix(entries, normalized, row_target == t, len(names)) for t, (_, names) in enumerate(columns)]
        return normalized, [None if t < 0 else matrices[t] for t in asset_target]

    def _admit(self, tenant: str, batch: pa.Table, assets: list[str], twins: list[Twin | None], code: np.ndarray,
               values: list[np.ndarray | None], misfit: np.ndarray, si_values: pa.MapArray) -> Admission:
        """Decide each row: accepted, duplicate, conflict or rejected (see `Admission`). Rows beyond
        their twin's lateness window are decided from the durable log, all at once (`_from_log`)."""
        rows = _Rows(batch, misfit)
        adm = Admission()
        if self._admit_next(adm, rows, twins, values):
            return adm
        late: list[tuple[int, int, Pending]] = []  # (asset code, row, event) beyond their twin's window
        next_only = True  # every accepted event `Twin.takes_next` (`apply_many`'s `each_next`)
        accepted, accepted_rows, misfits = adm.accepted, adm.accepted_rows, rows.misfits
        for c, found_rows in _rows_of(code, len(assets)):
            twin = twins[c]
            if twin is None:
                adm.rejected += [(i, f"unknown twin {assets[c]!r} for tenant {tenant!r}") for i in found_rows]
                adm.causes["unknown_twin"] += len(found_rows)
                continue
            if len(found_rows) == 1 and twin.history_floor_us is None and (misfits is None or not misfits[found_rows[0]]):
                ev = rows.pending(found_rows[0], values[c])
                if twin.takes_next(ev.key):  # `classify` would accept it
                    accepted[c] = [ev]
                    accepted_rows += found_rows
                    continue
                found = [ev]
            else:
                found_rows = self._admissible(adm, rows, twin, found_rows)
                found = [rows.pending(i, values[c]) for i in found_rows]
            next_only = False
            verdicts = twin.classify(found)
            if found and not any(verdicts):  # the common case: every event of the twin applies
                accepted[c] = found
                accepted_rows += found_rows
                continue
            for i, ev, verdict in zip(found_rows, found, verdicts):
                if verdict == TOO_LATE:  # decided below, from the log, all at once
                    late.append((c, i, ev))
                elif verdict is None:
                    accepted.setdefault(c, []).append(ev)
                    accepted_rows.append(i)
                else:
                    self._count(adm, twin, i, ev, verdict)
        adm.each_next = next_only
        # an event beyond its twin's window is never applied (`_from_log`), so deciding it after the others
        # leaves the accepted events and rows in the same order
        verdicts = self._from_log(tenant, [(twins[c], assets[c], i, ev) for c, i, ev in late], si_values)
        for (c, i, ev), verdict in zip(late, verdicts):
            self._count(adm, twins[c], i, ev, verdict)
        adm.rejected.sort(key=lambda r: r[0])
        return adm

    @staticmethod
    def _admit_next(adm: Admission, rows: _Rows, twins: list[Twin | None], values: list[np.ndarray | None]) -> bool:
        """Admit a live call's usual batch at once, if it is one: one row a twin (row i is asset code i), every twin
        known, no misfit, no history floor, and each row `Twin.takes_next` (what `_admit`'s loop accepts then, in the
        same order); with the rows' columns for the filter (`Admission.columns`). False (`adm` untouched): not such
        a batch, for `_admit`'s loop to decide row by row."""
        n = len(twins)
        if (not n or n != len(rows.keys) or rows.misfits is not None or None in twins
                or any(twin.history_floor_us is not None for twin in twins)):
            return False
        keys = list(zip(rows.times, rows.sequences, rows.keys))
        if not all(map(Twin.takes_next, twins, keys)):
            return False
        matrix = values[0]
        one_filter = all(map(is_, values, repeat(matrix)))  # else each row from its own filter's matrix
        events = pendings(keys, matrix if one_filter else map(np.ndarray.__getitem__, values, range(n)),
                          rows.qualities)
        adm.accepted.update(zip(range(n), ([ev] for ev in events)))
        adm.accepted_rows += range(n)
        adm.each_next = True
        if one_filter:
            adm.columns = EventColumns(rows.micros / 1e6, matrix,
                                       np.fromiter(map(ne, rows.qualities, repeat("bad")), dtype=bool, count=n))
        return True

    @staticmethod
    def _admissible(adm: Admission, rows: _Rows, twin: Twin, found: list[int]) -> list[int]:
        """The twin's rows `found` less those refused before ordering (recorded in `adm`): misfits, and events
        ingested before a deletion of the asset's previous twin."""
        misfits = [i for i in found if rows.misfit(i)]
        if misfits:
            adm.rejected += [(i, None) for i in misfits]
            adm.causes["misfit"] += len(misfits)
            found = [i for i in found if not rows.misfit(i)]
        floor = twin.history_floor_us
        if floor is not None:
            ingest_us = rows.ingest_us()
            early = [i for i in found if ingest_us[i] <= floor]
            adm.rejected += [(i, before_recreation(int(ingest_us[i]), floor)) for i in early]
            adm.causes["clock_skew"] += len(early)
            found = [i for i in found if ingest_us[i] > floor]
        return found

    @staticmethod
    def _count(adm: Admission, twin: Twin, i: int, ev: Pending, verdict: str) -> None:
        """Record row `i`'s verdict other than accepted in `adm`."""
        if verdict == DUPLICATE:
            adm.duplicates += 1
        elif verdict == CONFLICT:
            adm.conflicts += 1
            adm.rejected.append((i, conflict_reason(ev.key)))
            adm.causes["conflict"] += 1
        else:  # TOO_LATE, BEFORE_MIGRATION
            adm.rejected.append((i, too_late_reason(ev.key[0], twin) if verdict == TOO_LATE else verdict))
            adm.causes["too_late"] += 1

    def _from_log(self, tenant: str, late: list[tuple[Twin, str, int, Pending]], si_values: pa.MapArray) -> list[str]:
        """The verdicts of events older than their twin's watermark (twin, asset, row, event): a
        re-delivery of a logged event (DUPLICATE), a logged identity with other content (CONFLICT)
        or a new event (TOO_LATE). One key-index lookup for the batch (`raytwin.keyindex`); logged
        rows are read only where the index holds other content for the identity."""
        if not late:
            return []
        logged_values = si_values.take(pa.array([i for _, _, i, _ in late], pa.int64())).to_pylist()
        answers = self.key_index.lookup(tenant, [(asset_id, ev.key, content_digest(ev.quality, v))
                                                 for (_, asset_id, _, ev), v in zip(late, logged_values)])
        confirm = [(asset_id, ev.key) for (_, asset_id, _, ev), a in zip(late, answers) if a is Logged.CONFIRM]
        floors = {asset_id: twin.history_floor_us for twin, asset_id, _, _ in late if twin.history_floor_us is not None}
        logged = self.store.find_events(tenant, confirm, floors) if confirm else {}
        verdicts = []
        for (twin, asset_id, _, ev), answer in zip(late, answers):
            if answer is Logged.SAME:
                verdicts.append(DUPLICATE)
            elif answer is Logged.ABSENT or (asset_id, ev.key) not in logged:
                verdicts.append(TOO_LATE)
            else:
                verdicts.append(DUPLICATE if same_content(twin.pending(logged[asset_id, ev.key]), ev) else CONFLICT)
        return verdicts

    @staticmethod
    def _reject(batch: pa.Table, i: int, reason: str | None, twin: Twin | None) -> dict[str, str]:
        """The dead letter of row `i`; reason None: the contract's reason why it does not fit the twin's type.
        Led by the row's source where the batch names it (`SOURCE_COLUMN`: a connector's dead letters)."""
        ev = row_event(batch, i)
        if reason is None:
            try:
                normalize_measurements(ev, twin.artifact.asset_type)
            except ContractError as exc:
                reason = describe_error(exc)
            else:
                raise RuntimeError(f"column check and contract disagree on event {ev.idempotency_key!r}")
        if SOURCE_COLUMN in batch.column_names:
            reason = f"{batch.column(SOURCE_COLUMN)[i].as_py()}: {reason}"
        return {"asset_id": ev.asset_id, "idempotency_key": ev.idempotency_key, "reason": reason,
                "raw": ev.model_dump_json()}

    def _snapshot(self, key: tuple[str, str], force: bool = False) -> bool:
        """Write the twin's sealed checkpoint if it has none yet, if it crossed its next snapshot point
        (every `snapshot_every` events, at the twin's `snapshot_phase`), or if `force` and it is newer.
        Why the first at once: while its shard restarts a twin is read from its snapshot
        (`actors.recovery.durable_state`), and one without would answer its prior, as if it had no data."""
        if key in self.retyping and not self._try_finish_retype(key):
            return False  # the store's snapshots may still be the old model's
        twin, last = self.twins[key], self.durable_revision[key]
        revision = twin.sealed_revision  # checked first: encoding a snapshot per twin per batch is wasted
        if revision is None or revision <= last:
            return False
        if not force and last > 0:
            phase = self.phases.get(key)
            if phase is None:
                phase = self.phases[key] = snapshot_phase(*key, self.snapshot_every)
            if (revision + phase) // self.snapshot_every == (last + phase) // self.snapshot_every:
                self.between[key] = (revision, last)  # the same answer until either changes: `ingest` asks no more
                return False
        self.store.write_snapshot(*key, twin.sealed_snapshot())
        self.durable_revision[key] = revision
        return True


@timed_calls
class TwinShardProcess(TwinShard):
    """A shard as the only tenant of a Ray worker process: it owns that process's log set-up, its
    garbage collector (`actors.heap.freeze_heap` before the first batch after start or
    registrations) and its JAX backend, sized for the one core a shard has
    (`raytwin.sim.cpu.start_single_core_backend`: XLA otherwise splits a dispatch's large fused loops
    into tasks for a thread per core of the node, each hand-off waiting for that thread to be
    scheduled on cores the other shards and the driver keep busy). Its calls are timed for `probe`,
    which answers beside them (`actors.progress`)."""

    def __init__(self, store_url: str, index: int, *args: Any, **kwargs: Any):
        self.call_clock = CallClock()
        component_logging()
        start_single_core_backend()  # before recovery runs the first kernel
        try:
            super().__init__(store_url, index, *args, **kwargs)
        except StoreFenced:
            raise  # a newer service holds the store: this shard must stay down
        except Exception:
            if not ray.get_runtime_context().was_current_actor_reconstructed:
                raise  # a first start: its error is the starting service's to report
            # Ray does not restart an actor whose constructor raised: it would be dead for good, its twins
            # unanswered, on a store error that may pass (an S3 timeout). Exiting is a crash Ray restarts from,
            # and the shard stays RESTARTING (paged as RayTwinShardDown) until its store reads succeed.
            log.exception("event=shard_recovery_failed shard=%d retry_in_s=%g", index, RECOVERY_RETRY_S)
            time.sleep(RECOVERY_RETRY_S)
            os._exit(1)
        if self.fence is not None:
            renew_heartbeat(self.store, self.fence)  # the service is alive while any of its shards is
        self.heap_frozen = False

    def _register(self, tenant: str, asset_id: str, record: dict[str, Any]) -> bool:
        self.heap_frozen = False  # new twins; the first of a model compiles its kernels
        return super()._register(tenant, asset_id, record)

    def migrate(self, *args: Any) -> tuple[TwinState, TwinState] | None:
        self.heap_frozen = False  # a new twin, maybe of a model whose kernels compile now
        return super().migrate(*args)

    def retype(self, *args: Any) -> bool:
        self.heap_frozen = False  # as `migrate`
        return super().retype(*args)

    def ingest(self, tenant: str, batch: pa.Table | bytes, states: bool = False) -> IngestReport:
        if not self.heap_frozen:
            freeze_heap()
            self.heap_frozen = True
        return super().ingest(tenant, batch, states)

    @probe_call
    def probe(self) -> Busy | None:
        """The readiness probe (`TwinService.shards_answering`): the call this shard runs now and for how long,
        None when idle; answered on the probe group's thread at once, however many calls are queued."""
        return self.call_clock.busy()


TwinShardActor = probed_actor(TwinShardProcess)
"""The actor class: its calls one at a time in order, `probe` on a thread of its own; `TwinService` sets its
restart/retry options and name."""
