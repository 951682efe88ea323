"""Asynchronous scenario jobs: a queue in one backend replica, the simulation in Ray tasks.

A job is a `PreparedBatch` (plain arrays) run by `simulate_to_store` as a Ray task with retries;
the task writes the per-scenario summary as Parquet next to the job record on the store, so a
result survives the replica and a retried task overwrites the same file. At most
`max_concurrent_jobs` run at once; the rest wait in FIFO order ("queued"). Job records are JSON
on the store (``{store}/jobs/{tenant}/{job_id}/job.json``): a job that was running when the
backend restarted is marked failed rather than silently lost.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow.parquet as pq
import ray
from pydantic import BaseModel, ConfigDict, Field

from raytwin.storage import filesystem
from serve_apps.errors import NotFound
from serve_apps.scenarios import PreparedBatch, quantiles, run_batch, summary_table

log = logging.getLogger("raytwin.serve.jobs")

JobState = Literal["queued", "running", "succeeded", "failed"]
JOB_STATES: tuple[str, ...] = ("queued", "running", "succeeded", "failed")


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str
    tenant: str
    key_id: str
    asset_id: str
    model_ref: str
    content_hash: str
    scenarios: int
    n_steps: int
    state: JobState = "queued"
    submitted: datetime
    started: datetime | None = None
    finished: datetime | None = None
    error: str | None = None
    result_path: str | None = None
    compute_s: float | None = None
    quantiles: dict[str, dict[str, float]] = Field(default_factory=dict)


@ray.remote(max_retries=2, retry_exceptions=False)
def simulate_to_store(batch: PreparedBatch, store_url: str, path: str, storage_options: dict[str, Any]) -> dict:
    """Run a batch and write its summary Parquet; returns quantiles and compute time."""
    t0 = time.perf_counter()
    table = summary_table(batch, run_batch(batch))
    seconds = time.perf_counter() - t0
    fs, _ = filesystem(store_url, storage_options)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, buf.getvalue())
    return {"quantiles": quantiles(table), "compute_s": seconds}


class JobQueue:
    """The job table and FIFO queue (lives in the `Backend` replica; methods run on its event loop)."""

    def __init__(self, store_url: str, storage_options: dict[str, Any], max_concurrent: int):
        self.store_url, self.storage_options = store_url, storage_options
        self.fs, root = filesystem(store_url, storage_options)
        self.root = f"{root}/jobs"
        self.max_concurrent = max_concurrent
        self.jobs: dict[str, Job] = {}
        self.pending: deque[tuple[str, PreparedBatch]] = deque()
        self.running = 0
        self._recover()

    def _recover(self) -> None:
        if not self.fs.exists(self.root):
            return
        for path in self.fs.glob(f"{self.root}/*/*/job.json"):
            job = Job.model_validate_json(self.fs.cat_file(path))
            if job.state in ("queued", "running"):
                job = job.model_copy(update={"state": "failed", "finished": datetime.now(UTC),
                                             "error": "the job service restarted before this job finished; resubmit"})
                self._save(job)
            self.jobs[job.job_id] = job

    def _dir(self, job: Job) -> str:
        return f"{self.root}/{job.tenant}/{job.job_id}"

    def _save(self, job: Job) -> None:
        self.fs.makedirs(self._dir(job), exist_ok=True)
        self.fs.pipe_file(f"{self._dir(job)}/job.json", job.model_dump_json(indent=2).encode())

    def submit(self, tenant: str, key_id: str, asset_id: str, batch: PreparedBatch) -> Job:
        job = Job(job_id=uuid.uuid4().hex, tenant=tenant, key_id=key_id, asset_id=asset_id,
                  model_ref=batch.model_ref, content_hash=batch.content_hash, scenarios=batch.size,
                  n_steps=batch.n_steps, submitted=datetime.now(UTC))
        job.result_path = f"{self._dir(job)}/results.parquet"
        self.jobs[job.job_id] = job
        self._save(job)
        self.pending.append((job.job_id, batch))
        log.info("event=job_queued job_id=%s tenant=%s scenarios=%d steps=%d", job.job_id, tenant, batch.size,
                 batch.n_steps)
        self._start_next()
        return job

    def _start_next(self) -> None:
        while self.pending and self.running < self.max_concurrent:
            job_id, batch = self.pending.popleft()
            job = self.jobs[job_id]
            job.state, job.started = "running", datetime.now(UTC)
            self._save(job)
            self.running += 1
            ref = simulate_to_store.remote(batch, self.store_url, job.result_path, self.storage_options)
            asyncio.get_running_loop().create_task(self._watch(job, ref))

    async def _watch(self, job: Job, ref: ray.ObjectRef) -> None:
        try:
            out = await ref
            job.state, job.quantiles, job.compute_s = "succeeded", out["quantiles"], out["compute_s"]
        except Exception as exc:  # a failed task fails its job, never the service
            job.state, job.error = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:500]}"
        job.finished = datetime.now(UTC)
        self.running -= 1
        self._save(job)
        log.info("event=job_%s job_id=%s compute_s=%s error=%s", job.state, job.job_id, job.compute_s, job.error)
        self._start_next()

    def get(self, tenant: str, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None or job.tenant != tenant:
            raise NotFound(f"job {job_id} not found")
        return job.model_copy()

    def stats(self) -> dict[str, Any]:
        """Jobs by state, and the scenario-steps and compute seconds of the succeeded ones."""
        states = dict.fromkeys(JOB_STATES, 0)
        steps, seconds = 0, 0.0
        for job in self.jobs.values():
            states[job.state] += 1
            if job.state == "succeeded":
                steps += job.scenarios * job.n_steps
                seconds += job.compute_s or 0.0
        return {"states": states, "steps": steps, "compute_s": seconds}
