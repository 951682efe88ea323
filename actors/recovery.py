"""Rebuilding twins from the durable store: registration + latest snapshot + log replay.

Used by shard actors when they (re)start and for time travel, and usable without Ray (the CLI
and tests call it directly): the result is the same pure function of the logged events.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from actors import retype
from actors.state import TwinState
from actors.swap import swap_entries
from actors.twin import Twin, decode_snapshot, replay_many, state_view
from raytwin.contracts import IDENTIFIER_PATTERN, Asset, implausible_states
from raytwin.estimation import model_defaults
from raytwin.registry import ModelArtifact
from raytwin.sim.model import Declared
from raytwin.statestore import EventKey, LoggedEvent, Snapshot, StateStore, from_micros
from raytwin.ukf import FILTERS, make_filter

NOISE_PREFIXES = {"process_std.": "process_std", "measurement_std.": "measurement_std", "input.": "inputs",
                  "initial_std.": "initial_std"}
"""Asset metadata keys that tune the filter, e.g. ``measurement_std.T_in = "0.1"`` (SI units);
``initial_std.<state>`` is the prior's std where the model declares none (an FMU carries no prior)."""

FILTER_KEY = "filter"
"""Asset metadata key choosing a twin's filter by name (`raytwin.ukf.FILTERS`: ``ekf`` or ``ukf``;
default: the model's first, ``ekf`` for a JAX model, ``ukf`` for an FMU). The registration record
keeps the asset, so recovery rebuilds the same one."""


log = logging.getLogger("raytwin.twins")


class RegistrationError(ValueError):
    """A twin registration that cannot fit its model (bad filter name, noise metadata, prior): the
    caller's to fix, so it is refused before anything is stored (HTTP 422)."""


def filter_from_metadata(metadata: dict[str, str], model: Declared) -> str:
    """The filter a twin of `model` runs; refuses an unknown name or one the model cannot run
    (the EKF on an FMU: no Jacobians), naming the filters it can."""
    kind = metadata.get(FILTER_KEY, model.filters[0])
    if kind not in FILTERS:
        raise RegistrationError(f"asset metadata {FILTER_KEY}={kind!r} is not a filter; known: {sorted(FILTERS)}")
    if kind not in model.filters:
        raise RegistrationError(f"asset metadata {FILTER_KEY}={kind!r}: simulator {model.name} cannot run it"
                                + (" (the EKF needs Jacobians, jax.jacfwd of JAX code; an FMU is a black box)"
                                   if kind == "ekf" else "") + f"; use one of {list(model.filters)}")
    return kind


_RANGES = {"initial_std": (lambda v: v > 0, "finite and > 0"), "process_std": (lambda v: v >= 0, "finite and >= 0"),
           "measurement_std": (lambda v: v >= 0, "finite and >= 0")}


_DECLARED = {"initial_std": "prior_std", "process_std": "process_std", "measurement_std": "measurement_std"}
"""The model declaration's field that gives the default of each metadata kind of filter noise."""


def _how_to_give(kind: str, missing: list[str]) -> str:
    """Where to write noise the model lacks: the refusal named the values but not where they go."""
    if kind not in _DECLARED:
        return ""
    example = ", ".join(f'"{kind}.{name}": "<std>"' for name in missing)
    return (f" (give them in the asset's metadata, {{{example}}} in the variables' units, or declare "
            f"{_DECLARED[kind]} on the model's variables: an FMU's with FmuModel.declare)")


def check_registration(asset: Asset, artifact: ModelArtifact, initial_state: dict[str, float] | None,
                       initial_std: dict[str, float] | None) -> None:
    """Refuse (`RegistrationError`, every problem in one message) what the twin's filter would refuse
    when it is built in its shard: a filter name, noise metadata or prior that does not fit the model."""
    problems: list[str] = []
    model = artifact.model()
    for check in (lambda: filter_from_metadata(asset.metadata, model), lambda: noise_from_metadata(asset.metadata)):
        try:
            check()
        except RegistrationError as exc:
            problems.append(str(exc))
    noise = _parsable_noise(asset.metadata)
    defaults = model_defaults(model)
    given = {**noise, "initial_state": initial_state or {},
             "initial_std": {**noise.get("initial_std", {}), **(initial_std or {})}}
    names = {"process_std": model.state_names, "measurement_std": model.output_names, "inputs": model.input_names,
             "initial_state": model.state_names, "initial_std": model.state_names}
    where = {kind: f"asset metadata {prefix}*" for prefix, kind in NOISE_PREFIXES.items()}
    for kind, expected in names.items():
        values, what = given.get(kind, {}), where.get(kind, kind)
        if unknown := sorted(set(values) - set(expected)):
            problems.append(f"{what}: unknown name(s) {unknown}; expected {list(expected)}")
        if missing := [n for n in expected if n not in values and n not in defaults[kind]]:
            problems.append(f"{what}: no value and no model default for {missing}{_how_to_give(kind, missing)}")
        allowed, rule = _RANGES.get(kind, (lambda v: True, "finite"))
        if bad := {n: v for n, v in values.items() if not (math.isfinite(v) and allowed(v))}:
            problems.append(f"{what}: {bad} must be {rule}")
    finite = {n: v for n, v in (initial_state or {}).items() if n in model.state_names and math.isfinite(v)}
    problems += implausible_states(finite, {v.name: v.unit for v in model.states}, artifact.asset_type, "initial_state")
    if problems:
        raise RegistrationError(f"asset {asset.id} on model {artifact.ref}: " + "; ".join(problems))


def registration_record(
    asset: Asset,
    artifact: ModelArtifact,
    initial_state: dict[str, float] | None,
    initial_std: dict[str, float] | None,
) -> dict[str, Any]:
    """What the store keeps to rebuild a twin; refuses an artifact of another asset type."""
    at = artifact.asset_type
    if (asset.type_name, asset.type_version) != (at.name, at.version):
        raise ValueError(
            f"asset {asset.id} is of type {asset.type_name}@{asset.type_version} but artifact "
            f"{artifact.ref} models {at.key}"
        )
    check_registration(asset, artifact, initial_state, initial_std)  # refused here, before anything is stored
    return {
        "asset": asset.model_dump(mode="json"),
        "artifact": artifact.model_dump(mode="json"),
        "initial_state": initial_state,
        "initial_std": initial_std,
    }


def noise_from_metadata(metadata: dict[str, str]) -> dict[str, dict[str, float]]:
    """The filter settings in an asset's metadata (`NOISE_PREFIXES`), by kind."""
    if bad := [f"{key}={value!r}" for key, value in metadata.items()
               if key.startswith(tuple(NOISE_PREFIXES)) and _number(value) is None]:
        raise RegistrationError(f"asset metadata {', '.join(bad)}: not a number")
    return _parsable_noise(metadata)


def _parsable_noise(metadata: dict[str, str]) -> dict[str, dict[str, float]]:
    noise: dict[str, dict[str, float]] = {}
    for key, value in metadata.items():
        for prefix, kind in NOISE_PREFIXES.items():
            if key.startswith(prefix) and (number := _number(value)) is not None:
                noise.setdefault(kind, {})[key.removeprefix(prefix)] = number
    return noise


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@lru_cache(maxsize=1024)
def _artifact(artifact_json: str) -> ModelArtifact:
    """Parsed once per distinct artifact: twins of the same model share one (immutable) object."""
    return ModelArtifact.model_validate_json(artifact_json)


def build_twin(record: dict[str, Any], *, allowed_lateness_s: float, checkpoint_every: int,
               swaps: list[dict[str, Any]] = ()) -> Twin:
    """A twin at its prior, from a registration record and its model swaps (`actors.swap`)."""
    asset = Asset.model_validate(record["asset"])
    artifact = _artifact(json.dumps(record["artifact"], sort_keys=True))
    twin = Twin(
        asset.tenant, asset.id, artifact,
        initial_state=record["initial_state"], initial_std=record["initial_std"],
        noise=noise_from_metadata(asset.metadata), filter_kind=filter_from_metadata(asset.metadata, artifact.model()),
        allowed_lateness_s=allowed_lateness_s, checkpoint_every=checkpoint_every,
        swaps=[(at_us, _artifact(json.dumps(a, sort_keys=True))) for at_us, a in swap_entries(swaps)],
    )
    migration = record.get("migration")
    if migration is not None and migration["key"] is not None:  # a migrated twin starts where its old version stopped
        twin.start_at(tuple(migration["key"]), migration["revision"], migration["max_time_us"], migration["t"],
                      migration["u"], migration["q_scale"])
    return twin


_IDENTIFIER_RE = re.compile(IDENTIFIER_PATTERN)


def durable_state(store: StateStore, tenant: str, asset_id: str) -> TwinState | None:
    """The twin's last durable state, marked stale: its latest snapshot (or its prior; for a migrated twin
    without a snapshot of its own, its mapped state at the migration point, never the previous version's
    snapshot; for a retype not yet finished, the replay's snapshot, never the old model's), without
    replaying the log or compiling a kernel. Why: while the twin's shard restarts (process start, JAX
    import, compiles, replay: seconds) a read is answered from it instead of failing or waiting. None: no such twin (or names that are no identifiers: they name store paths)."""
    if not (_IDENTIFIER_RE.fullmatch(tenant) and _IDENTIFIER_RE.fullmatch(asset_id)):
        return None
    record = store.load_registration(tenant, asset_id)
    if record is None:
        return None
    asset = Asset.model_validate(record["asset"])
    migration = record.get("migration")
    start = None if migration is None or migration["key"] is None else tuple(migration["key"])
    snap = _latest_snapshot(store, record)
    if snap is not None and start is not None and snap.key <= start:
        snap = None  # the previous version's, in its model's states and units (`recover_many` skips it too)
    applied = record["artifact"]  # the model version that applied the snapshot's event (the last swap before it)
    for at_us, later in swap_entries(_model_swaps(store, record)):
        if snap is not None and snap.key is not None and snap.key[0] >= at_us:
            applied = later
    artifact = _artifact(json.dumps(applied, sort_keys=True))
    model = artifact.model()
    if snap is not None:
        fs, key, revision = decode_snapshot(snap.payload), snap.key, snap.revision
    else:  # the prior: the filter object is cheap, only its kernels compile (on first use)
        noise = noise_from_metadata(asset.metadata)
        flt = make_filter(filter_from_metadata(asset.metadata, model), model, artifact.param_vector(),
                          process_std=noise.get("process_std"), measurement_std=noise.get("measurement_std"))
        fs = flt.initial(record["initial_state"], {**noise.get("initial_std", {}), **(record["initial_std"] or {})},
                         noise.get("inputs"))
        key, revision = None, 0
        if start is not None:  # a migrated twin's prior is its mapped state at the migration point (`Twin.start_at`)
            fs = fs._replace(divergence=fs.divergence._replace(q_scale=migration["q_scale"]))
            key, revision = start, migration["revision"]
    return state_view(tenant, asset_id, artifact.ref, model, fs, key, revision, stale=True)


Replaying = Callable[[Twin, list[LoggedEvent]], None]
"""Called by recovery with a twin and the logged events its replay applies, before it applies them (a retype
checks them against the new type version's ranges, `actors.retype`: the very events replayed, none missed)."""


def recover(
    store: StateStore, record: dict[str, Any], *, allowed_lateness_s: float, checkpoint_every: int,
    until_us: int | None = None, replaying: Replaying | None = None,
) -> Twin:
    """The twin as of `until_us` (now if None): latest snapshot before it + sorted log replay."""
    return recover_many(store, [record], allowed_lateness_s=allowed_lateness_s, checkpoint_every=checkpoint_every,
                        until_us=until_us, replaying=replaying)[0]


def recover_many(
    store: StateStore, records: list[dict[str, Any]], *, allowed_lateness_s: float, checkpoint_every: int,
    until_us: int | None = None, replaying: Replaying | None = None,
) -> list[Twin]:
    """`recover` for many twins: one log scan per tenant, and their replays share filter dispatches."""
    twins = [build_twin(r, allowed_lateness_s=allowed_lateness_s, checkpoint_every=checkpoint_every,
                        swaps=_model_swaps(store, r)) for r in records]
    floors = {tenant: store.history_floors(tenant, [twin.asset_id for twin in twins if twin.tenant == tenant])
              for tenant in {twin.tenant for twin in twins}}  # theirs alone: not every twin the tenant deleted
    after: dict[str, dict[str, EventKey | None]] = {}
    for twin, record in zip(twins, records):
        twin.history_floor_us = floors[twin.tenant].get(twin.asset_id)
        snap = _latest_snapshot(store, record, until_us)
        if snap is not None and twin.floor is not None and snap.key <= twin.floor:
            snap = None  # the old version's snapshot: the migrated twin starts from its registration
        if snap is not None:
            twin.restore(snap)
        after.setdefault(twin.tenant, {})[twin.asset_id] = snap.key if snap else None
    logged = {tenant: store.read_events_many(tenant, assets, until_us=until_us, floors=floors[tenant])
              for tenant, assets in after.items()}
    # each drift clear is replayed where it happened (`Twin.replay_clears`): events up to it, the clear, then the
    # rest (a snapshot after a clear already holds it; a clear after `until_us` had not happened then)
    for twin, record in zip(twins, records):
        if not retype.pending(record):  # a pending retype's clears are the old model's
            twin.replay_clears(_clears_to_replay(store.load_drift_clears(twin.tenant, twin.asset_id), twin.last_key,
                                                 until_us))
    events = [logged[twin.tenant][twin.asset_id] for twin in twins]
    if replaying is not None:
        for twin, evs in zip(twins, events):  # the events `replay_many` applies: those after its start
            replaying(twin, [e for e in evs if twin.last_key is None or e.key > twin.last_key])
    replay_many(list(zip(twins, events)))
    return twins


def _latest_snapshot(store: StateStore, record: dict[str, Any], until_us: int | None = None) -> Snapshot | None:
    """The snapshot the twin of `record` starts from: its latest with a finite state, or a pending retype's own
    (`actors.retype`: those in the store may still be the old model's, in its states)."""
    if retype.pending(record):
        return retype.marked_snapshot(record, until_us)
    tenant, asset_id = record["asset"]["tenant"], record["asset"]["id"]
    return store.latest_snapshot(tenant, asset_id, at_or_before_us=until_us,
                                 usable=lambda snap: _finite(snap, f"{tenant}/{asset_id}"))


def _finite(snap: Snapshot, twin: str) -> bool:
    """Whether a snapshot's state and covariance are finite. Why: a version before refused updates
    (`raytwin.estimation.scan_kernels`) stored a twin whose model gave NaN as NaN for good; passing over
    such a snapshot to an earlier one (or the prior) replays the log, which now refuses the events that
    broke it, so the twin recovers without losing any event."""
    fs = decode_snapshot(snap.payload)
    if np.isfinite(fs.x).all() and np.isfinite(fs.P).all():
        return True
    log.warning("event=snapshot_not_finite twin=%s event_time=%s revision=%d action=replay_from_earlier_snapshot",
                twin, from_micros(snap.key[0]).isoformat(), snap.revision)
    return False


def _model_swaps(store: StateStore, record: dict[str, Any]) -> list[dict[str, Any]]:
    """The twin's model swaps; none for a pending retype (those stored are the old model's)."""
    return [] if retype.pending(record) else store.load_model_swaps(record["asset"]["tenant"], record["asset"]["id"])


def _clears_to_replay(keys: list[EventKey], start: EventKey | None, until_us: int | None) -> list[EventKey]:
    """The recorded drift clears recovery applies: those at or after the state it starts from, by `until_us`."""
    return [key for key in keys if (start is None or key >= start) and (until_us is None or key[0] <= until_us)]
