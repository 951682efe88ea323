"""Twins for the connector tests: two-tank twins of several tenants in one small `TwinService`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from actors import TwinService
from raytwin.contracts import Asset, AssetType
from raytwin.registry import ModelRegistry
from raytwin.sim import TWO_TANK

WAIT_S = 120.0
"""How long a connector test waits for something a broker or server round trip should bring about."""


def wait_for(condition, what: str):
    """`condition()`'s first truthy value, polled until `WAIT_S` has passed (then an AssertionError naming `what`)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {WAIT_S:g} s: {what}")


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
