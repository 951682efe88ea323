"""Connectors to device protocols (MQTT, OPC UA) feeding the live twins, and commands back to assets."""
