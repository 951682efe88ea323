"""The catalog of asset types and assets, per tenant, persisted as JSON on the store.

Layout: ``{store}/catalog/{tenant}/types/{name}@{version}.json`` and
``{store}/catalog/{tenant}/assets/{id}.json``. The catalog lives in ONE backend replica (see
`serve_apps.backend`) that loads everything at start and writes through on every change, so
queries are in-memory and concurrent writers cannot interleave; the store is the durable copy.

Asset types are immutable per version (models are registered by ``name@version`` with a content
hash): re-sending identical content is a no-op, different content under an existing version is
a conflict, and "updating" a type means publishing a new version and moving assets to it. A new
version is checked against the newest older one (`raytwin.compat`): breaking changes need a new
major version.

Listings are paged in key order (`serve_apps.listing`): the asset ids of each tenant are kept sorted (`ids`,
sorted once at load, then kept so by each create and delete), so a page of 100 of 100,000 assets reads 101 of them
from its cursor on, and sorts nothing.

Every asset and type carries a revision (stored with it: ``{"revision": 17, "asset": {...}}``),
given by the caller: the backend passes the sequence number of the change-log entry that
records the write (`serve_apps.changes`). Writes take a `Precondition` and evaluate it against
the current revision in the same call that writes, so a conditional write is a compare-and-set.

Each record also names the change that gave it its revision (``"change"``: ``created``, ``updated``, or
``deleted`` for a tombstone): a delete replaces the entry with a tombstone at the delete's revision, removed once its
change is in the log and its twin unregistered (`forget_deleted`). Why: a backend that crashed between a catalog
write and its change-log segment left only the catalog to say what happened, and the next one records that change
from it (`serve_apps.backend.record_lost_catalog_changes`): a create as a create, an update as an update, and a
delete, which used to leave no entry to read it from, as a delete. A record from before the field reads as an update.
"""

from __future__ import annotations

import json
from bisect import bisect_left, insort
from contextlib import suppress
from typing import Any, Literal

from raytwin.compat import IncompatibleVersion, check_version, previous_version
from raytwin.contracts import Asset, AssetType, RelationshipKind
from raytwin.query import Record
from raytwin.storage import canonical_json, filesystem, replace_file
from raytwin.store_failures import store_io
from serve_apps.conditional import Precondition, content_tag
from serve_apps.errors import Conflict, NotFound, Unprocessable
from serve_apps.listing import PAGE_LIMIT, page

NO_PRECONDITION = Precondition()
Written = Literal["created", "updated", "deleted"]
"""The change that gave a catalog record its revision (the record's ``"change"``)."""


class Catalog:
    def __init__(self, store_url: str, storage_options: dict[str, Any] | None = None):
        self.fs, root = filesystem(store_url, storage_options)
        self.root = f"{root}/catalog"
        self.types: dict[str, dict[str, AssetType]] = {}  # tenant -> "name@version" -> type
        self.assets: dict[str, dict[str, Asset]] = {}  # tenant -> id -> asset
        self.ids: dict[str, list[str]] = {}  # tenant -> its asset ids, sorted (the listing's pages)
        # tenant -> id -> what queries see of the asset, built once per write rather than per query
        self.records: dict[str, dict[str, Record]] = {}
        self.revisions: dict[tuple[str, str, str], int] = {}  # (tenant, "types"|"assets", key) -> revision
        # (tenant, kind, key) -> (revision, what was deleted): deletes whose change the log may lack (`forget_deleted`)
        self.tombstones: dict[tuple[str, str, str], tuple[int, Asset | AssetType]] = {}
        self._load()

    # ---- persistence -------------------------------------------------------------------
    @store_io("read")
    def _load(self) -> None:
        if not self.fs.exists(self.root):
            return
        for path in self.fs.find(self.root):
            if not path.endswith(".json"):
                continue
            tenant, kind = path[len(self.root) + 1:].split("/")[:2]
            record = json.loads(self.fs.cat_file(path))
            if "revision" not in record:  # written before revisions existed: the bare contract, revision 0
                record = {"revision": 0, "asset_type" if kind == "types" else "asset": record}
            if kind not in ("types", "assets"):
                continue
            obj: Asset | AssetType = (AssetType.model_validate(record["asset_type"]) if kind == "types"
                                      else Asset.model_validate(record["asset"]))
            key = obj.key if isinstance(obj, AssetType) else obj.id
            if record.get("change") == "deleted":
                self.tombstones[(tenant, kind, key)] = (record["revision"], obj)
                continue
            if isinstance(obj, AssetType):
                self.types.setdefault(tenant, {})[key] = obj
            else:
                self.hold(obj)
            self.revisions[(tenant, kind, key)] = record["revision"]
        self.ids = {tenant: sorted(assets) for tenant, assets in self.assets.items()}

    def _path(self, tenant: str, kind: str, name: str) -> str:
        return f"{self.root}/{tenant}/{kind}/{name}.json"

    def _write(self, tenant: str, kind: str, key: str, obj: Asset | AssetType, revision: int,
               change: Written) -> None:
        field = "asset" if kind == "assets" else "asset_type"
        replace_file(self.fs, self._path(tenant, kind, key), canonical_json(
            {"revision": revision, "change": change, field: obj.model_dump(mode="json")}))
        if change == "deleted":  # held as `_load` reads it back: a retried delete finishes it (`Backend`)
            del self.revisions[(tenant, kind, key)]
            self.tombstones[(tenant, kind, key)] = (revision, obj)
        else:
            self.revisions[(tenant, kind, key)] = revision
            self.tombstones.pop((tenant, kind, key), None)

    def _remove(self, tenant: str, kind: str, key: str, obj: Asset | AssetType, revision: int | None) -> None:
        """Delete an entry: a tombstone at the delete's `revision` (None: removed outright, the undo of a write whose
        change is never recorded)."""
        if revision is None:
            self._unlink(tenant, kind, key)
            del self.revisions[(tenant, kind, key)]
        else:
            self._write(tenant, kind, key, obj, revision, "deleted")

    @store_io("write")
    def _unlink(self, tenant: str, kind: str, key: str) -> None:
        self.fs.rm_file(self._path(tenant, kind, key))

    @store_io("read")
    def written_as(self, tenant: str, key: str) -> Written:
        """The change that gave asset `key` its current revision, read from its record (few calls: each of a lost
        change, `serve_apps.backend.record_lost_catalog_changes`; not held in memory for every asset)."""
        return json.loads(self.fs.cat_file(self._path(tenant, "assets", key))).get("change", "updated")

    def forget_deleted(self, tenant: str, kind: str, key: str) -> None:
        """Remove the tombstone of a delete whose change the log holds and whose twin is unregistered (kept by a
        crash, a failed unregister or a failed removal, it is removed at the next backend's start, or by a retry of the
        delete or a create of the same asset). The file goes first: a removal that fails keeps the tombstone in memory
        too, so the delete stays pending for that retry rather than its file being left for the next start only. The
        caller holds what serialises the catalog's writes, so the file is not an entry created again meanwhile."""
        if self.revision(tenant, kind, key) is None:
            with suppress(FileNotFoundError):
                self._unlink(tenant, kind, key)
        self.tombstones.pop((tenant, kind, key), None)

    def hold(self, asset: Asset) -> None:
        """Hold `asset` in memory (no store write): what loading, creating and updating share."""
        self.assets.setdefault(asset.tenant, {})[asset.id] = asset
        self.records.setdefault(asset.tenant, {})[asset.id] = Record.of(asset)

    def revision(self, tenant: str, kind: str, key: str) -> int | None:
        """The current revision of an asset (`kind` "assets", key its id) or type ("types", "name@version")."""
        return self.revisions.get((tenant, kind, key))

    def check(self, pre: Precondition, tenant: str, kind: str, key: str, what: str) -> None:
        """Evaluate `pre` against the current revision and entity tag (`content_tag`) of an asset or type."""
        revision = self.revision(tenant, kind, key)
        held = (self.assets if kind == "assets" else self.types).get(tenant, {}).get(key)
        pre.check(revision, what, None if revision is None or held is None
                  else content_tag(revision, held.model_dump(mode="json")))

    def tenants(self) -> set[str]:
        return set(self.types) | set(self.assets)

    # ---- asset types -------------------------------------------------------------------
    def check_type(self, tenant: str, asset_type: AssetType, pre: Precondition = NO_PRECONDITION) -> bool:
        """What `put_type` checks, without writing (412, 409 or 422); True if the version is new, False if
        identical content is there. Why apart: the backend registers a new version's model in between."""
        self.check(pre, tenant, "types", asset_type.key, f"asset type {asset_type.key}")
        existing = self.types.get(tenant, {}).get(asset_type.key)
        if existing is not None:
            if existing == asset_type:
                return False
            raise Conflict(f"asset type {asset_type.key} already exists with different content; "
                           "publish a new version instead")
        self._check_evolution(tenant, asset_type)
        return True

    def put_type(self, tenant: str, asset_type: AssetType, revision: int,
                 pre: Precondition = NO_PRECONDITION) -> bool:
        """Store a type version; True if new, False if identical content was already there."""
        if not self.check_type(tenant, asset_type, pre):
            return False
        self._write(tenant, "types", asset_type.key, asset_type, revision, "created")
        self.types.setdefault(tenant, {})[asset_type.key] = asset_type
        return True

    def _check_evolution(self, tenant: str, asset_type: AssetType) -> None:
        """Refuse (422, each breaking change with its fix in `details`) a version whose number is too
        small a step from the newest older version for its changes (`raytwin.compat`)."""
        published = {t.version: t for t in self.list_types(tenant, asset_type.name)}
        previous = previous_version(asset_type.version, published)
        if previous is None:
            return
        try:
            check_version(published[previous], asset_type)
        except IncompatibleVersion as exc:
            raise Unprocessable(str(exc), details=[
                {"where": c.where, "change": c.change, "message": c.message, "fix": c.fix} for c in exc.changes
            ]) from None

    def get_type(self, tenant: str, name: str, version: str) -> AssetType:
        try:
            return self.types[tenant][f"{name}@{version}"]
        except KeyError:
            raise NotFound(f"asset type {name}@{version} not found") from None

    def list_types(self, tenant: str, name: str | None = None) -> list[AssetType]:
        found = self.types.get(tenant, {}).values()
        return sorted((t for t in found if name is None or t.name == name), key=lambda t: t.key)

    def page_types(self, tenant: str, name: str | None = None, limit: int = PAGE_LIMIT,
                   cursor: str | None = None) -> tuple[list[AssetType], str | None]:
        """A page of the tenant's types (of one `name` if given) in ``name@version`` order, and the next cursor. Its
        keys are sorted per page: a tenant publishes few types (each a model), where it may have 100,000 assets."""
        types = self.types.get(tenant, {})
        return page("asset-types", sorted(types),
                    lambda keys: {k: types[k] for k in keys if name in (None, types[k].name)}, limit, cursor)

    def check_delete_type(self, tenant: str, name: str, version: str,
                          pre: Precondition = NO_PRECONDITION) -> AssetType:
        """The type `delete_type` would delete, or its refusal (412, 404, 409 while assets name it), changing
        nothing: the caller's own checks (`serve_apps.type_usage`) come after these."""
        self.check(pre, tenant, "types", f"{name}@{version}", f"asset type {name}@{version}")
        t = self.get_type(tenant, name, version)
        users = [a.id for a in self.list_assets(tenant, type_name=name, type_version=version)]
        if users:
            raise Conflict(f"asset type {t.key} is used by assets {_some(users)}: update them to another "
                           f"type_version (PUT /v1/assets/{{id}}) or delete them first", details=_named(users))
        return t

    def delete_type(self, tenant: str, name: str, version: str, revision: int,
                    pre: Precondition = NO_PRECONDITION) -> AssetType:
        """Delete a type version, leaving a tombstone at `revision`, the delete's change (`forget_deleted`)."""
        t = self.check_delete_type(tenant, name, version, pre)
        self._remove(tenant, "types", t.key, t, revision)
        del self.types[tenant][t.key]
        return t

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

    def create_asset(self, asset: Asset, revision: int, pre: Precondition = NO_PRECONDITION) -> AssetType:
        self.check(pre, asset.tenant, "assets", asset.id, f"asset {asset.id}")
        if asset.id in self.assets.get(asset.tenant, {}):
            raise Conflict(f"asset {asset.id} already exists")
        asset_type = self._check_refs(asset)
        self._write(asset.tenant, "assets", asset.id, asset, revision, "created")
        self.hold(asset)
        insort(self.ids.setdefault(asset.tenant, []), asset.id)
        return asset_type

    def check_update(self, asset: Asset, pre: Precondition = NO_PRECONDITION) -> Asset:
        """What `update_asset` checks, without writing (`pre` holds, the asset exists, its references resolve);
        the asset as it is. Why apart: a retype moves the twin between the check and the write."""
        self.check(pre, asset.tenant, "assets", asset.id, f"asset {asset.id}")
        before = self.get_asset(asset.tenant, asset.id)
        self._check_refs(asset)
        return before

    def update_asset(self, asset: Asset, revision: int, pre: Precondition = NO_PRECONDITION) -> Asset:
        """Replace an asset (compare-and-set with `pre`); returns the asset as it was before."""
        before = self.check_update(asset, pre)
        self._write(asset.tenant, "assets", asset.id, asset, revision, "updated")
        self.hold(asset)
        return before

    def get_asset(self, tenant: str, asset_id: str) -> Asset:
        try:
            return self.assets[tenant][asset_id]
        except KeyError:
            raise NotFound(f"asset {asset_id} not found") from None

    def list_assets(self, tenant: str, type_name: str | None = None, type_version: str | None = None,
                    related_to: str | None = None, relationship: RelationshipKind | None = None) -> list[Asset]:
        """Assets of a tenant, filtered by type and/or by a relationship to `related_to`, in id order."""
        held = self.assets.get(tenant, {})
        return [held[i] for i in self.ids.get(tenant, [])
                if _matches(held[i], type_name, type_version, related_to, relationship)]

    def page_assets(self, tenant: str, type_name: str | None = None, type_version: str | None = None,
                    related_to: str | None = None, relationship: RelationshipKind | None = None,
                    limit: int = PAGE_LIMIT, cursor: str | None = None) -> tuple[list[Asset], str | None]:
        """A page of `list_assets` after `cursor`, and the next cursor (`serve_apps.listing`)."""
        held = self.assets.get(tenant, {})
        return page("assets", self.ids.get(tenant, []), lambda ids: {i: held[i] for i in ids if _matches(
            held[i], type_name, type_version, related_to, relationship)}, limit, cursor)

    def delete_asset(self, tenant: str, asset_id: str, revision: int | None,
                     pre: Precondition = NO_PRECONDITION) -> Asset:
        """Delete an asset, leaving a tombstone at `revision`, the delete's change (`forget_deleted`); None: the undo
        of its create, whose change is never recorded, which leaves nothing."""
        self.check(pre, tenant, "assets", asset_id, f"asset {asset_id}")
        asset = self.get_asset(tenant, asset_id)
        referrers = [a.id for a in self.list_assets(tenant, related_to=asset_id)]
        if referrers:
            raise Conflict(f"asset {asset_id} is the target of relationships from {_some(referrers)}: remove their "
                           f"relationships to it (PUT /v1/assets/{{id}}) or delete them first", details=_named(referrers))
        self._remove(tenant, "assets", asset_id, asset, revision)
        del self.assets[tenant][asset_id]
        del self.records[tenant][asset_id]
        ids = self.ids[tenant]
        del ids[bisect_left(ids, asset_id)]
        return asset


def _matches(asset: Asset, type_name: str | None, type_version: str | None, related_to: str | None,
             relationship: RelationshipKind | None) -> bool:
    """Whether `asset` is of the type (name, version) and has a relationship (to `related_to`, of `relationship`)
    asked for; None: any."""
    if type_name not in (None, asset.type_name) or type_version not in (None, asset.type_version):
        return False
    return (related_to is None and relationship is None) or any(
        related_to in (None, r.target) and relationship in (None, r.kind) for r in asset.relationships)


NAMED = 20
"""How many of the assets that block a delete its 409 names: the rest are counted, so the error stays small for a
type that 100,000 assets use."""


def _some(ids: list[str]) -> str:
    return f"{ids[:NAMED]}" + (f" and {len(ids) - NAMED} more" if len(ids) > NAMED else "")


def _named(ids: list[str]) -> list[dict[str, Any]]:
    """A 409's `details`: the first `NAMED` of the assets that block it, and how many there are."""
    return [{"assets": ids[:NAMED], "count": len(ids)}]
