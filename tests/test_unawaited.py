"""Calls that outlive their awaiting side (a client that gave up) leave no "exception was never retrieved" in the
Ingress log, and a failure nobody else hears of is logged once (serve_apps/unawaited.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from serve_apps import twin_reads
from serve_apps.errors import NotFound
from serve_apps.shard_deadline import ShardBreakers
from serve_apps.twin_reads import STALE_AFTER_S, live_or_durable


async def _fails_after(delay_s: float, error: Exception) -> Any:
    await asyncio.sleep(delay_s)
    raise error


def _unretrieved(awaiting: Callable[[], Awaitable[Any]], cancel_after_s: float, settle_s: float) -> list[str]:
    """What the loop's exception handler got once `awaiting()` was cancelled after `cancel_after_s` (its client went
    away) and the calls it left behind had `settle_s` to end and be collected."""
    reported: list[str] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context["message"]))
        request = asyncio.ensure_future(awaiting())
        await asyncio.sleep(cancel_after_s)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.sleep(settle_s)
        gc.collect()  # a task's "exception was never retrieved" is reported when it is collected
        await asyncio.sleep(0)

    asyncio.run(scenario())
    return reported


def test_a_shard_call_whose_client_went_away_is_observed_and_its_failure_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="raytwin.serve")
    breakers = ShardBreakers()
    reported = _unretrieved(lambda: breakers.within(0, "z1", lambda: _fails_after(0.05, RuntimeError("lost")), 10.0),
                            cancel_after_s=0.01, settle_s=0.1)
    assert reported == []
    failures = [r for r in caplog.records if "unawaited_call_failed" in r.getMessage()]
    assert len(failures) == 1 and "RuntimeError: lost" in failures[0].getMessage()
    assert "the shard of twin z1" in failures[0].getMessage() and failures[0].levelno == logging.INFO
    assert not breakers.is_open(0)


def test_a_refusal_left_unread_is_not_logged_as_a_failure(caplog):
    caplog.set_level(logging.INFO, logger="raytwin.serve")
    reported = _unretrieved(lambda: ShardBreakers().within(0, "z1", lambda: _fails_after(0.05, NotFound("no z1")),
                                                           10.0), cancel_after_s=0.01, settle_s=0.1)
    assert reported == [] and "unawaited_call_failed" not in caplog.text  # the departed client's 404, not a fault


@pytest.mark.parametrize("cancel_after_s", [0.01, STALE_AFTER_S + 0.05])  # waiting on the shard; then on the store
def test_a_state_read_whose_client_went_away_leaves_nothing_unretrieved(monkeypatch, cancel_after_s):
    monkeypatch.setattr(twin_reads, "actor_restarting", lambda shard: True)
    reported = _unretrieved(lambda: live_or_durable(object(), _fails_after(0.4, RuntimeError("shard lost")),
                                                    lambda: _fails_after(0.1, OSError("store unreachable"))),
                            cancel_after_s=cancel_after_s, settle_s=0.5)
    assert reported == []


class FailingApply:
    """The backend's state for `Backend.ingest`: a backlog bound that admits all, and applying that fails."""

    class backlog:  # noqa: N801 - stands in for the `BacklogGate` attribute
        @staticmethod
        def reserve(n: int) -> Callable[[], None]:
            return lambda: None

    def apply(self, tenant: str, events: list) -> dict:
        import time

        time.sleep(0.05)
        raise OSError("store unreachable")


def test_accepted_telemetry_failing_after_its_caller_left_is_logged_once_as_an_error(caplog):
    """The backend's `ingest` shields the applying of accepted events from a caller that goes away (Serve cancels
    the call); their failure then reached no one."""
    from serve_apps.backend import Backend

    caplog.set_level(logging.INFO, logger="raytwin.serve")
    reported = _unretrieved(lambda: Backend.ingest(FailingApply(), "acme", [object(), object()]),
                            cancel_after_s=0.01, settle_s=0.2)
    assert reported == []
    (failure,) = [r for r in caplog.records if "unawaited_call_failed" in r.getMessage()]
    assert failure.levelno == logging.ERROR and "applying 2 accepted events of tenant acme" in failure.getMessage()
    assert "OSError: store unreachable" in failure.getMessage()


def test_a_job_watch_that_fails_is_logged_once_not_left_unretrieved(tmp_path, caplog):
    """Nobody awaits a job's watch: the store refusing its finished record was an unretrieved task exception."""
    from datetime import UTC, datetime

    from serve_apps.config import ServeConfig
    from serve_apps.jobs import JobQueue, JobRecord

    caplog.set_level(logging.INFO, logger="raytwin.serve")
    reported: list[str] = []

    async def done() -> dict:
        return {"quantiles": {}, "compute_s": 0.0, "result_url": None, "run_id": None}

    def save(job: JobRecord) -> None:
        if job.state == "succeeded":
            raise OSError("store unreachable")

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context["message"]))
        queue = JobQueue(ServeConfig(store_url=str(tmp_path), keys_file="unused.json"), max_concurrent=1)
        queue._save, queue._launch = save, lambda job, work: done()
        queue.jobs["j1"] = JobRecord(job_id="j1", kind="scenario", tenant="acme", key_id="k", asset_id="z1",
                                     model_ref="m@1.0.0", content_hash="h", scenarios=1, n_steps=1,
                                     submitted=datetime.now(UTC))
        queue.pending.push("acme", "j1", object())
        queue._start_next()
        await asyncio.sleep(0.05)
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert reported == []
    (failure,) = [r for r in caplog.records if "unawaited_call_failed" in r.getMessage()]
    assert failure.levelno == logging.ERROR and "watch of job j1" in failure.getMessage()
