"""A tenant's connector connects only where the reach policy allows, at every connection attempt, on the
address it connects to: a name that resolved to a public address when it was declared can resolve to
169.254.169.254 (a cloud's metadata service) later (DNS rebinding). No external network: names are
answered by a stand-in for `socket.getaddrinfo`, connections go to a local listener."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from connectors.reach import Reach, Unreachable, open_connection

REBOUND = "broker.tenant.example"
METADATA = "169.254.169.254"


def answer(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> list[str]:
    """`socket.getaddrinfo` answering `REBOUND` with the next of `addresses` at each call (the last one from then
    on), other names as before; returns the names asked for, one per call."""
    real, asked = socket.getaddrinfo, []

    def getaddrinfo(host, port, *args, **kwargs):
        if host != REBOUND:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        address = addresses[min(len(asked), len(addresses)) - 1]
        if ":" in address:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port or 0, 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A local TCP listener (what the allowed address reaches)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


def test_each_attempt_resolves_once_and_connects_to_the_address_it_vetted(monkeypatch, listener):
    asked = answer(monkeypatch, "127.0.0.1", METADATA)
    port = listener.getsockname()[1]
    with open_connection(Reach(None).vetted(REBOUND, port), timeout=5) as sock:
        assert sock.getpeername() == ("127.0.0.1", port)
    assert asked == [REBOUND]  # the socket was connected to the vetted address, not to a second answer
    with pytest.raises(Unreachable, match=rf"host '{REBOUND}' resolved to {METADATA} \(link-local, which "
                                          "connectors may not reach\): not connected"):
        Reach(None).vetted(REBOUND, port)  # the next attempt, after the DNS answer changed


def test_an_attempt_keeps_only_the_addresses_the_policy_allows(monkeypatch):
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (METADATA, port)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.20.0.7", port))] if host == REBOUND else real(host, port))
    assert [info[4][0] for info in Reach(None).vetted(REBOUND, 1883)] == ["10.20.0.7"]
    assert [info[4][0] for info in Reach(["10.20.0.0/16"]).vetted(REBOUND, 1883)] == ["10.20.0.7"]
    assert len(Reach([REBOUND]).vetted(REBOUND, 1883)) == 2  # a listed name: the operator's DNS, any address
    with pytest.raises(Unreachable, match=rf"{METADATA} \(not among the hosts .*\); 10.20.0.7 \(not among"):
        Reach(["10.30.0.0/16"]).vetted(REBOUND, 1883)
