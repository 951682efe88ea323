"""Commands given a Ray address where nothing listens say so at once, not after ray.init's minutes of retries."""

from __future__ import annotations

import socket

import pytest
import ray
from typer.testing import CliRunner

from raytwin.cli import app
from raytwin.ports import free_port
from raytwin.ray_connect import unreachable
from serve_apps.auth import create_key


def test_a_port_where_nothing_listens_is_unreachable_and_a_listening_one_is_left_to_ray() -> None:
    port = free_port()
    reason = unreachable(f"127.0.0.1:{port}")
    assert reason is not None and f":{port} (connection refused)" in reason
    assert unreachable(f"ray://127.0.0.1:{port}") == f"nothing answers at 127.0.0.1:{port} (connection refused)"
    with socket.socket() as listening:
        listening.bind(("0.0.0.0", 0))
        listening.listen()
        assert unreachable(f"127.0.0.1:{listening.getsockname()[1]}") is None
    assert [unreachable(a) for a in (None, "auto", "local")] == [None, None, None]  # Ray finds or starts its own
    assert unreachable("127.0.0.1") == "'127.0.0.1' is not a Ray cluster address (host:port, ray://host:port or auto)"


def test_status_given_an_address_without_a_port_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    out = CliRunner().invoke(app, ["status", "--address", "127.0.0.1"])
    assert out.exit_code == 1 and "is not a Ray cluster address" in out.output, out.output  # was Ray's traceback


@pytest.mark.parametrize("command", [["serve", "--store", "{tmp}/store", "--keys-file", "{tmp}/keys.json"],
                                     ["status"], ["twins", "reshard", "{tmp}/twins", "--shards", "2"]])
def test_commands_refuse_an_address_where_nothing_listens(command: list[str], tmp_path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as from a shell: the suite's own Ray may be up
    create_key(tmp_path / "keys.json", "acme", "admin", owner="admin")
    address = f"127.0.0.1:{free_port()}"
    args = [a.format(tmp=tmp_path) for a in command] + ["--address", address]
    out = CliRunner().invoke(app, args)
    assert out.exit_code != 0, out.output
    assert "nothing answers at" in out.output and "connection refused" in out.output, out.output
