"""The model a published asset type version registers in its tenant's registry, before the catalog names it.

Why before: a version whose ``name@version`` the registry holds as another model (fitted parameters a
calibration's `register_as` or a recalibration put there, a deleted type's defaults, older model code) was
written to the catalog and then refused with a 500, and every later POST answered 200 while its twins ran the
registry's parameters, not the published defaults. Registering first refuses it with nothing published.
"""

from __future__ import annotations

from raytwin.contracts import AssetType
from raytwin.registry import (
    ALLOW_CODE_CHANGE_ENV, PUBLISHED_BY, ModelArtifact, ModelCodeChanged, ModelRegistry, RegistryError, VersionConflict,
    declared_differences,
)
from serve_apps.errors import Conflict, Unprocessable


def register_published(registry: ModelRegistry, asset_type: AssetType, published_by: str) -> None:
    """Register `asset_type`'s model (its default parameters, `published_by` the key) as its ``name@version``.

    The same model there already (a try that crashed before its catalog write, or the same content registered
    by another key or by a fit): nothing to do, it is used as it is. Another model there: 409 saying what differs
    and how to resolve it. A model the registry refuses (its check, a parameter outside its bounds): 422."""
    try:
        registry.register(asset_type.name, asset_type.version, asset_type, metadata={PUBLISHED_BY: published_by})
    except VersionConflict as exc:
        if exc.differences:
            raise Conflict(_conflict_message(asset_type, exc), details=list(exc.differences)) from None
    except RegistryError as exc:
        raise Unprocessable(str(exc)) from None


def registered(registry: ModelRegistry, ref: str) -> ModelArtifact:
    """The registered model `ref`; 409 when the code this service imports is no longer the code it pinned (a model
    file edited since), which answered 500 `internal` to a sweep and to an asset created on it, saying nothing."""
    try:
        return registry.get(ref)
    except ModelCodeChanged as exc:
        raise Conflict(f"{exc.what}; this service runs the code it imports: publish the asset type under a new "
                       "version (POST /v1/asset-types) to pin the current code and move the assets to it, or have the "
                       f"operator restore the registered code (or accept the change: {ALLOW_CODE_CHANGE_ENV}=1 in "
                       "the service's environment)") from None


def _conflict_message(asset_type: AssetType, exc: VersionConflict) -> str:
    ref, name, registered = asset_type.key, asset_type.name, exc.existing
    fix = "publish the type under a version the registry does not hold"
    if registered is not None and registered.code_change() is None and not declared_differences(
            registered.asset_type, asset_type):  # only its parameter values differ
        values = ", ".join(f"{n}={v}" for n, v in registered.parameters.items())
        fix += (f"; or, for twins created on {ref} to run the registered model, publish {ref} with defaults "
                f"equal to its parameters ({values})")
    return (f"asset type {ref} was not published: the tenant's model registry holds {ref} as another model "
            f"({'; '.join(exc.differences)}; new: this type, whose default parameters its version runs), and "
            f"twins on {ref} would run the registered model, not this type. To resolve: {fix}; or use the "
            f"registered version as it is through the model lifecycle (POST /v1/models/{name}/versions/"
            f"{asset_type.version}/transitions swaps the twins of {name} to it)")
