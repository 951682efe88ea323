"""Twins for the connector tests: two-tank twins of several tenants in one small `TwinService`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from actors import TwinService
from raytwin.contracts import Asset, AssetType
from raytwin.registry import ModelRegistry
from raytwin.sim import TWO_TANK


@contextmanager
def tank_twins(tmp_path_factory, assets: dict[str, list[str]]) -> Iterator[TwinService]:
    """A one-shard service with a two-tank twin per asset id, by tenant (needs a running Ray)."""
    artifact = ModelRegistry(str(tmp_path_factory.mktemp("reg"))).register("tank", "1.0.0",
                                                                           AssetType.from_model(TWO_TANK))
    svc = TwinService(str(tmp_path_factory.mktemp("store")), shards=1, batch_size=1000)
    for tenant, ids in assets.items():
        for a in ids:
            svc.register(Asset(id=a, tenant=tenant, type_name="two_tank", type_version="1.0.0"), artifact)
    try:
        yield svc
    finally:
        svc.close()
