"""OPC UA connector (asyncua): monitored items into twins, commands written to nodes. See connectors/README.md.

Its names are imported on first use (PEP 562): the dev server's process (`python -m connectors.opcua.devserver`)
runs this file first, and importing the connector here made every server start import Ray and Arrow too (seconds
each start on a busy machine, for a server that needs asyncua alone)."""

from importlib import import_module

_MODULES = {"OPCUA": "adapter", "OpcUaAdapter": "adapter", "CommandNode": "config", "MappedNode": "config",
            "OpcUaSpec": "config"}
__all__ = ["OPCUA", "CommandNode", "MappedNode", "OpcUaAdapter", "OpcUaSpec"]


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(import_module(f"connectors.opcua.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
