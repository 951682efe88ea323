"""Assets whose twin moved to another type version before their catalog write: journaled, so that a
crash or a failed catalog write between the two is finished, not left for a client to resend.

A change of an asset's type version (a `PUT` or bulk retype, `Backend.update_asset`; a migration,
`TypeEvolution.migrate`) moves the twin first, all or nothing, and writes the catalog after: a twin
that cannot move then changes nothing. The price is a window in which the twin runs the new version
and the catalog names the old one; a backend killed there, or a catalog write that fails, left the
two disagreeing until the same request was sent again. So before the twin moves the backend writes an
intent, ``{store}/asset-moves/{tenant}/{asset_id}.json`` (the asset as it will be, the catalog revision
it was checked at), and removes it once the catalog is written or the twin refused to move. An intent
still there is *settled*: at the backend's start (one listing, empty unless something failed, however
many assets there are), and before the next read or write of that asset in a running backend:

- the twin's registration names the intent's type version (the move committed in its shard), the
  catalog still the old one at the revision checked: the catalog write is done now, recorded in the
  change log (``asset.updated``) and audited as the system's, with ``recovered: true``;
- the registration names another version (the request failed before the twin moved, or was refused):
  nothing happened, and the intent is dropped;
- the catalog already names it (written, the intent's removal lost), or the asset is gone: dropped;
- the catalog changed since the check (cannot happen with one backend replica: every write of the asset
  settles it first): not overwritten, logged as ``event=asset_move_conflict``, and dropped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from raytwin.contracts import Asset
from raytwin.storage import canonical_json, filesystem, replace_file
from raytwin.store_failures import store_io
from serve_apps.audit_steps import audited, by_system
from serve_apps.errors import NotFound

if TYPE_CHECKING:
    from serve_apps.backend import Backend

log = logging.getLogger("raytwin.serve.asset_moves")

ACTIONS = {"retype": "asset.update", "migrate": "asset.migrate"}
"""The audit action of each kind of move: what the request that started it is audited as."""


class Move(BaseModel):
    """An asset's twin about to move: the asset as the catalog will name it, at which catalog revision the
    write was checked (None: the asset was not there), and by what."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    asset: Asset
    revision: int | None
    kind: Literal["retype", "migrate"]


class AssetMoves:
    """The journal of moves not yet written to the catalog, and their settling. Callers hold the backend's lock."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.fs, root = filesystem(backend.config.store_url, backend.config.storage_options)
        self.root = f"{root}/asset-moves"
        self.pending: dict[tuple[str, str], Move] = {}
        self._load()

    @store_io("read")
    def _load(self) -> None:
        paths = self.fs.glob(f"{self.root}/*/*.json")
        for path, body in (self.fs.cat(paths).items() if paths else ()):
            move = Move.model_validate_json(body)
            self.pending[(move.asset.tenant, move.asset.id)] = move

    def _path(self, tenant: str, asset_id: str) -> str:
        return f"{self.root}/{tenant}/{asset_id}.json"

    def begin(self, asset: Asset, kind: Literal["retype", "migrate"]) -> None:
        """Journal the move before the twin moves (the catalog's revision of the asset is the one checked)."""
        move = Move(asset=asset, revision=self.backend.catalog.revision(asset.tenant, "assets", asset.id), kind=kind)
        path = self._path(asset.tenant, asset.id)
        replace_file(self.fs, path, canonical_json(move.model_dump(mode="json")))
        self.pending[(asset.tenant, asset.id)] = move

    @store_io("write")
    def end(self, tenant: str, asset_id: str) -> None:
        """The move is in the catalog, or did not happen: forget it."""
        if self.pending.pop((tenant, asset_id), None) is not None:
            self.fs.rm_file(self._path(tenant, asset_id))

    def settle_all(self) -> None:
        """Settle every journaled move (at start)."""
        for tenant, asset_id in sorted(self.pending):
            self.try_settle(tenant, asset_id)

    def try_settle(self, tenant: str, asset_id: str) -> None:
        """`settle`, a failure logged: the move stays journaled for the asset's next access or the next start,
        so that neither the API's start nor a read of the asset fails on a store error (a write of it does)."""
        if (tenant, asset_id) in self.pending:
            try:
                self.settle(tenant, asset_id)
            except Exception:  # noqa: BLE001 - see above
                log.exception("event=asset_move_unsettled tenant=%s asset=%s", tenant, asset_id)

    def settle(self, tenant: str, asset_id: str) -> None:
        """Finish or drop the asset's journaled move (see the module docstring); nothing if none. Raises what the
        store raised (the move stays journaled)."""
        move = self.pending.get((tenant, asset_id))
        if move is None:
            return
        b, target = self.backend, (move.asset.type_name, move.asset.type_version)
        record = b.twins.store.load_registration(tenant, asset_id)
        moved = record is not None and (record["asset"]["type_name"], record["asset"]["type_version"]) == target
        try:
            current: Asset | None = b.catalog.get_asset(tenant, asset_id)
        except NotFound:
            current = None
        revision = b.catalog.revision(tenant, "assets", asset_id)
        if moved and current is not None and (current.type_name, current.type_version) != target:
            if revision != move.revision:
                log.error("event=asset_move_conflict tenant=%s asset=%s twin=%s@%s catalog=%s@%s revision=%s "
                          "checked_at=%s: the catalog changed after the twin moved; it is left as it is, move the "
                          "asset again (PUT or migrate)", tenant, asset_id, *target, current.type_name,
                          current.type_version, revision, move.revision)
            else:
                self._finish(move, current)
        elif not moved:
            log.info("event=asset_move_dropped tenant=%s asset=%s type_version=%s: its twin did not move", tenant,
                     asset_id, move.asset.type_version)
        self.end(tenant, asset_id)

    def _finish(self, move: Move, current: Asset) -> None:
        """Write the catalog as the interrupted request would have, recorded and audited as the system's."""
        from serve_apps.backend import _asset_change

        b, asset = self.backend, move.asset
        b.check_writable()

        def write(seq: int) -> list[dict[str, Any]]:
            b.catalog.update_asset(asset, seq)
            return [_asset_change("asset.updated", asset)]

        with audited(b.audit, by_system(asset.tenant, ACTIONS[move.kind], asset.id, {
                "asset": asset.model_dump(mode="json"), "from_version": current.type_version,
                "to_version": asset.type_version, "recovered": True,
                "reason": "the twin moved to this type version and the catalog write did not follow (a crash or a "
                          "store error); finished by the backend"})) as outcome:  # no intent: stays journaled
            (change,) = b.changes.write(asset.tenant, write)
            outcome.update(revision=change.seq)
        log.warning("event=asset_move_finished tenant=%s asset=%s kind=%s from=%s to=%s revision=%d", asset.tenant,
                    asset.id, move.kind, current.type_version, asset.type_version, change.seq)

