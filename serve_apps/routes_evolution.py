"""Routes for schema evolution: migrating an asset (and its twin) to another type version,
checking a candidate type version before publishing it, and deprecation marks on type versions."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from raytwin.compat import compare_types, parse_version, previous_version, required_bump
from raytwin.contracts import Asset, AssetType
from raytwin.migration import MigrationRequest
from serve_apps.auth import Principal
from serve_apps.conditional import Precondition, etag, precondition, with_etag
from serve_apps.deprecation import Deprecation
from serve_apps.deps import ADMIN, SVC, Services
from serve_apps.errors import Unprocessable
from serve_apps.model_packages import SIMULATOR_ALLOWED
from serve_apps.resend import resend_safe

PRE = Depends(precondition)


class MigrationResult(BaseModel):
    asset: Asset
    revision: int = Field(description="The asset's new revision (its ETag)")
    from_version: str
    to_version: str
    state_before: dict[str, float] = Field(description="The twin's state on the old version, in its simulator's units")
    state_after: dict[str, float] = Field(description="The twin's state on the new version, in its simulator's units")
    twin_revision: int = Field(description="The twin's state revision (unchanged by a migration: no event applied)")
    inverse: MigrationRequest | None = Field(
        description="The request that moves the asset back (null: the mapping is not invertible); sent before any "
                    "new event is applied, it restores the previous twin exactly")


class TypeChange(BaseModel):
    where: str
    change: str
    breaking: bool
    message: str
    fix: str


class CompatibilityReport(BaseModel):
    previous_version: str | None = Field(description="The newest published version older than the candidate")
    required_bump: str | None = Field(description="major, minor or patch: the smallest bump these changes allow")
    changes: list[TypeChange]


async def announce(svc: Services, response: Response, tenant: str, *, type_key: tuple[str, str] | None = None,
                   asset_id: str | None = None) -> None:
    """Add the `Deprecation`/`Sunset` headers of a deprecated type version (named, or the asset's)."""
    mark: Deprecation | None = await (svc.backend.call("evolution", "deprecation", tenant, *type_key) if type_key
                                      else svc.backend.call("evolution", "deprecation_of_asset", tenant, asset_id))
    if mark is not None:
        response.headers.update(mark.headers())


TYPE_VERSION_HEADER = Header(None, alias="X-RayTwin-Type-Version", pattern=r"^\d+\.\d+\.\d+$",
                             description="The asset type version the sender was built for; telemetry for an older "
                                         "version than the asset's is accepted or refused as that version's "
                                         "`telemetry_policy` says")


async def check_sender_version(svc: Services, tenant: str, asset_id: str, asset_type: AssetType,
                               sent_for: str | None) -> None:
    """Refuse (422, with the reason and the fix) telemetry sent for another version of the asset's type
    than the one it is on, unless it is an older one and the current version's policy accepts it (then
    it is checked against the current version like any other telemetry)."""
    if sent_for is None or sent_for == asset_type.version:
        return
    versions = {t.version for t in await svc.backend.call("list_types", tenant, asset_type.name)}
    if sent_for not in versions:
        raise Unprocessable(f"X-RayTwin-Type-Version: {asset_type.name}@{sent_for} does not exist")
    if parse_version(sent_for) > parse_version(asset_type.version):
        raise Unprocessable(f"asset {asset_id} is on {asset_type.key}, older than {sent_for}: migrate it first "
                            f"(POST /v1/assets/{asset_id}/migrate)")
    if asset_type.telemetry_policy == "refuse":
        raise Unprocessable(
            f"asset {asset_id} is on {asset_type.key}, which refuses telemetry sent for older versions "
            f"(telemetry_policy: refuse), and this was sent for {sent_for}: update the sender to {asset_type.key}'s "
            f"measurements {sorted(asset_type.measurable())} and X-RayTwin-Type-Version: {asset_type.version}",
            details=[{"header": "X-RayTwin-Type-Version", "sent_for": sent_for, "current": asset_type.version,
                      "telemetry_policy": "refuse"}])


MIGRATION_LOST = "read the asset before sending it again: its type_version says whether the migration was applied"
"""What a client should do when the process applying a migration was lost meanwhile (`TwinReader.write`'s 503)."""
CONDITIONAL_MIGRATION_LOST = "resending it is safe (it is conditional: 412 if it took effect)"
"""The same for a migration sent with `If-Match`, whose resend its precondition refuses if the first took effect."""


def register(app: FastAPI) -> None:
    @app.post("/v1/assets/{asset_id}/migrate", response_model=MigrationResult, tags=["assets"],
              responses=with_etag({}, 200))
    async def migrate_asset(asset_id: str, body: MigrationRequest, request: Request, who: Principal = ADMIN,
                            pre: Precondition = PRE, svc: Services = SVC) -> Any:
        """Move an asset and its twin to another version of its type, mapping the twin's state.

        `states` maps each target state to a source state (`{"from": "T"}`, converted between units) or a
        value (`{"value": 20, "unit": "degC"}`); unmapped target states take the source state of the same
        name. 422 names every unmapped state and unconvertible unit; `If-Match` makes it conditional."""
        async with svc.audited(request, who, "asset.migrate", asset_id, to_version=body.type_version,
                               mapping=body.model_dump(mode="json")) as outcome:
            result = await svc.twins.write(who.tenant, asset_id, lambda: svc.backend.call(
                "evolution", "migrate", who.tenant, asset_id, body, pre), svc.twins.create_timeout_s,
                CONDITIONAL_MIGRATION_LOST if "if-match" in request.headers else MIGRATION_LOST)
            svc.twins.forget(who.tenant, asset_id)
            outcome.update({key: result[key] for key in ("from_version", "to_version", "state_before", "state_after",
                                                         "twin_revision")})
        response = JSONResponse(MigrationResult.model_validate(result).model_dump(mode="json"),
                                headers={"ETag": etag(result["revision"], content=result["asset"])})
        await announce(svc, response, who.tenant, asset_id=asset_id)
        return response

    tags = ["asset types"]

    @app.post("/v1/asset-types/compatibility", response_model=CompatibilityReport, tags=tags,
              dependencies=[SIMULATOR_ALLOWED, resend_safe("a check changes nothing")])
    async def check_compatibility(body: AssetType, who: Principal = ADMIN, svc: Services = SVC) -> Any:
        """What publishing this type version would change against the newest older version, and the
        version bump that needs (nothing is written; admin, like publishing)."""
        published = {t.version: t for t in await svc.backend.call("list_types", who.tenant, body.name)}
        previous = previous_version(body.version, published)
        changes = [] if previous is None else compare_types(published[previous], body)
        return CompatibilityReport(previous_version=previous,
                                   required_bump=None if previous is None else required_bump(changes),
                                   changes=[TypeChange(**vars(c)) for c in changes])

    @app.put("/v1/asset-types/{name}/{version}/deprecation", response_model=Deprecation, tags=tags)
    async def deprecate_type(name: str, version: str, body: Deprecation, request: Request, response: Response,
                             who: Principal = ADMIN, svc: Services = SVC) -> Any:
        """Mark a type version deprecated (with a sunset date): responses about it and its assets carry
        `Deprecation` and `Sunset` headers."""
        async with svc.audited(request, who, "asset_type.deprecate", f"{name}@{version}",
                               **body.model_dump(mode="json")):
            await svc.backend.call("evolution", "deprecate", who.tenant, name, version, body)
        response.headers.update(body.headers())
        return body

    @app.delete("/v1/asset-types/{name}/{version}/deprecation", status_code=204, tags=tags)
    async def undeprecate_type(name: str, version: str, request: Request, who: Principal = ADMIN,
                               svc: Services = SVC) -> Response:
        """Withdraw a type version's deprecation mark (404 if it has none)."""
        async with svc.audited(request, who, "asset_type.undeprecate", f"{name}@{version}"):
            await svc.backend.call("evolution", "undeprecate", who.tenant, name, version)
        return Response(status_code=204)
