"""Request and response bodies of the HTTP API (the domain contracts live in `raytwin.contracts`)."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from actors.state import DivergenceReport
from connectors.commands import Command
from raytwin.contracts import Asset, AssetType, Finite, Identifier, Relationship, RelationshipKind, SemVer, StartedFrom


MAX_METADATA_KEYS = 100
"""Metadata keys of an asset, at most: the catalog holds every asset's in the backend's memory."""


def _one_line(text: str) -> str:
    """Refuse control and format characters and line and paragraph separators: a newline, NUL, NEL or U+2028
    in metadata forges lines of logs and exports, a U+202E makes it read as other text, a U+200B makes two
    keys that look the same."""
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
    if bad is not None:
        raise ValueError(f"contains the control character {bad!r}: metadata is one line of printable text")
    return text


MetadataKey = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_one_line)]
MetadataValue = Annotated[str, Field(max_length=4096), AfterValidator(_one_line)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_KEYS)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AssetUpdate(Body):
    type_name: Identifier
    type_version: SemVer
    metadata: Metadata = Field(default_factory=dict)
    relationships: list[Relationship] = Field(default_factory=list)


class AssetCreate(AssetUpdate):
    """A new asset of the caller's tenant; its live twin starts from `initial_state` if given."""

    id: Identifier
    initial_state: dict[str, Finite] | None = None


class Incoming(BaseModel):
    """A relationship of another asset (`source`) pointing at this one."""

    kind: RelationshipKind
    source: Identifier


class Related(BaseModel):
    asset_id: str
    outgoing: list[Relationship]
    incoming: list[Incoming] = Field(description="Relationships pointing at this asset")


NEXT_CURSOR = Field(description="send it back as `cursor` for the next page; null on the last page")
"""A page's `next_cursor` (`serve_apps.listing`: the listings' pages, in key order)."""


class AssetPage(BaseModel):
    assets: list[Asset] = Field(description="in id order")
    next_cursor: str | None = NEXT_CURSOR


class AssetTypePage(BaseModel):
    asset_types: list[AssetType] = Field(description="in `name@version` order")
    next_cursor: str | None = NEXT_CURSOR


class CommandPage(BaseModel):
    commands: list[Command] = Field(description="in id order")
    next_cursor: str | None = NEXT_CURSOR


class TelemetryBatch(Body):
    """Events for one asset. Each is validated on its own: a bad event is rejected, not the batch.

    An event is a `TelemetryEvent` without `ingest_time`: the server stamps every event with its
    own clock on receipt, so an event that carries `ingest_time` makes the whole batch 422 (no
    event applied), and an event stamped more than 5 minutes after the server's clock is
    rejected as from the future.
    """

    events: list[dict[str, Any]] = Field(min_length=1, description=(
        "TelemetryEvent objects: sequence, event_time (RFC 3339 with offset), measurements "
        "{name: {value, unit}}, optional asset_id, idempotency_key, quality; never ingest_time"))


class Rejection(BaseModel):
    index: int | None = None
    idempotency_key: str | None = None
    reason: str


class IngestResult(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    reasons: list[Rejection]


START_TIME_USED = ("The wall-clock time of t = 0, where clock signals started (the live state's time, or the request's "
                   "start_time; null: a Monday 00:00 UTC)")
"""What-if answers echo the clock they ran on: the server decides it (from the twin's live state), not the caller."""


LIVE_WARNINGS = ("From a live state: what the twin's filter said of it when the run started (its drift alarm latched, "
                 "its estimate diverged): the model may no longer explain the asset, so the run's predictions are "
                 "suspect. Empty: nothing to say.")


class ScenarioRun(StartedFrom):
    model_ref: str
    content_hash: str
    n_steps: int
    step_s: float
    start_state: dict[str, float]
    start_time: datetime | None = Field(None, description=START_TIME_USED)
    times_s: list[float] = Field(description="Times of the state samples (n_steps + 1, from 0).")
    states: dict[str, list[float]] = Field(description="State trajectories, SI units, from the start state.")
    outputs: dict[str, list[float]] = Field(description="Outputs at the start of each step (n_steps values).")
    warnings: list[str] = Field(default_factory=list, description=LIVE_WARNINGS)


class SweepResult(StartedFrom):
    model_ref: str
    content_hash: str
    run_id: str | None = Field(description="sweeps: the run record, reproducible with `raytwin rerun RUN_ID`")
    scenarios: int
    n_steps: int
    start_time: datetime | None = Field(None, description=START_TIME_USED)
    rows: list[dict[str, Any]] = Field(description="Per-scenario metrics (the first `limit` rows).")
    quantiles: list[dict[str, Any]] = Field(description="Per metric: count, mean and 5/50/95% over the scenarios.")
    warnings: list[str] = Field(default_factory=list, description=LIVE_WARNINGS)


class ResultFile(BaseModel):
    """A job's result file as `GET /v1/jobs/{job_id}/files` lists it."""

    name: str
    size: int
    sha256: str | None = Field(None, description=(
        "the SHA-256 (hex) the job recorded as it wrote the file (a sweep's: its run record's), the one its download "
        "sends as X-RayTwin-SHA256; null for a job recorded before jobs kept them (the listing reads no file: its "
        "download sends the hash computed from the stored file)"))


class JobAccepted(BaseModel):
    job_id: str
    state: str
    status_url: str
    results_url: str


class Divergence(DivergenceReport):
    """A twin's divergence indicators as of its latest applied event."""

    asset_id: str
    revision: int
    event_time: datetime | None


class DriftClear(BaseModel):
    """Why a twin's drift alarm is cleared (kept in the audit log): e.g. the fault was repaired or explained."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)


class DeadLetter(BaseModel):
    """A message of a connector that did not become telemetry: where it came from and why, and the message."""

    asset_id: str | None
    idempotency_key: str | None
    reason: str = Field(description="Led by the source it came from (`mqtt://NAME/topic`, `opcua://NAME/node`), also "
                        "where the twin refused the reading (unknown asset, too late, implausible value, conflict)")
    raw: str = Field(description="What was refused: the message (or its reading) as received where the mapping could "
                                 "not read it (bytes that are not UTF-8 as `\\x..` escapes); the reading as mapped "
                                 "(names, values, units, times) where the data contract or the twin refused it. Its "
                                 "first 4096 bytes where it was longer, then a line `[cut: the first 4096 of N bytes "
                                 "kept; SHA-256 of all: HEX]`")
    dead_lettered_at: datetime


class DeadLetterPage(BaseModel):
    dead_letters: list[DeadLetter] = Field(description="newest first (by `dead_lettered_at`, then content)")
    next_cursor: str | None = NEXT_CURSOR


class StoreFence(BaseModel):
    """Why this service may no longer write its store: its lease was taken (a takeover, a reshard) or released.
    Every write it takes is refused (503 `store_fenced`) until its operator restarts it on the store."""

    reason: str
    holder: str | None = Field(None, description="The service holding the store's lease now (null: none)")
    epoch: int | None = Field(None, description="That lease's epoch")
    acquired_at: str | None = Field(None, description="When it took the lease (ISO time)")
    acquired_by: str | None = Field(None, description="Where it runs (host:pid)")


class Health(BaseModel):
    """Liveness; with a valid key also the caller's tenant's counts (never other tenants'). `status`: `ok`,
    `degraded` (a shard left the twin count unanswered, or the store failed: `reason`) or `fenced` (this service lost its store: `fenced` says
    to whom); readiness (`/v1/health/ready`) also answers `unavailable` (no twin shard answers, every one is
    stuck in a call, or the store fails: `reason`)."""

    status: str
    tenant: str | None = None
    live_twins: int | None = None
    jobs: dict[str, int] | None = None
    fenced: StoreFence | None = None
    reason: str | None = Field(None, description="Why the service is `degraded` (liveness) or `unavailable` "
                               "(readiness): the store failed or did not answer a read of its lease within "
                               "`readiness_timeout_s`, or takes no writes (the shards' lease heartbeat unchanged for "
                               "15 s): the error's class and what to check (no store location); else a twin shard "
                               "left the twin count unanswered (liveness) or none answers (readiness)")
