"""MQTT connectors against a real Mosquitto broker: exactly-once effect through broker and connector
crashes, dead letters, pause/resume over a persistent session, commands back to assets.

"Exactly once" is checked two ways: a twin's revision (+1 per applied event) equals the number of
distinct events published, and its state equals a reference twin fed the same events directly
through `TwinService.ingest` (the filter's state is bit-identical for any delivery order).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import paho.mqtt.client as paho
import pytest
import ray
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from actors import TwinService
from connectors.commands import CommandError, CommandStatus, UnknownCommand
from connectors.manager import Connectors, InvalidConnector
from connectors.mqtt import MqttSpec
from connectors.runtime import actor_name
from connectors.spec import Credentials, Desired, UnknownConnector
from raytwin.contracts import Asset, AssetType, TelemetryEvent
from raytwin.registry import ModelRegistry
from raytwin.sim import TWO_TANK
from tests.conftest import free_port
from tests.fixtures_mqtt import Mosquitto

T0 = datetime(2026, 4, 1, tzinfo=UTC)
WAIT_S = 120.0
PAYLOAD = {"measurements": {"h1": {"field": "level", "unit": "mm"}, "q_in": {"field": "flow.in", "unit": "L/s"}},
           "event_time": "ts", "time_format": "epoch_ms", "sequence": "seq"}


def reading(k: int) -> dict:
    return {"ts": int((T0 + timedelta(seconds=k)).timestamp() * 1000), "seq": k, "level": 500.0 - 0.5 * k,
            "flow": {"in": 0.1 + 0.001 * (k % 7)}}


def as_event(asset: str, k: int) -> TelemetryEvent:
    r = reading(k)
    return TelemetryEvent(asset_id=asset, event_time=T0 + timedelta(seconds=k), sequence=k,
                          measurements={"h1": {"value": r["level"], "unit": "mm"},
                                        "q_in": {"value": r["flow"]["in"], "unit": "L/s"}})


def wait_for(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {WAIT_S:g} s: {what}")


class Publisher:
    """A device side: QoS 1 publishes (each confirmed by the broker) and a command listener that acks."""

    def __init__(self, port: int, answer: bool = False):
        self.port, self.received, self.lock = port, [], threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"device-{free_port()}")
        self.client.on_message = self._on_message
        self.answer = answer
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payloads: list) -> None:
        infos = [self.client.publish(topic, p if isinstance(p, bytes) else json.dumps(p), qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(30)

    def listen(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        body = json.loads(msg.payload)
        with self.lock:
            self.received.append((msg.topic, body))
        if self.answer:
            client.publish(msg.topic.rsplit("/", 1)[0] + "/ack",
                           json.dumps({"correlation_id": body["correlation_id"], "status": "ok", "applied": True}), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto"), free_port())
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def twins(ray_session, tmp_path_factory):
    artifact = ModelRegistry(str(tmp_path_factory.mktemp("reg"))).register("tank", "1.0.0",
                                                                           AssetType.from_model(TWO_TANK))
    svc = TwinService(str(tmp_path_factory.mktemp("store")), shards=1, batch_size=1000)
    for tenant, assets in (("acme", ["pump-1", "pump-2", "pump-3", "pump-4", "ref-1", "ref-2", "ref-3"]),
                           ("globex", ["pump-9"])):
        for a in assets:
            svc.register(Asset(id=a, tenant=tenant, type_name="two_tank", type_version="1.0.0"), artifact)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def connectors(twins, broker):
    manager = Connectors(twins.router, twins.assets)
    yield manager
    for tenant in ("acme", "globex"):
        manager.stop_all(tenant)


def plant_spec(port: int, protocol: str = "5", **overrides) -> dict:
    spec = {"name": "plant", "tenant": "acme", "kind": "mqtt", "linger_s": 0.1,
            "broker": {"host": "127.0.0.1", "port": port, "protocol": protocol, "reconnect_max_s": 2},
            "routes": [{"topic": "plant/+/telemetry", "asset_level": 1, "payload": PAYLOAD,
                        "command_topic": "plant/{asset_id}/cmd"}],
            "ack_topic": "plant/+/ack"}
    return {**spec, **overrides}


@pytest.fixture(scope="module")
def plant(connectors, broker):
    status = connectors.create(plant_spec(broker.port), Credentials(username="raytwin", password="s3cret-pw"))
    assert status.state is Desired.running
    wait_for(lambda: connectors.status("acme", "plant").connected, "the connector is connected")
    return "plant"


def settled(connectors, name: str, twins, expected: dict[str, int]) -> bool:
    """Every message acknowledged and every twin at its expected revision (or beyond: caught below)."""
    s = connectors.status("acme", name)
    return (s.connected and s.pending == 0
            and all(twins.state("acme", a).revision >= n for a, n in expected.items()))


def assert_exactly_once(twins, asset: str, reference: str, n: int) -> None:
    twins.ingest("acme", [as_event(reference, k) for k in range(n)])
    got, ref = twins.state("acme", asset), twins.state("acme", reference)
    assert got.revision == ref.revision == got.events_applied == n
    assert got.state == ref.state and got.covariance == ref.covariance and got.event_time == ref.event_time


def test_broker_stopped_mid_stream_loses_and_repeats_nothing(twins, connectors, broker, plant):
    device = Publisher(broker.port)
    for asset in ("pump-1", "pump-2"):
        device.publish(f"plant/{asset}/telemetry", [reading(k) for k in range(150)])
    device.close()
    broker.stop()  # mid-stream: the connector has not acknowledged everything yet
    assert connectors.status("acme", "plant").acknowledged < 300
    broker.start()
    device = Publisher(broker.port)
    for asset in ("pump-1", "pump-2"):
        device.publish(f"plant/{asset}/telemetry", [reading(k) for k in range(150, 200)])
    device.close()
    wait_for(lambda: settled(connectors, "plant", twins, {"pump-1": 200, "pump-2": 200}), "all 400 events applied")
    status = connectors.status("acme", "plant")
    assert status.errors >= 1 and "disconnected" in status.last_error or "connect" in status.last_error
    assert status.rejected == status.dead_lettered == 0
    assert_exactly_once(twins, "pump-1", "ref-1", 200)
    assert_exactly_once(twins, "pump-2", "ref-2", 200)


def test_connector_killed_mid_stream_recovers_exactly_once_mqtt311(twins, connectors, broker):
    spec = plant_spec(broker.port, protocol="3.1.1", name="line", linger_s=0.1, ack_topic=None,
                      routes=[{"topic": "line/pump-3/telemetry", "asset_id": "pump-3", "payload": PAYLOAD}])
    connectors.create(spec)
    wait_for(lambda: connectors.status("acme", "line").connected, "connected")
    device = Publisher(broker.port)
    device.publish("line/pump-3/telemetry", [reading(k) for k in range(300)])
    handle = ray.get_actor(actor_name("acme", "line"), namespace=twins.router.namespace)
    before = wait_for(lambda: (s := ray.get(handle.status.remote())).acknowledged > 0 and s, "some acknowledged")
    ray.kill(handle, no_restart=False)  # Ray restarts it; it rebuilds itself from the store
    assert before.acknowledged < 300  # mid-stream
    device.publish("line/pump-3/telemetry", [reading(k) for k in range(300, 320)])
    device.close()
    wait_for(lambda: settled(connectors, "line", twins, {"pump-3": 320}), "all 320 events applied")
    assert connectors.status("acme", "line").messages <= 320 - before.acknowledged  # a new process, fresh counters
    assert_exactly_once(twins, "pump-3", "ref-3", 320)


def test_malformed_payloads_go_to_dead_letters_with_topic_and_reason(twins, connectors, broker, plant):
    before = twins.state("acme", "pump-4").revision
    device = Publisher(broker.port)
    device.publish("plant/pump-4/telemetry", [b"not json", {"ts": reading(1)["ts"], "seq": 1},
                                              {**reading(2), "level": "high"}, [reading(3), 7]])
    device.publish("plant/bad id!/telemetry", [reading(4)])
    device.publish("plant/pump-4/telemetry", [reading(5)])
    device.close()
    wait_for(lambda: twins.state("acme", "pump-4").revision == before + 2, "the two good readings applied")
    wait_for(lambda: connectors.status("acme", "plant").pending == 0, "everything acknowledged")
    letters = {r["reason"] for r in twins.dead_letters("acme").to_pylist()}
    src = "mqtt://plant/plant/pump-4/telemetry: "
    assert any(r.startswith(src + "payload is not JSON") for r in letters)
    assert src + "level: field missing from the payload" in letters
    assert any(r.startswith(src + "measurements.h1.value.float: Input should be a valid number") for r in letters)
    assert src + "a reading must be a JSON object, not int" in letters
    assert "mqtt://plant/plant/bad id!/telemetry: topic level 1 'bad id!' is not an asset id" in letters
    assert connectors.status("acme", "plant").dead_lettered == 5


def test_paused_connector_gets_what_was_published_meanwhile(twins, connectors, broker, plant):
    start = twins.state("acme", "pump-4").revision
    paused = connectors.pause("acme", "plant")
    assert paused.state is Desired.paused and not paused.connected
    device = Publisher(broker.port)
    device.publish("plant/pump-4/telemetry", [reading(k) for k in range(100, 120)])
    device.close()
    assert twins.state("acme", "pump-4").revision == start
    assert connectors.resume("acme", "plant").state is Desired.running
    wait_for(lambda: twins.state("acme", "pump-4").revision == start + 20, "the 20 queued events applied")


def test_commands_need_approval_are_sent_once_and_acknowledged(twins, connectors, broker, plant):
    device = Publisher(broker.port, answer=True)
    device.listen("plant/+/cmd")
    held = connectors.propose("acme", "plant", "pump-1", "setpoint", {"q_in": 0.2}, by="key-alice")
    sent = connectors.propose("acme", "plant", "pump-2", "setpoint", {"q_in": 0.3}, by="key-alice")
    with pytest.raises(CommandError, match="four eyes"):
        connectors.approve("acme", sent.id, by="key-alice")
    with pytest.raises(UnknownCommand):
        connectors.approve("globex", sent.id, by="key-globex")
    with pytest.raises(UnknownConnector, match="no asset 'pump-9'"):
        connectors.propose("acme", "plant", "pump-9", "setpoint", {"q_in": 0.1}, by="key-alice")
    approved = connectors.approve("acme", sent.id, by="key-bob")
    assert approved.status is CommandStatus.sent and approved.approved_by == "key-bob"
    with pytest.raises(CommandError, match="only a proposed command can be approved"):
        connectors.approve("acme", sent.id, by="key-bob")
    done = wait_for(lambda: (c := connectors.command("acme", sent.id)).status is CommandStatus.acknowledged and c,
                    "the asset's acknowledgement recorded")
    assert done.ack == {"correlation_id": sent.correlation_id, "status": "ok", "applied": True}
    assert [s.status for s in done.history] == ["proposed", "approved", "sending", "sent", "acknowledged"]
    device.close()
    assert device.received == [("plant/pump-2/cmd", {**device.received[0][1], "correlation_id": sent.correlation_id,
                                                     "command_id": sent.id, "name": "setpoint",
                                                     "value": {"q_in": 0.3}})]
    assert connectors.command("acme", held.id).status is CommandStatus.proposed
    assert [c.id for c in connectors.commands("acme")][-2:] == [held.id, sent.id] and connectors.commands("globex") == []


def test_declarations_are_checked_and_credentials_stay_secret(twins, connectors, broker, plant):
    with pytest.raises(InvalidConnector, match="asset 'pump-9' is not a registered twin of tenant 'acme'"):
        connectors.create(plant_spec(broker.port, name="x", routes=[
            {"topic": "a/b", "asset_id": "pump-9", "payload": PAYLOAD}]))
    with pytest.raises(ValidationError, match="'#' the whole last level"):
        MqttSpec.model_validate(plant_spec(broker.port, routes=[{"topic": "a/#/b", "asset_id": "pump-1",
                                                                 "payload": PAYLOAD}]))
    with pytest.raises(ValidationError, match="exactly one of asset_id"):
        MqttSpec.model_validate(plant_spec(broker.port, routes=[{"topic": "a/b", "payload": PAYLOAD}]))
    with pytest.raises(UnknownConnector):
        connectors.status("globex", "plant")
    shown = connectors.spec("acme", "plant").model_dump_json() + connectors.status("acme", "plant").model_dump_json()
    assert "s3cret-pw" not in shown and "password" not in shown
    assert "s3cret-pw" not in repr(Credentials(password="s3cret-pw"))
