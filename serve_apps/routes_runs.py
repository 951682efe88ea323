"""Routes for run records: what a tenant's sweeps, calibrations and recommendations ran and produced.

A run record (`sweeps.runs.RunRecord`) is the evidence a model transition names (`evidence.run_ids`, a drift
recalibration's fit): an approver must be able to read it, and the fit report it holds, through the API. The
answer never says where the store keeps anything: store URLs (the outputs', the model registry's, the
telemetry's) are left out, and output files are served by name.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from raytwin.modelcode import ModelCode
from raytwin.storage import filesystem, scrub_locations
from raytwin.store_failures import store_io
from serve_apps.auth import Principal
from serve_apps.deps import FILE_DOWNLOAD, READER, SVC, Services
from serve_apps.downloads import file_response, file_responses
from serve_apps.errors import NotFound, removed_from_store
from serve_apps.json_route import JsonRoute
from serve_apps.stream_auth import StreamCredential
from sweeps.runs import RunError, RunRecord, RunStore

router = APIRouter(prefix="/v1/runs", tags=["runs"], route_class=JsonRoute)

RunIdPath = Annotated[str, Path(pattern=r"^(sweep|calibration|recommendation)-\d{8}T\d{6}Z-[0-9a-f]{8}$",
                                description="e.g. calibration-20260105T120000Z-1a2b3c4d")]
LOCATION_KEYS = frozenset({"registry_url", "telemetry", "path", "runs_url"})
"""Spec fields that name store locations (and any field ending in ``_url``): left out of an answer."""
MEDIA_TYPES = {".json": "application/json", ".parquet": "application/vnd.apache.parquet"}


class RunPublic(BaseModel):
    """A run record as a tenant reads it: who ran what, on which model and data (by hash), with which spec,
    seeds and code, and each output file's name and SHA-256; no store location."""

    run_id: str
    kind: str
    status: str
    user: str
    asset_id: str | None
    model_ref: str
    model_hash: str
    model_code: ModelCode | None
    input_data_hash: str | None
    spec: dict[str, Any]
    seeds: dict[str, int]
    package_versions: dict[str, str]
    code_version: str
    started: str
    finished: str
    outputs: dict[str, str]
    summary: dict[str, Any]
    rerun_of: str | None
    error: str | None


def scrubbed_error(error: str | None) -> str | None:
    """A failed or cancelled run's error as its last line (the exception's message, not a worker's traceback with
    its files, node address and pid), store locations replaced by ``<store>``."""
    if error is None:
        return None
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return scrub_locations(lines[-1] if lines else "")


def without_locations(value: Any) -> Any:
    """`value` with every field that names a store location left out, at any depth."""
    if isinstance(value, dict):
        return {k: without_locations(v) for k, v in value.items() if k not in LOCATION_KEYS and not k.endswith("_url")}
    if isinstance(value, list):
        return [without_locations(v) for v in value]
    return value


def _store(svc: Services, tenant: str) -> RunStore:
    """The tenant's runs root (each tenant's runs have their own) as this backend is configured with it."""
    return RunStore(svc.config.url("runs", tenant), svc.config.storage_options or None)


def _record(svc: Services, tenant: str, run_id: str) -> RunRecord:
    """The tenant's run record (404 for another tenant's)."""
    try:
        return _store(svc, tenant).load(run_id)
    except RunError:
        raise NotFound(f"no run {run_id!r} of this tenant") from None


@router.get("/{run_id}", response_model=RunPublic)
async def get_run(run_id: RunIdPath, who: Principal = READER, svc: Services = SVC) -> Any:
    """A run record: what ran (model, spec, seeds, code, input data hash) and what it produced (its output
    files' names and SHA-256, its summary), e.g. the evidence a model transition names."""
    record = await run_in_threadpool(_record, svc, who.tenant, run_id)
    body = record.model_dump(mode="json")
    return RunPublic.model_validate({**body, "spec": without_locations(body["spec"]),
                                     "summary": without_locations(body["summary"]),
                                     "error": scrubbed_error(body["error"])})


@router.get("/{run_id}/files/{name:path}", response_class=StreamingResponse,
            responses=file_responses(set(MEDIA_TYPES.values()), "An output file of the run, as its record hashed it"))
async def get_run_file(run_id: RunIdPath, name: str, credential: StreamCredential = FILE_DOWNLOAD,
                       svc: Services = SVC) -> StreamingResponse:
    """Download one of the run's output files (`outputs` in its record, e.g. a calibration's ``calibration.json``,
    its fit report, or ``search/part-000000.parquet``), streamed from the store; 410 if it is no longer there. A key
    revoked meanwhile ends the download (the connection is cut; a new request gets the 401)."""
    record = await run_in_threadpool(_record, svc, credential.who.tenant, run_id)
    if name not in record.outputs:
        raise NotFound(f"run {run_id} has no output file {name!r}; files: {sorted(record.outputs)}")
    # beside its record, in the root configured now: the record's `output_url` is where the run wrote, gone once
    # the store was moved or copied (a restored backup, another bucket)
    fs, root = filesystem(_store(svc, credential.who.tenant).output_url(run_id), svc.config.storage_options)
    there = store_io("read")(fs.isfile)
    if not await run_in_threadpool(there, f"{root}/{name}"):  # else a 200 whose stream fails after its headers
        raise removed_from_store(f"run {run_id}'s output file {name!r} is", "`raytwin rerun` makes it again")
    media = MEDIA_TYPES.get(name[name.rfind("."):], "application/octet-stream")
    return file_response(fs, f"{root}/{name}", record.outputs[name], media, f"{run_id}-{name}", credential)
