"""What a command's target node is on the server: how its value is typed and in which unit it is kept.

Read once per connection (a changed PLC program comes with a restart or reconnect), before anything is written:
the value goes in the node's own data type (a type-checking server refuses any other with BadTypeMismatch; an
enumeration takes only the values it declares), and a node that declares its EngineeringUnits in another unit than
the command node's `unit` is refused (the value, converted to the declared unit, would be taken in the node's:
a flow in m^3/s written to a node kept in L/s is 1000 times too small).
"""

from __future__ import annotations

import logging

from asyncua import Client, ua
from asyncua.common.node import Node
from asyncua.common.ua_utils import data_type_to_variant_type

from connectors.opcua.values import NodeType
from raytwin import units

log = logging.getLogger("raytwin.connectors")
SUPERSCRIPTS = str.maketrans({"¹": "^1", "²": "^2", "³": "^3", "⁴": "^4", "·": "*", "⋅": "*"})
"""How engineering units are often displayed (m³/s, N·m) -> RayTwin's unit syntax."""


async def node_type(client: Client, nid: ua.NodeId) -> NodeType:
    """The node's data type (an enumeration's values) and its declared engineering unit, as far as RayTwin reads
    it. Raises `ValueError` naming the node if its DataType cannot be read."""
    node = client.get_node(nid)
    try:
        dtype = client.get_node(await node.read_data_type())
        vtype = await data_type_to_variant_type(dtype)
    except ua.UaStatusCodeError as exc:
        raise ValueError(f"node {nid.to_string()}: its DataType cannot be read ({type(exc).__name__}): check the "
                         "command node's node_id") from None
    enum = await _enumeration(dtype) if vtype == ua.VariantType.Int32 and dtype.nodeid != ua.NodeId(
        ua.ObjectIds.Int32) else None
    return NodeType(vtype, enum, await _engineering_unit(node))


async def _enumeration(dtype: Node) -> dict[int, str]:
    """An enumeration's values: its DataTypeDefinition (OPC UA 1.04), else its EnumValues or EnumStrings property
    (older servers); {} if it declares none (then no value can be checked, and none is written)."""
    try:
        definition = await dtype.read_data_type_definition()
        if isinstance(definition, ua.EnumDefinition) and definition.Fields:
            return {int(f.Value): f.Name for f in definition.Fields}
    except ua.UaError:  # no such attribute (a server before 1.04), or it is empty
        pass
    for prop in await dtype.get_properties():
        name = (await prop.read_browse_name()).Name
        if name == "EnumValues":
            return {int(v.Value): v.DisplayName.Text for v in await prop.read_value()}
        if name == "EnumStrings":
            return {i: text.Text for i, text in enumerate(await prop.read_value())}
    return {}


async def _engineering_unit(node: Node) -> str | None:
    """The unit the node's EngineeringUnits property displays, if it has one RayTwin can read (None: it declares
    none, or one RayTwin does not know, which cannot be checked)."""
    for prop in await node.get_properties():
        if (await prop.read_browse_name()).Name != "EngineeringUnits":
            continue
        eu = await prop.read_value()
        text = (getattr(getattr(eu, "DisplayName", None), "Text", None) or "").strip().translate(SUPERSCRIPTS)
        if text and units.is_unit(text):
            return text
        log.info("event=opcua_unit_unknown node=%s engineering_units=%r", node.nodeid.to_string(), eu)
    return None


def unit_problem(node_id: str, declared: str, node_unit: str | None) -> str | None:
    """Why a value in the command node's `declared` unit must not be written to a node kept in `node_unit`, or
    None (the same unit, or the node declares none RayTwin reads)."""
    if node_unit is None or units.same_unit(declared, node_unit):
        return None
    try:
        units.to_unit(1.0, declared, node_unit)
    except units.UnitError as exc:
        return (f"node {node_id} declares EngineeringUnits {node_unit!r}, of another dimension than the command "
                f"node's unit {declared!r} ({exc}): map the command to the right node, or correct its unit")
    return (f"node {node_id} declares EngineeringUnits {node_unit!r}, the command node's unit is {declared!r}: a "
            f"value in {declared!r} would be taken as if in {node_unit!r}; declare unit {node_unit!r} on the command "
            "node (a command's own unit is converted to it)")
