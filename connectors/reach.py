"""Which hosts a tenant's connector may connect to: a connector is a TCP client inside the operator's
network, so an API-created one reaches only the hosts `ServeConfig.connector_hosts` lists (names,
addresses, networks), and without a list none that is the node itself, another machine of the Ray cluster or
link-local or private: loopback (127.0.0.0/8, ::1, a `localhost` name: Ray's GCS, dashboard and metrics ports,
other tenants' brokers on the node), unspecified (0.0.0.0/8, ::, which connect to the node too), a Ray node's
address (this machine's own on any interface, and the cluster's alive nodes': the same services listen there,
`connectors.ray_nodes`), link-local (169.254.0.0/16, fe80::/10: where a cloud hands out its nodes'
credentials), private networks (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7: the operator's own machines,
and a connector's `last_error` would tell a tenant which of their ports answer), also when an IPv6 address carries
the IPv4 one. An operator who wants connectors to reach a
broker on the node lists it, with its port (`127.0.0.1:1883`): an entry without a port opens every port of that
host, Ray's own included.

A name is checked when the connector is declared (`Reach.refusal`) and again at every connection attempt,
in the connector's process, on the address connected to (`Reach.vetted`, `open_connection`): a name whose
DNS answered a public address at the declaration can answer 169.254.169.254 later (DNS rebinding), and
a client that resolved the name again to connect would go there.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from typing import Any

from connectors.ray_nodes import Address, is_ray_node

AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]
"""One entry of `socket.getaddrinfo`: family, type, protocol, canonical name, socket address."""


class Unreachable(OSError):
    """A connection attempt the reach policy refused: the host resolved to no address it allows (an
    `OSError`, so clients report it and retry as any failed connection)."""


class Reach:
    """Which hosts a tenant's connector may connect to (`ServeConfig.connector_hosts`): without a list, any
    but the node itself (loopback, unspecified), the Ray cluster's machines (Ray's and other tenants' services
    listen on their addresses), link-local addresses (a cloud's metadata service hands out the node's
    credentials) and private networks (the operator's site): a tenant reaches nothing inside its operator's
    network that the operator did not open to it."""

    def __init__(self, hosts: list[str] | None):
        """`hosts`: entries as `parse_entry` reads them (ValueError for one that is none)."""
        entries = [parse_entry(h) for h in hosts or ()]
        self.names: dict[str, set[int | None]] | None = None if hosts is None else {}
        for host, port in entries:
            if isinstance(host, str):
                self.names.setdefault(host, set()).add(port)
        self.networks = [(host, port) for host, port in entries if not isinstance(host, str)]
        self._ported = any(port is not None for _, port in entries)

    def __eq__(self, other: object) -> bool:
        """The same policy (a running connector's against the service's current one)."""
        return isinstance(other, Reach) and (self.names, self.networks) == (other.names, other.networks)

    def refusal(self, host: str, port: int | None = None) -> str | None:
        """Why `host` (on `port`; None: an entry must admit any port) may not be reached, or None. Names are
        resolved now: a listed name is reachable whatever it resolves to; an unlisted one by the addresses it
        has."""
        if self._listed(host, port):
            return None
        if self.names is None and _localhost(host):
            return (f"host {host!r} is loopback (a localhost name), which connectors may not reach: "
                    f"{_opening(host, port)}")
        try:
            addresses = [_address(info) for info in socket.getaddrinfo(host, None)]
        except (socket.gaierror, UnicodeError, ValueError):
            addresses = []
        if self.names is None:
            if not (closed := _by_reason(addresses, _closed)):
                return None
            kinds = " and ".join(f"{kind} ({', '.join(map(str, each))}{_note(kind, ': ')})"
                                 for kind, each in closed.items())
            first = next(iter(closed.values()))[0]
            return f"host {host!r} is {kinds}, which connectors may not reach: {_opening(first, port)}"
        if addresses and not any(self._refuses(a, port) for a in addresses):
            return None
        return f"host {host!r} is {self._unlisted(port)}"

    def vetted(self, host: str, port: int) -> list[AddrInfo]:
        """The addresses of `host` one connection attempt may go to, resolved once, now: connect to these and
        never resolve the name again (DNS may answer otherwise the next time). `Unreachable`, naming each
        address and why, if none is allowed; `socket.gaierror` if the name does not resolve."""
        if self.names is None and _localhost(host):
            raise Unreachable(f"host {host!r} is loopback (a localhost name), which connectors may not reach: not "
                              f"connected; {_opening(host, port)}")
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if self._listed(host, port):
            return infos
        allowed = [info for info in infos if not self._refuses(_address(info), port)]
        if not allowed:
            addresses = [_address(info) for info in infos]
            refused = "; ".join(f"{', '.join(map(str, each))} ({why})"
                                for why, each in _by_reason(addresses, lambda a: self._refuses(a, port)).items())
            opening = f"; {_opening(min(addresses, key=_order), port)}" if self.names is None else ""
            raise Unreachable(f"host {host!r} resolved to {refused}: not connected (it is checked again at every "
                              f"connection attempt, so a name that resolves to an allowed address connects){opening}")
        return allowed

    def _listed(self, host: str, port: int | None) -> bool:
        """The operator listed this name (for `port`, or without one): its DNS is theirs, whatever it resolves to."""
        return self.names is not None and bool(self.names.get(_name(host), set()) & {None, port})

    def _refuses(self, address: Address, port: int | None) -> str | None:
        """Why no connection may go to `address` on `port` (None: it may). Checked before any connection, so a
        refused port reads the same whether something listens on it or not."""
        if self.names is None:
            return f"{kind}, which connectors may not reach{_note(kind, ': ')}" if (kind := _closed(address)) else None
        return None if any(address in n and p in (None, port) for n, p in self.networks) else self._unlisted(port)

    def _unlisted(self, port: int | None) -> str:
        """Not admitted by the list; with entries that name ports, on which port (never which ports are open)."""
        return _UNLISTED if not self._ported or port is None else _UNLISTED.replace(" (", f" on port {port} (", 1)


RAY_NODE = "an address of a Ray node of this cluster"
PRIVATE = "in a private network"
_NOTES = {RAY_NODE: "its internal services listen there",
          PRIVATE: "the operator's own machines, which a tenant's connector reaches only where they are listed"}
"""Why a kind of address is closed, where its name does not say it."""


def _note(kind: str, separator: str) -> str:
    return f"{separator}{_NOTES[kind]}" if kind in _NOTES else ""


_UNLISTED = "not among the hosts this service lets connectors reach (ServeConfig.connector_hosts, its operator's list)"


def _opening(host: str | Address, port: int | None) -> str:
    """How the operator opens a host the default refuses (the tenant who reads it cannot: the service config is
    the operator's), with the setting that does it for `host` on `port` (that port only: an entry without one opens
    every port of the host, Ray's too)."""
    shown = str(host) if isinstance(host, Address) else _name(host)
    if port is None:
        example = f"{host}/{host.max_prefixlen}" if isinstance(host, Address) else shown
    else:
        example = f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"
    return (f"the service's operator can open it to connectors by listing it in ServeConfig.connector_hosts, e.g. "
            f"connector_hosts: [\"{example}\"] (a listed network admits its addresses, a listed name whatever it "
            "resolves to, on the entry's port or, without one, on every port; with a list, connectors reach only the "
            "hosts it names)")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_PORTED = re.compile(r"\[(?P<bracketed>[^\]]+)\](?::(?P<port6>\d+))?|(?P<plain>[^:\[\]]+):(?P<port>\d+)")


def parse_entry(entry: str) -> tuple[str | Network, int | None]:
    """One entry of `ServeConfig.connector_hosts`: a name (compared as DNS does) or a network, and the one port it
    opens (None: every port). `broker.example`, `10.20.0.0/16`, `::1`; with a port `broker.example:1883`,
    `127.0.0.1:1883`, `10.20.0.0/16:8883`, `[::1]:1883`, `[fd00::/64]:1883`. ValueError: none of these."""
    text = entry.strip()
    if (network := _network(text)) is not None:
        return network, None
    port: int | None = None
    if (match := _PORTED.fullmatch(text)) is not None:
        text = match["bracketed"] or match["plain"]
        digits = match["port6"] or match["port"]
        port = int(digits) if digits else None
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"connector_hosts entry {entry!r}: port {port} is not 1-65535")
        if (network := _network(text)) is None and match["bracketed"]:
            raise ValueError(f"connector_hosts entry {entry!r}: brackets hold an IPv6 address or network")
    if network is None and (not text or any(c in text for c in ":/[] ")):
        raise ValueError(f"connector_hosts entry {entry!r} is no host name, address or network (with an optional "
                         "port: 'broker.example:1883', '127.0.0.1:1883', '[::1]:1883', '10.20.0.0/16:8883')")
    return (network if network is not None else _name(text)), port


def open_connection(infos: list[AddrInfo], timeout: float | None, source: tuple[str, int] | None = None,
                    attempting: Callable[[socket.socket], None] = lambda sock: None) -> socket.socket:
    """A TCP socket connected to the first of `infos` that answers, as `socket.create_connection` does but
    without resolving a name: the address connected to is one that was vetted. `attempting` is told each socket
    before it connects (so that another thread can cut the attempt short: `socket.shutdown`), and may raise."""
    error: OSError = Unreachable("no address to connect to")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            attempting(sock)
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


def _closed(address: Address) -> str | None:
    """What `address` is if no tenant's connector may reach it without the operator's list: the node itself
    (loopback; unspecified, 0.0.0.0/8 and ::, which connect to the node), link-local, a machine of the Ray cluster
    (it binds a socket, or asks Ray, though both are cached) or another of a private network; also as an IPv4 address inside an
    IPv6 one (``::ffff:127.0.0.1``, NAT64's ``64:ff9b::/96``, 6to4, Teredo's client, SIIT's ``::ffff:0:0:0/96``,
    the deprecated IPv4-compatible ``::127.0.0.1``), which reaches the IPv4 host."""
    carried = [a for a in (address, _inner(address)) if a is not None]
    for one in carried:
        if one.is_loopback:
            return "loopback"
        if one.is_unspecified or one in _THIS_NETWORK:
            return "unspecified"
        if one.is_link_local:
            return "link-local"
    if any(map(is_ray_node, carried)):
        return RAY_NODE
    return PRIVATE if any(one in net for one in carried for net in _PRIVATE) else None


def _inner(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (None: none)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    embeds = any(address in n for n in _EMBEDDING)
    return address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1] or (
        ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if embeds else None)


def _localhost(host: str) -> bool:
    """A localhost name (``localhost``, ``x.localhost``, any case, with the root's dot): loopback whatever this
    node's resolver answers for it (RFC 6761), which may be nothing at the declaration and 127.0.0.1 later."""
    name = _name(host)
    return name == "localhost" or name.endswith(".localhost")


def _by_reason(addresses: list[Address], why: Callable[[Address], str | None]) -> dict[str, list[Address]]:
    """The distinct `addresses` that `why` gives a reason for, in order, by reason."""
    reasons: dict[str, list[Address]] = {}
    for address in sorted(set(addresses), key=_order):
        if (reason := why(address)) is not None:
            reasons.setdefault(reason, []).append(address)
    return reasons


def _order(address: Address) -> tuple[int, Address]:
    return address.version, address  # (IPv4 and IPv6 addresses do not compare)


_PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",  # shared address space (RFC 6598): carrier-grade NAT, also many clusters' pod networks
    "fc00::/7"))  # unique local IPv6 (RFC 4193)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # "this network" (RFC 1122): no destination; 0.0.0.0 is the node
_EMBEDDING = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"),  # NAT64: RFC 6052, 8215
              ipaddress.ip_network("::ffff:0:0:0/96"),  # SIIT's IPv4-translated addresses (RFC 2765)
              ipaddress.ip_network("::/96"))  # IPv4-compatible (RFC 4291, deprecated; still routed by some stacks)


def _network(host: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(host, strict=False)
    except ValueError:
        return None


def _name(host: str) -> str:
    """A host name as DNS compares it: case-insensitive, the root's trailing dot dropped (``Broker.Example.``)."""
    return host.lower().rstrip(".")
