"""One OPC UA value change -> one telemetry row (one event), or a dead letter naming the node and the reason.

The event's identity is what makes re-delivery harmless: after a reconnect or a connector restart the
server sends each monitored item's current value again, with its original source timestamp. The event is
keyed (event time = source timestamp, sequence = that time in microseconds, idempotency key = the node id
as configured), so the same value change always yields the same key and the twin counts it as a duplicate,
while a genuinely new change (a new source timestamp) is a new event. The sink checks rows against the
`TelemetryEvent` contract column-wise (with this node's source in a refusal's reason); what only OPC UA can
tell (the value's type, a missing source timestamp, a device clock ahead of the server's) is checked here.

A reading "from the future" is judged against the time the server received it (its ServerTimestamp, the
same live and in the history), not against the clock when the connector reads it: judged at delivery, a
reading 5.5 min ahead was dead-lettered live and applied by a restart's backfill a minute later, so one
reading had two fates and the twin's clock jumped ahead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from asyncua import ua

from connectors.mapping import DeadLetter
from connectors.opcua.config import MappedNode
from raytwin.contracts import MAX_FUTURE_SKEW
from raytwin.statestore import to_micros

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NUMERIC = {ua.VariantType.SByte, ua.VariantType.Byte, ua.VariantType.Int16, ua.VariantType.UInt16,
           ua.VariantType.Int32, ua.VariantType.UInt32, ua.VariantType.Int64, ua.VariantType.UInt64,
           ua.VariantType.Float, ua.VariantType.Double}


INTEGER_RANGE = {ua.VariantType.SByte: (-2**7, 2**7 - 1), ua.VariantType.Byte: (0, 2**8 - 1),
                 ua.VariantType.Int16: (-2**15, 2**15 - 1), ua.VariantType.UInt16: (0, 2**16 - 1),
                 ua.VariantType.Int32: (-2**31, 2**31 - 1), ua.VariantType.UInt32: (0, 2**32 - 1),
                 ua.VariantType.Int64: (-2**63, 2**63 - 1), ua.VariantType.UInt64: (0, 2**64 - 1)}
FLOAT_MAX = 3.4028234663852886e38
"""The largest finite IEEE 754 single (an OPC UA Float, a PLC's REAL)."""


@dataclass(frozen=True)
class NodeType:
    """What a command node takes: its DataType's built-in type (`Variant` for an abstract one such as Number),
    for an enumeration (an Int32 on the wire) the values it declares, value -> name, and its unit."""

    vtype: ua.VariantType
    enum: dict[int, str] | None = None
    unit: str | None = None  # what its EngineeringUnits declare, where RayTwin reads them

    def named(self) -> str:
        return "an enumeration" if self.enum is not None else f"of type {self.vtype.name}"


def command_variant(node_id: str, value: float | bool, node: NodeType) -> ua.Variant:
    """`value` as a Variant of the node's own type (a type-checking server refuses any other with
    BadTypeMismatch): a number, a boolean (true/false, or 0/1) for a Boolean node, one of its declared values
    for an enumeration. Raises `ValueError`, saying what would fit, for a value the node cannot take as meant
    (a boolean for a number is refused, not taken as 1)."""
    vtype = node.vtype
    if vtype == ua.VariantType.Boolean:
        if isinstance(value, bool) or value in (0, 1):
            return ua.Variant(bool(value), vtype)
        raise ValueError(f"node {node_id} is a Boolean: value {value:g} is neither true/false nor 0/1; propose "
                         "true, false, 1 or 0")
    if isinstance(value, bool):
        raise ValueError(f"node {node_id} is {node.named()}: {str(value).lower()} is written only to a Boolean "
                         "node; propose a number")
    if node.enum is not None:
        whole = _whole(node_id, value, node)
        if whole not in node.enum:
            declared = ", ".join(f"{v} ({name})" for v, name in sorted(node.enum.items()))
            raise ValueError(f"node {node_id} is an enumeration: value {whole} is none of its declared values "
                             f"{declared or '(it declares none)'}; propose one of them")
        return ua.Variant(whole, ua.VariantType.Int32)
    if vtype in (ua.VariantType.Double, ua.VariantType.Variant):
        return ua.Variant(float(value), ua.VariantType.Double)
    if vtype == ua.VariantType.Float:
        if abs(value) > FLOAT_MAX:
            raise ValueError(f"node {node_id} is a Float (REAL): value {value:g} is beyond its range "
                             f"[-{FLOAT_MAX:g}, {FLOAT_MAX:g}]")
        return ua.Variant(float(value), ua.VariantType.Float)
    if vtype in INTEGER_RANGE:
        low, high = INTEGER_RANGE[vtype]
        whole = _whole(node_id, value, node)
        if not low <= value <= high:
            raise ValueError(f"node {node_id} is of type {vtype.name}: value {value:g} is outside its range "
                             f"[{low}, {high}]; declare lower/upper on the command node to refuse it at proposal")
        return ua.Variant(whole, vtype)
    raise ValueError(f"node {node_id} has data type {vtype.name}: a command writes a number or a boolean; map the "
                     "command to a numeric (Double, Float or integer), Boolean or enumeration variable")


def _whole(node_id: str, value: float, node: NodeType) -> int:
    """`value` as the whole number it is (a unit conversion's rounding noise, 7.000000000000001 L/s, is no
    fraction), or `ValueError`."""
    whole = round(value)
    if not math.isclose(value, whole, rel_tol=1e-12, abs_tol=1e-9):
        raise ValueError(f"node {node_id} is {node.named()}: value {value:g} (in the command node's unit) is not a "
                         "whole number; propose a whole number, or declare a unit in which it is one")
    return whole


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)  # OPC UA times are UTC


def clock_ahead(dv: ua.DataValue) -> str | None:
    """Why `dv` is refused as from the future, or None: its source timestamp lies more than `MAX_FUTURE_SKEW`
    after the time the server received it (the device's clock is ahead). Without a ServerTimestamp the
    contract's check against the clock at delivery is the only one."""
    if dv.SourceTimestamp is None or dv.ServerTimestamp is None:
        return None
    source_ts, server_ts = _utc(dv.SourceTimestamp), _utc(dv.ServerTimestamp)
    ahead = source_ts - server_ts
    if ahead <= MAX_FUTURE_SKEW:
        return None
    return (f"source timestamp {source_ts.isoformat()} is {ahead - timedelta(microseconds=ahead.microseconds)} after "
            f"the server received the value (ServerTimestamp {server_ts.isoformat()}): the device's (PLC's) clock "
            f"is ahead of the server's by more than {MAX_FUTURE_SKEW}; correct the device's clock (NTP)")


def source(connector: str, node: MappedNode) -> str:
    """Where a value change came from, as dead letters and logs name it."""
    return f"opcua://{connector}/{node.node_id}"


def quality(status: ua.StatusCode) -> str:
    """OPC UA's status severity as the event quality (`bad` values update held inputs, not estimates)."""
    return "good" if status.is_good() else "uncertain" if status.is_uncertain() else "bad"


def to_row(connector: str, node: MappedNode, dv: ua.DataValue) -> dict[str, Any] | DeadLetter | None:
    """The telemetry row (JSON-shaped, contract-checked by the sink) for one value change, a dead letter, or
    None for a status without a value (e.g. BadWaitingForInitialData from a controller that has not sampled
    yet: no reading, nothing malformed). A dead letter's idempotency key is the node id, as an event's."""
    status = dv.StatusCode or ua.StatusCode()
    variant = dv.Value
    vtype = variant.VariantType if variant is not None else ua.VariantType.Null
    value = variant.Value if variant is not None else None
    if vtype == ua.VariantType.Null and status.is_bad():
        return None
    raw = {"value": repr(value)[:200], "variant_type": vtype.name, "status": status.name,
           "source_timestamp": dv.SourceTimestamp.isoformat() if dv.SourceTimestamp else None}
    if vtype not in NUMERIC or isinstance(value, list):
        return _dead(connector, node, f"value {raw['value']} of type {vtype.name} is not a number", raw)
    if not math.isfinite(float(value)):
        return _dead(connector, node, f"value {value} is not finite", raw)
    ts = dv.SourceTimestamp
    if ts is None:
        return _dead(connector, node, "the value has no source timestamp (event time); configure the server to "
                     "send source timestamps", raw)
    ts = _utc(ts)
    if ts < EPOCH:
        return _dead(connector, node, f"source timestamp {ts.isoformat()} is before 1970", raw)
    if ahead := clock_ahead(dv):
        return _dead(connector, node, ahead, raw)
    return {"asset_id": node.asset_id, "event_time": ts.isoformat(), "sequence": to_micros(ts),
            "idempotency_key": node.node_id, "quality": quality(status),
            "measurements": {node.measurement: {"value": float(value), "unit": node.unit}}}


def _dead(connector: str, node: MappedNode, reason: str, raw: dict[str, Any]) -> DeadLetter:
    """A value change's dead letter; with a source timestamp its raw text is the change's identity (written
    once however often the server sends the change again: `connectors.seen_letters`)."""
    body = json.dumps({"node_id": node.node_id, **raw}).encode()
    return DeadLetter.of(source(connector, node), node.asset_id, node.node_id, reason, body,
                         once=raw["source_timestamp"] is not None)
