"""Routes for the model lifecycle: a version's stage, transitions, rollback, the transition log and its check.

The lifecycle lives in the tenant's registry in the store (`raytwin.lifecycle`); the ingress acts on it
directly, without the backend: each transition is a compare-and-set on the store, so replicas need no
lock. Promotion to production needs a key with the ``approver`` grant and an owner, another person than whoever
submitted the candidate (four eyes), unless the tenant's policy allows automatic promotion.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from ray.exceptions import GetTimeoutError
from starlette.concurrency import run_in_threadpool

from raytwin.lifecycle import (
    ACTION_TO,
    ApprovalRequired,
    ChainBroken,
    Evidence,
    EvidenceRefused,
    LifecycleError,
    LifecyclePolicy,
    ModelLifecycle,
    PruneIncomplete,
    PruneReport,
    Stage,
    TenantMismatch,
    TransitionConflict,
    TransitionRecord,
    audited_transition,
    check_given_evidence,
    check_policy_change,
    partial_fit_refusal,
)
from raytwin.lifecycle import Actor as LifecycleActor
from raytwin.registry import ModelRegistry, RegistryError
from raytwin.statestore import StateStore
from serve_apps.auth import OWNER_NEEDED, KeyStore, Principal, ownerless_fix
from serve_apps.conditional import CONDITIONAL_READ, LIFECYCLE_ETAG, NOT_MODIFIED, Precondition, with_etag
from serve_apps.deps import ADMIN, READER, SVC, WRITABLE, WRITABLE_NOW, WRITER, IdPath, Services
from serve_apps.errors import (CONFLICT, BadRequest, Conflict, Forbidden, NotFound, PreconditionFailed,
                               Unprocessable, unwrap)
from serve_apps.shard_deadline import RETRY_AFTER_S, TwinUnavailable
from sweeps.runs import RunError, RunStore

ModelName = IdPath
Version = Annotated[str, Path(pattern=r"^\d+\.\d+\.\d+$")]


class TransitionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: Stage = Field(description="candidate (submit; the caller becomes the author), staging, production, archived")
    reason: str = Field(min_length=1, max_length=2000)
    evidence: Evidence = Field(default_factory=Evidence)
    expected_revision: int | None = Field(None, ge=-1, description="Refuse (409) unless the model's log is at "
                                          "this revision (compare-and-set; see `revision` in the status).")
    fleet: bool = Field(False, description="Promote a version fitted on some twins' telemetry (a drift "
                        "recalibration's) although promotion swaps every twin of the model to it: their parameters "
                        "become the fitted ones too (409 without it while other twins run the model)")


class TwinSwaps(BaseModel):
    swapped: list[str] = Field(description="Twins that run the new production version for events from now on")
    refused: dict[str, str] = Field(description=(
        "Asset id -> why its twin keeps the version it runs (e.g. another state layout): it stays on that "
        "version, archived now, which retention keeps while it runs it; the reason says what to do. Another "
        "version promoted (or rolled back to) meanwhile refuses this swap too: the reason names the version in "
        "production now, whose own swap moves the twin (or says the service's next start does)"))
    unfinished: str | None = Field(None, description=(
        "Why twins named in neither list may still run another version: a twin shard left the read of its twins "
        "unanswered past `shard_read_timeout_s` (hung or stalled), so they were not asked, or left their swap "
        "unanswered (named; the shard applies it when it gets to it, unless another swap moved the twin); the "
        "service's next start swaps them. null: every shard answered"))


class TransitionAnswer(TransitionRecord):
    """The recorded transition and, for a change of the production version, what became of the model's twins."""

    twins: TwinSwaps | None = Field(None, description="For a promotion or rollback: the hot swap of the "
                                    "tenant's twins of the model (also audited as `model.swap`); null otherwise")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)
    evidence: Evidence = Field(default_factory=Evidence)
    expected_revision: int | None = Field(None, ge=-1)
    from_version: str | None = Field(None, pattern=r"^\d+\.\d+\.\d+$", description=(
        "The production version this rollback leaves: 409 unless it is production now, so the same rollback "
        "sent twice (a retry after a timeout, two approvers answering one incident) goes back one version, "
        "not two. The SDK fills it in from GET .../lifecycle"))


class VersionStatus(BaseModel):
    version: str
    stage: Stage
    submitted: bool = Field(description="False for a registered version never submitted (a candidate with no "
                                        "author yet: submit it before staging it)")
    author: str | None
    since: datetime | None
    pruned: bool


class LifecycleStatus(BaseModel):
    model: str
    revision: int = Field(description="Sequence number of the last transition record (-1: none)")
    head_hash: str
    production: str | None
    rollback_target: str | None
    versions: list[VersionStatus]


class ChainCheck(BaseModel):
    ok: bool
    records: int = Field(description="Records found good (up to the first bad one)")
    head_hash: str | None
    first_bad_record: int | None
    message: str | None


def _lifecycle(svc: Services, tenant: str) -> ModelLifecycle:
    return ModelLifecycle(ModelRegistry(svc.config.url("registry", tenant), svc.config.storage_options or None))


def _actor(who: Principal, keys: KeyStore) -> LifecycleActor:
    """The key as the lifecycle's actor: its owner, its grants as roles, and as ids it acted under its own and its
    owner's other keys (revoked ones too); the tenant's keys without an owner as those it cannot be told apart
    from. A key without an owner holds no role, so its approver grant approves nothing (`_ownerless`)."""
    if who.owner is None:
        return LifecycleActor(id=who.person, tenant=who.tenant, also=frozenset({who.key_id}))
    return LifecycleActor(id=who.person, tenant=who.tenant, roles=frozenset(who.grants),
                          also=keys.key_ids(who.tenant, who.owner) | {who.key_id},
                          untold=keys.key_ids(who.tenant, None))


def _ownerless(who: Principal | None) -> str:
    """What a refusal for want of the approver role adds for a key that has the grant but no owner: how to fix it."""
    if who is None or "approver" not in who.grants or who.owner is not None:
        return ""
    return (f"; key {who.key_id} has the approver grant but no owner, so it approves nothing ({OWNER_NEEDED}): "
            f"{ownerless_fix(who.key_id)}")


def _check_evidence(svc: Services, tenant: str, model: str, evidence: Evidence) -> None:
    """422 for evidence a key gives that is not what it says (`raytwin.lifecycle.check_given_evidence`, which the
    offline CLI checks too): its run ids are looked up in the tenant's run records."""
    runs = RunStore(svc.config.url("runs", tenant), svc.config.storage_options or None)

    def model_ref_of(run_id: str) -> str | None:
        try:
            return runs.load(run_id).model_ref
        except RunError:
            return None

    try:
        check_given_evidence(evidence, model, model_ref_of)
    except EvidenceRefused as exc:
        raise Unprocessable(str(exc)) from None


async def _only_if_match(if_none_match: Annotated[str | None, Header(include_in_schema=False)] = None,
                         if_unmodified_since: Annotated[str | None, Header(include_in_schema=False)] = None) -> None:
    """400 for preconditions a transition cannot honour: its only condition is the log's revision (If-Match,
    expected_revision), and a header ignored would let a client believe its transition was conditional."""
    for header, value in (("If-None-Match", if_none_match), ("If-Unmodified-Since", if_unmodified_since)):
        if value is not None:
            raise BadRequest(f"{header}: {value} is not a condition a lifecycle transition or rollback honours "
                             "(the model's log always exists, and its revision is its only validator), so it is "
                             "refused rather than ignored; nothing was changed. Send If-Match with the ETag of GET "
                             "/v1/models/{model}/lifecycle (or expected_revision in the body) instead",
                             details=[{"header": header}])


ONLY_IF_MATCH = Depends(_only_if_match)


IF_MATCH = Header(None, description='The lifecycle\'s ETag from GET .../lifecycle (`"7-3f2a9c01be4d"`: its '
                  "revision and the start of its head hash): the transition happens only if the model's log is "
                  'still there, else 412. A bare revision (`"7"`, as ETags were before 2026-12-06) checks the revision '
                  "alone, as expected_revision in the body does (which answers 409)")


ETAG_HEAD_CHARS = 12


def lifecycle_etag(revision: int, head_hash: str) -> str:
    """The lifecycle's ETag: its log's revision and the start of its head hash, so that a revision a restore of the
    store gave other records (a restore from an earlier copy, then new transitions) is another tag."""
    return f'"{revision}-{head_hash[:ETAG_HEAD_CHARS]}"'


def _expected(if_match: str | None, expected_revision: int | None) -> tuple[int | None, str | None]:
    """The revision a transition is conditional on, and the start of the log's head hash there: `If-Match` (the
    lifecycle's ETag) or the body's expected_revision (no hash). An If-Match this compare-and-set cannot honour is
    refused, never ignored: a client that sent it believes the transition is conditional."""
    if if_match is None:
        return expected_revision, None
    match = _LIFECYCLE_TAG.fullmatch(if_match.strip())
    if match is None:
        raise BadRequest(f"If-Match: {if_match} is not one lifecycle ETag: a transition is conditional on one "
                         'revision of the model\'s log; send the ETag of GET /v1/models/{model}/lifecycle as '
                         'returned (e.g. If-Match: "7-3f2a9c01be4d"), or expected_revision in the body')
    revision = int(match["revision"])
    if expected_revision is not None and expected_revision != revision:
        raise BadRequest(f"If-Match: {if_match} and expected_revision {expected_revision} name different revisions; "
                         "send one of them")
    return revision, match["head"]


_LIFECYCLE_TAG = re.compile(rf'"(?P<revision>-?\d+)(?:-(?P<head>[0-9a-f]{{{ETAG_HEAD_CHARS}}}))?"')


async def _call(fn: Any, *args: Any, if_match: str | None = None, who: Principal | None = None) -> Any:
    """Run a blocking lifecycle call off the event loop, its refusals turned into API errors (`_answered`)."""
    with _answered(if_match, who):
        return await run_in_threadpool(fn, *args)


@contextmanager
def _answered(if_match: str | None = None, who: Principal | None = None) -> Iterator[None]:
    """A lifecycle call's refusals as API errors; a lost compare-and-set whose revision came from `if_match`
    answers 412, as HTTP preconditions do elsewhere in the API (`serve_apps.conditional`). A refusal to approve
    says how to give `who`, the acting key, the owner it lacks (`_ownerless`)."""
    try:
        yield
    except ApprovalRequired as exc:
        raise Forbidden(str(unwrap(exc)) + _ownerless(who)) from None
    except TenantMismatch as exc:
        raise Forbidden(str(unwrap(exc))) from None
    except TransitionConflict as exc:
        if if_match is None:
            raise Conflict(str(unwrap(exc))) from None
        raise PreconditionFailed(f"{unwrap(exc)}; nothing was changed (If-Match: {if_match} did not hold): GET "
                                 ".../lifecycle again and send its ETag", details=[{"header": "If-Match"}]) from None
    except LifecycleError as exc:
        raise Conflict(str(unwrap(exc))) from None
    except RegistryError as exc:
        raise NotFound(str(unwrap(exc))) from None


def _require_model(lc: ModelLifecycle, model: str) -> None:
    """`RegistryError` (404) for a model the tenant's registry does not know: its empty log is no answer."""
    if not lc.exists(model):
        raise RegistryError(f"no model {model}")


def _status(lc: ModelLifecycle, model: str) -> LifecycleStatus:
    _require_model(lc, model)
    state = lc.current(model)
    registered = lc.registry.versions(model)
    versions = []
    for version in sorted(set(registered) | set(state.versions), key=lambda v: tuple(int(x) for x in v.split("."))):
        s = state.versions.get(version)
        versions.append(VersionStatus(version=version, stage=s.stage if s else "candidate", submitted=s is not None,
                                      author=s.author if s else None, since=s.since if s else None,
                                      pruned=bool(s and s.pruned)))
    return LifecycleStatus(model=model, revision=state.revision, head_hash=state.head_hash,
                           production=state.production, rollback_target=state.rollback_target, versions=versions)


def _check(lc: ModelLifecycle, model: str, expected_head: str | None) -> ChainCheck:
    _require_model(lc, model)
    try:
        state = lc.verify(model, expected_head)
    except ChainBroken as exc:
        return ChainCheck(ok=False, records=exc.record, head_hash=None,
                          first_bad_record=exc.record, message=str(exc))
    return ChainCheck(ok=True, records=state.revision + 1, head_hash=state.head_hash, first_bad_record=None,
                      message=None)


async def _answer(svc: Services, request: Request, who: Principal, record: TransitionRecord) -> TransitionAnswer:
    """The answer to a transition; for a change of the production version, after the hot swap of the model's
    twins to it (`serve_apps.routes_shadow`, imported here because it builds on this module), with its outcome:
    a twin that refused the swap keeps running a version that is no longer production."""
    from serve_apps.routes_shadow import swap_on_promotion

    swaps = None
    if record.to_stage == "production":
        outcome = await swap_on_promotion(svc, request, who, record)
        swaps = TwinSwaps(swapped=[s.asset_id for s in outcome.states], refused=outcome.refused,
                          unfinished=outcome.unfinished)
    return TransitionAnswer.model_validate({**record.model_dump(), "twins": swaps})


async def _refuse_partial_fit(svc: Services, who: Principal, lc: ModelLifecycle, model: str, version: str) -> None:
    """409 for promoting a version fitted on some twins' telemetry while other twins run the model
    (`raytwin.lifecycle.partial_fit_refusal`, which the offline CLI checks too); 503 `twin_unavailable` when a twin
    shard leaves the read of its twins unanswered within `shard_read_timeout_s` (it hung the request; nothing is
    recorded yet)."""
    from serve_apps.routes_shadow import live_models

    records, timeout_s = await _call(lc.records, model), svc.config.shard_read_timeout_s
    try:
        refusal = await run_in_threadpool(partial_fit_refusal, records, f"{model}@{version}", lambda: live_models(
            svc).twins_of_model(who.tenant, model, timeout_s=timeout_s), 'send "fleet": true')
    except GetTimeoutError:
        raise TwinUnavailable(f"a twin shard left the read of which twins run {model} unanswered within {timeout_s:g} "
                              f"s (hung or stalled), needed to promote {model}@{version}, fitted on some twins' "
                              f"telemetry: nothing was recorded; retry after {RETRY_AFTER_S} s",
                              headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    if refusal is not None:
        raise Conflict(refusal)


def register(app: FastAPI) -> None:
    tags = ["model lifecycle"]

    @app.get("/v1/models/{model}/lifecycle", response_model=LifecycleStatus, tags=tags,
             responses=with_etag(NOT_MODIFIED, 200, 304, header=LIFECYCLE_ETAG))
    async def lifecycle_status(model: ModelName, response: Response, who: Principal = READER,
                               pre: Precondition = CONDITIONAL_READ, svc: Services = SVC) -> Any:
        """Each registered version's stage and author, the production version and the log's revision (also the
        ETag: send it as If-Match to make a transition conditional on it)."""
        status: LifecycleStatus = await _call(_status, _lifecycle(svc, who.tenant), model)
        response.headers["ETag"] = lifecycle_etag(status.revision, status.head_hash)
        return pre.read(response, status.revision, f"model {model}'s lifecycle") or status

    @app.post("/v1/models/{model}/versions/{version}/transitions", response_model=TransitionAnswer,
              status_code=201, tags=tags, responses=with_etag(CONFLICT, 201, header=LIFECYCLE_ETAG))
    async def transition(model: ModelName, version: Version, body: TransitionRequest, request: Request,
                         response: Response, who: Principal = WRITER, svc: Services = SVC,
                         _writable: None = WRITABLE_NOW, if_match: str | None = IF_MATCH,
                         _only_if_match: None = ONLY_IF_MATCH) -> TransitionAnswer:
        """Move a version to another stage. Production: a key with the `approver` grant and an owner, of another
        person than whoever submitted the version (403 otherwise), unless the tenant's policy promotes
        automatically; the previous production version is archived, and the model's twins swap to the new one
        (`twins` says which did, and why the others keep theirs). 409: a move the version's stage does not allow,
        or a lost race (412 when the revision came from If-Match). The answer's ETag is the lifecycle's new one."""
        expected, head = _expected(if_match, body.expected_revision)
        lc = _lifecycle(svc, who.tenant)
        await run_in_threadpool(_check_evidence, svc, who.tenant, model, body.evidence)
        if body.to == "production" and not body.fleet:
            await _refuse_partial_fit(svc, who, lc, model, version)
        async with svc.audited(request, who, f"model.{ACTION_TO[body.to]}", f"{model}@{version}",
                               to_stage=body.to) as outcome:
            record: TransitionRecord = await _call(partial(lc.transition, expected_head=head), f"{model}@{version}",
                                                   body.to, _actor(who, svc.keys), body.reason, body.evidence,
                                                   expected, if_match=if_match, who=who)
            outcome.update(audited_transition(record))
        response.headers["ETag"] = lifecycle_etag(record.seq, record.hash)
        return await _answer(svc, request, who, record)

    @app.post("/v1/models/{model}/rollback", response_model=TransitionAnswer, status_code=201, tags=tags,
              responses=with_etag(CONFLICT, 201, header=LIFECYCLE_ETAG))
    async def rollback(model: ModelName, body: RollbackRequest, request: Request, response: Response,
                       who: Principal = WRITER, svc: Services = SVC, _writable: None = WRITABLE_NOW,
                       if_match: str | None = IF_MATCH, _only_if_match: None = ONLY_IF_MATCH) -> TransitionAnswer:
        """Return to the previous production version (needs the `approver` grant, or automatic promotion); the
        model's twins swap to it (`twins`); conditional on If-Match or expected_revision as a transition is.
        Name the version it leaves as `from_version`: sent twice, it then goes back once (409 the second time)."""
        expected, head = _expected(if_match, body.expected_revision)
        lc = _lifecycle(svc, who.tenant)
        await _call(_require_model, lc, model)
        await run_in_threadpool(_check_evidence, svc, who.tenant, model, body.evidence)
        async with svc.audited(request, who, "model.rollback", model, from_version=body.from_version) as outcome:
            actor = _actor(who, svc.keys)
            record: TransitionRecord = await _call(partial(lc.rollback, expected_head=head), model, actor,
                                                   body.reason, body.evidence, expected, body.from_version,
                                                   if_match=if_match, who=who)  # to the version only the log knows
            outcome.update(audited_transition(record))
        response.headers["ETag"] = lifecycle_etag(record.seq, record.hash)
        return await _answer(svc, request, who, record)

    @app.get("/v1/models/{model}/lifecycle/log", response_model=list[TransitionRecord], tags=tags)
    async def lifecycle_log(model: ModelName, who: Principal = READER, svc: Services = SVC) -> list[TransitionRecord]:
        """The model's transition records, oldest first (check them with .../lifecycle/verify); 404: no model."""
        lc = _lifecycle(svc, who.tenant)
        await _call(_require_model, lc, model)
        return await _call(lc.records, model)

    @app.get("/v1/models/{model}/lifecycle/verify", response_model=ChainCheck, tags=tags)
    async def lifecycle_verify(
        model: ModelName, who: Principal = READER, svc: Services = SVC,
        expected_head: Annotated[str | None, Query(pattern=r"^[0-9a-f]{64}$", description=(
            "A head hash noted earlier: also catches records removed from the end"))] = None,
    ) -> ChainCheck:
        """Check the log's hash chain; `first_bad_record` names where it breaks."""
        return await _call(_check, _lifecycle(svc, who.tenant), model, expected_head)

    @app.post("/v1/models/{model}/prune", response_model=PruneReport, tags=tags)
    async def prune(model: ModelName, request: Request, who: Principal = ADMIN, svc: Services = SVC,
                    _writable: None = WRITABLE) -> Any:
        """Apply the tenant's retention to the model's archived versions and to the tenant's sweep run records
        of the model (``{store}/runs/{tenant}``), admin only. Versions live twins need stay: the one each twin
        runs now (a refused swap leaves it on an archived one), those its retained history was applied by
        (`?at=` reads and runs from a past state use them) and those its asset's catalog entry names. Audited as
        `model.prune` of the model in two steps: its outcome names each version's log record (seq and hash) and
        each run record removed, those of a prune that failed partway too. 404: no such model (a mistyped name
        answered an empty report, as if retention had run)."""
        lifecycle = _lifecycle(svc, who.tenant)
        await _call(_require_model, lifecycle, model)
        assets = await svc.backend.call("list_assets", who.tenant, model, None, None, None)
        twins = StateStore(svc.config.url("twins"), svc.config.storage_options or None)
        running: dict[str, list[str]] = await run_in_threadpool(twins.model_versions, who.tenant, model)
        async with svc.audited(request, who, "model.prune", model) as outcome:
            failure: BaseException | None = None
            try:
                report: PruneReport = await _call(lifecycle.prune, model, _actor(who, svc.keys),
                                                  svc.config.url("runs", who.tenant),
                                                  svc.config.storage_options or None,
                                                  {a.type_version for a in assets} | set(running))
            except PruneIncomplete as exc:  # what it did stays done: in the outcome, with the failure
                report, failure = exc.done, exc.__cause__
            outcome.update(report.audited())  # each removal tied to its log record by hash
            if failure is not None:
                with _answered():
                    raise failure
        return report

    @app.get("/v1/lifecycle-policy", response_model=LifecyclePolicy, tags=tags)
    async def get_policy(who: Principal = READER, svc: Services = SVC) -> LifecyclePolicy:
        return await _call(_lifecycle(svc, who.tenant).policy, who.tenant)

    @app.put("/v1/lifecycle-policy", response_model=LifecyclePolicy, tags=tags)
    async def put_policy(body: LifecyclePolicy, request: Request, who: Principal = ADMIN,
                         svc: Services = SVC, _writable: None = WRITABLE) -> LifecyclePolicy:
        """Replace the tenant's lifecycle policy (admin only; audited). Turning `auto_promote` on or off also
        needs the `approver` grant: it decides whether production needs a second key at all. Its automatic
        promotion promotes no version whose author or publisher is whoever last set the policy (403): one approver
        alone cannot switch four eyes off for its own work."""
        lifecycle = _lifecycle(svc, who.tenant)
        current = await _call(lifecycle.policy, who.tenant)
        with _answered(who=who):
            check_policy_change(current, body, _actor(who, svc.keys))
        async with svc.audited(request, who, "lifecycle_policy.update", who.tenant,
                               policy=body.model_dump(mode="json")):
            await _call(lifecycle.set_policy, who.tenant, body, frozenset({who.person, who.key_id}))
        return body

