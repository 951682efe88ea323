"""The command target's type as read from a real (in-process) asyncua server: enumerations declared the three
ways OPC UA servers do (DataTypeDefinition since 1.04, EnumValues or EnumStrings before it)."""

from __future__ import annotations

import asyncio

from asyncua import Client, Server, ua
from asyncua.common.structures104 import new_enum

from connectors.opcua.targets import node_type
from raytwin.ports import free_port


async def _enum_type(server: Server, idx: int, name: str, prop: str | None, values) -> ua.NodeId:
    """A DataType under Enumeration: declared by its definition (prop None), or only by an `EnumValues` /
    `EnumStrings` property as servers before OPC UA 1.04 declare it."""
    if prop is None:
        return (await new_enum(server, idx, name, values)).nodeid
    dtype = await server.get_node(ua.NodeId(ua.ObjectIds.Enumeration)).add_data_type(ua.NodeId(name, idx), name)
    await dtype.add_property(0, prop, values)
    return dtype.nodeid


def test_enumeration_values_are_read_from_definition_enumvalues_or_enumstrings():
    """A set point's enumeration decides which integers may be written; only the definition's way was tested, and
    an older server's EnumValues (values that need not be 0..n-1) or EnumStrings (the index is the value) read
    wrong would let an undeclared value reach a PLC, or refuse a declared one."""
    async def scenario() -> dict[str, tuple]:
        port = free_port()
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/targets/")
        idx = await server.register_namespace("urn:raytwin:targets-test")
        plant = await server.nodes.objects.add_object(idx, "Plant")
        kinds = {
            "by_definition": (None, ["Off", "Manual", "Auto"]),
            "by_enum_values": ("EnumValues", [ua.EnumValueType(Value=v, DisplayName=ua.LocalizedText(t))
                                              for v, t in ((0, "Off"), (5, "High"), (9, "Purge"))]),
            "by_enum_strings": ("EnumStrings", [ua.LocalizedText(t) for t in ("Closed", "Open")]),
        }
        for name, (prop, values) in kinds.items():
            dtype = await _enum_type(server, idx, f"{name}.Type", prop, values)
            await plant.add_variable(ua.NodeId(name, idx), name, ua.Variant(0, ua.VariantType.Int32), datatype=dtype)
        await plant.add_variable(ua.NodeId("plain_int", idx), "plain_int", ua.Variant(0, ua.VariantType.Int32))
        async with server:
            async with Client(f"opc.tcp://127.0.0.1:{port}/targets/") as client:
                out = {}
                for name in (*kinds, "plain_int"):
                    t = await node_type(client, ua.NodeId(name, idx))
                    out[name] = (t.vtype, t.enum)
                return out

    got = asyncio.run(scenario())
    assert got == {
        "by_definition": (ua.VariantType.Int32, {0: "Off", 1: "Manual", 2: "Auto"}),
        "by_enum_values": (ua.VariantType.Int32, {0: "Off", 5: "High", 9: "Purge"}),
        "by_enum_strings": (ua.VariantType.Int32, {0: "Closed", 1: "Open"}),
        "plain_int": (ua.VariantType.Int32, None),  # an Int32 is no enumeration: any integer goes
    }
