"""Measure the cost of live twins held in shard actors (the figures in actors/README.md).

Why it exists: the shard design rests on "a twin in a shard is cheap, an actor is not". This
measures both on the current machine: the resident memory of an idle shard process (what one
actor per asset would cost *each*) and the memory and time per twin when N twins share shards.
Linux only (reads /proc for resident memory).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import ray

from actors.service import TwinService
from raytwin.contracts import Asset, AssetType, TelemetryEvent
from raytwin.registry import ModelRegistry
from raytwin.sim import THERMAL_RC

log = logging.getLogger("raytwin.twins.bench")


def rss_mib(pid: int) -> float:
    """Resident memory of a local process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def measure(n_twins: int, workdir: str, shards: int = 1, events_per_twin: int = 1,
            tenant: str = "bench") -> dict[str, float]:
    """Register `n_twins` thermal twins, send each `events_per_twin` events (one ingest call),
    and report memory and timings."""
    artifact = ModelRegistry(f"{workdir}/registry").register("zone", "1.0.0", AssetType.from_model(THERMAL_RC))
    svc = TwinService(f"{workdir}/store", shards=shards, batch_size=2000)
    try:
        pids = ray.get([s.pid.remote() for s in svc.shard_handles])
        idle = sum(rss_mib(p) for p in pids)
        assets = [Asset(id=f"zone-{i}", tenant=tenant, type_name="thermal_rc", type_version="1.0.0")
                  for i in range(n_twins)]
        t = time.perf_counter()
        svc.register_many([(a, artifact) for a in assets])
        register_s = time.perf_counter() - t
        t0 = datetime.now(UTC) - timedelta(seconds=60 * events_per_twin + 60)
        events = [TelemetryEvent(asset_id=a.id, event_time=t0 + timedelta(seconds=60 * k), sequence=k,
                                 measurements={"T_in": {"value": 21.0 + 0.01 * k, "unit": "degC"}})
                  for k in range(events_per_twin) for a in assets]
        t = time.perf_counter()
        report = svc.ingest(tenant, events)
        ingest_s = time.perf_counter() - t
        loaded = sum(rss_mib(p) for p in pids)
        t = time.perf_counter()
        for a in assets[:200]:
            svc.state(tenant, a.id)
        state_ms = (time.perf_counter() - t) / min(200, n_twins) * 1e3
        result = {
            "twins": n_twins, "shards": shards, "events_per_twin": events_per_twin, "accepted": report.accepted,
            "idle_shard_rss_mib": idle / shards,
            "rss_per_twin_kib": (loaded - idle) * 1024.0 / n_twins,
            "total_rss_mib": loaded,
            "register_s": register_s, "ingest_s": ingest_s, "events_per_s": report.accepted / ingest_s,
            "state_query_ms": state_ms,
        }
        log.info("event=bench %s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in result.items()))
        return result
    finally:
        svc.close()
