"""The declaration of an OPC UA connector: endpoint, node mapping, command nodes, limits.

Validated when the connector is created, so a typo in a node id, a unit or a duplicated mapping fails at
start with the offending entry named, not as silently missing telemetry hours later. Credentials are not
part of it (`connectors.spec.Credentials`, kept apart and never returned).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from asyncua import ua
from pydantic import AfterValidator, Field, field_validator, model_validator

from connectors.mapping import FrozenSpec
from connectors.spec import ConnectorSpec
from raytwin import units
from raytwin.contracts import Finite, Identifier, Unit


def _node_id(text: str) -> str:
    """A node id as OPC UA writes it (`ns=2;s=Pump.Speed`, `nsu=urn:plant;i=1001`); kept as text (it is
    the events' idempotency key) and parsed here only to refuse typos early."""
    if not 1 <= len(text) <= 256:
        raise ValueError(f"node id {text[:40]!r} must have 1-256 characters (it is the events' idempotency key)")
    try:
        ua.NodeId.from_string(text)
    except Exception as exc:  # asyncua raises several types for malformed text
        raise ValueError(f"{text!r} is not an OPC UA node id (e.g. 'ns=2;s=Pump.Speed' or "
                         f"'nsu=urn:plant;i=1001'): {exc}") from None
    return text


NodeIdText = Annotated[str, AfterValidator(_node_id)]
UA_NAMESPACE = "http://opcfoundation.org/UA/"
"""Namespace 0's URI on every server (so `ns=0;…` and `nsu=http://opcfoundation.org/UA/;…` are one node)."""


def _parts(text: str) -> tuple[tuple[str, object], int | str]:
    """A node id's identifier (numeric forms alike) and namespace: a URI, or an index only the server can map to
    one (index 0 is always `UA_NAMESPACE`)."""
    nid = ua.NodeId.from_string(text)
    kind = "i" if isinstance(nid.Identifier, int) else nid.NodeIdType.name
    namespace = getattr(nid, "NamespaceUri", None) or nid.NamespaceIndex
    return (kind, nid.Identifier), UA_NAMESPACE if namespace == 0 else namespace


def same_node(a: str, b: str) -> bool | None:
    """Whether node ids `a` and `b` name one server node: True, False, or None where only the server can tell
    (one spelled with an index, `ns=2;s=X`, the other with a URI, `nsu=urn:plant;s=X`)."""
    (id_a, ns_a), (id_b, ns_b) = _parts(a), _parts(b)
    if id_a != id_b:
        return False
    if isinstance(ns_a, int) != isinstance(ns_b, int):
        return None
    return ns_a == ns_b


class MappedNode(FrozenSpec):
    """A monitored variable: each change of its value is one measurement of one asset."""

    node_id: NodeIdText
    asset_id: Identifier
    measurement: Identifier
    unit: Unit


class CommandNode(FrozenSpec):
    """Where command `name` for `asset_id` is written: `node_id` takes the value (in `unit`, in the node's own
    data type), then `correlation_node_id` (a string variable) the command's correlation id once the value was
    accepted, so the controller knows which command it executes and an operator can see which one was written
    last."""

    asset_id: Identifier
    name: Identifier
    node_id: NodeIdText
    correlation_node_id: NodeIdText
    unit: Unit
    lower: Finite | None = Field(None, description="the least value the node may be given (in `unit`)")
    upper: Finite | None = Field(None, description="the greatest value the node may be given (in `unit`)")

    @model_validator(mode="after")
    def _consistent(self) -> CommandNode:
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f"command {self.name!r} of {self.asset_id!r}: lower {self.lower:g} > upper "
                             f"{self.upper:g} would refuse every value; give lower <= upper")
        own = "the correlation id needs its own string variable (it would overwrite the value just written)"
        what = f"command {self.name!r} of {self.asset_id!r}"
        if self.correlation_node_id == self.node_id:
            raise ValueError(f"{what}: correlation_node_id is node_id {self.node_id!r}; {own}")
        same = same_node(self.node_id, self.correlation_node_id)
        if same:
            raise ValueError(f"{what}: node_id {self.node_id!r} and correlation_node_id {self.correlation_node_id!r} "
                             f"name one server node; {own}")
        if same is None:
            raise ValueError(f"{what}: node_id {self.node_id!r} and correlation_node_id {self.correlation_node_id!r} "
                             "have one identifier, one with a namespace index (ns=) and one with a URI (nsu=): they "
                             "are one server node if that index is that URI on the server; spell both with nsu= (or "
                             f"both with ns=) so that they can be told apart ({own})")
        return self

    def value_problem(self, value: dict[str, Any]) -> str | None:
        """Why `value` (``{"value": number or true/false, "unit": optional}``) cannot be written here, or None:
        checked when a command is proposed, so an approver never approves what could not or must not be sent
        (what the node's type takes is checked when it is written: only the server knows it)."""
        number = value.get("value")
        if set(value) - {"value", "unit"} or not isinstance(number, int | float):
            return (f"an OPC UA command's value is {{\"value\": number or true/false, \"unit\": optional}}, "
                    f"got {value}")
        unit = str(value.get("unit", self.unit))
        if isinstance(number, bool):  # a Boolean node's (checked against the node's type when it is written)
            if unit != self.unit:
                return f"value {str(number).lower()} takes no unit (the command node's is {self.unit!r}), got {unit!r}"
            converted = float(number)
        else:
            try:
                converted = units.to_unit(float(number), unit, self.unit)
            except (ValueError, KeyError) as exc:
                return f"value {number} {value.get('unit')}: {exc}"
        if not math.isfinite(converted) or (self.lower is not None and converted < self.lower) or (
                self.upper is not None and converted > self.upper):
            low, high = ("-inf" if self.lower is None else f"{self.lower:g}"), ("inf" if self.upper is None
                                                                                else f"{self.upper:g}")
            return f"value {converted:g} {self.unit} for {self.node_id} outside [{low}, {high}] {self.unit}"
        return None


OPC_UA_PORT = 4840
"""The port of an `opc.tcp://` endpoint that names none (IANA's for OPC UA)."""
SECURITY_FILES = ("certificate", "private_key", "server_certificate")
"""The files of an asyncua security string ``Policy,Mode,certificate,private_key[,server_certificate]``."""


def _parses(data: bytes, kind: str, pem: bool) -> bool:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        if kind == "private key":
            (serialization.load_pem_private_key if pem else serialization.load_der_private_key)(data, None)
        else:
            (x509.load_pem_x509_certificate if pem else x509.load_der_x509_certificate)(data)
        return True
    except (ValueError, TypeError):
        return False


class OpcUaSpec(ConnectorSpec):
    """One OPC UA server, the nodes monitored on it and the command nodes that may be written."""

    kind: Literal["opcua"] = "opcua"
    endpoint: str = Field(description="opc.tcp://host:port/path (credentials go to Credentials, never the URL)")
    security: str | None = Field(None, description="asyncua security string, e.g. "
                                 "'Basic256Sha256,SignAndEncrypt,client.der,client.pem' (None: no security)")
    nodes: Annotated[list[MappedNode], Field(min_length=1)]
    commands: list[CommandNode] = []
    publishing_interval_ms: Annotated[float, Field(gt=0)] = 100.0
    sampling_interval_ms: Annotated[float, Field(ge=0, description="0: the server's fastest")] = 0.0
    queue_size: Annotated[int, Field(ge=1, le=100_000, description="server-side queue per monitored item")] = 1000
    max_outstanding: Annotated[int, Field(ge=1, description="value changes received and not yet durable before "
                                          "publishing is paused (backpressure)")] = 10_000
    backfill_s: Annotated[float, Field(ge=0, description=(
        "after every (re)connect, read the nodes' history (HistoryRead) for the changes made while no "
        "subscription existed: after the newest change made durable, or after a connector restart since "
        "this many seconds before each node's current value; also what a full item queue discarded (reading "
        "this far back for nodes whose readings arrive out of order); 0: no backfill (servers without "
        "history)"))] = 0.0
    backoff_initial_s: Annotated[float, Field(gt=0)] = 0.5
    backoff_max_s: Annotated[float, Field(gt=0)] = 30.0
    session_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    request_timeout_s: Annotated[float, Field(gt=0)] = 10.0

    def describe(self) -> str:
        backfill = f"backfill {self.backfill_s:g} s" if self.backfill_s else "no backfill"
        return f"{super().describe()}, {len(self.nodes)} node(s), {len(self.commands)} command(s), {backfill}"

    def source(self) -> tuple[str, int] | None:
        url = urlsplit(self.endpoint)
        return None if url.hostname is None else (url.hostname, url.port or OPC_UA_PORT)

    def files(self) -> dict[str, str]:
        parts = [p.strip() for p in (self.security or "").split(",")]
        return {f"security.{name}": parts[i] for i, name in enumerate(SECURITY_FILES, start=2)
                if i < len(parts) and parts[i]}

    def with_files(self, files: dict[str, str]) -> OpcUaSpec:
        if not files:
            return self
        parts = [p.strip() for p in (self.security or "").split(",")]
        for i, name in enumerate(SECURITY_FILES, start=2):
            if i < len(parts) and f"security.{name}" in files:
                parts[i] = files[f"security.{name}"]
        return self.model_copy(update={"security": ",".join(parts)})

    def security_problems(self) -> list[str]:
        """Why the security string's files cannot make a secure channel (missing, unreadable, not a certificate
        or key), found when the connector is declared rather than by a session that ends with no word."""
        out = []
        for field, path in self.files().items():
            kind = "private key" if field == "security.private_key" else "certificate"
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                out.append(f"{field} {path!r} cannot be read: {exc.strerror or exc}")
                continue
            pem = path.endswith(".pem")  # how asyncua reads it: PEM by that suffix only, else DER
            if not _parses(data, kind, pem):
                out.append(f"{field} {path!r} is no {kind} in {'PEM' if pem else 'DER'} (asyncua reads a file "
                           "named *.pem as PEM, any other as DER)")
        return out

    @field_validator("security")
    @classmethod
    def _security(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = [p.strip() for p in v.split(",")]
        if len(parts) not in (4, 5) or not all(parts) or parts[1] not in ("Sign", "SignAndEncrypt"):
            raise ValueError(f"security {v!r}: give 'Policy,Mode,certificate,private_key[,server_certificate]' "
                             "with Mode Sign or SignAndEncrypt, e.g. 'Basic256Sha256,SignAndEncrypt,client.der,"
                             "client.pem' (leave it out for no security)")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme != "opc.tcp" or not parts.hostname:
            raise ValueError(f"endpoint {v!r} is not an opc.tcp://host:port/... URL")
        if parts.username or parts.password:
            raise ValueError("put the username and password in the connector's credentials, not in the endpoint "
                             "URL (URLs are logged and returned)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaSpec:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        _unique("node_id", [n.node_id for n in self.nodes])
        _unique("(asset_id, measurement)", [(n.asset_id, n.measurement) for n in self.nodes])
        _unique("(asset_id, name) of commands", [(c.asset_id, c.name) for c in self.commands])
        return self

    def command(self, asset_id: str, name: str) -> CommandNode:
        """The declared command node, or `LookupError` (commands go only to declared nodes)."""
        for c in self.commands:
            if (c.asset_id, c.name) == (asset_id, name):
                return c
        raise LookupError(f"connector {self.name!r} declares no command {name!r} for asset {asset_id!r}; "
                          f"declared: {sorted((c.asset_id, c.name) for c in self.commands)}")


def _unique(what: str, keys: list) -> None:
    seen: set = set()
    dup = []
    for k in keys:
        if k in seen and k not in dup:
            dup.append(k)
        seen.add(k)
    if dup:
        raise ValueError(f"duplicate {what}: {dup[:5]}; each may be mapped once")
