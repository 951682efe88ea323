"""Promotions whose hot swap a crash interrupted, finished when the backend starts.

A promotion (or rollback) is recorded on the model's lifecycle log first, then the tenant's twins of
the model are swapped to the new production version (`serve_apps.routes_shadow.swap_on_promotion`).
A backend killed between the two left the log saying one version is in production while the twins ran
another, for good: the transition cannot be sent again (409). At start, every twin still running
another version of a model with a production version is swapped to it, for events from then on (or from just
after a twin's last boundary, where another host's clock set that later), and the swap is audited as the system's,
its intent first: a store that cannot take it leaves the swap to the next start.

The ingress serves promotions while the backend starts, so a new promotion can land beside this. Each twin is
swapped only while it still runs what was read (`actors.live_models.LiveModels.swap`'s `marks`: one the new
promotion swapped since keeps that), only while the log's production version is the one read before the twins
were; and once swapped, the log is read again: a promotion recorded meanwhile, whose own swap the twins may have
refused (the start's boundary came later), is finished too (`FINISH_TRIES` times at most).

The route's own swap (`swap_while_production`) is conditional the same way: two promotions or rollbacks from
different replicas swap the twins in either order, and each twin ends on the version the log says is production.

Both read the twins, and wait for their swaps, within the configured shard read deadline
(`ServeConfig.shard_read_timeout_s`): a hung shard hung the promotion's answer, and the backend's start. A read left
unanswered makes the start leave the tenant's swaps to the next start (logged); the route answers what it swapped, and
in `unfinished` that the twins it names in neither list were not asked (the promotion is recorded: a 503 would invite
sending it again, which is refused). A swap left unanswered is named in `unfinished` by both (the start's audited and
logged): the shard applies it when it gets to it, unless another swap moved the twin meanwhile.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from ray.exceptions import GetTimeoutError

from actors.live_models import LiveModels, SwapOutcome
from actors.state import TwinState
from actors.swap import SwapMark
from raytwin.lifecycle import ChainBroken, ModelLifecycle
from raytwin.registry import ModelArtifact
from raytwin.statestore import from_micros
from serve_apps.audit import AuditLog
from serve_apps.audit_steps import audited, by_system
from serve_apps.store_errors import StoreUnavailable

log = logging.getLogger("raytwin.serve.promotions")
FINISH_TRIES = 3
"""How many times a model's production version is read and its twins finished while promotions keep landing beside
the start: those after are their own swaps' (or the next start's)."""
SWAP_TRIES = 3
"""How many times a promotion's swap plans again on the twins another swap moved meanwhile (`swap_while_production`):
those still moved after are named, and the next start finishes them."""


def finish_interrupted_swaps(lifecycle: ModelLifecycle, models: LiveModels, tenant: str, audit: AuditLog,
                             timeout_s: float | None = None) -> dict[str, SwapOutcome]:
    """Swap the tenant's twins that do not run their model's production version to it; the outcomes by
    production ref (twins refused a swap, e.g. another state layout, keep their model and are named).
    `GetTimeoutError` when a shard leaves the read of its twins unanswered for `timeout_s`: the next start tries;
    twins whose shard leaves their swap unanswered that long are in the outcome's `unfinished` (audited, logged)."""
    done: dict[str, SwapOutcome] = {}
    for model in lifecycle.models():
        for _ in range(FINISH_TRIES):
            ref = _production(lifecycle, tenant, model)
            behind = {} if ref is None else models.swap_marks(tenant, model, other_than=ref, timeout_s=timeout_s)
            if not behind:
                break
            if _production(lifecycle, tenant, model) != ref:  # a promotion since: the twins read may be its swap's
                continue
            outcome = _swap(lifecycle, models, tenant, audit, ref, behind, timeout_s)
            if outcome is None:
                break
            done[ref] = outcome
            if _production(lifecycle, tenant, model) == ref:
                break
            log.warning("event=interrupted_swap_overtaken tenant=%s model=%s: another version was promoted while its "
                        "twins were swapped; finishing that one too", tenant, ref)
    return done


def _swap(lifecycle: ModelLifecycle, models: LiveModels, tenant: str, audit: AuditLog, ref: str,
          behind: dict[str, SwapMark], timeout_s: float | None) -> SwapOutcome | None:
    """Swap the twins `behind` (their marks as read) to `ref`, audited as the system's; None: the store took no
    intent (nothing swapped: the next start tries). The boundary is now, or just after a twin's last where another
    host's clock set that later: at our own clock alone, that twin refused and waited for the next start."""
    at = _boundary_after(behind, datetime.now(UTC))
    try:
        with audited(audit, by_system(tenant, "model.swap", ref, {"at": at.isoformat(), "reason": (
                "the promotion's swap was interrupted; finished at start")})) as step:
            outcome = models.swap(tenant, lifecycle.registry.get(ref), at, marks=behind, timeout_s=timeout_s)
            swapped = [s.asset_id for s in outcome.states]
            step.update(swapped=swapped, refused=outcome.refused,
                        **({"unfinished": outcome.unfinished} if outcome.unfinished else {}))
    except StoreUnavailable as exc:  # (only `begin`'s) its intent not written: not swapped; the next start tries
        log.error("event=interrupted_swap_deferred tenant=%s model=%s twins=%d error=%r", tenant, ref, len(behind),
                  exc.message)
        return None
    log.warning("event=interrupted_swap_finished tenant=%s model=%s swapped=%d refused=%d", tenant, ref,
                len(swapped), len(outcome.refused))
    if outcome.unfinished:
        log.error("event=interrupted_swap_unfinished tenant=%s model=%s: %s", tenant, ref, outcome.unfinished)
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


def swap_while_production(lifecycle: ModelLifecycle, models: LiveModels, tenant: str, artifact: ModelArtifact,
                          at: datetime, timeout_s: float) -> SwapOutcome:
    """A promotion's (or rollback's) swap of the tenant's twins of the model to `artifact` at `at` (just after a twin's
    last boundary, where another host's clock set that later), while `artifact` is production. Unconditional, two
    replicas' swaps reaching the shards in the other order than their records (or a later record's boundary before the
    earlier's) left the twins on the version that was not production until the next start. Each twin is swapped only
    while it stands where it was read before the log: a swap of a transition recorded after the read moves it first
    (refused; planned again on where it then stands, `SWAP_TRIES` times at most), one recorded before leaves it in
    `refused`, naming the production version, whose own swap moves it. A twin refusing on its own is not asked again.
    A shard that leaves the read of its twins, or their swap, unanswered for `timeout_s` ends it: what was swapped is
    answered, and `unfinished` says why the twins not named may run another version."""
    ref, model = artifact.ref, artifact.name
    swapped: dict[str, TwinState] = {}
    refused: dict[str, str] = {}
    tried: dict[str, SwapMark] = {}  # each twin's mark when last asked: unchanged since, it refused on its own
    try:
        for _ in range(SWAP_TRIES):
            marks = models.swap_marks(tenant, model, other_than=ref, timeout_s=timeout_s)
            refused = {a: why for a, why in refused.items() if a in marks}  # one another swap took to `ref` runs it
            behind = {a: m for a, m in marks.items() if a not in swapped and tried.get(a) != m}  # (a swapped one
            # moved on: a newer transition's swap)
            if not behind:
                break
            if (production := f"{model}@{lifecycle.current(model).production}") != ref:
                refused |= dict.fromkeys(behind, f"{ref} is no longer production ({production} is: promoted or "
                                                 "rolled back to meanwhile); that transition's swap moves the twin")
                break
            outcome = models.swap(tenant, artifact, _boundary_after(behind, at), marks=behind, timeout_s=timeout_s)
            tried |= behind
            swapped |= {s.asset_id: s for s in outcome.states}
            refused = {a: why for a, why in refused.items() if a not in behind} | outcome.refused
            if outcome.unfinished:
                return SwapOutcome(states=list(swapped.values()), refused=refused, unfinished=(
                    f"{outcome.unfinished}; the service's next start swaps those still behind to {ref} if that is "
                    "production"))
        else:
            moved = [a for a, m in models.swap_marks(tenant, model, other_than=ref, timeout_s=timeout_s).items()
                     if a not in swapped and tried.get(a) != m]
            refused |= dict.fromkeys(moved, f"other swaps moved the twin each of the {SWAP_TRIES} times this one was "
                                            f"planned; the service's next start swaps it to {ref} if that is "
                                            "production")
    except GetTimeoutError:
        return SwapOutcome(states=list(swapped.values()), refused=refused, unfinished=(
            f"a twin shard left the read of which twins run {model} unanswered for {timeout_s:g} s (hung or "
            f"stalled): the twins not named here were not asked and keep the version they run; the service's next "
            f"start swaps them to {ref} if that is production"))
    return SwapOutcome(states=list(swapped.values()), refused=refused)


def _boundary_after(marks: dict[str, SwapMark], at: datetime) -> datetime:
    """`at`, or a microsecond after the latest boundary among `marks` where that is later: a swap must come after a
    twin's last, which another host whose clock is ahead may have set after `at` (refused, it left the twin behind)."""
    last = max((us for _, us in marks.values() if us is not None), default=None)
    return at if last is None else max(at, from_micros(last) + timedelta(microseconds=1))
