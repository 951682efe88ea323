"""Whether an asset type version may be deleted beyond what the catalog knows (`Catalog.check_delete_type`).

The catalog's assets name the type version their twin was created on, and a promotion's hot swap moves the
twins to another version without changing that name. So a type version no asset names may still be the one
twins run, or the one the model lifecycle has new twins created on (`Backend._require_production`): deleting it
left no version on which a twin of the model could be created. The lifecycle and the twins themselves say.
"""

from __future__ import annotations

import ray

from actors.live_models import LiveModels
from raytwin.lifecycle import LifecycleError, ModelLifecycle, ModelState, UnknownModel
from serve_apps.errors import Conflict, unwrap
from serve_apps.shard_deadline import RETRY_AFTER_S, TwinUnavailable

SHOWN = 20
"""Twins named in a refusal's message (all are in its details)."""


def lifecycle_role(state: ModelState, version: str) -> str | None:
    """Why the lifecycle still needs `version` of `state.model` (None: it does not), with what to do instead."""
    model, ref = state.model, f"{state.model}@{version}"
    transitions = f"POST /v1/models/{model}/versions/{{version}}/transitions"
    if state.production == version:
        return (f"{ref} is the production version of model {model}: new twins of {model} are created on it; "
                f"promote another version to production first ({transitions})")
    if state.rollback_target == version:
        return (f"{ref} is the rollback target of model {model} (POST /v1/models/{model}/rollback makes it "
                f"production again); promote another version first, so that it no longer is")
    stage = state.versions[version].stage if version in state.versions else "archived"
    if stage != "archived":
        return (f"{ref} is a {stage} version of model {model} and may still be promoted to production; archive it "
                f"first ({transitions.replace('{version}', version)} with {{\"to\": \"archived\"}})")
    return None


def twins_running(models: LiveModels, tenant: str, ref: str, timeout_s: float) -> list[str]:
    """The twins running `ref`, asked of the shards without the backend's lock (a hung shard stalled every delete
    and whatever else waited on it); 503 `twin_unavailable` when a shard leaves it unanswered for `timeout_s`.
    Nothing moves twins onto a version the lifecycle no longer needs (a promotion or rollback makes it production
    first; a new or retyped twin goes through the catalog), so the lock's checks after the answer still hold."""
    try:
        return models.twins_running(tenant, ref, timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TwinUnavailable(f"asset type {ref} was not deleted: a twin shard did not answer within {timeout_s:g} s "
                              "whether twins run it (a hung or restarting shard); nothing was changed. Retry after "
                              "Retry-After; /v1/health/ready says whether the shards answer",
                              headers={"Retry-After": str(RETRY_AFTER_S)}) from None


def refuse_held_type(lifecycle: ModelLifecycle, running: list[str], name: str, version: str) -> None:
    """`Conflict` (409) while the model lifecycle needs ``name@version`` (`lifecycle_role`) or live twins run it
    (`running`: hot-swapped to it, see `twins_running`), each reason with its remedy; the twins in `details`."""
    ref = f"{name}@{version}"
    try:
        role = lifecycle_role(lifecycle.current(name), version)
    except UnknownModel:  # a type the catalog holds from before types were registered: no lifecycle needs it
        role = None
    except LifecycleError as exc:  # a broken transition log: which version is production is unknown
        raise Conflict(f"asset type {ref} was not deleted: {unwrap(exc)}") from None
    reasons = [role] if role else []
    if running:
        more = f" and {len(running) - SHOWN} more" if len(running) > SHOWN else ""
        reasons.append(f"twins {', '.join(running[:SHOWN])}{more} run {ref} (a promotion swapped them to it; their "
                       f"assets still name the type version they were created on); promote another version of {name} "
                       f"first, which swaps them to it")
    if reasons:
        raise Conflict(f"asset type {ref} is in use and was not deleted: " + "; ".join(reasons),
                       details=[{"running": running}] if running else None)
