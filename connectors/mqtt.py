"""MQTT connector (paho-mqtt 2, MQTT 3.1.1 and 5): subscriptions into twins, commands back to assets.

- **Persistent session, QoS 1.** The client id is stable (`raytwin-<tenant>@<name>` unless given)
  and the session survives disconnects (3.1.1: ``clean_session=False``; 5: ``clean_start=False`` and
  a session expiry), so the broker keeps what is published while RayTwin is away or paused and
  delivers it on reconnect (as far as the broker saved it to disk: a broker crash loses the rest, unseen), if
  published at QoS 1 or 2: a broker queues no QoS 0 message for a session that is away, so a reading received at
  QoS 0 is reported (once per connection).
  With MQTT 5 a reconnect's SUBSCRIBE asks for retained messages on a new subscription only; with either version a
  retained copy of the payload this process delivered last on its topic is acknowledged unread (`connectors.retained`).
- **Acknowledged after durable.** With paho's manual acks a PUBACK is sent only once the message's
  events are in the twins' logs (or its dead letters are written; an asset's answer once its command's record
  has it, `ConnectorRuntime._on_ack`, or once it is dead-lettered, given up after `ANSWER_WRITE_TRIES`). A message
  delivered on an earlier connection is never acknowledged on a later one: the broker re-sends it there under the
  same packet id and may reuse that id afterwards, so acking the stale copy could acknowledge a newer, not yet
  durable message. The re-sent copy is acknowledged instead (a duplicate for the twins).
- **Connected means subscribed.** `connected()` turns true when the broker has acknowledged every
  subscription (SUBACK), not at CONNACK: on a first connection a message published before the
  SUBSCRIBE arrives reaches no session, so "connected" must not be reported before then. A
  subscription the broker refuses (its ACL) leaves the connector not connected, with the refusal as
  its last error; one granted at QoS 0 (at most once: a crash could lose messages) is an error too.
- **A pause hands nothing over twice**: it disconnects once what it handed over is acknowledged and the broker has
  read the acknowledgements (`pause`), leaving what arrives meanwhile to be sent again on resume. It cuts a connection
  attempt in progress short (`_Client.cut_attempts`).
- **A full pump hides no lost connection**: the network thread it holds reads nothing, so the connection's TCP state
  is read meanwhile (`_abandoned`), and a connection the broker closed is said lost at once.
- **Reconnects** with exponential backoff (`reconnect_min_s` .. `reconnect_max_s`), also for the
  first connection; TLS and username/password (the password is a write-only credential). A
  reconnect on which the broker has no session for us (it restarted without persistence, or the
  session expired) is an error: what was published meanwhile is lost, and the operator must know.
- **Commands** are published (QoS 1) to the asset's `command_topic` with a JSON body carrying the
  correlation id (and, in MQTT 5, the CorrelationData and ResponseTopic properties); assets answer
  on `ack_topic` with ``{"correlation_id": ..., "status": "ok" | "error", "detail": ...}``, and with
  ``{asset_id}`` in it (``plant/{asset_id}/ack``) only the commanded asset's answer counts; a message there that is
  no answer is dead-lettered, as an unreadable reading is.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import AfterValidator, Field, StrictInt, TypeAdapter, ValidationError, ValidationInfo, model_validator

from connectors.commands import Command, Unconfirmed
from connectors.kinds import AckHandler, AssetTypes, ignore, stored_only, unmeasured
from connectors.mapping import (DEFAULT_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES, DeadLetter, FrozenSpec, PayloadMapping,
                                quoted)
from connectors.reach import Reach, Unreachable, open_connection
from connectors.retained import RetainedCopies
from connectors.sink import Inbound
from connectors.spec import ConnectorSpec, Credentials
from raytwin import metrics
from raytwin.contracts import Identifier

log = logging.getLogger("raytwin.connectors")
_IDENTIFIER = TypeAdapter(Identifier)
PAUSE_DRAIN_S = 10.0
"""How long a pause (or stop) waits for the messages it has handed over to be acknowledged, and for the broker to have
read those acknowledgements, before it disconnects: a batch is durable in tens of ms; a sink that fails for longer (a
store outage) leaves the rest for the broker to send again, as duplicates. The broker answers after what it has in
flight to us (MQTT 5: `receive_maximum`, 1000 by default), each of our acknowledgements a change it may save: 5 s ran
out now and then on a loaded 2-core machine."""
TCP_ESTABLISHED = 1
"""Linux's `tcpi_state` of an open connection (`struct tcp_info`, its first byte): any other is closing or closed."""
BARRIER_FILTER = "raytwin/pause-barrier"
"""A filter a pausing connector unsubscribes from (it holds no such subscription, so nothing changes): the broker reads
a connection's packets in order, so its UNSUBACK says every acknowledgement sent before was read."""
TopicFilter = Annotated[str, Field(min_length=1, max_length=1024)]
ASSET_LEVEL = "{asset_id}"
OWN_PREFIX = "raytwin-"


def default_client_id(tenant: str, name: str) -> str:
    """A connector's own client id: `@` is no identifier character, so (tenant, name) is read back from it
    unambiguously (the `-` of `raytwin-<tenant>-<name>`, used before, made tenant `a`'s `b-c` and tenant `a-b`'s
    `c` one session)."""
    return f"{OWN_PREFIX}{tenant}@{name}"


def legacy_client_id(tenant: str, name: str) -> str:
    """The default of earlier versions: choosable as `broker.client_id` to resume a session kept under it."""
    return f"{OWN_PREFIX}{tenant}-{name}"


def _filter_problem(topic: str) -> str | None:
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or i != len(levels) - 1)):
            return f"topic filter {topic!r}: '+' must be a whole level and '#' the whole last level"
    return None


class TopicRoute(FrozenSpec):
    """Messages on `topic` (a filter, `+`/`#` wildcards) are readings of one asset, mapped by `payload`."""

    topic: TopicFilter
    asset_id: Identifier | None = None
    asset_level: Annotated[int, Field(ge=0)] | None = Field(
        None, description="the topic level (0-based) that names the asset, e.g. 1 in `plant/<asset>/telemetry`")
    payload: PayloadMapping
    command_topic: str | None = Field(
        None, description="where this route's assets take commands; `{asset_id}` is replaced, "
        "e.g. `plant/{asset_id}/cmd`")

    @model_validator(mode="after")
    def _valid(self) -> TopicRoute:
        if (self.asset_id is None) == (self.asset_level is None):
            raise ValueError("give exactly one of asset_id (a fixed asset) and asset_level (the topic level naming "
                             "the asset)")
        problem = _filter_problem(self.topic)
        if problem:
            raise ValueError(problem)
        if self.asset_level is not None and self.asset_level >= len(self.topic.split("/")):
            raise ValueError(f"asset_level {self.asset_level} is beyond the levels of {self.topic!r}")
        if self.command_topic is not None and any(c in self.command_topic for c in "+#"):
            raise ValueError(f"command_topic {self.command_topic!r} must not contain wildcards")
        return self

    def asset_of(self, topic: str) -> str:
        """The asset a message on `topic` is for (ValueError if that level is not an asset id)."""
        if self.asset_id is not None:
            return self.asset_id
        levels = topic.split("/")
        if self.asset_level >= len(levels):
            raise ValueError(f"topic {quoted(topic)} has no level {self.asset_level} naming the asset")
        try:
            return _IDENTIFIER.validate_python(levels[self.asset_level])
        except ValidationError:
            level = levels[self.asset_level]
            raise ValueError(f"topic level {self.asset_level} {quoted(level)} is not an asset id") from None

    def serves(self, asset_id: str) -> bool:
        return self.command_topic is not None and self.asset_id in (None, asset_id)


TLS_FILE_FIELDS = ("ca_file", "cert_file", "key_file")


class TlsSettings(FrozenSpec):
    """Files on the nodes that run connectors (through the API: names in the operator's directory for the
    tenant, `ServeConfig.connector_tls_dir`)."""

    ca_file: str | None = Field(None, description="CA bundle to verify the broker (None: the system's)")
    cert_file: str | None = Field(None, description="client certificate, for brokers that require one")
    key_file: str | None = None

    def problems(self) -> list[str]:
        """Why these files cannot make a TLS client (missing, unreadable, not PEM of the right kind), found
        before a connector is stored rather than by its actor failing to start."""
        out = []
        if self.ca_file is not None:
            try:
                ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ValueError) as exc:
                out.append(f"broker.tls.ca_file {self.ca_file!r} cannot be loaded as a CA bundle: {_why(exc)}")
        if self.key_file is not None and self.cert_file is None:
            out.append("broker.tls.key_file needs broker.tls.cert_file (the client certificate it belongs to)")
        elif self.cert_file is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ValueError) as exc:
                out.append(f"broker.tls.cert_file {self.cert_file!r} (key_file {self.key_file!r}) cannot be loaded "
                           f"as a client certificate and key: {_why(exc)}")
        return out


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__


_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def _broker_host(host: str, info: ValidationInfo) -> str:
    """A host name or an IP address alone. A URL (`mqtts://gw:secret@broker:8883`) was stored, returned by the API,
    logged at every attempt and shown in `last_error` with the password in it; refused without repeating it (but
    read back from the store, where it can only have failed to resolve: its connector is deleted or replaced)."""
    if stored_only(info):
        return host
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        if len(host) <= 253 and _HOST_NAME.fullmatch(host):
            return host
    raise ValueError("broker.host must be a host name or an IP address alone, e.g. broker.plant.example or 10.20.0.5 "
                     "(IPv6 without brackets): no scheme, user name, password, port or path; give the port as "
                     "broker.port, the username and password as the connector's credentials (kept sealed, never "
                     "shown), TLS as broker.tls (the value given is not repeated here: it may hold a password)")


class BrokerSettings(FrozenSpec):
    host: Annotated[str, AfterValidator(_broker_host)] = Field(
        description="the broker's host name or IP address alone (the port: `port`; credentials: the connector's)")
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    protocol: Literal["3.1.1", "5"] = "5"
    client_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    session_expiry_s: Annotated[int, Field(ge=0, le=2**32 - 1)] = 7 * 86_400
    receive_maximum: Annotated[int, Field(ge=1, le=65_535)] = Field(
        1000, description="MQTT 5: unacknowledged messages the broker may have in flight to us. Acks wait until "
        "events are durable (a batch, tens of ms), so this window bounds throughput: ~window / batch time. "
        "MQTT 3.1.1 has no such field: raise the broker's own limit (Mosquitto: max_inflight_messages)")
    reconnect_min_s: Annotated[int, Field(ge=1)] = 1
    reconnect_max_s: Annotated[int, Field(ge=1)] = 30
    confirm_s: Annotated[float, Field(gt=0, le=20)] = Field(
        10.0, description="how long a command's PUBLISH waits for the broker's confirmation before it is recorded "
        "`sent` with the detail `unconfirmed: ...` (at most 20 s: an approval answers within the manager's 30 s)")
    tls: TlsSettings | None = None


class MqttSpec(ConnectorSpec):
    """An MQTT connector: a broker, topic routes, and where assets acknowledge commands."""

    kind: Literal["mqtt"] = "mqtt"
    broker: BrokerSettings
    routes: Annotated[list[TopicRoute], Field(min_length=1)]
    ack_topic: TopicFilter | None = Field(
        None, description="where assets answer commands: `plant/{asset_id}/ack` takes an answer only from the "
        "commanded asset's topic; a plain filter (`plant/+/ack`) from any topic it matches")
    max_payload_bytes: Annotated[StrictInt, Field(ge=1, le=MAX_PAYLOAD_BYTES)] = Field(
        DEFAULT_PAYLOAD_BYTES, description="a larger message is dead-lettered (its size and this limit the reason; "
        "the first bytes, length and SHA-256 kept) and acknowledged, never parsed")

    @property
    def client_id(self) -> str:
        return self.broker.client_id or default_client_id(self.tenant, self.name)

    def describe(self) -> str:
        return f"{super().describe()}, {len(self.routes)} route(s)"

    def source(self) -> tuple[str, int]:
        return self.broker.host, self.broker.port

    def files(self) -> dict[str, str]:
        tls = self.broker.tls
        return {} if tls is None else {f"broker.tls.{name}": value for name in TLS_FILE_FIELDS
                                       if (value := getattr(tls, name)) is not None}

    def with_files(self, files: dict[str, str]) -> MqttSpec:
        tls = self.broker.tls
        if tls is None:
            return self
        changed = {name: files.get(f"broker.tls.{name}", getattr(tls, name)) for name in TLS_FILE_FIELDS}
        return self.model_copy(update={"broker": self.broker.model_copy(update={"tls": tls.model_copy(
            update=changed)})})

    def session_key(self) -> str:
        """A broker keys persistent sessions by client id; the claim leaves the broker out, as one broker
        answers to many names (127.0.0.1, localhost, a DNS alias) that RayTwin cannot tell apart."""
        return f"MQTT client id {self.client_id!r}"

    @property
    def ack_filter(self) -> str | None:
        """The subscription for `ack_topic` (its ``{asset_id}`` level a ``+``)."""
        return None if self.ack_topic is None else self.ack_topic.replace(ASSET_LEVEL, "+")

    def ack_asset(self, topic: str) -> str | None:
        """The asset an answer on `topic` comes from, when `ack_topic` names its level (``{asset_id}``)."""
        levels = (self.ack_topic or "").split("/")
        return topic.split("/")[levels.index(ASSET_LEVEL)] if ASSET_LEVEL in levels else None

    @model_validator(mode="after")
    def _valid(self) -> MqttSpec:
        own = (default_client_id(self.tenant, self.name), legacy_client_id(self.tenant, self.name))
        if self.client_id.startswith(OWN_PREFIX) and self.client_id not in own:
            raise ValueError(f"broker.client_id {self.broker.client_id!r}: ids starting with {OWN_PREFIX!r} are "
                             f"RayTwin's own (this connector's is {own[0]!r}, or {own[1]!r} to resume a session of an "
                             "earlier version); leave it out, or choose one without that prefix")
        if self.ack_topic is not None:
            if self.ack_topic.count(ASSET_LEVEL) > 1 or (ASSET_LEVEL in self.ack_topic
                                                         and ASSET_LEVEL not in self.ack_topic.split("/")):
                raise ValueError(f"ack_topic {self.ack_topic!r}: {ASSET_LEVEL} must be one whole level")
            if problem := _filter_problem(self.ack_filter):
                raise ValueError(problem)
        return self


class _Client(paho.Client):
    """paho's client, keeping why the last connection attempt failed (paho's `on_connect_fail` is told nothing),
    connecting a tenant's connector only where its `reach` allows, and letting a pause cut an attempt short
    (`cut_attempts`)."""

    connect_error: OSError | None = None
    reach: Reach | None = None  # None: the operator's connector, which reaches any host

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._attempt_lock = threading.Lock()
        self._attempt: socket.socket | None = None  # the socket a connection attempt is connecting, until it returns
        self.attempts_cut = False

    def _create_socket_connection(self) -> socket.socket:
        """With a `reach`, the broker's name is resolved once per attempt and the socket connected to an address
        it allows: paho resolving the name again could get another answer (DNS rebinding: 169.254.169.254). TLS
        still checks the certificate against the name (`_ssl_wrap_socket` uses it). No proxy is used for these;
        without a `reach`, an `mqtt_proxy` of the environment is (paho's own connect, which nothing cuts short)."""
        source = (self._bind_address, self._bind_port)
        if self.reach is None and self._get_proxy():
            return super()._create_socket_connection()
        infos = (self.reach.vetted(self._host, self._port) if self.reach is not None
                 else socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM))
        return open_connection(infos, self._connect_timeout, source, self._attempting)

    def _attempting(self, sock: socket.socket | None) -> None:
        """The socket being connected now (None: the attempt is over), which `cut_attempts` shuts down."""
        with self._attempt_lock:
            if sock is not None and self.attempts_cut:
                raise ConnectionAbortedError("connection attempt cut short: the connector is pausing or stopping")
            self._attempt = sock

    def cut_attempts(self) -> None:
        """End the connection attempt in progress (its TCP connect, or TLS handshake) and refuse later ones, until
        `connect_async`: a pause or stop waits for the client's network thread, which an attempt to a host that does
        not answer held for `connect_timeout` (5 s) per address of the broker's name. Its name's resolution is not cut
        short (the resolver's own timeouts)."""
        with self._attempt_lock:
            self.attempts_cut = True
            if self._attempt is not None:
                with suppress(OSError):
                    self._attempt.shutdown(socket.SHUT_RDWR)

    def connect_async(self, *args: Any, **kwargs: Any) -> None:
        self.attempts_cut = False
        super().connect_async(*args, **kwargs)

    def reconnect(self) -> paho.MQTTErrorCode:
        try:
            return super().reconnect()
        except OSError as exc:
            self.connect_error = exc
            raise
        finally:
            self._attempting(None)


def connect_failure(host: str, port: int, exc: OSError | None, timeout_s: float, tls: bool = False) -> str:
    """What kept a connection to `host:port` (`tls`: over TLS) from opening, and how to fix it."""
    where = f"{host}:{port}"
    if isinstance(exc, Unreachable):
        return f"refused to connect to broker {where}: {exc}"
    if isinstance(exc, socket.gaierror):
        return (f"cannot resolve broker host {host!r} ({exc.strerror}): check broker.host and the DNS of the nodes "
                "that run connectors")
    if isinstance(exc, ConnectionRefusedError):
        return (f"broker {where} refused the TCP connection (nothing listens on port {port}): check broker.host, "
                "broker.port and that the broker runs")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: the certificate of broker {where} cannot be verified ({exc.verify_message}): set "
                "broker.tls.ca_file to the CA that signed it, and connect by a name the certificate is for")
    if isinstance(exc, ssl.SSLError) or tls and isinstance(exc, ConnectionResetError | EOFError):
        return (f"TLS handshake with broker {where} failed ({getattr(exc, 'reason', None) or exc}): check that port "
                f"{port} speaks TLS (often 8883, not 1883) and that the broker accepts this client's certificate, if "
                "it needs one")
    if isinstance(exc, TimeoutError):
        return (f"no answer from broker {where} within {timeout_s:g} s: the host is down, or a firewall drops the "
                "connection")
    why = f" ({_why(exc)})" if exc is not None else ""
    return f"cannot connect to broker {where}{why}"


CONNACK_FIXES = {
    0x84: "set broker.protocol to the MQTT version the broker speaks",
    0x85: "the broker refuses this client id: choose broker.client_id as it allows (23 letters and digits are "
          "always allowed)",
    0x86: "bad credentials: declare the connector again with the right username and password",
    0x87: "check the connector's username and password (a broker may answer a wrong or missing one so, as Mosquitto "
          "does: declare the connector again with the right ones), then that the broker's ACL or auth plugin lets "
          "this username and client id connect",
    0x8C: "the broker wants another authentication method",
}
"""How to fix a refused CONNACK, by reason code (MQTT 5's; paho gives 3.1.1's return codes the same)."""
CREDENTIAL_REFUSALS = frozenset({0x86, 0x87})
"""The refusals a connector without credentials gets where the broker requires them."""


def connect_refusal(where: str, client_id: str, reason: Any, credentials: bool = True) -> str:
    """The broker's refusal of a connection, with its reason code and what to do; `credentials`: whether the
    connector has any (a broker that requires them refuses one without as Not authorized, as for a wrong password)."""
    fix = CONNACK_FIXES.get(reason.value, "the broker refused for its own reasons: see its log")
    if not credentials and reason.value in CREDENTIAL_REFUSALS:
        fix = ("this connector has no credentials: if the broker requires them, declare it again with a username and "
               "password (`raytwin connectors create ... --username ... --password-env ...`); else check the broker's "
               "ACL or auth plugin for this client id")
    return (f"broker {where} refused the connection of client {client_id!r}: {reason} (reason code "
            f"0x{reason.value:02X}); {fix}")


class MqttAdapter:
    """One paho client: subscriptions into the pump, commands out."""

    def __init__(self, spec: MqttSpec, credentials: Credentials, put: Callable[[Inbound], None], on_ack: AckHandler,
                 *, resumes_session: bool = False, on_connected: Callable[[], None] = ignore,
                 reach: Reach | None = None):
        """`reach`: where a tenant's connector may connect, checked at every connection attempt (None: anywhere)."""
        self.spec, self.put, self.on_ack, self.on_connected = spec, put, on_ack, on_connected
        self.errors, self.last_error, self.last_error_at = 0, None, None
        self._generation = 0  # +1 per connect and disconnect: acks go only over the connection that delivered
        self._subscription: int | None = None  # the mid of this connection's SUBSCRIBE, until its SUBACK
        self._session_expected = resumes_session  # this process or an earlier one connected: the broker keeps a session
        self._ack_lock = threading.Lock()
        self._unacked: set[int] = set()  # packet ids of this connection's messages handed over, not yet acknowledged
        self._acks_sent = False  # this connection has acknowledged a message: a pause waits for the broker to read it
        self._acked = threading.Condition(self._ack_lock)  # notified as they are
        self._draining = False  # pausing: messages at QoS 1 or 2 are left to the broker, which sends them on resume
        self._barrier: int | None = None  # the mid of a pause's UNSUBSCRIBE, until its UNSUBACK
        self._barrier_passed = threading.Event()
        self._connected = threading.Event()
        self._refused = False  # the broker refused the last connection attempt (kept as `last_error`)
        self._running = False  # between start and pause: the client's loop (and its reconnects) is on
        self._at_most_once_said = False  # a reading at QoS 0 was reported on this connection
        self._receiving = (0, 0)  # the packet id and connection (`_generation`) of the message being handed over
        self._lost = False  # the connection was found lost by a full pump (`_abandoned`), until the next connect
        self._retained = RetainedCopies()  # MQTT 3.1.1 (and a lost MQTT 5 session): sent again at each SUBSCRIBE
        b = spec.broker
        self.v5 = b.protocol == "5"
        self.client = _client(spec, credentials, persistent=True, reach=reach)
        self._credentials = bool(credentials.username or credentials.password)  # (said in a refusal)
        self.client.reconnect_delay_set(b.reconnect_min_s, max(b.reconnect_min_s, b.reconnect_max_s))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self.client.on_publish = self._on_publish
        self._refusals: dict[int, str] = {}  # command PUBLISH mid -> the broker's refusal (MQTT 5 PUBACK reason)

    # ------------------------------------------------------------- lifecycle ----
    def start(self) -> None:
        b = self.spec.broker
        self._draining = False
        kwargs: dict[str, Any] = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = b.session_expiry_s
            props.ReceiveMaximum = b.receive_maximum
            kwargs = {"clean_start": False, "properties": props}
        self.client.connect_async(b.host, b.port, b.keepalive_s, **kwargs)
        self.client.loop_start()
        self._running = True

    def pause(self) -> None:
        """Disconnect; the broker keeps the session and queues QoS 1 messages until `resume`. First (for
        `PAUSE_DRAIN_S` at most) what was handed over is acknowledged and the broker has read those acknowledgements
        (`BARRIER_FILTER`); what arrives meanwhile is left unacknowledged, for the broker to send again on resume. A
        connection lost meanwhile ends the wait: nothing more goes over it, and the broker sends again what it did not
        read as acknowledged. A connection that acknowledged nothing has nothing to drain: no barrier is sent (a broker
        gone without the connection known lost, frozen or its host down, held every such pause for `PAUSE_DRAIN_S`).
        Disconnecting at once left the messages in the pump applied and unacknowledged, and the broker, still
        sending, was reset by the closed socket before it read the acknowledgements already sent: it sent all of
        them again on resume, duplicates (2,185 of 5,000 readings streamed with three pauses, MQTT 5; now none)."""
        deadline = time.monotonic() + PAUSE_DRAIN_S
        with self._acked:  # under the lock `_acker` decides under: a message is awaited here, or left to the broker
            self._draining = True
            self._acked.wait_for(lambda: not self._unacked, PAUSE_DRAIN_S)
            acks_sent = self._acks_sent
        if acks_sent and self.client.is_connected():  # (a broker that has not accepted it answers nothing)
            self._barrier_passed.clear()
            result, self._barrier = self.client.unsubscribe(self._barrier_filter())
            if result == paho.MQTT_ERR_SUCCESS:
                self._barrier_passed.wait(max(0.0, deadline - time.monotonic()))
        self.client.disconnect()  # (no attempt starts after it)
        self.client.cut_attempts()
        self.client.loop_stop()
        self._set_connected(False)
        self._running = False

    def resume(self) -> None:
        if not self._running:  # a running client that lost its broker is reconnecting already
            self.start()

    stop = pause

    def connected(self) -> bool:
        return self._connected.is_set()

    def _set_connected(self, up: bool) -> None:
        (self._connected.set if up else self._connected.clear)()
        metrics.CONNECTOR_CONNECTED.set(1.0 if up else 0.0, connector=f"{self.spec.tenant}/{self.spec.name}")

    def _where(self) -> str:
        return f"{self.spec.broker.host}:{self.spec.broker.port}"

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._refused = True  # the disconnect that follows must not hide why (a wrong password, an ACL)
            self._error(connect_refusal(self._where(), self.spec.client_id, reason, self._credentials))
            return
        self._refused = self._lost = False
        self._at_most_once_said = False
        self.last_error = self.last_error_at = None  # connected again: what went wrong before is over
        self._new_connection()
        if self._session_expected and not flags.session_present and (not self.v5 or self.spec.broker.session_expiry_s):
            self._error(f"broker {self._where()} kept no session for client {self.spec.client_id!r}: messages "
                        "published while the connector was disconnected are lost to it (the broker restarted without "
                        "persistence, or the session expired)")
        self._session_expected = True
        self.on_connected()  # the broker holds a session of ours from now on
        _, self._subscription = client.subscribe(self._subscriptions())
        log.info("event=mqtt_connected tenant=%s connector=%s broker=%s session_present=%s", self.spec.tenant,
                 self.spec.name, self._where(), flags.session_present)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        """A PUBACK: MQTT 5 says there whether the broker accepted the PUBLISH (0x87 Not authorized: its ACL
        denied the topic, and nothing was delivered)."""
        if reason is not None and reason.is_failure:
            self._refusals[mid] = str(reason)

    def _topics(self) -> list[str]:
        return [r.topic for r in self.spec.routes] + ([self.spec.ack_filter] if self.spec.ack_topic else [])

    def _subscriptions(self) -> list[tuple[str, int | SubscribeOptions]]:
        """QoS 1; with MQTT 5, retained messages only for a subscription the session does not hold yet
        (retainHandling 1): every reconnect subscribes again, and a broker sends a topic's retained message at each
        SUBSCRIBE otherwise, so a retained reading came back as a duplicate and a retained bad payload was
        dead-lettered again at every broker or connector restart. MQTT 3.1.1 has no such option: a copy of what was
        delivered is left unread instead (`_on_message`)."""
        if self.v5:
            return [(t, SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB))
                    for t in self._topics()]
        return [(t, 1) for t in self._topics()]

    def _barrier_filter(self) -> str:
        """`BARRIER_FILTER`, made longer where a route or `ack_topic` subscribes to it: it must be no subscription."""
        barrier, topics = BARRIER_FILTER, self._topics()
        while barrier in topics:
            barrier += "/"
        return barrier

    def _on_unsubscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: list, properties: Any) -> None:
        if mid == self._barrier:
            self._barrier_passed.set()

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: list, properties: Any) -> None:
        if mid != self._subscription:
            return  # the SUBACK of an earlier connection's SUBSCRIBE
        self._subscription = None
        topics = self._topics()
        refused = [f"{t!r} ({r})" for t, r in zip(topics, reasons) if r.is_failure]
        if refused:
            self._error(f"broker {self._where()} refused the subscription to {', '.join(refused)}: allow client "
                        f"{self.spec.client_id!r} to read these topics (its ACL), then pause and resume the connector")
            return
        at_most_once = [t for t, r in zip(topics, reasons) if r.value == 0]
        if at_most_once:
            self._error(f"broker {self._where()} granted QoS 0 on {', '.join(map(repr, at_most_once))}: messages "
                        "are not redelivered after a crash; allow QoS 1 (Mosquitto: max_qos)")
        self._set_connected(True)
        log.info("event=mqtt_subscribed tenant=%s connector=%s topics=%d", self.spec.tenant, self.spec.name,
                 len(topics))

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._new_connection()
        self._barrier_passed.set()  # a pause waiting for its barrier: the lost connection will answer nothing
        self._set_connected(False)
        if reason.is_failure and not self._refused and not self._lost:  # (a loss found by `_abandoned` is said)
            self._error(f"disconnected from broker {self._where()}: {reason}; reconnecting with backoff")

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        if self.client.attempts_cut:  # a pause's (or stop's) own doing
            return
        b = self.spec.broker
        why = connect_failure(b.host, b.port, self.client.connect_error, self.client.connect_timeout, b.tls is not None)
        self._error(f"{why}; retrying with backoff")

    def _error(self, message: str) -> None:
        self.errors += 1
        self.last_error, self.last_error_at = message, datetime.now(UTC)
        log.warning("event=mqtt_error tenant=%s connector=%s error=%r", self.spec.tenant, self.spec.name, message)

    # --------------------------------------------------------------- receive ----
    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if (ack := self._acker(msg.mid, msg.qos)) is None:
            return  # pausing: unacknowledged, so the broker sends it again on resume (read once, then)
        if (ack := self._retained.delivering(msg.topic, msg.payload, msg.retain, ack)) is None:
            return  # a retained copy of the payload delivered last on its topic: acknowledged unread
        source = f"mqtt://{self.spec.name}/{msg.topic}"
        try:
            self._receive(msg, source, ack)
        except Exception as exc:  # noqa: BLE001 - an exception here ends paho's network thread: the connector
            # would stay silent for good and the unacked message would come first again after a restart
            reason = f"message could not be read: {type(exc).__name__}: {exc}"
            self._error(f"{reason} (topic {quoted(msg.topic)}; dead-lettered)")
            self._put(Inbound(source, [], [DeadLetter.of(source, None, None, reason, msg.payload)], ack))

    def _receive(self, msg: paho.MQTTMessage, source: str, ack: Callable[[], None]) -> None:
        limit = self.spec.max_payload_bytes
        if (size := len(msg.payload)) > limit:  # never parsed: bounded memory and work
            reason = (f"message of {size} bytes exceeds the connector's max_payload_bytes ({limit}); not read: send "
                      "smaller messages, or raise max_payload_bytes")
            try:  # the asset, where the topic names it: whose message was too large
                asset = self._route(msg.topic)[1]
            except ValueError:
                asset = None
            self._put(Inbound(source, [], [DeadLetter.of(source, asset, None, reason, msg.payload)], ack))
            return
        if self.spec.ack_topic and paho.topic_matches_sub(self.spec.ack_filter, msg.topic):
            if (reason := self._command_ack(msg, ack)) is not None:
                self._put(Inbound(source, [], [DeadLetter.of(source, self._ack_asset(msg.topic), None, reason,
                                                            msg.payload)], ack))
            return
        if msg.qos == 0:
            self._at_most_once(msg.topic)
        try:
            route, asset = self._route(msg.topic)
        except ValueError as exc:
            self._put(Inbound(source, [], [DeadLetter.of(source, None, None, str(exc), msg.payload)], ack))
            return
        rows, dead = route.payload.rows(asset, msg.payload, source)
        self._put(Inbound(source, rows, dead, ack, size=len(msg.payload)))

    def _at_most_once(self, topic: str) -> None:
        """A device publishing at QoS 0: the broker queues none of it for the session while the connector is away
        (paused, restarting, reconnecting; Mosquitto's `queue_qos0_messages false`), so those readings were lost
        with nothing to show for it. Said once per connection, as an error: the guarantee does not hold for them."""
        if not self._at_most_once_said:
            self._at_most_once_said = True
            self._error(f"messages on {quoted(topic)} arrive at QoS 0 (the device publishes them so): the broker keeps "
                        "none for this connector while it is paused, restarting or disconnected, and they are lost "
                        "unseen; publish readings at QoS 1 (said once per connection)")

    def _route(self, topic: str) -> tuple[TopicRoute, str]:
        """The route of a message on `topic` and its asset (ValueError if none matches or the topic names none)."""
        route = next((r for r in self.spec.routes if paho.topic_matches_sub(r.topic, topic)), None)
        if route is None:
            raise ValueError("no route of this connector matches the topic")
        return route, route.asset_of(topic)

    def _new_connection(self) -> None:
        """A connect or disconnect: what earlier connections delivered is never acknowledged now (see the module's
        docstring), so nothing of theirs is awaited."""
        with self._ack_lock:
            self._generation += 1
            self._unacked.clear()
            self._acks_sent = False
            self._acked.notify_all()

    def _acker(self, mid: int, qos: int) -> Callable[[], None] | None:
        """How to acknowledge a message received now: once, over this connection only (a QoS 0 one, never); None
        while pausing (a QoS 1 or 2 one: left to the broker). Decided under the lock `pause` sets `_draining` under:
        a message read as not pausing, then counted after the pause found nothing to await, went to the pump as the
        connection closed, and its acknowledgement was lost with it (a duplicate on resume)."""
        if qos == 0:
            self._receiving = (mid, self._generation)
            return ignore
        with self._ack_lock:
            if self._draining or self._lost:  # (`_lost`: what a connection found lost still holds unread)
                return None
            generation = self._generation
            self._receiving = (mid, generation)
            self._unacked.add(mid)

        def ack() -> None:
            with self._ack_lock:
                if generation == self._generation and mid in self._unacked:
                    self._unacked.discard(mid)
                    self.client.ack(mid, qos)
                    self._acks_sent = True
                    self._acked.notify_all()
        return ack

    def _put(self, message: Inbound) -> None:
        """Hand a message received now to the pump, which asks `_abandoned` while it is full."""
        message.abandoned = self._abandoned
        self.put(message)

    def _abandoned(self) -> bool:
        """Asked by a full pump, on the client's network thread it holds, while the message received (`_receiving`)
        waits for room: whether to give it up, unqueued and unacknowledged, for the broker to send again after the
        reconnect or the resume, and let the thread go back to its connection. Yes once that connection is lost,
        found here (`_socket_lost`: the held thread reads nothing, so paho cannot notice), or a pause began. Held
        until the pump had room (for good in a store outage), the thread hid a lost connection (still connected, no
        error), and a pause waited up to `PAUSE_DRAIN_S` for that message, then for the thread to stop."""
        if not self._lost and self._socket_lost():
            self._lost = True
            self._new_connection()  # nothing more is acknowledged over it, nor awaited by a pause
            self._barrier_passed.set()
            self._set_connected(False)
            self._error(f"connection to broker {self._where()} lost while the connector's pump was full (its receive "
                        "thread waiting for room, which reads nothing meanwhile: a delivery to the twins is slow or "
                        "failing, see the pump's last error): what the broker delivered and was not acknowledged is "
                        "sent again after the reconnect; reconnecting with backoff")
        with self._ack_lock:
            mid, generation = self._receiving
            if generation == self._generation and not (self._draining or self._lost):
                return False
            self._unacked.discard(mid)
            self._acked.notify_all()
        return True

    def _socket_lost(self) -> bool:
        """Whether the broker closed or reset the connection (its restart, its keep-alive ending a connection whose
        held thread sent nothing for 1.5 keepalives), read from the kernel's TCP state without taking a byte of what
        it holds for paho (Linux's TCP_INFO; elsewhere never: a full pump then hides a lost connection until it has
        room again). A network gone silent, where no close or reset arrives, is not seen here."""
        sock = self.client.socket()
        if sock is None or not hasattr(socket, "TCP_INFO"):
            return False
        try:
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED
        except OSError:  # (closed meanwhile)
            return True

    def _command_ack(self, msg: paho.MQTTMessage, ack: Callable[[], None]) -> str | None:
        """Hand an asset's answer on `ack_topic` to `on_ack`, which acknowledges it (`ack`) once it is recorded; for
        one that is no answer, why (the caller dead-letters it, with its payload, as any unreadable message: it only
        set `last_error`, and the next error hid it)."""
        try:
            body = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return _unusable_ack(f"payload is not JSON: {exc}")
        if not isinstance(body, dict):
            return _unusable_ack(f"payload is a JSON {type(body).__name__}, not an object")
        correlation_id = body.get("correlation_id")
        if not correlation_id and self.v5 and (data := getattr(msg.properties, "CorrelationData", None)):
            correlation_id = data.decode(errors="replace")
        if not isinstance(correlation_id, str) or not correlation_id:
            held = "no correlation_id" if correlation_id is None else f"correlation_id {quoted(correlation_id)}"
            return _unusable_ack(f"{held}, where the command's correlation id (text) is needed")
        self.on_ack(correlation_id, body, self.spec.ack_asset(msg.topic), ack)
        return None

    def _ack_asset(self, topic: str) -> str | None:
        """The asset an answer on `topic` names (`ack_topic`'s ``{asset_id}`` level), if that level is an asset id."""
        try:
            return _IDENTIFIER.validate_python(self.spec.ack_asset(topic))
        except ValidationError:
            return None

    # ---------------------------------------------------------------- commands ----
    def send(self, command: Command) -> None:
        route = next((r for r in self.spec.routes if r.serves(command.asset_id)), None)
        if route is None:
            raise LookupError(f"no route of connector {self.spec.name!r} has a command_topic for asset "
                              f"{command.asset_id!r}")
        if not self._connected.is_set():
            raise ConnectionError(f"not connected to broker {self._where()}")
        body = {"correlation_id": command.correlation_id, "command_id": command.id, "name": command.name,
                "value": command.value, "issued_at": datetime.now(UTC).isoformat()}
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = command.correlation_id.encode()
            response = (self.spec.ack_topic or "+").replace(ASSET_LEVEL, command.asset_id)
            if "+" not in response and "#" not in response:
                props.ResponseTopic = response
        info = self.client.publish(route.command_topic.format(asset_id=command.asset_id), json.dumps(body), qos=1,
                                   properties=props)
        info.wait_for_publish(self.spec.broker.confirm_s)
        if (refusal := self._refusals.pop(info.mid, None)) is not None:  # acknowledged, and not accepted
            raise PermissionError(f"broker {self._where()} refused the command: {refusal} (its ACL for this "
                                  "client id and the command topic)")
        if not info.is_published():
            raise Unconfirmed(f"broker {self._where()} did not confirm the command within "
                              f"{self.spec.broker.confirm_s:g} s (the client keeps it and may still deliver it; assets "
                              "must ignore a correlation id they have executed)")


def _unusable_ack(why: str) -> str:
    return (f"unusable command acknowledgement: {why}; an asset answers a command on ack_topic with a JSON object "
            '{"correlation_id": <the command\'s>, "status": "ok" | "error", "detail": ...} (a command it answers stays '
            "unanswered)")


def _client(spec: MqttSpec, credentials: Credentials, *, persistent: bool, reach: Reach | None) -> _Client:
    """A paho client as the connector (its client id, protocol, credentials, TLS). `persistent`: a session the
    broker keeps, messages acknowledged by hand and reconnects (MQTT 5 sets the session at connect); `reach`:
    the hosts it may connect to (None: any)."""
    b = spec.broker
    v5 = b.protocol == "5"
    client = _Client(CallbackAPIVersion.VERSION2, client_id=spec.client_id,
                         protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
                         clean_session=None if v5 else not persistent, manual_ack=persistent,
                         reconnect_on_failure=persistent)
    client.reach = reach
    if credentials.username or credentials.password:
        creds = credentials.revealed()
        client.username_pw_set(creds["username"], creds["password"])
    if b.tls is not None:
        client.tls_set(ca_certs=b.tls.ca_file, certfile=b.tls.cert_file, keyfile=b.tls.key_file)
    return client


def end_session(spec: MqttSpec, credentials: Credentials, reach: Reach | None = None, timeout_s: float = 10.0) -> bool:
    """Connect once as the connector with a clean start and no session expiry, then leave: the broker drops
    the session and what it queued for it. False if the broker could not be reached or refused."""
    b = spec.broker
    answered, accepted = threading.Event(), []
    kwargs: dict[str, Any] = {}
    if b.protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        kwargs = {"clean_start": True, "properties": props}
    try:
        # (TLS files gone since it was declared: ValueError)
        client = _client(spec, credentials, persistent=False, reach=reach)
        client.on_connect = lambda c, u, flags, reason, props: (accepted.append(not reason.is_failure),
                                                                 answered.set())
        client.connect(b.host, b.port, b.keepalive_s, **kwargs)
        client.loop_start()
        ended = answered.wait(timeout_s) and accepted == [True]
        client.disconnect()
        client.loop_stop()
    except (OSError, ValueError) as exc:
        log.warning("event=mqtt_session_kept connector=%s/%s broker=%s:%d error=%r", spec.tenant, spec.name, b.host,
                    b.port, str(exc))
        return False
    return ended


def _matches_some(topic_filter: str, command_topic: str) -> bool:
    """Whether `topic_filter` matches a topic that `command_topic` can be, its `{asset_id}` any asset id."""
    targets = command_topic.split("/")
    for i, level in enumerate(topic_filter.split("/")):
        if level == "#":
            return True  # (also the level above: `plant/#` matches `plant`)
        if i >= len(targets) or level != "+" and not re.fullmatch(
                ".+".join(map(re.escape, targets[i].split(ASSET_LEVEL))), level):
            return False
    return len(topic_filter.split("/")) == len(targets)


def _echoes(spec: MqttSpec) -> list[str]:
    """Subscriptions matching a command topic of the connector (`plant/#` and `plant/{asset_id}/cmd`): a broker delivers
    a client's own PUBLISH to its matching subscriptions (MQTT 5's noLocal would stop that, but not other clients'
    commands on those topics, and MQTT 3.1.1 has none), so every command sent came back: on a route as a reading,
    dead-lettered (`ts: field missing from the payload`); on `ack_topic` as its own asset's answer, acknowledging it
    unanswered (the body carries the correlation id, and no status reads as ok)."""
    commands = [(r.command_topic.replace(ASSET_LEVEL, r.asset_id) if r.asset_id else r.command_topic, r.command_topic)
                for r in spec.routes if r.command_topic is not None]
    echoes = [f"route {r.topic!r} matches command_topic {declared!r}: the connector would read every command it sends "
              "back as a reading (dead-lettered as one); narrow the route's topic filter to the readings' topics, e.g. "
              "plant/+/telemetry" for topic, declared in commands for r in spec.routes if _matches_some(r.topic, topic)]
    if spec.ack_topic is not None:
        echoes += [f"ack_topic {spec.ack_topic!r} matches command_topic {declared!r}: the connector would take every "
                   "command it sends for the asset's answer, acknowledged before the asset answers; give answers their "
                   "own topic, e.g. plant/{asset_id}/ack" for topic, declared in commands
                   if _matches_some(spec.ack_filter, topic)]
    return echoes


class MqttKind:
    spec_type = MqttSpec
    answered_by_send = False  # the asset answers on `ack_topic`, and the broker keeps an answer until it is recorded

    def command_problem(self, spec: MqttSpec, asset_id: str, name: str, value: dict[str, Any]) -> str | None:
        if not any(r.serves(asset_id) for r in spec.routes):  # the body is the device's own JSON: not checked
            return f"no route of connector {spec.name!r} has a command_topic for asset {asset_id!r}"
        return None

    def end_session(self, spec: MqttSpec, credentials: Credentials, reach: Reach | None = None) -> bool:
        return end_session(spec, credentials, reach)

    def stored_refusal(self, spec: MqttSpec) -> str | None:
        """A declaration stored before a route or `ack_topic` matching a command topic was refused (`_echoes`) ran on,
        reading every command it sent back: as a reading (dead-lettered) or as its asset's answer (acknowledged before
        the asset answered)."""
        if not (echoes := _echoes(spec)):
            return None
        return (f"{'; '.join(echoes)} (refused since this connector was declared); declare it again so fixed, keeping "
                "its broker.client_id (the broker keeps its session and what is published meanwhile, within the "
                "session's expiry), or delete it")

    def problems(self, spec: MqttSpec, assets: AssetTypes) -> list[str]:
        unknown = [f"route {r.topic!r}: asset {r.asset_id!r} is not a registered twin of tenant {spec.tenant!r}"
                   for r in spec.routes if r.asset_id is not None and r.asset_id not in assets]
        unmapped = [problem for r in spec.routes for m, field in r.payload.measurements.items()
                    if (problem := unmeasured(f"route {r.topic!r}", m, field.unit, r.asset_id, assets))]
        return unknown + unmapped + _echoes(spec) + (spec.broker.tls.problems() if spec.broker.tls is not None else [])

    def adapter(self, spec: MqttSpec, credentials: Credentials, put: Callable[[Inbound], None],
                on_ack: AckHandler, *, predecessor_seen: datetime | None = None,
                on_connected: Callable[[], None] = ignore, reach: Reach | None = None) -> MqttAdapter:
        """The broker keeps the session's messages while no connector runs; a connection that finds no session
        after an earlier one, of this process or of a predecessor that had connected (`predecessor_seen`: a
        restarted actor or service), is reported: what was published meanwhile is lost."""
        return MqttAdapter(spec, credentials, put, on_ack, resumes_session=predecessor_seen is not None,
                           on_connected=on_connected, reach=reach)


MQTT = MqttKind()
