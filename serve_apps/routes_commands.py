"""Routes for commands back to assets: propose, approve (which sends), refuse, list with acknowledgements.

A writer proposes; an admin with an owner, another person than the proposer, approves, and the command is then
published once through its connector with a correlation id; the asset's acknowledgement (or the failure)
is recorded on the command. Another tenant's command or asset is a 404.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from connectors.commands import Command, CommandValue
from raytwin.contracts import Identifier
from serve_apps.auth import Principal, Role, require_owner
from serve_apps.json_route import JsonRoute
from serve_apps.routes_recommendations import require_another_person, require_approver
from serve_apps.audit_steps import outcome_of
from serve_apps.conditional import refuse_unevaluated
from serve_apps.deps import ADMIN, READER, READER_ROLE_IN_BODY, SVC, WRITER, IdPath, Services, require_role
from serve_apps.errors import CONFLICT
from serve_apps.limits import require_value_fits
from serve_apps.listing import PAGE_LIMIT, Cursor, PageLimit
from serve_apps.schemas import CommandPage


class CommandProposal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    connector: Identifier = Field(description="The connector that reaches the asset")
    asset_id: Identifier
    name: Identifier = Field(description="What to do, e.g. `setpoint`")
    value: CommandValue = Field(description="Its arguments, e.g. `{\"T_set\": 294.0}`")


class Refusal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(min_length=1, max_length=500)]


router = APIRouter(prefix="/v1/commands", tags=["commands"], route_class=JsonRoute)


@router.post("", response_model=Command, status_code=201)
async def propose_command(body: CommandProposal, request: Request, who: Principal = WRITER,
                          svc: Services = SVC) -> Any:
    """Record a command for one of this tenant's assets; nothing is sent before an approval."""
    require_value_fits(body.value, svc.config.max_command_value_bytes)
    command_id = uuid.uuid4().hex  # named before it exists, for its intent to be audited first
    async with svc.audited(request, who, "command.propose", command_id, asset_id=body.asset_id, name=body.name,
                           value=body.value) as outcome:
        command = await svc.backend.call("connector", "propose", who.tenant, body.connector, body.asset_id,
                                         body.name, body.value, who.person, None, command_id,
                                         lost=_proposal_lost(body.asset_id))
        outcome.update(correlation_id=command["correlation_id"])
    return command


@router.post("/{command_id}/approve", response_model=Command, responses=CONFLICT)
async def approve_command(command_id: IdPath, request: Request, who: Principal = READER_ROLE_IN_BODY,
                          svc: Services = SVC) -> Any:
    """Approve (an admin key with an owner, of another person than the proposer: `Principal.person`; a proposer's key
    without an owner is no person that can be told apart, `require_another_person`) and send once: the answer is
    `sent` or `failed`;
    an approved, sent or failed command cannot be approved again (409; the approving key's own resend answers
    the command as it is, sending nothing). An issued recommendation needs a key with the approver grant, of
    another person than whoever computed it (409 otherwise). Every attempt is audited (`command.approve`), refused
    ones too. The backend dying meanwhile answers 503 `backend_unavailable` with `Retry-After`: approving again is
    safe. The approval is audited before anything is sent (`Services.audited`): no audit, no command."""
    try:
        require_role(who, Role.admin)  # here, not in the dependency: a refused approval is audited as well
        refuse_unevaluated(request)  # 412 only after the 403: a writer is not told what the route evaluates
        require_owner(who, "approve a command")
        proposed = await svc.backend.call("connector", "command", who.tenant, command_id, lost=NOTHING_TAKEN)
        await require_approver(proposed, who, svc)
        if proposed["status"] == "proposed":  # (its approving key's resend answers it as it is)
            require_another_person(svc.keys, proposed["proposed_by"], who, f"command {command_id}", "proposed")
    except Exception as exc:  # refused before anything could be sent: one record
        await svc.record(request, who, "command.approve", command_id, **outcome_of(exc))
        raise
    async with svc.audited(request, who, "command.approve", command_id, connector=proposed["connector"],
                           asset_id=proposed["asset_id"], name=proposed["name"], value=proposed["value"],
                           correlation_id=proposed["correlation_id"]) as outcome:
        command = await svc.backend.call("connector", "approve", who.tenant, command_id, who.person,
                                         lost=_approval_lost(command_id))
        outcome.update(status=command["status"], correlation_id=command["correlation_id"])
    return command


NOTHING_TAKEN = "nothing was approved: approve again"


def _approval_lost(command_id: str) -> str:
    """What a client whose approval's backend died should know: approving again is safe (the command ledger takes
    an approval once: a taken one answers 409, never a second send)."""
    return (f"the approval of command {command_id} may have been taken and the command sent: approving again is safe "
            f"(a command is approved and sent at most once: 409 if it was), and GET /v1/commands/{command_id} shows "
            "its status")


def _proposal_lost(asset_id: str) -> str:
    """A proposal is not idempotent (each is a new command), but nothing is sent before an approval."""
    return (f"the command may have been recorded (nothing is sent before an approval): GET /v1/commands?asset_id="
            f"{asset_id} lists it if so; propose it again only if it is not there")


@router.post("/{command_id}/refuse", response_model=Command, responses=CONFLICT)
async def refuse_command(command_id: IdPath, body: Refusal, request: Request, who: Principal = ADMIN,
                         svc: Services = SVC) -> Any:
    async with svc.audited(request, who, "command.refuse", command_id, reason=body.reason):
        return await svc.backend.call("connector", "refuse", who.tenant, command_id, who.person, body.reason)


@router.get("", response_model=CommandPage)
async def list_commands(asset_id: Annotated[str | None, Query()] = None, limit: PageLimit = PAGE_LIMIT,
                        cursor: Cursor = None, who: Principal = READER, svc: Services = SVC) -> Any:
    """The tenant's commands (of one asset if given), each with its history and the asset's acknowledgement, in id
    order, a page at a time (`serve_apps.listing`): a page reads its own records alone. Each has its proposal time
    (`history[0].at`)."""
    return await svc.backend.call("connector", "commands", who.tenant, asset_id, limit, cursor)


@router.get("/{command_id}", response_model=Command)
async def get_command(command_id: IdPath, who: Principal = READER, svc: Services = SVC) -> Any:
    return await svc.backend.call("connector", "command", who.tenant, command_id)
