"""Routes for live twins: telemetry ingestion, state (now and in the past), divergence, drift clears."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, Response
from pydantic import ValidationError

from actors.state import TwinState
from raytwin import metrics
from raytwin.contracts import (
    AssetType,
    ContractError,
    DateTime,
    TelemetryEvent,
    describe_error,
    normalize_measurements,
)
from serve_apps.auth import Principal
from serve_apps.conditional import (CONDITIONAL_READ, NOT_MODIFIED, STATE_ETAG, Precondition, state_etag, unconditional,
                                    with_etag)
from serve_apps.deps import READER, SVC, WRITER, Services
from serve_apps.errors import PayloadTooLarge, Unprocessable
from serve_apps.resend import resend_safe
from serve_apps.routes_evolution import TYPE_VERSION_HEADER, check_sender_version
from serve_apps.schemas import Divergence, DriftClear, IngestResult, Rejection, TelemetryBatch

STATE_TAGGED = with_etag({}, 200, header=STATE_ETAG)
"""A drift clear's answer: the divergence's weak `ETag`."""
STATE_READ = with_etag(NOT_MODIFIED, 200, 304, header=STATE_ETAG)
"""The twin state's and divergence's reads: their weak `ETag` (304: `If-None-Match` names it)."""


UNCONDITIONAL = unconditional("telemetry", "events are ordered by their event time and told apart by idempotency key, "
                              "not by the twin's revision")


def register(app: FastAPI) -> None:
    tags = ["twins"]

    @app.post("/v1/assets/{asset_id}/telemetry", response_model=IngestResult, tags=tags,
              dependencies=[resend_safe("every event has an idempotency key: resent ones count as duplicates")])
    async def ingest(asset_id: str, body: TelemetryBatch, who: Principal = WRITER, svc: Services = SVC,
                     type_version: str | None = TYPE_VERSION_HEADER, _unconditional: None = UNCONDITIONAL) -> Any:
        """Validate and apply a batch of events; re-sent events (same idempotency key) count as duplicates.

        The server stamps each event's ingest time with its own clock: an event carrying `ingest_time`
        makes the request 422 (nothing applied); events more than 5 minutes ahead of the server's clock
        are rejected as from the future (in `reasons`, the others are applied). `X-RayTwin-Type-Version`: the
        type version the sender was built for (an older one: accepted or refused as the asset's current version's
        `telemetry_policy` says).
        """
        if len(body.events) > svc.config.max_events_per_batch:
            raise PayloadTooLarge(f"{len(body.events)} events exceed the limit of {svc.config.max_events_per_batch}"
                                  " per batch: split them into batches of at most that many, each sent with its "
                                  "own idempotency key (the service's `max_events_per_batch` sets the limit)")
        stamped = [i for i, raw in enumerate(body.events) if "ingest_time" in raw]
        if stamped:
            raise Unprocessable(f"events[{stamped[0]}].ingest_time: the server sets ingest_time (its clock on "
                                f"receipt); leave it out of the {len(stamped)} event(s) that carry it",
                                details=[{"index": i, "field": "ingest_time"} for i in stamped])
        asset_type = await svc.backend.call("type_of", who.tenant, asset_id)
        await check_sender_version(svc, who.tenant, asset_id, asset_type, type_version)
        valid, positions, rejections, causes = _validate_events(asset_id, body.events, asset_type, datetime.now(UTC))
        report = {"accepted": 0, "duplicates": 0, "rejected": 0, "reasons": []}
        if valid:
            report = await svc.twins.write(who.tenant, asset_id,
                                           lambda: svc.backend.call("ingest", who.tenant, valid))
            svc.twins.forget(who.tenant, asset_id)
        for cause, n in causes.items():  # the shards count theirs; the sender has the reasons in this answer
            metrics.DEAD_LETTERS.inc(n, stage="api", reason=cause)
        return IngestResult(
            accepted=report["accepted"], duplicates=report["duplicates"],
            rejected=report["rejected"] + len(rejections),
            reasons=sorted(rejections + [Rejection(**{**r, "index": None if r["index"] is None else positions[r["index"]]})
                                         for r in report["reasons"]], key=lambda r: (r.index is None, r.index or 0)),
        )

    @app.get("/v1/assets/{asset_id}/state", response_model=TwinState, tags=tags, responses=STATE_READ)
    async def state(asset_id: str, response: Response,
                    at: Annotated[DateTime | None, Query(description="RFC 3339 date-time with offset (e.g. "
                                                         "2026-01-05T12:00:00Z): the state then")] = None,
                    who: Principal = READER, pre: Precondition = CONDITIONAL_READ, svc: Services = SVC) -> Any:
        """The twin's state: mean, std, covariance, revision (also the weak `ETag`), last event time and divergence
        indicators."""
        found = await svc.twins.state(who.tenant, asset_id, at)
        response.headers["ETag"] = state_etag(found)
        if found["stale"]:  # the shard is restarting: the last durable state (see serve_apps/twin_reads.py)
            response.headers["RayTwin-Stale"] = "true"
        return pre.read(response, found["revision"], f"the state of twin {asset_id}") or found

    @app.get("/v1/assets/{asset_id}/divergence", response_model=Divergence, tags=tags, responses=STATE_READ)
    async def divergence(asset_id: str, response: Response, who: Principal = READER,
                         pre: Precondition = CONDITIONAL_READ, svc: Services = SVC) -> Any:
        """Model/data divergence: normalised innovation (NIS) statistics, residuals and the drift flag."""
        found = await svc.twins.state(who.tenant, asset_id)
        response.headers["ETag"] = state_etag(found)
        if found["stale"]:  # the shard is restarting or hung: its last durable state's indicators
            response.headers["RayTwin-Stale"] = "true"
        return pre.read(response, found["revision"], f"the divergence of twin {asset_id}") or \
            Divergence(asset_id=asset_id, revision=found["revision"], event_time=found["event_time"],
                       **found["divergence"])

    @app.post("/v1/assets/{asset_id}/drift/clear", response_model=Divergence, tags=tags, responses=STATE_TAGGED)
    async def clear_drift(asset_id: str, body: DriftClear, request: Request, response: Response,
                          who: Principal = WRITER, svc: Services = SVC) -> Divergence:
        """Acknowledge the twin's drift alarm: its detector restarts from zero (a fault that persists is
        flagged again after its detection delay). Durable across restarts, audited with the reason,
        and recorded as a `twin.drift` change when the flag falls; answers the new divergence report."""
        async with svc.audited(request, who, "twin.drift_clear", asset_id, reason=body.reason) as outcome:
            found = await svc.twins.write(who.tenant, asset_id, lambda: svc.backend.call("clear_drift", who.tenant,
                                                                                      asset_id))
            svc.twins.forget(who.tenant, asset_id)
            outcome["revision"] = found["revision"]
        response.headers["ETag"] = state_etag(found)
        return Divergence(asset_id=asset_id, revision=found["revision"], event_time=found["event_time"],
                          **found["divergence"])


def _validate_events(asset_id: str, events: list[dict[str, Any]], asset_type: AssetType, now: datetime
                     ) -> tuple[list[TelemetryEvent], list[int], list[Rejection], Counter[str]]:
    """Valid events, stamped with ingest time `now` (which also decides what is from the future), their
    positions in the request, rejections, and their count by the shards' dead-letter reasons: ``invalid``
    (malformed), ``misfit`` (names or units the asset type does not have)."""
    valid, positions, rejections, causes = [], [], [], Counter[str]()
    for i, raw in enumerate(events):
        key = raw.get("idempotency_key") if isinstance(raw.get("idempotency_key"), str) else None
        cause = "invalid"
        try:
            event = TelemetryEvent.model_validate({"asset_id": asset_id, **raw, "ingest_time": now})
            if event.asset_id != asset_id:
                raise ContractError(f"event for asset {event.asset_id} posted to asset {asset_id}")
            cause = "misfit"
            normalize_measurements(event, asset_type)
        except (ValidationError, ContractError) as exc:
            rejections.append(Rejection(index=i, idempotency_key=key, reason=describe_error(exc)))
            causes[cause] += 1
            continue
        valid.append(event)
        positions.append(i)
    return valid, positions, rejections, causes
