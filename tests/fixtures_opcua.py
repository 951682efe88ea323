"""The plant side of the OPC UA tests: a device writing to the dev server (`connectors.opcua.devserver`)."""

from __future__ import annotations

from datetime import datetime

from asyncua import ua
from asyncua.sync import Client

from connectors.opcua.devserver import OpcUaServer


class Device:
    """The plant side: writes value changes with explicit source timestamps, reads what commands wrote."""

    def __init__(self, server: OpcUaServer):
        username, password = server.user.split(":", 1)
        self.client = Client(server.endpoint)
        self.client.set_user(username)
        self.client.set_password(password)
        self.client.connect()

    def write(self, name: str, value, at: datetime) -> None:
        variant = ua.Variant(value, ua.VariantType.Double if isinstance(value, float) else ua.VariantType.String)
        self.client.get_node(f"ns=2;s={name}").write_value(ua.DataValue(variant, SourceTimestamp=at))

    def write_at_once(self, name: str, readings: list[tuple[float, datetime]]) -> None:
        """(value, source time) readings in one Write request: the server takes them all within one publishing
        interval, so a monitored item's queue keeps only its last `queue_size` of them for the next publish."""
        nid = ua.NodeId.from_string(f"ns=2;s={name}")
        values = [ua.DataValue(ua.Variant(v, ua.VariantType.Double), SourceTimestamp=at) for v, at in readings]
        codes = self.client.tloop.post(self.client.aio_obj.uaclient.write_attributes(
            [nid] * len(values), values, ua.AttributeIds.Value))
        assert all(c.is_good() for c in codes), codes

    def read(self, name: str):
        """The node's value, or None while it has none (a bad status)."""
        dv = self.client.get_node(f"ns=2;s={name}").read_data_value(raise_on_bad_status=False)
        return dv.Value.Value if dv.StatusCode.is_good() else None

    def close(self) -> None:
        self.client.disconnect()
