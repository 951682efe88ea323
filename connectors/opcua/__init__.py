"""OPC UA connector (asyncua): monitored items into twins, commands written to nodes. See connectors/README.md.

Its names are imported on first use (PEP 562): the dev server's process (`python -m connectors.opcua.devserver`)
runs this file first, and importing the connector here made every server start import Ray and Arrow too (seconds
each start on a busy machine, for a server that needs asyncua alone)."""

from raytwin.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "connectors.opcua.adapter": ("OPCUA", "OpcUaAdapter"),
    "connectors.opcua.config": ("CommandNode", "MappedNode", "OpcUaSpec"),
})
