"""Which packages a tenant's asset types may import as their simulator (`ServeConfig.model_packages`).

An asset type's simulator ``package.module:MODEL`` is imported where the request is validated, in the API's
replica, and importing a module runs its code: any tenant's admin key could make the server run the import-time code
of any installed package, or use another tenant's private model package. A stored FMU named by its URL is opened
there too, and the answer told its variables and units to whoever named it. So the routes whose body is an asset type
depend on `SIMULATOR_ALLOWED`, which sets the caller's allow-list as the request's `discovery.IMPORT_CHECK` and its
tenant's registry as `discovery.TENANT_FMU_ROOT`: the body's validation refuses a package the operator did not allow
for the caller's tenant (422) where it would import it, before anything of it is imported, and an FMU of another
registry before it is opened. FastAPI solves a route's dependencies before it validates its body.
"""

from __future__ import annotations

import logging
from functools import partial

from fastapi import Depends

from raytwin.sim.discovery import IMPORT_CHECK, TENANT_FMU_ROOT, declared, declared_packages
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


async def simulator_allowed(who: Principal = ADMIN, svc: Services = SVC) -> None:
    """Check the import paths the request's body names against the packages the caller's tenant may use, and its
    stored FMUs against the tenant's registry, as the body is validated (`IMPORT_CHECK`, `TENANT_FMU_ROOT`, for this
    request's context only). Async: FastAPI runs it in the request's context, which validates the body next (a plain
    function runs in a thread, in a copy of it)."""
    IMPORT_CHECK.set(partial(_refuse_unless_allowed, who, allowed_packages(svc.config, who.tenant)))
    TENANT_FMU_ROOT.set(svc.config.url("registry", who.tenant))


def _refuse_unless_allowed(who: Principal, allowed: frozenset[str], simulator: str, package: str) -> None:
    """422 for a `simulator` that imports `package`, unless `allowed`; an `ApiError`, which pydantic does not take
    for a validation error: the answer and its details are this one's."""
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
