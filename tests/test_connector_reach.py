"""A tenant's connector connects only where the reach policy allows, at every connection attempt, on the
address it connects to: a name that resolved to a public address when it was declared can resolve to
169.254.169.254 (a cloud's metadata service) or 127.0.0.1 (the node's own services) later (DNS rebinding).
No external network: names are answered by a stand-in for `socket.getaddrinfo`, connections go to a local
listener or broker, which the operator's list (`NODE_BROKERS`) opens: the default refuses loopback, and the
addresses of the Ray cluster's machines (this one's, the alive nodes' that Ray knows)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Iterator

import pytest
import ray

from connectors import ray_nodes
from connectors.mosquitto import Mosquitto
from connectors.mqtt import MQTT, MqttSpec, _client
from connectors.opcua.config import OpcUaSpec
from connectors.opcua.devserver import OpcUaServer
from connectors.opcua.session import OpcUaSession
from connectors.opcua.session import _Client as OpcUaClient
from connectors.reach import Reach, Unreachable, open_connection, parse_entry
from connectors.spec import Credentials
from raytwin.ports import free_port
from tests.fixtures_connectors import certificate_for, own_address, retrying_at_once, wait_for
from tests.fixtures_serve import NODE_BROKERS
from tests.test_connectors_opcua import until

REBOUND = "broker.tenant.example"
METADATA = "169.254.169.254"
PUBLIC = "192.0.2.7"  # (TEST-NET-1: what the name answered when it was declared; never connected to here)
NODE = Reach(NODE_BROKERS)
"""The operator's list that opens this machine's loopback (the local listener and broker) to connectors."""
UNLISTED = r"\(not among the hosts this service lets connectors reach"
RAY_NODE = "an address of a Ray node of this cluster"


@pytest.fixture(autouse=True)
def unknown_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test learns this machine's addresses and the cluster's nodes anew (nothing cached by another)."""
    monkeypatch.setattr(ray_nodes, "_LOCAL", ray_nodes.LocalAddresses())
    monkeypatch.setattr(ray_nodes, "_CLUSTER", ray_nodes.ClusterNodes())


def answer(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> list[str]:
    """`socket.getaddrinfo` answering `REBOUND` with the next of `addresses` at each call (the last one from then
    on), other names as before; returns the names asked for, one per call."""
    real, asked = socket.getaddrinfo, []

    def getaddrinfo(host, port, *args, **kwargs):
        if host != REBOUND:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        address = addresses[min(len(asked), len(addresses)) - 1]
        if ":" in address:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port or 0, 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A local TCP listener (what the allowed address reaches)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


def test_each_attempt_resolves_once_and_connects_to_the_address_it_vetted(monkeypatch, listener):
    asked = answer(monkeypatch, "127.0.0.1", METADATA)
    port = listener.getsockname()[1]
    with open_connection(NODE.vetted(REBOUND, port), timeout=5) as sock:
        assert sock.getpeername() == ("127.0.0.1", port)
    assert asked == [REBOUND]  # the socket was connected to the vetted address, not to a second answer
    with pytest.raises(Unreachable, match=rf"host '{REBOUND}' resolved to {METADATA} {UNLISTED}.*\): not connected"):
        NODE.vetted(REBOUND, port)  # the next attempt, after the DNS answer changed


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("64:ff9b::7f00:1", "loopback"), ("0.0.0.0", "unspecified"), ("::", "unspecified"), (METADATA, "link-local"),
    ("fe80::1", "link-local")])
def test_by_default_a_name_that_later_resolves_to_the_node_itself_is_refused_at_the_attempt(monkeypatch, address,
                                                                                            kind):
    """Accepted when it was declared (a public address then), the name answers loopback, 0.0.0.0 or link-local at
    a connection attempt: refused without a socket, naming the setting that would open it."""
    asked = answer(monkeypatch, PUBLIC, address)
    assert Reach(None).refusal(REBOUND) is None  # the declaration
    with pytest.raises(Unreachable) as refused:
        Reach(None).vetted(REBOUND, 1883)
    shown = str(ipaddress.ip_address(address))
    assert str(refused.value).startswith(f"host {REBOUND!r} resolved to {shown} ({kind}, which connectors may not "
                                         "reach): not connected (it is checked again at every connection attempt"), \
        refused.value
    example = f"[{shown}]:1883" if ":" in shown else f"{shown}:1883"  # that port: an entry without one opens them all
    assert f"listing it in ServeConfig.connector_hosts, e.g. connector_hosts: [\"{example}\"]" in str(refused.value)
    assert asked == [REBOUND, REBOUND]
    assert [info[4][0] for info in Reach([f"{shown}/128" if ":" in shown else f"{shown}/32"]).vetted(
        REBOUND, 1883)] == [address]  # the operator's list opens that address


def test_by_default_a_localhost_name_is_refused_whatever_the_resolver_answers(monkeypatch):
    """`localhost.` did not resolve on some nodes when it was declared (so it passed) and resolves to 127.0.0.1 on
    others: a localhost name is loopback (RFC 6761) and refused before it is resolved; listed, it is reachable."""
    real, asked = socket.getaddrinfo, []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: asked.append(host) or real(host, *a, **k))
    for host in ("localhost", "localhost.", "Broker.LocalHost"):
        with pytest.raises(Unreachable, match=rf"host '{host}' is loopback \(a localhost name\), which connectors "
                                              r'may not reach: not connected; .*connector_hosts: \["'):
            Reach(None).vetted(host, 1883)
    assert asked == []
    assert Reach(["localhost"]).refusal("localhost.") is None and Reach(["localhost"]).vetted("localhost", 1883)


def test_an_entry_with_a_port_opens_that_port_only_and_others_are_refused_before_anything_connects(monkeypatch,
                                                                                                  listener):
    """Found by an outside tester: `connector_hosts` opened hosts, not ports, so listing the broker's host
    (`127.0.0.1/32`, the guide's example) opened Ray's GCS, dashboard and raylet ports on it to every tenant, and
    `last_error` told which of them answer. An entry with a port opens that port; another one is refused before a
    socket connects, so a port where something listens and one where nothing does read the same."""
    broker, listening, closed = free_port(), listener.getsockname()[1], free_port()
    connected = []
    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: connected.append(address) or real_connect(
        sock, address))
    for entries, host in (([f"127.0.0.1:{broker}"], "127.0.0.1"), ([f"127.0.0.0/8:{broker}"], "127.0.0.1"),
                          ([f"localhost:{broker}"], "localhost"), ([f"[::1]:{broker}"], "::1")):
        reach = Reach(entries)
        assert reach.refusal(host, broker) is None and reach.vetted(host, broker), entries
        refusals = []
        for port in (listening, closed):
            assert f"not among the hosts this service lets connectors reach on port {port}" in reach.refusal(host, port)
            with pytest.raises(Unreachable) as refused:
                reach.vetted(host, port)
            refusals.append(str(refused.value).replace(str(port), "PORT"))
        assert refusals[0] == refusals[1] and "PORT" in refusals[0], refusals
    assert connected == []  # nothing connected to find out
    assert Reach(["127.0.0.1/32"]).refusal("127.0.0.1", listening) is None  # no port: every port (documented)
    assert Reach(["127.0.0.1:1883"]) != Reach(["127.0.0.1/32"])  # (a running connector under the other restarts)


@pytest.mark.parametrize("entry, parsed", [
    ("broker.example", ("broker.example", None)), ("Broker.Example.:8883", ("broker.example", 8883)),
    ("127.0.0.1/32", (ipaddress.ip_network("127.0.0.1/32"), None)),
    ("127.0.0.1:1883", (ipaddress.ip_network("127.0.0.1/32"), 1883)),
    ("10.20.0.0/16:1883", (ipaddress.ip_network("10.20.0.0/16"), 1883)), ("::1", (ipaddress.ip_network("::1"), None)),
    ("[::1]:1883", (ipaddress.ip_network("::1"), 1883)), ("[fd00::/64]:1883", (ipaddress.ip_network("fd00::/64"), 1883))])
def test_host_entries_name_a_host_or_network_and_optionally_a_port(entry, parsed):
    assert parse_entry(entry) == parsed


@pytest.mark.parametrize("entry, why", [("127.0.0.1:0", "port 0 is not 1-65535"), ("h:70000", "port 70000"),
                                        ("[broker]:1883", "brackets hold an IPv6"), ("a:b", "is no host name"),
                                        ("a/b", "is no host name"), ("", "is no host name")])
def test_a_service_with_a_host_entry_that_is_none_does_not_start(entry, why):
    from serve_apps.config import ServeConfig

    with pytest.raises(ValueError, match=why):
        ServeConfig(store_url="store", keys_file="keys.json", connector_hosts=[entry])


def test_an_attempt_keeps_only_the_addresses_the_policy_allows(monkeypatch):
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (METADATA, port)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.20.0.7", port)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC, port))] if host == REBOUND else real(host, port))
    assert [info[4][0] for info in Reach(None).vetted(REBOUND, 1883)] == [PUBLIC]
    assert [info[4][0] for info in Reach(["10.20.0.0/16"]).vetted(REBOUND, 1883)] == ["10.20.0.7"]
    assert len(Reach([REBOUND]).vetted(REBOUND, 1883)) == 3  # a listed name: the operator's DNS, any address
    with pytest.raises(Unreachable, match=rf"resolved to 10.20.0.7, {METADATA}, {PUBLIC} {UNLISTED}"):  # by reason
        Reach(["10.30.0.0/16"]).vetted(REBOUND, 1883)


def mqtt_spec(port: int, **broker) -> MqttSpec:
    """A tenant's MQTT connector whose broker is `REBOUND`."""
    return MqttSpec.model_validate({
        "name": "rebound", "tenant": "acme", "broker": {"host": REBOUND, "port": port, "reconnect_max_s": 1, **broker},
        "routes": [{"topic": "plant/+/telemetry", "asset_level": 1,
                    "payload": {"measurements": {"h1": {"field": "level", "unit": "mm"}}}}]})


def test_mqtt_connects_to_the_vetted_address_and_verifies_tls_against_the_name(monkeypatch, listener, tmp_path):
    """paho resolved the broker's name again for every (re)connect: checked at the declaration, the name could then
    answer 169.254.169.254. The socket goes to the address vetted for this attempt; TLS (SNI and the certificate
    check) still uses the name, so a certificate for the name, served on the vetted address, verifies."""
    context, server_names = certificate_for(REBOUND, tmp_path), []
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)
    port = listener.getsockname()[1]

    def serve() -> None:
        connection, _ = listener.accept()
        with context.wrap_socket(connection, server_side=True) as tls:
            tls.recv(1)  # the CONNECT packet: the handshake is done

    threading.Thread(target=serve, daemon=True).start()
    asked = answer(monkeypatch, "127.0.0.1", METADATA)
    client = _client(mqtt_spec(port, tls={"ca_file": str(tmp_path / "cert.pem")}), Credentials(), persistent=True,
                     reach=NODE)
    client.connect(REBOUND, port)
    try:
        assert client.socket().getpeername() == ("127.0.0.1", port) and asked == [REBOUND]
        assert server_names == [REBOUND]  # SNI: the name; the certificate for it verified on the vetted address
        with pytest.raises(Unreachable, match=f"resolved to {METADATA} {UNLISTED}"):
            client.reconnect()  # the next attempt: the name answers the metadata service now
        assert asked == [REBOUND, REBOUND] and isinstance(client.connect_error, Unreachable)
    finally:
        client.disconnect()


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto"), free_port())
    b.start()
    yield b
    b.stop()


def test_a_refused_address_is_the_connectors_last_error_and_a_fixed_name_connects(monkeypatch, broker):
    """The refusal names host, address and why; the connector keeps retrying, so DNS answering an allowed
    address again connects it."""
    answer(monkeypatch, METADATA, "127.0.0.1")
    adapter = MQTT.adapter(mqtt_spec(broker.port), Credentials(), lambda inbound: None, lambda *ack: None, reach=NODE)
    adapter.start()
    try:
        refused = wait_for(lambda: adapter.last_error, "the refused connection reported")
        assert refused.startswith(f"refused to connect to broker {REBOUND}:{broker.port}: host {REBOUND!r} resolved "
                                  f"to {METADATA} (not among the hosts this service lets connectors reach")
        assert refused.endswith("; retrying with backoff")
        wait_for(adapter.connected, "connected once the name resolves to an allowed address")
    finally:
        adapter.stop()


def test_by_default_a_connector_never_reaches_the_broker_on_the_node(monkeypatch, broker):
    """What the outside tester found: a tenant's connector to a broker listening on the node's loopback. Without
    a list, attempt after attempt is refused before a socket opens: it reports no port as open or closed."""
    asked = answer(monkeypatch, "127.0.0.1")
    adapter = retrying_at_once(MQTT.adapter(mqtt_spec(broker.port), Credentials(), lambda inbound: None,
                                            lambda *ack: None, reach=Reach(None)))
    adapter.start()
    try:
        wait_for(lambda: len(asked) >= 2, "a second connection attempt")
        refused = adapter.last_error
        assert refused.startswith(f"refused to connect to broker {REBOUND}:{broker.port}: host {REBOUND!r} resolved "
                                  "to 127.0.0.1 (loopback, which connectors may not reach): not connected"), refused
        assert f'connector_hosts: ["127.0.0.1:{broker.port}"]' in refused and not adapter.connected()  # that port
    finally:
        adapter.stop()


@pytest.mark.parametrize("port", [":4840", ""], ids=["port", "default-port"])
def test_opcua_connects_each_attempt_to_the_vetted_address_and_keeps_the_endpoint_name(monkeypatch, port):
    """asyncua resolved the server's name again at every (re)connect; the socket goes to the vetted address while
    the endpoint URL (hello, session) keeps the name. An endpoint without a port is vetted, and connected, on
    OPC UA's 4840 (the socket went to no port at all)."""
    asked = answer(monkeypatch, "127.0.0.1", METADATA)
    client = OpcUaClient(f"opc.tcp://{REBOUND}{port}/raytwin/")
    client.reach, opened = NODE, []

    async def connect_socket(host: str, port: int) -> None:
        opened.append((host, port))

    monkeypatch.setattr(client.uaclient, "connect_socket", connect_socket)
    asyncio.run(client.connect_socket())
    assert opened == [("127.0.0.1", 4840)] and client.server_url.hostname == REBOUND
    with pytest.raises(Unreachable, match=f"resolved to {METADATA} {UNLISTED}"):
        asyncio.run(client.connect_socket())  # the next attempt: the name answers the metadata service now
    assert opened == [("127.0.0.1", 4840)] and asked == [REBOUND, REBOUND]


def test_an_opcua_session_reports_a_refused_address_and_connects_once_the_name_is_fixed(monkeypatch):
    server = OpcUaServer(free_port(), ["t.h1"], [], "u:p")
    server.start()
    answer(monkeypatch, METADATA, METADATA, "127.0.0.1")
    spec = OpcUaSpec.model_validate({
        "name": "rebound", "tenant": "acme", "endpoint": f"opc.tcp://{REBOUND}:{server.port}/raytwin/",
        "backoff_initial_s": 0.2, "nodes": [{"node_id": "ns=2;s=t.h1", "asset_id": "t", "measurement": "h1",
                                             "unit": "m"}]})

    async def scenario() -> str:
        session = OpcUaSession(spec, Credentials(username="u", password="p"), lambda inbound: None, reach=NODE)
        run = asyncio.ensure_future(session.run())
        try:
            await until(lambda: session.last_error, "the refused connection reported")
            refused = session.last_error
            await until(session.connected, "connected once the name resolves to an allowed address")
            return refused
        finally:
            session.stop()
            await run

    try:
        refused = asyncio.run(scenario())
    finally:
        server.kill()
    assert refused.startswith(f"Unreachable: host {REBOUND!r} resolved to {METADATA} (not among the hosts this "
                              "service lets connectors reach")


def test_by_default_this_machines_own_address_is_refused_at_the_declaration_and_at_every_attempt(monkeypatch):
    """Ray's GCS, raylet, dashboard and metrics agent and other tenants' connectors' services listen on the node's
    own address (10.x.x.x) too, not only on loopback: a connector's `last_error` there was a port scanner of the
    cluster. Refused at the declaration and at the attempt, naming why and the setting that opens it; an address
    that is no machine's of the cluster (the name's earlier answer) is not."""
    own = own_address(monkeypatch)
    why = Reach(None).refusal(own)
    assert why is not None and why.startswith(
        f"host {own!r} is {RAY_NODE} ({own}: its internal services listen there), which connectors may not reach: "
        f"the service's operator can open it to connectors by listing it in ServeConfig.connector_hosts, e.g. "
        f'connector_hosts: ["{own}/32"]'), why
    assert Reach(None).refusal(f"::ffff:{own}").startswith(f"host '::ffff:{own}' is {RAY_NODE}")  # (inside IPv6)
    asked = answer(monkeypatch, PUBLIC, own)
    assert Reach(None).refusal(REBOUND) is None  # declared while the name answered another address
    with pytest.raises(Unreachable) as refused:
        Reach(None).vetted(REBOUND, 1883)
    assert str(refused.value).startswith(
        f"host {REBOUND!r} resolved to {own} ({RAY_NODE}, which connectors may not reach: its internal services "
        f"listen there): not connected (it is checked again at every connection attempt"), refused.value
    assert f'connector_hosts: ["{own}:1883"]' in str(refused.value) and asked == [REBOUND, REBOUND]
    opened = Reach([f"{own}/32"])  # the operator's list: the whole policy, that address admitted
    assert opened.refusal(own) is None and [info[4][0] for info in opened.vetted(REBOUND, 1883)] == [own]


def test_on_a_node_where_any_address_binds_the_route_tells_its_own(monkeypatch):
    """`net.ipv4.ip_nonlocal_bind` (a node that takes over virtual addresses) lets a socket bind to any address:
    taken as this machine's, every host would be refused. There the kernel's route tells: the source address it
    picks to reach an address is that address only if it is this machine's."""
    own = own_address(monkeypatch)
    monkeypatch.setattr(ray_nodes, "_nonlocal_bind", lambda version: True)
    monkeypatch.setattr(ray_nodes, "_binds", lambda address: True)  # (what binding answers there)
    assert Reach(None).refusal(PUBLIC) is None and Reach(None).refusal("192.0.2.7") is None
    assert Reach(None).refusal(own).startswith(f"host {own!r} is {RAY_NODE}")


def test_a_connector_is_refused_its_nodes_address_at_every_attempt_testing_it_once(monkeypatch):
    """A tenant's MQTT connector (the connector's process, as in its actor) to a name answering this machine's own
    address: each attempt refused before a socket opens, the address tested once (cached), not at every attempt."""
    own, port = own_address(monkeypatch), free_port()
    binds, tested = ray_nodes._binds, []
    monkeypatch.setattr(ray_nodes, "_binds", lambda address: tested.append(address) or binds(address))
    monkeypatch.setattr(ray_nodes, "_nonlocal_bind", lambda version: False)
    asked = answer(monkeypatch, own)
    adapter = retrying_at_once(MQTT.adapter(mqtt_spec(port), Credentials(), lambda inbound: None, lambda *ack: None,
                                            reach=Reach(None)))
    adapter.start()
    try:
        wait_for(lambda: len(asked) >= 2, "a second connection attempt")
        refused = adapter.last_error
        assert refused.startswith(f"refused to connect to broker {REBOUND}:{port}: host {REBOUND!r} resolved to {own} "
                                  f"({RAY_NODE}, which connectors may not reach: its internal services listen "
                                  "there): not connected"), refused
        assert not adapter.connected() and tested == [ipaddress.ip_address(own)]
    finally:
        adapter.stop()


NODE_A, NODE_GONE, NODE_V6 = "198.51.100.5", "198.51.100.6", "2001:db8:5::5"
"""Addresses of the cluster's other machines, as `ray.nodes()` gives them (TEST-NET-2, documentation IPv6)."""


def test_by_default_the_clusters_alive_nodes_are_refused_asking_ray_at_most_once_a_minute(monkeypatch):
    """Another node's GCS, raylet and dashboard are one hop away: its address (`NodeManagerAddress`) is refused
    like this machine's while it is alive, at the declaration and at the attempt; a node that left is not. The
    check is on the connection path: Ray is asked once a minute, and its last answer is kept while it cannot
    answer."""
    now, calls, nodes = [1000.0], [], [{"Alive": True, "NodeManagerAddress": NODE_A},
                                       {"Alive": False, "NodeManagerAddress": NODE_GONE},
                                       {"Alive": True, "NodeManagerAddress": NODE_V6}]

    def ray_nodes_answer() -> list[dict]:
        calls.append(now[0])
        if isinstance(nodes, Exception):
            raise nodes
        return nodes

    monkeypatch.setattr(ray_nodes, "monotonic", lambda: now[0])
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert Reach(None).refusal(NODE_A) is None and calls == []  # no Ray in this process: no node list to ask
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", ray_nodes_answer)
    for host in (NODE_A, NODE_V6):
        assert Reach(None).refusal(host).startswith(f"host {host!r} is {RAY_NODE} ({host}: its internal services "
                                                    "listen there), which connectors may not reach"), host
    assert Reach(None).refusal(NODE_GONE) is None  # (not alive)
    asked = answer(monkeypatch, PUBLIC, NODE_A, NODE_A, NODE_A)
    assert Reach(None).refusal(REBOUND) is None
    with pytest.raises(Unreachable, match=rf"resolved to {NODE_A} \({RAY_NODE}, which connectors may not reach"):
        Reach(None).vetted(REBOUND, 6379)
    assert [info[4][0] for info in Reach(["198.51.100.0/24"]).vetted(REBOUND, 6379)] == [NODE_A]  # listed
    assert calls == [1000.0] and len(asked) == 3  # one question to Ray for all of them
    now[0] += ray_nodes.NODES_TTL_S
    nodes = RuntimeError("GCS unreachable")  # asked again a minute later, which fails: its last answer is kept
    with pytest.raises(Unreachable, match=RAY_NODE):
        Reach(None).vetted(REBOUND, 6379)
    assert Reach(None).refusal(NODE_A) is not None and calls == [1000.0, 1060.0]  # (and not asked at each check)
    now[0] += ray_nodes.NODES_TTL_S
    nodes = [{"Alive": False, "NodeManagerAddress": NODE_A}]  # that node left
    assert Reach(None).refusal(NODE_A) is None and calls == [1000.0, 1060.0, 1120.0]


def test_the_session_rays_node_is_among_the_clusters_nodes(ray_session):
    """`ray.nodes()` as this Ray version answers it: the node's address is where `ClusterNodes` reads it."""
    assert ipaddress.ip_address(ray.util.get_node_ip_address()) in ray_nodes.ClusterNodes().addresses()


@pytest.mark.parametrize("host", ["10.20.3.4", "172.16.0.9", "192.168.1.5", "100.64.7.1", "fd12:3456::7",
                                  "::ffff:192.168.1.5"])
def test_private_networks_are_refused_unless_the_operator_lists_them(host):
    """Connectors a tenant creates reached any private address: their `last_error` told which hosts and ports of the
    operator's network answer (a port scanner for every tenant admin). Closed unless listed."""
    refused = Reach(None).refusal(host, 1883)
    assert refused is not None and refused.startswith(f"host {host!r} is in a private network (") and \
        "ServeConfig.connector_hosts" in refused
    assert Reach([f"{host}/{128 if ':' in host else 32}"]).refusal(host) is None
