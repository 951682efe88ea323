"""Asynchronous what-if jobs: a FIFO queue in the backend replica, the work in Ray tasks.

A job is a single scenario (`PreparedScenario`, run by `scenario_to_store`) or a sweep
(`SweepSpec`, run by `sweep_to_store` as a recorded `sweeps` run; `FmuSweepSpec` for an asset
whose simulator is an FMU, run by `fmu_sweep_to_store`), or a bulk operation on assets by filter
(`serve_apps.bulk.BulkWork`, which runs in the backend itself: it writes the catalog). Results are Parquet files on
the store, so they outlive replicas. At most `max_concurrent_jobs` run at once, at most
`max_running_jobs_per_tenant` of one tenant's; the rest wait ("queued"), each tenant's in order, tenants taking turns
for free slots (`serve_apps.job_scheduling`), and a queued job's status says why it waits (`queue`). Job records are JSON on the store (``{store}/jobs/{tenant}/{job_id}/job.json``):
a job that was queued or running when the backend restarted is marked failed, not silently lost (its `job.failed`
change is recorded by the backend's catch-up, `serve_apps.backend.Backend._catch_up_jobs`). Every job that ends,
cancelled while queued too, is told to `on_finish` (the backend records its change). Once another service took the
store over (`JobQueue.fence`), the queue saves no job's end and starts no queued job: that service's start failed them
in their records, and its catch-up records their change. A job's end is claimed once, by an exclusive create of
``end.json`` (the ended record) before ``job.json`` is replaced (`JobQueue._save`), and a reader takes that claim over
``job.json`` (`read_records`): of two services ending one job (a takeover between a fenced one's lease read and its
write) the first ends it and the other's end is refused, and no later write of a running or queued record (a fenced
service starting a job) shows a job running again after it ended.

Retention (`ServeConfig.job_retention_s`, 30 days by default): a pass every `RETENTION_PASS_S` (`JobQueue.expire`)
removes up to `RETENTION_BATCH` jobs that finished longer ago than that, oldest first, from the store (the job's
folder: its record, a scenario's result files, a bulk job's report) and then from the backend's table, so a restarted
backend reads only the kept ones; a queued or running job is never removed. Nothing else points into a job's folder:
a sweep's outputs are its run record's (kept by the lifecycle policy's `keep_runs`), and the audit log and change log
name jobs by id only. A removed job answers 404, as one that never existed: the backend keeps nothing of it. Each pass
logs `event=job_retention` with its counts; like the change log's retention, a system removal, it is not audited.

A sweep job names its run when it starts (`JobRecord.planned_run_id`, passed to the task): its `run_id` links
the run record whenever the run left one, succeeded, failed or cancelled (``GET /v1/runs/{run_id}`` says
how it ended), and stays null only for a job whose run never began (cancelled while queued).

A record (`JobRecord`) says where its results lie in the store configured now (`JobRecord.results_root`: a
sweep's beside its run record, ``{store}/runs/{tenant}/{run_id}/output``; a scenario's in
``{store}/jobs/{tenant}/{job_id}/results``), not where it wrote them (its `result_url`), so a store moved or
restored elsewhere still reads; its status as the API answers it
(`Job`) names them by API paths only, and a job that failed on an unexpected error says so without
the error's text (which may name store paths): the cause is in the log, under the job id.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import ray
from pydantic import ConfigDict, Field

from raytwin import metrics
from raytwin.contracts import StartedFrom
from raytwin.statestore import FenceCheck, StoreFenced, fenced
from raytwin.storage import filesystem, replace_file, write_once
from raytwin.store_failures import store_io
from serve_apps.bulk import BulkWork
from serve_apps.config import ServeConfig
from fsspec import AbstractFileSystem

from serve_apps.errors import ApiError, Conflict, Gone, NotFound, removed_from_store, unwrap
from serve_apps.job_scheduling import QueueWait, TenantQueues, queue_wait
from serve_apps.query_schemas import BulkProgress
from serve_apps.schemas import START_TIME_USED, ResultFile
from serve_apps.scenarios import PreparedScenario, fmu_sweep_to_store, scenario_to_store, sweep_to_store
from serve_apps.unawaited import orphan
from sweeps.fmu import FmuSweepSpec
from sweeps.runs import RunStore, new_run_id
from sweeps.spec import SweepSpec

log = logging.getLogger("raytwin.serve.jobs")

RESULTS = "results"
"""A scenario job's folder of result files, in its job's folder."""
RETENTION_PASS_S = 600.0
"""How often the backend applies `job_retention_s` (`JobQueue.expire_periodically`)."""
RETENTION_BATCH = 1000
"""Most jobs one retention pass removes, so that a pass's store deletes stay bounded; a backlog (a retention
shortened, a store never pruned) goes over several passes, `RETENTION_BACKLOG_S` apart."""
RETENTION_BACKLOG_S = 1.0
"""The pause before the next pass when one removed `RETENTION_BATCH` jobs (more may be due)."""

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
END_FILE = "end.json"
"""A job's ended record beside its ``job.json``, created once (`JobQueue._save`): the claim of its end."""


class _JobFields(StartedFrom):
    model_config = ConfigDict(extra="forbid")
    job_id: str
    kind: Literal["scenario", "sweep", "bulk"]
    tenant: str
    key_id: str
    asset_id: str
    model_ref: str
    content_hash: str
    scenarios: int
    n_steps: int
    start_time: datetime | None = Field(None, description=f"scenario and sweep jobs: {START_TIME_USED}")
    state: JobState = "queued"
    submitted: datetime
    started: datetime | None = None
    finished: datetime | None = None
    error: str | None = None
    run_id: str | None = Field(None, description=(
        "sweeps: the run record (`GET /v1/runs/{run_id}`; `raytwin rerun RUN_ID`) once the run ended, succeeded, "
        "failed or cancelled; null: none (yet) - a job queued or running, one whose run never began (cancelled "
        "while queued), or a scenario or bulk job"))
    compute_s: float | None = None
    quantiles: list[dict[str, Any]] = Field(default_factory=list)
    bulk: BulkProgress | None = Field(None, description="bulk jobs: items done so far, by outcome")


class Job(_JobFields):
    """A job's status as the API answers it: its results by API path, never by store location."""

    results_url: str | None = Field(None, description="scenario and sweep jobs: quantiles and rows once it "
                                    "succeeded (409 before); its Parquet files at `/v1/jobs/{job_id}/files`")
    report_url: str | None = Field(None, description="bulk jobs: each item's outcome once it succeeded (409 before)")
    queue: QueueWait | None = Field(None, description="a queued job: its place and what it waits for")
    results_removed: bool | None = Field(None, description=(
        "a succeeded scenario or sweep job: true once its result files are no longer in the store (retention removed "
        "its run: the lifecycle policy's keep_runs, POST /v1/models/{model}/prune; or an operator did), when its "
        "results and files answer 410; null for other jobs and in listings (`GET /v1/jobs` reads no store)"))


class JobRecord(_JobFields):
    """A job as the queue keeps it (``job.json``): its status, where it wrote its results (`result_url`, for
    operators: the routes read them where the store configured now keeps them, `results_root`; `status` leaves it
    out), and the id a sweep's run records itself under (`planned_run_id`: published as `run_id` once that record
    exists)."""

    result_url: str | None = None
    planned_run_id: str | None = None
    outputs: dict[str, str] = Field(default_factory=dict, description=(
        "result file name -> SHA-256 as the job wrote it (a sweep's as its run record holds them), sent with each "
        "download; empty in records from before it was kept"))

    @property
    def ended_at(self) -> tuple[datetime, str]:
        """Its place among finished jobs, oldest first, for retention: its finish time (its submission time in a
        record without one), then its id."""
        return self.finished or self.submitted, self.job_id

    @property
    def listed_at(self) -> tuple[datetime, str]:
        """Its place in a listing of jobs (`serve_apps.job_listing`): its submission time, then its id."""
        return self.submitted, self.job_id

    def status(self, queue: QueueWait | None = None) -> Job:
        """What `GET /v1/jobs/{job_id}` answers (`queue`: why it waits, while queued)."""
        path = f"/v1/jobs/{self.job_id}"
        links = {"report_url": f"{path}/report"} if self.kind == "bulk" else {"results_url": f"{path}/results"}
        return Job(**self.model_dump(exclude={"result_url", "planned_run_id", "outputs"}), **links, queue=queue)

    def results_root(self, config: ServeConfig) -> str | None:
        """Where its result files lie in the store `config` names: a sweep's beside its run record in the tenant's
        runs root, a scenario's in the job's ``results`` folder (`scenario_results`); None for a bulk job (a report,
        no result files) and a sweep that recorded no run. Derived, not the recorded `result_url`: that is where the
        job wrote, gone once the store was moved or restored elsewhere, and a path read from a stored record is
        needless trust."""
        if self.kind == "sweep":
            runs = RunStore(config.url("runs", self.tenant), config.storage_options or None)
            return runs.output_url(self.run_id) if self.run_id else None
        return self.scenario_results(config) if self.kind == "scenario" else None

    def scenario_results(self, config: ServeConfig) -> str:
        """A scenario job's `results_root`, never None: the job's ``results`` folder in the store `config` names,
        where its task writes (`scenario_to_store`) and its results are read."""
        return config.url("jobs", self.tenant, self.job_id, RESULTS)

    def stored_status(self, config: ServeConfig) -> Job:
        """`status` of a succeeded job, saying whether its result files are still in the store (`results_removed`)."""
        status = self.status()
        if self.results_root(config):
            status.results_removed = self.results_removed(self.result_files(config))
        return status

    @store_io("read")
    def result_files(self, config: ServeConfig) -> list[ResultFile]:
        """Its Parquet files in the store (`results_root`), with the SHA-256 it recorded for each (None where it
        kept none); none once they were removed."""
        fs, root = filesystem(self.results_root(config), config.storage_options)
        fs.invalidate_cache(root)  # an object store's cached listing would still show files another process removed
        try:
            found = sorted(fs.ls(root, detail=True), key=lambda i: i["name"])
        except FileNotFoundError:  # the folder went with its run (`raytwin.lifecycle.prune`)
            return []
        names = ((info["name"].rsplit("/", 1)[-1], info["size"]) for info in found
                 if info["name"].endswith(".parquet"))
        return [ResultFile(name=name, size=size, sha256=self.outputs.get(name)) for name, size in names]

    def results_removed(self, files: list[ResultFile]) -> bool:
        """Whether `files` (`result_files`) lack what it wrote: all of them, or one it recorded."""
        listed = {f.name for f in files}
        return not listed or any(n not in listed for n in self.outputs if "/" not in n and n.endswith(".parquet"))

    def removed(self) -> Gone:
        """The 410 its results and files answer once `results_removed`, saying what to do."""
        if self.kind == "sweep":
            lost = (f"retention removes a sweep's output with its run record ({self.run_id}: GET /v1/runs/"
                    f"{self.run_id} answers 404 then); " if self.run_id else "")
            remedy = f"{lost}submit the sweep again (POST /v1/sweeps) to compute them anew"
        else:
            remedy = "run the scenario again (POST /v1/scenarios) to compute them anew"
        return removed_from_store(f"job {self.job_id}'s result files are", remedy)


def read_records(fs: AbstractFileSystem, root: str) -> Iterator[JobRecord]:
    """Every job record stored under `root` (a store's ``jobs`` folder: ``{tenant}/{job_id}/job.json``), in no
    order: what a restarted backend recovers, and what `raytwin jobs list` lists. A job's claimed end (`END_FILE`) is
    its record where there is one: ``job.json`` may say running after it (a fenced service's start landed late)."""
    with store_io("read"):  # (a generator: its body, not its call, reads)
        if not fs.exists(root):
            return
        ended = {path.rsplit("/", 1)[0] for path in fs.glob(f"{root}/*/*/{END_FILE}")}
        for path in fs.glob(f"{root}/*/*/job.json"):
            folder = path.rsplit("/", 1)[0]
            yield JobRecord.model_validate_json(fs.cat_file(f"{folder}/{END_FILE}" if folder in ended else path))


Work = PreparedScenario | SweepSpec | FmuSweepSpec | BulkWork


class JobQueue:
    """The job table and the tenants' queues (lives in the `Backend` replica; methods run on its event loop)."""

    def __init__(self, config: ServeConfig, max_concurrent: int,
                 on_finish: Callable[[JobRecord], None] | None = None, tenant_limit: int | None = None,
                 fence: FenceCheck | None = None):
        """`fence`: raises `StoreFenced` once another service took the store over (`Backend.check_writable`, which
        reads the store's lease now when called with `fresh=True`); the queue then saves no job's end and
        starts no queued job (`_fenced`)."""
        self.config = config
        self.on_finish = on_finish
        self.fence = fence
        self.fs, self.root = filesystem(config.url("jobs"), config.storage_options)
        self.max_concurrent = max_concurrent
        self.tenant_limit = min(max_concurrent, tenant_limit or config.max_running_jobs_per_tenant or max_concurrent)
        self.jobs: dict[str, JobRecord] = {}
        self.listed: dict[str, list[tuple[datetime, str]]] = {}  # tenant -> its jobs' `listed_at`, ascending
        self.counts: Counter[tuple[str, str]] = Counter()  # (tenant, state) -> jobs
        self.pending: TenantQueues[Work] = TenantQueues()
        self.running = 0
        self.running_by: Counter[str] = Counter()  # running jobs per tenant
        self.tasks: dict[str, Awaitable[dict[str, Any]]] = {}  # running scenario and sweep jobs' Ray tasks
        self.cancelled: dict[str, str] = {}  # running jobs being cancelled -> by which key
        self.ended: list[tuple[datetime, str]] = []  # finished jobs' `ended_at`, ascending: what retention removes
        self._expiry: asyncio.Task[None] | None = None
        self._recover()
        self._publish()

    def _recover(self) -> None:
        """Fail the jobs left queued or running; one whose end another service claimed meanwhile (a fenced one, in the
        takeover window) ended as that claim says."""
        for job in read_records(self.fs, self.root):
            if job.state in ("queued", "running"):
                job = job.model_copy(update={"state": "failed", "finished": datetime.now(UTC),
                                             "error": "the job service restarted before this job finished; resubmit"})
                self._link_run(job)
                if not self._save(job):
                    job = JobRecord.model_validate_json(self.fs.cat_file(f"{self._dir(job)}/{END_FILE}"))
            self._add(job)

    def _add(self, job: JobRecord) -> None:
        """Hold a new job in the table, its listing and its state's count."""
        self.jobs[job.job_id] = job
        insort(self.listed.setdefault(job.tenant, []), job.listed_at)
        self.counts[(job.tenant, job.state)] += 1
        if job.state in FINISHED:
            insort(self.ended, job.ended_at)

    def _moved(self, job: JobRecord, before: str) -> None:
        """Count `job` in its state now, no longer in the state it was in `before` (a finished one: retention's)."""
        self.counts[(job.tenant, before)] -= 1
        self.counts[(job.tenant, job.state)] += 1
        if job.state in FINISHED:
            insort(self.ended, job.ended_at)

    def _forget(self, job: JobRecord) -> None:
        """Drop a finished job from the table, its listing, its state's count and retention's order (`_add` undone)."""
        del self.jobs[job.job_id]
        listed = self.listed[job.tenant]
        del listed[bisect_left(listed, job.listed_at)]
        if not listed:
            del self.listed[job.tenant]
        self.counts[(job.tenant, job.state)] -= 1
        del self.ended[bisect_left(self.ended, job.ended_at)]

    def expire_periodically(self) -> None:
        """Start the retention passes on the running event loop (the replica's, which owns the table) unless they
        run already: every `RETENTION_PASS_S` from then (sooner while a backlog lasts: `RETENTION_BACKLOG_S`)."""
        if self._expiry is None or self._expiry.done():
            self._expiry = asyncio.get_running_loop().create_task(self._expire_every())
            orphan(self._expiry, "job retention", logging.ERROR)

    async def _expire_every(self) -> None:
        pause = RETENTION_PASS_S
        while True:
            await asyncio.sleep(pause)
            try:
                removed = await self.expire()
            except Exception:  # noqa: BLE001 - the jobs stay until the next pass; the queue goes on
                log.warning("event=job_retention_failed", exc_info=True)
                removed = 0
            pause = RETENTION_BACKLOG_S if removed >= RETENTION_BATCH else RETENTION_PASS_S

    async def expire(self, now: datetime | None = None, limit: int = RETENTION_BATCH) -> int:
        """One retention pass: remove up to `limit` jobs that finished more than `job_retention_s` before `now`,
        oldest first, from the store (off the event loop) and then from memory; the number removed. A job whose
        folder the store would not remove stays, for the next pass. One pass at a time (`expire_periodically`'s)."""
        retention_s = self.config.job_retention_s
        if retention_s is None:
            return 0
        cut = (now or datetime.now(UTC)) - timedelta(seconds=retention_s)
        due = [self.jobs[job_id] for finished, job_id in self.ended[:limit] if finished < cut]
        removed = await asyncio.to_thread(self._remove_stored, due)
        for job in removed:
            self._forget(job)
        if due:
            self._publish()
        log.info("event=job_retention removed=%d failed=%d kept=%d jobs=%d retention_s=%.0f", len(removed),
                 len(due) - len(removed), len(self.ended), len(self.jobs), retention_s)
        return len(removed)

    def _remove_stored(self, jobs: list[JobRecord]) -> list[JobRecord]:
        """Remove each job's folder from the store, in order, until one fails (the store down: logged once, the
        rest wait for the next pass): those gone now (already gone too)."""
        removed = []
        for job in jobs:
            try:
                with store_io("write"):
                    self.fs.rm(self._dir(job), recursive=True)
            except FileNotFoundError:
                pass
            except Exception:  # noqa: BLE001 - retention waits for the next pass; the queue goes on
                log.warning("event=job_retention_failed job_id=%s tenant=%s", job.job_id, job.tenant, exc_info=True)
                break
            removed.append(job)
        return removed

    def _dir(self, job: JobRecord) -> str:
        return f"{self.root}/{job.tenant}/{job.job_id}"

    def _link_run(self, job: JobRecord) -> None:
        """Name the run record of a sweep job that ended without its task's answer (failed, cancelled, lost with a
        restart): its run recorded itself under the planned id if it began, else it has none (`run_id` null)."""
        if job.run_id is not None or job.planned_run_id is None:
            return
        try:
            if RunStore(self.config.url("runs", job.tenant), self.config.storage_options or None).exists(
                    job.planned_run_id):
                job.run_id = job.planned_run_id
        except Exception:  # the job's own outcome must still be recorded
            log.exception("event=job_run_unknown job_id=%s run_id=%s", job.job_id, job.planned_run_id)

    def _save(self, job: JobRecord) -> bool:
        """Write the job's record; an ended one claims the job's end first (`END_FILE`, an exclusive create): False,
        and nothing written, where another end holds it (another service's, which ended the job first)."""
        data = job.model_dump_json(indent=2).encode()
        if job.state in FINISHED:
            try:
                write_once(self.fs, f"{self._dir(job)}/{END_FILE}", data)
            except FileExistsError:
                return False
        replace_file(self.fs, f"{self._dir(job)}/job.json", data)
        return True

    def submit(self, tenant: str, key_id: str, asset_id: str, model_ref: str, content_hash: str, work: Work,
               start_time: datetime | None = None, start: StartedFrom = StartedFrom()) -> Job:
        """Queue a scenario or sweep (`start_time`: the clock it runs on, `start`: the live state it starts from,
        both echoed with its results)."""
        sweep = isinstance(work, SweepSpec | FmuSweepSpec)
        job = JobRecord(job_id=uuid.uuid4().hex, kind="sweep" if sweep else "scenario", tenant=tenant,
                        key_id=key_id, asset_id=asset_id, model_ref=model_ref, content_hash=content_hash,
                        scenarios=work.space.size if sweep else 1, n_steps=work.n_steps, start_time=start_time,
                        submitted=datetime.now(UTC), **start.model_dump())
        log.info("event=job_queued job_id=%s kind=%s tenant=%s scenarios=%d steps=%d", job.job_id, job.kind, tenant,
                 job.scenarios, job.n_steps)
        return self._enqueue(job, work)

    def submit_bulk(self, work: BulkWork) -> Job:
        """Queue a bulk operation (after the jobs queued before it) as job `work.job_id` (its submission's audit
        record named it first)."""
        c = work.caller
        job = JobRecord(job_id=work.job_id, kind="bulk", tenant=c.tenant, key_id=c.key_id, asset_id="",
                        model_ref="", content_hash="", scenarios=0, n_steps=0, submitted=datetime.now(UTC),
                        bulk=BulkProgress(total=len(work.asset_ids)))
        log.info("event=job_queued job_id=%s kind=bulk action=%s tenant=%s items=%d", job.job_id,
                 work.request.action, c.tenant, len(work.asset_ids))
        return self._enqueue(job, work)

    def _enqueue(self, job: JobRecord, work: Work) -> Job:
        self._add(job)
        self._save(job)
        self.pending.push(job.tenant, job.job_id, work)
        self._publish()
        self._start_next()
        return self.status(job)

    def write_file(self, job: JobRecord, name: str, data: bytes) -> str:
        """Store a file of the job next to its record; its URL."""
        path = f"{self._dir(job)}/{name}"
        replace_file(self.fs, path, data)
        return self.fs.unstrip_protocol(path)

    def _launch(self, job: JobRecord, work: Work) -> Awaitable[dict[str, Any]]:
        if isinstance(work, BulkWork):
            return asyncio.ensure_future(work.run(job, self._save, self.write_file))
        if isinstance(work, SweepSpec | FmuSweepSpec):
            task = sweep_to_store if isinstance(work, SweepSpec) else fmu_sweep_to_store
            return task.remote(work, self.config.url("runs", job.tenant), self.config.storage_options,
                               job.key_id, job.planned_run_id)
        return scenario_to_store.remote(work, job.scenario_results(self.config), self.config.storage_options)

    def _fenced(self, now: bool = False) -> bool:
        """Whether another service took the store over (`fence`, `raytwin.statestore.fenced`): that service's
        start failed the jobs queued or running here (their records say so) and its catch-up records their change, so
        a job ending here saves nothing over that record, and no queued job starts. `now`: from a read of the lease
        made now, for a job's end, which replaces its record for good: `fence`'s verdict, up to a second old
        (`serve_apps.backend.FENCE_CHECK_S`), let a job that ended within a second of a takeover save its end over
        the successor's record of it."""
        return fenced(self.fence, fresh=now)

    def _start_next(self) -> None:
        while self.running < self.max_concurrent and not self._fenced():
            chosen = self.pending.pop_next(self.running_by, self.tenant_limit)
            if chosen is None:  # nothing queued, or only jobs of tenants at their limit
                break
            tenant, job_id, work = chosen
            job = self.jobs[job_id]
            job.state, job.started = "running", datetime.now(UTC)
            self._moved(job, "queued")
            if job.kind == "sweep":  # named now, so that a run cancelled or failed can be linked (`_link_run`)
                job.planned_run_id = new_run_id("sweep")
            self._save(job)
            self.running += 1
            self.running_by[tenant] += 1
            log.info("event=job_started job_id=%s kind=%s tenant=%s key_id=%s running=%d tenant_running=%d",
                     job_id, job.kind, tenant, job.key_id, self.running, self.running_by[tenant])
            ref = self._launch(job, work)
            if not isinstance(work, BulkWork):
                self.tasks[job_id] = ref
            # nobody awaits the watch: its own failure (the store refusing the job's record) is logged, not lost
            orphan(asyncio.get_running_loop().create_task(self._watch(job, ref)), f"watch of job {job_id}",
                   logging.ERROR)
        self._publish()

    async def _watch(self, job: JobRecord, ref: Awaitable[dict[str, Any]]) -> None:
        try:
            out = await ref
            job.state, job.quantiles, job.compute_s = "succeeded", out["quantiles"], out["compute_s"]
            job.result_url, job.run_id, job.outputs = out["result_url"], out["run_id"], out.get("outputs", {})
        except Exception as exc:  # a failed task fails its job, never the service
            err = unwrap(exc)
            if isinstance(err, ApiError):
                reason = f"{err.code}: {err.message}"
            else:  # as for a request: the text (store paths, internals) is the operators', in the log
                log.error("event=job_error job_id=%s tenant=%s", job.job_id, job.tenant, exc_info=err)
                reason = f"internal error ({type(err).__name__}); quote the job_id when reporting it"
            job.state, job.error = "failed", reason.splitlines()[0][:500]
            self._link_run(job)
        if (by := self.cancelled.pop(job.job_id, None)) is not None and job.state != "succeeded":
            job.state, job.error = "cancelled", f"cancelled by key {by}"  # its partial results are not its results
            if job.kind == "sweep" and job.run_id is None:
                job.error += " before its run began, so it has no run record"
        elif by is not None:  # it finished before the interrupt reached it: its results (and run record) stand
            log.info("event=job_cancel_late job_id=%s key_id=%s", job.job_id, by)
        self.tasks.pop(job.job_id, None)
        job.finished = datetime.now(UTC)
        self._moved(job, "running")
        self.running -= 1
        self.running_by[job.tenant] -= 1
        saved = not self._fenced(now=True) and self._save(job)
        if not saved:  # nor is its change recorded: it would describe an end the job's record does not have
            log.warning("event=job_record_held job_id=%s state=%s: this service no longer holds its store; the "
                        "record there is its successor's", job.job_id, job.state)
        self._publish()
        log.info("event=job_%s job_id=%s compute_s=%s error=%s result_url=%s", job.state, job.job_id, job.compute_s,
                 job.error, job.result_url)
        if saved:
            self._notify(job)
        self._start_next()

    def _notify(self, job: JobRecord) -> None:
        """`on_finish` of a job that ended (the backend records its change), a failure logged: it must not stop the
        queue."""
        if self.on_finish is not None:
            try:
                self.on_finish(job)
            except Exception:
                log.exception("event=job_notify_failed job_id=%s", job.job_id)

    def cancel(self, tenant: str, job_id: str, key_id: str) -> Job:
        """Cancel the tenant's queued or running scenario or sweep job: a queued one leaves the queue, a
        running one's task is interrupted (a sweep records its run as cancelled and stops its chunk tasks; one
        that finished before the interrupt reached it stays succeeded, its run record too);
        409 for a finished or bulk job (bulk items are applied one by one: its report says which)."""
        job = self.jobs.get(job_id)
        if job is None or job.tenant != tenant:
            raise self._not_found(job_id)
        if job.state not in ("queued", "running") or job.job_id in self.cancelled:
            raise Conflict(f"job {job_id} is {'being cancelled' if job.job_id in self.cancelled else job.state}: "
                           "only a queued or running job can be cancelled")
        if job.kind == "bulk":
            raise Conflict(f"job {job_id} is a bulk job: it runs to its end (its items are applied one by one, "
                           "and its report says which)")
        log.info("event=job_cancel job_id=%s tenant=%s key_id=%s state=%s", job_id, tenant, key_id, job.state)
        if job.state == "queued":  # saved before memory moves: a refused save (StoreFenced, the store failing)
            # leaves the job queued here, as the successor's record does not say cancelled
            ended = job.model_copy(update={"state": "cancelled", "finished": datetime.now(UTC), "error": (
                f"cancelled by key {key_id} while queued: it never ran, so it has no run record")})
            if not self._save(ended):
                raise StoreFenced(f"job {job_id} was ended by the service that took the store over: this service "
                                  "cancels none of its jobs; send the request to that service")
            self.pending.remove(tenant, job_id)
            job.state, job.finished, job.error = ended.state, ended.finished, ended.error
            self._moved(job, "queued")
            self._publish()
            self._notify(job)
            return self.status(job)
        self.cancelled[job_id] = key_id
        ray.cancel(self.tasks[job_id])  # an interrupt in the task: a sweep stops its chunks and records itself
        return self.status(job)

    def _not_found(self, job_id: str) -> NotFound:
        """404 for a job the tenant has not (another tenant's, one never submitted, or one retention removed)."""
        kept = self.config.job_retention_s
        after = "" if kept is None else f"; a finished job is removed {kept / 86_400:g} days after it finished " \
            "(job_retention_s)"
        return NotFound(f"job {job_id} not found{after}")

    def get(self, tenant: str, job_id: str) -> JobRecord:
        """The tenant's job record (with its store location: answer `status()` to clients)."""
        job = self.jobs.get(job_id)
        if job is None or job.tenant != tenant:
            raise self._not_found(job_id)
        return job.model_copy()

    def status(self, job: JobRecord) -> Job:
        """The job's status as answered, with why it waits while queued."""
        position = self.pending.position(job.tenant, job.job_id) if job.state == "queued" else None
        if position is None:
            return job.status()
        return job.status(queue_wait(position, self.running_by[job.tenant], self.tenant_limit, self.running,
                                     self.max_concurrent))

    def stats(self, tenant: str | None = None) -> dict[str, Any]:
        """Jobs by state (of `tenant`; None: of every tenant), from the counts kept as jobs move: after every change
        (`_publish`), counting every job the service ever ran took about 50 ms at 100,000."""
        states = dict.fromkeys(JOB_STATES, 0)
        for (of, state), n in self.counts.items():
            if tenant is None or of == tenant:
                states[state] += n
        return {"states": states}

    def _publish(self) -> None:
        """Jobs by state and the oldest queued job's submission time, after every change: this
        replica is the only one, so the gauges are the cluster's values."""
        for state, n in self.stats()["states"].items():
            metrics.JOBS.set(n, **self.config.service_tags(), state=state)
        oldest = min((self.jobs[job_id].submitted for job_id in self.pending.job_ids()), default=None)
        metrics.JOB_QUEUE_OLDEST.set(0.0 if oldest is None else oldest.timestamp(), **self.config.service_tags())
