"""Live twins: shard actors holding per-asset filters, ingestion tasks, recovery and time travel."""

from actors.ingest import events_to_table, ndjson_http_source
from actors.service import TwinService
from actors.state import DivergenceReport, IngestReport, Reject, TwinState, UnknownTwin

__all__ = [
    "DivergenceReport", "IngestReport", "Reject", "TwinService", "TwinState", "UnknownTwin",
    "events_to_table", "ndjson_http_source",
]
