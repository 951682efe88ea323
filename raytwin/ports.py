"""A free TCP port on loopback, for the local processes RayTwin starts (Ray nodes, brokers, test servers)."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just found free on `host`; another process may take it before it is bound (rare)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
