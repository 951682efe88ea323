"""Rebuilding twins from the durable store: registration + latest snapshot + log replay.

Used by shard actors when they (re)start and for time travel, and usable without Ray (the CLI
and tests call it directly): the result is the same pure function of the logged events.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from actors.twin import Twin, replay_many
from raytwin.contracts import Asset
from raytwin.estimation import model_defaults
from raytwin.registry import ModelArtifact
from raytwin.sim.model import Declared
from raytwin.statestore import EventKey, StateStore
from raytwin.ukf import FILTERS

NOISE_PREFIXES = {"process_std.": "process_std", "measurement_std.": "measurement_std", "input.": "inputs"}
"""Asset metadata keys that tune the filter, e.g. ``measurement_std.T_in = "0.1"`` (SI units)."""

FILTER_KEY = "filter"
"""Asset metadata key choosing a twin's filter by name (`raytwin.ukf.FILTERS`: ``ekf`` or ``ukf``;
default: the model's first, ``ekf`` for a JAX model, ``ukf`` for an FMU). The registration record
keeps the asset, so recovery rebuilds the same one."""


def filter_from_metadata(metadata: dict[str, str], model: Declared) -> str:
    """The filter a twin of `model` runs; refuses an unknown name or one the model cannot run
    (the EKF on an FMU: no Jacobians), naming the filters it can."""
    kind = metadata.get(FILTER_KEY, model.filters[0])
    if kind not in FILTERS:
        raise ValueError(f"asset metadata {FILTER_KEY}={kind!r} is not a filter; known: {sorted(FILTERS)}")
    if kind not in model.filters:
        raise ValueError(f"asset metadata {FILTER_KEY}={kind!r}: simulator {model.name} cannot run it"
                         + (" (the EKF needs Jacobians, jax.jacfwd of JAX code; an FMU is a black box)"
                            if kind == "ekf" else "") + f"; use one of {list(model.filters)}")
    return kind


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
    model = artifact.model()
    filter_from_metadata(asset.metadata, model)  # refused here, before anything is stored
    _check_filter_values(asset, model, initial_state, initial_std)
    return {
        "asset": asset.model_dump(mode="json"),
        "artifact": artifact.model_dump(mode="json"),
        "initial_state": initial_state,
        "initial_std": initial_std,
    }


def _check_filter_values(asset: Asset, model: Declared, initial_state: dict[str, float] | None,
                         initial_std: dict[str, float] | None) -> None:
    """Every value a twin's filter needs is given or declared by the model (an FMU declares no
    noise), so a twin that could not start is refused here, not later in its shard."""
    noise, defaults = noise_from_metadata(asset.metadata), model_defaults(model)
    where = {"initial_state": "initial_state", "initial_std": "initial_std", "process_std": "asset metadata process_std.",
             "measurement_std": "asset metadata measurement_std.", "inputs": "asset metadata input."}
    for kind, names, given in (("initial_state", model.state_names, initial_state),
                               ("initial_std", model.state_names, initial_std),
                               ("process_std", model.state_names, noise.get("process_std")),
                               ("measurement_std", model.output_names, noise.get("measurement_std")),
                               ("inputs", model.input_names, noise.get("inputs"))):
        missing = [n for n in names if n not in {**defaults[kind], **(given or {})}]
        if missing:
            raise ValueError(f"asset {asset.id}: no {kind} for {missing}: simulator {model.name} declares none; "
                             f"give them ({where[kind]}<name>)")


def noise_from_metadata(metadata: dict[str, str]) -> dict[str, dict[str, float]]:
    noise: dict[str, dict[str, float]] = {}
    for key, value in metadata.items():
        for prefix, kind in NOISE_PREFIXES.items():
            if key.startswith(prefix):
                try:
                    noise.setdefault(kind, {})[key.removeprefix(prefix)] = float(value)
                except ValueError:
                    raise ValueError(f"asset metadata {key}={value!r} is not a number") from None
    return noise


@lru_cache(maxsize=1024)
def _artifact(artifact_json: str) -> ModelArtifact:
    """Parsed once per distinct artifact: twins of the same model share one (immutable) object."""
    return ModelArtifact.model_validate_json(artifact_json)


def build_twin(record: dict[str, Any], *, allowed_lateness_s: float, checkpoint_every: int) -> Twin:
    """A twin at its prior, from a registration record."""
    asset = Asset.model_validate(record["asset"])
    artifact = _artifact(json.dumps(record["artifact"], sort_keys=True))
    return Twin(
        asset.tenant, asset.id, artifact,
        initial_state=record["initial_state"], initial_std=record["initial_std"],
        noise=noise_from_metadata(asset.metadata), filter_kind=filter_from_metadata(asset.metadata, artifact.model()),
        allowed_lateness_s=allowed_lateness_s, checkpoint_every=checkpoint_every,
    )


def recover(
    store: StateStore, record: dict[str, Any], *, allowed_lateness_s: float, checkpoint_every: int,
    until_us: int | None = None,
) -> Twin:
    """The twin as of `until_us` (now if None): latest snapshot before it + sorted log replay."""
    return recover_many(store, [record], allowed_lateness_s=allowed_lateness_s, checkpoint_every=checkpoint_every,
                        until_us=until_us)[0]


def recover_many(
    store: StateStore, records: list[dict[str, Any]], *, allowed_lateness_s: float, checkpoint_every: int,
    until_us: int | None = None,
) -> list[Twin]:
    """`recover` for many twins: one log scan per tenant, and their replays share filter dispatches."""
    twins = [build_twin(r, allowed_lateness_s=allowed_lateness_s, checkpoint_every=checkpoint_every) for r in records]
    after: dict[str, dict[str, EventKey | None]] = {}
    for twin in twins:
        snap = store.latest_snapshot(twin.tenant, twin.asset_id, at_or_before_us=until_us)
        if snap is not None:
            twin.restore(snap)
        after.setdefault(twin.tenant, {})[twin.asset_id] = snap.key if snap else None
    logged = {tenant: store.read_events_many(tenant, assets, until_us=until_us) for tenant, assets in after.items()}
    replay_many([(twin, logged[twin.tenant][twin.asset_id]) for twin in twins])
    return twins
