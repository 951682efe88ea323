"""Connectors from device protocols (MQTT, OPC UA) into the twins' ingestion path, and commands back."""
