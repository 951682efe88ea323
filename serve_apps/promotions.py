"""Promotions whose hot swap a crash interrupted, finished when the backend starts.

A promotion (or rollback) is recorded on the model's lifecycle log first, then the tenant's twins of
the model are swapped to the new production version (`serve_apps.routes_shadow.swap_on_promotion`).
A backend killed between the two left the log saying one version is in production while the twins ran
another, for good: the transition cannot be sent again (409). At start, every twin still running
another version of a model with a production version is swapped to it, for events from then on,
and the swap is audited as the system's, its intent first: a store that cannot take it leaves the swap to
the next start.

The ingress serves promotions while the backend starts, so a new promotion can land beside this. Each twin is
swapped only while it still runs what was read (`actors.live_models.LiveModels.swap`'s `marks`: one the new
promotion swapped since keeps that), only while the log's production version is the one read before the twins
were; and once swapped, the log is read again: a promotion recorded meanwhile, whose own swap the twins may have
refused (the start's boundary came later), is finished too (`FINISH_TRIES` times at most).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from actors.live_models import LiveModels, SwapOutcome
from actors.swap import SwapMark
from raytwin.lifecycle import ChainBroken, ModelLifecycle
from serve_apps.audit import AuditLog
from serve_apps.audit_steps import audited, by_system
from serve_apps.store_errors import StoreUnavailable

log = logging.getLogger("raytwin.serve.promotions")
FINISH_TRIES = 3
"""How many times a model's production version is read and its twins finished while promotions keep landing beside
the start: those after are their own swaps' (or the next start's)."""


def finish_interrupted_swaps(lifecycle: ModelLifecycle, models: LiveModels, tenant: str,
                             audit: AuditLog) -> dict[str, SwapOutcome]:
    """Swap the tenant's twins that do not run their model's production version to it; the outcomes by
    production ref (twins refused a swap, e.g. another state layout, keep their model and are named)."""
    done: dict[str, SwapOutcome] = {}
    for model in lifecycle.models():
        for _ in range(FINISH_TRIES):
            ref = _production(lifecycle, tenant, model)
            behind = {} if ref is None else models.swap_marks(tenant, model, other_than=ref)
            if not behind:
                break
            if _production(lifecycle, tenant, model) != ref:  # a promotion since: the twins read may be its swap's
                continue
            outcome = _swap(lifecycle, models, tenant, audit, ref, behind)
            if outcome is None:
                break
            done[ref] = outcome
            if _production(lifecycle, tenant, model) == ref:
                break
            log.warning("event=interrupted_swap_overtaken tenant=%s model=%s: another version was promoted while its "
                        "twins were swapped; finishing that one too", tenant, ref)
    return done


def _swap(lifecycle: ModelLifecycle, models: LiveModels, tenant: str, audit: AuditLog, ref: str,
          behind: dict[str, SwapMark]) -> SwapOutcome | None:
    """Swap the twins `behind` (their marks as read) to `ref`, audited as the system's; None: the store took no
    intent (nothing swapped: the next start tries)."""
    at = datetime.now(UTC)
    try:
        with audited(audit, by_system(tenant, "model.swap", ref, {"at": at.isoformat(), "reason": (
                "the promotion's swap was interrupted; finished at start")})) as step:
            outcome = models.swap(tenant, lifecycle.registry.get(ref), at, marks=behind)
            swapped = [s.asset_id for s in outcome.states]
            step.update(swapped=swapped, refused=outcome.refused)
    except StoreUnavailable as exc:  # (only `begin`'s) its intent not written: not swapped; the next start tries
        log.error("event=interrupted_swap_deferred tenant=%s model=%s twins=%d error=%r", tenant, ref, len(behind),
                  exc.message)
        return None
    log.warning("event=interrupted_swap_finished tenant=%s model=%s swapped=%d refused=%d", tenant, ref,
                len(swapped), len(outcome.refused))
    return outcome


def _production(lifecycle: ModelLifecycle, tenant: str, model: str) -> str | None:
    """The model's production version (``name@version``); None without one, or with a broken log (logged: its
    transitions are refused too, and `lifecycle/verify` names the record)."""
    try:
        production = lifecycle.verify(model).production
    except ChainBroken as exc:
        log.error("event=production_check_skipped tenant=%s model=%s error=%r", tenant, model, str(exc))
        return None
    return None if production is None else f"{model}@{production}"
