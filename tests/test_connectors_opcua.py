"""OPC UA connectors against a real asyncua server in a subprocess: every value change applied exactly once
through a server restart and connector restarts, dead letters with the node id, pause/resume through the
server's monitored-item queues, commands written with a correlation id and acknowledged.

What OPC UA lets a client guarantee (see connectors/README.md): changes that happen while a subscription
exists reach the connector; changes while no subscription exists (server down, connector down) are
represented by each node's current value, sent again when the next subscription starts. The tests check
exactly that: nothing lost while subscribed (what a full item queue discarded read back from history, or
reported), the latest value after an outage, and every re-delivery a
duplicate. "Exactly once" is checked as a twin's revision (+1 per applied event) and as its state equal to
a reference twin fed the same events directly through `TwinService.ingest`. The tests of the `plc` connector share
the plant's nodes and twins, each asserting on what it changed, not on what others left; a test of one session
has nodes of its own (`lane`): each test passes alone and in any order.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
import ray
from asyncua import ua
from pydantic import ValidationError
from typer.testing import CliRunner

from connectors.cli import connectors_app
from connectors.commands import ANSWER_OF_THE_SEND, CommandError, CommandStatus, UnknownCommand
from connectors.kinds import parse_spec
from connectors.manager import Connectors, InvalidConnector
from connectors.mapping import DeadLetter
from connectors.opcua import MappedNode, OpcUaSpec
from connectors.opcua.devserver import OpcUaServer
from connectors.opcua.recovery import QueueWatch
from connectors.opcua.session import OpcUaSession
from connectors.opcua.values import to_row
from connectors.sink import Inbound
from connectors.runtime import actor_name
from connectors.spec import Credentials
from raytwin.contracts import MAX_FUTURE_SKEW, TelemetryEvent
from raytwin.statestore import to_micros
from raytwin.ports import free_port
from tests.fixtures_connectors import WAIT_S, tank_twins, wait_for
from tests.fixtures_opcua import Device
from tests.guides import extract

T0 = datetime(2026, 4, 1, tzinfo=UTC)
USER, PASSWORD = "raytwin", "opc-s3cret-pw"
STREAMS = {"tank-1": ("tank-1.h1", "tank-1.q_in"), "tank-2": ("tank-2.h1", "tank-2.q_in")}
SET_POINTS = ["q_real", "q_int", "pump", "mode", "t_set"]
NODES = [n for pair in STREAMS.values() for n in pair] + ["tank-1.h2", "tank-1.q_set", "tank-1.q_set.id",
                                                          "tank-1.locked.id"] + [f"tank-1.{p}.id" for p in SET_POINTS]
TYPED = {"tank-1.q_real": "Float", "tank-1.q_int": "Int16",  # a PLC's REAL and INT set points
         "tank-1.pump": "Boolean", "tank-1.mode": "Enum:Off,Manual,Auto", "tank-1.t_set": "Float"}
UNITS = {"tank-1.q_set": "m³/s", "tank-1.t_set": "°C"}  # their EngineeringUnits properties


def values(k: int) -> tuple[float, float]:
    """Reading k of a tank: level in m, inflow in L/s."""
    return 0.5 + 0.01 * k, 0.1 + 0.01 * (k % 7)


def write(device: Device, asset: str, ks: range, lane: Lane | None = None) -> None:
    h1, q_in = (lane(n) if lane else n for n in STREAMS[asset])
    for k in ks:
        level, flow = values(k)
        device.write(h1, level, T0 + timedelta(seconds=k))
        device.write(q_in, flow, T0 + timedelta(seconds=k))


def events(asset: str, ks: list[int], reference: str) -> list[TelemetryEvent]:
    """The events the connector makes of readings `ks` (same keys), for the reference twin."""
    h1, q_in = STREAMS[asset]
    out = []
    for k in ks:
        level, flow = values(k)
        t = T0 + timedelta(seconds=k)
        out += [TelemetryEvent(asset_id=reference, event_time=t, sequence=int(t.timestamp()) * 10**6,
                               idempotency_key=f"ns=2;s={h1}", measurements={"h1": {"value": level, "unit": "m"}}),
                TelemetryEvent(asset_id=reference, event_time=t, sequence=int(t.timestamp()) * 10**6,
                               idempotency_key=f"ns=2;s={q_in}", measurements={"q_in": {"value": flow, "unit": "L/s"}})]
    return out


LANE_NODES = ["tank-1.h1", "tank-1.q_in", "tank-2.h1", "tank-2.q_in", "tank-1.h2"]
"""The plant's nodes as each test with a `lane` has them, under its own prefix."""


@dataclass(frozen=True)
class Lane:
    """A test's own server nodes (the plant's under a prefix no other test writes to): no value, no history and no
    twin's connector but its own, whatever ran before it. Tests on the shared nodes (the `plc` connector's) left
    readings, newest stamps and history behind that broke the tests after them in another order."""

    prefix: str
    endpoint: str

    def __call__(self, name: str) -> str:
        """A plant node's name (`tank-2.h1`) in this lane."""
        return self.prefix + name

    def spec(self, **overrides) -> dict:
        """`plc_spec` on this lane's nodes."""
        return plc_spec(self.endpoint, self.prefix, **overrides)


def lane_prefixes(session: pytest.Session) -> dict[str, str]:
    """Each collected test of this file that asks for a `lane`: its nodes' prefix (the server declares them all)."""
    tests = [item.nodeid for item in session.items
             if getattr(item, "module", None) is not None and item.module.__name__ == __name__
             and "lane" in getattr(item, "fixturenames", ())]
    return {nodeid: f"lane{k}." for k, nodeid in enumerate(tests)}


@pytest.fixture(scope="module")
def server(request):
    lanes = [prefix + n for prefix in lane_prefixes(request.session).values() for n in LANE_NODES]
    s = OpcUaServer(free_port(), NODES + lanes, ["tank-1.locked"], f"{USER}:{PASSWORD}", history=True, typed=TYPED,
                    units=UNITS)
    s.start()
    yield s
    s.kill()


@pytest.fixture
def lane(server, request) -> Lane:
    return Lane(lane_prefixes(request.session)[request.node.nodeid], server.endpoint)


@pytest.fixture
def device(server):
    d = Device(server)
    yield d
    d.close()


@pytest.fixture(scope="module")
def twins(ray_session, tmp_path_factory):
    with tank_twins(tmp_path_factory, {"acme": ["tank-1", "tank-2", "ref-1", "ref-2"], "globex": ["tank-9"]}) as svc:
        yield svc


@pytest.fixture(scope="module")
def connectors(twins):
    manager = Connectors(twins.router, twins.assets)
    yield manager
    for tenant in ("acme", "globex"):
        manager.stop_all(tenant)


def plc_spec(endpoint: str, prefix: str = "", **overrides) -> dict:
    """The `plc` connector's declaration; `prefix`: a lane's, for its nodes (its commands stay the shared ones)."""
    nodes = [{"node_id": f"ns=2;s={prefix}{asset}.h1", "asset_id": asset, "measurement": "h1", "unit": "m"}
             for asset in STREAMS]
    nodes += [{"node_id": f"nsu=urn:raytwin:test;s={prefix}{asset}.q_in", "asset_id": asset, "measurement": "q_in",
               "unit": "L/s"} for asset in STREAMS]
    nodes += [{"node_id": f"ns=2;s={prefix}tank-1.h2", "asset_id": "tank-1", "measurement": "h2", "unit": "m"}]
    commands = [{"asset_id": "tank-1", "name": "inflow", "node_id": "ns=2;s=tank-1.q_set",
                 "correlation_node_id": "ns=2;s=tank-1.q_set.id", "unit": "m^3/s"},
                {"asset_id": "tank-1", "name": "lock", "node_id": "ns=2;s=tank-1.locked",
                 "correlation_node_id": "ns=2;s=tank-1.locked.id", "unit": "m^3/s"}]
    commands += [{"asset_id": "tank-1", "name": f"inflow_{kind}", "node_id": f"ns=2;s=tank-1.q_{kind}",
                  "correlation_node_id": f"ns=2;s=tank-1.q_{kind}.id", "unit": "L/s"} for kind in ("real", "int")]
    commands += [{"asset_id": "tank-1", "name": name, "node_id": f"ns=2;s=tank-1.{node}",
                  "correlation_node_id": f"ns=2;s=tank-1.{node}.id", "unit": unit}
                 for name, node, unit in [("pump", "pump", "-"), ("mode", "mode", "-"), ("heat", "t_set", "L/s"),
                                          ("inflow_litres", "q_set", "L/s")]]  # the last two: not the node's unit
    spec = {"name": "plc", "tenant": "acme", "kind": "opcua", "endpoint": endpoint, "linger_s": 0.05,
            "publishing_interval_ms": 50, "backfill_s": 3600, "backoff_initial_s": 0.2, "backoff_max_s": 1.0,
            "nodes": nodes, "commands": commands}
    return {**spec, **overrides}


@pytest.fixture(scope="module")
def plc(connectors, server):
    connectors.create(plc_spec(server.endpoint), Credentials(username=USER, password=PASSWORD))
    wait_for(lambda: connectors.status("acme", "plc").connected, "the connector is connected")
    return "plc"


def revision(twins, asset: str) -> int:
    return twins.state("acme", asset).revision


def settled(connectors, twins, asset: str, n: int) -> bool:
    s = connectors.status("acme", "plc")
    return s.connected and s.pending == 0 and revision(twins, asset) >= n


def test_server_and_connector_restarts_apply_every_change_exactly_once(twins, connectors, server, device, plc):
    """Subscribed: every change arrives. Server killed and restarted, connector restarted by Ray: the current
    values and the history read again are duplicates. Connector down while values change: the changes are
    read from the server's history (backfill) when it is back."""
    write(device, "tank-1", range(0, 20))
    wait_for(lambda: settled(connectors, twins, "tank-1", 40), "the first 40 changes applied")

    server.kill()
    wait_for(lambda: not connectors.status("acme", "plc").connected, "the connector notices the server is gone")
    server.start()
    wait_for(lambda: connectors.status("acme", "plc").connected, "the connector reconnects")
    restarted = Device(server)  # a restarted server starts without values (BadWaitingForInitialData)
    write(restarted, "tank-1", range(20, 40))
    wait_for(lambda: settled(connectors, twins, "tank-1", 80), "the changes after the server restart applied")

    handle = ray.get_actor(actor_name("acme", "plc"), namespace=twins.router.namespace)
    ray.kill(handle, no_restart=False)  # a crash: Ray restarts the actor, which subscribes again
    wait_for(lambda: (s := connectors.status("acme", "plc")).connected and s.duplicates >= 42 and s.pending == 0,
             "the restarted connector's re-deliveries (history since the restart, current values) are duplicates")
    assert revision(twins, "tank-1") == 80

    ray.kill(handle, no_restart=True)  # gone for good while the plant keeps changing
    write(restarted, "tank-1", range(40, 45))
    connectors.status("acme", "plc")  # starts it again from its declaration
    wait_for(lambda: settled(connectors, twins, "tank-1", 90), "the changes made during the outage, backfilled")
    restarted.close()

    twins.ingest("acme", events("tank-1", list(range(0, 45)), "ref-1"))
    got, ref = twins.state("acme", "tank-1"), twins.state("acme", "ref-1")
    assert got.revision == ref.revision == got.events_applied == 90
    assert got.state == ref.state and got.covariance == ref.covariance and got.event_time == ref.event_time


def letter(twins, key: str, said: str) -> dict:
    """The one dead letter of node `key` whose reason says `said` (other tests dead-letter other changes of a node)."""
    found = [r for r in twins.dead_letters("acme").to_pylist() if r["idempotency_key"] == key and said in r["reason"]]
    assert len(found) == 1, found
    return found[0]


def test_malformed_and_out_of_range_values_go_to_dead_letters_with_node_id(twins, connectors, device, plc):
    before, level = connectors.status("acme", "plc").acknowledged, revision(twins, "tank-2")
    device.write("tank-1.h2", "full", T0 + timedelta(seconds=100))
    device.write("tank-2.h1", 5000.0, T0 + timedelta(seconds=100))  # 5 km: beyond [-1, 1000] m
    device.write("tank-2.q_in", 0.1, datetime.now(UTC) + timedelta(hours=1))  # a controller clock 1 h ahead
    wait_for(lambda: connectors.status("acme", "plc").acknowledged >= before + 3, "the three changes durable")
    malformed = letter(twins, "ns=2;s=tank-1.h2", "'full'")
    implausible = letter(twins, "ns=2;s=tank-2.h1", "outside the plausible range")
    assert "opcua://plc/ns=2;s=tank-1.h2" in malformed["reason"] and "'full' of type String is not a number" in \
        malformed["reason"]
    assert malformed["asset_id"] == "tank-1" and '"node_id": "ns=2;s=tank-1.h2"' in malformed["raw"]
    assert "outside the plausible range" in implausible["reason"] and implausible["asset_id"] == "tank-2"
    assert implausible["reason"].startswith("opcua://plc/ns=2;s=tank-2.h1: ")  # the twin's refusal: the connector's
    future = letter(twins, "nsu=urn:raytwin:test;s=tank-2.q_in", "clock is ahead")
    assert "opcua://plc/nsu=urn:raytwin:test;s=tank-2.q_in" in future["reason"]
    assert "after the server received the value" in future["reason"] and "clock is ahead" in future["reason"]
    assert revision(twins, "tank-2") == level


def test_a_restarted_connector_does_not_dead_letter_a_bad_value_change_again(twins, connectors, server, device,
                                                                            plc):
    """A dead-lettered value change ('brim', a string) is sent again at every new subscription (a reconnect, a
    restart) and read again by the restarted connector's backfill: it was dead-lettered again each time (one bad
    change, three dead letters after two restarts). It is the same change (node and source timestamp), written
    once, counted as a duplicate."""
    def letters(value: str) -> int:
        return sum(f"'{value}' of type String" in r["reason"] for r in twins.dead_letters("acme").to_pylist())

    device.write("tank-1.h2", "brim", T0 + timedelta(seconds=110))
    wait_for(lambda: letters("brim") == 1, "the bad change dead-lettered")
    handle = ray.get_actor(actor_name("acme", "plc"), namespace=twins.router.namespace)
    for restart in range(2):
        ray.kill(handle, no_restart=False)  # a crash: Ray restarts the actor, which subscribes and backfills again
        wait_for(lambda: (s := connectors.status("acme", "plc")).connected and s.duplicates > 0 and s.pending == 0,
                 f"restart {restart}: the re-deliveries counted as duplicates")
    server.kill()  # and a reconnect of a running connector: the server sends each item's current value again
    wait_for(lambda: not connectors.status("acme", "plc").connected, "the connector notices the server is gone")
    server.start()
    wait_for(lambda: connectors.status("acme", "plc").connected, "the connector reconnects")
    plant = Device(server)  # a restarted server starts without values or history
    plant.write("tank-1.h2", "brim", T0 + timedelta(seconds=110))  # the same change, sent by the PLC again
    plant.write("tank-1.h2", "empty", T0 + timedelta(seconds=111))  # a new bad change: dead-lettered
    wait_for(lambda: letters("brim") == 1 and letters("empty") == 1,
             "the new bad change dead-lettered, the old one not again")
    plant.close()
    assert letters("brim") == 1


def test_paused_connector_gets_the_changes_queued_by_the_server(twins, connectors, device, plc):
    """Paused = publishing off: the server keeps each item's changes (up to queue_size) until resume. A reading
    that repeats the value its node holds (an inflow of 0.1 left by another test) is a new sample all the same.
    A paused connector is not connected, as a paused MQTT one is not (it read connected: its session stays open)."""
    paused = connectors.pause("acme", "plc")
    assert paused.state.value == "paused" and not paused.connected
    write(device, "tank-2", range(0, 10))
    assert connectors.resume("acme", "plc").state.value == "running"
    wait_for(lambda: settled(connectors, twins, "tank-2", 20), "the 20 queued changes applied after resume")
    twins.ingest("acme", events("tank-2", list(range(10)), "ref-2"))
    got, ref = twins.state("acme", "tank-2"), twins.state("acme", "ref-2")
    assert got.revision == ref.revision == 20 and got.state == ref.state


def test_commands_are_written_with_correlation_id_once_and_acknowledged(connectors, server, device, plc):
    command = connectors.propose("acme", "plc", "tank-1", "inflow", {"value": 2.5, "unit": "L/s"}, by="alice")
    assert command.status is CommandStatus.proposed and device.read("tank-1.q_set.id") is None
    with pytest.raises(CommandError, match="another key must approve"):
        connectors.approve("acme", command.id, by="alice")
    connectors.approve("acme", command.id, by="bob")
    done = wait_for(lambda: (c := connectors.command("acme", command.id)).status is CommandStatus.acknowledged and c,
                    "the write acknowledged")
    assert device.read("tank-1.q_set") == pytest.approx(0.0025)  # 2.5 L/s in the node's m^3/s
    assert device.read("tank-1.q_set.id") == command.correlation_id
    assert "Good" in done.ack["detail"]
    with pytest.raises(CommandError, match="only a proposed command can be approved"):
        connectors.approve("acme", command.id, by="carol")

    refused = connectors.propose("acme", "plc", "tank-1", "lock", {"value": 1.0}, by="alice")
    failed = connectors.approve("acme", refused.id, by="bob")
    assert failed.status is CommandStatus.failed and failed.history[-1].detail == (  # it read "not sent"
        f"sent and refused: server {server.endpoint} answered the write with "
        "ns=2;s=tank-1.locked: BadUserAccessDenied, ns=2;s=tank-1.locked.id: not written")
    assert device.read("tank-1.locked.id") is None  # no new command id announced beside an unchanged set point
    with pytest.raises(UnknownCommand):
        connectors.approve("globex", command.id, by="bob")


def test_a_restarted_connector_records_the_answer_of_a_command_it_sent(twins, connectors, plc):
    """A command's answer is the server's statuses for its writes, recorded after the send returned (accepted): a
    process that stopped between the two left the command sent, and its restart awaited an answer no server gives
    again, then expired it as unanswered by the asset. It was recorded sent only once the server accepted both writes,
    so the restart acknowledges it. (The crash is the ledger's state it leaves: sent, no answer.)"""
    command = connectors.propose("acme", "plc", "tank-1", "inflow", {"value": 1.5, "unit": "L/s"}, by="alice")
    connectors.ledger.approve("acme", command.id, by="bob")
    connectors.ledger.sent(connectors.ledger.claim("acme", command.id, "plc"), ack_timeout_s=300.0)
    ray.kill(ray.get_actor(actor_name("acme", "plc"), namespace=twins.router.namespace), no_restart=False)
    done = wait_for(lambda: (c := connectors.command("acme", command.id)).status is not CommandStatus.sent and c,
                    "the restarted connector settles the command")
    assert (done.status, done.ack, done.history[-1].by) == (CommandStatus.acknowledged, ANSWER_OF_THE_SEND,
                                                            "connector:plc")
    wait_for(lambda: (s := connectors.status("acme", "plc")).connected and s.pending == 0, "the connector is back")


def test_a_write_the_server_does_not_answer_is_recorded_outcome_unknown_not_unsent(server, device, tmp_path):
    """A command write that timed out was recorded "not sent", though its request had reached the server, which may
    have written it (here it did): an operator believing it unsent could send it again and actuate twice. Once a write
    is requested, a missing answer is "outcome unknown" (a connector runtime in this process, its adapter's session on
    the test server, the write's answer held back after the server took it)."""
    from connectors.commands import CommandLedger
    from connectors.opcua.adapter import OpcUaAdapter
    from connectors.runtime import ConnectorRuntime

    spec = OpcUaSpec.model_validate(plc_spec(server.endpoint, name="unanswered", request_timeout_s=0.5, nodes=[
        {"node_id": "ns=2;s=tank-1.h2", "asset_id": "tank-1", "measurement": "h2", "unit": "m"}]))
    runtime = object.__new__(ConnectorRuntime)
    runtime.ledger, runtime.tenant, runtime.name, runtime.spec = CommandLedger(str(tmp_path)), "acme", spec.name, spec
    runtime._commands, runtime._awaiting, runtime._answers, runtime._sending = threading.Lock(), {}, {}, set()
    runtime._unrecorded = {}
    runtime.adapter = adapter = OpcUaAdapter(spec, Credentials(username=USER, password=PASSWORD), lambda m: m.ack(),
                                             runtime._on_ack)
    adapter.start()
    try:
        wait_for(adapter.connected, "the session connected")
        uaclient = adapter._session._client.uaclient
        write = uaclient.write_attributes

        async def unanswered(*args, **kwargs):
            await write(*args, **kwargs)  # the server takes it
            await asyncio.sleep(3600)  # and its answer never arrives

        uaclient.write_attributes = unanswered
        command = runtime.ledger.propose("acme", spec.name, "tank-1", "inflow", {"value": 4.2, "unit": "L/s"}, "alice")
        failed = runtime.approve("acme", command.id, "bob")
    finally:
        adapter.stop()
    assert failed.status is CommandStatus.failed and failed.history[-1].detail == (
        f"outcome unknown: server {server.endpoint} did not answer the write of ns=2;s=tank-1.q_set (TimeoutError: no "
        "answer within 1 s): it may have written it; not re-sent: check the asset")
    assert device.read("tank-1.q_set") == pytest.approx(0.0042)  # it had: "not sent" was untrue
    assert runtime._awaiting == {}


def approved(connectors, name: str, value: dict):
    command = connectors.propose("acme", "plc", "tank-1", name, value, by="alice")
    connectors.approve("acme", command.id, by="bob")
    return command, wait_for(lambda: (c := connectors.command("acme", command.id)).status in (
        CommandStatus.acknowledged, CommandStatus.failed) and c, "the command acknowledged or failed")


def test_commands_are_written_in_the_set_points_own_data_type(connectors, device, plc):
    """A PLC's REAL (Float) or INT set point refuses a Double (BadTypeMismatch): the value goes in the node's
    DataType; an integer node refuses a fraction or a value beyond its range before anything is written."""
    real, done = approved(connectors, "inflow_real", {"value": 2.5})
    assert done.status is CommandStatus.acknowledged, done.history[-1].detail
    assert device.read("tank-1.q_real") == 2.5 and device.read("tank-1.q_real.id") == real.correlation_id
    whole, done = approved(connectors, "inflow_int", {"value": 0.007, "unit": "m^3/s"})  # 7 L/s
    assert done.status is CommandStatus.acknowledged, done.history[-1].detail
    assert device.read("tank-1.q_int") == 7 and device.read("tank-1.q_int.id") == whole.correlation_id
    for value, why in [(2.5, "is of type Int16: value 2.5 (in the command node's unit) is not a whole number"),
                       (40000, "is of type Int16: value 40000 is outside its range [-32768, 32767]")]:
        _, failed = approved(connectors, "inflow_int", {"value": value})
        assert failed.status is CommandStatus.failed and why in failed.history[-1].detail, failed.history[-1].detail
        assert failed.history[-1].detail.startswith("not sent: ValueError: node ns=2;s=tank-1.q_int ")
    assert device.read("tank-1.q_int") == 7 and device.read("tank-1.q_int.id") == whole.correlation_id


def test_a_reading_from_a_clock_ahead_stays_dead_lettered_after_a_restarts_backfill(twins, connectors, device, plc):
    """A PLC clock 5 min 2 s ahead: dead-lettered live, and once it is less than 5 min ahead of the clock a restart's
    backfill read it again and applied it (one reading, two fates; the twin's clock jumped ahead). Judged against
    the server's receive time, it is dead-lettered again (written once) and the twin never goes ahead."""
    def ahead_letters() -> list[dict]:
        return [r for r in twins.dead_letters("acme").to_pylist()
                if r["idempotency_key"] == "ns=2;s=tank-1.h1" and "clock is ahead" in r["reason"]]

    before, written = revision(twins, "tank-1"), datetime.now(UTC)
    device.write("tank-1.h1", 0.48, written + MAX_FUTURE_SKEW + timedelta(seconds=2))
    wait_for(lambda: len(ahead_letters()) == 1, "the reading dead-lettered live")
    assert "the device's (PLC's) clock is ahead of the server's by more than 0:05:00" in ahead_letters()[0]["reason"]
    status = connectors.status("acme", "plc")
    assert "ns=2;s=tank-1.h1" in status.last_error and "clock is ahead" in status.last_error, status.last_error
    time.sleep(max(0.0, (written + timedelta(seconds=3) - datetime.now(UTC)).total_seconds()))  # now < 5 min ahead
    handle = ray.get_actor(actor_name("acme", "plc"), namespace=twins.router.namespace)
    ray.kill(handle, no_restart=False)  # a crash: Ray restarts it, it subscribes and backfills from history
    seen: list[int] = []
    wait_for(lambda: (s := connectors.status("acme", "plc")).connected and s.pending == 0 and s.duplicates > 0 and (
        seen.append(s.messages) or seen[-10:] == [s.messages] * 10), "the restarted connector's backfill settled")
    state = twins.state("acme", "tank-1")
    assert state.revision == before and len(ahead_letters()) == 1
    assert state.event_time is None or state.event_time <= datetime.now(UTC) + MAX_FUTURE_SKEW


def test_boolean_and_enumeration_set_points_take_their_own_values(connectors, device, plc):
    """A PLC's BOOL and enumeration (an Int32 declaring its values) set points were refused at proposal: true/false
    (or 1/0) go to a Boolean, a declared value to an enumeration; anything else fails before anything is written."""
    for value, expected in [(True, True), (0, False)]:
        command, done = approved(connectors, "pump", {"value": value})
        assert done.status is CommandStatus.acknowledged, done.history[-1].detail
        assert device.read("tank-1.pump") is expected and device.read("tank-1.pump.id") == command.correlation_id
    mode, done = approved(connectors, "mode", {"value": 2})
    assert done.status is CommandStatus.acknowledged and device.read("tank-1.mode") == 2, done.history[-1].detail
    for name, value, why in [
            ("pump", 2, "node ns=2;s=tank-1.pump is a Boolean: value 2 is neither true/false nor 0/1"),
            ("mode", 3, "node ns=2;s=tank-1.mode is an enumeration: value 3 is none of its declared values 0 (Off), "
                        "1 (Manual), 2 (Auto); propose one of them"),
            ("mode", True, "node ns=2;s=tank-1.mode is an enumeration: true is written only to a Boolean node"),
            ("inflow_real", False, "node ns=2;s=tank-1.q_real is of type Float: false is written only to a Boolean")]:
        _, failed = approved(connectors, name, {"value": value})
        assert failed.status is CommandStatus.failed, failed.history[-1].detail
        assert failed.history[-1].detail.startswith(f"not sent: ValueError: {why}"), failed.history[-1].detail
    assert device.read("tank-1.mode") == 2 and device.read("tank-1.mode.id") == mode.correlation_id
    with pytest.raises(InvalidConnector, match="value true takes no unit"):
        connectors.propose("acme", "plc", "tank-1", "pump", {"value": True, "unit": "%"}, by="alice")


def test_a_set_point_declaring_another_unit_than_its_command_node_is_not_written(connectors, device, plc):
    """A command node declared in L/s on a node whose EngineeringUnits say m³/s (or °C) wrote its value 1000 times
    too small (or a flow as a temperature): the node's own unit is read and compared before anything is written."""
    before = device.read("tank-1.q_set"), device.read("tank-1.t_set")
    for name, node, why in [
            ("inflow_litres", "q_set", "declares EngineeringUnits 'm^3/s', the command node's unit is 'L/s': a value "
                                       "in 'L/s' would be taken as if in 'm^3/s'; declare unit 'm^3/s'"),
            ("heat", "t_set", "declares EngineeringUnits '°C', of another dimension than the command node's unit "
                              "'L/s' (cannot convert 'L/s' to '°C'")]:
        _, failed = approved(connectors, name, {"value": 2.0})
        assert failed.status is CommandStatus.failed and failed.history[-1].detail.startswith(
            f"not sent: ValueError: node ns=2;s=tank-1.{node} {why}"), failed.history[-1].detail
    assert (device.read("tank-1.q_set"), device.read("tank-1.t_set")) == before


def test_declarations_are_checked_and_credentials_stay_secret(connectors, server, plc):
    with pytest.raises(InvalidConnector, match="'tank-7' is not a registered twin"):
        connectors.create(plc_spec(server.endpoint, name="other", nodes=[
            {"node_id": "ns=2;s=x", "asset_id": "tank-7", "measurement": "h1", "unit": "m"}]))
    with pytest.raises(InvalidConnector, match=r"node 'ns=2;s=x': asset 'tank-1' \(type two_tank@1.0.0\) has no "
                       "measurement 'level'; its measurements: h1, h2, q_in"):  # every change dead-lettered, for good
        connectors.create(plc_spec(server.endpoint, name="other", nodes=[
            {"node_id": "ns=2;s=x", "asset_id": "tank-1", "measurement": "level", "unit": "m"}]))
    with pytest.raises(InvalidConnector, match=r"node 'ns=2;s=x': unit 'degC' cannot be converted to h2's unit 'm' "
                       r"of two_tank@1.0.0 \(cannot convert 'degC' to 'm'"):  # every reading refused by the twin
        connectors.create(plc_spec(server.endpoint, name="other", nodes=[
            {"node_id": "ns=2;s=x", "asset_id": "tank-1", "measurement": "h2", "unit": "degC"}]))
    inflow = plc_spec(server.endpoint)["commands"][0]
    with pytest.raises(ValidationError, match="lower 1 > upper 0 would refuse every value; give lower <= upper"):
        connectors.create(plc_spec(server.endpoint, name="other", commands=[{**inflow, "lower": 1, "upper": 0}]))
    with pytest.raises(ValidationError, match="correlation_node_id is node_id 'ns=2;s=tank-1.q_set'; the "
                       "correlation id needs its own string variable"):
        connectors.create(plc_spec(server.endpoint, name="other", commands=[
            {**inflow, "correlation_node_id": inflow["node_id"]}]))
    with pytest.raises(ValidationError, match=r"node_id 'ns=2;s=tank-1.q_set' and correlation_node_id "
                       r"'nsu=urn:raytwin:test;s=tank-1.q_set' have one identifier, one with a namespace index \(ns=\) "
                       r"and one with a URI \(nsu=\): they are one server node if that index is that URI on the "
                       r"server; spell both with nsu= \(or both with ns=\)"):  # the id would overwrite the set point
        connectors.create(plc_spec(server.endpoint, name="other", commands=[
            {**inflow, "correlation_node_id": "nsu=urn:raytwin:test;s=tank-1.q_set"}]))
    with pytest.raises(ValidationError, match=r"node_id 'ns=2;s=tank-1.q_set' and correlation_node_id "
                       "'ns=02;s=tank-1.q_set' name one server node"):
        connectors.create(plc_spec(server.endpoint, name="other", commands=[
            {**inflow, "correlation_node_id": "ns=02;s=tank-1.q_set"}]))
    assert "other" not in connectors.names("acme")
    with pytest.raises(ValidationError, match="not in the endpoint") as refused:
        connectors.create(plc_spec(f"opc.tcp://{USER}:{PASSWORD}@127.0.0.1:{server.port}/"))
    assert PASSWORD not in str(refused.value)  # (its text is logged where a declaration of the config fails)
    with pytest.raises(ValidationError, match="duplicate node_id"):
        connectors.create(plc_spec(server.endpoint, nodes=plc_spec(server.endpoint)["nodes"] * 2))
    assert PASSWORD not in connectors.spec("acme", "plc").model_dump_json()

    connectors.create(plc_spec(server.endpoint, name="wrong-pw"), Credentials(username=USER, password="guess"))
    s = wait_for(lambda: (s := connectors.status("acme", "wrong-pw")).errors >= 1 and s, "a refused session reported")
    assert not s.connected and "BadUserAccessDenied" in s.last_error and "guess" not in s.last_error
    assert "the server refused the session's user: check the connector's username and password" in s.last_error
    connectors.delete("acme", "wrong-pw")


NODE = MappedNode(node_id="ns=2;s=tank-1.h1", asset_id="tank-1", measurement="h1", unit="m")


@pytest.mark.parametrize(("variant", "status", "expected"), [
    (ua.Variant(1.5, ua.VariantType.Double), ua.StatusCodes.Good, ("good", 1.5)),
    (ua.Variant(7, ua.VariantType.Int32), ua.StatusCodes.UncertainLastUsableValue, ("uncertain", 7.0)),
    (ua.Variant(2.0, ua.VariantType.Float), ua.StatusCodes.BadSensorFailure, ("bad", 2.0)),
    (ua.Variant(None, ua.VariantType.Null), ua.StatusCodes.BadWaitingForInitialData, None),
    (ua.Variant(True, ua.VariantType.Boolean), ua.StatusCodes.Good, "of type Boolean is not a number"),
    (ua.Variant([1.0, 2.0], ua.VariantType.Double), ua.StatusCodes.Good, "is not a number"),
    (ua.Variant(float("nan"), ua.VariantType.Double), ua.StatusCodes.Good, "value nan is not finite"),
])
def test_a_value_change_becomes_one_keyed_row_or_a_dead_letter(variant, status, expected):
    at = T0 + timedelta(seconds=3, microseconds=250)
    out = to_row("plc", NODE, ua.DataValue(variant, StatusCode=ua.StatusCode(status), SourceTimestamp=at))
    if expected is None:
        assert out is None
    elif isinstance(expected, str):
        assert isinstance(out, DeadLetter) and expected in out.reason and out.idempotency_key == NODE.node_id
        assert out.source == "opcua://plc/ns=2;s=tank-1.h1" and out.asset_id == "tank-1"
    else:
        assert (out["quality"], out["measurements"]["h1"]) == (expected[0], {"value": expected[1], "unit": "m"})
        assert (out["event_time"], out["sequence"], out["idempotency_key"]) == (at.isoformat(), to_micros(at),
                                                                                NODE.node_id)
        assert TelemetryEvent.model_validate(out).event_time == at  # the row is what the contract reads


def test_a_reading_is_judged_from_the_future_against_the_servers_receive_time_not_the_delivery():
    """Read back a day later (a restart's backfill), a reading stamped 5.5 min after the server received it is still
    from the future, and one 4.5 min after still is not: the verdict is the reading's, not the hour's."""
    received = datetime.now(UTC) - timedelta(days=1)
    for ahead, refused in ((timedelta(minutes=5, seconds=30), True), (timedelta(minutes=4, seconds=30), False)):
        dv = ua.DataValue(ua.Variant(0.5, ua.VariantType.Double), SourceTimestamp=received + ahead,
                          ServerTimestamp=received)
        out = to_row("plc", NODE, dv)
        assert isinstance(out, DeadLetter) is refused, out
    assert out["event_time"] == (received + ahead).isoformat()
    dv = ua.DataValue(ua.Variant(0.5, ua.VariantType.Double), ServerTimestamp=received,
                      SourceTimestamp=received + timedelta(minutes=5, seconds=30))
    assert to_row("plc", NODE, dv).reason.endswith(
        "is 0:05:30 after the server received the value (ServerTimestamp "
        f"{received.isoformat()}): the device's (PLC's) clock is ahead of the server's by more than 0:05:00; "
        "correct the device's clock (NTP)")


def test_a_status_without_a_value_does_not_make_later_readings_late():
    """A restarted server sends each node's BadWaitingForInitialData stamped at its start; taken as a reading, it
    made the readings after it look stamped before the newest, so a full queue was read back over `backfill_s`
    before now, where readings stamped earlier are not, and losses were reported that had not happened (seen as a
    test failing after the server-restart test, depending on whether that status was published before a pause)."""
    watch, nid = QueueWatch(3, timedelta(hours=1)), ua.NodeId("tank-2.h1", 2)
    waiting = ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadWaitingForInitialData),
                           SourceTimestamp=datetime.now(UTC), ServerTimestamp=datetime.now(UTC))
    readings = [ua.DataValue(ua.Variant(0.5, ua.VariantType.Double), SourceTimestamp=T0 + timedelta(seconds=k),
                             ServerTimestamp=datetime.now(UTC)) for k in range(3)]
    assert not watch.published({nid: [waiting]})
    assert watch.published({nid: readings})  # a full queue: its history is read, with no reading before it,
    assert watch.take()[nid].since == T0 - timedelta(hours=1)  # from `backfill_s` before its first value
    later = [replace(dv, SourceTimestamp=dv.SourceTimestamp + timedelta(seconds=10)) for dv in readings]
    assert watch.published({nid: later}) and watch.take()[nid].since == T0 + timedelta(seconds=2)  # the newest before


def test_a_full_queue_with_no_reading_before_it_is_read_from_before_its_first_value():
    """The first values of a node (a new subscription, a restarted server's node without a value) arriving as a
    full queue: what was discarded is stamped before the first of them, by an unknown amount. The read started at
    that first value, so the discarded readings were neither read back nor reported (the pause test after the
    server restart lost one now and then: the resume's backfill read history a moment before it held them all)."""
    watch, nid = QueueWatch(3, timedelta(hours=1)), ua.NodeId("tank-2.h1", 2)
    readings = [ua.DataValue(ua.Variant(0.5, ua.VariantType.Double), SourceTimestamp=T0 + timedelta(seconds=k))
                for k in range(7, 10)]
    assert watch.published({nid: readings})
    assert watch.take()[nid].since == T0 + timedelta(seconds=7) - timedelta(hours=1)


def test_a_refused_session_or_connection_says_how_to_fix_it():
    """Found by an outside tester: only asyncua's words were shown, a wrong password as "User does not have permission
    to perform the requested operation", nothing listening as "[Errno 111] Connection refused"."""
    from connectors.opcua.session import connect_problem

    endpoint = "opc.tcp://plc-1.plant:4841/"
    assert connect_problem(endpoint, ua.uaerrors.BadIdentityTokenRejected(), credentials=False).endswith(
        ": the server refuses a session without a user, and this connector has no credentials: declare it again with a "
        "username and password")
    assert connect_problem(endpoint, ConnectionRefusedError(111, "Connection refused"), credentials=True) == (
        "ConnectionRefusedError: [Errno 111] Connection refused: server plc-1.plant:4841 refused the TCP connection "
        "(nothing listens on port 4841): check the endpoint's host and port, and that the server runs")
    timeout = ua.uaerrors.BadTimeout()  # (no fix known: as before)
    assert connect_problem(endpoint, timeout, credentials=True) == f"BadTimeout: {timeout}"


def test_a_value_without_source_timestamp_is_dead_lettered():
    no_time = to_row("plc", NODE, ua.DataValue(ua.Variant(1.0, ua.VariantType.Double)))
    assert "no source timestamp" in no_time.reason and no_time.idempotency_key == NODE.node_id


def test_the_dev_server_starts_without_importing_the_connector():
    """The dev server's process (`python -m connectors.opcua.devserver`) imported the connector through its package,
    and with it Ray and Arrow: seconds more at each start of a server, which these tests restart often."""
    probe = "import sys, connectors.opcua.devserver; print(sorted({'ray', 'pyarrow'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_the_readme_declaration_is_valid(tmp_path):
    block = next(b for b in extract("connectors/README.md") if b.lang == "json" and '"opcua"' in b.text)
    spec = parse_spec(json.loads(block.text))
    assert isinstance(spec, OpcUaSpec) and spec.command("tank-1", "inflow").unit == "m^3/s"
    (path := tmp_path / "plc.json").write_text(block.text)
    checked = CliRunner().invoke(connectors_app, ["check", str(path)])
    assert checked.exit_code == 0 and checked.stdout.strip() == (
        f"{path}: ok (opcua connector {spec.name!r}, {len(spec.nodes)} node(s), {len(spec.commands)} command(s), "
        f"backfill {spec.backfill_s:g} s)")


async def until(condition, what: str) -> None:
    """`wait_for` for a test's own event loop: poll `condition` until `WAIT_S` has passed (then fail naming `what`)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT_S:g} s: {what}"
        await asyncio.sleep(0.02)


def test_backpressure_switches_publishing_off_and_on_again_losing_nothing(lane, device):
    """With `max_outstanding` changes not yet durable the connector switches publishing off; once they are
    durable it switches it on again (else the second wave would never arrive); every change arrives once."""
    spec = OpcUaSpec.model_validate(lane.spec(max_outstanding=4, backfill_s=0))
    since = (T0 + timedelta(seconds=100)).isoformat()
    received: list[Inbound] = []

    def written() -> list[tuple[str, str]]:
        """(node id, source time) of the changes this test wrote (each node's current value comes first)."""
        rows = [m.rows[0] for m in received if m.rows]
        return [(r["idempotency_key"], r["event_time"]) for r in rows if r["event_time"] >= since]

    def ack_all() -> None:
        for m in received[acked[0]:]:
            m.ack()
        acked[0] = len(received)

    async def scenario() -> OpcUaSession:
        session = OpcUaSession(spec, Credentials(username=USER, password=PASSWORD), received.append)
        run = asyncio.ensure_future(session.run())
        await until(session.connected, "the session is connected")
        await asyncio.to_thread(write, device, "tank-2", range(100, 110), lane)
        await until(lambda: session.held, "publishing switched off")
        ack_all()
        # (changes in flight when it switched off come too)
        await until(lambda: ack_all() or not session.held, "publishing switched on again")
        await asyncio.to_thread(write, device, "tank-2", range(110, 130), lane)
        await until(lambda: ack_all() or (len(written()) == 60 and session.outstanding() == 0),
                    "all 60 changes received and durable")  # ack as they come
        session.stop()
        await run
        return session

    acked = [0]
    session = asyncio.run(scenario())
    assert session.backpressure_pauses >= 1
    keys = written()
    assert len(set(keys)) == 60
    for node in STREAMS["tank-2"]:
        times = [t for k, t in keys if k.endswith(node)]
        assert times == [(T0 + timedelta(seconds=k)).isoformat() for k in range(100, 130)]


def test_a_gap_without_backfill_is_reported_with_its_length(server):
    """Changes made while no subscription exists are not read back without `backfill_s`: the session says so
    after it subscribes again, with how long it was without one; with `backfill_s` it reads them instead."""
    specs = {b: OpcUaSpec.model_validate(plc_spec(server.endpoint, name=f"gap-{b}", backfill_s=b)) for b in (0, 3600)}

    async def scenario() -> tuple[dict[int, OpcUaSession], float]:
        sessions = {b: OpcUaSession(spec, Credentials(username=USER, password=PASSWORD), lambda m: m.ack())
                    for b, spec in specs.items()}
        runs = [asyncio.ensure_future(s.run()) for s in sessions.values()]

        await until(lambda: all(s.connected() for s in sessions.values()), "both sessions connected")
        down = time.monotonic()
        await asyncio.to_thread(server.kill)
        await until(lambda: not any(s.connected() for s in sessions.values()), "both see the server gone")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.start)
        up = time.monotonic()
        await until(lambda: all(s.connected() for s in sessions.values()), "both subscribed again")
        for s in sessions.values():
            s.stop()
        await asyncio.gather(*runs)
        return sessions, up - down

    sessions, outage_s = asyncio.run(scenario())
    without = sessions[0].last_error
    assert without is not None and "without a subscription" in without and "set backfill_s" in without, without
    reported_s = float(without.split("after ")[1].split(" s ")[0])
    assert reported_s >= outage_s - 0.5, (reported_s, outage_s)
    assert "without a subscription" not in (sessions[3600].last_error or "")


def test_a_restarted_connector_without_backfill_reports_the_gap(connectors, lane, twins):
    """A connector process that Ray restarted after a crash, or that was started again from its declaration,
    cannot know what changed while none ran; without `backfill_s` it says so once it has subscribed again, with
    how long ago the one before was last alive (with `backfill_s` it reads history: above)."""
    node = {"node_id": f"ns=2;s={lane('tank-2.h1')}", "asset_id": "tank-2", "measurement": "h1", "unit": "m"}
    connectors.create(lane.spec(name="plc-latest", backfill_s=0, nodes=[node], commands=[]),
                      Credentials(username=USER, password=PASSWORD))
    wait_for(lambda: connectors.status("acme", "plc-latest").connected, "the connector is connected")
    assert connectors.status("acme", "plc-latest").last_error is None  # a first start is no gap

    handle = ray.get_actor(actor_name("acme", "plc-latest"), namespace=twins.router.namespace)
    ray.kill(handle, no_restart=False)  # a crash: Ray restarts it
    wait_for(lambda: "after a restart" in (connectors.status("acme", "plc-latest").last_error or ""),
             "the connector restarted by Ray reports the gap")
    status = connectors.status("acme", "plc-latest")
    assert status.connected and "set backfill_s" in status.last_error

    ray.kill(handle, no_restart=True)  # gone for good, then started again from its declaration
    time.sleep(1.0)
    connectors.status("acme", "plc-latest")
    wait_for(lambda: "after a restart" in (connectors.status("acme", "plc-latest").last_error or ""),
             "the connector started again from its declaration reports the gap")
    error = connectors.status("acme", "plc-latest").last_error
    assert float(error.split("last seen ")[1].split(" s ")[0]) >= 1.0, error
    connectors.delete("acme", "plc-latest")
    assert "plc-latest" not in connectors.names("acme")  # nothing written after the deletion


def test_a_pause_longer_than_the_item_queue_is_read_back_from_history(lane, device):
    """Paused, the server keeps `queue_size` changes per item and discards the older ones: 15 of 20 per node were
    lost with no error, although `backfill_s` was set and the server kept the history."""
    spec = OpcUaSpec.model_validate(lane.spec(name="plcq", queue_size=3, commands=[]))
    since = (T0 + timedelta(seconds=200)).isoformat()
    received: list[Inbound] = []

    def written() -> set[tuple[str, str]]:
        rows = [m.rows[0] for m in received if m.rows]
        return {(r["idempotency_key"], r["event_time"]) for r in rows if r["event_time"] >= since}

    async def scenario() -> OpcUaSession:
        session = OpcUaSession(spec, Credentials(username=USER, password=PASSWORD), received.append)
        run = asyncio.ensure_future(session.run())
        def ack_all() -> None:
            for m in received[acked[0]:]:
                m.ack()
            acked[0] = len(received)

        await until(lambda: session.connects >= 1, "the connect done (subscribed, history read back)")
        await until(lambda: ack_all() or session.outstanding() == 0, "the connect's values durable")
        await session.set_paused(True)
        await asyncio.to_thread(write, device, "tank-2", range(200, 210), lane)  # 10 per node, its queue keeps 3
        await session.set_paused(False)
        await until(lambda: ack_all() or len(written()) == 20, "all 20 changes read back")
        session.stop()
        await run
        return session

    acked = [0]
    session = asyncio.run(scenario())
    assert session.errors == 0, session.last_error
    for node in STREAMS["tank-2"]:
        assert sorted(t for k, t in written() if k.endswith(node)) == [
            (T0 + timedelta(seconds=k)).isoformat() for k in range(200, 210)]


def session_readings(spec: OpcUaSpec, action, condition, what: str) -> tuple[OpcUaSession, list[Inbound]]:
    """Run a session on `spec` (messages acknowledged at once): once connected, `action()` (in a thread), then wait
    for `condition(received)`; the session, stopped, and what it received."""
    received: list[Inbound] = []

    def put(message: Inbound) -> None:
        received.append(message)
        message.ack()

    async def scenario() -> OpcUaSession:
        session = OpcUaSession(spec, Credentials(username=USER, password=PASSWORD), put)
        run = asyncio.ensure_future(session.run())
        await until(session.connected, "the session is connected")
        await asyncio.to_thread(action)
        await until(lambda: condition(received), what)
        session.stop()
        await run
        return session

    return asyncio.run(scenario()), received


def test_a_namespace_the_server_lacks_is_reported_and_the_other_nodes_flow(lane, device):
    """A node whose `nsu=` URI the server no longer has (a PLC project renamed) is reported by name with the
    server's namespaces, as a node the server does not know; it took the whole connector down, reconnecting
    forever with "ValueError: 'urn:...' is not in list"."""
    nodes = [{"node_id": f"ns=2;s={lane('tank-2.h1')}", "asset_id": "tank-2", "measurement": "h1", "unit": "m"},
             {"node_id": "nsu=urn:plant:gone;s=tank-2.q_in", "asset_id": "tank-2", "measurement": "q_in",
              "unit": "L/s"}]
    spec = OpcUaSpec.model_validate(lane.spec(name="plc-ns", nodes=nodes, commands=[], backfill_s=0))
    at = T0 + timedelta(seconds=300)
    session, received = session_readings(
        spec, lambda: device.write(lane("tank-2.h1"), 0.75, at),
        lambda got: any(r["event_time"] == at.isoformat() for m in got for r in m.rows), "the reading of h1")
    assert session.errors == 1 and session.last_error == (
        "node nsu=urn:plant:gone;s=tank-2.q_in: the server has no namespace 'urn:plant:gone' (its namespaces: "
        "http://opcfoundation.org/UA/, urn:freeopcua:python:server, urn:raytwin:test); correct the node id's nsu= "
        "or the server's namespace URI")


def test_a_connector_none_of_whose_nodes_exists_is_not_connected(server):
    """A server re-downloaded with other node ids refused every monitored item (BadNodeIdUnknown), yet the connector
    read `connected` (no RayTwinConnectorDown while its twins got nothing, for good), and its `last_error` showed
    the gap report made later in the same connect instead of the node errors: it is not connected now, retrying
    with backoff, and a connect that monitors some nodes ends with the node errors in `last_error`."""
    gone = [{"node_id": "ns=2;s=renamed.h2", "asset_id": "tank-2", "measurement": "h2", "unit": "m"}]
    spec = OpcUaSpec.model_validate(plc_spec(server.endpoint, name="plc-none", nodes=gone, commands=[], backfill_s=0))

    async def scenario() -> OpcUaSession:
        session = OpcUaSession(spec, Credentials(username=USER, password=PASSWORD), lambda m: m.ack())
        run = asyncio.ensure_future(session.run())
        await until(lambda: session.errors >= 2, "two connection attempts")
        states = {session.state}
        session.stop()
        await run
        return session, states

    session, states = asyncio.run(scenario())
    assert not session.connected() and "connected" not in states
    assert session.last_error.startswith("NothingMonitored: none of the 1 declared node(s) can be monitored on this "
                                         "server (node ns=2;s=renamed.h2 cannot be monitored: BadNodeIdUnknown (the "
                                         "server has no node of this id: "), session.last_error

    some = [*gone, {"node_id": "ns=2;s=tank-2.h1", "asset_id": "tank-2", "measurement": "h1", "unit": "m"}]
    spec = OpcUaSpec.model_validate(plc_spec(server.endpoint, name="plc-some", nodes=some, commands=[], backfill_s=0))

    async def reconnected() -> OpcUaSession:
        session = OpcUaSession(spec, Credentials(username=USER, password=PASSWORD), lambda m: m.ack(),
                               gap_since=datetime.now(UTC) - timedelta(seconds=30))  # a restart: the gap is said
        run = asyncio.ensure_future(session.run())
        await until(lambda: session.connected() and session.errors >= 2, "connected, the gap and the node reported")
        session.stop()
        await run
        return session

    session = asyncio.run(reconnected())
    assert session.last_error == (  # (an outside tester: only the code was said, no fix)
        "node ns=2;s=renamed.h2 cannot be monitored: BadNodeIdUnknown (the server has no node of this id: check "
        "node_id against the server's address space (browse it with an OPC UA client), then declare the connector "
        "again)"
    ), session.last_error


def test_a_node_declared_in_two_spellings_feeds_both_mappings(lane, device):
    """`ns=2;s=X` and `nsu=<its URI>;s=X` are one server node: each of its changes goes to both mappings (only the
    last declared one received readings, with no error)."""
    h2 = lane("tank-1.h2")
    nodes = [{"node_id": f"ns=2;s={h2}", "asset_id": "tank-1", "measurement": "h2", "unit": "m"},
             {"node_id": f"nsu=urn:raytwin:test;s={h2}", "asset_id": "tank-2", "measurement": "h2", "unit": "m"}]
    spec = OpcUaSpec.model_validate(lane.spec(name="plc-twice", nodes=nodes, commands=[], backfill_s=0))
    at = T0 + timedelta(seconds=400)

    def fed(got: list[Inbound]) -> set[tuple[str, str]]:
        return {(r["asset_id"], r["idempotency_key"]) for m in got for r in m.rows if r["event_time"] == at.isoformat()}

    session, received = session_readings(spec, lambda: device.write(h2, 0.25, at),
                                         lambda got: len(fed(got)) == 2, "the reading fed to both mappings")
    assert fed(received) == {("tank-1", f"ns=2;s={h2}"), ("tank-2", f"nsu=urn:raytwin:test;s={h2}")}
    assert session.errors == 0, session.last_error


def test_a_pause_longer_than_the_item_queue_covers_is_reported_without_backfill(lane, device):
    """asyncua's server discards what exceeds an item's queue without flagging the Overflow bit, so without
    `backfill_s` the lost changes went unreported; a pause longer than `queue_size` sampling intervals (3 x 0.5 s
    here) is reported on resume, a shorter one is not."""
    spec = OpcUaSpec.model_validate(lane.spec(name="plc-q", queue_size=3, sampling_interval_ms=500, backfill_s=0,
                                              commands=[], nodes=[lane.spec()["nodes"][1]]))
    since = (T0 + timedelta(seconds=500)).isoformat()
    received: list[Inbound] = []

    async def scenario() -> tuple[OpcUaSession, str | None]:
        session = OpcUaSession(spec, Credentials(username=USER, password=PASSWORD), lambda m: (received.append(m),
                                                                                             m.ack()))
        run = asyncio.ensure_future(session.run())
        await until(session.connected, "the session is connected")
        await session.set_paused(True)
        await session.set_paused(False)  # well within 1.5 s
        short = session.last_error
        await session.set_paused(True)
        await asyncio.to_thread(write, device, "tank-2", range(500, 510), lane)  # 10 changes, the queue keeps 3
        await asyncio.sleep(1.6)
        await session.set_paused(False)
        await asyncio.sleep(1.0)
        session.stop()
        await run
        return session, short

    session, short = asyncio.run(scenario())
    assert short is None
    got = [r for m in received for r in m.rows if r["event_time"] >= since]
    assert len(got) < 10  # the server discarded some, and flagged nothing
    assert session.last_error.startswith("publishing was off for ") and (
        "s (paused), longer than queue_size 3 at sampling_interval_ms 500 covers 1.5 s: a node that changed more "
        "than 3 times meanwhile lost its oldest changes, and the server may not say so (asyncua's never flags an "
        "overflow); set backfill_s") in session.last_error, session.last_error


class Received:
    """A pump: every change handed over is durable after `delay_s` (0: it keeps up); `stamps` lists what arrived."""

    def __init__(self, delay_s: float = 0.0):
        self.messages: list[Inbound] = []
        self.delay_s = delay_s

    def __call__(self, message: Inbound) -> None:
        self.messages.append(message)
        time.sleep(self.delay_s)
        message.ack()

    def stamps(self, node: str, since: datetime) -> set[datetime]:
        rows = [m.rows[0] for m in self.messages if m.rows and m.rows[0]["idempotency_key"] == f"ns=2;s={node}"]
        return {t for r in rows if (t := datetime.fromisoformat(r["event_time"])) >= since}


def ramp(n: int) -> list[tuple[float, datetime]]:
    """`n` (value, source time) readings 10 ms apart, from a second ago: a burst for `Device.write_at_once`."""
    start = datetime.now(UTC) - timedelta(seconds=1)
    return [(0.5 + 0.01 * k, start + timedelta(milliseconds=10 * k)) for k in range(n)]


def run_session(spec: OpcUaSpec, received: Received, steps) -> OpcUaSession:
    """Run a session until `steps(session)` (a coroutine function) returns, then stop it. The steps start once the
    connect is done (`connected()` is true before its backfill) and what it read is durable."""
    async def scenario() -> OpcUaSession:
        session = OpcUaSession(spec, Credentials(username=USER, password=PASSWORD), received)
        run = asyncio.ensure_future(session.run())
        await until(lambda: session.connects >= 1, "the connect done (subscribed, history read back)")
        await until(lambda: session.outstanding() == 0, "the connect's values durable")
        await steps(session)
        session.stop()
        await run
        return session
    return asyncio.run(scenario())


def test_a_burst_beyond_the_item_queue_while_subscribed_is_read_back_from_history(lane, device):
    """Subscribed, no pause: 40 changes of a node within one publishing interval, its queue keeps 3. The server
    flags nothing (asyncua's does not set the Overflow bits); a publish carrying queue_size values of an item is
    the sign, and the session reads that item's history back (before: 3 of 40 arrived, no error)."""
    spec = OpcUaSpec.model_validate(lane.spec(name="plc-burst", queue_size=3, commands=[]))
    received, readings, h2 = Received(), ramp(40), lane("tank-1.h2")
    stamps = {t for _, t in readings}

    async def steps(session: OpcUaSession) -> None:
        await asyncio.to_thread(device.write_at_once, h2, readings)
        await until(lambda: received.stamps(h2, min(stamps)) == stamps, "all 40 changes arrived")

    session = run_session(spec, received, steps)
    assert session.errors == 0, session.last_error


def test_readings_stamped_before_the_newest_are_read_back_after_a_pause(lane, device):
    """A store-and-forward gateway forwards its buffer while the connector is paused: 20 readings stamped a minute
    before the newest one applied, the queue keeps 3. History read since the newest durable reading would miss
    them all (before: 17 of 20 lost); the item delivered readings older than its newest, so its history is read
    over `backfill_s`, keeping what the server received since the last value before the pause."""
    spec = OpcUaSpec.model_validate(lane.spec(name="plc-late", queue_size=3, commands=[]))
    received, now, h1 = Received(), datetime.now(UTC).replace(microsecond=0), lane("tank-2.h1")
    buffered = [now - timedelta(seconds=60 - k) for k in range(20)]

    async def steps(session: OpcUaSession) -> None:
        await asyncio.to_thread(device.write, h1, 0.45, now)
        await until(lambda: now in received.stamps(h1, now), "the newest reading arrived")
        await session.set_paused(True)
        for k, at in enumerate(buffered):  # distinct values: asyncua's history drops a repeated one
            await asyncio.to_thread(device.write, h1, 0.4 + 0.001 * k, at)
        await session.set_paused(False)
        await until(lambda: received.stamps(h1, buffered[0]) >= set(buffered), "all 20 buffered arrived")

    session = run_session(spec, received, steps)
    assert session.errors == 0, session.last_error


def test_a_full_queue_whose_history_cannot_give_the_changes_back_is_reported():
    """A server that keeps no history (asyncua's answers an empty one, without an error): what the full queue
    discarded cannot be read back, and the session says so, naming the node, instead of losing it silently. The
    server grants a queue of 3 where 1000 are asked (RevisedQueueSize): counted by the size asked, the full queue
    went unseen and the loss unsaid."""
    bare = OpcUaServer(free_port(), ["tank-1.h2"], [], f"{USER}:{PASSWORD}", max_queue=3)
    bare.start()
    spec = OpcUaSpec.model_validate(plc_spec(bare.endpoint, name="plc-bare", queue_size=1000, commands=[], nodes=[
        {"node_id": "ns=2;s=tank-1.h2", "asset_id": "tank-1", "measurement": "h2", "unit": "m"}]))

    async def steps(session: OpcUaSession) -> None:
        device = await asyncio.to_thread(Device, bare)
        await asyncio.to_thread(device.write_at_once, "tank-1.h2", ramp(40))
        await until(lambda: "may have been discarded" in (session.last_error or ""), "the loss reported")
        await asyncio.to_thread(device.close)

    try:
        session = run_session(spec, Received(), steps)
    finally:
        bare.kill()
    assert session.last_error.startswith("node ns=2;s=tank-1.h2: its server queue (queue_size 3, all the server "
                                         "granted of the 1000 asked) was full"), session.last_error
    assert "its history does not hold the value stamped" in session.last_error


def test_readings_stamped_before_the_newest_are_read_back_after_backpressure(lane, device):
    """The same through backpressure: a slow pump, max_outstanding 5, 100 readings stamped a minute before the
    newest (before: 40 of 200 arrived, no error; 100 are still 20 times max_outstanding, and the pump's 10 ms a
    reading is most of this test's time)."""
    spec = OpcUaSpec.model_validate(lane.spec(name="plc-slow", queue_size=3, max_outstanding=5, commands=[]))
    received, now, h1 = Received(delay_s=0.01), datetime.now(UTC).replace(microsecond=0), lane("tank-1.h1")
    buffered = [now - timedelta(seconds=60) + timedelta(milliseconds=50 * k) for k in range(100)]

    async def steps(session: OpcUaSession) -> None:
        await asyncio.to_thread(device.write, h1, 0.45, now)
        await until(lambda: now in received.stamps(h1, now), "the newest reading arrived")
        for k, at in enumerate(buffered):
            await asyncio.to_thread(device.write, h1, 0.4 + 0.0001 * k, at)
        await until(lambda: received.stamps(h1, buffered[0]) >= set(buffered), "all 100 buffered arrived")

    session = run_session(spec, received, steps)
    assert session.backpressure_pauses >= 1 and session.errors == 0, session.last_error


def test_a_resume_hands_over_no_change_already_durable(lane, device):
    """A resume (a pause's end, backpressure's) read each node's history from its newest durable change on, so it
    handed that change over again: a duplicate per node, each outstanding until durable. With as many nodes as
    half `max_outstanding` (the test above: 5 and 5) the end of backpressure held publishing again at once, and so
    on for good with nothing new at the server (~20 rounds of SetPublishingMode and HistoryRead a second), and
    `outstanding()` reached 0 only for a moment between two rounds: the test above hung 120 s waiting for its
    current values durable. Now the read starts after that change, so a resume with nothing new hands over none."""
    nodes = lane.spec()["nodes"][:2]  # tank-1.h1 and tank-2.h1, each given a reading first
    spec = OpcUaSpec.model_validate(lane.spec(name="plc-idle", nodes=nodes, commands=[]))
    now = datetime.now(UTC)
    for node in ("tank-1.h1", "tank-2.h1"):
        device.write(lane(node), 0.42, now)
    received = Received()

    async def steps(session: OpcUaSession) -> None:  # (the connect's backfill durable: `run_session`)
        before = len(received.messages)
        await session.set_paused(True)
        await session.set_paused(False)  # returns once the resume's history reads are done
        await until(lambda: session.outstanding() == 0, "what the resume handed over durable")
        assert len(received.messages) == before, [m.rows for m in received.messages[before:]]

    session = run_session(spec, received, steps)
    assert session.errors == 0, session.last_error


def test_a_resume_hands_over_no_reading_already_refused_as_from_a_clock_ahead(lane, device):
    """A reading stamped more than `MAX_FUTURE_SKEW` after the server received it is dead-lettered, and being ahead
    of the clock it cannot move its node's resume point (the newest durable change), so every resume read it back
    from history and handed it over again, its refusal outstanding until durable once more, resume after resume.
    A refusal made durable counts as handled: a resume with nothing new hands over nothing."""
    spec = OpcUaSpec.model_validate(lane.spec(name="plc-ahead", nodes=lane.spec()["nodes"][:1], commands=[]))
    received, h1 = Received(), lane("tank-1.h1")

    async def steps(session: OpcUaSession) -> None:
        await asyncio.to_thread(device.write, h1, 0.47, datetime.now(UTC) + MAX_FUTURE_SKEW + timedelta(seconds=30))
        await until(lambda: any(m.dead for m in received.messages) and session.outstanding() == 0,
                    "the reading refused, its dead letter durable")
        before = len(received.messages)
        for _ in range(2):
            await session.set_paused(True)
            await session.set_paused(False)  # returns once the resume's history reads are done
        await until(lambda: session.outstanding() == 0, "what the resumes handed over durable")
        assert len(received.messages) == before, [m.dead for m in received.messages[before:]]

    session = run_session(spec, received, steps)
    assert [len(m.dead) for m in received.messages] == [1]  # (the node had no value before: the refusal alone)
    assert session.errors == 1 and "clock is ahead" in session.last_error, session.last_error


def test_a_subscription_the_server_dropped_is_subscribed_again_with_its_items(lane, device):
    """asyncua re-creates a subscription that stopped publishing (its stale watchdog) from the items it created;
    the session creates its items itself (to learn each one's granted queue), so that left a subscription of no
    items: nothing arrived, no error. The session subscribes again instead, and the next reading arrives."""
    spec = OpcUaSpec.model_validate(lane.spec(name="plc-stale", commands=[], backfill_s=0,
                                              nodes=[lane.spec()["nodes"][0]]))
    received, at, h1 = Received(), T0 + timedelta(seconds=600), lane("tank-1.h1")

    async def steps(session: OpcUaSession) -> None:
        await session._sub.recreate()  # as asyncua's watchdog calls it
        await until(lambda: session.errors >= 2 and session.connected(), "subscribed again")
        await asyncio.to_thread(device.write, h1, 0.61, at)
        await until(lambda: at in received.stamps(h1, at), "the reading after it arrived")

    run_session(spec, received, steps)


class HeldPump:
    """A pump that acknowledges what it holds only when told (`ack_held`), from a thread of its own, as a pump's."""

    def __init__(self):
        self.messages: list[Inbound] = []
        self.acked = 0

    def __call__(self, message: Inbound) -> None:
        self.messages.append(message)

    def ack_held(self) -> None:
        """Acknowledge every message held now, waiting until that is done."""
        def acknowledge() -> None:
            for message in self.messages[self.acked:]:
                message.ack()
                self.acked += 1
        thread = threading.Thread(target=acknowledge)
        thread.start()
        thread.join(5)  # (bounded: an acknowledgement that waited for the loop thread would wait forever)


def test_acknowledgements_between_the_hold_check_and_the_hold_leave_no_session_stuck(lane, device):
    """The hold is decided on the loop's thread (`outstanding()` compared, then `_held` set) while the pump's
    thread acknowledges: one acknowledgement between the two reads no hold and releases nothing. Forced here: all
    the pump holds is acknowledged right after the comparison. The session is not left held with nothing
    outstanding, because the change that made it hold reaches the pump only after the hold is set (the feeder runs
    on the loop's thread), so its acknowledgement sees the hold and releases it."""
    node, h1 = lane.spec()["nodes"][1], lane("tank-2.h1")
    spec = OpcUaSpec.model_validate(lane.spec(name="plc-hold", nodes=[node], commands=[], max_outstanding=2,
                                              backfill_s=0))
    device.write(h1, 0.71, T0 + timedelta(seconds=700))  # the current value: the first change
    pump, forced = HeldPump(), []

    async def scenario() -> OpcUaSession:
        session = OpcUaSession(spec, Credentials(username=USER, password=PASSWORD), pump)
        run = asyncio.ensure_future(session.run())
        await until(lambda: session.connected() and len(pump.messages) == 1, "the current value in the pump")
        compared = session.outstanding

        def outstanding() -> int:
            n = compared()
            if threading.current_thread() is threading.main_thread() and n >= 2 and not session.held and not forced:
                pump.ack_held()  # between the loop's comparison and its hold
                forced.append((compared(), session.held))
            return n

        session.outstanding = outstanding
        await asyncio.to_thread(device.write, h1, 0.72, T0 + timedelta(seconds=701))
        await until(lambda: forced and session.held, "publishing held, the first change durable before")
        await until(lambda: len(pump.messages) == 2, "the change that made it hold in the pump")
        pump.ack_held()
        await until(lambda: not session.held, "publishing switched on again")
        await asyncio.to_thread(device.write, h1, 0.73, T0 + timedelta(seconds=702))
        await until(lambda: len(pump.messages) == 3, "the change after it arrived")
        session.stop()
        await run
        return session

    session = asyncio.run(scenario())
    assert forced == [(1, False)]  # acknowledged with the hold not yet set: it released nothing
    assert session.backpressure_pauses == 1


def test_a_session_stopped_while_the_end_of_backpressure_reads_history_logs_nothing(lane, device):
    """Switching publishing on at the end of backpressure runs in a background task, which then reads history
    (`backfill_s`); a stop during that read failed the task with ConnectionError('disconnected') that nobody
    retrieved, and asyncio logged "Task exception was never retrieved" with its traceback at such a stop. A read cut
    short by the stop is no error: nothing is logged or reported."""
    node, h1 = lane.spec()["nodes"][1], lane("tank-2.h1")
    spec = OpcUaSpec.model_validate(lane.spec(name="plc-cut", nodes=[node], commands=[], max_outstanding=2,
                                              backfill_s=1))  # (the connect reads 1 s of history)
    device.write(h1, 0.81, datetime.now(UTC))
    pump, unhandled, entered, cut = HeldPump(), [], [], []

    async def scenario() -> OpcUaSession:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
        session = OpcUaSession(spec, Credentials(username=USER, password=PASSWORD), pump)
        run = asyncio.ensure_future(session.run())
        await until(lambda: session.connects >= 1 and pump.messages, "connected, a value in the pump")
        read = session._read_history

        async def read_once_stopped(nid: ua.NodeId, *what) -> frozenset[datetime]:
            entered.append(nid)
            await until(lambda: session.state == "stopped", "the session stopped")
            try:
                return await read(nid, *what)
            except ConnectionError as exc:
                cut.append(exc)
                raise

        session._read_history = read_once_stopped  # the history read after the switch lasts until the stop
        await asyncio.to_thread(device.write, h1, 0.82, datetime.now(UTC))
        await until(lambda: session.held, "publishing held (2 changes not durable)")
        await asyncio.to_thread(pump.ack_held)  # publishing switched on again, in the background: its read waits
        await until(lambda: entered, "the switch's history read begun")
        session.stop()
        await run
        await until(lambda: cut, "the read cut short by the stop")
        await asyncio.sleep(0.1)
        gc.collect()  # (a task's unretrieved exception is logged when the task is collected)
        return session

    session = asyncio.run(scenario())
    gc.collect()
    assert [str(e) for e in cut] == ["disconnected"]
    assert unhandled == [] and session.errors == 0, (unhandled, session.last_error)
