"""Asset query latency at 10,000 assets with live twins: p50/p95 of `POST /v1/query`.

What runs: the API's real FastAPI app (routes, auth, error handling) in this process, called
through httpx's ASGI transport one request at a time, over a real `Backend` (catalog, change log,
10,000 live twins on 2 shard actors on Ray). What is left out: the Serve proxy and the
Ingress -> Backend handle hop (the backend is called in-process), so the figures are the query
path's own cost, not a network round trip. Assets: 4 sites, 3 metadata keys, twins' priors
spread over 280-310 K. Queries (100 per page):

- catalog only: ``type == "thermal_rc" and metadata.site == "north"`` (about 2,500 match);
- with live state: the issue's example ``... and state.T_in > 298.15`` sorted by ``-state.T_in``,
  state read from the twin shards on every request (``state_cache_s=0``) and from the
  per-replica state cache (default 0.1 s window: back-to-back queries of ~60 ms hit it every other time);
- every asset, sorted by id (10,000 candidates through the catalog pass).

Baseline, same run: the same filter, sort and page over the same assets and states held as
in-memory `Record`s (the language and paging alone, no service), so the ratio is what the
service adds. Checked first: the service's page equals the baseline's page.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark, owned_backend
from raytwin.contracts import Asset, AssetType, TelemetryEvent
from raytwin.query import Record, evaluate, parse
from raytwin.query_pages import fingerprint, paginate, parse_fields, parse_sort
from raytwin.sim import THERMAL_RC
from raytwin.storage import filesystem
from serve_apps.audit import AuditLog
from serve_apps.auth import KeyStore, create_key
from serve_apps.backend import Backend
from serve_apps.change_stream import HeadWatcher
from serve_apps.changes import ChangeStore
from serve_apps.conditional import Precondition
from serve_apps.config import ServeConfig
from serve_apps.deps import Services
from serve_apps.limits import TokenBuckets
from serve_apps.twin_reads import TwinReader
from sweeps.runner import ensure_ray

TENANT, SITES = "bench", ("north", "south", "east", "west")
EXAMPLE = 'type == "thermal_rc" and metadata.site == "north" and state.T_in > 298.15'
T0 = datetime(2026, 1, 5, 12, tzinfo=UTC)
QUERIES = {  # label -> request body
    "catalog only": {"q": 'type == "thermal_rc" and metadata.site == "north"', "limit": 100},
    "live state": {"q": EXAMPLE, "sort": ["-state.T_in"], "fields": ["metadata.site", "state.T_in"], "limit": 100},
    "every asset": {"q": "", "limit": 100},
}


class InProcessBackend:
    """`BackendClient.call` without Ray's handle: the backend's methods in this process."""

    def __init__(self, backend: Backend):
        self.backend = backend

    async def call(self, method: str, *args: Any) -> Any:
        return getattr(self.backend, method)(*args)


def populate(backend: Backend, n: int, seed: int = 3) -> None:
    """`n` assets with live twins, written straight into the catalog and shards (setup, not measured)."""
    rng = random.Random(seed)
    thermal = AssetType.from_model(THERMAL_RC)
    backend.put_type(TENANT, thermal, Precondition(), "benchmark")
    assets = []
    for i in range(n):
        asset = Asset(id=f"zone-{i:05d}", tenant=TENANT, type_name=thermal.name, type_version=thermal.version,
                      metadata={"site": SITES[i % 4], "floor": str(rng.randint(0, 9)), "band": rng.choice("ab")})
        backend.catalog.hold(asset)
        assets.append(asset)
    artifact = backend._artifact(TENANT, assets[0])  # noqa: SLF001 - setup straight into the shards, as above
    backend.twins.register_many([(a, artifact) for a in assets])
    backend.twins.ingest(TENANT, [  # one reading each spreads the twins' states
        TelemetryEvent(asset_id=a.id, sequence=0, event_time=T0,
                       measurements={"T_in": {"value": round(rng.uniform(280.0, 310.0), 2), "unit": "K"}})
        for a in assets])


def services(config: ServeConfig, backend: Backend) -> Services:
    client = InProcessBackend(backend)
    return Services(config=config, keys=KeyStore(config.keys_file), backend=client,  # type: ignore[arg-type]
                    audit=AuditLog(config.store_url), buckets=TokenBuckets(1e6, 10**6),
                    fs=filesystem(config.store_url)[0], twins=TwinReader(config),
                    changes=HeadWatcher(client, config.change_poll_s),  # type: ignore[arg-type]
                    change_store=ChangeStore(config.url("changes")))


def records_of(backend: Backend) -> list[Record]:
    assets = list(backend.catalog.assets[TENANT].values())
    states = {a.id: backend.twins.state(TENANT, a.id).model_dump() for a in assets}
    return [Record.of(a, states[a.id]) for a in assets]


def in_memory(records: list[Record], body: dict[str, Any]) -> list[dict[str, Any]]:
    """The baseline: filter, sort and page in-memory records (their states read once, beforehand)."""
    expr = parse(body["q"])
    keys, fields = parse_sort(body.get("sort", [])), parse_fields(body.get("fields") or
                                                                  ["id", "type", "version", "metadata",
                                                                   "relationships"])
    page = paginate([r for r in records if evaluate(expr, r)], keys, fields, body["limit"], b"k" * 32,
                    fingerprint(TENANT, body["q"], body.get("sort", [])))
    return page.items


async def latencies(client: httpx.AsyncClient, key: str, body: dict[str, Any], n: int) -> np.ndarray:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await client.post("/v1/query", json=body, headers={"Authorization": f"Bearer {key}"})
        out.append(time.perf_counter() - t0)
        r.raise_for_status()
    return np.array(out)


def percentiles(samples: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(samples, 50) * 1e3), float(np.percentile(samples, 95) * 1e3)


@benchmark("query", "POST /v1/query p50/p95 at 10,000 assets with live twins (catalog only, live state "
                    "uncached and cached, every asset), against the same query over in-memory records")
def query(ctx: BenchContext) -> BenchResult:
    from serve_apps.api import create_api

    ensure_ray()
    n_assets, n_requests = (400, 10) if ctx.quick else (10_000, 100)
    result = BenchResult()
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-query-") as tmp:
        keys_file = Path(tmp) / "keys.json"
        key = create_key(keys_file, TENANT, "reader")[1]
        base = {"store_url": f"{tmp}/store", "keys_file": str(keys_file), "twin_shards": 2,
                "namespace": f"bench-{uuid.uuid4().hex[:8]}"}
        with owned_backend(ServeConfig(**base)) as backend:
            t0 = time.perf_counter()
            populate(backend, n_assets)
            result.notes.append(f"setup: {n_assets} assets and twins in {time.perf_counter() - t0:.1f} s")
            records = records_of(backend)
            for cache_s, labels in ((0.0, ("catalog only", "live state", "every asset")), (0.1, ("live state",))):
                config = ServeConfig(**base, state_cache_s=cache_s)
                app = create_api()
                app.state.services = services(config, backend)
                run = asyncio.run(_measure(app, key, labels, n_requests, records))
                for label, (samples, base_samples, matched) in run.items():
                    name = f"{label}, state cache {'off' if cache_s == 0 else f'{cache_s:g} s'}" \
                        if label == "live state" else label
                    p50, p95 = percentiles(samples)
                    b50, b95 = percentiles(base_samples)
                    result.checks[f"{name}: matched"] = matched
                    result.figures.append(Figure(f"query p95 ({name}, {n_assets} assets)", p95, "ms",
                                                 baseline="same query over in-memory records", baseline_value=b95,
                                                 note=f"p50 {p50:.1f} ms (in-memory {b50:.1f} ms)"))
    return result


async def _measure(app, key: str, labels: tuple[str, ...], n: int, records: list[Record]
                   ) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    out = {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for label in labels:
            body = QUERIES[label]
            r = await client.post("/v1/query", json=body, headers={"Authorization": f"Bearer {key}"})
            r.raise_for_status()
            page = r.json()
            if page["items"] != in_memory(records, body):
                raise AssertionError(f"{label}: the service's page differs from the in-memory query's")
            samples = await latencies(client, key, body, n)
            base = []
            for _ in range(n):
                t0 = time.perf_counter()
                in_memory(records, body)
                base.append(time.perf_counter() - t0)
            out[label] = (samples, np.array(base), page["matched"])
    return out
