"""Routes for connectors to device protocols: create, list, inspect, pause, resume, delete.

Credentials are write-only: accepted on create, stored apart from the declaration, never in an
answer, an audit record or a log line. A connector belongs to the caller's tenant; another
tenant's connector is a 404, like a missing one.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from connectors.runtime import ConnectorStatus
from connectors.spec import Credentials
from raytwin.contracts import IDENTIFIER_PATTERN
from raytwin.statestore import StateStore
from serve_apps.auth import Principal
from serve_apps.json_route import JsonRoute
from serve_apps.dead_letters import connector_dead_letters
from serve_apps.deps import ADMIN, DAY, READER, SVC, DeadLetterLimit, IdPath, Services
from serve_apps.errors import CONFLICT, Unprocessable
from serve_apps.listing import PAGE_LIMIT, Cursor, PageLimit
from serve_apps.resend import resend_safe
from serve_apps.schemas import NEXT_CURSOR, DeadLetterPage


class ConnectorCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] = Field(description="The declaration (e.g. an MQTT connector: `kind: mqtt`, `broker`, "
                                 "`routes`, `ack_topic`; see connectors/README.md). Its tenant is the caller's.")
    credentials: Credentials | None = Field(None, description="Write-only: never returned.")


class ConnectorPage(BaseModel):
    connectors: list[ConnectorStatus] = Field(description="in name order")
    next_cursor: str | None = NEXT_CURSOR


class ConnectorView(BaseModel):
    spec: dict[str, Any] = Field(description="The declaration, without credentials")
    status: ConnectorStatus


router = APIRouter(prefix="/v1/connectors", tags=["connectors"], route_class=JsonRoute)
SWITCH = resend_safe("pausing a paused connector, or resuming a receiving one, changes nothing")


@router.post("", response_model=ConnectorView, status_code=201, responses=CONFLICT,
             dependencies=[resend_safe("one of the same name is replaced")])
async def create_connector(body: ConnectorCreate, request: Request, who: Principal = ADMIN,
                           svc: Services = SVC) -> Any:
    """Check the declaration (its routes' assets must be this tenant's twins), store it and start the
    connector (one of the same name is replaced and restarted). 409 `client_id_in_use`: another connector, of
    any tenant, holds its MQTT client id (on any broker: a broker answers to many names); choose another
    `broker.client_id`, or leave it out to get RayTwin's own."""
    async with svc.audited(request, who, "connector.create", _declared_name(body.spec), kind=body.spec.get("kind"),
                           credentials=body.credentials is not None):
        return await svc.backend.call("connector", "create", who.tenant, body.spec, body.credentials)


def _declared_name(spec: dict[str, Any]) -> str:
    """The declaration's name, which its audit records are of: 422 for none (before anything is recorded)."""
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(IDENTIFIER_PATTERN, name):
        raise Unprocessable(f"spec.name: {name!r} is no connector name; name it with up to 128 letters, digits, "
                            "`_`, `.`, `:` or `-`, beginning with a letter or digit, e.g. `plant-mqtt`",
                            details=[{"loc": ["body", "spec", "name"]}])
    return name


@router.get("", response_model=ConnectorPage)
async def list_connectors(limit: PageLimit = PAGE_LIMIT, cursor: Cursor = None, who: Principal = READER,
                          svc: Services = SVC) -> Any:
    """The tenant's connectors with their statuses, in name order, a page at a time (`serve_apps.listing`)."""
    return await svc.backend.call("connector", "list_all", who.tenant, limit, cursor)


@router.get("/{name}", response_model=ConnectorView)
async def get_connector(name: IdPath, who: Principal = READER, svc: Services = SVC) -> Any:
    """The declaration and status: connected, messages, pending (lag in messages), lag_s, error counts."""
    return await svc.backend.call("connector", "view", who.tenant, name)


@router.get("/{name}/dead-letters", response_model=DeadLetterPage)
async def connector_dead_letter_log(name: IdPath, day: str | None = DAY, limit: DeadLetterLimit = PAGE_LIMIT,
                                    cursor: Cursor = None, who: Principal = READER, svc: Services = SVC) -> Any:
    """The connector's dead letters (of one UTC day if given), newest first, a page at a time
    (`serve_apps.dead_letters`): messages that did not become telemetry, with the source they came from and why, and
    what was refused (the message as received, or the reading as mapped when the data contract or the twin refused
    it: unknown asset, too late, implausible value, conflict), its first 4 KiB with its length and SHA-256 where it
    was longer."""
    await svc.backend.call("connector", "view", who.tenant, name)  # 404: not this tenant's connector
    store = StateStore(svc.config.url("twins"), svc.config.storage_options or None)
    return await run_in_threadpool(connector_dead_letters, store, who.tenant, name, day, limit, cursor)


@router.post("/{name}/pause", response_model=ConnectorStatus, responses=CONFLICT, dependencies=[SWITCH])
async def pause_connector(name: IdPath, request: Request, who: Principal = ADMIN, svc: Services = SVC) -> Any:
    """Stop receiving; the source keeps what arrives meanwhile (an MQTT persistent session)."""
    async with svc.audited(request, who, "connector.pause", name):
        return await svc.backend.call("connector", "pause", who.tenant, name)


@router.post("/{name}/resume", response_model=ConnectorStatus, responses=CONFLICT, dependencies=[SWITCH])
async def resume_connector(name: IdPath, request: Request, who: Principal = ADMIN, svc: Services = SVC) -> Any:
    async with svc.audited(request, who, "connector.resume", name):
        return await svc.backend.call("connector", "resume", who.tenant, name)


@router.delete("/{name}", status_code=204)
async def delete_connector(name: IdPath, request: Request, who: Principal = ADMIN, svc: Services = SVC) -> Response:
    async with svc.audited(request, who, "connector.delete", name):
        await svc.backend.call("connector", "delete", who.tenant, name)
    return Response(status_code=204)
