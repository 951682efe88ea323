"""Live twins: shard actors holding per-asset filters, ingestion tasks, recovery and time travel.

The public API is importable from here (``from actors import TwinService``); submodules load on
first use so that ``raytwin --help`` does not pay for JAX and Ray.
"""

from __future__ import annotations

from raytwin.lazy import lazy_exports

_EXPORTS = {
    **{name: "actors.service" for name in ("StoreLeased", "TwinService")},
    "events_to_table": "actors.telemetry",
    "ndjson_http_source": "actors.ingest",
    **{name: "actors.state" for name in ("DivergenceReport", "IngestReport", "Reject", "TwinState", "UnknownTwin")},
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
