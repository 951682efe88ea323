"""Routes for recommended actions (`sweeps.recommend`): ask for one, read it back, issue it as a command.

A recommendation is a proposal. Issuing it proposes a command through the connector command channel
(`serve_apps/routes_commands.py`); approving that command needs an admin key with the ``approver`` grant of another
person than its issuer and than whoever computed the recommendation (`require_approver`). Every step is audited,
and another tenant's asset or recommendation is a 404.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

import ray
from fastapi import APIRouter, Request
from pydantic import Field, ValidationError
from starlette.concurrency import run_in_threadpool

from connectors.commands import Command
from raytwin.contracts import START_TIME, Contract, DateTime, Finite, Identifier, describe_error
from serve_apps.auth import OWNER_NEEDED, KeyRecord, KeyStore, Principal, ownerless_fix
from serve_apps.deps import READER, SVC, WRITABLE, WRITER, Services
from serve_apps.errors import Conflict, Forbidden, Infeasible, NotFound, Unprocessable, unwrap
from serve_apps.json_route import JsonRoute
from serve_apps.limits import require_value_fits
from serve_apps.routes_scenarios import _model_and_state, _provenance, _warned
from sweeps.recommend import Bound, Control, Ensemble, InfeasibleRecommendation, Method, Recommendation, RecommendSpec
from sweeps.recommend import load_recommendation, recorded_recommendation
from sweeps.runs import RunError, RunStore
from sweeps.space import Seed

COMMAND_KEY = "recommendation"
"""The command value's key naming the recommendation it carries (commands with it need an approver)."""


class RecommendationRequest(Contract):
    """What to optimise for one asset, from its twin's live state (or an explicit one)."""

    start_state: Literal["live"] | dict[str, Finite] = "live"
    start_time: DateTime | None = Field(None, description=START_TIME)
    horizon_s: Annotated[Finite, Field(gt=0, le=31 * 86400)]
    step_s: Annotated[Finite, Field(gt=0)]
    control: Control
    objective: Identifier
    constraints: Annotated[list[Bound], Field(max_length=16)] = Field(default_factory=list)
    inputs: dict[Identifier, Finite] = Field(default_factory=dict,
                                             description="Kit parameters, e.g. the baseline setpoint")
    method: Method = "gradient"
    iterations: Annotated[int, Field(ge=1, le=5_000)] = 400
    learning_rate: Annotated[Finite, Field(gt=0)] = 0.02
    penalty: Annotated[Finite, Field(gt=0)] = 1e3
    search: Literal["random", "grid"] = "random"
    samples: Annotated[int, Field(ge=1, le=100_000)] = 4096
    levels: Annotated[int, Field(ge=2, le=64)] = 5
    seed: Seed = 0
    ensemble: Ensemble
    best_effort: bool = Field(False, description=(
        "Answer a plan that leaves a band but gets closer to it than the baseline (status `best_effort`, with its "
        "`violations`) instead of refusing it (422 `infeasible`)"))
    min_feasible_fraction: Annotated[Finite, Field(ge=0, le=1)] = Field(0.0, description=(
        "The share of the ensemble's members in which the plan must keep every band (a chance constraint); below "
        "it a plan feasible on the model's parameters is refused (422 `infeasible`). 0: those parameters alone"))


class IssueRequest(Contract):
    connector: Identifier = Field(description="The connector that reaches the asset")
    name: Identifier = Field("schedule", description="The command's name at the asset")
    part: Literal["schedule", "first_block"] = Field(
        "schedule", description="`schedule`: the whole schedule as one command (an MQTT device that runs it); "
        "`first_block`: the first block's value alone, `{\"value\": number, \"unit\": unit}`, for a command that "
        "takes one value (an OPC UA node): the set point for the next `block_s`, after which a new recommendation "
        "from the twin's state gives the next (receding horizon)")


@ray.remote(num_cpus=1, max_retries=0)
def recommendation_task(spec: RecommendSpec, runs_url: str, storage_options: dict[str, Any], user: str
                        ) -> Recommendation:
    """A recorded recommendation on a Ray worker (the ingress stays free)."""
    return recorded_recommendation(spec, runs=runs_url, storage_options=storage_options or None, user=user)[1]


def command_value(answer: Recommendation, part: str = "schedule") -> dict[str, Any]:
    """The schedule as a command value: scalars, the values as a JSON list (a command holds at most 64 keys), the
    recommendation's status, so that its approver sees a best effort as one, and the time its `starts_s` count
    from (the state's time: offsets from an unstated origin could not be aligned with the plant's clock); or its
    first block's value alone (`IssueRequest.part`: the command names the recommendation, read there)."""
    action = answer.action
    if part == "first_block":
        return {"value": action.values[0], "unit": action.unit}
    start = {"start_time": answer.start_time.isoformat()} if answer.start_time is not None else {}
    warned = {"warnings": "; ".join(answer.warnings)} if answer.warnings else {}  # its approver must see them
    return {COMMAND_KEY: answer.run_id, "status": answer.status or "unknown", "input": action.input,
            "unit": action.unit, "period_s": action.period_s, **start, **warned,
            "starts_s": json.dumps(action.starts_s), "values": json.dumps(action.values)}


async def require_approver(command: dict[str, Any], who: Principal, svc: Services) -> None:
    """A command that carries a recommendation (named by the command, or by its value in records written before
    commands named it) is approved only by a key with the approver grant, of another person than the one who
    computed the recommendation: its start state, bands and objective decide the plan, so its author approving it
    would be one pair of eyes (as a proposer approving its own command)."""
    recommendation = command.get("recommendation_id") or command["value"].get(COMMAND_KEY)
    if recommendation is None:
        return
    if "approver" not in who.grants:
        raise Forbidden(f"command {command['id']} issues recommendation {recommendation}: approving "
                        "it needs a key with the 'approver' grant (raytwin keys create --grant approver)")
    try:
        user = (await run_in_threadpool(RunStore(svc.config.url("runs", who.tenant),
                                                 svc.config.storage_options or None).load, recommendation)).user
    except RunError:
        raise Conflict(f"command {command['id']} issues recommendation {recommendation}, whose run record is gone: "
                       "who computed it cannot be told apart from the approver (four eyes); refuse it, and issue a "
                       "new recommendation") from None
    if user is None or svc.keys.entry(user) is None:
        raise Conflict(f"command {command['id']} issues recommendation {recommendation}, computed by key {user}, "
                       "which the keys file no longer names (it was removed before revoked keys were kept): who "
                       "held it cannot be told apart from the approver (four eyes); refuse it, and issue a new "
                       "recommendation")
    require_another_person(svc.keys, user, who, f"recommendation {recommendation} of command {command['id']}",
                           "computed")


def require_another_person(keys: KeyStore, recorded: str, who: Principal, what: str, done: str) -> None:
    """409 unless whoever `done` `what` (`recorded`: an owner, or the key id of a key that had none when it acted) is
    another person than `who`. A key id is read as its key's owner, a revoked key's too; a key without an owner
    cannot be told from another key of `who`'s holder (four eyes), so its work is approved by no one."""
    entry = keys.entry(recorded)
    if entry is not None and entry.owner is None:
        fix = (f"{ownerless_fix(recorded)}, and another person approves it" if isinstance(entry, KeyRecord)
               else "have a key with an owner do it again")  # a revoked key keeps the owner it had
        raise Conflict(f"{what} was {done} by key {recorded}, which has no owner: its holder cannot be told apart "
                       f"from the approver ({OWNER_NEEDED}); {fix}")
    if {recorded, entry.owner if entry else None} & {who.key_id, who.person}:
        raise Conflict(f"{what} was {done} by {who.person}: another person must approve it (four eyes)")


router = APIRouter(prefix="/v1/assets/{asset_id}/recommendations", tags=["recommendations"], route_class=JsonRoute)


@router.post("", response_model=Recommendation, status_code=201)
async def create_recommendation(asset_id: str, body: RecommendationRequest, request: Request,
                                who: Principal = WRITER, svc: Services = SVC, _writable: None = WRITABLE) -> Any:
    """Optimise the asset's control schedule from its twin's state; a recorded run (`run_id`), answered
    when done (a gradient search over a week: seconds). A plan that leaves a band is 422 `infeasible` (which band,
    for how long, by how much, what to change), or, with `best_effort`, answered as one when it gets closer to the
    bands than the baseline; a twin without events is 409 `no_live_state` (give an explicit start_state)."""
    live = body.start_state == "live"
    artifact, state, clock, warnings, start = await _model_and_state(svc, who, asset_id, live, body.start_time)
    fields = body.model_dump(exclude={"start_state", "start_time"})
    try:
        spec = RecommendSpec(**fields, model=artifact.ref, registry_url=svc.config.url("registry", who.tenant),
                             tenant=who.tenant, asset_id=asset_id, start_state=state if live else body.start_state,
                             start_time=clock, start_warnings=warnings, **start.model_dump())
    except ValidationError as exc:
        raise Unprocessable(describe_error(exc)) from None
    async with svc.audited(request, who, "recommendation.create", asset_id, method=body.method,
                           **_provenance(artifact), **_warned(warnings)) as outcome:
        try:
            answer = await recommendation_task.remote(spec, svc.config.url("runs", who.tenant),
                                                      svc.config.storage_options, who.key_id)
        except ValueError as exc:  # a RecommendError or a spec the model refuses (Ray's wrapper is one too)
            cause = unwrap(exc)
            if isinstance(cause, InfeasibleRecommendation):
                raise Infeasible(str(cause), details=cause.details) from None
            raise Unprocessable(str(cause)) from None
        outcome.update(run_id=answer.run_id, status=answer.status, change=answer.change, change_pct=answer.change_pct)
    return answer


async def _own(svc: Services, who: Principal, asset_id: str, recommendation_id: str) -> Recommendation:
    """The tenant's recommendation for this asset (404 for anything else, another tenant's included)."""
    try:
        answer = await run_in_threadpool(load_recommendation, recommendation_id,
                                         runs=svc.config.url("runs", who.tenant),
                                         storage_options=svc.config.storage_options or None)
    except RunError:
        raise NotFound(f"no recommendation {recommendation_id} for asset {asset_id}") from None
    if answer.asset_id != asset_id or answer.tenant != who.tenant:
        raise NotFound(f"no recommendation {recommendation_id} for asset {asset_id}")
    return answer


@router.get("/{recommendation_id}", response_model=Recommendation)
async def get_recommendation(asset_id: str, recommendation_id: str, who: Principal = READER,
                             svc: Services = SVC) -> Any:
    return await _own(svc, who, asset_id, recommendation_id)


@router.post("/{recommendation_id}/issue", response_model=Command, status_code=201)
async def issue_recommendation(asset_id: str, recommendation_id: str, body: IssueRequest, request: Request,
                               who: Principal = WRITER, svc: Services = SVC) -> Any:
    """Propose the recommended schedule (or its first block's value: `part`) as a command to the asset; nothing
    is sent before another key with the approver grant approves it (``POST /v1/commands/{id}/approve``)."""
    answer = await _own(svc, who, asset_id, recommendation_id)
    value = command_value(answer, body.part)
    require_value_fits(value, svc.config.max_command_value_bytes, 'issue {"part": "first_block"}, or ask for a '
                       "recommendation of fewer blocks")
    command_id = uuid.uuid4().hex  # named before it exists, for its intent to be audited first
    async with svc.audited(request, who, "recommendation.issue", asset_id, run_id=recommendation_id,
                           command_id=command_id, connector=body.connector) as outcome:
        try:
            command = await svc.backend.call("connector", "propose", who.tenant, body.connector, asset_id, body.name,
                                             value, who.person, recommendation_id, command_id)
        except Unprocessable as exc:
            if body.part != "schedule":
                raise
            raise Unprocessable(f"{exc.message}; a command that takes one value (an OPC UA node) cannot take the "
                                f"schedule: issue {{\"part\": \"first_block\"}} to send its first block, "
                                f"{answer.action.values[0]:g} {answer.action.unit} for {answer.action.block_s:g} s, "
                                "and ask for a new recommendation after it") from None
        outcome.update(correlation_id=command["correlation_id"])
    return command
