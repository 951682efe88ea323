"""OPC UA connector (asyncua): monitored items into twins, commands written to nodes. See connectors/README.md."""

from connectors.opcua.adapter import OPCUA, OpcUaAdapter
from connectors.opcua.config import CommandNode, MappedNode, OpcUaSpec

__all__ = ["OPCUA", "CommandNode", "MappedNode", "OpcUaAdapter", "OpcUaSpec"]
