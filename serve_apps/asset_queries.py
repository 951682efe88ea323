"""Asset queries and graph walks over the catalog, split between the two deployments.

The backend (which owns the catalog) runs the catalog half: it refuses a state name none of the
tenant's asset types has (`check_state_names`), drops every asset that no live state could make
match (`raytwin.query.evaluate` with ``live=False``) and walks the graph. The ingress runs the
rest: it reads the live state of the remaining candidates in bulk (one call per twin shard,
`LiveStates`; a restarting shard's twins from their last durable state, marked stale), decides
them, sorts and pages. A query without `state.*`/`std.*` never touches a shard.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections import OrderedDict, defaultdict
from typing import Any

from raytwin.graph import Direction, adjacency, walk
from raytwin.query import Expr, Record, evaluate, type_scope
from raytwin.storage import filesystem, write_once
from raytwin.store_failures import store_io
from serve_apps.catalog import Catalog
from serve_apps.errors import Unprocessable
from serve_apps.query_schemas import AssetGraph, GraphNode
from serve_apps.twin_reads import TwinReader

KEY_BYTES = 32


def check_state_names(catalog: Catalog, tenant: str, expr: Expr, reads: list[tuple[str, str]]) -> None:
    """422 for each `state.<name>`/`std.<name>` in `reads` ((where, field path) pairs: ``("sort[0]",
    "state.T_in")``) that none of the tenant's asset types declares, or none of those the query keeps to
    (`type_scope`): a misspelt name would match and sort on nothing, without a word. A name of some types
    only is fine (mixed fleets). The types are in memory: the check costs no call and no read."""
    if not reads:
        return
    types = list(catalog.types.get(tenant, {}).values())
    scope = type_scope(expr)
    kept = [t for t in types if scope is None or t.name in scope] or types  # types it names but you lack: all yours
    known = {name for t in kept for name in t.states}
    unknown = [(where, path) for where, path in reads if path.partition(".")[2] not in known]
    if not unknown:
        return
    whose = "your asset types" if len(kept) == len(types) else f"type {', '.join(sorted({t.name for t in kept}))}"
    names = sorted(known)
    said = ", ".join(names) if names else "none: register an asset type first"
    raise Unprocessable("; ".join(f"{where}: unknown field {path}" for where, path in unknown)
                        + f": no state of {whose} has that name (their states: {said}); correct the name",
                        details=[{"in": where, "field": path, "reason": f"no state of {whose} is named "
                                  f"{path.partition('.')[2]!r}", "known": names} for where, path in unknown])


def candidates(catalog: Catalog, tenant: str, expr: Expr) -> list[Record]:
    """What queries see of the tenant's assets that match `expr`, or may once live state is known.
    Records, not `Asset`s, cross to the ingress: about a tenth of the cost to pickle."""
    return [r for r in catalog.records.get(tenant, {}).values() if evaluate(expr, r, live=False) is not False]


def graph(catalog: Catalog, tenant: str, asset_id: str, direction: Direction, kinds: list[str],
          depth: int) -> AssetGraph:
    """The assets reachable from `asset_id` in `direction` (404 for unknown and other tenants' assets)."""
    catalog.get_asset(tenant, asset_id)
    found = walk(adjacency(catalog.assets.get(tenant, {}).values(), direction, kinds), asset_id, depth)
    return AssetGraph(asset_id=asset_id, direction=direction, truncated=found.truncated,
                      nodes=[GraphNode(id=r.id, depth=r.depth, path=list(r.path), kinds=list(r.kinds))
                             for r in found.reached])


@store_io("write")
def cursor_secret(store_url: str, storage_options: dict[str, Any] | None) -> bytes:
    """The key that signs query cursors, made on first use and kept on the store, so every ingress
    replica (and a restarted one) accepts the cursors the others issued. Called by the single backend."""
    fs, root = filesystem(store_url, storage_options)
    path = f"{root}/secrets/query-cursor.key"
    if not fs.exists(path):
        try:
            write_once(fs, path, secrets.token_bytes(KEY_BYTES))
        except FileExistsError:  # made meanwhile (a restarting backend): use that one
            pass
    if "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol):  # whoever has it forges cursors
        os.chmod(path, 0o600)
    return fs.cat_file(path)


class LiveStates:
    """Current state of many twins for queries: one `states` call per shard for the misses, and a
    per-replica cache with the same freshness bound as single reads (`state_cache_s`, see
    `serve_apps.twin_reads`), so repeated queries over the same twins cost no shard call."""

    def __init__(self, reader: TwinReader, clock=time.monotonic):
        self.reader = reader
        self.max_age_s = reader.max_age_s
        self.max_entries = reader.max_entries
        self._clock = clock
        self._recent: OrderedDict[tuple[str, str], tuple[float, dict[str, Any] | None]] = OrderedDict()
        reader.on_forget.append(self.forget)  # read-your-writes, as for single reads

    def forget(self, tenant: str, asset_id: str) -> None:
        self._recent.pop((tenant, asset_id), None)

    async def get(self, tenant: str, asset_ids: list[str]) -> dict[str, dict[str, Any]]:
        """asset id -> {"state", "std", "revision"}, and ``"stale": True`` where the twin's shard was
        restarting and the state is its last durable one; twins without state are left out."""
        now = self._clock()
        out: dict[str, dict[str, Any]] = {}
        by_shard: dict[Any, list[str]] = defaultdict(list)
        for asset_id in asset_ids:
            hit = self._recent.get((tenant, asset_id))
            if hit is not None and now - hit[0] <= self.max_age_s:
                if hit[1] is not None:
                    out[asset_id] = hit[1]
            else:
                by_shard[self.reader.shard(tenant, asset_id)].append(asset_id)
        replies = await asyncio.gather(*(self.reader.states(h, tenant, ids) for h, ids in by_shard.items()))
        for ids, reply in zip(by_shard.values(), replies, strict=True):
            out.update(reply)
            if self.max_age_s > 0:
                for asset_id in ids:
                    self._remember((tenant, asset_id), (now, reply.get(asset_id)))
        return out

    def _remember(self, key: tuple[str, str], entry: tuple[float, dict[str, Any] | None]) -> None:
        self._recent[key] = entry
        self._recent.move_to_end(key)
        while len(self._recent) > self.max_entries:
            self._recent.popitem(last=False)
