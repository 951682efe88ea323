"""Free ports: several asked for at once are distinct, even where the OS hands a released port out again."""

from __future__ import annotations

import socket

import pytest

from raytwin import ports
from raytwin.ports import free_port, free_ports


class _ReusingSocket:
    """A socket whose OS gives `bind(port 0)` the lowest port not bound now, so a released one comes back."""

    bound: set[int] = set()

    def __init__(self) -> None:
        self.port: int | None = None

    def __enter__(self) -> _ReusingSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        _ReusingSocket.bound.discard(self.port)

    def bind(self, address: tuple[str, int]) -> None:
        self.port = min(set(range(40000, 40100)) - _ReusingSocket.bound)
        _ReusingSocket.bound.add(self.port)

    def getsockname(self) -> tuple[str, int]:
        assert self.port is not None
        return ("127.0.0.1", self.port)


def test_ports_asked_for_together_are_distinct_where_the_os_reuses_a_released_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ports.socket, "socket", _ReusingSocket)
    assert [free_port(), free_port()] == [40000, 40000]  # one at a time they repeat: what broke a Ray node
    assert free_ports(4) == [40000, 40001, 40002, 40003]
    assert _ReusingSocket.bound == set()  # all released again


def test_free_ports_can_be_bound() -> None:
    chosen = free_ports(8)
    assert len(set(chosen)) == 8
    for port in chosen:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_ports_are_drawn_below_the_ephemeral_range(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The OS gives ephemeral ports to every outgoing connection: one of those could take a chosen port before
    the process it was chosen for binds it (HAProxy's "Address already in use" in CI)."""
    (tmp_path / "range").write_text("32768\t60999\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", str(tmp_path / "range"))
    assert all(ports.BAND_START <= port < 32768 for port in free_ports(50))


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        monkeypatch.setattr(ports, "_band", lambda: range(port, port + 1))
        assert free_port() != port  # every draw hit the port in use: the OS chose


def test_a_narrow_band_is_left_to_the_os(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "range").write_text(f"{ports.BAND_START + 10} 60999\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", str(tmp_path / "range"))
    assert ports._band() is None
    assert free_port() >= 1
