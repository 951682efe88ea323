"""Ingestion into live twins: batched throughput, and ingest -> queryable latency at a fixed rate.

Uses the product's `actors.TwinService` on Ray (one shard actor per CPU, a local Parquet state
store in a temporary directory). Telemetry is the canonical Arrow table (`TELEMETRY_SCHEMA`),
in order per twin, so every event must be accepted: the benchmark checks the counts, and that
the twins' `events_applied` add up, before it reports a rate.
"""

from __future__ import annotations

import gc
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors import TwinService
from actors.ingest import DEFAULT_BATCH_SIZE, DEFAULT_LINGER_S, lingering_chunks
from actors.recovery import registration_record
from actors.heap import freeze_heap
from actors.shard import TwinShard
from actors.telemetry import TELEMETRY_SCHEMA, validate_table
from actors.twin import Twin, apply_many, logged_event
from benchmarks.harness import (CPU_KINDS, BenchContext, BenchResult, Figure, benchmark, cpu_spent, cpu_split,
                                cpu_times, processes_cpu_s)
from benchmarks.sweep import cluster_cpus
from raytwin.contracts import Asset, AssetType, TelemetryEvent
from raytwin.registry import ModelArtifact, ModelRegistry
from raytwin.sim import THERMAL_RC
from raytwin.statestore import LoggedEvent, StateStore, log_table, to_micros
from sweeps.runner import ensure_ray

TENANT = "bench"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T0_US = to_micros(T0)
STEP_S = 60.0
THROUGHPUT_TARGET = 100_000.0  # events/s
LATENCY_RATE = 10_000.0  # events/s offered in the latency test
LATENCY_P95_TARGET_MS = 50.0
PROBE_INTERVAL_S = 0.005  # the latency test polls one twin's state this often
LIVE_BATCH_ROWS = 100  # a shard's log batch at 10k events/s: ~100 rows per call


class IngestMismatch(AssertionError):
    """Twins did not accept / apply exactly the events sent."""


class TelemetryFeed:
    """Consecutive in-order telemetry for `n_twins` thermal zones, round-robin over the twins."""

    def __init__(self, n_twins: int, prefix: str = "zone"):
        self.assets = [f"{prefix}-{i:05d}" for i in range(n_twins)]
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


    def json_rows(self, n_events: int) -> list[dict]:
        """The next `n_events` as parsed NDJSON lines (what `ndjson_http_source` yields)."""
        n = len(self.assets)
        rows = []
        for k in range(self.sent, self.sent + n_events):
            asset, seq = self.assets[k % n], k // n
            rows.append({
                "asset_id": asset, "event_time": (T0 + timedelta(seconds=STEP_S * seq)).isoformat(),
                "sequence": seq, "idempotency_key": f"{asset}:{seq}", "quality": "good",
                "measurements": {"T_in": {"value": 20.0 + 0.01 * (seq % 100), "unit": "degC"},
                                 "T_out": {"value": 5.0, "unit": "degC"}, "Q_h": {"value": 1.5, "unit": "kW"}},
            })
        self.sent += n_events
        return rows


class LiveStream:
    """`feed`'s events as a live source: event k is due at t0 + k / rate and is yielded (as a
    parsed NDJSON line) no earlier than that, in ticks of about a millisecond.

    The rows are built here, before anything is measured: the load generator shares the machine under
    test, and building them on the fly cost ~16 % of a core at 10k events/s on a 2-core VM (a quarter
    of the driver's samples, `py-spy`), CPU that the service then lacked; built when the stream
    started, they still fell inside the CPU windows the benchmarks measure around a stream."""

    def __init__(self, feed: TelemetryFeed, rate_per_s: float, duration_s: float):
        self.feed, self.rate, self.total = feed, rate_per_s, max(1, round(rate_per_s * duration_s))
        self.first_k = feed.sent
        self._rows = feed.json_rows(self.total)
        self.sent = 0
        self.t0 = self.elapsed_s = 0.0

    def rows(self) -> Iterator[dict]:
        rows = self._rows
        self.t0 = time.monotonic()
        while self.sent < self.total:
            due = min(self.total, int((time.monotonic() - self.t0) * self.rate) + 1)
            if due > self.sent:
                start, self.sent = self.sent, due
                yield from rows[start:due]
            time.sleep(0.001)
        self.elapsed_s = time.monotonic() - self.t0

    def due_times(self, asset_id: str) -> np.ndarray:
        """Monotonic due time of each event of `asset_id` in this stream, indexed by its sequence."""
        n = len(self.feed.assets)
        k = np.arange(self.first_k, self.first_k + self.total)
        k = k[k % n == self.feed.assets.index(asset_id)]
        due = np.full(int(k[-1] // n) + 1 if k.size else 0, np.nan)
        due[k // n] = self.t0 + (k - self.first_k) / self.rate
        return due


class ProbedTwin:
    """Polls one twin's state every `PROBE_INTERVAL_S` (as a client would) while the block runs."""

    def __init__(self, service: TwinService, asset_id: str):
        self.service, self.asset_id = service, asset_id
        self.seen: list[tuple[float, int]] = []  # (monotonic time the answer arrived, events applied)
        self.round_trips: list[float] = []  # seconds from each query to its answer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="bench-probe", daemon=True)

    def _poll(self) -> None:
        while True:
            done = self.stop.is_set()  # one last answer after the stream ended
            asked = time.monotonic()
            applied = self.service.state(TENANT, self.asset_id).events_applied
            answered = time.monotonic()
            self.seen.append((answered, applied))
            self.round_trips.append(answered - asked)
            if done:
                return
            self.stop.wait(PROBE_INTERVAL_S)

    def __enter__(self) -> ProbedTwin:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def polls(self) -> int:
        return len(self.seen)

    def latencies_s(self, due: np.ndarray) -> np.ndarray:
        """For each event with a due time: first answer showing it applied minus its due time."""
        t, applied = (np.array(c) for c in zip(*self.seen))
        seqs = np.flatnonzero(~np.isnan(due))
        first = np.searchsorted(applied, seqs + 1, side="left")  # events_applied never decreases
        seen = first < applied.size
        return t[first[seen]] - due[seqs[seen]]

    def answer_gaps_s(self) -> np.ndarray:
        """Time between consecutive answers: the resolution of `latencies_s` (a query waits for the
        shard's ingest call in progress, so answers come less often than every `PROBE_INTERVAL_S`)."""
        return np.diff([t for t, _ in self.seen])

    def round_trips_s(self) -> np.ndarray:
        """Each query's time to its answer: how much of `answer_gaps_s` beyond `PROBE_INTERVAL_S` is the
        wait for the shard (an idle service answers in 1-2 ms on a 2-core VM)."""
        return np.array(self.round_trips)


def register_feed(service: TwinService, feed: TelemetryFeed, artifact: ModelArtifact) -> TelemetryFeed:
    """`feed`, its twins registered on `service` as thermal zones of `artifact`."""
    for a in feed.assets:
        service.register(Asset(id=a, tenant=TENANT, type_name="thermal_rc", type_version="1.0.0"), artifact)
    return feed


def stream_processes(service: TwinService) -> dict[str, int]:
    """The processes ingestion runs in: this one (the driver: validation and dispatch, and for a live stream its
    reader, the probe's queries and the benchmark's producer) and each shard's."""
    return {"driver": os.getpid(), **{f"shard {i}": pid for i, pid in
                                      enumerate(ray.get([h.pid.remote() for h in service.shard_handles]))}}


class BatchWindow(NamedTuple):
    """The CPU time of the ingesting processes (`stream_processes`) and of the machine around one batched ingest call."""

    own: dict[str, float] | None
    machine: tuple[int, ...] | None

    @classmethod
    def start(cls, processes: dict[str, int]) -> BatchWindow:
        return cls(processes_cpu_s(processes), cpu_times())

    def end(self, processes: dict[str, int]) -> BatchWindow:
        """The CPU spent since `start`: seconds by process, ticks by kind."""
        own, machine = processes_cpu_s(processes), cpu_times()
        return BatchWindow(cpu_spent(self.own, own) or None,
                           None if self.machine is None or machine is None
                           else tuple(b - a for a, b in zip(self.machine, machine)))


def batch_cpu(windows: list[BatchWindow], events_per_call: int) -> tuple[dict[str, float], dict[str, float] | None]:
    """Over the timed batched ingest calls: CPU per event (us) of the driver and of the shards together (empty
    where a process could not be read), and how the machine's CPUs spent the calls' time (`cpu_split`).

    Why: on a 2-core VM the driver and both shards share two cores; whether a call's wall time is their CPU or
    cores left idle while one waits for another says where batched throughput goes (issue 15 §4)."""
    own = [w.own for w in windows]
    per_event = {} if not windows or any(o is None for o in own) else cpu_per_event_us(
        {name: sum(o[name] for o in own) for name in own[0]}, events_per_call * len(windows))
    ticks = [w.machine for w in windows]
    machine = None if not ticks or any(t is None for t in ticks) else cpu_split(
        (0,) * len(CPU_KINDS), tuple(map(sum, zip(*ticks))))
    return per_event, machine


def cpu_per_event_us(spent: dict[str, float], events: int) -> dict[str, float]:
    """Microseconds of CPU per event of the driver and of the shards together, from CPU seconds by process
    (`stream_processes`' names)."""
    return {part: 1e6 * sum(s for n, s in spent.items() if n.startswith(part)) / events for part in ("driver", "shard")}


def paced(rate_per_s: float, duration_s: float) -> Iterator[int]:
    """`rate_per_s` integers a second for `duration_s`, in ticks of about a millisecond (as `LiveStream`)."""
    total, sent, t0 = round(rate_per_s * duration_s), 0, time.monotonic()
    while sent < total:
        due = min(total, int((time.monotonic() - t0) * rate_per_s) + 1)
        yield from range(sent, due)
        sent = due
        time.sleep(0.001)


def stream_handoff(rate_per_s: float, duration_s: float) -> float:
    """The driver's cost of handing a paced stream from its reader thread to the consumer
    (`lingering_chunks`, no validation, no Ray): CPU seconds of this process per item. CPU time,
    not wall time, so a busy machine inflates it little."""
    cpu0 = time.process_time()
    items = sum(len(chunk) for chunk in lingering_chunks(paced(rate_per_s, duration_s), DEFAULT_BATCH_SIZE,
                                                         DEFAULT_LINGER_S))
    cpu = time.process_time() - cpu0
    if items != round(rate_per_s * duration_s):
        raise IngestMismatch(f"the hand-off delivered {items} of {round(rate_per_s * duration_s)} items")
    return cpu / items


def stage_costs(ctx: BenchContext, artifact: ModelArtifact, n_twins: int, n_events: int) -> dict[str, float]:
    """Seconds per event of the stages every ingested event goes through, in this process
    without Ray actors, for one shard batch of `n_events` over `n_twins`: the column-wise contract
    check (in the ingesting process) and, in the shard, everything (`TwinShard.ingest`: asset type
    check, ordering and de-duplication, durable log, filter) and the filter alone (`apply_many`).
    Together they bound throughput whatever Ray adds. The shard stages run with this process's
    heap frozen, as a shard process runs (`actors.heap.freeze_heap`): otherwise one full garbage
    collection of the benchmark process (~0.1 s) lands in one of the few timed batches."""
    try:
        return _stage_costs(ctx, artifact, n_twins, n_events)
    finally:
        gc.unfreeze()


def _stage_costs(ctx: BenchContext, artifact: ModelArtifact, n_twins: int, n_events: int) -> dict[str, float]:
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
    freeze_heap()

    def filter_only() -> None:
        apply_many([(Twin(TENANT, a, artifact), evs) for a, evs in pending.items()])

    t_filter, _ = ctx.measure("ingest/stage/filter", filter_only)
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-stage-") as tmp:
        shard = TwinShard(tmp, 0, 1, allowed_lateness_s=3600.0, snapshot_every=500)
        for a in feed.assets:
            shard.register(TENANT, a, registration_record(
                Asset(id=a, tenant=TENANT, type_name="thermal_rc", type_version="1.0.0"), artifact, None, None))
        freeze_heap()

        batches = iter([validate_table(feed.table(n_events))[0] for _ in range(ctx.warmup + ctx.repeat)])

        def shard_batch() -> int:
            return shard.ingest(TENANT, next(batches)).accepted

        t_shard, accepted = ctx.measure("ingest/stage/shard", shard_batch)
        if accepted != n_events:
            raise IngestMismatch(f"in-process shard accepted {accepted} of {n_events} events")
    return {"validate_s": t_validate.median_s / n_events, "filter_s": t_filter.median_s / n_events,
            "shard_s": t_shard.median_s / n_events}


def log_write_rates(rounds: int, writes: int = 100) -> tuple[float, float]:
    """Log writes per second of one live batch (`LIVE_BATCH_ROWS` rows), wall time, interleaved in
    `rounds` rounds of `writes` each: appended to the day's segment (`StateStore.append_log` on local
    disk), and, the baseline, as a file per batch (the local log before segments; object stores, which
    cannot append, still write one). Medians of the rounds."""
    us = to_micros(T0)
    table = log_table([(f"zone-{k % 100:03d}", LoggedEvent((us + k, k, f"k{k}"), "good", {"T_in": 293.0, "T_out": 278.0,
                                                                                        "Q_h": 1500.0}, us))
                       for k in range(LIVE_BATCH_ROWS)])
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-log-") as tmp:
        store = StateStore(tmp)
        directory = f"{tmp}/files/log/tenant={TENANT}/date={T0.date().isoformat()}"

        def file_per_batch() -> None:  # the object-store path, here on local disk
            store._write_part(table, directory, f"part-{uuid.uuid4().hex}")

        rates: dict[str, list[float]] = {"segment": [], "file": []}
        for _ in range(rounds):
            for kind, write in (("segment", lambda: store.append_log(TENANT, table)), ("file", file_per_batch)):
                t0 = time.perf_counter()
                for _ in range(writes):
                    write()
                rates[kind].append(writes / (time.perf_counter() - t0))
        if sum(e.key[1] == 0 for e in store.read_events(TENANT, "zone-000")) != 1:  # same identity each write: one row
            raise IngestMismatch("the segment's rows did not read back")
    return float(np.median(rates["segment"])), float(np.median(rates["file"]))


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
        handoff_cpu_s = stream_handoff(latency_rate, latency_s / 2)
        segment_rate, file_rate = log_write_rates(rounds=3 if ctx.quick else 15)
        service = TwinService(f"{tmp}/store", shards=shards, namespace=f"bench-{uuid.uuid4().hex[:8]}")
        try:
            feed = register_feed(service, TelemetryFeed(n_twins), artifact)
            processes = stream_processes(service)
            windows: list[BatchWindow] = []

            def ingest_batch() -> int:
                table = feed.table(batch)  # building the Arrow table is the client's cost, timed too
                window = BatchWindow.start(processes)
                accepted = service.ingest(TENANT, table).accepted
                windows.append(window.end(processes))
                return accepted

            repeat = min(ctx.repeat, 3)
            timing, accepted = ctx.measure("ingest/throughput", ingest_batch, repeat=repeat)
            if accepted != batch:
                raise IngestMismatch(f"{accepted} of {batch} events accepted")
            res.timings["ingest_batch"] = timing
            batch_cpu_us, res.checks["machine_cpu_pct_during_batches"] = batch_cpu(windows[-repeat:], batch)

            stream = LiveStream(feed, latency_rate, latency_s)
            probe = ProbedTwin(service, feed.assets[-1])
            cpu0, own0 = cpu_times(), processes_cpu_s(processes)
            with probe:
                stream_report = service.ingest_stream(TENANT, stream.rows())
            res.checks["machine_cpu_pct_during_stream"] = cpu_split(cpu0, cpu_times())
            if own := cpu_spent(own0, processes_cpu_s(processes)):  # each one's share of a core; per event
                res.checks["process_cpu_pct_during_stream"] = {
                    name: round(100 * spent / stream.elapsed_s, 1) for name, spent in own.items()}
                stream_cpu_us = cpu_per_event_us(own, stream.sent)
            service.flush()
            applied = sum(service.state(TENANT, a).events_applied for a in feed.assets)
            latencies = probe.latencies_s(stream.due_times(feed.assets[-1]))
            gaps, round_trips = probe.answer_gaps_s(), probe.round_trips_s()
            res.checks.update({"events_sent": feed.sent, "events_applied_total": applied,
                               "stream_accepted": stream_report.accepted, "probe_polls": probe.polls,
                               "latency_events": int(latencies.size)})
            if applied != feed.sent or stream_report.accepted != stream.sent or not latencies.size:
                raise IngestMismatch(f"sent {feed.sent} events, twins applied {applied}, stream accepted "
                                     f"{stream_report.accepted} of {stream.sent}; {latencies.size} probe events seen")
            # the same rate from twice the twins, each reporting less often than the linger: every shard call holds
            # one event a twin, a live service's usual shape (the stream above has two for some twin in most calls)
            slow_feed = register_feed(service, TelemetryFeed(2 * n_twins, prefix="slow"), artifact)
            service.ingest(TENANT, slow_feed.table(2 * len(slow_feed.assets)))  # their first snapshots, before it
            slow = LiveStream(slow_feed, latency_rate, latency_s)
            slow_probe = ProbedTwin(service, slow_feed.assets[-1])
            with slow_probe:
                slow_report = service.ingest_stream(TENANT, slow.rows())
            slow_latencies = slow_probe.latencies_s(slow.due_times(slow_feed.assets[-1]))
            if slow_report.accepted != slow.sent or not slow_latencies.size:
                raise IngestMismatch(f"slow twins' stream accepted {slow_report.accepted} of {slow.sent}; "
                                     f"{slow_latencies.size} probe events seen")
        finally:
            service.close()
    res.figures += [
        Figure(f"throughput, batches of {batch:,} events over {n_twins} twins, {shards} shards",
               batch / timing.median_s, "events/s", target_min=THROUGHPUT_TARGET),
        *([Figure("CPU per event of the batched ingest call: the driver (validation, routing by shard, dispatch)",
                  batch_cpu_us["driver"], "us"),
           Figure(f"CPU per event of the batched ingest call: the {shards} shard processes", batch_cpu_us["shard"], "us")]
          if batch_cpu_us else []),
        Figure(f"ingest->queryable p50 at {latency_rate:,.0f} events/s offered", np.percentile(latencies, 50) * 1e3, "ms"),
        Figure(f"ingest->queryable p95 at {latency_rate:,.0f} events/s offered", np.percentile(latencies, 95) * 1e3, "ms",
               target_max=LATENCY_P95_TARGET_MS),
        Figure(f"ingest->queryable p95 at {latency_rate:,.0f} events/s offered from {2 * n_twins} twins, one event a "
               "twin per shard call", np.percentile(slow_latencies, 95) * 1e3, "ms"),
        Figure("probe: time between answers p50 (the resolution of ingest->queryable)", np.percentile(gaps, 50) * 1e3, "ms"),
        Figure("probe: time between answers p95", np.percentile(gaps, 95) * 1e3, "ms"),
        Figure("probe: state query round trip p50 (waits for the shard's ingest call in progress)",
               np.percentile(round_trips, 50) * 1e3, "ms"),
        Figure("probe: state query round trip p95", np.percentile(round_trips, 95) * 1e3, "ms"),
        Figure(f"achieved rate at {latency_rate:,.0f} events/s offered", stream.sent / stream.elapsed_s, "events/s"),
        *([Figure(f"CPU per event of the stream at {latency_rate:,.0f} events/s: the driver (reader, validation, "
                  "dispatch, the probe's queries, the load generator)", stream_cpu_us["driver"], "us"),
           Figure(f"CPU per event of the stream at {latency_rate:,.0f} events/s: the {shards} shard processes",
                  stream_cpu_us["shard"], "us")] if own else []),
        Figure(f"stream hand-off (reader thread -> consumer) at {latency_rate:,.0f} events/s: driver CPU per event",
               handoff_cpu_s * 1e6, "us"),
        Figure(f"log writes of a live batch ({LIVE_BATCH_ROWS} rows) appended to a segment", segment_rate, "writes/s",
               baseline="a file per batch", baseline_value=file_rate),
        Figure("per event: column-wise contract check (validate_table), 1 core", stages["validate_s"] * 1e6, "us"),
        Figure("per event: shard batch in-process (TwinShard.ingest), 1 core", stages["shard_s"] * 1e6, "us"),
        Figure("per event: of which twin filter (apply_many), 1 core", stages["filter_s"] * 1e6, "us"),
        Figure(f"bound: min(driver validation, {shards} shards), one core each",
               min(1.0 / stages["validate_s"], shards / stages["shard_s"]), "events/s", target_min=THROUGHPUT_TARGET),
    ]
    res.notes.append(f"latency: a live stream at {latency_rate:,.0f} events/s for {latency_s:g} s through "
                     f"`TwinService.ingest_stream` (linger {DEFAULT_LINGER_S * 1e3:g} ms); for each event of one "
                     f"twin, from its due time to the first state query (polled every {PROBE_INTERVAL_S * 1e3:g} ms) "
                     "that shows it applied")
    return res
