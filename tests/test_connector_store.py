"""The connector store: credentials sealed at rest (they reveal nothing without the key, keys rotate,
plain-text credentials of earlier versions are sealed when read, a missing key is named), and one connector
per broker session (an MQTT client id), whatever the tenant."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from connectors.mqtt import MqttSpec
from connectors.spec import ConnectorSpec, ConnectorStore, Credentials, SessionTaken
from raytwin.sealing import KEY_ENV, KEY_FILE_ENV, Sealer, SealingError, new_key

SECRET = "br0ker-pa55word"
SPEC = ConnectorSpec(name="plant", tenant="acme", kind="mqtt")


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    k = new_key()
    monkeypatch.setenv(KEY_ENV, k)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    return k


def _stored(tmp_path: Path) -> list[Path]:
    return [p for p in tmp_path.rglob("*") if p.is_file()]


def test_stored_credentials_are_sealed_and_open_with_the_key(tmp_path: Path, key: str) -> None:
    store = ConnectorStore(str(tmp_path))
    store.save(SPEC, Credentials(username="plant-gateway", password=SECRET))
    files = _stored(tmp_path)
    assert all(SECRET.encode() not in p.read_bytes() and b"plant-gateway" not in p.read_bytes() for p in files)
    assert {p.name for p in files} == {"spec.json", "credentials.sealed", "desired.json"}
    again = ConnectorStore(str(tmp_path)).credentials("acme", "plant")  # a fresh process, same key
    assert (again.username, again.password.get_secret_value()) == ("plant-gateway", SECRET)


def test_a_value_no_configured_key_opens_names_the_key_that_sealed_it(tmp_path: Path, key: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ConnectorStore(str(tmp_path)).save(SPEC, Credentials(password=SECRET))
    sealed_with = json.loads(next(tmp_path.rglob("credentials.sealed")).read_bytes())["key_id"]
    monkeypatch.setenv(KEY_ENV, new_key())
    with pytest.raises(SealingError, match=f"sealed with key {sealed_with}.*{KEY_ENV}"):
        ConnectorStore(str(tmp_path)).credentials("acme", "plant")


def test_rotation_opens_with_the_old_key_and_reseals_with_the_new(tmp_path: Path, key: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ConnectorStore(str(tmp_path)).save(SPEC, Credentials(password=SECRET))
    newer = new_key()
    monkeypatch.setenv(KEY_ENV, f"{newer},{key}")
    assert ConnectorStore(str(tmp_path)).credentials("acme", "plant").password.get_secret_value() == SECRET
    monkeypatch.setenv(KEY_ENV, newer)  # the old key retired: the value was re-sealed on that read
    assert ConnectorStore(str(tmp_path)).credentials("acme", "plant").password.get_secret_value() == SECRET


def test_plain_text_credentials_of_earlier_versions_are_sealed_when_read(tmp_path: Path, key: str) -> None:
    store = ConnectorStore(str(tmp_path))
    store.save(SPEC, Credentials())
    folder = next(tmp_path.rglob("credentials.sealed")).parent
    (folder / "credentials.sealed").unlink()
    (folder / "credentials.json").write_text(json.dumps({"username": "gw", "password": SECRET}))
    assert store.credentials("acme", "plant").password.get_secret_value() == SECRET
    assert not (folder / "credentials.json").exists()
    assert SECRET.encode() not in (folder / "credentials.sealed").read_bytes()
    assert store.credentials("acme", "plant").password.get_secret_value() == SECRET


def test_without_configuration_a_private_key_file_is_made_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    first = Sealer.from_environment()
    path = tmp_path / "config" / "raytwin" / "secrets.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Sealer.from_environment().open(first.seal(b"x")) == b"x"  # the second process reads the same key
    assert first.source == str(path)


def test_without_configuration_a_read_only_home_says_to_set_the_key(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A hardened container's home is read-only: the key file cannot be made, and a bare OSError
    ("Read-only file system") said neither why a file was written nor what to set instead."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))

    def read_only(*_: object, **__: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(Path, "mkdir", read_only)
    path = tmp_path / "config" / "raytwin" / "secrets.key"
    with pytest.raises(SealingError, match=rf"{KEY_ENV} is not set .* {re.escape(str(path))}, cannot be written "
                                           rf"\(Read-only file system\): set {KEY_ENV}"):
        Sealer.from_environment()


def test_bad_keys_and_damaged_values_are_refused_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "not-a-key")
    with pytest.raises(SealingError, match="not a Fernet key.*new_key"):
        Sealer.from_environment()
    monkeypatch.setenv(KEY_ENV, " , ")
    with pytest.raises(SealingError, match="holds no key"):
        Sealer.from_environment()
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "missing.key"))
    with pytest.raises(SealingError, match="cannot be read"):
        Sealer.from_environment()
    (tmp_path / "k").write_text(new_key() + "\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "k"))
    sealer = Sealer.from_environment()
    with pytest.raises(SealingError, match="not a sealed value"):
        sealer.open(b'{"password": "plain"}')
    tampered = json.loads(sealer.seal(b"secret"))
    tampered["token"] = tampered["token"][:-4] + "AAAA"
    with pytest.raises(SealingError, match="none of the keys"):
        sealer.open(json.dumps(tampered).encode())


def _mqtt(tenant: str, name: str, client_id: str | None = None, host: str = "broker.example.com") -> MqttSpec:
    return MqttSpec(name=name, tenant=tenant, broker={"host": host, "client_id": client_id},
                    routes=[{"topic": "plant/+/telemetry", "asset_level": 1,
                             "payload": {"event_time": "ts", "measurements": {"h1": {"field": "level", "unit": "mm"}}}}])


def test_default_client_ids_of_different_connectors_differ() -> None:
    """`raytwin-<tenant>-<name>` made tenant "a-b"'s "c" and tenant "a"'s "b-c" one broker session: the second
    connector was refused (or, on separate stores, took the first one's queued messages)."""
    ids = {_mqtt(tenant, name).client_id for tenant, name in (("a-b", "c"), ("a", "b-c"), ("a", "b.c"), ("a.b", "c"))}
    assert len(ids) == 4 and _mqtt("a", "b-c").client_id == "raytwin-a@b-c"
    assert _mqtt("a", "b-c", client_id="raytwin-a-b-c").client_id == "raytwin-a-b-c"  # an earlier version's session
    with pytest.raises(ValidationError, match="RayTwin's own .this connector's is 'raytwin-a@b'"):
        _mqtt("a", "b", client_id="raytwin-x@b")


def test_one_connector_holds_each_broker_session(tmp_path: Path) -> None:
    store = ConnectorStore(str(tmp_path))
    # the client ids of earlier versions, chosen to resume their sessions, are the same string
    first, second = _mqtt("a-b", "c", client_id="raytwin-a-b-c"), _mqtt("a", "b-c", client_id="raytwin-a-b-c")
    assert first.session_key() == second.session_key() == "MQTT client id 'raytwin-a-b-c'"
    store.claim(first.session_key(), "a-b", "c")
    store.claim(first.session_key(), "a-b", "c")  # re-declaring the same connector keeps its session
    # whose connector holds it is not said: one answer for another tenant's (which it must not reveal) and one's own
    taken = "^MQTT client id 'raytwin-a-b-c' is in use by another connector: .* give this one its own client id$"
    with pytest.raises(SessionTaken, match=taken) as other_tenants:
        store.claim(second.session_key(), "a", "b-c")
    with pytest.raises(SessionTaken, match=taken) as own:
        store.claim(first.session_key(), "a-b", "d")
    assert str(own.value) == str(other_tenants.value)
    with pytest.raises(SessionTaken, match=taken):  # another name of the same broker, maybe
        store.claim(_mqtt("a", "b-c", "raytwin-a-b-c", host="10.0.0.7").session_key(), "a", "b-c")
    store.release(first.session_key(), "a", "b-c")  # not its holder: nothing happens
    with pytest.raises(SessionTaken):
        store.claim(first.session_key(), "a", "b-c")
    store.release(first.session_key(), "a-b", "c")
    store.claim(second.session_key(), "a", "b-c")
    assert ConnectorSpec(name="plc", tenant="a", kind="opcua").session_key() is None


def test_the_last_alive_time_is_kept_until_a_new_declaration(tmp_path: Path, key: str) -> None:
    """A restarted connector's gap starts at its predecessor's last sign of life; a new declaration has none."""
    store = ConnectorStore(str(tmp_path))
    store.save(SPEC, Credentials())
    assert store.last_alive("acme", "plant") is None
    at = datetime(2026, 12, 4, 14, 0, 5, 250_000, tzinfo=UTC)
    store.mark_alive("acme", "plant", at, connected=False)
    assert ConnectorStore(str(tmp_path)).last_alive("acme", "plant") == at  # another process reads it
    assert not store.had_connected("acme", "plant")  # no session at the source to find lost
    store.mark_alive("acme", "plant", at, connected=True)
    assert store.had_connected("acme", "plant")
    (tmp_path / "connectors/declared/tenant=acme/plant/alive.json").write_text(json.dumps({"at": at.isoformat()}))
    assert store.had_connected("acme", "plant")  # written by an earlier version: it may have had a session
    store.save(SPEC, Credentials())
    assert store.last_alive("acme", "plant") is None and not store.had_connected("acme", "plant")


def test_a_declaration_that_is_no_yaml_or_no_file_is_one_line(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from connectors.cli import connectors_app

    monkeypatch.chdir(tmp_path)  # short paths: the usage error's box wraps long lines
    Path("plant.yaml").write_text("name: x\nkind: mqtt\nbroker: {host: 127.0.0.1\n")
    for path, message in (("plant.yaml", "not valid YAML (line 4, column 1)"), ("nope.yaml", "No such file")):
        out = CliRunner().invoke(connectors_app, ["check", path])  # (a usage error in a box: no traceback)
        assert out.exit_code == 2 and message in out.output and "Traceback" not in out.output


def test_a_connectors_newest_event_time_counts_only_what_the_twins_applied() -> None:
    """A reading for an unknown twin (or too late, or conflicting) must not make a stalled connector look current."""
    from actors.ingest import validate_batch
    from actors.state import IngestReport, Reject
    from connectors.sink import _applied

    rows = [{"asset_id": a, "event_time": f"2026-12-05T0{h}:00:00Z", "sequence": h,
             "measurements": {"T_in": {"value": 293.0, "unit": "K"}}} for a, h in (("z1", 1), ("z1", 2), ("ghost", 6))]
    valid, refused = validate_batch(rows)
    assert valid.num_rows == 3 and refused == []
    report = IngestReport(accepted=2, rejected=1, reasons=[Reject(idempotency_key="ghost:6", reason="unknown twin")])
    assert _applied(valid, report).column("asset_id").to_pylist() == ["z1", "z1"]
    unkeyed = IngestReport(accepted=2, rejected=1, reasons=[Reject(idempotency_key=None, reason="unknown twin")])
    assert _applied(valid, unkeyed).num_rows == 0  # which rows were applied is unknown: none counts


def test_a_delivery_error_says_when_and_is_cleared_by_the_next_delivery() -> None:
    """A store outage's `delivery failed` stayed the connector's `last_error` long after deliveries worked again."""
    import threading

    from connectors.pump import Pump, PumpStats
    from connectors.sink import Delivery, Inbound

    class Flaky:  # fails its first delivery, as a shard that is restarting; notes the error the retry finds
        stats: PumpStats
        seen: list[tuple[str | None, datetime | None]] = []

        def deliver(self, batch: list[Inbound]) -> Delivery:
            self.seen.append((self.stats.last_error, self.stats.last_error_at))
            if len(self.seen) == 1:
                raise ConnectionError("shard restarting")
            return Delivery()

    sink, acked = Flaky(), threading.Event()
    pump = Pump(sink, "acme/flaky", linger_s=0.0)
    sink.stats = pump.stats
    before = datetime.now(UTC)
    try:
        pump.put(Inbound("test", [], [], acked.set))
        assert acked.wait(10)
    finally:
        pump.stop()
    (error, at), = sink.seen[1:]
    assert error == "delivery failed: ConnectionError: shard restarting" and before <= at <= datetime.now(UTC)
    assert (pump.stats.last_error, pump.stats.last_error_at, pump.stats.delivery_errors) == (None, None, 1)


def test_the_pump_bounds_the_bytes_it_queues_not_only_the_messages() -> None:
    """10,000 queued messages of up to 5 MB each were the only bound (a tester's connector grew to 1 GB): a message
    that would take the queue past `max_queued_bytes` waits until the pump has taken the ones before it."""
    import threading

    from connectors.pump import Pump
    from connectors.sink import Delivery, Inbound

    class Held:  # a delivery that waits to be let go, as slow shards
        release, delivering = threading.Event(), threading.Event()

        def deliver(self, batch: list[Inbound]) -> Delivery:
            self.delivering.set()
            assert self.release.wait(30)
            return Delivery()

    sink = Held()
    pump = Pump(sink, "acme/bytes", linger_s=0.0, max_queued_bytes=100)
    put: list[int] = []
    try:
        pump.put(Inbound("t", [], [], lambda: None, size=1000))  # larger than the bound: an empty queue takes it
        assert sink.delivering.wait(10)  # taken: being delivered, the queue empty again
        pump.put(Inbound("t", [], [], lambda: None, size=60))
        third = threading.Thread(target=lambda: (pump.put(Inbound("t", [], [], lambda: None, size=60)), put.append(3)))
        third.start()
        third.join(0.5)
        assert put == [] and third.is_alive()  # 60 + 60 > 100: it waits
        sink.release.set()
        third.join(10)
        assert put == [3]
    finally:
        sink.release.set()
        pump.stop()
