"""Free TCP ports on loopback, for the local processes RayTwin starts (Ray nodes, brokers, test servers)."""

from __future__ import annotations

import socket
from contextlib import ExitStack

__all__ = ["free_port", "free_ports"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just found free on `host`; another process may take it before it is bound (rare)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports on `host`, for one process that must be given several at once.

    Each socket stays bound until all are chosen: ports picked one after another may repeat once the first
    is released (the OS hands a just-freed port out again), and Ray refuses to start a node whose components
    share a port.
    """
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
