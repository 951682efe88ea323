"""Free TCP ports on loopback, for the local processes RayTwin starts (Ray nodes, brokers, test servers).

A port the OS hands out for `bind(port 0)` comes from its ephemeral range, the same range it draws the source
port of every outgoing connection from: between being chosen and being bound by the process it was chosen for
(HAProxy, a Ray node, a broker), such a port can be taken by any connection on the machine, and the bind fails
with "Address already in use". Ports are therefore drawn from a band below the ephemeral range, which the OS
never hands out by itself, and above the ports Ray's workers use by default (10002-19999); a candidate is
bound before it is returned, so a port another process listens on is skipped.
"""

from __future__ import annotations

import errno
import random
import socket
from contextlib import ExitStack

__all__ = ["free_port", "free_ports"]

BAND_START = 20000
"""The lowest port drawn: above Ray's default worker ports (10002-19999) and the usual services' ports."""
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
MIN_BAND = 1000
"""Fewer ports than this below the ephemeral range, and the OS's own choice is used instead."""
ATTEMPTS = 200
_random = random.SystemRandom()
"""Not the global generator, which a test or a job may seed alike in many processes at once."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, outside the OS's ephemeral range (see the module's docstring)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports on `host`, for one process that must be given several at once.

    Each socket stays bound until all are chosen, so no port repeats (Ray refuses to start a node whose
    components share a port).
    """
    band = _band()
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            ports.append(_bind(sock, host, band))
        return ports


def _band() -> range | None:
    """The ports below the OS's ephemeral range and above BAND_START, or None where that leaves too few."""
    try:
        with open(EPHEMERAL_RANGE_FILE) as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the conventional IANA dynamic range starts at 49152
        low = 49152
    return range(BAND_START, low) if low - BAND_START >= MIN_BAND else None


def _bind(sock: socket.socket, host: str, band: range | None) -> int:
    """Bind `sock` to a random free port of `band` (the OS's choice where there is none) and return it."""
    if band is not None:
        for _ in range(ATTEMPTS):
            try:
                sock.bind((host, _random.choice(band)))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            return sock.getsockname()[1]
    sock.bind((host, 0))
    return sock.getsockname()[1]
