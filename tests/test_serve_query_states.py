"""The bulk live-state reads of queries (`serve_apps.asset_queries.LiveStates`) against fake shards:
one call per shard for the misses, the freshness window, `forget` through the twin reader, tenants."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from serve_apps.asset_queries import LiveStates


class FakeShard:
    """Answers `states.remote(tenant, ids)` from a table keyed by (tenant, id) and counts the calls."""

    def __init__(self, table: dict[tuple[str, str], float]):
        self.table, self.calls = table, []
        self.states = SimpleNamespace(remote=self._states)

    async def _states(self, tenant: str, ids: list[str]) -> dict:
        self.calls.append((tenant, list(ids)))
        return {i: {"state": {"T_in": self.table[(tenant, i)]}, "std": {}} for i in ids if (tenant, i) in self.table}


def reader(shards: list[FakeShard], max_age_s: float = 0.1):
    return SimpleNamespace(max_age_s=max_age_s, max_entries=100, on_forget=[],
                           shard=lambda tenant, asset_id: shards[int(asset_id[1:]) % len(shards)],
                           states=lambda shard, tenant, ids: shard.states.remote(tenant, ids))


def test_misses_are_read_in_one_call_per_shard_and_cached_within_the_window():
    table = {("acme", f"a{i}"): 290.0 + i for i in range(6)} | {("globex", "a1"): 999.0}
    shards = [FakeShard(table), FakeShard(table)]
    now = [0.0]
    r = reader(shards)
    live = LiveStates(r, clock=lambda: now[0])
    ids = [f"a{i}" for i in range(7)]  # a6 has no twin

    got = asyncio.run(live.get("acme", ids))
    assert {k: v["state"]["T_in"] for k, v in got.items()} == {f"a{i}": 290.0 + i for i in range(6)}
    assert sorted(len(s.calls) for s in shards) == [1, 1]  # one call per shard, all its misses in it
    assert shards[0].calls[0] == ("acme", ["a0", "a2", "a4", "a6"])

    table[("acme", "a0")] = 100.0
    now[0] = 0.05
    assert asyncio.run(live.get("acme", ["a0", "a6"]))["a0"]["state"]["T_in"] == 290.0  # within the window
    assert len(shards[0].calls) == 1  # a hit, also for the twin that has no state
    r.on_forget[0]("acme", "a0")  # what `TwinReader.forget` calls after a write through this replica
    assert asyncio.run(live.get("acme", ["a0"]))["a0"]["state"]["T_in"] == 100.0
    now[0] = 1.0
    asyncio.run(live.get("acme", ["a2"]))
    assert shards[0].calls[-1] == ("acme", ["a2"])  # too old: read again

    assert asyncio.run(live.get("globex", ["a1", "a2"])) == {"a1": {"state": {"T_in": 999.0}, "std": {}}}


def test_no_cache_when_the_window_is_zero():
    table = {("acme", "a0"): 1.0}
    shard = FakeShard(table)
    live = LiveStates(reader([shard], max_age_s=0.0))
    for _ in range(3):
        asyncio.run(live.get("acme", ["a0"]))
    assert len(shard.calls) == 3
