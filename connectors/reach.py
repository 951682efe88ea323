"""Which hosts a tenant's connector may connect to: a connector is a TCP client inside the operator's
network, so an API-created one reaches only the hosts `ServeConfig.connector_hosts` lists (names,
addresses, networks), and without a list none that is link-local (169.254.0.0/16, fe80::/10: where a
cloud hands out its nodes' credentials), also when an IPv6 address carries the IPv4 one.

A name is checked when the connector is declared (`Reach.refusal`) and again at every connection attempt,
in the connector's process, on the address connected to (`Reach.vetted`, `open_connection`): a name whose
DNS answered a public address at the declaration can answer 169.254.169.254 later (DNS rebinding), and
a client that resolved the name again to connect would go there.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]
"""One entry of `socket.getaddrinfo`: family, type, protocol, canonical name, socket address."""


class Unreachable(OSError):
    """A connection attempt the reach policy refused: the host resolved to no address it allows (an
    `OSError`, so clients report it and retry as any failed connection)."""


class Reach:
    """Which hosts a tenant's connector may connect to (`ServeConfig.connector_hosts`): without a list, any
    but link-local addresses (a cloud's metadata service hands out the node's credentials)."""

    def __init__(self, hosts: list[str] | None):
        self.names = None if hosts is None else {_name(h) for h in hosts if not _network(h)}
        self.networks = [n for h in hosts or () if (n := _network(h))]

    def __eq__(self, other: object) -> bool:
        """The same policy (a running connector's against the service's current one)."""
        return isinstance(other, Reach) and (self.names, self.networks) == (other.names, other.networks)

    def refusal(self, host: str) -> str | None:
        """Why `host` may not be reached, or None. Names are resolved now: a listed name is reachable
        whatever it resolves to; an unlisted one by the addresses it has."""
        if self._listed(host):
            return None
        try:
            addresses = {_address(info) for info in socket.getaddrinfo(host, None)}
        except (socket.gaierror, UnicodeError, ValueError):
            addresses = set()
        if self.names is None:
            local = sorted(str(a) for a in addresses if self._refuses(a))
            return f"host {host!r} is link-local ({', '.join(local)}), which connectors may not reach" if local \
                else None
        if addresses and not any(self._refuses(a) for a in addresses):
            return None
        return f"host {host!r} is {_UNLISTED}"

    def vetted(self, host: str, port: int) -> list[AddrInfo]:
        """The addresses of `host` one connection attempt may go to, resolved once, now: connect to these and
        never resolve the name again (DNS may answer otherwise the next time). `Unreachable`, naming each
        address and why, if none is allowed; `socket.gaierror` if the name does not resolve."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if self._listed(host):
            return infos
        allowed = [info for info in infos if not self._refuses(_address(info))]
        if not allowed:
            refused = "; ".join(dict.fromkeys(f"{a} ({self._refuses(a)})" for a in map(_address, infos)))
            raise Unreachable(f"host {host!r} resolved to {refused}: not connected (it is checked again at every "
                              "connection attempt, so a name that resolves to an allowed address connects)")
        return allowed

    def _listed(self, host: str) -> bool:
        """The operator listed this name: its DNS is theirs, whatever it resolves to."""
        return self.names is not None and _name(host) in self.names

    def _refuses(self, address: Address) -> str | None:
        """Why no connection may go to `address` (None: it may)."""
        if self.names is None:
            return "link-local, which connectors may not reach" if _link_local(address) else None
        return None if any(address in n for n in self.networks) else _UNLISTED


_UNLISTED = "not among the hosts this service lets connectors reach (ServeConfig.connector_hosts, its operator's list)"


def open_connection(infos: list[AddrInfo], timeout: float | None,
                    source: tuple[str, int] | None = None) -> socket.socket:
    """A TCP socket connected to the first of `infos` that answers, as `socket.create_connection` does but
    without resolving a name: the address connected to is one that was vetted."""
    error: OSError = Unreachable("no address to connect to")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            if source:
                sock.bind(source)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def _address(info: AddrInfo) -> Address:
    return ipaddress.ip_address(info[4][0].split("%")[0])  # (an IPv6 scope, "%eth0", is no part of the address)


def _link_local(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Link-local, also as an IPv4 address inside an IPv6 one (``::ffff:169.254.169.254``, NAT64's
    ``64:ff9b::/96``, 6to4, Teredo's client, the deprecated IPv4-compatible ``::169.254.169.254``), which
    reaches the IPv4 host."""
    if address.is_link_local:
        return True
    if isinstance(address, ipaddress.IPv6Address):
        embeds = any(address in n for n in _EMBEDDING)
        inner = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1] or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if embeds else None)
        return inner is not None and inner.is_link_local
    return False


_EMBEDDING = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"),  # NAT64: RFC 6052, 8215
              ipaddress.ip_network("::/96"))  # IPv4-compatible (RFC 4291, deprecated; still routed by some stacks)


def _network(host: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(host, strict=False)
    except ValueError:
        return None


def _name(host: str) -> str:
    """A host name as DNS compares it: case-insensitive, the root's trailing dot dropped (``Broker.Example.``)."""
    return host.lower().rstrip(".")
