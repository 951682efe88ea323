"""Routes for drift-triggered recalibration: each asset type's policy, and the jobs it launched.

Policies are per tenant and asset type, stored on the store by the ingress (`raytwin.recalibration`):
only an admin key may set one (audited as ``recalibration_policy.update``; the key is stored with it and may
not approve the candidates fitted under it), and only for an asset
type of its own tenant, whose model must have the named parameters and outputs. Another tenant's
policy is invisible (404, like a missing one). The trigger itself runs in the backend
(`serve_apps.recalibration`); `GET /v1/recalibrations` shows what it holds for the caller's tenant.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from raytwin.recalibration import PolicyError, PolicyStore, RecalibrationPolicy
from serve_apps.auth import Principal
from serve_apps.deps import ADMIN, READER, SVC, WRITABLE, IdPath, Services
from serve_apps.errors import NotFound, Unprocessable, unwrap
from serve_apps.json_route import JsonRoute
from serve_apps.recalibration import TenantState

router = APIRouter(tags=["recalibration"], route_class=JsonRoute)


def _policies(svc: Services) -> PolicyStore:
    return PolicyStore(svc.config.url("recalibration", "policies"), svc.config.storage_options)


@router.get("/v1/recalibration-policies/{type_name}", response_model=RecalibrationPolicy)
async def get_recalibration_policy(type_name: IdPath, who: Principal = READER,
                                   svc: Services = SVC) -> RecalibrationPolicy:
    """The tenant's recalibration policy for an asset type (404: none set)."""
    try:
        policy = await run_in_threadpool(_policies(svc).get, who.tenant, type_name)
    except PolicyError as exc:
        raise Unprocessable(str(unwrap(exc))) from None
    if policy is None:
        published = await svc.backend.call("list_types", who.tenant, type_name)
        raise NotFound(f"no recalibration policy for asset type {type_name}: PUT one (admin)" if published else
                       f"no asset type {type_name}, so no recalibration policy: publish the type "
                       "(POST /v1/asset-types), then PUT its policy (admin)")
    return policy


@router.put("/v1/recalibration-policies/{type_name}", response_model=RecalibrationPolicy)
async def put_recalibration_policy(type_name: IdPath, body: RecalibrationPolicy, request: Request,
                                   who: Principal = ADMIN, svc: Services = SVC,
                                   _writable: None = WRITABLE) -> RecalibrationPolicy:
    """Set when a latched drift alarm of this asset type's twins launches a calibration, and its budget
    (admin only; audited). Every published version of the type must have the policy's parameters. The key is
    kept with the policy: the candidates fitted under it name it, and it may not approve them (four eyes)."""
    versions = await svc.backend.call("list_types", who.tenant, type_name)
    if not versions:
        raise NotFound(f"no asset type {type_name}: publish it (POST /v1/asset-types) before its policy")
    for asset_type in versions:
        try:
            body.check_model(list(asset_type.parameters), list(asset_type.outputs), asset_type.key)
        except PolicyError as exc:
            raise Unprocessable(str(unwrap(exc))) from None
    async with svc.audited(request, who, "recalibration_policy.update", type_name, policy=body.model_dump(mode="json")):
        await run_in_threadpool(_policies(svc).put, who.tenant, type_name, body, who.person)
    return body


@router.get("/v1/recalibrations", response_model=TenantState)
async def recalibrations(who: Principal = READER, svc: Services = SVC) -> TenantState:
    """The tenant's drift recalibrations: pending triggers per model, running and recently finished jobs
    (run id and candidate version), the change-log cursor and each twin's last recalibration."""
    return await svc.backend.call("recalibrations", who.tenant)
