"""Failover: how long a twin shard is gone after SIGKILL, and how long a whole service takes to restart.

The product's `actors.TwinService` on Ray with a local Parquet store: 50 thermal twins over 2
shards, 20,000 logged events (400 per twin; snapshots every 500, so recovery replays the log).

- *failover*: while a stream offers 1,000 events/s to the twins (batches of 50 every 50 ms), one
  shard's worker process gets SIGKILL, `--repeat` times (at least 2; p95, median and worst are
  reported); timed from each kill: the first read of a probe twin on that shard (answered stale
  from the store, `TwinService.state`), the first write to it that succeeds (a new event,
  accepted), the first live (not stale) read, and the answer to a query over every twin's state
  sent at the kill (the API's bulk read, `serve_apps.asset_queries.LiveStates`: the killed
  shard's twins from the store, marked stale).
- *restart*: `close()` then a new service on the same store, until every twin answers live.

With the shards' caches (`actors.failover.compilation_cache`: JAX's persistent compilation cache and
the filter kernels serialized, `raytwin.executables`), with JAX's cache alone
(`RAYTWIN_EXECUTABLES_DIR=""`) and, as the baseline, without either (`RAYTWIN_JAX_CACHE_DIR=""`), in
the same run. The probe twin's state after the kills must equal its events applied once each, else
the benchmark fails.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any

import numpy as np
import ray

from actors import TwinService
from actors.failover import CACHE_DIR_ENV
from actors.routing import shard_index
from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark, environment
from benchmarks.ingest import T0, TENANT, TelemetryFeed
from raytwin.contracts import Asset, AssetType, TelemetryEvent
from raytwin.executables import DIR_ENV
from raytwin.registry import ModelArtifact, ModelRegistry
from raytwin.sim import THERMAL_RC
from serve_apps.asset_queries import LiveStates
from serve_apps.config import ServeConfig
from serve_apps.twin_reads import TwinReader
from sweeps.runner import ensure_ray

TWINS, EVENTS, SHARDS = 50, 20_000, 2
STREAM_RATE, STREAM_BATCH = 1_000.0, 50
WRITE_TARGET_S, RESTART_TARGET_S = 5.0, 10.0


class FailoverMismatch(AssertionError):
    """The probe twin did not apply each of its events exactly once across the kills."""


def _caches(directory: str, *, executables: bool) -> AbstractContextManager[None]:
    """Shards started meanwhile keep compiles in `directory` ("": none), serialized kernels too if `executables`."""
    return environment({CACHE_DIR_ENV: directory, **({} if executables else {DIR_ENV: ""})})


def _asset(asset_id: str) -> Asset:
    return Asset(id=asset_id, tenant=TENANT, type_name="thermal_rc", type_version="1.0.0")


def _probe_event(k: int) -> TelemetryEvent:
    return TelemetryEvent(asset_id="probe", event_time=T0 + timedelta(seconds=60 * k), sequence=k,
                          measurements={"T_in": {"value": 20.0 + 0.01 * k, "unit": "degC"},
                                        "T_out": {"value": 5.0, "unit": "degC"}})


def _stream(svc: TwinService, feed: TelemetryFeed, stop: threading.Event) -> None:
    """Offer `STREAM_RATE` events/s until `stop` (a batch that waits for a restarting shard delays the next)."""
    period = STREAM_BATCH / STREAM_RATE
    due = time.monotonic()
    while not stop.is_set():
        svc.ingest(TENANT, feed.table(STREAM_BATCH))
        due += period
        time.sleep(max(0.0, due - time.monotonic()))


def _timed(fn: Callable[[], object], since: float) -> tuple[float, object]:
    result = fn()
    return time.monotonic() - since, result


def _kill_and_time(svc: TwinService, probe_k: int, assets: list[str]) -> dict[str, float]:
    """SIGKILL the probe's shard; seconds to the first (stale) read, the first write, the first live read,
    and to the answer of a query over every twin's state (the API's bulk read), sent at the kill."""
    shard = svc.shard_for(TENANT, "probe")
    pid = ray.get(shard.pid.remote())
    reader = TwinReader(ServeConfig(store_url=svc.store.url.removesuffix("/twins"), keys_file="unused.json",
                                    twin_shards=SHARDS, state_cache_s=0))
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        query = pool.submit(_timed, lambda: asyncio.run(LiveStates(reader).get(TENANT, assets)), t0)
        read_s, first = _timed(lambda: svc.state(TENANT, "probe"), t0)
        write_s, report = _timed(lambda: svc.ingest(TENANT, [_probe_event(probe_k)]), t0)
        if report.accepted != 1:
            raise FailoverMismatch(f"the write after the kill was not accepted: {report}")
        live_s, state = _timed(lambda: svc.state(TENANT, "probe"), t0)
        query_s, states = query.result()
    killed = [a for a in assets if shard_index(TENANT, a, SHARDS) == shard_index(TENANT, "probe", SHARDS)]
    if len(states) != len(assets):
        raise FailoverMismatch(f"the query after the kill answered {len(states)} of {len(assets)} twins")
    return {"read_s": read_s, "read_stale": float(first.stale), "write_s": write_s, "live_read_s": live_s,
            "live_stale": float(state.stale), "query_s": query_s,
            "query_stale": float(sum(bool(states[a].get("stale")) for a in killed)), "query_killed": float(len(killed))}


def _restart(url: str, svc: TwinService, assets: list[str]) -> tuple[float, TwinService]:
    """Close the service, start a new one on the store; seconds until every twin answers live."""
    svc.close()
    t0 = time.monotonic()
    svc = TwinService(url, shards=SHARDS)
    for asset_id in assets:
        while svc.state(TENANT, asset_id).stale:
            time.sleep(0.05)
    return time.monotonic() - t0, svc


def _scenario(tmp: str, artifact: ModelArtifact, kills: int, events: int) -> dict[str, Any]:
    """One store: twins, `events` logged, `kills` shard kills under the stream, then a whole restart."""
    url = f"{tmp}/twins"
    feed = TelemetryFeed(TWINS)
    svc = TwinService(url, shards=SHARDS)
    svc.register_many([(_asset(a), artifact) for a in [*feed.assets, "probe"]])
    for _ in range(events // 2_000):
        svc.ingest(TENANT, feed.table(2_000))
    svc.ingest(TENANT, [_probe_event(0)])
    out: dict[str, list[float]] = {}
    stop = threading.Event()
    stream = threading.Thread(target=_stream, args=(svc, feed, stop), daemon=True)
    stream.start()
    try:
        for k in range(1, kills + 1):
            for name, value in _kill_and_time(svc, k, [*feed.assets, "probe"]).items():
                out.setdefault(name, []).append(value)
    finally:
        stop.set()
        stream.join()
    state = svc.state(TENANT, "probe")
    if state.events_applied != kills + 1 or state.stale:
        raise FailoverMismatch(f"probe twin applied {state.events_applied} events, sent {kills + 1}")
    restart_s, svc = _restart(url, svc, [*feed.assets, "probe"])
    svc.close()
    return {"restart_s": restart_s, **out, "kills": kills, "logged_events": feed.sent + kills + 1}


@benchmark("failover", "Seconds from SIGKILL of a twin shard to its first read, write and live read under a "
                       "1k events/s stream; whole-service restart (50 twins, 20k events); compilation cache vs none")
def failover(ctx: BenchContext) -> BenchResult:
    ensure_ray()
    res = BenchResult()
    kills = 1 if ctx.quick else max(2, ctx.repeat)
    events = 2_000 if ctx.quick else EVENTS
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-failover-") as tmp:
        artifact = ModelRegistry(f"{tmp}/models").register("zone", "1.0.0", AssetType.from_model(THERMAL_RC))
        with _caches(f"{tmp}/jax-cache", executables=True):
            cached = _scenario(f"{tmp}/cached", artifact, kills, events)
        with _caches(f"{tmp}/jax-cache-only", executables=False):
            jax_only = _scenario(f"{tmp}/jax-cache-only", artifact, kills, events)
        with _caches("", executables=False):
            cold = _scenario(f"{tmp}/uncached", artifact, kills, events)
    res.checks.update({"cached": cached, "jax_cache_only": jax_only, "uncached": cold,
                       "probe_shard": shard_index(TENANT, "probe", SHARDS)})
    base = "no compilation cache"
    p95 = lambda run, name: float(np.percentile(run[name], 95))  # noqa: E731
    res.figures += [
        Figure(f"first write after SIGKILL, p95 of {kills}", p95(cached, "write_s"), "s", base, p95(cold, "write_s"),
               target_max=WRITE_TARGET_S),
        Figure(f"first write after SIGKILL, median of {kills}", float(np.median(cached["write_s"])), "s", base,
               float(np.median(cold["write_s"]))),
        Figure(f"first write after SIGKILL, worst of {kills}", max(cached["write_s"]), "s", base, max(cold["write_s"])),
        Figure(f"first read after SIGKILL, stale, p95 of {kills}", p95(cached, "read_s"), "s", base, p95(cold, "read_s")),
        Figure(f"first live read after SIGKILL, p95 of {kills}", p95(cached, "live_read_s"), "s", base,
               p95(cold, "live_read_s")),
        Figure(f"query over all {TWINS + 1} twins' state sent at SIGKILL, answered after, p95 of {kills}",
               p95(cached, "query_s"), "s", base, p95(cold, "query_s")),
        Figure(f"whole-service restart, {TWINS + 1} twins, {cached['logged_events']} logged events", cached["restart_s"],
               "s", base, cold["restart_s"], target_max=RESTART_TARGET_S),
        Figure(f"first write after SIGKILL, p95 of {kills}, serialized kernels vs JAX's cache alone",
               p95(cached, "write_s"), "s", "JAX's compilation cache only", p95(jax_only, "write_s")),
        Figure("whole-service restart, serialized kernels vs JAX's cache alone", cached["restart_s"], "s",
               "JAX's compilation cache only", jax_only["restart_s"]),
    ]
    res.notes.append(f"{SHARDS} shards, stream {STREAM_RATE:.0f} events/s in batches of {STREAM_BATCH}; "
                     "lower is better: a ratio < 1 is the cache's gain")
    return res
