"""`serve_apps.twin_reads.live_or_durable`, without Ray: when a read is answered from the store (a
restarting shard, a call Ray refuses) and when it waits for the shard (a busy shard, or one that is
back before the store answered); a query's store reads stop once the shard answered."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import ray

from serve_apps import twin_reads
from serve_apps.config import ServeConfig
from serve_apps.shard_deadline import ShardBreakers, TwinUnavailable
from serve_apps.twin_reads import STALE_AFTER_S, TwinReader, live_or_durable


async def _after(delay_s: float, value: str) -> str:
    await asyncio.sleep(delay_s)
    return value


async def _refused() -> str:
    raise ray.exceptions.ActorUnavailableError("The actor is restarting.", None)


def _read(restarting: bool, call, durable_s: float, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(twin_reads, "actor_restarting", lambda shard: restarting)
    return asyncio.run(live_or_durable(object(), call, lambda: _after(durable_s, "stored")))


def test_a_restarting_shard_is_answered_from_the_store(monkeypatch):
    assert _read(True, _after(10.0, "live"), 0.0, monkeypatch) == "stored"


def test_a_shard_back_before_the_store_answers_is_read_live(monkeypatch):
    assert _read(True, _after(STALE_AFTER_S + 0.05, "live"), 10.0, monkeypatch) == "live"


def test_a_busy_shard_that_is_alive_is_waited_for(monkeypatch):
    assert _read(False, _after(3 * STALE_AFTER_S, "live"), 0.0, monkeypatch) == "live"


def test_a_call_ray_refuses_is_answered_from_the_store(monkeypatch):
    assert _read(False, _refused(), 0.0, monkeypatch) == "stored"


def test_a_refusal_after_the_restart_was_seen_waits_for_the_store(monkeypatch):
    async def refused_later() -> str:
        await asyncio.sleep(STALE_AFTER_S + 0.05)
        return await _refused()

    assert _read(True, refused_later(), 0.5, monkeypatch) == "stored"


def test_other_errors_of_the_shard_are_raised(monkeypatch):
    async def broken() -> str:
        raise RuntimeError("a bug in the shard")

    with pytest.raises(RuntimeError, match="a bug"):
        _read(False, broken(), 0.0, monkeypatch)


def test_a_query_stops_reading_the_store_once_the_restarted_shard_answered(monkeypatch, tmp_path):
    """The store is read twin by twin in a thread; a live answer first ends that thread's work early
    (a large tenant's stale read must not keep a replica's threads busy after the restart)."""
    read: list[str] = []

    def slow_durable_state(store, tenant: str, asset_id: str):
        read.append(asset_id)
        time.sleep(0.02)
        return None

    class Shard:
        class states:  # noqa: N801 - the actor method's name
            @staticmethod
            async def remote(tenant: str, ids: list[str]) -> dict:
                await asyncio.sleep(STALE_AFTER_S + 0.2)
                return {"live": {"state": {}, "std": {}, "revision": 7}}

    monkeypatch.setattr(twin_reads, "actor_restarting", lambda shard: True)
    monkeypatch.setattr(twin_reads, "durable_state", slow_durable_state)
    reader = TwinReader(ServeConfig(store_url=str(tmp_path), keys_file="unused.json", twin_shards=1))
    ids = [f"z{i}" for i in range(500)]  # 10 s of store reads
    assert asyncio.run(reader.states(Shard(), "acme", ids)) == {"live": {"state": {}, "std": {}, "revision": 7}}
    time.sleep(0.1)
    stopped_at = len(read)
    time.sleep(0.2)
    assert 0 < stopped_at == len(read) < 100  # it read some, then stopped


def test_a_shard_dead_for_good_is_answered_from_the_store_and_looked_up_again(monkeypatch, tmp_path):
    """A backend replica that died took its shard actors with it (their owner); the restarted replica made
    new ones under the same names. A reader holding the dead handle answers from the store, then reads the new."""
    class Shard:
        def __init__(self, answer):
            self.answer = answer
            shard = self

            class state:  # noqa: N801 - the actor method's name
                @staticmethod
                async def remote(tenant: str, asset_id: str):
                    if isinstance(shard.answer, Exception):
                        raise shard.answer
                    return shard.answer

            self.state = state

    class Found:
        stale = False

        def __init__(self, where: str):
            self.where = where

        def model_dump(self, mode: str) -> dict:
            return {"from": self.where}

    stored = Found("store")
    stored.stale = True
    monkeypatch.setattr(twin_reads, "actor_restarting", lambda shard: False)
    monkeypatch.setattr(twin_reads, "durable_state", lambda store, tenant, asset_id: stored)
    new = Shard(Found("new shard"))
    created = iter([False, True])  # the restarted replica has not created its shards yet, then has

    def get_actor(name: str, namespace: str) -> Shard:
        if not next(created):
            raise ValueError(f"Failed to look up actor with name {name!r}")
        return new

    monkeypatch.setattr(twin_reads.ray, "get_actor", get_actor)
    reader = TwinReader(ServeConfig(store_url=str(tmp_path), keys_file="unused.json", twin_shards=1, state_cache_s=0))
    reader._handles[0] = Shard(ray.exceptions.ActorDiedError())
    assert asyncio.run(reader.state("acme", "z1")) == {"from": "store"}  # the dead handle
    assert asyncio.run(reader.state("acme", "z1")) == {"from": "store"}  # no shard of that name yet
    assert asyncio.run(reader.state("acme", "z1")) == {"from": "new shard"}


# ---- a shard alive to Ray that answers nothing (serve_apps/shard_deadline.py) ------------------------------
def test_an_alive_shard_unanswered_past_the_deadline_is_read_from_the_store_and_reported(monkeypatch):
    monkeypatch.setattr(twin_reads, "actor_restarting", lambda shard: False)
    unanswered: list[asyncio.Future] = []

    async def read() -> str:
        return await live_or_durable(object(), _after(10.0, "live"), lambda: _after(0.0, "stored"),
                                     deadline_s=2 * STALE_AFTER_S, unanswered=unanswered.append)

    assert asyncio.run(read()) == "stored" and len(unanswered) == 1


def test_a_breaker_opens_on_a_late_call_refuses_until_that_call_ends_and_names_the_twin():
    async def scenario() -> None:
        breakers, release = ShardBreakers(), asyncio.Event()

        async def hung() -> str:
            await release.wait()
            return "applied"

        with pytest.raises(TwinUnavailable, match=r"^the shard holding twin z1 has not answered within 0.05 s .*"
                                                  r"resending telemetry is safe") as late:
            await breakers.within(3, "z1", hung, 0.05)
        assert late.value.headers == {"Retry-After": "2"} and late.value.status == 503
        assert breakers.is_open(3) and not breakers.is_open(0)  # that shard's twins only
        made: list[str] = []
        with pytest.raises(TwinUnavailable, match="leaves calls unanswered"):
            await breakers.within(3, "z2", lambda: made.append("call") or _after(0.0, "x"), 10.0)
        assert made == []  # refused before a call is made
        assert await breakers.within(0, "z9", lambda: _after(0.0, "live"), 10.0) == "live"
        release.set()
        await asyncio.sleep(0.01)
        assert not breakers.is_open(3)  # the late call ended: live again
        assert await breakers.within(3, "z1", lambda: _after(0.0, "live"), 10.0) == "live"

    asyncio.run(scenario())


def test_a_late_call_that_fails_unanswered_is_not_logged_as_the_shard_answering(caplog):
    """An outside test's SIGSTOPped shard: 22 s into the stop, Ray failed the late call (ActorUnavailableError) and
    the Ingress logged `event=shard_answered shard=1: its twins are live again` while the process was still
    stopped. A call Ray fails because the process is unreachable, dead or restarting is no answer."""
    from ray.exceptions import ActorUnavailableError

    async def scenario(outcome: BaseException | str) -> None:
        breakers, release = ShardBreakers(), asyncio.Event()

        async def hung() -> str:
            await release.wait()
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        with pytest.raises(TwinUnavailable):
            await breakers.within(1, "z1", hung, 0.01)
        release.set()
        await asyncio.sleep(0.01)
        assert not breakers.is_open(1)  # the next call tries the shard again

    caplog.set_level(logging.INFO, logger="raytwin.serve")
    asyncio.run(scenario(ActorUnavailableError("The actor is temporarily unavailable: RpcError", None)))
    asyncio.run(scenario("applied"))
    ended = [(r.levelno, r.getMessage()) for r in caplog.records if "event=shard_" in r.getMessage()
             and "unanswered" not in r.getMessage()]
    assert [(level, message.split(":")[0]) for level, message in ended] == [
        (logging.WARNING, "event=shard_call_failed shard=1 error=ActorUnavailableError"),
        (logging.INFO, "event=shard_answered shard=1")], ended


def test_reads_of_a_shard_whose_breaker_is_open_go_to_the_store_without_calling_it(monkeypatch, tmp_path):
    class Stored:
        stale = True

        def model_dump(self, mode: str) -> dict:
            return {"from": "store"}

    class Shard:
        class state:  # noqa: N801 - the actor method's name
            @staticmethod
            def remote(tenant: str, asset_id: str):
                raise AssertionError("a shard whose breaker is open was called")

    monkeypatch.setattr(twin_reads, "durable_state", lambda store, tenant, asset_id: Stored())
    reader = TwinReader(ServeConfig(store_url=str(tmp_path), keys_file="unused.json", twin_shards=1, state_cache_s=0))
    reader._handles[0] = Shard()

    async def scenario() -> dict:
        reader.breakers.trip(0, asyncio.get_running_loop().create_future(), 1.0)
        return await reader.state("acme", "z1")

    assert asyncio.run(scenario()) == {"from": "store"}


def test_a_request_whose_client_went_away_is_counted_499_not_500(monkeypatch):
    """Serve cancels the request when its client disconnects: that is no server error (the SLO's budget)."""
    from serve_apps import api

    counted: list[str] = []

    class Metrics:  # stands in for `raytwin.metrics` in the API module
        class HTTP_REQUESTS:  # noqa: N801
            inc = staticmethod(lambda **tags: counted.append(tags["status"]))

        class HTTP_LATENCY:  # noqa: N801
            observe = staticmethod(lambda seconds, **tags: None)

    monkeypatch.setattr(api, "metrics", Metrics)

    async def slow_app(scope, receive, send) -> None:
        await asyncio.sleep(10.0)

    async def scenario() -> None:
        observer = api.RequestObserver(slow_app)
        request = asyncio.ensure_future(observer({"type": "http", "method": "GET", "path": "/v1/x"}, None, None))
        await asyncio.sleep(0.01)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request

    asyncio.run(scenario())
    assert counted == ["499"]


def test_telemetry_whose_backend_died_with_it_answers_503_resend_not_500(tmp_path):
    """Some of three batches in flight when the backend replica was SIGKILLed had been applied, one had not, and
    all three answered 500, which the SDK does not resend: that batch was lost for an SDK producer."""
    reader = TwinReader(ServeConfig(store_url=str(tmp_path), keys_file="unused.json", twin_shards=1))

    async def lost() -> dict:
        raise ray.exceptions.ActorDiedError()

    with pytest.raises(TwinUnavailable, match=r"^the process applying this write to twin z1 was lost "
                                              r"\(ActorDiedError\); it may have been applied: resend") as refused:
        asyncio.run(reader.write("acme", "z1", lost))
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    assert not reader.breakers.is_open(0)  # an answer, not a silence: the shard is not taken for hung
