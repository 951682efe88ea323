"""Retyping a twin all or nothing: its asset's type version changed in place (`TwinShard.retype`).

The order, and why. The registration record is what a restarted shard rebuilds the twin from, so
writing it is the commit, and everything that can fail comes before it:
1. the new model replays the twin's log in memory (nothing written): a replay that raises, or whose
   readings or states the new version's plausible ranges exclude (`plausible`), leaves the old twin
   registered, in memory and serving, and the caller gets the error. A migrated twin's record keeps
   its migration (`carried`): the replay starts where the migration did, from its mapped state, not
   from the start of a log whose earlier events the older version logged;
2. the old model's shadow evaluation of the twin ends (it cannot go on across the retype);
3. commit: one write of the new registration, *marked* (`MARK`) with the replay's sealed snapshot;
4. the new twin replaces the old one in memory;
5. what the old model derived from the history (snapshots, drift clear, model swaps) is removed,
   the replay's snapshot written, and the mark dropped (`finish`; each step can be redone).
A crash before 3 leaves the old twin whole. From 3 on the record is the new version's: until 5 is
done, recovery and reads from the store (`actors.recovery`) honour the mark: they ignore the old
model's snapshots, drift clear and swaps and start from the marked snapshot, so a shard killed
right after a retype comes back on the new version, and a read while it is down answers the
replayed state (not the prior, nor the old model's). A restarted shard, or the shard's next write
after a failed step 5, finishes it. The other order (write the registration first and roll it back
when the replay fails) leaves a window in which the store names a model the twin does not run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actors.twin import Twin
from raytwin import units
from raytwin.compat import require_plausible
from raytwin.estimation import FilterState
from raytwin.statestore import LoggedEvent, Snapshot, StateStore, from_micros

MARK = "retyping"
"""Key of a registration record whose retype is committed but not finished: {"snapshot": the
replay's sealed snapshot as JSON, or None}."""


class RetypeFailed(RuntimeError):
    """A retype whose replay on the new model raised: nothing was changed, the twin serves its old version."""


def carried(existing: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """`record` (the new version's registration) keeping the migration of `existing` (the twin's current one):
    its starting point (the mapped prior, the event, revision, filter time and inputs it starts at). Why: a
    migrated twin's history before that point was logged under an older type version's names and units, and
    its state there was mapped, not replayed; a retype requires the same states in the same units
    (`raytwin.compat.replay_differences`), so the mapped prior stands on the new version as it was."""
    migration = existing.get("migration")
    if migration is None:
        return record
    return {**record, "initial_state": existing["initial_state"], "initial_std": existing["initial_std"],
            "migration": migration}


def replayed(existing: dict[str, Any], record: dict[str, Any], replay: Callable[..., Twin]) -> Twin:
    """Step 1: the twin of `record` replayed from its log alone by `replay` (`actors.recovery.recover`: the
    store's snapshots, drift clear and swaps are the old model's); `RetypeFailed`, saying nothing changed, if
    that raises; `raytwin.compat.IncompatibleReplay` if the new version's ranges refuse it (`plausible`)."""
    applied: list[LoggedEvent] = []
    try:
        twin = replay(marked(record, None), replaying=lambda _, events: applied.extend(events))
    except Exception as exc:
        asset, artifact = record["asset"], record["artifact"]
        raise RetypeFailed(
            f"twin {asset['tenant']}/{asset['id']} stays on its type version, serving as before: replaying its "
            f"history on {artifact['name']}@{artifact['version']} failed ({type(exc).__name__}: {exc}), and nothing "
            "was changed; fix the cause and retype again, or migrate it (which maps its state)") from exc
    plausible(twin, existing, applied)
    return twin


def plausible(twin: Twin, existing: dict[str, Any], applied: list[LoggedEvent]) -> None:
    """`raytwin.compat.IncompatibleReplay` (from the type of `existing`, the twin's registration now) unless the
    plausible ranges of the type `twin` was replayed on hold the readings its replay `applied`, the state it
    ended in and those of its checkpoints (the snapshot the retype seals among them). Why here, on the replay
    itself: the old model's live state says nothing of a new model whose dynamics differ, and an event
    ingested after the service's checks is among those replayed."""
    old = existing["artifact"]["asset_type"]
    along = [(from_micros(c.key[0]).isoformat(), in_type_units(twin, c.fs)) for c in twin.checkpoints
             if c.key is not None]
    require_plausible(twin.asset_id, f"{old['name']}@{old['version']}", twin.artifact.asset_type,
                      in_type_units(twin, twin.fs), along, [e.values for e in applied])


def in_type_units(twin: Twin, fs: FilterState) -> dict[str, float]:
    """The states of `fs` (in the twin's model's units) in its asset type's, by name."""
    states = twin.artifact.asset_type.states
    return {v.name: units.to_unit(float(x), v.unit, states[v.name].unit)
            for v, x in zip(twin.filter.model.states, fs.x) if v.name in states}


def marked(record: dict[str, Any], snap: Snapshot | None) -> dict[str, Any]:
    """`record` committed as a retype not yet finished, with the replay's sealed snapshot."""
    encoded = None if snap is None else {"key": list(snap.key), "revision": snap.revision, "payload": snap.payload}
    return {**unmarked(record), MARK: {"snapshot": encoded}}


def unmarked(record: dict[str, Any]) -> dict[str, Any]:
    """The registration itself, without a retype's mark."""
    return {k: v for k, v in record.items() if k != MARK}


def pending(record: dict[str, Any]) -> bool:
    """Whether `record` is a retype whose old model's derived state may still be in the store."""
    return MARK in record


def marked_snapshot(record: dict[str, Any], at_or_before_us: int | None = None) -> Snapshot | None:
    """A pending retype's snapshot (at or before `at_or_before_us`, if given); None: none."""
    encoded = record[MARK]["snapshot"]
    if encoded is None or (at_or_before_us is not None and encoded["key"][0] > at_or_before_us):
        return None
    return Snapshot(tuple(encoded["key"]), encoded["revision"], encoded["payload"])


def finish(store: StateStore, tenant: str, asset_id: str, record: dict[str, Any]) -> int:
    """Step 5 of a pending retype (`record` marked): the old model's derived state removed, the
    replay's snapshot written, the mark dropped; the durable revision it leaves (0: no snapshot).
    Idempotent: a crash part way through is finished by running it again."""
    snap = marked_snapshot(record)
    store.forget_twin(tenant, asset_id)
    if snap is not None:
        store.write_snapshot(tenant, asset_id, snap)
    store.save_registration(tenant, asset_id, unmarked(record))
    return 0 if snap is None else snap.revision
