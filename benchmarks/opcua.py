"""OPC UA into live twins, next to direct ingestion, in the same run on the same twin service.

A local asyncua server (`connectors.opcua.devserver`, a subprocess), the product's OPC UA connector actor
(`connectors.manager.Connectors`: one subscription, a monitored item per node, acks after durable) and a plant
client in this process writing readings to the server's variables at a fixed offered rate, each with the
reading's event time as its source timestamp. One variable per twin (its `T_in`): every value change is one
event. Baselines: `TwinService.ingest` of Arrow batches (throughput) and `TwinService.ingest_stream`
(latency), the `ingest` benchmark's paths. Before any figure is reported, every twin must have applied
exactly the events sent through both paths.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from contextlib import ExitStack
from datetime import datetime

from asyncua import Client, ua

from actors import TwinService
from benchmarks.connector_runs import check_exactly_once, latency_figures, wait_acknowledged, wait_connected
from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark, cpu_spent, processes_cpu_s
from benchmarks.ingest import TENANT, IngestMismatch, LiveStream, ProbedTwin, TelemetryFeed
from benchmarks.sweep import cluster_cpus
from connectors.manager import Connectors
from connectors.opcua.devserver import NAMESPACE, OpcUaServer
from connectors.spec import Credentials
from raytwin.contracts import Asset, AssetType
from raytwin.ports import free_port
from raytwin.registry import ModelRegistry
from raytwin.sim import THERMAL_RC
from sweeps.runner import ensure_ray

USER, PASSWORD = "bench", f"bench-{uuid.uuid4().hex}"
MEASUREMENT = "T_in"
PUBLISHING_INTERVAL_MS = 20.0
WRITE_TIMEOUT_S = 60.0


def node_name(asset_id: str) -> str:
    return f"{asset_id}.{MEASUREMENT}"


class Plant:
    """The plant side: writes readings to their twins' variables, all that are due in one Write request per
    round (a node at most once per request, so each node's changes stay in order)."""

    def __init__(self, server: OpcUaServer):
        logging.getLogger("asyncua").setLevel(logging.WARNING)  # it logs every Write request at INFO
        self.ns = server.namespace_index
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-plant", daemon=True)
        self._thread.start()
        self.client = Client(server.endpoint)
        self.client.set_user(USER)
        self.client.set_password(PASSWORD)
        self._call(self.client.connect())
        self.requests = 0

    def _call(self, coro) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(WRITE_TIMEOUT_S)

    def write(self, rows: list[dict]) -> None:
        self._call(self._write(rows))

    async def _write(self, rows: list[dict]) -> None:
        while rows:
            once, later, seen = [], [], set()
            for row in rows:
                (later if row["asset_id"] in seen else once).append(row)
                seen.add(row["asset_id"])
            nodes = [ua.NodeId(node_name(r["asset_id"]), self.ns) for r in once]
            values = [ua.DataValue(ua.Variant(r["measurements"][MEASUREMENT]["value"], ua.VariantType.Double),
                                   SourceTimestamp=datetime.fromisoformat(r["event_time"])) for r in once]
            codes = await self.client.uaclient.write_attributes(nodes, values, ua.AttributeIds.Value)
            self.requests += 1
            if not all(c.is_good() for c in codes):
                raise IngestMismatch(f"the server refused writes: {sorted({c.name for c in codes if not c.is_good()})}")
            rows = later

    def offer(self, rows: Iterable[dict]) -> None:
        """Write `rows` as they come (a live stream): each request carries what arrived while the previous one
        was in flight, so a slow server shows as latency, not as a thinner stream."""
        arrived: queue.SimpleQueue = queue.SimpleQueue()
        end = object()

        def produce() -> None:
            for row in rows:
                arrived.put(row)
            arrived.put(end)

        producer = threading.Thread(target=produce, name="bench-plant-stream", daemon=True)
        producer.start()
        done = False
        while not done:
            batch = [arrived.get()]
            while not arrived.empty():
                batch.append(arrived.get())
            if batch[-1] is end:
                batch.pop()
                done = True
            if batch:
                self.write(batch)
        producer.join()

    def close(self) -> None:
        self._call(self.client.disconnect())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WRITE_TIMEOUT_S)


@benchmark("opcua", "Events/s through OPC UA into twins and ingest->queryable latency, next to direct ingestion")
def opcua_ingestion(ctx: BenchContext) -> BenchResult:
    ensure_ray()
    res = BenchResult()
    n_twins = 8 if ctx.quick else 100
    throughput_rate, throughput_s = (400.0, 0.5) if ctx.quick else (10_000.0, 5.0)
    latency_rate, latency_s = (200.0, 0.5) if ctx.quick else (1_000.0, 5.0)
    shards = cluster_cpus()
    with ExitStack() as running:  # closed in reverse: plant, connector, twins, server, directory
        tmp = running.enter_context(tempfile.TemporaryDirectory(prefix="raytwin-bench-opcua-"))
        opcua_feed, direct_feed = TelemetryFeed(n_twins, "opcua"), TelemetryFeed(n_twins, "direct")
        server = OpcUaServer(free_port(), [node_name(a) for a in opcua_feed.assets], [], f"{USER}:{PASSWORD}")
        server.start()
        running.callback(server.kill)
        artifact = ModelRegistry(f"{tmp}/registry").register("zone", "1.0.0", AssetType.from_model(THERMAL_RC))
        service = TwinService(f"{tmp}/store", shards=shards, namespace=f"bench-{uuid.uuid4().hex[:8]}")
        running.callback(service.close)
        connectors = Connectors(service.router, service.assets)
        running.callback(connectors.stop_all, TENANT)
        for a in opcua_feed.assets + direct_feed.assets:
            service.register(Asset(id=a, tenant=TENANT, type_name="thermal_rc", type_version="1.0.0"), artifact)
        nodes = [{"node_id": f"nsu={NAMESPACE};s={node_name(a)}", "asset_id": a, "measurement": MEASUREMENT,
                  "unit": "degC"} for a in opcua_feed.assets]
        connectors.create({"name": "bench", "tenant": TENANT, "kind": "opcua", "endpoint": server.endpoint,
                           "batch_size": 2000, "publishing_interval_ms": PUBLISHING_INTERVAL_MS,
                           "queue_size": 100_000, "nodes": nodes}, Credentials(username=USER, password=PASSWORD))
        wait_connected(connectors, "bench", WRITE_TIMEOUT_S)
        plant = Plant(server)
        running.callback(plant.close)

        def through_opcua(stream: LiveStream) -> tuple[float, float]:
            """Seconds from the stream's start to the server's acceptance of its last write, and to the
            connector's acknowledgement of its last event."""
            before = connectors.status(TENANT, "bench")
            plant.offer(stream.rows())
            written = time.monotonic()
            done = wait_acknowledged(connectors, "bench", before.acknowledged + stream.total, max_errors=before.errors)
            return written - stream.t0, done - stream.t0

        through_opcua(LiveStream(opcua_feed, latency_rate, latency_s / 2))  # warm-up: actors, imports, paths
        sustained = LiveStream(opcua_feed, throughput_rate, throughput_s)
        n_sustained = sustained.total
        cpu = {"asyncua server": server.process.pid, "plant client (benchmark process)": os.getpid()}
        cpu_before = processes_cpu_s(cpu)
        written_s, opcua_s = through_opcua(sustained)
        cpu_s = cpu_spent(cpu_before, processes_cpu_s(cpu))

        def direct() -> int:
            return service.ingest(TENANT, direct_feed.table(n_sustained)).accepted

        t_direct, accepted = ctx.measure("opcua/direct", direct, repeat=min(ctx.repeat, 3))
        if accepted != n_sustained:
            raise IngestMismatch(f"{accepted} of {n_sustained} events accepted directly")

        latency = {}
        for path, feed in (("direct", direct_feed), ("opcua", opcua_feed)):
            stream = LiveStream(feed, latency_rate, latency_s)
            with ProbedTwin(service, feed.assets[-1]) as probe:
                if path == "direct":
                    service.ingest_stream(TENANT, stream.rows())
                else:
                    through_opcua(stream)
                service.flush()
            latency[path] = probe.latencies_s(stream.due_times(feed.assets[-1]))
        res.checks.update(check_exactly_once(service, {"opcua": opcua_feed, "direct": direct_feed}))
        status = connectors.status(TENANT, "bench")
        res.checks.update({"latency_events": {p: int(v.size) for p, v in latency.items()},
                           "write_requests": plant.requests, "connector_errors": status.errors,
                           "sustained_written_s": written_s, "sustained_acknowledged_s": opcua_s,
                           "sustained_cpu_s": cpu_s})
    res.figures += [
        Figure(f"OPC UA sustained, {throughput_rate:,.0f} value changes/s offered for {throughput_s:g} s, "
               f"{n_twins} twins (1 node each), {shards} shards", n_sustained / opcua_s, "events/s",
               baseline="TwinService.ingest (Arrow batches)", baseline_value=n_sustained / t_direct.median_s),
        Figure("OPC UA sustained: value changes written (accepted by the asyncua server)", n_sustained / written_s,
               "events/s"),
        *[Figure(f"OPC UA sustained: {name} CPU per event", spent / n_sustained * 1e6, "us")
          for name, spent in cpu_s.items()],
        *latency_figures("OPC UA", f"{latency_rate:,.0f} value changes/s", latency["opcua"], latency["direct"]),
    ]
    res.notes.append(f"OPC UA: plant client (Write requests, source timestamp = event time) -> asyncua dev server "
                     f"(Python, one process) -> connector actor (one subscription, publishing interval "
                     f"{PUBLISHING_INTERVAL_MS:g} ms, acks after the events are durable, linger 20 ms) -> twin "
                     "shards. Sustained: events offered at a fixed rate, from the stream's start to the last "
                     "acknowledgement. Latency: from an event's due time to the first state query showing it "
                     "(polled every 5 ms), both paths at the same offered rate")
    return res
