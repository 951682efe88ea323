"""Schema evolution on the backend: moving assets and their twins to another type version, and
deprecation marks on type versions (`Backend.evolution(op, ...)` dispatches here).

A migration is the asset's one backend write while it runs (`serve_apps.twin_writes`): the mapping is
checked (`raytwin.migration`) under the backend's catalog lock, the twin moves at a clean point in its
shard (`actors.shard.TwinShard.migrate`: between two ingest calls, no event lost or applied twice)
outside it, within `shard_create_timeout_s`, and then the asset's new type version is written and
recorded in the change log (`asset.updated`), under the lock again. The move is journaled before the
twin moves (`serve_apps.asset_moves`), so a catalog write that does not follow (a store error, a crash,
a shard that answered past the deadline) is finished by the backend, not left for the client to send
again.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from actors.state import UnknownTwin
from raytwin.migration import MigrationError, MigrationRequest, plan_migration
from serve_apps.conditional import Precondition
from serve_apps.deprecation import Deprecation, TypeDeprecations
from serve_apps.errors import NotFound, Unprocessable

if TYPE_CHECKING:
    from serve_apps.backend import Backend

log = logging.getLogger("raytwin.serve.evolution")


class TypeEvolution:
    OPS = frozenset({"migrate", "require_version", "deprecate", "undeprecate", "deprecation", "deprecation_of_asset"})
    WRITES = frozenset({"migrate", "deprecate", "undeprecate"})

    def __init__(self, backend: Backend):
        self.backend = backend
        self.marks = TypeDeprecations(backend.config.store_url, backend.config.storage_options)

    def migrate(self, tenant: str, asset_id: str, request: MigrationRequest, pre: Precondition) -> dict[str, Any]:
        """Move the asset and its twin to `request.type_version`; what the route answers."""
        b = self.backend
        timeout_s = b.config.shard_create_timeout_s
        with b._twin_writes.one(tenant, asset_id, timeout_s):
            with b._lock:
                b.moves.settle(tenant, asset_id)  # a move left unrecorded first (`serve_apps.asset_moves`)
                catalog = b.catalog
                asset = catalog.get_asset(tenant, asset_id)
                catalog.check(pre, tenant, "assets", asset_id, f"asset {asset_id}")  # before the twin moves
                if request.type_version == asset.type_version:
                    raise Unprocessable(f"asset {asset_id} is already on {asset.type_name}@{asset.type_version}")
                self.require_version(tenant, [asset.type_name], request.type_version)
                moved = asset.model_copy(update={"type_version": request.type_version})
                b._require_production(moved)
                source = b._artifact(tenant, asset).model()
                target = b._checked_artifact(moved, None)
                try:
                    plan = plan_migration({v.name: v.unit for v in source.states},
                                          {v.name: v.unit for v in target.model().states}, request.states,
                                          target.asset_type)
                except MigrationError as exc:
                    raise Unprocessable(f"asset {asset_id} to {moved.type_name}@{moved.type_version}: {exc}") from None
                b.moves.begin(moved, "migrate")  # the twin moves before the catalog is written
            try:
                before, after = b._twin_writes.wait(
                    tenant, asset_id, lambda: b.twins.migrate(moved, target, plan, timeout_s),
                    f"GET /v1/assets/{asset_id} before sending it again: its type_version says whether the twin "
                    "moved (written there once the shard answers)", functools.partial(b._settle_late_move, tenant,
                                                                                     asset_id))
            except UnknownTwin:
                with b._lock:
                    b.moves.end(tenant, asset_id)
                raise NotFound(f"asset {asset_id} has no live twin") from None

            def write(seq: int) -> list[dict[str, Any]]:
                catalog.update_asset(moved, seq)
                return [{"kind": "asset.updated", "asset_id": moved.id, "type_name": moved.type_name,
                         "type_version": moved.type_version, "data": {"asset": moved.model_dump(mode="json")}}]

            with b._lock:
                (change,) = b.changes.write(tenant, write)
                b.moves.end(tenant, asset_id)
        inverse = plan.inverse()
        log.info("asset_migrated tenant=%s asset=%s from=%s to=%s twin_revision=%d", tenant, asset_id,
                 asset.type_version, moved.type_version, after.revision)
        return {
            "asset": moved.model_dump(mode="json"), "revision": change.seq,
            "from_version": asset.type_version, "to_version": moved.type_version,
            "state_before": before.state, "state_after": after.state, "twin_revision": after.revision,
            "inverse": None if inverse is None else {
                "type_version": asset.type_version, "states": {k: v.model_dump(mode="json") for k, v in inverse.items()}},
        }

    def require_version(self, tenant: str, type_names: Iterable[str], version: str) -> None:
        """422 unless every named type has `version` published: asked before anything moves (a migration,
        a bulk retype at submission, each asset update), so a missing version is the client's to fix,
        never an internal error. A read of the catalog: callers that write hold the lock."""
        published = self.backend.catalog.types.get(tenant, {})
        missing = sorted({key for name in type_names if (key := f"{name}@{version}") not in published})
        if len(missing) == 1:
            raise Unprocessable(f"asset type {missing[0]} does not exist; publish it first (POST /v1/asset-types)")
        if missing:
            raise Unprocessable(f"asset types {', '.join(missing)} do not exist; publish them first "
                                "(POST /v1/asset-types)")

    def deprecate(self, tenant: str, name: str, version: str, mark: Deprecation) -> None:
        with self.backend._lock:
            self.backend.catalog.get_type(tenant, name, version)  # 404 for unknown versions
            self.marks.put(tenant, f"{name}@{version}", mark)

    def undeprecate(self, tenant: str, name: str, version: str) -> None:
        with self.backend._lock:
            if not self.marks.remove(tenant, f"{name}@{version}"):
                raise NotFound(f"asset type {name}@{version} is not deprecated")

    def deprecation(self, tenant: str, name: str, version: str) -> Deprecation | None:
        return self.marks.get(tenant, f"{name}@{version}")

    def deprecation_of_asset(self, tenant: str, asset_id: str) -> Deprecation | None:
        """The mark of the type version the asset is on (None: not deprecated, or no such asset)."""
        asset = self.backend.catalog.assets.get(tenant, {}).get(asset_id)
        return None if asset is None else self.marks.get(tenant, f"{asset.type_name}@{asset.type_version}")
