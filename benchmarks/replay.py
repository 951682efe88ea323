"""A backlog replayed by an at-least-once producer after an outage, next to fresh ingestion.

One shard in this process (`actors.shard.TwinShard`: the de-duplication path itself, without Ray
between the producer and the shard), on a local directory and on S3 (moto on loopback). Fresh:
20,000 in-order events over 50 twins in batches of 500 (each batch a log file), after one
batch that compiles. Replay: the same
20,000 events again, in the same batches, after the twins' watermarks moved past them, so every
event is decided from the durable log through the log key index (`raytwin.keyindex`; the first
batch of each partition builds it from the log files). Baseline figure: the per-event log read
this replaced (`StateStore.find_event`, a partition scan each), timed on a sample. Before a rate
is reported, the fresh run must have accepted every event and the replay found every one a
duplicate, with the twins' states unchanged.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from actors.recovery import registration_record
from actors.shard import TwinShard
from actors.telemetry import validate_table
from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from benchmarks.ingest import TENANT, IngestMismatch, TelemetryFeed
from benchmarks.local_s3 import local_s3, new_bucket
from raytwin.contracts import Asset, AssetType
from raytwin.registry import ModelArtifact, ModelRegistry
from raytwin.sim import THERMAL_RC

BATCH = 500
LATENESS_S = 600.0
TARGET_RATIO = 0.5  # issue 15: a replayed backlog at least at half the fresh ingest rate


def replay_run(url: str, options: dict[str, Any] | None, artifact: ModelArtifact, n_twins: int,
               n_events: int, sample: int) -> dict[str, float]:
    """Seconds for fresh ingestion, the replay and the old per-event lookups (of `sample` events) of one store."""
    shard = TwinShard(url, 0, 1, allowed_lateness_s=LATENESS_S, snapshot_every=64, storage_options=options)
    feed = TelemetryFeed(n_twins, "replay")
    for a in feed.assets:
        shard.register(TENANT, a, registration_record(
            Asset(id=a, tenant=TENANT, type_name="thermal_rc", type_version="1.0.0"), artifact, None, None))
    warmup, *batches = [validate_table(feed.table(BATCH))[0] for _ in range(n_events // BATCH + 1)]
    shard.ingest(TENANT, warmup)  # compiles the filter's kernels
    t0 = time.perf_counter()
    fresh = sum(shard.ingest(TENANT, b).accepted for b in batches)
    t_fresh = time.perf_counter() - t0
    before = {a: shard.state(TENANT, a) for a in feed.assets}
    t0 = time.perf_counter()
    reports = [shard.ingest(TENANT, b) for b in batches]
    t_replay = time.perf_counter() - t0
    events = len(batches) * BATCH
    duplicates = sum(r.duplicates for r in reports)
    if fresh != events or duplicates != events or any(r.accepted or r.rejected for r in reports):
        raise IngestMismatch(f"fresh accepted {fresh}, the replay found {duplicates} duplicates of {events}")
    if any(shard.state(TENANT, a) != before[a] for a in feed.assets):
        raise IngestMismatch("the replay changed a twin's state")
    probe = batches[0].slice(0, sample)
    keys = zip(probe.column("asset_id").to_pylist(), probe.column("event_time").cast("int64").to_pylist(),
               probe.column("sequence").to_pylist(), probe.column("idempotency_key").to_pylist())
    t0 = time.perf_counter()
    found = sum(shard.store.find_event(TENANT, a, (t, s, k)) is not None for a, t, s, k in keys)
    t_old = time.perf_counter() - t0
    if found != sample:
        raise IngestMismatch(f"the per-event lookup found {found} of {sample}")
    return {"fresh_s": t_fresh, "replay_s": t_replay, "old_per_event_s": t_old / sample,
            "events": float(events), "index_rebuilds": float(shard.key_index.rebuilds)}


@benchmark("replay", "A replayed backlog of old events (de-duplicated through the log key index) vs fresh ingestion")
def replay_backlog(ctx: BenchContext) -> BenchResult:
    res = BenchResult()
    n_twins, n_events, sample = (8, 1_000, 5) if ctx.quick else (50, 20_000, 40)
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-replay-") as tmp, local_s3() as endpoint:
        artifact = ModelRegistry(f"{tmp}/registry").register("zone", "1.0.0", AssetType.from_model(THERMAL_RC))
        stores = {"local disk": (f"{tmp}/store", None),
                  "S3 (moto, loopback)": (f"{new_bucket(endpoint)}/store", {"client_kwargs": {"endpoint_url": endpoint}})}
        for where, (url, options) in stores.items():
            run = replay_run(url, options, artifact, n_twins, n_events, sample)
            res.checks[where] = run
            events = run["events"]
            res.figures += [
                Figure(f"replay of {events:,.0f} old events, {n_twins} twins, batches of {BATCH}, {where}",
                       events / run["replay_s"], "events/s", baseline="fresh ingestion of the same events",
                       baseline_value=events / run["fresh_s"], target_ratio=TARGET_RATIO),
                Figure(f"before: one log read per old event (StateStore.find_event), {where}",
                       1 / run["old_per_event_s"], "events/s", baseline="the replay through the key index",
                       baseline_value=events / run["replay_s"]),
            ]
    res.notes.append(f"one in-process TwinShard per store; lateness {LATENESS_S:.0f} s, events 60 s apart per twin; "
                     f"the per-event path timed on {sample} events; rates from one run each "
                     f"(fresh and replay in the same run, the replay's first batch per partition builds the index)")
    return res

