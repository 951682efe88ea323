"""Routes for live twins: telemetry ingestion, state (now and in the past), divergence."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import FastAPI, Query
from pydantic import ValidationError

from actors.state import TwinState
from raytwin.contracts import AssetType, ContractError, TelemetryEvent, describe_error, normalize_measurements
from serve_apps.auth import Principal
from serve_apps.deps import READER, SVC, WRITER, Services
from serve_apps.errors import PayloadTooLarge, Unprocessable
from serve_apps.schemas import Divergence, IngestResult, Rejection, TelemetryBatch


def register(app: FastAPI) -> None:
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
            svc.twins.forget(who.tenant, asset_id)
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

    @app.get("/v1/assets/{asset_id}/state", response_model=TwinState, tags=tags)
    async def state(asset_id: str,
                    at: Annotated[datetime | None, Query(description="ISO time with offset: the state then")] = None,
                    who: Principal = READER, svc: Services = SVC) -> Any:
        """The twin's state: mean, std, covariance, revision, last event time and divergence indicators."""
        if at is not None and at.tzinfo is None:
            raise Unprocessable("`at` needs a timezone offset, e.g. 2026-01-01T00:00:00Z")
        return await svc.twins.state(who.tenant, asset_id, at)

    @app.get("/v1/assets/{asset_id}/divergence", response_model=Divergence, tags=tags)
    async def divergence(asset_id: str, who: Principal = READER, svc: Services = SVC) -> Divergence:
        """Model/data divergence: normalised innovation (NIS) statistics, residuals and the drift flag."""
        found = await svc.twins.state(who.tenant, asset_id)
        return Divergence(asset_id=asset_id, revision=found["revision"], event_time=found["event_time"],
                          **found["divergence"])


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
