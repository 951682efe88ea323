"""Start a sweep from a live twin: its model reference and its live (or past) estimated state."""

from __future__ import annotations

from datetime import datetime
from typing import Any


class NoLiveState(ValueError):
    """The twin has applied no telemetry event (by the time asked): its state is only its prior."""


def start_from_twin(service: Any, tenant: str, asset_id: str, at: datetime | None = None, *,
                    allow_prior: bool = False) -> dict[str, Any]:
    """`SweepSpec` (and `RecommendSpec`) fields from a twin of `actors.service.TwinService`: model, tenant, asset,
    start state and its time (``start_time``: clock signals, a day's outdoor temperature and sun, start at the
    state's time, as over HTTP; without it a twin at noon was run from midnight's, twice the heating energy).

    ``at`` picks the twin's state as of a past time (``state_at``); unknown twins raise the
    service's ``UnknownTwin``. A twin without events (by ``at``) raises `NoLiveState`: its state is the asset's
    initial state, which a run would present as the twin's estimate; ``allow_prior=True`` starts from it anyway
    (``start_time`` None), e.g. to try an asset before its telemetry flows. Use as
    ``SweepSpec(**start_from_twin(svc, "acme", "zone-1"), registry_url=..., space=..., horizon_s=..., step_s=...)``.
    """
    twin = service.state(tenant, asset_id) if at is None else service.state_at(tenant, asset_id, at)
    if twin.event_time is None and not allow_prior:
        by = "yet" if at is None else f"by {at.isoformat()}"
        raise NoLiveState(f"twin {tenant}/{asset_id} has applied no telemetry event {by}: its state is only its "
                          "prior (the asset's initial state), not an estimate; ingest its telemetry first, give the "
                          "spec an explicit start_state, or pass allow_prior=True to start from the prior anyway")
    return {"model": twin.model_ref, "tenant": twin.tenant, "asset_id": twin.asset_id, "start_state": dict(twin.state),
            "start_time": twin.event_time}
