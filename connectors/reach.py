"""Which hosts a tenant's connector may connect to: a connector is a TCP client inside the operator's
network, so an API-created one reaches only the hosts `ServeConfig.connector_hosts` lists (names,
addresses, networks), and without a list none that is link-local (169.254.0.0/16, fe80::/10: where a
cloud hands out its nodes' credentials), also when an IPv6 address carries the IPv4 one."""

from __future__ import annotations

import ipaddress
import socket


class Reach:
    """Which hosts a tenant's connector may connect to (`ServeConfig.connector_hosts`): without a list, any
    but link-local addresses (a cloud's metadata service hands out the node's credentials)."""

    def __init__(self, hosts: list[str] | None):
        self.names = None if hosts is None else {h.lower() for h in hosts if not _network(h)}
        self.networks = [n for h in hosts or () if (n := _network(h))]

    def refusal(self, host: str) -> str | None:
        """Why `host` may not be reached, or None. Names are resolved now: a listed name is reachable
        whatever it resolves to; an unlisted one by the addresses it has."""
        if self.names is not None and host.lower() in self.names:
            return None
        try:
            addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in socket.getaddrinfo(host, None)}
        except (socket.gaierror, UnicodeError, ValueError):
            addresses = set()
        if self.names is None:
            local = sorted(str(a) for a in addresses if _link_local(a))
            return f"host {host!r} is link-local ({', '.join(local)}), which connectors may not reach" if local \
                else None
        if addresses and all(any(a in n for n in self.networks) for a in addresses):
            return None
        return (f"host {host!r} is not among the hosts this service lets connectors reach "
                "(ServeConfig.connector_hosts, its operator's list)")


def _link_local(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Link-local, also as an IPv4 address inside an IPv6 one (``::ffff:169.254.169.254``, NAT64's
    ``64:ff9b::/96``, 6to4), which reaches the IPv4 host."""
    if address.is_link_local:
        return True
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if any(address in n for n in _NAT64) else None)
        return inner is not None and inner.is_link_local
    return False


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))  # RFC 6052, RFC 8215


def _network(host: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(host, strict=False)
    except ValueError:
        return None
