"""Serve: state-query latency p50/p95/p99 and throughput at fixed offered rates, over loopback HTTP.

Starts the product's Serve application (`serve_apps.app.build_app`) on a free 127.0.0.1 port with
a fresh store and API key, creates a thermal zone, then runs a bounded open-loop load of
``GET /v1/assets/{id}/state`` (httpx, in-process) at each offered rate. Only 200 responses that
carry the zone's state count as successes. Serve is shut down afterwards.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import uuid

import httpx

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from benchmarks.load import LoadResult, paced_async
from raytwin.contracts import AssetType
from raytwin.sim import THERMAL_RC
from sweeps.runner import ensure_ray

RATES = (100.0, 500.0)
QUICK_RATES = (50.0,)
DURATION_S = 10.0
QUICK_DURATION_S = 1.0
P95_TARGET_MS = 10.0
TARGET_RATE = 500.0
ASSET = "zone-1"


class ServeCheckError(AssertionError):
    """The service did not answer the state queries correctly."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp: str) -> tuple[str, str]:
    """Start Serve with the RayTwin app; returns (base URL, admin API key)."""
    from ray import serve

    from serve_apps.app import build_app
    from serve_apps.auth import create_key

    keys_file = f"{tmp}/keys.json"
    _, key = create_key(keys_file, "bench", "admin")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {"store_url": f"{tmp}/store", "keys_file": keys_file, "rate_per_s": 1e6, "rate_burst": 1_000_000,
              "twin_shards": 1, "namespace": f"bench-serve-{uuid.uuid4().hex[:8]}",
              "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    serve.run(build_app(config), name="raytwin-bench", route_prefix="/",
              logging_config={"enable_access_log": False, "log_level": "WARNING"})
    return f"http://127.0.0.1:{port}", key


def _create_zone(base: str, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=base, headers=headers, timeout=60.0) as http:
        for path, body in (("/v1/asset-types", AssetType.from_model(THERMAL_RC).model_dump(mode="json")),
                           ("/v1/assets", {"id": ASSET, "type_name": "thermal_rc",
                                           "type_version": THERMAL_RC.version,
                                           "initial_state": {"T_in": 293.0, "T_m": 292.0}})):
            r = http.post(path, json=body)
            if r.status_code != 201:
                raise ServeCheckError(f"POST {path}: {r.status_code} {r.text[:300]}")


async def _load(base: str, headers: dict[str, str], rate: float, duration_s: float) -> LoadResult:
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=5.0, limits=limits) as client:
        async def query(_: int) -> bool:
            try:
                r = await client.get(f"/v1/assets/{ASSET}/state")
            except httpx.HTTPError:
                return False
            return r.status_code == 200 and r.json()["state"]["T_in"] > 0

        await query(0)  # connection set-up is not part of the measured load
        return await paced_async(rate, duration_s, query)


@benchmark("serve", "State-query latency p50/p95/p99 and throughput at fixed offered rates (loopback HTTP)")
def serve_latency(ctx: BenchContext) -> BenchResult:
    from ray import serve

    ensure_ray()
    res = BenchResult()
    rates = QUICK_RATES if ctx.quick else RATES
    duration = QUICK_DURATION_S if ctx.quick else DURATION_S
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-serve-") as tmp:
        base, key = _start(tmp)
        try:
            headers = {"Authorization": f"Bearer {key}"}
            _create_zone(base, headers)
            asyncio.run(_load(base, headers, rates[0], min(duration, 2.0)))  # warm-up: JIT, connections
            for rate in rates:
                load = asyncio.run(_load(base, headers, rate, duration))
                res.checks[f"load@{rate:g}"] = load.summary()
                if load.ok == 0:
                    raise ServeCheckError(f"no successful state query at {rate:g} req/s")
                at_target = rate == TARGET_RATE
                res.figures += [
                    Figure(f"state query p50 at {rate:g} req/s", load.percentile_ms(50), "ms"),
                    Figure(f"state query p95 at {rate:g} req/s", load.percentile_ms(95), "ms",
                           target_max=P95_TARGET_MS if at_target else None),
                    Figure(f"state query p99 at {rate:g} req/s", load.percentile_ms(99), "ms"),
                    Figure(f"throughput at {rate:g} req/s offered", load.achieved_per_s, "req/s",
                           target_min=0.99 * rate if at_target else None),
                    Figure(f"failed + unsent requests at {rate:g} req/s", float(load.failed + load.unsent),
                           "requests"),
                ]
        finally:
            serve.shutdown()
    res.notes.append(f"open loop, {duration:g} s per rate, latency from each request's due time; one Ingress and "
                     "one backend replica; the load generator shares the machine with the server")
    return res
