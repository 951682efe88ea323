"""Routes for the model lifecycle: a version's stage, transitions, rollback, the transition log and its check.

The lifecycle lives in the tenant's registry in the store (`raytwin.lifecycle`); the ingress acts on it
directly, without the backend: each transition is a compare-and-set on the store, so replicas need no
lock. Promotion to production needs a key with the ``approver`` grant that is not the key that
submitted the candidate (four eyes), unless the tenant's policy allows automatic promotion.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from raytwin.lifecycle import (
    APPROVER,
    ApprovalRequired,
    ChainBroken,
    Evidence,
    LifecycleError,
    LifecyclePolicy,
    ModelLifecycle,
    PruneReport,
    Stage,
    TenantMismatch,
    TransitionRecord,
)
from raytwin.lifecycle import Actor as LifecycleActor
from raytwin.registry import ModelRegistry, RegistryError
from raytwin.statestore import StateStore
from serve_apps.auth import Principal
from serve_apps.deps import ADMIN, READER, SVC, WRITABLE, WRITER, Services
from serve_apps.errors import CONFLICT, Conflict, Forbidden, NotFound, Unprocessable, unwrap
from sweeps.runs import RunError, RunStore

ModelName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")]
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
        "version, archived now, which retention keeps while it runs it; the reason says what to do"))


class TransitionAnswer(TransitionRecord):
    """The recorded transition and, for a change of the production version, what became of the model's twins."""

    twins: TwinSwaps | None = Field(None, description="For a promotion or rollback: the hot swap of the "
                                    "tenant's twins of the model (also audited as `model.swap`); null otherwise")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)
    evidence: Evidence = Field(default_factory=Evidence)
    expected_revision: int | None = Field(None, ge=-1)


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


def _actor(who: Principal) -> LifecycleActor:
    return LifecycleActor(id=who.key_id, tenant=who.tenant, roles=frozenset(who.grants))


def _check_evidence(svc: Services, tenant: str, evidence: Evidence) -> None:
    """Evidence a key gives must be what it says: its run ids are the tenant's runs, and what only the system
    measures (a shadow evaluation's metrics, the drift alarms a recalibration answered) it cannot state: an
    approver reading the log must not take a client's numbers for the system's."""
    system_only = [name for name in ("shadow_metrics", "triggers") if getattr(evidence, name)]
    if system_only:
        raise Unprocessable(f"evidence.{system_only[0]} is recorded by the system (a shadow evaluation, a drift "
                            "recalibration), not given by a key; run `POST .../shadow` for shadow metrics")
    runs = RunStore(svc.config.url("runs", tenant), svc.config.storage_options or None)
    for run_id in evidence.run_ids:
        try:
            runs.load(run_id)
        except RunError:
            raise Unprocessable(f"evidence.run_ids: no run {run_id!r} of this tenant (its sweeps, calibrations "
                                "and recalibrations record theirs)") from None


async def _call(fn: Any, *args: Any) -> Any:
    """Run a blocking lifecycle call off the event loop, its refusals turned into API errors."""
    try:
        return await run_in_threadpool(fn, *args)
    except (ApprovalRequired, TenantMismatch) as exc:
        raise Forbidden(str(unwrap(exc))) from None
    except LifecycleError as exc:
        raise Conflict(str(unwrap(exc))) from None
    except RegistryError as exc:
        raise NotFound(str(unwrap(exc))) from None


def _status(lc: ModelLifecycle, model: str) -> LifecycleStatus:
    state = lc.verify(model)
    registered = lc.registry.versions(model)
    if not registered and not state.versions:
        raise RegistryError(f"no model {model}")
    versions = []
    for version in sorted(set(registered) | set(state.versions), key=lambda v: tuple(int(x) for x in v.split("."))):
        s = state.versions.get(version)
        versions.append(VersionStatus(version=version, stage=s.stage if s else "candidate", submitted=s is not None,
                                      author=s.author if s else None, since=s.since if s else None,
                                      pruned=bool(s and s.pruned)))
    return LifecycleStatus(model=model, revision=state.revision, head_hash=state.head_hash,
                           production=state.production, rollback_target=state.rollback_target, versions=versions)


def _check(lc: ModelLifecycle, model: str, expected_head: str | None) -> ChainCheck:
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
        swaps = TwinSwaps(swapped=[s.asset_id for s in outcome.states], refused=outcome.refused)
    return TransitionAnswer.model_validate({**record.model_dump(), "twins": swaps})


async def _refuse_partial_fit(svc: Services, who: Principal, lc: ModelLifecycle, model: str, version: str) -> None:
    """409 for promoting a version fitted on some twins' telemetry (the triggers of the drift recalibration that
    submitted it) while other twins run the model: promotion swaps all of them, and one zone's fit became every
    zone's parameters, with only its own fit report before the approver."""
    from serve_apps.routes_shadow import live_models

    records = await _call(lc.records, model)
    fitted = {t.asset_id for r in records if r.version == version for t in r.evidence.triggers}
    if not fitted:
        return
    running = await run_in_threadpool(lambda: live_models(svc).twins_of_model(who.tenant, model))
    others = sorted(set(running) - fitted)
    if others:
        named = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise Conflict(f"{model}@{version} was fitted on the telemetry of {', '.join(sorted(fitted))} (a drift "
                       f"recalibration); promotion swaps every twin of {model}, so {len(others)} other twin(s) ({named}) "
                       "would run its parameters too: send \"fleet\": true if they share them, or give assets whose "
                       "parameters differ a type of their own")


def register(app: FastAPI) -> None:
    tags = ["model lifecycle"]

    @app.get("/v1/models/{model}/lifecycle", response_model=LifecycleStatus, tags=tags)
    async def lifecycle_status(model: ModelName, who: Principal = READER, svc: Services = SVC) -> LifecycleStatus:
        """Each registered version's stage and author, the production version and the log's revision."""
        return await _call(_status, _lifecycle(svc, who.tenant), model)

    @app.post("/v1/models/{model}/versions/{version}/transitions", response_model=TransitionAnswer,
              status_code=201, tags=tags, responses=CONFLICT)
    async def transition(model: ModelName, version: Version, body: TransitionRequest, request: Request,
                         who: Principal = WRITER, svc: Services = SVC,
                         _writable: None = WRITABLE) -> TransitionAnswer:
        """Move a version to another stage. Production: a key with the `approver` grant that did not submit
        the version (403 otherwise), unless the tenant's policy promotes automatically; the previous
        production version is archived, and the model's twins swap to the new one (`twins` says which did,
        and why the others keep theirs). 409: a move the version's stage does not allow, or a lost race."""
        lc = _lifecycle(svc, who.tenant)
        await run_in_threadpool(_check_evidence, svc, who.tenant, body.evidence)
        if body.to == "production" and not body.fleet:
            await _refuse_partial_fit(svc, who, lc, model, version)
        record: TransitionRecord = await _call(lc.transition, f"{model}@{version}", body.to, _actor(who),
                                               body.reason, body.evidence, body.expected_revision)
        await svc.record(request, who, f"model.{record.action}", f"{model}@{version}", seq=record.seq,
                         to_stage=record.to_stage, displaced=record.displaced, hash=record.hash)
        return await _answer(svc, request, who, record)

    @app.post("/v1/models/{model}/rollback", response_model=TransitionAnswer, status_code=201, tags=tags,
              responses=CONFLICT)
    async def rollback(model: ModelName, body: RollbackRequest, request: Request, who: Principal = WRITER,
                       svc: Services = SVC, _writable: None = WRITABLE) -> TransitionAnswer:
        """Return to the previous production version (needs the `approver` grant, or automatic promotion); the
        model's twins swap to it (`twins`)."""
        lc = _lifecycle(svc, who.tenant)
        await run_in_threadpool(_check_evidence, svc, who.tenant, body.evidence)
        record: TransitionRecord = await _call(lc.rollback, model, _actor(who), body.reason, body.evidence,
                                               body.expected_revision)
        await svc.record(request, who, "model.rollback", f"{model}@{record.version}", seq=record.seq,
                         displaced=record.displaced, hash=record.hash)
        return await _answer(svc, request, who, record)

    @app.get("/v1/models/{model}/lifecycle/log", response_model=list[TransitionRecord], tags=tags)
    async def lifecycle_log(model: ModelName, who: Principal = READER, svc: Services = SVC) -> list[TransitionRecord]:
        """The model's transition records, oldest first (check them with .../lifecycle/verify)."""
        return await _call(_lifecycle(svc, who.tenant).records, model)

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
        (`?at=` reads and runs from a past state use them) and those its asset's catalog entry names."""
        assets = await svc.backend.call("list_assets", who.tenant, model, None, None, None)
        twins = StateStore(svc.config.url("twins"), svc.config.storage_options or None)
        running: dict[str, list[str]] = await run_in_threadpool(twins.model_versions, who.tenant, model)
        report: PruneReport = await _call(_lifecycle(svc, who.tenant).prune, model, _actor(who),
                                          svc.config.url("runs", who.tenant), svc.config.storage_options or None,
                                          {a.type_version for a in assets} | set(running))
        await svc.record(request, who, "model.prune", model, versions_removed=report.versions_removed,
                         runs_removed=report.runs_removed)
        return report

    @app.get("/v1/lifecycle-policy", response_model=LifecyclePolicy, tags=tags)
    async def get_policy(who: Principal = READER, svc: Services = SVC) -> LifecyclePolicy:
        return await _call(_lifecycle(svc, who.tenant).policy, who.tenant)

    @app.put("/v1/lifecycle-policy", response_model=LifecyclePolicy, tags=tags)
    async def put_policy(body: LifecyclePolicy, request: Request, who: Principal = ADMIN,
                         svc: Services = SVC, _writable: None = WRITABLE) -> LifecyclePolicy:
        """Replace the tenant's lifecycle policy (admin only; audited). Turning `auto_promote` on or off also
        needs the `approver` grant: it decides whether production needs a second key at all."""
        lifecycle = _lifecycle(svc, who.tenant)
        current = await _call(lifecycle.policy, who.tenant)
        if body.auto_promote != current.auto_promote and APPROVER not in who.grants:
            raise Forbidden(f"turning auto_promote {'on' if body.auto_promote else 'off'} needs the {APPROVER!r} "
                            f"grant (with it any writer promotes without a second key); key {who.key_id} has "
                            f"{sorted(who.grants) or 'none'}")
        await _call(lifecycle.set_policy, who.tenant, body)
        await svc.record(request, who, "lifecycle_policy.update", who.tenant, policy=body.model_dump(mode="json"))
        return body

