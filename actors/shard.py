"""`TwinShard`: one Ray actor holding many twins behind a per-asset API.

Why shards and not one actor per asset: an actor is a worker process (~100+ MB resident with JAX
loaded, seconds to start), so 10,000 per-asset actors cannot fit a 2-core machine; a twin inside
a shard is a few KB of Python objects. Routing is a stable hash (`actors.routing`).

Durability contract of `ingest`: accepted events are appended to the event log *before* they are
applied and before the call returns, so an acknowledged event is never lost. If the actor dies
mid-call, Ray restarts it (``max_restarts=-1``) and retries the call (``max_task_retries``); the
constructor rebuilds every twin from snapshot + log, and the retried events are then recognised
as duplicates, so nothing is applied twice.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

import ray
from ray.util import metrics

from actors.recovery import recover
from actors.routing import shard_index
from actors.state import IngestReport, Reject, TwinState
from actors.twin import DUPLICATE, TOO_LATE, Twin, apply_many, logged_event
from raytwin.contracts import ContractError, TelemetryEvent, describe_error
from raytwin.statestore import LoggedEvent, StateStore

log = logging.getLogger("raytwin.twins")


class TwinShard:
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
    ):
        self.store = StateStore(store_url, storage_options)
        self.index, self.shards = index, shards
        self.lateness_s, self.snapshot_every, self.checkpoint_every = allowed_lateness_s, snapshot_every, checkpoint_every
        self.twins: dict[tuple[str, str], Twin] = {}
        self.durable_revision: dict[tuple[str, str], int] = {}
        tags = {"shard": str(index)}
        self.m_events = metrics.Counter(
            "raytwin_twin_events_total", "Telemetry events handled by twin shards, by outcome.",
            tag_keys=("shard", "outcome"))
        self.m_events.set_default_tags(tags)
        self.m_twins = metrics.Gauge("raytwin_twins", "Live twins held by a shard.", tag_keys=("shard",))
        self.m_twins.set_default_tags(tags)
        self.m_drift = metrics.Gauge("raytwin_twins_drifting", "Twins whose filter flags drift.", tag_keys=("shard",))
        self.m_drift.set_default_tags(tags)
        self.stale: set[tuple[str, str]] = set()  # twins whose log write failed mid-batch
        for tenant, asset_id, record in self.store.registrations():
            if shard_index(tenant, asset_id, shards) == index:
                self.twins[(tenant, asset_id)] = self._recover(record)
                self.durable_revision[(tenant, asset_id)] = 0  # at worst one snapshot is rewritten as is
        self.m_twins.set(len(self.twins))
        log.info("event=shard_started shard=%d pid=%d twins=%d", index, os.getpid(), len(self.twins))

    def _recover(self, record: dict[str, Any], until_us: int | None = None) -> Twin:
        return recover(self.store, record, allowed_lateness_s=self.lateness_s,
                       checkpoint_every=self.checkpoint_every, until_us=until_us)

    # ------------------------------------------------------------------ twins ----
    def register(self, tenant: str, asset_id: str, record: dict[str, Any]) -> bool:
        """Create the twin (True) or attach to an identical registration (False)."""
        existing = self.store.load_registration(tenant, asset_id)
        if existing is not None and existing != record:
            raise ValueError(f"twin {tenant}/{asset_id} is already registered with a different model or prior; "
                             "unregister it first")
        if (tenant, asset_id) in self.twins:
            return False
        # an asset registered again after `unregister` resumes its stored history, exactly as a
        # restarted shard would (memory and store never disagree)
        twin = self._recover(record)
        self.store.save_registration(tenant, asset_id, record)
        self.twins[(tenant, asset_id)] = twin
        self.durable_revision[(tenant, asset_id)] = 0
        self.m_twins.set(len(self.twins))
        return existing is None

    def register_many(self, items: list[tuple[str, str, dict[str, Any]]]) -> int:
        """`register` for many twins in one call; returns how many were created."""
        return sum(self.register(*item) for item in items)

    def unregister(self, tenant: str, asset_id: str) -> bool:
        """Drop the twin and its registration (its log and snapshots stay, as history)."""
        found = self.twins.pop((tenant, asset_id), None) is not None
        self.durable_revision.pop((tenant, asset_id), None)
        self.store.delete_registration(tenant, asset_id)
        self.m_twins.set(len(self.twins))
        return found

    def assets(self, tenant: str) -> list[str]:
        return sorted(a for t, a in self.twins if t == tenant)

    def _refresh_stale(self) -> None:
        for key in sorted(self.stale & self.twins.keys()):
            self.twins[key] = self._recover(self.store.load_registration(*key))
        self.stale.clear()

    def state(self, tenant: str, asset_id: str) -> TwinState | None:
        self._refresh_stale()
        twin = self.twins.get((tenant, asset_id))
        return None if twin is None else twin.view()

    def state_at(self, tenant: str, asset_id: str, until_us: int) -> TwinState | None:
        """Time travel from the durable store (everything acknowledged is there)."""
        if (tenant, asset_id) not in self.twins:
            return None
        return self._recover(self.store.load_registration(tenant, asset_id), until_us).view()

    def pid(self) -> int:
        return os.getpid()

    def flush(self) -> int:
        """Persist every sealed checkpoint not yet durable; returns how many snapshots were written."""
        return sum(self._snapshot(key, force=True) for key in self.twins)

    # ------------------------------------------------------------------ ingestion ----
    def ingest(self, tenant: str, events: list[TelemetryEvent]) -> IngestReport:
        """Validate against each twin's asset type, log durably, then apply (see module docstring)."""
        self._refresh_stale()
        rejects: list[dict[str, str]] = []
        accepted: dict[tuple[str, str], list[LoggedEvent]] = defaultdict(list)
        batch_keys: set[tuple[str, str]] = set()
        duplicates = 0
        for ev in events:
            twin = self.twins.get((tenant, ev.asset_id))
            reason = None
            if twin is None:
                reason = f"unknown twin {ev.asset_id!r} for tenant {tenant!r}"
            else:
                try:
                    logged = logged_event(ev, twin.artifact.asset_type)
                except ContractError as exc:
                    reason = describe_error(exc)
            if reason is not None:
                rejects.append(_reject(ev, reason))
                continue
            verdict = DUPLICATE if (ev.asset_id, ev.idempotency_key) in batch_keys else twin.classify(logged)
            if verdict == TOO_LATE and self.store.contains(tenant, ev.asset_id, logged.key):
                verdict = DUPLICATE  # a re-delivery of an event applied long ago
            if verdict == DUPLICATE:
                duplicates += 1
            elif verdict == TOO_LATE:
                rejects.append(_reject(ev, TOO_LATE))
            else:
                batch_keys.add((ev.asset_id, ev.idempotency_key))
                accepted[(tenant, ev.asset_id)].append(logged)
        try:
            n_accepted = self.store.append_events(
                tenant, ((asset_id, e) for (_, asset_id), evs in accepted.items() for e in evs))
        except Exception:
            # part of the batch may be durable: rebuild those twins from the store before the next
            # call so memory never lacks an event a recovery would replay
            self.stale.update(accepted)
            raise
        self.store.write_dead_letters(tenant, rejects)
        apply_many([(self.twins[key], evs) for key, evs in accepted.items()])
        for key in accepted:
            self._snapshot(key)
        for outcome, count in (("accepted", n_accepted), ("duplicate", duplicates), ("rejected", len(rejects))):
            if count:
                self.m_events.inc(count, {"outcome": outcome})
        self.m_drift.set(sum(t.fs.divergence.drift for t in self.twins.values()))
        if rejects:
            log.info("event=rejected shard=%d tenant=%s count=%d first_reason=%r",
                     self.index, tenant, len(rejects), rejects[0]["reason"])
        return IngestReport(
            accepted=n_accepted, duplicates=duplicates, rejected=len(rejects),
            reasons=[Reject(idempotency_key=r["idempotency_key"], reason=r["reason"]) for r in rejects],
        )

    def _snapshot(self, key: tuple[str, str], force: bool = False) -> bool:
        snap = self.twins[key].sealed_snapshot()
        last = self.durable_revision[key]
        if snap is None or snap.revision <= last or (not force and snap.revision - last < self.snapshot_every):
            return False
        self.store.write_snapshot(*key, snap)
        self.durable_revision[key] = snap.revision
        return True


def _reject(ev: TelemetryEvent, reason: str) -> dict[str, str]:
    return {"asset_id": ev.asset_id, "idempotency_key": ev.idempotency_key, "reason": reason,
            "raw": ev.model_dump_json()}


TwinShardActor = ray.remote(TwinShard)
"""The actor class; `TwinService` sets its restart/retry options and name."""
