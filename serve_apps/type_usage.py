"""Whether an asset type version may be deleted beyond what the catalog knows (`Catalog.check_delete_type`).

The catalog's assets name the type version their twin was created on, and a promotion's hot swap moves the
twins to another version without changing that name. So a type version no asset names may still be the one
twins run, or the one the model lifecycle has new twins created on (`Backend._require_production`): deleting it
left no version on which a twin of the model could be created. The lifecycle and the twins themselves say.
"""

from __future__ import annotations

from actors.live_models import LiveModels
from raytwin.lifecycle import LifecycleError, ModelLifecycle, ModelState
from serve_apps.errors import Conflict, unwrap

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


def refuse_held_type(lifecycle: ModelLifecycle, models: LiveModels, tenant: str, name: str, version: str) -> None:
    """`Conflict` (409) while the model lifecycle needs ``name@version`` (`lifecycle_role`) or live twins run it
    (hot-swapped to it), each reason with its remedy; the twins in `details`."""
    ref = f"{name}@{version}"
    try:
        state = lifecycle.verify(name)
    except LifecycleError as exc:  # a broken transition log: which version is production is unknown
        raise Conflict(f"asset type {ref} was not deleted: {unwrap(exc)}") from None
    reasons = [r for r in (lifecycle_role(state, version),) if r]
    running = models.twins_running(tenant, ref)
    if running:
        more = f" and {len(running) - SHOWN} more" if len(running) > SHOWN else ""
        reasons.append(f"twins {', '.join(running[:SHOWN])}{more} run {ref} (a promotion swapped them to it; their "
                       f"assets still name the type version they were created on); promote another version of {name} "
                       f"first, which swaps them to it")
    if reasons:
        raise Conflict(f"asset type {ref} is in use and was not deleted: " + "; ".join(reasons),
                       details=[{"running": running}] if running else None)
