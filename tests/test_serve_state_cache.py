"""The Ingress's short-lived twin-state cache (`serve_apps.twin_reads.TwinReader`), without Ray:
freshness window, read-your-writes through `forget`, shared concurrent calls, tenants apart,
nothing cached for unknown twins or failures, bounded size."""

from __future__ import annotations

import asyncio

import pytest

from serve_apps.config import ServeConfig
from serve_apps.errors import NotFound
from serve_apps.twin_reads import TwinReader


class _View:
    def __init__(self, tenant: str, asset_id: str, revision: int):
        self.data = {"tenant": tenant, "asset_id": asset_id, "revision": revision}
        self.stale = False  # a shard's answer is live

    def model_dump(self, mode: str) -> dict:
        return dict(self.data)


class _Shard:
    """Answers `state.remote(tenant, asset)` like a shard actor; counts calls; revision = call number."""

    def __init__(self, known: set[tuple[str, str]], delay_s: float = 0.0):
        self.known, self.delay_s, self.calls = known, delay_s, 0
        self.state = self

    def remote(self, tenant: str, asset_id: str):
        self.calls += 1
        revision = self.calls

        async def reply():
            await asyncio.sleep(self.delay_s)
            return _View(tenant, asset_id, revision) if (tenant, asset_id) in self.known else None

        return reply()


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _reader(shard: _Shard, max_age_s: float = 0.1, entries: int = 100) -> tuple[TwinReader, _Clock]:
    clock = _Clock()
    config = ServeConfig(store_url="/tmp/unused", keys_file="/tmp/unused.json", state_cache_s=max_age_s,
                         state_cache_entries=entries)
    reader = TwinReader(config, clock=clock)
    reader._shard = lambda tenant, asset_id: shard  # the shard lookup is Ray's; here one fake shard
    return reader, clock


def test_reads_within_the_window_share_one_shard_call_and_later_reads_refresh():
    shard = _Shard({("acme", "zone-1")})
    reader, clock = _reader(shard)

    async def run():
        first = await reader.state("acme", "zone-1")
        clock.now += 0.1  # still inside the window (inclusive)
        second = await reader.state("acme", "zone-1")
        clock.now += 0.001
        third = await reader.state("acme", "zone-1")
        return first, second, third

    first, second, third = asyncio.run(run())
    assert first["revision"] == second["revision"] == 1 and third["revision"] == 2 and shard.calls == 2


def test_forget_gives_read_your_writes_and_tenants_never_share_entries():
    shard = _Shard({("acme", "zone-1"), ("globex", "zone-1")})
    reader, _ = _reader(shard)

    async def run():
        before = await reader.state("acme", "zone-1")
        other_tenant = await reader.state("globex", "zone-1")
        reader.forget("acme", "zone-1")  # an ingest through this replica
        after = await reader.state("acme", "zone-1")
        return before, other_tenant, after

    before, other_tenant, after = asyncio.run(run())
    assert other_tenant["tenant"] == "globex" and other_tenant["revision"] == 2
    assert before["revision"] == 1 and after["revision"] == 3 and after["tenant"] == "acme"


def test_concurrent_reads_share_a_call_and_a_cancelled_reader_does_not_cancel_it():
    shard = _Shard({("acme", "zone-1")}, delay_s=0.05)
    reader, _ = _reader(shard)

    async def run():
        quitter = asyncio.ensure_future(reader.state("acme", "zone-1"))
        await asyncio.sleep(0.01)
        quitter.cancel()
        return await asyncio.gather(*(reader.state("acme", "zone-1") for _ in range(5)))

    answers = asyncio.run(run())
    assert shard.calls == 1 and {a["revision"] for a in answers} == {1}


def test_unknown_twins_are_never_cached():
    shard = _Shard(set())
    reader, _ = _reader(shard)

    async def run():
        with pytest.raises(NotFound, match="zone-9"):
            await reader.state("acme", "zone-9")
        shard.known.add(("acme", "zone-9"))  # created right after
        return await reader.state("acme", "zone-9")

    assert asyncio.run(run())["revision"] == 2


def test_zero_window_reads_every_time_and_the_cache_is_bounded():
    shard = _Shard({("acme", f"z{i}") for i in range(5)})
    uncached, _ = _reader(shard, max_age_s=0.0)
    asyncio.run(uncached.state("acme", "z0"))
    asyncio.run(uncached.state("acme", "z0"))
    assert shard.calls == 2 and not uncached._recent

    bounded, _ = _reader(shard, entries=3)

    async def run():
        for i in range(5):
            await bounded.state("acme", f"z{i}")

    asyncio.run(run())
    assert list(bounded._recent) == [("acme", "z2"), ("acme", "z3"), ("acme", "z4")]
