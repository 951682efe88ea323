"""Twin state reads straight from the twin shard actors.

State queries are the hot path of the API. The Backend deployment owns the live-twin service
(it creates the shard actors and writes through them), but a read needs nothing from it: the
shard of (tenant, asset) follows from a stable hash, and a shard answers "unknown" for another
tenant's asset exactly as for a missing one. Reading here saves one deployment-handle hop per
query (measured ~9 ms on the 2-vCPU development VM, see benchmarks/RESULTS.md).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import ray

from actors.routing import shard_index, shard_name
from raytwin.statestore import to_micros
from serve_apps.config import ServeConfig
from serve_apps.errors import NotFound


class TwinReader:
    """Looks shard actors up by name once per replica and awaits their state calls."""

    def __init__(self, config: ServeConfig):
        self.store_url = config.url("twins")
        self.shards = config.twin_shards
        self.namespace = config.namespace
        self._handles: dict[int, Any] = {}

    def _shard(self, tenant: str, asset_id: str) -> Any:
        index = shard_index(tenant, asset_id, self.shards)
        if index not in self._handles:
            self._handles[index] = ray.get_actor(shard_name(self.store_url, index, self.shards),
                                                 namespace=self.namespace)
        return self._handles[index]

    async def state(self, tenant: str, asset_id: str, at: datetime | None = None) -> dict[str, Any]:
        """The twin's state now or as of `at`; `NotFound` for unknown twins and other tenants' twins."""
        shard = self._shard(tenant, asset_id)
        ref = shard.state.remote(tenant, asset_id) if at is None else shard.state_at.remote(
            tenant, asset_id, to_micros(at))
        found = await ref
        if found is None:
            raise NotFound(f"no twin state for asset {asset_id}" + (f" at {at.isoformat()}" if at else ""))
        return found.model_dump(mode="json")
