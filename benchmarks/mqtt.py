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
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import ray
from paho.mqtt.enums import CallbackAPIVersion

from actors import TwinService
from benchmarks.connector_runs import (WAIT_S, check_exactly_once, latency_figures, wait_acknowledged,
                                       wait_connected)
from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from benchmarks.ingest import TENANT, IngestMismatch, LiveStream, ProbedTwin, TelemetryFeed
from benchmarks.sweep import cluster_cpus
from connectors.manager import Connectors
from connectors.mosquitto import Mosquitto
from connectors.runtime import actor_name
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
    """A gateway: QoS 1 publishes of one reading per message to `<root>/<asset>/telemetry`."""

    def __init__(self, port: int, root: str = "bench"):
        self.root = root
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-gw-{uuid.uuid4().hex[:8]}")
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.last = None

    def publish(self, row: dict) -> None:
        self.last = self.client.publish(f"{self.root}/{row['asset_id']}/telemetry", _payload(row), qos=1)

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
        broker = Mosquitto(Path(tmp), free_port(), max_inflight=1000, autosave_changes=None)  # (not killed: saves would be measured)
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


@benchmark("mqtt-kills", "The MQTT connector killed again and again mid-stream: every event applied once, time to "
           "resume after each kill")
def mqtt_connector_kills(ctx: BenchContext) -> BenchResult:
    """SIGKILL of the connector's process (`ray.kill`, Ray restarts it) at random moments of a paced stream,
    over MQTT 5 and 3.1.1: the exactly-once check is the result; the figures are what a kill costs."""
    ensure_ray()
    res = BenchResult()
    n_twins, kills = (4, 2) if ctx.quick else (20, 8)
    rate, duration_s = (200.0, 2.0) if ctx.quick else (1_000.0, 20.0)
    seed = int(time.time())  # different kill moments in every run; a failing run is replayed with its seed
    rng = np.random.default_rng(seed)
    recoveries, walls = [], {}
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-mqtt-kills-") as tmp:
        broker = Mosquitto(Path(tmp), free_port(), max_inflight=1000, autosave_changes=None)  # (not killed: saves would be measured)
        broker.start()
        artifact = ModelRegistry(f"{tmp}/registry").register("zone", "1.0.0", AssetType.from_model(THERMAL_RC))
        service = TwinService(f"{tmp}/store", shards=cluster_cpus(), namespace=f"bench-{uuid.uuid4().hex[:8]}")
        connectors = Connectors(service.router, service.assets)
        feeds = {}
        try:
            for protocol in ("5", "3.1.1"):
                name = "kills" + protocol.replace(".", "")
                feed = feeds[protocol] = TelemetryFeed(n_twins, name)
                for a in feed.assets:
                    service.register(Asset(id=a, tenant=TENANT, type_name="thermal_rc", type_version="1.0.0"),
                                     artifact)
                connectors.create({"name": name, "tenant": TENANT, "kind": "mqtt",
                                   "broker": {"host": "127.0.0.1", "port": broker.port, "protocol": protocol},
                                   "routes": [{"topic": f"{name}/+/telemetry", "asset_level": 1, "payload": MAPPING}]})
                wait_connected(connectors, name)
                stream = LiveStream(feed, rate, duration_s)
                handle = ray.get_actor(actor_name(TENANT, name), namespace=service.router.namespace)
                kill_at = np.sort(rng.uniform(0.05, 0.95, kills)) * duration_s
                t0 = time.monotonic()
                publisher = threading.Thread(target=_publish_all, args=(broker.port, name, stream), daemon=True)
                publisher.start()
                for at in kill_at:
                    time.sleep(max(0.0, t0 + at - time.monotonic()))
                    pid = _pid(handle)
                    killed = time.monotonic()
                    ray.kill(handle, no_restart=False)
                    while _pid(handle) == pid:  # a call right after the kill may still reach the old process
                        time.sleep(0.01)
                    wait_connected(connectors, name)
                    recoveries.append(time.monotonic() - killed)
                publisher.join()
                _wait_applied(service, feed)
                walls[protocol] = time.monotonic() - t0
            res.checks.update(check_exactly_once(service, {f"mqtt {p}": f for p, f in feeds.items()}))
        finally:
            connectors.stop_all(TENANT)
            service.close()
            broker.stop()
    res.checks.update({"seed": seed, "kills": len(recoveries), "recovery_s": [round(r, 2) for r in recoveries],
                       "stream_s": duration_s, "wall_s": {p: round(w, 1) for p, w in walls.items()}})
    res.figures += [
        Figure(f"MQTT connector killed {kills}x per protocol mid-stream ({rate:,.0f} msg/s): time to connected and "
               f"subscribed again, p50", float(np.median(recoveries)), "s"),
        Figure("... the same, max", float(np.max(recoveries)), "s"),
    ]
    res.notes.append(f"mqtt-kills: a paced stream of {rate * duration_s:,.0f} messages per protocol (MQTT 5, 3.1.1) "
                     f"over {n_twins} twins; the connector actor SIGKILLed (ray.kill, restarted by Ray) {kills} times "
                     "at random moments; afterwards every twin must have applied every event exactly once "
                     "(events_applied per twin against what was published)")
    return res


def _publish_all(port: int, root: str, stream: LiveStream) -> None:
    gateway = Publisher(port, root)
    for row in stream.rows():
        gateway.publish(row)
    gateway.close()


def _pid(handle: ray.actor.ActorHandle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda _: os.getpid()))


def _wait_applied(service: TwinService, feed: TelemetryFeed) -> None:
    """Until the twins applied as many events as were published (then `check_exactly_once` says whether each
    once: a lost event and a double count would offset only if both happened)."""
    deadline = time.monotonic() + WAIT_S
    while sum(service.state(TENANT, a).events_applied for a in feed.assets) < feed.sent:
        if time.monotonic() > deadline:
            applied = sum(service.state(TENANT, a).events_applied for a in feed.assets)
            raise IngestMismatch(f"{applied} of {feed.sent} events applied within {WAIT_S:g} s")
        time.sleep(0.05)
