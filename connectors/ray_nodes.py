"""Whether an address is one of the machines of this Ray cluster, which a tenant's connector may not reach by
default (`connectors.reach`): Ray's GCS (6379), raylets, dashboard (8265), metrics agents and other tenants'
connectors' local services listen on a node's own address (10.x.x.x), not only on loopback, and a connector's
`last_error` would tell a tenant which of its ports answer.

Two tests, both cached, as they run at every connection attempt: an address of the machine the check runs on
(a socket binds to it, or where any address binds, `ip_nonlocal_bind`, the kernel routes it here; remembered per
address for `LOCAL_TTL_S`), and the alive nodes' addresses Ray knows (`ray.nodes()` where Ray is initialized, as
in the backend and the connector actors; asked at most once per `NODES_TTL_S`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from time import monotonic

import ray

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

LOCAL_TTL_S = 10.0
"""How long an address is known to be (or not be) this machine's: addresses change rarely, attempts often."""
NODES_TTL_S = 60.0
"""How long the cluster's node list is used before Ray is asked again (a node that joined is refused within this)."""

log = logging.getLogger("raytwin.connectors")


def is_ray_node(address: Address) -> bool:
    """`address` is this machine's own (any interface's) or an alive Ray node's of the cluster."""
    return _LOCAL.holds(address) or address in _CLUSTER.addresses()


class LocalAddresses:
    """This machine's addresses, by test: an address is local iff a socket can bind to it (any interface, any
    secondary address, a local route's prefix; a multicast one binds too and is no machine's), remembered for
    `ttl_s` per address."""

    LIMIT = 4096  # (entries, then all are forgotten: tenants choose the addresses asked about)

    def __init__(self, ttl_s: float = LOCAL_TTL_S):
        self.ttl_s = ttl_s
        self._known: dict[Address, tuple[float, bool]] = {}  # address -> (known until, local)

    def holds(self, address: Address) -> bool:
        now = monotonic()
        if (known := self._known.get(address)) is not None and known[0] > now:
            return known[1]
        if len(self._known) >= self.LIMIT:
            self._known.clear()
        local = not address.is_multicast and (_routed_here(address) if _nonlocal_bind(address.version)
                                              else _binds(address))
        self._known[address] = (now + self.ttl_s, local)
        return local


class ClusterNodes:
    """The alive Ray nodes' addresses (`NodeManagerAddress`), asked of Ray at most once per `ttl_s`; none where Ray
    is not initialized in this process. If Ray cannot answer, the addresses it last gave are kept."""

    def __init__(self, ttl_s: float = NODES_TTL_S):
        self.ttl_s, self._until = ttl_s, float("-inf")
        self._addresses: frozenset[Address] = frozenset()

    def addresses(self) -> frozenset[Address]:
        if not ray.is_initialized():
            return frozenset()
        if (now := monotonic()) >= self._until:
            self._until = now + self.ttl_s  # (also after a failure: no GCS call per attempt while it is down)
            try:
                self._addresses = frozenset(a for node in ray.nodes() if node.get("Alive")
                                            if (a := _parsed(node.get("NodeManagerAddress"))) is not None)
            except Exception:  # noqa: BLE001 - the GCS unreachable: keep what it last said, ask again later
                log.warning("event=ray_nodes_unknown kept=%d", len(self._addresses), exc_info=True)
        return self._addresses


_LOCAL = LocalAddresses()
_CLUSTER = ClusterNodes()


def _binds(address: Address) -> bool:
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((str(address), 0))
    except OSError:
        return False
    return True


def _nonlocal_bind(version: int) -> bool:
    """Linux's `net.ipv{4,6}.ip_nonlocal_bind` is set (a node that takes over virtual addresses): any address binds,
    so binding tells nothing."""
    try:
        with open(f"/proc/sys/net/ipv{version}/ip_nonlocal_bind", encoding="ascii") as setting:
            return setting.read().strip() not in ("", "0")
    except OSError:
        return False


def _routed_here(address: Address) -> bool:
    """The kernel routes `address` to this machine: the source it picks to reach it is the address itself (a
    connected UDP socket sends nothing)."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((str(address), 9))
            return _parsed(sock.getsockname()[0]) == address
    except OSError:
        return False


def _parsed(text: object) -> Address | None:
    try:
        return ipaddress.ip_address(str(text).split("%")[0])  # (an IPv6 scope, "%eth0", is no part of the address)
    except ValueError:
        return None
