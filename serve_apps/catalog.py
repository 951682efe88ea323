"""The catalog of asset types and assets, per tenant, persisted as JSON on the store.

Layout: ``{store}/catalog/{tenant}/types/{name}@{version}.json`` and
``{store}/catalog/{tenant}/assets/{id}.json``. The catalog lives in ONE backend replica (see
`serve_apps.backend`) that loads everything at start and writes through on every change, so
queries are in-memory and concurrent writers cannot interleave; the store is the durable copy.

Asset types are immutable per version (models are registered by ``name@version`` with a content
hash): re-sending identical content is a no-op, different content under an existing version is
a conflict, and "updating" a type means publishing a new version and moving assets to it.
"""

from __future__ import annotations

from typing import Any

from raytwin.contracts import Asset, AssetType, RelationshipKind
from raytwin.storage import canonical_json, filesystem
from serve_apps.errors import Conflict, NotFound, Unprocessable


class Catalog:
    def __init__(self, store_url: str, storage_options: dict[str, Any] | None = None):
        self.fs, root = filesystem(store_url, storage_options)
        self.root = f"{root}/catalog"
        self.types: dict[str, dict[str, AssetType]] = {}  # tenant -> "name@version" -> type
        self.assets: dict[str, dict[str, Asset]] = {}  # tenant -> id -> asset
        self._load()

    # ---- persistence -------------------------------------------------------------------
    def _load(self) -> None:
        if not self.fs.exists(self.root):
            return
        for path in self.fs.find(self.root):
            if not path.endswith(".json"):
                continue
            tenant, kind = path[len(self.root) + 1:].split("/")[:2]
            blob = self.fs.cat_file(path)
            if kind == "types":
                t = AssetType.model_validate_json(blob)
                self.types.setdefault(tenant, {})[t.key] = t
            elif kind == "assets":
                a = Asset.model_validate_json(blob)
                self.assets.setdefault(tenant, {})[a.id] = a

    def _path(self, tenant: str, kind: str, name: str) -> str:
        return f"{self.root}/{tenant}/{kind}/{name}.json"

    def _write(self, path: str, obj: Any) -> None:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, canonical_json(obj.model_dump(mode="json")))

    # ---- asset types -------------------------------------------------------------------
    def put_type(self, tenant: str, asset_type: AssetType) -> bool:
        """Store a type version; True if new, False if identical content was already there."""
        existing = self.types.get(tenant, {}).get(asset_type.key)
        if existing is not None:
            if existing == asset_type:
                return False
            raise Conflict(f"asset type {asset_type.key} already exists with different content; "
                           "publish a new version instead")
        self._write(self._path(tenant, "types", asset_type.key), asset_type)
        self.types.setdefault(tenant, {})[asset_type.key] = asset_type
        return True

    def get_type(self, tenant: str, name: str, version: str) -> AssetType:
        try:
            return self.types[tenant][f"{name}@{version}"]
        except KeyError:
            raise NotFound(f"asset type {name}@{version} not found") from None

    def list_types(self, tenant: str, name: str | None = None) -> list[AssetType]:
        found = self.types.get(tenant, {}).values()
        return sorted((t for t in found if name is None or t.name == name), key=lambda t: t.key)

    def delete_type(self, tenant: str, name: str, version: str) -> None:
        t = self.get_type(tenant, name, version)
        users = [a.id for a in self.list_assets(tenant, type_name=name, type_version=version)]
        if users:
            raise Conflict(f"asset type {t.key} is used by assets {users[:20]}", details=users)
        self.fs.rm_file(self._path(tenant, "types", t.key))
        del self.types[tenant][t.key]

    # ---- assets ------------------------------------------------------------------------
    def _check_refs(self, asset: Asset) -> AssetType:
        asset_type = self.types.get(asset.tenant, {}).get(f"{asset.type_name}@{asset.type_version}")
        if asset_type is None:
            raise Unprocessable(f"asset {asset.id}: asset type {asset.type_name}@{asset.type_version} does not exist")
        own = self.assets.get(asset.tenant, {})
        missing = sorted({r.target for r in asset.relationships if r.target not in own})
        if missing:
            raise Unprocessable(f"asset {asset.id}: relationship targets {missing} do not exist")
        return asset_type

    def create_asset(self, asset: Asset) -> AssetType:
        if asset.id in self.assets.get(asset.tenant, {}):
            raise Conflict(f"asset {asset.id} already exists")
        asset_type = self._check_refs(asset)
        self._write(self._path(asset.tenant, "assets", asset.id), asset)
        self.assets.setdefault(asset.tenant, {})[asset.id] = asset
        return asset_type

    def update_asset(self, asset: Asset) -> AssetType:
        self.get_asset(asset.tenant, asset.id)
        asset_type = self._check_refs(asset)
        self._write(self._path(asset.tenant, "assets", asset.id), asset)
        self.assets[asset.tenant][asset.id] = asset
        return asset_type

    def get_asset(self, tenant: str, asset_id: str) -> Asset:
        try:
            return self.assets[tenant][asset_id]
        except KeyError:
            raise NotFound(f"asset {asset_id} not found") from None

    def list_assets(self, tenant: str, type_name: str | None = None, type_version: str | None = None,
                    related_to: str | None = None, relationship: RelationshipKind | None = None) -> list[Asset]:
        """Assets of a tenant, filtered by type and/or by a relationship to `related_to`."""
        out = []
        for a in self.assets.get(tenant, {}).values():
            if type_name is not None and a.type_name != type_name:
                continue
            if type_version is not None and a.type_version != type_version:
                continue
            if related_to is not None or relationship is not None:
                if not any((related_to is None or r.target == related_to)
                           and (relationship is None or r.kind == relationship) for r in a.relationships):
                    continue
            out.append(a)
        return sorted(out, key=lambda a: a.id)

    def delete_asset(self, tenant: str, asset_id: str) -> None:
        self.get_asset(tenant, asset_id)
        referrers = [a.id for a in self.list_assets(tenant, related_to=asset_id)]
        if referrers:
            raise Conflict(f"asset {asset_id} is the target of relationships from {referrers[:20]}", details=referrers)
        self.fs.rm_file(self._path(tenant, "assets", asset_id))
        del self.assets[tenant][asset_id]
