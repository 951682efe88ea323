"""Ingestion into live twins: batched throughput, and ingest -> queryable latency at a fixed rate.

Uses the product's `actors.TwinService` on Ray (one shard actor per CPU, a local Parquet state
store in a temporary directory). Telemetry is the canonical Arrow table (`TELEMETRY_SCHEMA`),
in order per twin, so every event must be accepted: the benchmark checks the counts, and that
the twins' `events_applied` add up, before it reports a rate.
"""

from __future__ import annotations

import tempfile
import uuid
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors import TwinService
from actors.telemetry import TELEMETRY_SCHEMA, validate_table
from actors.recovery import registration_record
from actors.shard import TwinShard
from actors.twin import Twin, apply_many, logged_event
from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from benchmarks.load import paced_sync
from benchmarks.sweep import cluster_cpus
from raytwin.contracts import Asset, AssetType, TelemetryEvent
from raytwin.registry import ModelArtifact, ModelRegistry
from raytwin.sim import THERMAL_RC
from raytwin.statestore import to_micros
from sweeps.runner import ensure_ray

TENANT = "bench"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T0_US = to_micros(T0)
STEP_S = 60.0
THROUGHPUT_TARGET = 100_000.0  # events/s
LATENCY_RATE = 10_000.0  # events/s offered in the latency test
LATENCY_P95_TARGET_MS = 50.0
BATCH_INTERVAL_S = 0.01  # the latency test sends one batch every 10 ms


class IngestMismatch(AssertionError):
    """Twins did not accept / apply exactly the events sent."""


class TelemetryFeed:
    """Consecutive in-order telemetry for `n_twins` thermal zones, round-robin over the twins."""

    def __init__(self, n_twins: int):
        self.assets = [f"zone-{i:05d}" for i in range(n_twins)]
        self.asset_ids = pa.array(self.assets)
        self.sent = 0

    def table(self, n_events: int) -> pa.Table:
        """The next `n_events`, built column-wise as a client producing Arrow would (the client's
        cost is timed too, so it must not be a Python object per event)."""
        k = np.arange(self.sent, self.sent + n_events)
        self.sent += n_events
        seq = k // len(self.assets)
        asset = pa.DictionaryArray.from_arrays(pa.array(k % len(self.assets)), self.asset_ids).cast(pa.string())
        value = np.stack([20.0 + 0.01 * (seq % 100), np.full(n_events, 5.0), np.full(n_events, 1.5)], axis=1).ravel()
        entry = np.tile([0, 1, 2], n_events)
        items = pa.StructArray.from_arrays(
            [pa.array(value), pa.array(["degC", "degC", "kW"]).take(entry)], names=["value", "unit"])
        measurements = pa.MapArray.from_arrays(pa.array(np.arange(0, 3 * n_events + 1, 3), pa.int32()),
                                               pa.array(["T_in", "T_out", "Q_h"]).take(entry), items)
        return pa.table({
            "asset_id": asset,
            "event_time": pa.array(T0_US + round(STEP_S * 1e6) * seq, pa.int64()).cast(TELEMETRY_SCHEMA.field("event_time").type),
            "sequence": pa.array(seq, pa.int64()),
            "idempotency_key": pc.binary_join_element_wise(asset, pc.cast(pa.array(seq), pa.string()), ":"),
            "quality": pa.array(["good"]).take(np.zeros(n_events, dtype=np.int64)),
            "measurements": measurements.cast(TELEMETRY_SCHEMA.field("measurements").type),
        }, schema=TELEMETRY_SCHEMA)


def stage_costs(ctx: BenchContext, artifact: ModelArtifact, n_twins: int, n_events: int) -> dict[str, float]:
    """Seconds per event of the stages every ingested event goes through, in this process
    without Ray actors, for one shard batch of `n_events` over `n_twins`: the column-wise contract
    check (in the ingesting process) and, in the shard, everything (`TwinShard.ingest`: asset type
    check, ordering and de-duplication, durable log, filter) and the filter alone (`apply_many`).
    Together they bound throughput whatever Ray adds."""
    feed = TelemetryFeed(n_twins)
    raw = feed.table(n_events)
    t_validate, (table, rejects) = ctx.measure("ingest/stage/validate", lambda: validate_table(raw))
    if rejects:
        raise IngestMismatch(f"{len(rejects)} generated rows rejected: {rejects[0]['reason']}")
    by_asset: dict[str, list] = {}
    for e in table.to_pylist():
        ev = TelemetryEvent.model_validate({**e, "measurements": dict(e["measurements"])})
        by_asset.setdefault(e["asset_id"], []).append(logged_event(ev, artifact.asset_type))

    template = Twin(TENANT, "template", artifact)
    pending = {a: [template.pending(e) for e in evs] for a, evs in by_asset.items()}

    def filter_only() -> None:
        apply_many([(Twin(TENANT, a, artifact), evs) for a, evs in pending.items()])

    t_filter, _ = ctx.measure("ingest/stage/filter", filter_only)
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-stage-") as tmp:
        shard = TwinShard(tmp, 0, 1, allowed_lateness_s=3600.0, snapshot_every=500)
        for a in feed.assets:
            shard.register(TENANT, a, registration_record(
                Asset(id=a, tenant=TENANT, type_name="thermal_rc", type_version="1.0.0"), artifact, None, None))

        batches = iter([validate_table(feed.table(n_events))[0] for _ in range(ctx.warmup + ctx.repeat)])

        def shard_batch() -> int:
            return shard.ingest(TENANT, next(batches)).accepted

        t_shard, accepted = ctx.measure("ingest/stage/shard", shard_batch)
        if accepted != n_events:
            raise IngestMismatch(f"in-process shard accepted {accepted} of {n_events} events")
    return {"validate_s": t_validate.median_s / n_events, "filter_s": t_filter.median_s / n_events,
            "shard_s": t_shard.median_s / n_events}


@benchmark("ingest", "Events/s into live twins (batched) and ingest->queryable latency at 10k events/s")
def ingestion(ctx: BenchContext) -> BenchResult:
    ensure_ray()
    res = BenchResult()
    n_twins = 16 if ctx.quick else 200
    batch = 400 if ctx.quick else 20_000
    latency_rate = LATENCY_RATE / 10 if ctx.quick else LATENCY_RATE
    latency_s = 0.5 if ctx.quick else 5.0
    shards = cluster_cpus()
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-ingest-") as tmp:
        artifact = ModelRegistry(f"{tmp}/registry").register("zone", "1.0.0", AssetType.from_model(THERMAL_RC))
        stages = stage_costs(ctx, artifact, n_twins // shards or 1, batch // shards)
        res.checks["per_event_stage_s"] = stages
        service = TwinService(f"{tmp}/store", shards=shards, namespace=f"bench-{uuid.uuid4().hex[:8]}")
        try:
            feed = TelemetryFeed(n_twins)
            for a in feed.assets:
                service.register(Asset(id=a, tenant=TENANT, type_name="thermal_rc", type_version="1.0.0"), artifact)

            def ingest_batch() -> int:
                table = feed.table(batch)  # building the Arrow table is the client's cost, timed too
                return service.ingest(TENANT, table).accepted

            timing, accepted = ctx.measure("ingest/throughput", ingest_batch, repeat=min(ctx.repeat, 3))
            if accepted != batch:
                raise IngestMismatch(f"{accepted} of {batch} events accepted")
            res.timings["ingest_batch"] = timing

            per_batch = max(1, round(latency_rate * BATCH_INTERVAL_S))
            probe = feed.assets

            def send_and_query(i: int) -> bool:
                table = feed.table(per_batch)
                report = service.ingest(TENANT, table)
                last = table["asset_id"][-1].as_py()
                state = service.state(TENANT, last)  # queryable: the latest event's effect is visible
                return report.accepted == per_batch and state.events_applied == table["sequence"][-1].as_py() + 1

            load = paced_sync(1.0 / BATCH_INTERVAL_S, latency_s, send_and_query)
            service.flush()
            applied = sum(service.state(TENANT, a).events_applied for a in probe)
            res.checks.update({"events_sent": feed.sent, "events_applied_total": applied,
                               "latency_load": load.summary(), "failed_batches": load.failed})
            if applied != feed.sent or load.failed:
                raise IngestMismatch(f"sent {feed.sent} events, twins applied {applied}; {load.failed} batches failed")
        finally:
            service.close()
    rate_events = load.offered_per_s * per_batch
    if load.unsent:
        res.notes.append(f"overloaded: {load.unsent} of {load.sent + load.unsent} batches were still unsent at the "
                         "load deadline (their latency would be larger still)")
    res.figures += [
        Figure(f"throughput, batches of {batch:,} events over {n_twins} twins, {shards} shards",
               batch / timing.median_s, "events/s", target_min=THROUGHPUT_TARGET),
        Figure(f"ingest->queryable p50 at {rate_events:,.0f} events/s offered", load.percentile_ms(50), "ms"),
        Figure(f"ingest->queryable p95 at {rate_events:,.0f} events/s offered", load.percentile_ms(95), "ms",
               target_max=LATENCY_P95_TARGET_MS),
        Figure(f"achieved rate at {rate_events:,.0f} events/s offered", load.achieved_per_s * per_batch, "events/s"),
        Figure("per event: column-wise contract check (validate_table), 1 core", stages["validate_s"] * 1e6, "us"),
        Figure("per event: shard batch in-process (TwinShard.ingest), 1 core", stages["shard_s"] * 1e6, "us"),
        Figure("per event: of which twin filter (apply_many), 1 core", stages["filter_s"] * 1e6, "us"),
        Figure(f"bound: min(driver validation, {shards} shards), one core each",
               min(1.0 / stages["validate_s"], shards / stages["shard_s"]), "events/s", target_min=THROUGHPUT_TARGET),
    ]
    res.notes.append(f"latency: one batch of {per_batch} events every {BATCH_INTERVAL_S * 1e3:g} ms for "
                     f"{latency_s:g} s, measured from the batch's due time to a state query showing its last event")
    return res
