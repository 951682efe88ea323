"""Live twins: shard actors holding per-asset filters, ingestion tasks, recovery and time travel.

The public API is importable from here (``from actors import TwinService``); submodules load on
first use so that ``raytwin --help`` does not pay for JAX and Ray.
"""

from __future__ import annotations

from raytwin.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "actors.lease": ("StoreLeased",),
    "actors.service": ("TwinService",),
    "actors.telemetry": ("events_to_table",),
    "actors.ingest": ("ndjson_http_source",),
    "actors.state": ("DivergenceReport", "IngestReport", "Reject", "TwinState", "UnknownTwin"),
})
