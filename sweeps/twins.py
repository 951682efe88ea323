"""Start a sweep from a live twin: its model reference and its live (or past) estimated state."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def start_from_twin(service: Any, tenant: str, asset_id: str, at: datetime | None = None) -> dict[str, Any]:
    """`SweepSpec` (and `RecommendSpec`) fields from a twin of `actors.service.TwinService`: model, tenant, asset,
    start state and its time (``start_time``: clock signals, a day's outdoor temperature and sun, start at the
    state's time, as over HTTP; without it a twin at noon was run from midnight's, twice the heating energy).

    ``at`` picks the twin's state as of a past time (``state_at``); unknown twins raise the
    service's ``UnknownTwin``. Use as ``SweepSpec(**start_from_twin(svc, "acme", "zone-1"),
    registry_url=..., space=..., horizon_s=..., step_s=...)``.
    """
    twin = service.state(tenant, asset_id) if at is None else service.state_at(tenant, asset_id, at)
    return {"model": twin.model_ref, "tenant": twin.tenant, "asset_id": twin.asset_id, "start_state": dict(twin.state),
            "start_time": twin.event_time}
