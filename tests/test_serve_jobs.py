"""The job queue without Ray: fair turns between tenants, why a queued job waits, listing jobs (API, SDK, CLI)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from typer.testing import CliRunner

from client import RayTwinClient
from serve_apps.config import ServeConfig
from serve_apps.jobs import JobQueue, JobRecord


class HeldJobs:
    """`JobQueue._launch` stand-in: each started job runs until the test finishes it (`finish`)."""

    def __init__(self, queue: JobQueue):
        self.futures: dict[str, asyncio.Future[dict[str, Any]]] = {}
        queue._launch = self.launch

    def launch(self, job: JobRecord, work: object) -> asyncio.Future[dict[str, Any]]:
        self.futures[job.job_id] = asyncio.get_running_loop().create_future()
        return self.futures[job.job_id]

    async def finish(self, job_id: str) -> None:
        self.futures[job_id].set_result({"quantiles": [], "compute_s": 1.0, "result_url": None, "run_id": None})
        for _ in range(3):  # the watch saves the job and starts the next
            await asyncio.sleep(0)


def _submit(queue: JobQueue, tenant: str) -> str:
    """A scenario job of `tenant` (never run: `HeldJobs` launches nothing)."""
    import numpy as np

    from raytwin.sim import THERMAL_RC
    from serve_apps.scenarios import PreparedScenario

    work = PreparedScenario(simulator="thermal_rc", model_ref="thermal_rc@1.0.0", content_hash="ab" * 32, step_s=60.0,
                            x0=np.array([294.0, 293.0]), inputs=np.tile([278.0, 0.0, 0.0], (10, 1)),
                            params=np.asarray(THERMAL_RC.param_vector()), overrides={})
    return queue.submit(tenant, f"key-{tenant}", "zone-1", "thermal_rc@1.0.0", "h", work).job_id


def _states(queue: JobQueue, *job_ids: str) -> list[str]:
    return [queue.jobs[j].state for j in job_ids]


def test_one_tenants_long_sweeps_leave_a_slot_for_another_tenant_whose_queued_job_says_why_it_waits(tmp_path):
    """Tenant beta's three long sweeps held both slots of a FIFO queue, and tenant acme's job sat queued with no
    explanation. By default a tenant runs at most max_concurrent_jobs - 1 jobs, and tenants take turns."""
    config = ServeConfig(store_url=str(tmp_path), keys_file="unused.json")
    assert (config.max_concurrent_jobs, config.max_running_jobs_per_tenant) == (2, 1)

    async def scenario() -> None:
        queue = JobQueue(config, config.max_concurrent_jobs)
        held = HeldJobs(queue)
        b1, b2, b3 = (_submit(queue, "beta") for _ in range(3))
        a1 = _submit(queue, "acme")
        assert _states(queue, b1, b2, b3, a1) == ["running", "queued", "queued", "running"]
        wait = queue.status(queue.jobs[b3]).queue
        assert (wait.position, wait.waiting_for, wait.tenant_running, wait.tenant_limit) == (2, "tenant_limit", 1, 1)
        assert "1 of this tenant's queued jobs start before it" in wait.reason
        assert "max_running_jobs_per_tenant=1" in wait.reason
        assert queue.status(queue.jobs[a1]).queue is None  # running: nothing to wait for
        a2 = _submit(queue, "acme")
        assert queue.status(queue.jobs[a2]).queue.waiting_for == "tenant_limit"
        await held.finish(b1)
        assert _states(queue, b2, b3, a2) == ["running", "queued", "queued"]
        await held.finish(a1)
        assert _states(queue, b3, a2) == ["queued", "running"]
        assert JobRecord.model_validate_json((tmp_path / "jobs" / "acme" / a2 / "job.json").read_text()).state == \
            "running"  # every change on the store, as before

    asyncio.run(scenario())


def test_a_scenario_jobs_task_writes_its_results_where_the_routes_read_them(tmp_path, monkeypatch):
    """The queue gave `scenario_to_store` (whose `out_url` is a path) `JobRecord.results_root`, None for a job without
    result files (bulk, a sweep without a run): a scenario job's own folder is `scenario_results`, never None, and
    the same `results_root` answers for it (the routes read there)."""
    from types import SimpleNamespace

    from serve_apps import jobs

    config = ServeConfig(store_url=str(tmp_path), keys_file="unused.json")
    written: list[str] = []

    def remote(work: object, out_url: str, storage_options: dict) -> asyncio.Future[dict[str, Any]]:
        written.append(out_url)
        return asyncio.get_running_loop().create_future()  # never ends: the task is not run

    monkeypatch.setattr(jobs, "scenario_to_store", SimpleNamespace(remote=remote))

    async def scenario() -> None:
        queue = JobQueue(config, 1)
        job = queue.jobs[_submit(queue, "acme")]
        assert written == [job.scenario_results(config)] == [job.results_root(config)]
        assert written[0] == config.url("jobs", "acme", job.job_id, "results")

    asyncio.run(scenario())


def test_tenants_take_turns_for_a_free_slot_even_without_a_per_tenant_cap(tmp_path):
    """With the cap at max_concurrent_jobs (one tenant's service), a freed slot goes to the tenant running fewest
    jobs, not to the oldest queued job: acme's job does not wait behind all of beta's."""
    config = ServeConfig(store_url=str(tmp_path), keys_file="unused.json", max_running_jobs_per_tenant=2)

    async def scenario() -> None:
        queue = JobQueue(config, config.max_concurrent_jobs)
        held = HeldJobs(queue)
        b1, b2, b3, b4 = (_submit(queue, "beta") for _ in range(4))
        a1 = _submit(queue, "acme")
        wait = queue.status(queue.jobs[a1]).queue
        assert (wait.position, wait.waiting_for, wait.tenant_running) == (1, "slot", 0)
        assert "all 2 job slots are busy (max_concurrent_jobs), 0 with this tenant's jobs" in wait.reason
        await held.finish(b1)
        assert _states(queue, a1, b3, b4) == ["running", "queued", "queued"]
        assert queue.status(queue.jobs[b4]).queue.position == 2

    asyncio.run(scenario())


def test_a_tenant_cap_above_the_slots_is_refused_naming_both_settings():
    with pytest.raises(ValueError, match=r"max_running_jobs_per_tenant \(3\) must be at most max_concurrent_jobs"):
        ServeConfig(store_url="s", keys_file="k", max_concurrent_jobs=2, max_running_jobs_per_tenant=3)
    assert ServeConfig(store_url="s", keys_file="k", max_concurrent_jobs=1).max_running_jobs_per_tenant == 1


class ListingBackend:
    """The backend's job calls (the real `Backend` methods) over a real `JobQueue`."""

    def __init__(self, queue: JobQueue):
        self.jobs, self.config = queue, queue.config

    def __getattr__(self, method: str) -> Any:
        from serve_apps.backend import Backend

        return getattr(Backend, method).__get__(self)


def _recorded(tmp_path, jobs: list[tuple[str, str, str]]) -> JobQueue:
    """A queue over a store holding `jobs` (job id, tenant, state), submitted a minute apart in that order."""
    config = ServeConfig(store_url=str(tmp_path / "store"), keys_file="unused.json")
    writer = JobQueue(config, 2)
    t0 = datetime(2026, 12, 5, 12, tzinfo=UTC)
    for i, (job_id, tenant, state) in enumerate(jobs):
        writer._save(JobRecord(job_id=job_id, kind="sweep", tenant=tenant, key_id="k", asset_id="zone-1",
                               model_ref="thermal_rc@1.0.0", content_hash="h", scenarios=3, n_steps=10, state=state,
                               submitted=t0 + timedelta(minutes=i), result_url=f"{tmp_path}/results/{job_id}"))
    return JobQueue(config, 2)  # the jobs recovered from the store, as a restarted backend does


class ReadJobs(dict):
    """A job table that counts the records read from it."""

    reads = 0

    def __getitem__(self, job_id: str) -> JobRecord:
        self.reads += 1
        return super().__getitem__(job_id)

    def values(self):
        for job in super().values():
            self.reads += 1
            yield job


JOBS = [("j1", "acme", "succeeded"), ("j2", "acme", "failed"), ("g1", "globex", "succeeded"),
        ("j3", "acme", "succeeded"), ("j4", "acme", "cancelled")]


def test_a_tenant_lists_its_jobs_newest_first_by_state_and_page_and_never_another_tenants(tmp_path):
    """The job-queue runbook said to check the running jobs, but nothing listed jobs."""
    from tests.fixtures_serve import in_process

    queue = _recorded(tmp_path, JOBS)
    with in_process(ListingBackend(queue), tmp_path) as (http, auth, _):
        first = http.get("/v1/jobs?limit=2", headers=auth["reader"])
        assert first.status_code == 200, first.text
        assert [j["job_id"] for j in first.json()["jobs"]] == ["j4", "j3"]
        assert str(tmp_path) not in first.text  # job statuses, never store locations
        rest = http.get("/v1/jobs", params={"limit": 2, "cursor": first.json()["next_cursor"]}, headers=auth["reader"])
        assert [j["job_id"] for j in rest.json()["jobs"]] == ["j2", "j1"] and rest.json()["next_cursor"] is None
        done = http.get("/v1/jobs?state=succeeded", headers=auth["reader"]).json()
        assert [j["job_id"] for j in done["jobs"]] == ["j3", "j1"]
        assert [j["job_id"] for j in http.get("/v1/jobs", headers=auth["other"]).json()["jobs"]] == ["g1"]
        bad = http.get("/v1/jobs?cursor=bm9wZQ", headers=auth["reader"])
        assert bad.status_code == 422 and "next_cursor" in bad.json()["error"]["message"]
        assert http.get("/v1/jobs?state=lost", headers=auth["reader"]).status_code == 422
        assert http.get("/v1/jobs").status_code == 401
        sdk = RayTwinClient("http://testserver", auth["reader"]["Authorization"].removeprefix("Bearer "),
                            transport=http._transport)
        page = sdk.jobs(state="succeeded", limit=1)
        assert [j.job_id for j in page.jobs] == ["j3"]
        assert [j.job_id for j in sdk.jobs(state="succeeded", cursor=page.next_cursor).jobs] == ["j1"]


def test_a_page_of_jobs_and_their_counts_read_the_page_alone_not_every_job_the_service_ran(tmp_path):
    """The backend holds every job it ever ran: a page sorted all of them (about 50 ms at 100,000) and the gauges
    counted all of them after every change (as long). A page now reads its jobs from its cursor back until it has
    one more than `limit`; the counts are kept as jobs move, and match a count of the table."""
    jobs = [(f"j{i:03d}", "acme" if i % 3 else "globex", "failed" if i % 10 == 0 else "succeeded") for i in range(90)]
    queue = _recorded(tmp_path, jobs)
    queue.jobs = ReadJobs(queue.jobs)
    backend = ListingBackend(queue)
    first = asyncio.run(backend.list_jobs("acme", None, 2, None))
    assert [j.job_id for j in first.jobs] == ["j089", "j088"] and queue.jobs.reads == 3
    queue.jobs.reads = 0
    failed = asyncio.run(backend.list_jobs("acme", "failed", 2, first.next_cursor))
    assert [j.job_id for j in failed.jobs] == ["j080", "j070"]  # and j050, the one more, read from j087 back:
    assert queue.jobs.reads == sum(1 for i in range(50, 88) if i % 3)  # acme's, not globex's or older ones
    assert failed.next_cursor is not None
    queue.jobs.reads = 0
    assert queue.stats("acme") == {"states": {**dict.fromkeys(("queued", "running", "cancelled"), 0),
                                              "succeeded": 54, "failed": 6}} and queue.jobs.reads == 0

    async def moves() -> None:
        held = HeldJobs(queue)
        started, waiting, cancelled = (_submit(queue, "acme") for _ in range(3))
        queue.cancel("acme", cancelled, "key-acme")
        await held.finish(started)
        states = [job.state for job in dict.values(queue.jobs) if job.tenant == "acme"]
        assert queue.stats("acme")["states"] == {s: states.count(s) for s in queue.stats("acme")["states"]}
        assert (queue.stats("acme")["states"]["running"], queue.stats()["states"]["cancelled"]) == (1, 1)

    asyncio.run(moves())


def test_an_operator_lists_every_tenants_jobs_from_the_store(tmp_path):
    from raytwin.cli import app

    _recorded(tmp_path, JOBS)
    runner = CliRunner()
    out = runner.invoke(app, ["jobs", "list", "--store", str(tmp_path / "store")])
    assert out.exit_code == 0, out.output
    listed = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(j["job_id"], j["tenant"]) for j in listed] == [("j4", "acme"), ("j3", "acme"), ("g1", "globex"),
                                                            ("j2", "acme"), ("j1", "acme")]
    out = runner.invoke(app, ["jobs", "list", "--store", str(tmp_path / "store"), "--tenant", "acme", "--state",
                                   "succeeded", "--limit", "1"])
    assert [json.loads(line)["job_id"] for line in out.stdout.splitlines()] == ["j3"]
    assert "more with --limit" in out.stderr
    refused = runner.invoke(app, ["jobs", "list", "--store", str(tmp_path / "store"), "--state", "lost"])
    assert refused.exit_code == 2 and "one of queued, running" in refused.output


def test_jobs_list_of_a_path_that_holds_no_service_store_says_so_instead_of_listing_nothing(tmp_path):
    """`raytwin jobs list --store` with a mistyped path printed nothing and exited 0, as if the service had no jobs;
    a store the service runs on but that has no job yet (its twins' lease, no jobs/) still lists none, quietly."""
    from raytwin.cli import app

    runner = CliRunner()
    refused = runner.invoke(app, ["jobs", "list", "--store", str(tmp_path / "stor")])
    assert refused.exit_code == 2 and "no service store at" in refused.output and refused.stdout == "", refused.output
    (tmp_path / "store" / "twins").mkdir(parents=True)
    (tmp_path / "store" / "twins" / "lease.json").write_text("{}")
    listed = runner.invoke(app, ["jobs", "list", "--store", str(tmp_path / "store")])
    assert listed.exit_code == 0 and listed.output == "", listed.output


def test_finished_jobs_past_the_retention_leave_memory_store_and_listings_and_a_restart_reads_only_the_kept(tmp_path):
    """Job records were never removed: a restarted backend read every job ever written and held them all. A
    retention pass removes finished jobs older than `job_retention_s`, oldest first and at most `limit` a pass, from
    the store (their folder, result files too) and the backend's table; queued, running and recent ones stay."""
    from tests.fixtures_serve import in_process

    config = ServeConfig(store_url=str(tmp_path / "store"), keys_file="unused.json", job_retention_s=86_400)
    now = datetime.now(UTC)
    writer = JobQueue(config, 1)
    for job_id, tenant, state, age in [("old1", "acme", "succeeded", timedelta(days=3)),
                                       ("old2", "acme", "failed", timedelta(days=2)),
                                       ("old3", "globex", "cancelled", timedelta(days=2)),
                                       ("recent", "acme", "succeeded", timedelta(hours=1))]:
        writer._save(JobRecord(job_id=job_id, kind="scenario", tenant=tenant, key_id="k", asset_id="zone-1",
                               model_ref="thermal_rc@1.0.0", content_hash="h", scenarios=1, n_steps=10, state=state,
                               submitted=now - age - timedelta(minutes=1), finished=now - age))
    results = tmp_path / "store" / "jobs" / "acme" / "old1" / "results"  # a scenario job's result files
    results.mkdir()
    (results / "part-0.parquet").write_bytes(b"p")
    queue = JobQueue(config, 1)
    backend = ListingBackend(queue)

    async def scenario() -> tuple[str, str]:
        HeldJobs(queue)
        running, queued = _submit(queue, "acme"), _submit(queue, "acme")
        assert _states(queue, running, queued) == ["running", "queued"]
        assert await queue.expire(limit=1) == 1  # bounded: the oldest first
        assert "old1" not in queue.jobs and not (tmp_path / "store" / "jobs" / "acme" / "old1").exists()
        assert await queue.expire() == 2
        assert await queue.expire(now=now + timedelta(hours=2)) == 0  # recent: 3 h old < 1 day
        kept = {"recent", running, queued}
        assert set(queue.jobs) == kept
        listed = await backend.list_jobs("acme", None, 100, None)
        assert {j.job_id for j in listed.jobs} == kept and await backend.list_jobs("globex", None, 100, None) == \
            type(listed)(jobs=[], next_cursor=None)
        assert queue.stats()["states"] == {"queued": 1, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 0}
        return running, queued

    running, queued = asyncio.run(scenario())
    stored = {p.parent.name for p in (tmp_path / "store" / "jobs").glob("*/*/job.json")}
    assert stored == {"recent", running, queued}
    restarted = JobQueue(config, 1)  # reads the kept records only (its running and queued ones: failed, as before)
    assert set(restarted.jobs) == stored and restarted.ended[-1][1] in (running, queued)
    with in_process(ListingBackend(restarted), tmp_path) as (http, auth, _):
        removed, never = (http.get(f"/v1/jobs/{j}", headers=auth["reader"]) for j in ("old2", "nope"))
        assert removed.status_code == never.status_code == 404 and removed.json()["error"]["code"] == "not_found"
        assert "removed 1 days after it finished (job_retention_s)" in removed.json()["error"]["message"]
        assert http.get("/v1/jobs/recent", headers=auth["reader"]).status_code == 200


def test_job_retention_keeps_every_job_when_unset_and_defaults_to_the_change_logs(tmp_path):
    config = ServeConfig(store_url=str(tmp_path), keys_file="unused.json")
    assert config.job_retention_s == config.change_retention_s == 30 * 86_400
    queue = _recorded(tmp_path, JOBS)
    queue.config = ServeConfig(store_url=str(tmp_path / "store"), keys_file="unused.json", job_retention_s=None)
    assert asyncio.run(queue.expire(now=datetime(2100, 1, 1, tzinfo=UTC))) == 0 and len(queue.jobs) == len(JOBS)


def test_the_backend_applies_job_retention_by_itself_once_a_job_call_started_its_passes(tmp_path, monkeypatch):
    monkeypatch.setattr("serve_apps.jobs.RETENTION_PASS_S", 0.01)
    queue = _recorded(tmp_path, JOBS)  # finished at their submission (no `finished`): a day or more ago
    queue.config = queue.config.model_copy(update={"job_retention_s": 3600})

    async def scenario() -> None:
        await ListingBackend(queue).job_stats()
        deadline = time.monotonic() + 60  # its removal runs on a thread: seconds late on a loaded machine
        while queue.jobs:
            assert time.monotonic() < deadline, f"no retention pass removed jobs {sorted(queue.jobs)} in 60 s"
            await asyncio.sleep(0.01)
        assert not queue.jobs and not list((tmp_path / "store" / "jobs").glob("*/*/job.json"))
        assert not queue._expiry.done()  # it goes on

    asyncio.run(scenario())
