"""Which packages a tenant's asset types may import as their simulator (`ServeConfig.model_packages`).

An asset type's simulator ``package.module:MODEL`` is imported where the request is validated, in the API's
replica, and importing a module runs its code: any tenant's admin key could make the server run the import-time code
of any installed package, or use another tenant's private model package. So the routes whose body is an asset type
depend on `SIMULATOR_ALLOWED`, which refuses a package the operator did not allow for the caller's tenant (422) before
the body is parsed: FastAPI solves a route's dependencies before it validates its body, and validating it imports.
"""

from __future__ import annotations

import logging

from fastapi import Depends, Request

from raytwin.sim.discovery import declared, declared_packages, imported_package
from serve_apps.auth import Principal
from serve_apps.config import ServeConfig
from serve_apps.deps import ADMIN, SVC, Services
from serve_apps.errors import Unprocessable

log = logging.getLogger("raytwin.serve")
EVERY_TENANT = "*"


def allowed_packages(config: ServeConfig, tenant: str) -> frozenset[str]:
    """The top-level packages `tenant` may name in import paths: the declared models' and those the operator lists
    for every tenant or for this one."""
    listed = config.model_packages
    return declared_packages() | {*listed.get(EVERY_TENANT, ()), *listed.get(tenant, ())}


async def simulator_allowed(request: Request, who: Principal = ADMIN, svc: Services = SVC) -> None:
    """422 for a body whose ``simulator`` imports a package not allowed for the caller's tenant, before anything is
    imported; anything else is left to the body's validation (FastAPI parsed the JSON already)."""
    try:
        body = await request.json()
    except ValueError:
        return
    simulator = body.get("simulator") if isinstance(body, dict) else None
    package = imported_package(simulator) if isinstance(simulator, str) else None
    if package is None:
        return
    allowed = allowed_packages(svc.config, who.tenant)
    if package in allowed:
        return
    log.info("event=model_package_refused tenant=%s key_id=%s package=%s", who.tenant, who.key_id, package)
    raise Unprocessable(
        f"simulator {simulator!r}: this service imports no model of package {package!r} for tenant {who.tenant} "
        f"(its modules would run inside the server); tenant {who.tenant} may name import paths of "
        f"{sorted(allowed)} and the declared models by name ({sorted(declared())}). To use {package}, ask the "
        f"operator to list it in the service's model_packages (ServeConfig: under {who.tenant!r}, or {EVERY_TENANT!r} "
        "for every tenant) and restart it; or declare the model in the package's `raytwin.models` entry points",
        details=[{"loc": ["body", "simulator"], "package": package}])


SIMULATOR_ALLOWED = Depends(simulator_allowed)
