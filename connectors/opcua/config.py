"""The declared configuration of an OPC UA connector: endpoint, credentials, node mapping, commands, limits.

Validated when the connector is created, so a typo in a node id, a unit or a duplicated mapping fails at
start with the offending entry named, not as silently missing telemetry hours later.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from asyncua import ua
from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator

from raytwin.contracts import Contract, Identifier, Unit


def _node_id(text: str) -> str:
    """A node id as OPC UA writes it (`ns=2;s=Pump.Speed`, `nsu=urn:plant;i=1001`); kept as text (it is
    the idempotency key) and parsed here only to refuse typos early."""
    try:
        ua.NodeId.from_string(text)
    except Exception as exc:  # asyncua raises several types for malformed text
        raise ValueError(f"{text!r} is not an OPC UA node id (e.g. 'ns=2;s=Pump.Speed' or "
                         f"'nsu=urn:plant;i=1001'): {exc}") from None
    if not 1 <= len(text) <= 256:
        raise ValueError(f"node id {text[:40]!r} must have 1-256 characters (it is the events' idempotency key)")
    return text


NodeIdText = Annotated[str, AfterValidator(_node_id)]


class MappedNode(Contract):
    """A monitored variable: its value changes become one measurement of one asset."""

    node_id: NodeIdText
    asset_id: Identifier
    measurement: Identifier
    unit: Unit


class CommandNode(Contract):
    """Where a command `name` for `asset_id` is written: the value node (in `unit`) and a string node that
    receives the command's correlation id in the same Write request (the controller's record of what it
    executed, and the connector's proof after a crash that a command already went out)."""

    asset_id: Identifier
    name: Identifier
    node_id: NodeIdText
    correlation_node_id: NodeIdText
    unit: Unit


class OpcUaConfig(Contract):
    """One connector: one server endpoint, one tenant, the nodes it monitors and the commands it may write."""

    kind: Literal["opcua"] = "opcua"
    name: Identifier
    tenant: Identifier
    endpoint: str = Field(description="opc.tcp://host:port/path (no credentials in the URL)")
    username: str | None = None
    password: SecretStr | None = None
    security: str | None = Field(None, description="asyncua security string, e.g. "
                                 "'Basic256Sha256,SignAndEncrypt,client.der,client.pem'")
    nodes: list[MappedNode] = Field(min_length=1)
    commands: list[CommandNode] = []
    publishing_interval_ms: float = Field(100.0, gt=0)
    sampling_interval_ms: float = Field(0.0, ge=0, description="0: the server's fastest (every change)")
    queue_size: int = Field(1000, ge=1, le=100_000, description="server-side queue per monitored item")
    max_buffered: int = Field(10_000, ge=1, description="notifications held in the connector before it "
                              "pauses publishing (backpressure)")
    batch_size: int = Field(1000, ge=1)
    linger_s: float = Field(0.05, ge=0)
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    session_timeout_s: float = Field(60.0, gt=0)
    request_timeout_s: float = Field(10.0, gt=0)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme != "opc.tcp" or not parts.hostname:
            raise ValueError(f"endpoint {v!r} is not an opc.tcp://host:port/... URL")
        if parts.username or parts.password:
            raise ValueError("put credentials in username/password, not in the endpoint URL (URLs get logged)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("give both username and password, or neither")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        _unique("node_id", [n.node_id for n in self.nodes])
        _unique("(asset_id, measurement)", [(n.asset_id, n.measurement) for n in self.nodes])
        _unique("(asset_id, name) of commands", [(c.asset_id, c.name) for c in self.commands])
        return self

    def command(self, asset_id: str, name: str) -> CommandNode:
        """The declared command target, or `KeyError` (commands go only to declared nodes)."""
        for c in self.commands:
            if (c.asset_id, c.name) == (asset_id, name):
                return c
        raise KeyError(f"connector {self.name!r} declares no command {name!r} for asset {asset_id!r}; "
                       f"declared: {sorted((c.asset_id, c.name) for c in self.commands)}")

    def public(self) -> dict:
        """The configuration as the API and logs may show it: the password is never included."""
        return self.model_dump(mode="json", exclude={"password"}) | {"password": "***" if self.password else None}


def _unique(what: str, keys: list) -> None:
    seen: set = set()
    dup = []
    for k in keys:
        if k in seen and k not in dup:
            dup.append(k)
        seen.add(k)
    if dup:
        raise ValueError(f"duplicate {what}: {dup[:5]}; each may be mapped once")
