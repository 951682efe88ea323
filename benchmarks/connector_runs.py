"""What the connector benchmarks (`mqtt`, `opcua`) share: waiting for acknowledgements, the exactly-once
check against what was sent, and latency figures next to direct ingestion."""

from __future__ import annotations

import time

import numpy as np

from actors import TwinService
from benchmarks.harness import Figure
from benchmarks.ingest import TENANT, IngestMismatch, TelemetryFeed
from connectors.manager import Connectors

WAIT_S = 300.0


def wait_acknowledged(connectors: Connectors, name: str, messages: int, max_errors: int | None = None) -> float:
    """Monotonic time at which connector `name` had acknowledged `messages` (polled every 10 ms). With
    `max_errors`, fails at once when the connector counts more errors (e.g. a lost OPC UA session: the changes
    made before the new subscription would never arrive, and waiting would only time out)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        status = connectors.status(TENANT, name)
        if status.acknowledged >= messages:
            return time.monotonic()
        if max_errors is not None and status.errors > max_errors:
            raise IngestMismatch(f"connector {name!r} failed while delivering ({status.acknowledged} of {messages} "
                                 f"acknowledged): {status.last_error}")
        time.sleep(0.01)
    raise IngestMismatch(f"connector {name!r} did not acknowledge {messages} messages within {WAIT_S:g} s")


def wait_connected(connectors: Connectors, name: str, timeout_s: float = WAIT_S) -> None:
    """Until connector `name` is connected and receiving (its subscription exists: values sent before it would
    reach the twins late or not at all); answers once Ray has restarted a killed one."""
    deadline = time.monotonic() + timeout_s
    while not connectors.status(TENANT, name).connected:
        if time.monotonic() > deadline:
            raise IngestMismatch(f"connector {name!r} did not connect within {timeout_s:g} s: "
                                 f"{connectors.status(TENANT, name).last_error}")
        time.sleep(0.01)


def check_exactly_once(service: TwinService, feeds: dict[str, TelemetryFeed]) -> dict[str, dict[str, int]]:
    """Events sent and applied per path; `IngestMismatch` unless every twin applied each event exactly once
    (`events_applied` counts applied events, duplicates excluded, so both a loss and a double count show)."""
    sent = {path: feed.sent for path, feed in feeds.items()}
    applied = {path: sum(service.state(TENANT, a).events_applied for a in feed.assets) for path, feed in feeds.items()}
    if applied != sent:
        raise IngestMismatch(f"sent {sent}, applied {applied}")
    return {"events_sent": sent, "events_applied": applied}


def latency_figures(label: str, offered: str, through: np.ndarray, direct: np.ndarray) -> list[Figure]:
    """p50 and p95 ingest->queryable through a connector, with `TwinService.ingest_stream` at the same offered
    rate as the baseline."""
    if not (through.size and direct.size):
        raise IngestMismatch(f"no latency samples ({through.size} through {label}, {direct.size} direct)")
    return [Figure(f"{label} ingest->queryable p{q} at {offered}", np.percentile(through, q) * 1e3, "ms",
                   baseline="TwinService.ingest_stream", baseline_value=np.percentile(direct, q) * 1e3)
            for q in (50, 95)]
