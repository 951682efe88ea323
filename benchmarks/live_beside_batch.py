"""The live path beside batch work: ingest->queryable p95 at 10k events/s while a sweep runs on the same cores.

A twin service (one shard per CPU) takes the `ingest` benchmark's live stream, its probe polling one twin, while
the product's `sweeps.runner.run_sweep` runs thermal sweeps over and over on the same Ray (a chunk task per CPU,
as a modeller's sweep would): once with no sweep, once with the batch workers at each CPU priority
(`raytwin.cpu_priority`: ``normal`` is how they ran before, at the shards' own niceness), alternated round by
round. Reports each one's p95 and how many scenario-steps per second the sweep got meanwhile: what the live path
gains and what the batch work pays for it.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import uuid

import numpy as np

from actors import TwinService
from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark, environment
from benchmarks.ingest import (LATENCY_P95_TARGET_MS, LATENCY_RATE, TENANT, IngestMismatch, LiveStream, ProbedTwin,
                               TelemetryFeed, register_feed)
from benchmarks.sweep import cluster_cpus
from benchmarks.thermal_scenarios import bench_spec
from raytwin.contracts import AssetType
from raytwin.cpu_priority import PRIORITY_ENV
from raytwin.registry import ModelRegistry
from raytwin.sim import THERMAL_RC
from sweeps.runner import ensure_ray, run_sweep

log = logging.getLogger("raytwin.bench")

VARIANTS = ("no sweep", "normal", "idle")
"""What runs beside the stream: nothing, or the sweep with its workers at that `PRIORITY_ENV`."""


class SweepLoad:
    """`run_sweep` again and again in a thread until stopped: the batch work beside the stream. Counts the
    scenario-steps of the sweeps that ended inside a window (`window`)."""

    def __init__(self, folder: str, priority: str, scenarios: int, n_steps: int):
        self.folder, self.priority, self.scenarios, self.n_steps = folder, priority, scenarios, n_steps
        self.ended: list[tuple[float, float, int]] = []  # (start, end, scenario-steps) of each sweep
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sweep-load", daemon=True)

    def _run(self) -> None:
        spec = bench_spec(self.scenarios, n_steps=self.n_steps, chunk_size=self.scenarios // (2 * cluster_cpus()),
                          workers=cluster_cpus())
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                run_sweep(spec, f"{self.folder}/{uuid.uuid4().hex}", progress=False, log_every_s=3600)
                self.ended.append((t0, time.monotonic(), self.scenarios * self.n_steps))
        except BaseException as exc:  # noqa: BLE001 - raised in the benchmark's thread by `stop`
            self._failure = exc

    def start(self, warm_sweeps: int = 1) -> None:
        """Start, and return once `warm_sweeps` ended (their workers started and kernels compiled)."""
        self._thread.start()
        while len(self.ended) < warm_sweeps and self._thread.is_alive():
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._failure is not None:
            raise self._failure

    def rate(self, start: float, end: float) -> float:
        """Scenario-steps per second of the sweeps that ran inside [start, end] (wholly or in part, pro rata)."""
        steps = sum(n * max(0.0, min(b, end) - max(a, start)) / (b - a) for a, b, n in self.ended)
        return steps / (end - start)


@benchmark("live-beside-batch", "The live path's ingest->queryable p95 at 10k events/s with a CPU sweep on the same "
           "cores, the sweep's workers at each CPU priority")
def live_beside_batch(ctx: BenchContext) -> BenchResult:
    ensure_ray()
    res = BenchResult()
    shards = cluster_cpus()
    n_twins = 16 if ctx.quick else 200
    rate = LATENCY_RATE / 10 if ctx.quick else LATENCY_RATE
    stream_s = 0.5 if ctx.quick else 5.0
    scenarios, n_steps = (64, 100) if ctx.quick else (16_384 * shards, 10_080)
    rounds = 1 if ctx.quick else ctx.repeat
    p95: dict[str, list[float]] = {v: [] for v in VARIANTS}
    sweep_rate: dict[str, list[float]] = {v: [] for v in VARIANTS[1:]}
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-beside-") as tmp:
        artifact = ModelRegistry(f"{tmp}/registry").register("zone", "1.0.0", AssetType.from_model(THERMAL_RC))
        service = TwinService(f"{tmp}/store", shards=shards, namespace=f"bench-{uuid.uuid4().hex[:8]}")
        try:
            feed = register_feed(service, TelemetryFeed(n_twins), artifact)
            service.ingest(TENANT, feed.table(2 * n_twins))  # the twins' kernels compiled, first snapshots written
            for r in range(rounds):
                for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                    load = None
                    with environment({PRIORITY_ENV: variant if variant != "no sweep" else "normal"}):
                        if variant != "no sweep":
                            load = SweepLoad(f"{tmp}/sweeps", variant, scenarios, n_steps)
                            load.start()
                        stream, probe = LiveStream(feed, rate, stream_s), ProbedTwin(service, feed.assets[-1])
                        try:
                            with probe:
                                report = service.ingest_stream(TENANT, stream.rows())
                        finally:
                            if load is not None:
                                load.stop()
                    latencies = probe.latencies_s(stream.due_times(feed.assets[-1]))
                    if report.accepted != stream.sent or not latencies.size:
                        raise IngestMismatch(f"{variant}: the stream accepted {report.accepted} of {stream.sent}; "
                                             f"{latencies.size} probe events seen")
                    p95[variant].append(float(np.percentile(latencies, 95) * 1e3))
                    if load is not None:
                        sweep_rate[variant].append(load.rate(stream.t0, stream.t0 + stream.elapsed_s))
                    log.info("event=round round=%d variant=%r p95_ms=%.1f", r, variant, p95[variant][-1])
        finally:
            service.close()
    res.checks.update({"p95_ms_each_round": p95, "sweep_steps_per_s_each_round": sweep_rate})
    alone = float(np.median(p95["no sweep"]))
    for variant in VARIANTS:
        beside = "alone" if variant == "no sweep" else f"beside a sweep, its workers at priority {variant!r}"
        res.figures.append(Figure(f"ingest->queryable p95 at {rate:,.0f} events/s, {beside} (median of rounds)",
                                  float(np.median(p95[variant])), "ms", target_max=LATENCY_P95_TARGET_MS,
                                  baseline="the stream alone" if variant != "no sweep" else None,
                                  baseline_value=alone if variant != "no sweep" else None))
    for variant in VARIANTS[1:]:
        res.figures.append(Figure(f"the sweep's scenario-steps/s during the stream, its workers at {variant!r}",
                                  float(np.median(sweep_rate[variant])), "scenario-steps/s"))
    res.notes.append(f"{rounds} rounds of {len(VARIANTS)} streams ({stream_s:g} s at {rate:,.0f} events/s over "
                     f"{n_twins} twins, {shards} shards), order reversed every other round; the sweep: thermal, "
                     f"{scenarios:,} scenarios of {n_steps:,} steps a run, again and again, a chunk task per CPU")
    return res
