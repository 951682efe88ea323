"""Routes for live model changes: shadow evaluation of a candidate version, and the hot swap of a
tenant's twins when a version is promoted (called by the lifecycle routes).

The ingress talks to the twin shards directly (`actors.live_models.LiveModels` over the shard
actors looked up by name, as `serve_apps.twin_reads` does), and to the lifecycle in the tenant's
registry; neither needs the Backend deployment. Every call to the shards waits `shard_read_timeout_s` at most: a
shard that leaves one unanswered (hung or stalled) is 503 `twin_unavailable` with `Retry-After`, not a request held
forever (a promotion's swap answers what it did instead: `serve_apps.promotions`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from collections.abc import Callable
from typing import Any

import ray
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from ray.exceptions import GetTimeoutError
from starlette.concurrency import run_in_threadpool

from actors.live_models import LiveModels, ShadowReport, SwapOutcome, UnknownShadow
from actors.routing import shard_name
from actors.shadow import MAX_EVENTS, MAX_TWINS, ShadowRefused, ShadowRunning
from actors.state import UnknownTwin
from raytwin.contracts import Identifier
from raytwin.lifecycle import ModelLifecycle, TransitionRecord
from raytwin.registry import RegistryError
from raytwin.shadow import recorded
from serve_apps.auth import Principal
from serve_apps.deps import READER, SVC, WRITABLE, WRITER, Services
from serve_apps.errors import CONFLICT, BadRequest, Conflict, NotFound, unwrap
from serve_apps.promotions import swap_while_production
from serve_apps.routes_models import ModelName, Version, _call, _lifecycle
from serve_apps.shadow_conclusions import evaluation_log, record_finished
from serve_apps.shard_deadline import RETRY_AFTER_S, TwinUnavailable

log = logging.getLogger("raytwin.serve")
SHADOWED_STAGES = ("candidate", "staging")


class ShadowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    asset_ids: list[Identifier] | None = Field(None, min_length=1, max_length=MAX_TWINS,
                                               description="The twins to shadow (or give `sample`)")
    sample: int | None = Field(None, ge=1, le=MAX_TWINS, description="Shadow this many of the tenant's twins "
                               "running a version of the model (a stable pseudo-random pick)")
    events: int = Field(ge=1, le=MAX_EVENTS, description="Events to score per twin before concluding")


class ShadowStarted(BaseModel):
    run_id: str
    candidate_ref: str
    asset_ids: list[str]
    events: int


class ShadowStatus(BaseModel):
    report: ShadowReport
    recorded: list[TransitionRecord] = Field(description="The lifecycle records of this evaluation: once it is done "
                                             "the service records its evidence (within seconds, or at its DELETE) "
                                             "and, under the tenant's policy, the candidate's automatic move to "
                                             "staging; [] until then")
    not_recorded: str | None = Field(None, description="Why the evaluation's evidence is not (or will not be) "
                                     "recorded: the candidate was archived meanwhile (DELETE the evaluation)")


def live_models(svc: Services) -> LiveModels:
    """The shard actors of this deployment's twin service, looked up by name; 503 `twin_unavailable` while one is not
    there (the backend replica that owns them restarting): Ray's `ValueError` for a name it does not know was answered
    400 `bad_request` with Ray's own words, as if the request were wrong, after a promotion was recorded too."""
    url, n, ns = svc.config.url("twins"), svc.config.twin_shards, svc.config.namespace
    try:
        return LiveModels([ray.get_actor(shard_name(url, i, n), namespace=ns) for i in range(n)])
    except ValueError:
        raise TwinUnavailable(f"the twin shards are not running (the service is starting or restarting them); retry "
                              f"after {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)}) from None


async def _live(svc: Services, call: Callable[[LiveModels], Any]) -> Any:
    """Run `call` on the live models off the event loop, its refusals turned into API errors (a shard's call left
    unanswered within `shard_read_timeout_s`: 503, saying what the shards that answered may have done)."""
    try:
        return await run_in_threadpool(lambda: call(live_models(svc)))
    except GetTimeoutError:
        raise TwinUnavailable(
            f"a twin shard left the evaluation's call unanswered within {svc.config.shard_read_timeout_s:g} s (hung or "
            f"stalled); retry after {RETRY_AFTER_S} s. A start or stop of an evaluation is applied by the shards that "
            "answered, and by this one when it gets to it: GET the evaluation before sending it again",
            headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except UnknownShadow as exc:
        raise NotFound(str(unwrap(exc))) from None
    except (ShadowRunning, ShadowRefused) as exc:
        raise Conflict(str(unwrap(exc))) from None
    except UnknownTwin as exc:  # a missing twin, or another tenant's
        raise NotFound(str(unwrap(exc))) from None
    except (KeyError, ValueError) as exc:
        raise BadRequest(str(unwrap(exc)).strip("'\"")) from None


async def swap_on_promotion(svc: Services, request: Request, who: Principal,
                            record: TransitionRecord) -> SwapOutcome:
    """After a promotion or rollback: the tenant's twins of the model switch to the new production
    version for events from now (server time) on, while it is production (`serve_apps.promotions.
    swap_while_production`: another replica's transition beside it, a shard unanswered within `shard_read_timeout_s`);
    audited with the twins swapped and refused, and why the swap is unfinished where it is."""
    lc = _lifecycle(svc, who.tenant)
    try:
        artifact = await run_in_threadpool(lc.registry.get, f"{record.model}@{record.version}")
    except RegistryError as exc:
        raise NotFound(str(unwrap(exc))) from None
    at = datetime.now(UTC)
    async with svc.audited(request, who, "model.swap", artifact.ref, at=at.isoformat(), seq=record.seq) as audit:
        outcome: SwapOutcome = await _live(svc, lambda m: swap_while_production(
            lc, m, who.tenant, artifact, at, svc.config.shard_read_timeout_s))
        audit.update(swapped=[s.asset_id for s in outcome.states], refused=outcome.refused,
                     **({"unfinished": outcome.unfinished} if outcome.unfinished else {}))
    if outcome.refused:
        log.warning("event=swap_refused tenant=%s model=%s twins=%d: they keep the version they run",
                    who.tenant, artifact.ref, len(outcome.refused))
    if outcome.unfinished:
        log.warning("event=swap_unfinished tenant=%s model=%s: %s", who.tenant, artifact.ref, outcome.unfinished)
    return outcome


def _submitted(lc: ModelLifecycle, model: str, version: str) -> bool:
    """Whether `version` is on its model's lifecycle log. A registered version never submitted reads as a candidate,
    but the verdict of its evaluation could never be recorded (`ModelLifecycle.evaluate` refuses it): the service
    tried again every few seconds, a traceback each time, and the evaluation was never concluded."""
    return version in lc.current(model).versions


def _record_if_finished(models: LiveModels, lc: ModelLifecycle, svc: Services, tenant: str, ref: str,
                        request: Request) -> None:
    """Record the evaluation of `ref`, if one runs and is done, before a DELETE ends it."""
    try:
        report = models.shadow(tenant, ref, svc.config.shard_read_timeout_s)
    except UnknownShadow:  # none: the DELETE answers 404
        return
    record_finished(report, lc, svc.audit, tenant, getattr(request.state, "request_id", None))


def register(app: FastAPI) -> None:
    tags = ["model lifecycle"]
    path = "/v1/models/{model}/versions/{version}/shadow"

    @app.post(path, response_model=ShadowStarted, status_code=201, tags=tags, responses=CONFLICT)
    async def start_shadow(model: ModelName, version: Version, body: ShadowRequest, request: Request,
                           who: Principal = WRITER, svc: Services = SVC, _writable: None = WRITABLE) -> ShadowStarted:
        """Score a candidate or staging version beside production on the next `events` events of the named
        twins (or a sample of the model's twins) without changing their served state. 409: the version is in
        another stage or was never submitted, an evaluation of it runs (DELETE it first), or a named twin runs another model (or one
        whose measurements the candidate does not share)."""
        if (body.asset_ids is None) == (body.sample is None):
            raise BadRequest("give either asset_ids or sample")
        lc, ref = _lifecycle(svc, who.tenant), f"{model}@{version}"
        stage = await _call(lc.stage, ref)
        if stage not in SHADOWED_STAGES:
            raise Conflict(f"{ref} is {stage}: shadow evaluation is for candidate and staging versions")
        if not await _call(_submitted, lc, model, version):
            raise Conflict(f"{ref} was registered but never submitted: submit it first (POST /v1/models/{model}/"
                           f"versions/{version}/transitions with \"to\": \"candidate\"); a shadow evaluation's "
                           "verdict is evidence on the version's lifecycle log, which holds submitted versions only")
        artifact = await _call(lc.registry.get, ref)
        async with svc.audited(request, who, "model.shadow_start", ref, asset_ids=body.asset_ids, sample=body.sample,
                               events=body.events) as outcome:
            run_id, ids = await _live(svc, lambda m: m.start_shadow(
                who.tenant, artifact, events=body.events, asset_ids=body.asset_ids, sample=body.sample,
                timeout_s=svc.config.shard_read_timeout_s))
            outcome.update(run_id=run_id, asset_ids=ids, events=body.events)
        return ShadowStarted(run_id=run_id, candidate_ref=ref, asset_ids=ids, events=body.events)

    @app.get(path, response_model=ShadowStatus, tags=tags)
    async def shadow_status(model: ModelName, version: Version, request: Request, who: Principal = READER,
                            svc: Services = SVC) -> ShadowStatus:
        """Production against the candidate so far (NIS per measured value, innovation RMSE, log-likelihood),
        and what the service recorded of it: once done, the comparison is recorded on the lifecycle log by the
        system principal (once per run, within seconds; `recorded`). A read writes nothing. A candidate archived
        meanwhile gets no evidence (`not_recorded` says so), and the report is still read."""
        ref, lc = f"{model}@{version}", _lifecycle(svc, who.tenant)
        report: ShadowReport = await _live(svc, lambda m: m.shadow(who.tenant, ref, svc.config.shard_read_timeout_s))
        archived, logged = await _call(evaluation_log, lc, ref)
        if archived:
            return ShadowStatus(report=report, recorded=[], not_recorded=(
                f"{ref} was archived since the evaluation started: the lifecycle records evidence for candidate, "
                f"staging and production versions only, so this comparison is not recorded; DELETE {request.url.path} "
                "to end the evaluation"))
        return ShadowStatus(report=report, recorded=recorded(logged, ref, report.run_id))

    @app.delete(path, status_code=204, tags=tags)
    async def stop_shadow(model: ModelName, version: Version, request: Request, who: Principal = WRITER,
                          svc: Services = SVC, _writable: None = WRITABLE) -> None:
        """End the evaluation of this version; a finished one's evidence is recorded first if the service has not
        yet (and stays on the log)."""
        ref, lc = f"{model}@{version}", _lifecycle(svc, who.tenant)
        async with svc.audited(request, who, "model.shadow_stop", ref):
            await _live(svc, lambda m: _record_if_finished(m, lc, svc, who.tenant, ref, request))
            if not await _live(svc, lambda m: m.stop_shadow(who.tenant, ref, svc.config.shard_read_timeout_s)):
                raise NotFound(f"no shadow evaluation of {ref}")

