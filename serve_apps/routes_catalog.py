"""Routes for asset types, assets (with relationship queries) and the audit log.

Reads of one asset or type answer with its revision and content digest as a strong `ETag`; writes take `If-Match`
and `If-None-Match: *` (`serve_apps.conditional`), evaluated by the backend where it writes.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from raytwin.contracts import Asset, AssetType, RelationshipKind, describe_error
from serve_apps.audit import CURSOR_PATTERN, NEXT_CURSOR
from serve_apps.auth import Principal
from serve_apps.conditional import CONDITIONAL_READ, NOT_MODIFIED, Precondition, etag, precondition, with_etag
from serve_apps.deps import ADMIN, DAY, READER, SVC, Limit, Services
from serve_apps.errors import CONFLICT, NotFound, Unprocessable, unwrap
from serve_apps.listing import PAGE_LIMIT, Cursor, PageLimit
from serve_apps.model_packages import SIMULATOR_ALLOWED
from serve_apps.resend import resend_safe
from serve_apps.routes_evolution import announce
from serve_apps.schemas import AssetCreate, AssetPage, AssetTypePage, AssetUpdate, Incoming, Related


PRE = Depends(precondition)


def register(app: FastAPI) -> None:
    tags = ["asset types"]

    @app.post("/v1/asset-types", response_model=AssetType, status_code=201, tags=tags,
              responses=with_etag(CONFLICT | {200: {"model": AssetType,
                                                    "description": "Identical type already existed"}}, 200, 201),
              dependencies=[SIMULATOR_ALLOWED,
                            resend_safe("a published version is immutable: the same one again answers 200, "
                                        "or 412 with `If-None-Match: *`")])
    async def create_asset_type(body: AssetType, request: Request, who: Principal = ADMIN,
                                pre: Precondition = PRE, svc: Services = SVC) -> Any:
        """Publish an asset type version (immutable: a changed type is a new version) and register its model
        (its default parameters) in the tenant's model registry, all or nothing.

        409 with nothing written: the version exists with other content, or the registry holds the version as
        another model (other parameters, such as a calibration's fit registered there, another declaration or
        model code; the message says what differs and how to resolve it). `If-None-Match: *`: 412 if the version
        exists, even with identical content."""
        async with svc.audited(request, who, "asset_type.create", body.key,
                               asset_type=body.model_dump(mode="json")) as outcome:
            created, revision = await svc.backend.call("put_type", who.tenant, body, pre, who.person)
            outcome.update(created=created)  # false: the identical version was there
        return JSONResponse(body.model_dump(mode="json"), status_code=201 if created else 200,
                            headers={"ETag": etag(revision, content=body.model_dump(mode="json"))})

    @app.get("/v1/asset-types", response_model=AssetTypePage, tags=tags)
    async def list_asset_types(name: str | None = None, limit: PageLimit = PAGE_LIMIT, cursor: Cursor = None,
                               who: Principal = READER, svc: Services = SVC) -> Any:
        """The caller's asset types (of one `name` if given) in `name@version` order, a page at a time
        (`serve_apps.listing`)."""
        return await svc.backend.call("page_types", who.tenant, name, limit, cursor)

    @app.get("/v1/asset-types/{name}/{version}", response_model=AssetType, tags=tags,
             responses=with_etag(NOT_MODIFIED, 200, 304))
    async def get_asset_type(name: str, version: str, response: Response, who: Principal = READER,
                             pre: Precondition = CONDITIONAL_READ, svc: Services = SVC) -> Any:
        asset_type, revision = await svc.backend.call("get_type", who.tenant, name, version)
        response.headers["ETag"] = etag(revision, content=asset_type.model_dump(mode="json"))
        await announce(svc, response, who.tenant, type_key=(name, version))
        return pre.read(response, revision, f"asset type {name}@{version}") or asset_type

    @app.delete("/v1/asset-types/{name}/{version}", status_code=204, tags=tags, responses=CONFLICT)
    async def delete_asset_type(name: str, version: str, request: Request, who: Principal = ADMIN,
                                pre: Precondition = PRE, svc: Services = SVC) -> Response:
        """Delete an unused asset type version: 409 while assets name it, while it is the production, staging or
        candidate version of its model or the rollback target (archive it, or promote another version, first), or
        while twins a promotion swapped to it run it; `If-Match`: 412 if changed."""
        async with svc.audited(request, who, "asset_type.delete", f"{name}@{version}"):
            await svc.backend.call("delete_type", who.tenant, name, version, pre)
        return Response(status_code=204)

    tags = ["assets"]

    @app.post("/v1/assets", response_model=Asset, status_code=201, tags=tags, responses=with_etag(CONFLICT, 201))
    async def create_asset(body: AssetCreate, request: Request, response: Response, who: Principal = ADMIN,
                           pre: Precondition = PRE, svc: Services = SVC) -> Any:
        """Create an asset of the caller's tenant and start its live twin (409 if it exists, or if its model has
        a production version other than `type_version`; with `If-None-Match: *`, 412)."""
        asset = _asset(who.tenant, body.id, body)
        async with svc.audited(request, who, "asset.create", asset.id, asset=asset.model_dump(mode="json"),
                               initial_state=body.initial_state):
            revision = await svc.twins.write(who.tenant, asset.id, lambda: svc.backend.call(
                "create_asset", asset, body.initial_state, pre), svc.twins.create_timeout_s, _created(asset.id))
        response.headers["ETag"] = etag(revision, content=asset.model_dump(mode="json"))
        return asset

    @app.get("/v1/assets", response_model=AssetPage, tags=tags)
    async def list_assets(
        type_name: str | None = None, type_version: str | None = None,
        related_to: Annotated[str | None, Query(description="Only assets with a relationship to this asset")] = None,
        relationship: RelationshipKind | None = None, limit: PageLimit = PAGE_LIMIT, cursor: Cursor = None,
        who: Principal = READER, svc: Services = SVC,
    ) -> Any:
        """The caller's assets, filtered by type and/or relationship (kind, target), in id order, a page at a time
        (`serve_apps.listing`); `POST /v1/query` filters, sorts and projects them with their twins' state."""
        return await svc.backend.call("page_assets", who.tenant, type_name, type_version, related_to, relationship,
                                      limit, cursor)

    @app.get("/v1/assets/{asset_id}", response_model=Asset, tags=tags, responses=with_etag(NOT_MODIFIED, 200, 304))
    async def get_asset(asset_id: str, response: Response, who: Principal = READER,
                        pre: Precondition = CONDITIONAL_READ, svc: Services = SVC) -> Any:
        asset, revision = await svc.backend.call("get_asset_revision", who.tenant, asset_id)
        response.headers["ETag"] = etag(revision, content=asset.model_dump(mode="json"))
        await announce(svc, response, who.tenant, asset_id=asset_id)
        return pre.read(response, revision, f"asset {asset_id}") or asset

    @app.get("/v1/assets/{asset_id}/relationships", response_model=Related, tags=tags)
    async def relationships(asset_id: str, who: Principal = READER, svc: Services = SVC) -> Related:
        """Relationships from this asset and to it."""
        asset: Asset = await svc.backend.call("get_asset", who.tenant, asset_id)
        sources: list[Asset] = await svc.backend.call("list_assets", who.tenant, None, None, asset_id, None)
        incoming = [Incoming(kind=r.kind, source=a.id)
                    for a in sources for r in a.relationships if r.target == asset_id]
        return Related(asset_id=asset_id, outgoing=asset.relationships, incoming=incoming)

    @app.put("/v1/assets/{asset_id}", response_model=Asset, tags=tags,
             responses=with_etag(CONFLICT | {201: {"model": Asset, "description": "Created (`If-None-Match: *` on a "
                                                                            "new id)"}}, 200, 201))
    async def update_asset(asset_id: str, body: AssetUpdate, request: Request, response: Response,
                           who: Principal = ADMIN, pre: Precondition = PRE, svc: Services = SVC) -> Any:
        """Replace an asset's type version, metadata and relationships.

        `If-Match: <its ETag>` replaces it only at that revision (else 412, nothing changed): the
        way to avoid lost updates. `If-None-Match: *` creates it instead (201; 412 if it exists). 409: a
        `type_version` other than the production version of a model under the lifecycle."""
        asset = _asset(who.tenant, asset_id, body)
        action = "asset.create" if pre.create_only else "asset.update"
        async with svc.audited(request, who, action, asset_id, asset=asset.model_dump(mode="json")):
            if pre.create_only:
                revision = await svc.twins.write(who.tenant, asset.id, lambda: svc.backend.call(
                    "create_asset", asset, None, pre), svc.twins.create_timeout_s, _created(asset.id))
                response.status_code = 201
            else:
                try:
                    revision = await svc.twins.write(who.tenant, asset.id, lambda: svc.backend.call(
                        "update_asset", asset, pre), svc.twins.create_timeout_s, IDEMPOTENT_LOST)
                except Exception as exc:
                    if isinstance(missing := unwrap(exc), NotFound):
                        raise _how_to_create(missing) from None
                    raise
                svc.twins.forget(who.tenant, asset_id)
        response.headers["ETag"] = etag(revision, content=asset.model_dump(mode="json"))
        return asset

    @app.delete("/v1/assets/{asset_id}", status_code=204, tags=tags, responses=CONFLICT)
    async def delete_asset(asset_id: str, request: Request, who: Principal = ADMIN, pre: Precondition = PRE,
                           svc: Services = SVC) -> Response:
        """Delete an asset and stop its twin (409 while other assets point at it; `If-Match`: 412 if changed)."""
        async with svc.audited(request, who, "asset.delete", asset_id):
            await svc.twins.write(who.tenant, asset_id, lambda: svc.backend.call(
                "delete_asset", who.tenant, asset_id, pre), lost=IDEMPOTENT_LOST)
            svc.twins.forget(who.tenant, asset_id)
        return Response(status_code=204)

    @app.get("/v1/audit", tags=["audit"], responses={200: {"headers": {NEXT_CURSOR: {
        "description": "Send it as `cursor` for the page of older records; absent on the oldest page",
        "schema": {"type": "string"}}}}})
    async def audit_log(response: Response, day: str | None = DAY, limit: Limit = 1000,
                        cursor: Annotated[str | None, Query(description=(
                            f"`{NEXT_CURSOR}` of the previous answer, unchanged: the `limit` records before it"))] = None,
                        who: Principal = ADMIN, svc: Services = SVC) -> list[dict[str, Any]]:
        """The tenant's newest audit records (of one UTC day if given), oldest first (admin only); the records
        before them a page at a time with `cursor` (the `X-Next-Cursor` header of each answer but the oldest).
        An action beyond the store is two records sharing an `action_id`: its `intent`, written before it, and its
        `outcome`; an intent without its outcome reads `outcome_missing: true` (attempted, result unknown)."""
        _check_audit_cursor(cursor, day)
        page = await run_in_threadpool(svc.audit.page, who.tenant, day, limit, cursor)
        if page.next_cursor is not None:
            response.headers[NEXT_CURSOR] = page.next_cursor
        return [r.as_json() for r in page.records]


def _check_audit_cursor(cursor: str | None, day: str | None) -> None:
    """422 for a cursor no audit answer gave, saying what one is and where it comes from (the pattern the query
    parameter had was an answer's regex: it told a client nothing it could act on)."""
    if cursor is None:
        return
    if not re.fullmatch(CURSOR_PATTERN, cursor):
        raise Unprocessable(f"query.cursor: not a cursor of the audit log; a cursor is the {NEXT_CURSOR} header of a "
                            "GET /v1/audit answer (it names the oldest record that answer held): send it back "
                            "unchanged for the records before them, or no cursor for the newest records",
                            details=[{"loc": ["query", "cursor"]}])
    if day is not None and not cursor.startswith(f"{day}/"):
        raise Unprocessable(f"query.cursor: {cursor} is a cursor of another day than {day}; send the "
                            f"{NEXT_CURSOR} of an answer for day={day}, or no cursor for its newest records",
                            details=[{"loc": ["query", "cursor"]}])


def _asset(tenant: str, asset_id: str, body: AssetUpdate) -> Asset:
    try:
        return Asset(id=asset_id, tenant=tenant, type_name=body.type_name, type_version=body.type_version,
                     metadata=body.metadata, relationships=body.relationships)
    except ValidationError as exc:
        raise Unprocessable(describe_error(exc)) from None


def _how_to_create(missing: NotFound) -> NotFound:
    """A PUT's 404, saying how to create the asset (a client may expect PUT to create it, as many APIs' do)."""
    return NotFound(f"{missing.message}: PUT replaces an asset; create it with POST /v1/assets, or with this PUT and "
                    "If-None-Match: *", missing.details)


IDEMPOTENT_LOST = "resend it (a PUT or DELETE is idempotent: a replaced asset answers the same, a deleted one 404)"


def _created(asset_id: str) -> str:
    """What a client whose asset creation was lost with its process should do."""
    return (f"GET /v1/assets/{asset_id} shows the asset if it was created; create it again only if not (or resend "
            "with If-None-Match: *, which answers 412 if it exists)")
