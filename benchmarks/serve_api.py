"""Serve: state-query latency p50/p95/p99, throughput and CPU per request, over loopback HTTP.

Starts the product's Serve application (`serve_apps.app.build_app`) on a free 127.0.0.1 port with
a fresh store and API key, creates a thermal zone, then runs bounded open-loop loads of
``GET /v1/assets/{id}/state`` at each offered rate over the product's three HTTP paths,
interleaved, in the same server:

- ``via proxy``: client -> Serve's Python proxy actor -> Ingress replica -> twin shard (Serve's default;
  here the head node's proxy that HAProxy mode keeps as its fallback, the same actor on another port);
- ``via HAProxy``: client -> HAProxy -> the Ingress replica's own HTTP server -> twin shard
  (``RAY_SERVE_ENABLE_HA_PROXY=1``, ``raytwin serve --haproxy``, see serve_apps/endpoints.py);
- ``direct ingress``: client -> the Ingress replica's own HTTP server -> twin shard
  (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, which HAProxy mode implies).

Serve reads these switches when its processes start, so the server runs in a fresh interpreter with
its own local Ray and them set; the figures come back as JSON. Only 200
responses that carry the zone's state count as successes. The load generator is a lean
keep-alive client (`benchmarks.load.KeepAliveClient`) because it shares the machine's cores with
the server; its CPU is reported with the server processes'.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import uuid
from typing import Any

import httpx

from benchmarks.harness import (BenchContext, BenchResult, Figure, benchmark, cpu_spent, process_cpu_s,
                                processes_cpu_s, run_python, subprocess_env_without)
from benchmarks.load import KeepAliveClient, LoadResult, paced_async
from raytwin.contracts import AssetType
from raytwin.ports import free_port, free_ports
from raytwin.sim import THERMAL_RC

RATES = (100.0, 500.0)
QUICK_RATES = (20.0,)
"""The quick run's rate (tests/test_benchmarks.py: every query must succeed). Low on purpose: an Ingress
replica works on 4 requests at once and refuses one that waited 50 ms for a slot (`Admission`), so on a
slow shared CI machine a burst at 50 req/s was refused in part (3 of 50, 2026-12-02), as designed."""
DURATION_S = 6.0
QUICK_DURATION_S = 0.5
"""Each quick run: 10 queries per path at `QUICK_RATES`, enough to check that every path answers (the test's
assertion); each second more cost the CI run 3 s (three paths)."""
WARMUP_S, QUICK_WARMUP_S = 2.0, 1.0
"""Each path's warm-up load before the runs (JIT, connections, handles): the quick one as long as before its run
was shortened, since a cold path is what could make a quick run's query fail."""
ROUNDS = 2  # interleaved repetitions of every (rate, path) run
P95_TARGET_MS = 10.0
TARGET_RATE = 500.0
ASSET = "zone-1"
APP = "raytwin-bench"
PATHS = ("direct ingress", "via HAProxy", "via proxy")
FALLBACK_PROXY_PORT_ENV = "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"
HAPROXY_PORT_ENVS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
THROUGHPUT_OPTIMIZED_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
"""Serve's bundle of throughput switches (it sets the replica-loop switch too): measured, not adopted; kept out
of the benchmarks' servers unless a variant sets it."""
RESULT_PREFIX = "SERVE_BENCH_RESULT "
PROCESSES = {"proxy": "ProxyActor", "ingress": f"ServeReplica:{APP}:Ingress", "shard": "TwinShardProcess"}


class ServeCheckError(AssertionError):
    """The service did not answer the state queries correctly."""


def _start(tmp: str, **overrides: Any) -> tuple[int, str]:
    """Start Serve with the RayTwin app on 127.0.0.1 (`overrides`: `ServeConfig` fields); returns
    (proxy port, admin API key)."""
    from ray import serve

    from serve_apps.app import build_app
    from serve_apps.auth import create_key

    keys_file = f"{tmp}/keys.json"
    _, key = create_key(keys_file, "bench", "admin", owner="bench")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {"store_url": f"{tmp}/store", "keys_file": keys_file, "rate_per_s": 1e6, "rate_burst": 1_000_000,
              "twin_shards": 1, "namespace": f"bench-serve-{uuid.uuid4().hex[:8]}",
              "autoscaling": {"min_replicas": 1, "max_replicas": 1}, **overrides}
    serve.run(build_app(config), name=APP, route_prefix="/",
              logging_config={"enable_access_log": False, "log_level": "WARNING"})
    return port, key


def _create_zone(base: str, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=base, headers=headers, timeout=60.0) as http:
        for path, body in (("/v1/asset-types", AssetType.from_model(THERMAL_RC).model_dump(mode="json")),
                           ("/v1/assets", {"id": ASSET, "type_name": "thermal_rc",
                                           "type_version": THERMAL_RC.version,
                                           "initial_state": {"T_in": 293.0, "T_m": 292.0}})):
            r = http.post(path, json=body)
            if r.status_code != 201:
                raise ServeCheckError(f"POST {path}: {r.status_code} {r.text[:300]}")


def haproxy_ports_env() -> dict[str, str]:
    """Free ports for what Serve's HAProxy mode binds at fixed ports on every node (HAProxy's statistics 8404 and
    metrics 9101, the fallback Python proxy 8500), so that it can start beside another Ray on this machine."""
    names = (*HAPROXY_PORT_ENVS, FALLBACK_PROXY_PORT_ENV)
    return {name: str(port) for name, port in zip(names, free_ports(len(names)))}


def fallback_proxy_port() -> int:
    """Where the head node's Python proxy listens in HAProxy mode (HAProxy's fallback; Serve's default 8500)."""
    return int(os.environ.get(FALLBACK_PROXY_PORT_ENV, "8500"))


def _replica_port(proxy_port: int) -> int:
    """The Ingress replica's own HTTP port (direct ingress), waiting for the controller to publish it."""
    from serve_apps.endpoints import HAPROXY_ENV, http_targets

    behind_haproxy = os.environ.get(HAPROXY_ENV) == "1"
    proxies = {proxy_port, fallback_proxy_port()}
    for _ in range(60):
        ports = [port for _, port in http_targets(APP, behind_haproxy=behind_haproxy) if port not in proxies]
        if ports:
            return ports[0]
        time.sleep(0.5)
    raise ServeCheckError("the Ingress replica publishes no HTTP port: is RAY_SERVE_ENABLE_DIRECT_INGRESS=1 set?")


async def _load(port: int, key: str, rate: float, duration_s: float) -> LoadResult:
    client = KeepAliveClient("127.0.0.1", port, {"Authorization": f"Bearer {key}"})

    async def query(_: int) -> bool:
        try:
            status, body = await client.get(f"/v1/assets/{ASSET}/state")
        except OSError:
            return False
        return status == 200 and json.loads(body)["state"]["T_in"] > 0

    try:
        await query(0)  # connection set-up is not part of the measured load
        return await paced_async(rate, duration_s, query)
    finally:
        await client.close()


def _process_ids() -> dict[str, int]:
    import ray
    from ray.util.state import list_actors

    alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=10_000)
    pids = {name: a.pid for a in alive
            for name, cls in PROCESSES.items() if a.class_name == cls}
    missing = set(PROCESSES) - set(pids)
    if missing:
        raise ServeCheckError(f"no live actor for {sorted(missing)}")
    return {**pids, "load generator": os.getpid()}


def _actor_pid(suffix: str) -> int:
    import ray
    from ray.util.state import list_actors

    alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=10_000)
    return next(a.pid for a in alive if a.class_name.endswith(suffix))


def _haproxy_children(manager: int) -> list[int]:
    """The HAProxy processes Serve's HAProxy manager (process `manager`) runs now."""
    haproxy = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = dict(line.split(":\t", 1) for line in open(f"/proc/{entry}/status").read().splitlines()
                          if ":\t" in line)
        except OSError:  # the process ended meanwhile
            continue
        if status.get("Name") == "haproxy" and int(status.get("PPid", 0)) == manager:
            haproxy.append(int(entry))
    return haproxy


def _haproxy_pids(timeout_s: float = 10.0) -> dict[str, int]:
    """Serve's HAProxy manager actor and the HAProxy process it runs now: it starts a new one on every
    configuration change and the old one drains and exits, so this waits (up to `timeout_s`) for one alone."""
    manager = _actor_pid("HAProxyManager")
    deadline = time.monotonic() + timeout_s
    while len(haproxy := _haproxy_children(manager)) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    if len(haproxy) != 1:
        raise ServeCheckError(f"expected one HAProxy process under Serve's HAProxy manager, found {haproxy}")
    return {"haproxy manager": manager, "haproxy": haproxy[0]}


def _quiesce(pids: list[int], busy_cores: float = 0.1, timeout_s: float = 60.0) -> None:
    """Wait until `pids` together use less than `busy_cores`: an overloaded run's queued and
    cancelled requests must not drain into the next run's measurement."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = sum(process_cpu_s(p) for p in pids)
        time.sleep(0.5)
        if sum(process_cpu_s(p) for p in pids) - before < 0.5 * busy_cores:
            return


def measure(quick: bool, rounds: int) -> dict[str, Any]:
    """Run in the server's interpreter: every (rate, path) load `rounds` times, interleaved. A quick run does not
    quiesce between runs: its rate never overloads the server (its check: every query answered), so nothing drains."""
    import ray

    from sweeps.runner import ensure_ray

    ensure_ray()  # a local Ray of this process's own (`serve_latency` leaves RAY_ADDRESS out of its environment)
    rates = QUICK_RATES if quick else RATES
    duration = QUICK_DURATION_S if quick else DURATION_S
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-serve-") as tmp:
        haproxy_port, key = _start(tmp)
        try:
            _create_zone(f"http://127.0.0.1:{haproxy_port}", {"Authorization": f"Bearer {key}"})
            ports = {"direct ingress": _replica_port(haproxy_port), "via HAProxy": haproxy_port,
                     "via proxy": fallback_proxy_port()}
            pids = {**_process_ids(), **_haproxy_pids()}
            for port in ports.values():  # warm-up: JIT, connections, handles
                asyncio.run(_load(port, key, rates[0], QUICK_WARMUP_S if quick else WARMUP_S))
            runs: dict[tuple[str, float], list[LoadResult]] = {}
            cpu: dict[tuple[str, float], dict[str, float]] = {}
            load_avg = []
            for _ in range(rounds):
                for rate in rates:
                    for path in PATHS:
                        before = processes_cpu_s(pids)
                        load = asyncio.run(_load(ports[path], key, rate, duration))
                        spent = cpu.setdefault((path, rate), dict.fromkeys(pids, 0.0))
                        for name, seconds in cpu_spent(before, processes_cpu_s(pids)).items():
                            spent[name] += seconds
                        runs.setdefault((path, rate), []).append(load)
                        load_avg.append(os.getloadavg()[0])
                        if not quick:
                            _quiesce([pids["proxy"], pids["ingress"]])
        finally:
            # Ray's end takes Serve, its HAProxy and the shard with it, without `serve.shutdown()`'s graceful stop of
            # each replica (seconds spent waiting for requests that no longer come), and before `tmp` goes
            ray.shutdown()
    out = []
    for (path, rate), loads in runs.items():
        load = LoadResult.combine(loads)
        handled = max(1, load.ok + load.failed)
        out.append({"path": path, "rate": rate, "summary": load.summary(),
                    "cpu_ms_per_request": {k: 1e3 * v / handled for k, v in cpu[(path, rate)].items()}})
    return {"runs": out, "duration_s": duration, "rounds": rounds, "load_avg_1m": load_avg}


def _figures(run: dict[str, Any]) -> list[Figure]:
    path, rate, s = run["path"], run["rate"], run["summary"]
    at_target = rate == TARGET_RATE
    cpu = run["cpu_ms_per_request"]
    figures = [
        Figure(f"{path}: state query p50 at {rate:g} req/s", s["p50_ms"], "ms"),
        Figure(f"{path}: state query p95 at {rate:g} req/s", s["p95_ms"], "ms",
               target_max=P95_TARGET_MS if at_target else None),
        Figure(f"{path}: state query p99 at {rate:g} req/s", s["p99_ms"], "ms"),
        Figure(f"{path}: throughput at {rate:g} req/s offered", s["achieved_per_s"], "req/s",
               target_min=0.99 * rate if at_target else None),
        Figure(f"{path}: failed + unsent requests at {rate:g} req/s", float(s["failed"] + s["unsent"]), "requests"),
    ]
    figures += [Figure(f"{path}: CPU per request at {rate:g} req/s, {name}", ms, "ms") for name, ms in cpu.items()]
    total = sum(cpu.values())
    figures.append(Figure(f"{path}: bound at {rate:g} req/s, {os.cpu_count()} cores / total CPU per request",
                          1e3 * (os.cpu_count() or 1) / total, "req/s"))
    return figures


@benchmark("serve", "State-query latency, throughput and CPU per request at fixed offered rates (loopback HTTP)")
def serve_latency(ctx: BenchContext) -> BenchResult:
    from serve_apps.serve_env import haproxy_environment

    # HAProxy mode (it implies direct ingress) keeps Serve's Python proxy up as HAProxy's fallback, so one
    # server has all three paths, set up as `raytwin serve --haproxy` sets it (the app on the replica's loop)
    env = {**subprocess_env_without("RAY_ADDRESS", THROUGHPUT_OPTIMIZED_ENV), **haproxy_environment(),
           **haproxy_ports_env()}
    rounds = 1 if ctx.quick else ROUNDS
    code = (f"import json; from benchmarks.serve_api import measure, RESULT_PREFIX; "
            f"print(RESULT_PREFIX + json.dumps(measure({ctx.quick!r}, {rounds})))")
    lines = [ln for ln in run_python(code, env, timeout_s=900).splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        raise ServeCheckError("the server process printed no result")
    record = json.loads(lines[-1][len(RESULT_PREFIX):])
    res = BenchResult()
    for run in record["runs"]:
        # "load@R": Serve's default path
        prefix = {"via proxy": "load", "via HAProxy": "haproxy load"}.get(run["path"], "direct ingress load")
        res.checks[f"{prefix}@{run['rate']:g}"] = run["summary"]
        if run["summary"]["ok"] == 0:
            raise ServeCheckError(f"no successful state query at {run['rate']:g} req/s {run['path']}")
        res.figures += _figures(run)
    res.checks["load_avg_1m"] = record["load_avg_1m"]
    res.notes.append(
        f"open loop, {record['duration_s']:g} s per run, {record['rounds']} interleaved rounds per (rate, path), "
        "latency from each request's due time; one Ingress and one backend replica, one twin shard; the load "
        "generator (lean keep-alive client, 64 connections) shares the machine with the server")
    return res
