"""Moving a live twin to another version of its asset type (see `TwinShard.migrate`).

The new registration record carries the migration: the mapped state and std as the new version's
prior, the point (event key, revision, filter time, held inputs) where the old version stopped, the
plan, and the old record. Recovery (`actors.recovery.build_twin`) starts the twin at that point and
replays only later events, so a restart gives the same twin. Migrating back with the plan's inverse
before any event was applied restores the old record itself: the old twin, bit for bit.
"""

from __future__ import annotations

from typing import Any

from actors.twin import Twin
from raytwin.migration import MigrationPlan


def exact_reverse(current: dict[str, Any], twin: Twin, target_version: str, plan: MigrationPlan) -> bool:
    """Whether `plan` undoes the migration that made `current`, with no event applied since."""
    migration = current.get("migration")
    if migration is None or migration["previous"]["asset"]["type_version"] != target_version:
        return False
    forward = MigrationPlan.model_validate(migration["plan"])
    inverse = forward.inverse()
    return (inverse is not None and twin.events_applied == migration["revision"]
            and plan.sources == {s: f.from_ for s, f in inverse.items()})


def migrated_record(current: dict[str, Any], target: dict[str, Any], twin: Twin, plan: MigrationPlan) -> dict[str, Any]:
    """The registration record of `twin` (registered as `current`) moved to `target` (the new
    version's record, without a prior) by `plan`, at the twin's last applied event."""
    if exact_reverse(current, twin, target["asset"]["type_version"], plan):
        return current["migration"]["previous"]
    state = twin.view()
    previous = {**current}
    if "migration" in previous:  # one step of history back, not the whole chain
        previous["migration"] = {k: v for k, v in previous["migration"].items() if k != "previous"}
    inputs = twin.filter.model.inputs
    return {
        **target,
        "initial_state": plan.apply(state.state),
        "initial_std": {**(target.get("initial_std") or {}), **plan.apply_std(state.std)},
        "migration": {
            "key": None if twin.last_key is None else list(twin.last_key),
            "revision": twin.events_applied, "max_time_us": twin.max_time_us, "t": twin.fs.t,
            "u": {v.name: (x, v.unit) for v, x in zip(inputs, twin.fs.u.tolist())},
            "q_scale": float(twin.fs.divergence.q_scale), "plan": plan.model_dump(mode="json"), "previous": previous,
        },
    }
