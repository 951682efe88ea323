"""`raytwin.storage`: one place resolves store URLs, and an S3 store's requests are bounded."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from raytwin.storage import filesystem, storage_options_for
from raytwin.store_failures import StoreIOError, store_io


@pytest.fixture
def silent_endpoint(monkeypatch) -> Iterator[list[socket.socket]]:
    """An S3 endpoint that accepts connections and never answers (a hung gateway, a frozen server), named by
    RAYTWIN_S3_ENDPOINT_URL; yields the connections it accepted."""
    server = socket.create_server(("127.0.0.1", 0), backlog=16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed at teardown
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("RAYTWIN_S3_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    yield accepted
    server.close()
    for conn in accepted:
        conn.close()


@pytest.mark.timeout(60)
def test_an_s3_endpoint_that_stops_answering_fails_as_the_stores_timeout_after_its_attempts(
        silent_endpoint, monkeypatch):
    """s3fs's own limits held this read for over six minutes (15 s a try, five tries by botocore, each retried five
    times by s3fs); bounded, it fails after `RAYTWIN_S3_ATTEMPTS` tries as the store's `timeout` (503
    `store_unavailable`, `error="timeout"`), the class the operator's runbook names for an S3 brownout."""
    monkeypatch.setenv("RAYTWIN_S3_TIMEOUT_S", "0.3")
    monkeypatch.setenv("RAYTWIN_S3_ATTEMPTS", "2")
    fs, path = filesystem("s3://bucket/store")
    with pytest.raises(StoreIOError) as failed, store_io("read"):
        fs.cat_file(f"{path}/twins/lease.json")
    assert failed.value.error == "timeout", failed.value
    assert len(silent_endpoint) == 2  # one connection a try: botocore's tries alone, none of s3fs's on top


def test_explicit_s3_options_keep_their_own_limits_and_other_stores_get_none(monkeypatch):
    monkeypatch.setenv("RAYTWIN_S3_TIMEOUT_S", "0.3")
    own = {"config_kwargs": {"read_timeout": 60}}
    assert storage_options_for("s3://bucket/store", own)["config_kwargs"] == {"read_timeout": 60}
    bounded = storage_options_for("s3://bucket/store")["config_kwargs"]
    assert (bounded["connect_timeout"], bounded["read_timeout"]) == (0.3, 0.3)
    assert storage_options_for("/var/lib/raytwin") == {} and storage_options_for("memory://x") == {}


@pytest.mark.parametrize(("name", "value"), [("RAYTWIN_S3_TIMEOUT_S", "5s"), ("RAYTWIN_S3_TIMEOUT_S", "0"),
                                             ("RAYTWIN_S3_ATTEMPTS", "2.5"), ("RAYTWIN_S3_ATTEMPTS", "-1")])
def test_a_bad_s3_limit_is_named_with_its_fix(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}='{value}': expected a .*number above 0 .*set it so, or unset it"):
        storage_options_for("s3://bucket/store")
