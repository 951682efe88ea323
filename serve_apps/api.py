"""The FastAPI application: routes under /v1, errors, auth, limits and metrics.

`create_api()` builds the app without touching Ray; an ingress replica attaches its `Services`
(`app.state.services`) before serving. That keeps the OpenAPI document reproducible
(`create_api().openapi()`) and the routes free of deployment wiring.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from raytwin.contracts import (
    Asset,
    AssetType,
    ContractError,
    RelationshipKind,
    Scenario,
    TelemetryEvent,
    describe_error,
    normalize_measurements,
)
from raytwin.registry import ModelArtifact
from raytwin.storage import filesystem
from raytwin.provenance import code_version, package_versions
from raytwin.sim import get_model
from serve_apps.auth import Principal
from serve_apps.deps import ADMIN, READER, WRITER, Services, services
from serve_apps.errors import ERROR_RESPONSES, Conflict, NotFound, PayloadTooLarge, Unprocessable, install_error_handlers
from serve_apps.jobs import Job
from serve_apps.limits import BodyLimitMiddleware
from sweeps.aggregate import open_dataset
from serve_apps.scenarios import AssetSweep, prepare, run, sweep_spec, sweep_to_store
from serve_apps.schemas import (
    AssetCreate,
    AssetUpdate,
    Health,
    IngestResult,
    JobAccepted,
    Rejection,
    Related,
    ResultFile,
    ScenarioRun,
    SweepResult,
    TelemetryBatch,
)

log = logging.getLogger("raytwin.serve.api")

API_VERSION = "1.0.0"
Mode = Literal["auto", "sync", "async"]
SVC = Depends(services)
MODE = Query("auto", description="sync: answer inline; async: return a job id; auto: sync when small.")


def create_api(max_body_bytes: int = 1_048_576) -> FastAPI:
    app = FastAPI(
        title="RayTwin API", version=API_VERSION, responses=ERROR_RESPONSES,
        description="Live digital twins and what-if scenarios. Authenticate with `Authorization: Bearer <key>`.",
    )
    install_error_handlers(app)
    _observe_requests(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    _ops_routes(app)
    _catalog_routes(app)
    _twin_routes(app)
    _scenario_routes(app)
    return app


# ------------------------------------------------------------------------------- operations --
def _observe_requests(app: FastAPI) -> None:
    @app.middleware("http")
    async def observe(request: Request, call_next):
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            seconds = time.perf_counter() - t0
            svc = getattr(request.app.state, "services", None)
            if svc is not None:
                svc.metrics.observe_request(request.method, path, status, seconds)
            log.info("event=request method=%s route=%s status=%d duration_ms=%.1f request_id=%s", request.method,
                     path, status, 1000 * seconds, getattr(request.state, "request_id", None))


def _ops_routes(app: FastAPI) -> None:
    @app.get("/v1/health", response_model=Health, tags=["operations"])
    async def health(svc: Services = SVC) -> Health:
        """Liveness and the cluster-wide counts (no API key needed)."""
        jobs = await svc.backend.call("job_stats")
        return Health(status="ok", live_twins=await svc.backend.call("live_twins"), jobs=jobs["states"])

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
    async def metrics(svc: Services = SVC) -> Response:
        """Prometheus metrics of the replica that answers, plus cluster-wide twin and job gauges."""
        svc.metrics.set_cluster(await svc.backend.call("live_twins"), await svc.backend.call("job_stats"))
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------------------- catalog --
def _catalog_routes(app: FastAPI) -> None:
    tags = ["asset types"]

    @app.post("/v1/asset-types", response_model=AssetType, status_code=201, tags=tags,
              responses={200: {"model": AssetType, "description": "Identical type already existed"}})
    async def create_asset_type(body: AssetType, request: Request, who: Principal = ADMIN,
                                svc: Services = SVC) -> Any:
        """Publish an asset type version (immutable: a changed type is a new version)."""
        created = await svc.backend.call("put_type", who.tenant, body)
        if created:
            await svc.record(request, who, "asset_type.create", body.key, asset_type=body.model_dump(mode="json"))
        return JSONResponse(body.model_dump(mode="json"), status_code=201 if created else 200)

    @app.get("/v1/asset-types", response_model=list[AssetType], tags=tags)
    async def list_asset_types(name: str | None = None, who: Principal = READER, svc: Services = SVC) -> Any:
        return await svc.backend.call("list_types", who.tenant, name)

    @app.get("/v1/asset-types/{name}/{version}", response_model=AssetType, tags=tags)
    async def get_asset_type(name: str, version: str, who: Principal = READER, svc: Services = SVC) -> Any:
        return await svc.backend.call("get_type", who.tenant, name, version)

    @app.delete("/v1/asset-types/{name}/{version}", status_code=204, tags=tags)
    async def delete_asset_type(name: str, version: str, request: Request, who: Principal = ADMIN,
                                svc: Services = SVC) -> Response:
        """Delete an unused asset type version (409 while assets use it)."""
        await svc.backend.call("delete_type", who.tenant, name, version)
        await svc.record(request, who, "asset_type.delete", f"{name}@{version}")
        return Response(status_code=204)

    tags = ["assets"]

    @app.post("/v1/assets", response_model=Asset, status_code=201, tags=tags)
    async def create_asset(body: AssetCreate, request: Request, who: Principal = ADMIN, svc: Services = SVC) -> Any:
        """Create an asset of the caller's tenant and start its live twin."""
        asset = _asset(who.tenant, body.id, body)
        await svc.backend.call("create_asset", asset, body.initial_state)
        await svc.record(request, who, "asset.create", asset.id, asset=asset.model_dump(mode="json"),
                         initial_state=body.initial_state)
        return asset

    @app.get("/v1/assets", response_model=list[Asset], tags=tags)
    async def list_assets(
        type_name: str | None = None, type_version: str | None = None,
        related_to: Annotated[str | None, Query(description="Only assets with a relationship to this asset")] = None,
        relationship: RelationshipKind | None = None, who: Principal = READER, svc: Services = SVC,
    ) -> Any:
        """The caller's assets, filtered by type and/or relationship (kind, target)."""
        return await svc.backend.call("list_assets", who.tenant, type_name, type_version, related_to, relationship)

    @app.get("/v1/assets/{asset_id}", response_model=Asset, tags=tags)
    async def get_asset(asset_id: str, who: Principal = READER, svc: Services = SVC) -> Any:
        return await svc.backend.call("get_asset", who.tenant, asset_id)

    @app.get("/v1/assets/{asset_id}/relationships", response_model=Related, tags=tags)
    async def relationships(asset_id: str, who: Principal = READER, svc: Services = SVC) -> Related:
        """Relationships from this asset and to it."""
        asset: Asset = await svc.backend.call("get_asset", who.tenant, asset_id)
        sources: list[Asset] = await svc.backend.call("list_assets", who.tenant, None, None, asset_id, None)
        incoming = [{"kind": r.kind, "source": a.id} for a in sources for r in a.relationships if r.target == asset_id]
        return Related(asset_id=asset_id, outgoing=asset.relationships, incoming=incoming)

    @app.put("/v1/assets/{asset_id}", response_model=Asset, tags=tags)
    async def update_asset(asset_id: str, body: AssetUpdate, request: Request, who: Principal = ADMIN,
                           svc: Services = SVC) -> Any:
        """Replace an asset's type version, metadata and relationships."""
        asset = _asset(who.tenant, asset_id, body)
        await svc.backend.call("update_asset", asset)
        await svc.record(request, who, "asset.update", asset_id, asset=asset.model_dump(mode="json"))
        return asset

    @app.delete("/v1/assets/{asset_id}", status_code=204, tags=tags)
    async def delete_asset(asset_id: str, request: Request, who: Principal = ADMIN, svc: Services = SVC) -> Response:
        """Delete an asset and stop its twin (409 while other assets point at it)."""
        await svc.backend.call("delete_asset", who.tenant, asset_id)
        await svc.record(request, who, "asset.delete", asset_id)
        return Response(status_code=204)

    @app.get("/v1/audit", tags=["audit"])
    async def audit_log(day: Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}-\d{2}$")] = None,
                        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
                        who: Principal = ADMIN, svc: Services = SVC) -> list[dict[str, Any]]:
        """The tenant's audit records, oldest first (admin only)."""
        records = await run_in_threadpool(svc.audit.records, who.tenant, day, limit)
        return [r.model_dump(mode="json") for r in records]


def _asset(tenant: str, asset_id: str, body: AssetUpdate) -> Asset:
    try:
        return Asset(id=asset_id, tenant=tenant, type_name=body.type_name, type_version=body.type_version,
                     metadata=body.metadata, relationships=body.relationships)
    except ValidationError as exc:
        raise Unprocessable(describe_error(exc)) from None


# ------------------------------------------------------------------------------------ twins --
def _twin_routes(app: FastAPI) -> None:
    tags = ["twins"]

    @app.post("/v1/assets/{asset_id}/telemetry", response_model=IngestResult, tags=tags)
    async def ingest(asset_id: str, body: TelemetryBatch, who: Principal = WRITER, svc: Services = SVC) -> Any:
        """Validate and apply a batch of events; re-sent events (same idempotency key) count as duplicates."""
        if len(body.events) > svc.config.max_events_per_batch:
            raise PayloadTooLarge(f"{len(body.events)} events exceed the limit of {svc.config.max_events_per_batch}"
                                  " per batch")
        asset_type, _ = await svc.backend.call("model_of", who.tenant, asset_id)
        valid, rejections = _validate_events(asset_id, body.events, asset_type)
        report = {"accepted": 0, "duplicates": 0, "rejected": 0, "reasons": []}
        if valid:
            report = await svc.backend.call("ingest", who.tenant, valid)
        refused = {r["idempotency_key"] for r in report["reasons"]}
        m = svc.metrics
        for ev in valid:
            if ev.idempotency_key not in refused:
                m.ingest_lag.labels(m.replica).observe(max(0.0, (ev.ingest_time - ev.event_time).total_seconds()))
        m.accepted.labels(m.replica).inc(report["accepted"])
        m.duplicates.labels(m.replica).inc(report["duplicates"])
        if rejections:
            m.rejected.labels(m.replica, "invalid").inc(len(rejections))
        if report["rejected"]:
            m.rejected.labels(m.replica, "twin").inc(report["rejected"])
        return IngestResult(
            accepted=report["accepted"], duplicates=report["duplicates"],
            rejected=report["rejected"] + len(rejections),
            reasons=rejections + [Rejection(**r) for r in report["reasons"]],
        )

    @app.get("/v1/assets/{asset_id}/state", tags=tags)
    async def state(asset_id: str,
                    at: Annotated[datetime | None, Query(description="ISO time with offset: the state then")] = None,
                    who: Principal = READER, svc: Services = SVC) -> dict[str, Any]:
        """The twin's state: mean, std, covariance, revision, last event time and divergence indicators."""
        if at is not None and at.tzinfo is None:
            raise Unprocessable("`at` needs a timezone offset, e.g. 2026-01-01T00:00:00Z")
        return await svc.backend.call("state", who.tenant, asset_id, at)

    @app.get("/v1/assets/{asset_id}/divergence", tags=tags)
    async def divergence(asset_id: str, who: Principal = READER, svc: Services = SVC) -> dict[str, Any]:
        """Model/data divergence: normalised innovation (NIS) statistics, residuals and the drift flag."""
        found = await svc.backend.call("state", who.tenant, asset_id, None)
        return {"asset_id": asset_id, "revision": found["revision"], "event_time": found["event_time"],
                **found["divergence"]}


def _validate_events(asset_id: str, events: list[dict[str, Any]], asset_type: AssetType
                     ) -> tuple[list[TelemetryEvent], list[Rejection]]:
    valid, rejections = [], []
    for i, raw in enumerate(events):
        key = raw.get("idempotency_key") if isinstance(raw.get("idempotency_key"), str) else None
        try:
            event = TelemetryEvent.model_validate({"asset_id": asset_id, **raw})
            if event.asset_id != asset_id:
                raise ContractError(f"event for asset {event.asset_id} posted to asset {asset_id}")
            normalize_measurements(event, asset_type)
        except (ValidationError, ContractError) as exc:
            rejections.append(Rejection(index=i, idempotency_key=key, reason=describe_error(exc)))
            continue
        valid.append(event)
    return valid, rejections


# -------------------------------------------------------------------------------- scenarios --
def _scenario_routes(app: FastAPI) -> None:
    tags = ["scenarios"]
    queued = {202: {"model": JobAccepted, "description": "Queued as a job: poll its status_url"}}

    @app.post("/v1/scenarios", response_model=ScenarioRun, tags=tags, responses=queued)
    async def run_scenario(body: Scenario, request: Request, mode: Mode = MODE, who: Principal = WRITER,
                           svc: Services = SVC) -> Any:
        """Run one what-if scenario from the twin's live (or past, or an explicit) state."""
        artifact, live = await _model_and_state(svc, who, body.asset_id, body.start_state == "live", body.start_time)
        prepared = prepare(body, artifact, live)
        details = {"scenario": body.model_dump(mode="json"), **_provenance(artifact)}
        if not _inline(svc, mode, prepared.n_steps):
            return await _queue(request, who, svc, "scenario", body.asset_id, artifact, prepared, details)
        t0 = time.perf_counter()
        result = await run_in_threadpool(run, prepared)
        svc.metrics.observe_scenarios(prepared.n_steps, time.perf_counter() - t0)
        await svc.record(request, who, "scenario.run", body.asset_id, **details)
        model = get_model(prepared.simulator)
        return ScenarioRun(
            model_ref=artifact.ref, content_hash=artifact.content_hash, n_steps=prepared.n_steps,
            step_s=prepared.step_s, start_state=dict(zip(model.state_names, prepared.x0.tolist())),
            times_s=(prepared.step_s * np.arange(prepared.n_steps + 1)).tolist(),
            states={n: result.states[:, j].tolist() for j, n in enumerate(model.state_names)},
            outputs={n: result.outputs[:, j].tolist() for j, n in enumerate(model.output_names)},
        )

    @app.post("/v1/sweeps", response_model=SweepResult, tags=tags, responses=queued)
    async def run_sweep(body: AssetSweep, request: Request, mode: Mode = MODE, limit: ROW_LIMIT = 1000,
                        who: Principal = WRITER, svc: Services = SVC) -> Any:
        """Sweep an asset's model over a scenario space (grid, random, Latin hypercube) with `sweeps`.

        Every sweep is a recorded run (`run_id`, reproducible with ``raytwin rerun``).
        """
        if body.space.size > svc.config.max_sweep_scenarios:
            raise PayloadTooLarge(f"{body.space.size} scenarios exceed the limit of "
                                  f"{svc.config.max_sweep_scenarios} per sweep")
        artifact, live = await _model_and_state(svc, who, body.asset_id, body.start_state == "live", body.start_time)
        spec = sweep_spec(body, who.tenant, svc.config.url("registry", who.tenant), artifact, live)
        details = {"sweep": body.model_dump(mode="json"), **_provenance(artifact)}
        if not _inline(svc, mode, body.work):
            return await _queue(request, who, svc, "sweep", body.asset_id, artifact, spec, details)
        out = await sweep_to_store.remote(spec, svc.config.url("runs", who.tenant), svc.config.storage_options,
                                          who.key_id)
        svc.metrics.observe_scenarios(out["steps"], out["compute_s"])
        await svc.record(request, who, "sweep.run", body.asset_id, run_id=out["run_id"], **details)
        rows = await run_in_threadpool(_read_rows, svc, out["result_url"], limit)
        return SweepResult(model_ref=artifact.ref, content_hash=artifact.content_hash, run_id=out["run_id"],
                           scenarios=body.space.size, n_steps=spec.n_steps, rows=rows, quantiles=out["quantiles"])

    @app.get("/v1/jobs/{job_id}", response_model=Job, tags=tags)
    async def job_status(job_id: str, who: Principal = READER, svc: Services = SVC) -> Any:
        return await svc.backend.call("get_job", who.tenant, job_id)

    @app.get("/v1/jobs/{job_id}/results", response_model=SweepResult, tags=tags)
    async def job_results(job_id: str, limit: ROW_LIMIT = 1000, who: Principal = READER,
                          svc: Services = SVC) -> Any:
        """A finished job's quantiles and first `limit` per-scenario rows (409 until it succeeded)."""
        job = await _finished(svc, who, job_id)
        rows = await run_in_threadpool(_read_rows, svc, job.result_url, limit)
        return SweepResult(model_ref=job.model_ref, content_hash=job.content_hash, run_id=job.run_id,
                           scenarios=job.scenarios, n_steps=job.n_steps, rows=rows, quantiles=job.quantiles)

    @app.get("/v1/jobs/{job_id}/files", response_model=list[ResultFile], tags=tags)
    async def job_files(job_id: str, who: Principal = READER, svc: Services = SVC) -> Any:
        """The job's Parquet files: ``part-*.parquet`` (per-scenario metrics), ``trajectories.parquet``."""
        job = await _finished(svc, who, job_id)
        return await run_in_threadpool(_list_files, svc, job.result_url)

    @app.get("/v1/jobs/{job_id}/files/{name}", tags=tags, response_class=StreamingResponse,
             responses={200: {"content": {PARQUET: {}}, "description": "A Parquet file"}})
    async def job_file(job_id: str, name: str, who: Principal = READER, svc: Services = SVC) -> StreamingResponse:
        """Download one result file (streamed from the store)."""
        job = await _finished(svc, who, job_id)
        files = {f.name: f for f in await run_in_threadpool(_list_files, svc, job.result_url)}
        if name not in files:
            raise NotFound(f"job {job_id} has no file {name!r}; files: {sorted(files)}")
        fs, root = filesystem(job.result_url, svc.config.storage_options)

        def chunks():
            with fs.open(f"{root}/{name}", "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        return StreamingResponse(chunks(), media_type=PARQUET, headers={
            "Content-Disposition": f'attachment; filename="{job_id}-{name}"',
            "Content-Length": str(files[name].size)})


ROW_LIMIT = Annotated[int, Query(ge=0, le=10_000, description="Per-scenario rows to return.")]
PARQUET = "application/vnd.apache.parquet"


async def _model_and_state(svc: Services, who: Principal, asset_id: str, live: bool, at: datetime | None
                           ) -> tuple[ModelArtifact, dict[str, float] | None]:
    """The asset's registered model and, for runs from "live", the twin's state (now or at `at`)."""
    _, artifact = await svc.backend.call("model_of", who.tenant, asset_id)
    state = (await svc.backend.call("state", who.tenant, asset_id, at))["state"] if live else None
    return artifact, state


def _provenance(artifact: ModelArtifact) -> dict[str, Any]:
    return {"model_ref": artifact.ref, "content_hash": artifact.content_hash, "versions": package_versions(),
            "code_version": code_version()}


def _inline(svc: Services, mode: Mode, work: int) -> bool:
    """Answer inline? ``sync`` insists (422 if over the inline limit), ``auto`` decides by size."""
    limit = svc.config.sync_max_steps
    if mode == "sync" and work > limit:
        raise Unprocessable(f"{work} scenario-steps exceed the inline limit of {limit}; use mode=async")
    return mode == "sync" or (mode == "auto" and work <= limit)


async def _queue(request: Request, who: Principal, svc: Services, kind: str, asset_id: str,
                 artifact: ModelArtifact, work: Any, details: dict[str, Any]) -> JSONResponse:
    job: Job = await svc.backend.call("submit_job", who.tenant, who.key_id, asset_id, artifact.ref,
                                      artifact.content_hash, work)
    await svc.record(request, who, f"{kind}.submit", asset_id, job_id=job.job_id, **details)
    accepted = JobAccepted(job_id=job.job_id, state=job.state, status_url=f"/v1/jobs/{job.job_id}",
                           results_url=f"/v1/jobs/{job.job_id}/results")
    return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": accepted.status_url})


async def _finished(svc: Services, who: Principal, job_id: str) -> Job:
    job: Job = await svc.backend.call("get_job", who.tenant, job_id)
    if job.state != "succeeded":
        raise Conflict(f"job {job_id} is {job.state}" + (f": {job.error}" if job.error else ""),
                       details=[{"state": job.state}])
    return job


def _read_rows(svc: Services, url: str, limit: int) -> list[dict[str, Any]]:
    return open_dataset(url, svc.config.storage_options or None).head(limit).to_pylist() if limit else []


def _list_files(svc: Services, url: str) -> list[ResultFile]:
    fs, root = filesystem(url, svc.config.storage_options)
    return [ResultFile(name=info["name"].rsplit("/", 1)[-1], size=info["size"])
            for info in sorted(fs.ls(root, detail=True), key=lambda i: i["name"])
            if info["name"].endswith(".parquet")]
