"""Routes for what-if runs: single scenarios, sweeps, and the jobs that run the large ones."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from raytwin import metrics
from raytwin.contracts import Scenario, StartedFrom
from raytwin.provenance import code_version, package_versions
from raytwin.registry import ModelArtifact
from raytwin.sim import get_model
from raytwin.storage import file_sha256, filesystem
from raytwin.store_failures import store_io
from serve_apps.auth import Principal
from serve_apps.conditional import state_etag
from serve_apps.deps import FILE_DOWNLOAD, READER, SVC, WRITABLE, WRITER, Services
from serve_apps.downloads import file_response, file_responses
from serve_apps.errors import CONFLICT, Conflict, NoLiveState, NotFound, PayloadTooLarge, Unprocessable
from serve_apps.job_listing import JobPage
from serve_apps.jobs import Job, JobRecord, JobState
from serve_apps.shard_deadline import RETRY_AFTER_S, TwinUnavailable
from serve_apps.stream_auth import StreamCredential
from serve_apps.scenarios import AssetSweep, fmu_sweep_spec, is_fmu, prepare, run, sweep_spec, sweep_to_store
from serve_apps.schemas import JobAccepted, ResultFile, ScenarioRun, SweepResult
from sweeps.aggregate import open_dataset

Mode = Literal["auto", "sync", "async"]
MODE = Query("auto", description="sync: answer inline; async: return a job id; auto: sync when small.")
ROW_LIMIT = Annotated[int, Query(ge=0, le=10_000, description="Per-scenario rows to return.")]
PARQUET = "application/vnd.apache.parquet"


def register(app: FastAPI) -> None:
    tags = ["scenarios"]
    queued = {202: {"model": JobAccepted, "description": "Queued as a job: poll its status_url"}}

    @app.post("/v1/scenarios", response_model=ScenarioRun, tags=tags, responses=queued)
    async def run_scenario(body: Scenario, request: Request, mode: Mode = MODE, who: Principal = WRITER,
                           svc: Services = SVC) -> Any:
        """Run one what-if scenario from the twin's live (or past, or an explicit) state."""
        _bounded_work(svc, body.n_steps)
        artifact, live, clock, warnings, start = await _model_and_state(svc, who, body.asset_id,
                                                                        body.start_state == "live", body.start_time)
        prepared = prepare(body, artifact, live, clock)
        details = {"scenario": body.model_dump(mode="json"), **_provenance(artifact), **_warned(warnings)}
        if not _inline(svc, mode, prepared.n_steps):
            return await _queue(request, who, svc, "scenario", body.asset_id, artifact, prepared, clock, details,
                                start)
        async with svc.audited(request, who, "scenario.run", body.asset_id, **details):
            result = await run_in_threadpool(run, prepared)
        metrics.SCENARIO_STEPS.inc(prepared.n_steps, kind="scenario")
        model = get_model(prepared.simulator)
        return ScenarioRun(
            model_ref=artifact.ref, content_hash=artifact.content_hash, n_steps=prepared.n_steps,
            step_s=prepared.step_s, start_state=dict(zip(model.state_names, prepared.x0.tolist())), start_time=clock,
            times_s=(prepared.step_s * np.arange(prepared.n_steps + 1)).tolist(),
            states={n: result.states[:, j].tolist() for j, n in enumerate(model.state_names)},
            outputs={n: result.outputs[:, j].tolist() for j, n in enumerate(model.output_names)},
            warnings=warnings, **start.model_dump(),
        )

    @app.post("/v1/sweeps", response_model=SweepResult, tags=tags, responses=queued)
    async def run_sweep(body: AssetSweep, request: Request, mode: Mode = MODE, limit: ROW_LIMIT = 1000,
                        who: Principal = WRITER, svc: Services = SVC, _writable: None = WRITABLE) -> Any:
        """Sweep an asset's model over a scenario space (grid, random, Latin hypercube) with `sweeps`.

        Every sweep is a recorded run (`run_id`, reproducible with ``raytwin rerun``). An asset whose
        simulator is a stored FMU always runs as a job (202): its `inputs` and ``input`` dimensions
        name the FMU's inputs (held constant), and it has no sweep kit or trajectories.
        """
        if body.space.size > svc.config.max_sweep_scenarios:
            raise PayloadTooLarge(f"{body.space.size} scenarios exceed the limit of "
                                  f"{svc.config.max_sweep_scenarios} per sweep")
        _bounded_work(svc, body.work)
        artifact, live, clock, warnings, start = await _model_and_state(svc, who, body.asset_id,
                                                                        body.start_state == "live", body.start_time)
        registry_url = svc.config.url("registry", who.tenant)
        details = {"sweep": body.model_dump(mode="json"), **_provenance(artifact), **_warned(warnings)}
        if await run_in_threadpool(is_fmu, artifact):
            if mode == "sync":
                raise Unprocessable("an FMU sweep steps the FMU on Ray workers and always runs as a job; "
                                    "use mode=async or mode=auto")
            fmu_spec = await run_in_threadpool(fmu_sweep_spec, body, who.tenant, registry_url, artifact, live)
            return await _queue(request, who, svc, "sweep", body.asset_id, artifact, fmu_spec, clock, details, start)
        spec = await run_in_threadpool(sweep_spec, body, who.tenant, registry_url, artifact, live, clock)
        if not _inline(svc, mode, body.work):
            return await _queue(request, who, svc, "sweep", body.asset_id, artifact, spec, clock, details, start)
        async with svc.audited(request, who, "sweep.run", body.asset_id, **details) as outcome:
            out = await sweep_to_store.remote(spec, svc.config.url("runs", who.tenant), svc.config.storage_options,
                                              who.key_id)
            outcome["run_id"] = out["run_id"]
        rows = await run_in_threadpool(_read_rows, svc, out["result_url"], limit)
        return SweepResult(model_ref=artifact.ref, content_hash=artifact.content_hash, run_id=out["run_id"],
                           scenarios=body.space.size, n_steps=spec.n_steps, start_time=clock, rows=rows,
                           quantiles=out["quantiles"], warnings=warnings, **start.model_dump())

    @app.get("/v1/jobs", response_model=JobPage, tags=tags)
    async def list_jobs(state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                        cursor: Annotated[str | None, Query(max_length=512, description=(
                            "`next_cursor` of the previous page, unchanged"))] = None,
                        who: Principal = READER, svc: Services = SVC) -> JobPage:
        """The caller's tenant's jobs, newest first (by submission), a page at a time; a queued one says why it
        waits (`queue`). Jobs submitted after the first page are not on later pages: list again to see them."""
        return await svc.backend.call("list_jobs", who.tenant, state, limit, cursor)

    @app.get("/v1/jobs/{job_id}", response_model=Job, tags=tags)
    async def job_status(job_id: str, who: Principal = READER, svc: Services = SVC) -> Job:
        """The job's state, progress and results' API paths (never where the store keeps them); while it is
        queued, `queue` says its place among its tenant's queued jobs and what it waits for. 404 for a job
        that finished longer ago than the service's `job_retention_s` (30 days by default): retention removed it,
        and the service keeps nothing of it, as of a job that never was."""
        return await svc.backend.call("job_status", who.tenant, job_id)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=Job, tags=tags, responses=CONFLICT)
    async def cancel_job(job_id: str, request: Request, who: Principal = WRITER, svc: Services = SVC) -> Job:
        """Cancel a queued or running scenario or sweep job (409 once it finished, and for bulk jobs): a
        running sweep stops its chunk tasks and records its run as cancelled; the job's state becomes
        `cancelled` (at once for a queued job, when its task has stopped for a running one)."""
        async with svc.audited(request, who, "job.cancel", job_id) as outcome:
            job: Job = await svc.backend.call("cancel_job", who.tenant, job_id, who.key_id)
            outcome["state"] = job.state
        return job

    @app.get("/v1/jobs/{job_id}/results", response_model=SweepResult, tags=tags, responses=CONFLICT)
    async def job_results(job_id: str, limit: ROW_LIMIT = 1000, who: Principal = READER,
                          svc: Services = SVC) -> Any:
        """A finished job's quantiles and first `limit` per-scenario rows (409 until it succeeded; 410 once its
        result files are no longer in the store: retention removed its run)."""
        job, _ = await _stored(svc, who, job_id)
        try:
            rows = await run_in_threadpool(_read_rows, svc, job.results_root(svc.config), limit)
        except FileNotFoundError:  # removed since they were listed
            raise job.removed() from None
        return SweepResult(model_ref=job.model_ref, content_hash=job.content_hash, run_id=job.run_id,
                           scenarios=job.scenarios, n_steps=job.n_steps, start_time=job.start_time, rows=rows,
                           quantiles=job.quantiles, start_revision=job.start_revision, start_etag=job.start_etag)

    @app.get("/v1/jobs/{job_id}/files", response_model=list[ResultFile], tags=tags)
    async def job_files(job_id: str, who: Principal = READER, svc: Services = SVC) -> Any:
        """The job's Parquet files: ``part-*.parquet`` (per-scenario metrics), ``trajectories.parquet``, each with
        its size and the SHA-256 the job recorded as it wrote it (null for a job recorded before it kept them: a
        listing reads no file, and an old sweep's would read all of them); 410 once they are no longer in the store
        (retention removed its run)."""
        return (await _stored(svc, who, job_id))[1]

    @app.get("/v1/jobs/{job_id}/files/{name}", tags=tags, response_class=StreamingResponse,
             responses=file_responses({PARQUET}, "A Parquet file, as the job wrote it"))
    async def job_file(job_id: str, name: str, credential: StreamCredential = FILE_DOWNLOAD,
                       svc: Services = SVC) -> StreamingResponse:
        """Download one result file (streamed from the store), with the SHA-256 the job recorded when it wrote it
        (a job recorded before it kept them: computed from the stored file first). A key revoked meanwhile ends the
        download (the connection is cut; a new request gets the 401); 410 once the job's files are no longer in the
        store (retention removed its run)."""
        job, listed = await _stored(svc, credential.who, job_id)
        files = {f.name: f for f in listed}
        if name not in files:
            raise NotFound(f"job {job_id} has no file {name!r}; files: {sorted(files)}")
        fs, root = filesystem(job.results_root(svc.config), svc.config.storage_options)
        sha256 = files[name].sha256 or await run_in_threadpool(file_sha256, fs, f"{root}/{name}")
        return file_response(fs, f"{root}/{name}", sha256, PARQUET, f"{job_id}-{name}", credential, files[name].size)


class LiveStart(NamedTuple):
    """What a run starts from: the model the twin runs, the state (None: an explicit one), its clock, what the
    twin's filter says of a live state (`live_warnings`), and which state it is (its revision and ETag)."""

    artifact: ModelArtifact
    state: dict[str, float] | None
    clock: datetime | None
    warnings: list[str]
    start: StartedFrom


def live_warnings(asset_id: str, twin: dict[str, Any]) -> list[str]:
    """What a run from twin `asset_id`'s live state should be told: a latched drift alarm or a diverged estimate
    means its model no longer explains the asset, and a what-if or a set point computed from it looked exactly
    like one from a healthy twin."""
    d = twin.get("divergence") or {}
    out = []
    if d.get("drift"):
        out.append(f"twin {asset_id}'s drift alarm is latched (NIS mean {d.get('nis_mean')}): its model no longer "
                   "explains the asset's readings, so this run's predictions are suspect; recalibrate (or check the "
                   "sensors), then clear the drift")
    if d.get("diverged"):
        out.append(f"twin {asset_id}'s estimate diverged: the state this run starts from is not a trustworthy "
                   "estimate; give an explicit start_state")
    return out


async def _model_and_state(svc: Services, who: Principal, asset_id: str, live: bool, at: datetime | None
                           ) -> LiveStart:
    """The model the twin runs (at `at`, for a run from then) and, for runs from "live", the twin's state and
    its time (its last event's), where the run's clock signals start: a promotion or rollback swaps the twin's
    model, while the catalog's asset keeps its type version, and a state estimated by one model must not be
    propagated by another. A twin without events (by `at`) has only its prior: `NoLiveState` (409), not the prior
    stamped as the state now. From an explicit state, the model the twin runs now, and the clock starts at `at`
    (None: a Monday 00:00 UTC)."""
    twin = await svc.twins.state(who.tenant, asset_id, at if live else None)
    if live and twin.get("stale"):  # its last snapshot (or prior) would pass for the live state
        raise TwinUnavailable(f"the shard of twin {asset_id} is restarting or not answering, so its live state is "
                              f"not known (only its last snapshot, revision {twin['revision']}); retry after "
                              f"{RETRY_AFTER_S} s, or give an explicit start_state",
                              headers={"Retry-After": str(RETRY_AFTER_S)})
    artifact = await svc.backend.call("model_of", who.tenant, asset_id, twin["model_ref"])
    if not live:
        return LiveStart(artifact, None, at, [], StartedFrom())
    if not twin.get("event_time"):  # revision 0: the asset's initial_state, never estimated from telemetry
        by = f" by {at.isoformat()}" if at else " yet"
        raise NoLiveState(f"twin {asset_id} has applied no telemetry event{by}: its state is only its prior (the "
                          "asset's initial_state), not a live estimate; send its telemetry first (is its connector "
                          "up and mapped to this asset?), or give an explicit start_state",
                          details=[{"revision": twin["revision"], "event_time": None}])
    return LiveStart(artifact, twin["state"], datetime.fromisoformat(twin["event_time"]), live_warnings(asset_id, twin),
                     StartedFrom(start_revision=twin["revision"], start_etag=state_etag(twin)))


def _warned(warnings: list[str]) -> dict[str, Any]:
    """The audit record's `warnings` (a queued run's too: its job answers no result to carry them), if any."""
    return {"warnings": warnings} if warnings else {}


def _provenance(artifact: ModelArtifact) -> dict[str, Any]:
    return {"model_ref": artifact.ref, "content_hash": artifact.content_hash, "versions": package_versions(),
            "code_version": code_version()}


def _bounded_work(svc: Services, work: int) -> None:
    """413 for more scenario-steps than `max_run_work`: a job nobody can stop otherwise holds a job slot and
    its nodes' memory for hours."""
    if work > svc.config.max_run_work:
        raise PayloadTooLarge(f"{work:,} scenario-steps exceed the limit of {svc.config.max_run_work:,} per run "
                              "(scenarios x horizon_s / step_s): split the run, or use a longer step_s")


def _inline(svc: Services, mode: Mode, work: int) -> bool:
    """Answer inline? ``sync`` insists (422 if over the inline limit), ``auto`` decides by size."""
    limit = svc.config.sync_max_steps
    if mode == "sync" and work > limit:
        raise Unprocessable(f"{work} scenario-steps exceed the inline limit of {limit}; use mode=async")
    return mode == "sync" or (mode == "auto" and work <= limit)


JOB_LOST = ("a job may have been queued, its id lost with this answer: resending queues another run (it costs "
            "compute only; a run changes no asset or twin)")


async def _queue(request: Request, who: Principal, svc: Services, kind: str, asset_id: str, artifact: ModelArtifact,
                 work: Any, clock: datetime | None, details: dict[str, Any], start: StartedFrom) -> JSONResponse:
    async with svc.audited(request, who, f"{kind}.submit", asset_id, **details) as outcome:
        job: Job = await svc.backend.call("submit_job", who.tenant, who.key_id, asset_id, artifact.ref,
                                          artifact.content_hash, work, clock, start, lost=JOB_LOST)
        outcome["job_id"] = job.job_id
    accepted = JobAccepted(job_id=job.job_id, state=job.state, status_url=f"/v1/jobs/{job.job_id}",
                           results_url=f"/v1/jobs/{job.job_id}/results")
    return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": accepted.status_url})


async def _finished(svc: Services, who: Principal, job_id: str) -> JobRecord:
    job: JobRecord = await svc.backend.call("get_job", who.tenant, job_id)
    if job.kind == "bulk":  # no result files: its outcome per asset is its report
        raise NotFound(f"job {job_id} is a bulk job: it has no results or files; its outcome per asset is at "
                       f"/v1/jobs/{job_id}/report")
    if job.state != "succeeded":
        raise Conflict(f"job {job_id} is {job.state}" + (f": {job.error}" if job.error else ""),
                       details=[{"state": job.state}])
    return job


@store_io("read")  # (the dataset reads its rows lazily)
def _read_rows(svc: Services, url: str, limit: int) -> list[dict[str, Any]]:
    return open_dataset(url, svc.config.storage_options or None).head(limit).to_pylist() if limit else []


async def _stored(svc: Services, who: Principal, job_id: str) -> tuple[JobRecord, list[ResultFile]]:
    """A succeeded job and its result files (`_finished`); 410 once they are no longer in the store (retention
    removes a sweep's with its run), before anything reads them."""
    job = await _finished(svc, who, job_id)
    files = await run_in_threadpool(job.result_files, svc.config)
    if job.results_removed(files):
        raise job.removed()
    return job, files
