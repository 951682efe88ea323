"""MQTT into live twins, next to direct ingestion, in the same run on the same twin service.

A local Mosquitto broker (`connectors.mosquitto`), the product's MQTT connector actor
(`connectors.manager.Connectors`, QoS 1, persistent session, acks after durable) and a paho
publisher in this process, one JSON reading per message (the common gateway shape). Baselines:
`TwinService.ingest` of Arrow batches (throughput) and `TwinService.ingest_stream` (latency), the
`ingest` benchmark's paths. Before any figure is reported, every twin must have applied exactly the
events sent through both paths.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from actors import TwinService
from benchmarks.connector_runs import WAIT_S, check_exactly_once, latency_figures, wait_acknowledged
from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from benchmarks.ingest import TENANT, IngestMismatch, LiveStream, ProbedTwin, TelemetryFeed
from benchmarks.sweep import cluster_cpus
from connectors.manager import Connectors
from connectors.mosquitto import Mosquitto
from raytwin.contracts import Asset, AssetType
from raytwin.ports import free_port
from raytwin.registry import ModelRegistry
from raytwin.sim import THERMAL_RC
from sweeps.runner import ensure_ray

MAPPING = {"measurements": {"T_in": {"field": "T_in", "unit": "degC"}, "T_out": {"field": "T_out", "unit": "degC"},
                            "Q_h": {"field": "Q_h", "unit": "kW"}},
           "event_time": "ts", "sequence": "seq"}


def _payload(row: dict) -> str:
    m = row["measurements"]
    return json.dumps({"ts": row["event_time"], "seq": row["sequence"], "T_in": m["T_in"]["value"],
                       "T_out": m["T_out"]["value"], "Q_h": m["Q_h"]["value"]})


class Publisher:
    """A gateway: QoS 1 publishes of one reading per message to `bench/<asset>/telemetry`."""

    def __init__(self, port: int):
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-gw-{uuid.uuid4().hex[:8]}")
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.last = None

    def publish(self, row: dict) -> None:
        self.last = self.client.publish(f"bench/{row['asset_id']}/telemetry", _payload(row), qos=1)

    def close(self) -> None:
        if self.last is not None:
            self.last.wait_for_publish(WAIT_S)
        self.client.disconnect()
        self.client.loop_stop()


@benchmark("mqtt", "Events/s through MQTT into twins and ingest->queryable latency, next to direct ingestion")
def mqtt_ingestion(ctx: BenchContext) -> BenchResult:
    ensure_ray()
    res = BenchResult()
    n_twins = 8 if ctx.quick else 100
    n_messages = 400 if ctx.quick else 20_000
    rate, duration_s = (200.0, 0.5) if ctx.quick else (2_000.0, 5.0)
    shards = cluster_cpus()
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-mqtt-") as tmp:
        broker = Mosquitto(Path(tmp), free_port(), max_inflight=1000)
        broker.start()
        artifact = ModelRegistry(f"{tmp}/registry").register("zone", "1.0.0", AssetType.from_model(THERMAL_RC))
        service = TwinService(f"{tmp}/store", shards=shards, namespace=f"bench-{uuid.uuid4().hex[:8]}")
        connectors = Connectors(service.router, service.assets)
        try:
            mqtt_feed, direct_feed = TelemetryFeed(n_twins, "mqtt"), TelemetryFeed(n_twins, "direct")
            for a in mqtt_feed.assets + direct_feed.assets:
                service.register(Asset(id=a, tenant=TENANT, type_name="thermal_rc", type_version="1.0.0"), artifact)
            connectors.create({"name": "bench", "tenant": TENANT, "kind": "mqtt", "batch_size": 2000,
                               "broker": {"host": "127.0.0.1", "port": broker.port},
                               "routes": [{"topic": "bench/+/telemetry", "asset_level": 1, "payload": MAPPING}]})

            def through_mqtt() -> float:
                """Seconds to drain a backlog of `n_messages` queued in the broker while the connector was
                paused: the connector's rate, not the publisher's (paho in this process publishes only
                a few thousand messages/s)."""
                connectors.pause(TENANT, "bench")
                before = connectors.status(TENANT, "bench").acknowledged
                gateway = Publisher(broker.port)
                for row in mqtt_feed.json_rows(n_messages):
                    gateway.publish(row)
                gateway.close()
                t0 = time.monotonic()
                connectors.resume(TENANT, "bench")
                return wait_acknowledged(connectors, "bench", before + n_messages) - t0

            def direct() -> int:
                return service.ingest(TENANT, direct_feed.table(n_messages)).accepted

            t_direct, accepted = ctx.measure("mqtt/direct", direct, repeat=min(ctx.repeat, 3))
            if accepted != n_messages:
                raise IngestMismatch(f"{accepted} of {n_messages} events accepted directly")
            mqtt_runs = [through_mqtt() for _ in range(1 + min(ctx.repeat, 3))][1:]  # the first warms up
            mqtt_s = float(np.median(mqtt_runs))

            latency = {}
            for path, feed in (("direct", direct_feed), ("mqtt", mqtt_feed)):
                stream = LiveStream(feed, rate, duration_s)
                with ProbedTwin(service, feed.assets[-1]) as probe:
                    if path == "direct":
                        service.ingest_stream(TENANT, stream.rows())
                    else:
                        before = connectors.status(TENANT, "bench").acknowledged
                        gateway = Publisher(broker.port)
                        for row in stream.rows():
                            gateway.publish(row)
                        gateway.close()
                        wait_acknowledged(connectors, "bench", before + stream.total)
                    service.flush()
                latency[path] = probe.latencies_s(stream.due_times(feed.assets[-1]))
            res.checks.update(check_exactly_once(service, {"mqtt": mqtt_feed, "direct": direct_feed}))
            res.checks.update({"latency_events": {p: int(v.size) for p, v in latency.items()},
                               "mqtt_runs_s": mqtt_runs})
        finally:
            connectors.stop_all(TENANT)
            service.close()
            broker.stop()
    direct_rate = n_messages / t_direct.median_s
    res.figures += [
        Figure(f"MQTT throughput (a backlog of {n_messages:,} messages of 1 reading drained), {n_twins} twins, "
               f"{shards} shards",
               n_messages / mqtt_s, "events/s", baseline="TwinService.ingest (Arrow batches)",
               baseline_value=direct_rate),
        *latency_figures("MQTT", f"{rate:,.0f} msg/s", latency["mqtt"], latency["direct"]),
    ]
    res.notes.append("MQTT: paho publisher (QoS 1) -> Mosquitto -> connector actor (QoS 1, acks after the events "
                     "are durable, linger 20 ms) -> twin shards. Throughput: the broker holds a backlog published "
                     "while the connector was paused, timed from resume to the last acknowledgement. Latency: from "
                     "an event's due time to the first state query showing it (polled every 5 ms), both paths at "
                     "the same offered rate")
    return res
