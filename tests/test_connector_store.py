"""The connector store: credentials sealed at rest (they reveal nothing without the key, keys rotate,
plain-text credentials of earlier versions are sealed when read, a missing key is named), and one connector
per broker session (an MQTT client id), whatever the tenant."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from connectors.manager import Connectors
from connectors.mqtt import MqttSpec
from connectors.reach import Reach
from connectors.runtime import ConnectorState, ConnectorStatus, actor_name, legacy_actor_name
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


def _declaration(name: str, client_id: str | None, host: str = "broker.example.com", port: int = 1883) -> dict:
    """An MQTT connector's declaration as a tenant sends it (the tenant is the caller's)."""
    return {"name": name, "kind": "mqtt", "broker": {"host": host, "port": port, "client_id": client_id},
            "routes": [{"topic": "plant/+/telemetry", "asset_level": 1,
                        "payload": {"event_time": "ts", "measurements": {"h1": {"field": "level", "unit": "mm"}}}}]}


def _mqtt(tenant: str, name: str, client_id: str | None = None, host: str = "broker.example.com") -> MqttSpec:
    return MqttSpec(tenant=tenant, **_declaration(name, client_id, host))


def test_default_client_ids_of_different_connectors_differ() -> None:
    """`raytwin-<tenant>-<name>` made tenant "a-b"'s "c" and tenant "a"'s "b-c" one broker session: the second
    connector was refused (or, on separate stores, took the first one's queued messages)."""
    ids = {_mqtt(tenant, name).client_id for tenant, name in (("a-b", "c"), ("a", "b-c"), ("a", "b.c"), ("a.b", "c"))}
    assert len(ids) == 4 and _mqtt("a", "b-c").client_id == "raytwin-a@b-c"
    assert _mqtt("a", "b-c", client_id="raytwin-a-b-c").client_id == "raytwin-a-b-c"  # an earlier version's session
    with pytest.raises(ValidationError, match="RayTwin's own .this connector's is 'raytwin-a@b'"):
        _mqtt("a", "b", client_id="raytwin-x@b")


def test_connector_actors_of_different_tenants_never_share_a_name() -> None:
    """`raytwin-connector:<tenant>:<name>` made tenant "a"'s connector "b:c" and tenant "a:b"'s "c" one Ray actor (`:`
    is an identifier character): creating, reading, pausing or deleting one tenant's reached the other tenant's."""
    names = {actor_name(tenant, name) for tenant, name in (("a", "b:c"), ("a:b", "c"), ("a", "b.c"), ("a.b", "c"))}
    assert len(names) == 4 and actor_name("a", "b:c") == "raytwin-connector:a@b:c"
    assert legacy_actor_name("raytwin-connector:a:b:c") and not legacy_actor_name(actor_name("a:b", "c"))
    assert not legacy_actor_name("raytwin-shard-0")


def test_the_tenants_with_connectors_are_read_from_their_actors_names_in_the_services_namespace(monkeypatch) -> None:
    """`connector_tenants`: whose twins the backend's pass records the connectors' changes of (each tenant once,
    another namespace's actors, shards and an earlier version's ambiguous names left out)."""
    from connectors.manager import connector_tenants

    actors = [(actor_name("a:b", "c"), "svc"), (actor_name("a:b", "d"), "svc"), (actor_name("e", "f@g"), "svc"),
              (actor_name("other", "c"), "elsewhere"), ("raytwin-shard-0", "svc"), ("raytwin-connector:x:y", "svc")]
    monkeypatch.setattr("connectors.manager.ray.util.list_named_actors",
                        lambda all_namespaces: [{"name": n, "namespace": ns} for n, ns in actors])
    assert connector_tenants("svc") == {"a:b", "e"}


def test_the_connector_listing_shows_the_readings_the_twins_refused_beside_its_dead_letters(monkeypatch) -> None:
    """`raytwin connectors list` showed `dead_lettered` alone, the readings the mapping could not read: a typo'd
    topic's readings, refused by the twins and listed among the connector's dead letters, were not on the line."""
    import contextlib

    from typer.testing import CliRunner

    from connectors import cli

    status = ConnectorStatus(tenant="acme", name="plant", kind="mqtt", state=ConnectorState.running, connected=True,
                             messages=4, acknowledged=4, pending=0, accepted=1, duplicates=1, rejected=1,
                             dead_lettered=1, errors=0, last_error=None, lag_s=None, newest_event_time=None)

    @contextlib.contextmanager
    def remote(url: str, key: str):
        yield SimpleNamespace(iter_connectors=lambda: iter([status]))

    monkeypatch.setattr(cli, "remote", remote)
    listed = CliRunner().invoke(cli.connectors_app, ["list", "--api-url", "http://api", "--api-key", "rtk_x"])
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.rstrip("\n").split("\t")[-3:] == ["errors=0", "rejected=1", "dead_lettered=1"]


def test_one_connector_holds_each_broker_session(tmp_path: Path) -> None:
    store = ConnectorStore(str(tmp_path))
    # the client ids of earlier versions, chosen to resume their sessions, are the same string
    first, second = _mqtt("a-b", "c", client_id="raytwin-a-b-c"), _mqtt("a", "b-c", client_id="raytwin-a-b-c")
    assert first.session_key() == second.session_key() == "MQTT client id 'raytwin-a-b-c'"
    store.claim(first.session_key(), "a-b", "c")
    store.claim(first.session_key(), "a-b", "c")  # re-declaring the same connector keeps its session
    # whose connector holds it is not said: one answer for another tenant's (which it must not reveal) and one's own
    taken = ("^MQTT client id 'raytwin-a-b-c' is in use by another connector: .* choose another broker.client_id, or "
             "leave it out to get RayTwin's own")
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


def test_of_connectors_racing_for_one_client_id_one_wins(tmp_path: Path) -> None:
    """Two tenants declaring one client id at once must not both pass the check (each would kick the other off)."""
    from concurrent.futures import ThreadPoolExecutor

    key = _mqtt("t0", "line", client_id="gw-1").session_key()

    def claim(i: int) -> bool:
        try:
            ConnectorStore(str(tmp_path)).claim(key, f"t{i}", "line")  # a backend replica each
        except SessionTaken:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(claim, range(16))) == [False] * 15 + [True]


class Unstarted(Connectors):
    """`Connectors` over a real store without Ray: which actors it starts (`started`) and stops (`stopped`), and
    which run (`alive`, which replicas over one store share); every actor answers a paused status."""

    def __init__(self, root: Path, alive: set[tuple[str, str]] | None = None):
        super().__init__(SimpleNamespace(store_url=str(root), storage_options=None))
        self.started: list[tuple[str, str]] = []
        self.stopped: list[tuple[str, str]] = []
        self.alive = set() if alive is None else alive

    def _actor(self, tenant: str, name: str) -> Any:
        if (tenant, name) not in self.alive:
            self.started.append((tenant, name))
            self.alive.add((tenant, name))
        status = ConnectorStatus(tenant=tenant, name=name, kind="mqtt", state=ConnectorState.paused, connected=False,
                                 messages=0, acknowledged=0, pending=0, accepted=0, duplicates=0, rejected=0,
                                 dead_lettered=0, errors=0, last_error=None, lag_s=None, newest_event_time=None)
        answer = SimpleNamespace(remote=lambda *args: status)
        return SimpleNamespace(status=answer, pause=answer, resume=answer, approve=answer)

    def _kill(self, tenant: str, name: str) -> None:
        self.stopped.append((tenant, name))
        self.alive.discard((tenant, name))

    def _running(self, tenant: str, name: str) -> bool:
        return (tenant, name) in self.alive

    def _outdated(self, tenant: str, name: str) -> bool:
        return False

    def _check_started(self, started: dict) -> None:
        """Every actor starts."""


@pytest.fixture
def unstarted(tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch) -> Unstarted:
    monkeypatch.setattr("connectors.manager.ray.get", lambda answer, timeout=None: answer)  # `Unstarted`'s answers
    return Unstarted(tmp_path / "store")


def test_a_client_id_another_connector_holds_is_refused_whoever_holds_it(tmp_path: Path,
                                                                         unstarted: Unstarted) -> None:
    """Tenant globex declaring the MQTT client id of acme's connector, on its broker (or another name or port of it:
    RayTwin cannot tell them apart), would kick it off the broker at each connection and take its session: a 409
    `client_id_in_use` that says how to fix it and not whose id it is, audited as refused; acme's record stays."""
    from serve_apps.connector_ops import ConnectorOps
    from tests.fixtures_serve import in_process

    ops = ConnectorOps.__new__(ConnectorOps)  # without connectors to start
    ops.reach, ops.operators, ops.connectors = Reach(["broker.example.com", "10.0.0.7"]), set(), unstarted
    ops.audit, ops._supervising = None, threading.Lock()
    backend = SimpleNamespace(connector=lambda op, *args: getattr(ops, op)(*args))
    with in_process(backend, tmp_path) as (http, auth, svc):
        acme, globex = auth["admin"], auth["other"]
        created = http.post("/v1/connectors", json={"spec": _declaration("plant", "gw-1")}, headers=acme)
        assert created.status_code == 201, created.text
        refused = [http.post("/v1/connectors", json={"spec": declaration}, headers=headers)
                   for declaration, headers in ((_declaration("line", "gw-1"), globex),
                                                (_declaration("line", "gw-1", "10.0.0.7", 8883), globex),
                                                (_declaration("plant-2", "gw-1"), acme))]
        assert [r.status_code for r in refused] == [409] * 3, [r.text for r in refused]
        errors = [r.json()["error"] for r in refused]
        assert {e["code"] for e in errors} == {"client_id_in_use"}
        assert len({e["message"] for e in errors}) == 1  # another tenant's holder reads as one's own
        message = errors[0]["message"]
        assert message.startswith("MQTT client id 'gw-1' is in use by another connector")
        assert "choose another broker.client_id, or leave it out to get RayTwin's own" in message
        assert "acme" not in message and "plant" not in message
        kept = _declaration("plant", "gw-1") | {"batch_size": 10}  # its own update, keeping its id
        assert http.post("/v1/connectors", json={"spec": kept}, headers=acme).status_code == 201
        assert http.post("/v1/connectors", json={"spec": _declaration("line", None)}, headers=globex).status_code == 201
        spec = http.get("/v1/connectors/plant", headers=acme).json()["spec"]
        assert (spec["broker"]["client_id"], spec["batch_size"]) == ("gw-1", 10)
        assert http.get("/v1/connectors/line", headers=globex).json()["spec"]["broker"]["client_id"] is None
        audited = [r.details for r in svc.audit.records("globex")
                   if r.action == "connector.create" and r.phase != "intent"]
        assert [(d["status"], d.get("http_status"), d.get("code")) for d in audited] == [
            ("refused", 409, "client_id_in_use")] * 2 + [("done", None, None)]


def test_of_connectors_stored_before_client_ids_were_claimed_the_earliest_declared_keeps_its_id(
        tmp_path: Path, unstarted: Unstarted, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two declarations of an earlier version sharing a client id: the one declared first runs; the later is down
    and never started (not by a status, a resume or an approval), and deleting it leaves the session alone."""
    from connectors.manager import ConnectorDown
    from connectors.mqtt import MqttKind

    store, earlier = unstarted.store, _mqtt("globex", "line", "gw-1")
    later = _mqtt("acme", "a-line", "gw-1")  # first by name, as a squatter could choose
    for age, spec in ((2000, earlier), (1000, later)):
        store.save(spec, Credentials())
        when = datetime.now(UTC).timestamp() - age
        os.utime(tmp_path / f"store/connectors/declared/tenant={spec.tenant}/{spec.name}/spec.json", (when, when))
    assert unstarted.start_declared() == 1 and unstarted.started == [("globex", "line")]
    assert ("acme", "a-line") in unstarted.stopped  # one running from before the upgrade, too
    down = unstarted.status("acme", "a-line")
    assert down.state == ConnectorState.down
    assert "MQTT client id 'gw-1' is in use by another connector" in down.last_error
    with pytest.raises(ConnectorDown, match="in use by another connector, declared earlier: this one starts by itself "
                                            "once that one lets the id go"):
        unstarted.resume("acme", "a-line")
    command = unstarted.ledger.propose("acme", "a-line", "pump-1", "setpoint", {"q": 1.0}, "k-writer")
    with pytest.raises(ConnectorDown):
        unstarted.approve("acme", command.id, "k-approver")
    assert unstarted.started == [("globex", "line")]
    ended = []
    monkeypatch.setattr(MqttKind, "end_session", lambda self, spec, *args: ended.append(spec.name) or True)
    unstarted.delete("acme", "a-line")
    assert ended == [] and store.names("acme") == []  # the session is globex's: not ended
    store.claim(earlier.session_key(), "globex", "line")  # still its holder's


def _declared_in_order(store: ConnectorStore, root: Path, *specs: MqttSpec) -> None:
    """Store `specs` as an earlier version did (no client id claimed), declared in that order."""
    for age, spec in zip(range(len(specs) * 1000, 0, -1000), specs):
        store.save(spec, Credentials())
        when = datetime.now(UTC).timestamp() - age
        os.utime(root / f"connectors/declared/tenant={spec.tenant}/{spec.name}/spec.json", (when, when))


def test_a_connector_waiting_for_its_client_id_starts_once_its_holder_lets_it_go(
        tmp_path: Path, unstarted: Unstarted, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connector down because an earlier-declared one held its client id stayed down after that one was deleted,
    until its tenant declared it again. Now it starts then, audited in its tenant's log as the system's start (which
    says nothing of the other tenant); the id passes to it directly, so a declaration racing in finds it taken; a
    second replica only sees it running, and a restarted backend starts it if the replica that passed it on died."""
    from connectors.mqtt import MqttKind
    from serve_apps.audit import AuditLog
    from serve_apps.connector_ops import ConnectorOps
    from tests.fixtures_connectors import wait_for

    monkeypatch.setattr(MqttKind, "end_session", lambda self, *args: True)
    store, holder, waiter = unstarted.store, _mqtt("globex", "line", "gw-1"), _mqtt("acme", "a-line", "gw-1")
    _declared_in_order(store, tmp_path / "store", holder, waiter)
    replica = Unstarted(tmp_path / "store", unstarted.alive)  # another backend replica over the same store
    assert unstarted.start_declared() == replica.start_declared() == 1 and unstarted.alive == {("globex", "line")}
    ops = ConnectorOps.__new__(ConnectorOps)  # without connectors to start
    ops.reach, ops.operators, ops.connectors = Reach(None), set(), unstarted
    ops.audit, ops._supervising = AuditLog(str(tmp_path / "audit")), threading.Lock()
    audit = ops.audit
    assert ops.supervise() == [] and unstarted.status("acme", "a-line").state == ConnectorState.down
    assert "starts by itself once" in (why := unstarted.status("acme", "a-line").last_error) and "globex" not in why

    ops.delete("globex", "line")  # (its answer does not wait for the start: it would tell a waiting one was there)
    wait_for(lambda: any(r.phase == "outcome" for r in audit.records("acme")),  # (the start's, written last)
             "the waiting connector's start, on the deletion's supervise thread, audited")
    assert unstarted.started[-1] == ("acme", "a-line") and unstarted.status("acme", "a-line").state != "down"
    with pytest.raises(SessionTaken):  # passed on, never free: a declaration racing in does not get it
        store.claim(waiter.session_key(), "initech", "line")
    (intent, outcome), = [(r, o) for r in audit.records("acme") for o in audit.records("acme")
                          if r.phase == "intent" and o.phase == "outcome" and o.action_id == r.action_id]
    assert (intent.action, intent.target, intent.key_id, outcome.details["status"], outcome.details["state"]) == (
        "connector.start", "a-line", "system", "done", "paused")
    assert "globex" not in outcome.json_line()
    assert audit.records("globex") == []  # (its deletion is audited by the route that deleted it)

    assert replica.status("acme", "a-line").state == ConnectorState.down  # until its next pass, which starts nothing
    assert replica.start_waiting() == [] and replica.status("acme", "a-line").state != "down"
    assert unstarted.started.count(("acme", "a-line")) == 1

    unstarted.alive.clear()  # every replica died after the id was passed on: a new backend starts the connector
    assert Unstarted(tmp_path / "store").start_declared() == 1


def test_a_deleted_connectors_commands_are_settled_and_audited_as_the_systems(
        tmp_path: Path, unstarted: Unstarted, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deleted connector left its commands open for good: a proposed one stayed proposed, approving it answered a
    bare 404 `no connector 'plant2'` (no word of refusing it instead), and a sent one never expired. The delete
    settles them, each audited in the tenant's log as the system's `command.settle` (intent, then outcome); one left proposed (by an older
    version's delete) answers its approval with a 404 saying to refuse it, and its refusal needs no connector."""
    from connectors.mqtt import MqttKind
    from serve_apps.audit import AuditLog
    from serve_apps.connector_ops import ConnectorOps
    from serve_apps.errors import NotFound

    monkeypatch.setattr(MqttKind, "end_session", lambda self, *args: True)
    unstarted.store.save(_mqtt("acme", "plant2", "gw-2"), Credentials())
    ledger = unstarted.ledger
    proposed, sent = (ledger.propose("acme", "plant2", "pump-1", "setpoint", {"x": x}, by="k1") for x in (1, 2))
    ledger.approve("acme", sent.id, "k2")
    ledger.sent(ledger.claim("acme", sent.id, "plant2"), 300.0)
    ops = ConnectorOps.__new__(ConnectorOps)  # without connectors to start
    ops.reach, ops.operators, ops.connectors = Reach(None), set(), unstarted
    ops.audit, ops._supervising = AuditLog(str(tmp_path / "audit")), threading.Lock()

    ops.delete("acme", "plant2")
    assert (ledger.get("acme", proposed.id).status, ledger.get("acme", sent.id).status) == ("refused", "expired")
    assert sorted((r.phase, r.target, r.key_id, r.role, r.details["settled_as"], r.details.get("status"),
                   "connector 'plant2' was deleted" in r.details["reason"])
                  for r in ops.audit.records("acme") if r.action == "command.settle") == sorted([
        (phase, command.id, "system", "system", settled_as, status, True)
        for command, settled_as in ((proposed, "refused"), (sent, "expired"))
        for phase, status in (("intent", None), ("outcome", "done"))])

    left = ledger.propose("acme", "plant2", "pump-1", "setpoint", {"x": 3}, by="k1")
    with pytest.raises(NotFound, match=f"no connector 'plant2' for tenant 'acme': command {left.id} cannot be sent "
                                       r"through it; refuse the command \(a refusal needs no connector\), or "
                                       "declare the connector again and approve it"):
        ops.approve("acme", left.id, "k2")
    with pytest.raises(NotFound, match="no connector 'plant2' for tenant 'acme'"):  # a second delete settles nothing
        ops.delete("acme", "plant2")
    assert ledger.get("acme", left.id).status == "proposed"
    assert ops.refuse("acme", left.id, "k2", "its connector is gone")["status"] == "refused"


def test_no_call_starts_a_connectors_actor_while_its_delete_settles_its_commands(
        unstarted: Unstarted, monkeypatch: pytest.MonkeyPatch) -> None:
    """An approval during a connector's delete (its approver's retry, its actor killed) started the actor again and
    sent the command the delete's settling had read proposed: the settling's "not sent" could land over it; and a
    proposal after the settling's read stayed proposed. While the delete runs, neither is taken (each answers as once
    it is deleted); a delete cut short (the store failing) leaves the connector startable, as declared."""
    from connectors.mqtt import MqttKind
    from connectors.spec import UnknownConnector

    monkeypatch.setattr(MqttKind, "end_session", lambda self, *args: True)
    monkeypatch.setattr(MqttKind, "command_problem", lambda self, *args: None)  # (its routes take any command)
    unstarted.store.save(_mqtt("acme", "plant2", "gw-2"), Credentials())
    command = unstarted.ledger.propose("acme", "plant2", "pump-1", "setpoint", {"x": 1}, by="k1")
    settle = unstarted.ledger.settle_deleted

    def approved_meanwhile(*args: Any) -> Any:
        with pytest.raises(UnknownConnector, match=f"no connector 'plant2' for tenant 'acme': command {command.id} "
                                                   "cannot be sent through it; refuse the command"):
            unstarted.approve("acme", command.id, "k2")
        with pytest.raises(UnknownConnector, match="no connector 'plant2' for tenant 'acme': it is being deleted"):
            unstarted.propose("acme", "plant2", "pump-1", "setpoint", {"x": 2}, by="k1")
        raise OSError("store unavailable")

    monkeypatch.setattr(unstarted.ledger, "settle_deleted", approved_meanwhile)
    with pytest.raises(OSError, match="store unavailable"):
        unstarted.delete("acme", "plant2")
    assert unstarted.started == []
    assert unstarted.status("acme", "plant2").state is ConnectorState.paused  # cut short: declared, started again
    assert unstarted.started == [("acme", "plant2")]
    monkeypatch.setattr(unstarted.ledger, "settle_deleted", settle)
    unstarted.delete("acme", "plant2")
    assert unstarted.ledger.get("acme", command.id).status == "refused"


@pytest.mark.parametrize("change", ["deleted", "declared again"])
def test_a_supervision_pass_due_while_a_waiting_connector_changes_starts_what_is_declared_after(
        tmp_path: Path, unstarted: Unstarted, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    """A pass (the store watch's, every few seconds) reads a waiting connector's declaration, then starts its actor,
    which reads the declaration itself. Run between a route's stop of that connector and its store write, it started
    the deleted connector's actor after the delete stopped it (detached, for good), or the declaration being replaced
    (a create answers with the actor that runs: the old client id's). The routes' changes run under the pass's lock:
    the pass runs after them, on what they declared."""
    from connectors.mqtt import MqttKind
    from serve_apps.connector_ops import ConnectorOps

    monkeypatch.setattr(MqttKind, "end_session", lambda self, *args: True)
    store, holder, waiter = unstarted.store, _mqtt("globex", "line", "gw-1"), _mqtt("acme", "a-line", "gw-1")
    _declared_in_order(store, tmp_path / "store", holder, waiter)
    assert unstarted.start_declared() == 1
    ops = ConnectorOps.__new__(ConnectorOps)  # without connectors to start
    ops.reach, ops.operators, ops.connectors = Reach(None), set(), unstarted
    ops.audit, ops._supervising = None, threading.Lock()
    monkeypatch.setattr(ops, "_supervised", lambda: None)  # the passes run here, in the order the test sets
    ops.delete("globex", "line")  # its id passed on: a-line is due to start at the next pass
    kill, actor, started_as = unstarted._kill, unstarted._actor, []

    def stop_then_pass_if_due(tenant: str, name: str) -> None:  # the route's stop, then the pass at that moment
        kill(tenant, name)
        if ops._supervising.acquire(blocking=False):  # (a pass waits while the lock is held)
            ops._supervising.release()
            ops.supervise()

    def start(tenant: str, name: str) -> Any:  # an actor reads the declaration as it starts
        if (tenant, name) not in unstarted.alive:
            started_as.append(unstarted._declared(tenant, name))
        return actor(tenant, name)

    monkeypatch.setattr(unstarted, "_kill", stop_then_pass_if_due)
    monkeypatch.setattr(unstarted, "_actor", start)
    if change == "deleted":
        ops.delete("acme", "a-line")
    else:
        ops.create("acme", _declaration("a-line", "gw-2"), None)
    ops.supervise()  # the pass that waited
    if change == "deleted":
        assert ("acme", "a-line") not in unstarted.alive and started_as == []
    else:
        assert [s.broker.client_id for s in started_as] == ["gw-2"]


@pytest.mark.parametrize("starter", ["a supervision pass", "a status read"])
def test_a_connector_whose_actor_started_right_before_its_delete_dies_starting_leaves_nothing_behind(
        tmp_path: Path, unstarted: Unstarted, monkeypatch: pytest.MonkeyPatch, starter: str) -> None:
    """An actor started right before its connector's delete dies in its constructor (which reads the declaration).
    A status read (not under the supervision pass's lock) started it after the delete had stopped the old one and
    cleared the connector's down state: its death marked the deleted connector down, its "not started" gauge set, for
    good. (A pass's start runs wholly before a delete, under the lock: the delete clears its death.)"""
    import ray

    from connectors.mqtt import MqttKind
    from connectors.spec import UnknownConnector
    from raytwin import metrics
    from serve_apps.connector_ops import ConnectorOps

    exported: dict[str, str | None] = {}
    monkeypatch.setattr(metrics, "set_not_started", lambda connector, reason: exported.update({connector: reason}))
    monkeypatch.setattr(MqttKind, "end_session", lambda self, *args: True)
    _declared_in_order(unstarted.store, tmp_path / "store", _mqtt("globex", "line", "gw-1"),
                       _mqtt("acme", "a-line", "gw-1"))
    assert unstarted.start_declared() == 1  # a-line waits for gw-1
    ops = ConnectorOps.__new__(ConnectorOps)  # without connectors to start
    ops.reach, ops.operators, ops.connectors = Reach(None), set(), unstarted
    ops.audit, ops._supervising = None, threading.Lock()
    monkeypatch.setattr(ops, "_supervised", lambda: None)  # the passes run here, in the order the test sets

    def dies_starting(tenant: str, name: str) -> Any:
        def dies(*args: Any) -> Any:
            if starter == "a status read":
                ops.delete(tenant, name)  # once the read started the actor, before its constructor read the declaration
            raise ray.exceptions.ActorDiedError()

        dying = SimpleNamespace(remote=dies)
        return SimpleNamespace(status=dying, pause=dying, resume=dying)

    if starter == "a supervision pass":
        (tenant, name), started = ("acme", "a-line"), unstarted.started[:]
        ops.delete("globex", "line")  # gw-1 passed on: a-line is due at the next pass
        monkeypatch.setattr(unstarted, "_actor", dies_starting)
        assert ops.supervise() == [] and exported == {"acme/a-line": "failed"}  # (its start was tried)
        ops.delete(tenant, name)
    else:
        (tenant, name) = ("globex", "line")
        unstarted._kill(tenant, name)  # (not running: the read starts it)
        monkeypatch.setattr(unstarted, "_actor", dies_starting)
        with pytest.raises(UnknownConnector):
            unstarted.status(tenant, name)
    assert (tenant, name) not in unstarted._down and exported.get(f"{tenant}/{name}") is None
    assert name not in unstarted.names(tenant)


def test_of_connectors_waiting_for_one_client_id_the_earliest_declared_gets_it_and_only_once_the_session_ended(
        tmp_path: Path, unstarted: Unstarted, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Of two connectors waiting for one id, the earlier declared gets it (not the first by name), the other once
    that one lets it go too. A holder declared again with another client id lets its old one go once its session
    (and what the broker queued for it) is ended; one that cannot be ended (the broker unreachable) stays claimed.
    A pass finding the id still held logs no refusal (it runs every 5 s)."""
    from connectors.mqtt import MqttKind

    ended: list[tuple[str, str | None]] = []
    reachable = [True]
    monkeypatch.setattr(MqttKind, "end_session", lambda self, spec, *args: ended.append(
        (spec.name, spec.client_id)) or reachable[0])
    holder, first, second = _mqtt("globex", "line", "gw-1"), _mqtt("acme", "b", "gw-1"), _mqtt("acme", "a", "gw-1")
    _declared_in_order(unstarted.store, tmp_path / "store", holder, first, second)
    assert unstarted.start_declared() == 1

    reachable[0] = False
    unstarted.create(_mqtt("globex", "line", "gw-2"))  # its old session cannot be ended: the id stays claimed
    caplog.clear()
    caplog.set_level(logging.INFO, logger="raytwin.connectors")
    assert ended == [("line", "gw-1")] and unstarted.start_waiting() == []
    assert not [r for r in caplog.records if "session_taken" in r.getMessage()]
    reachable[0] = True
    unstarted.create(_mqtt("globex", "line", "gw-1"))  # declared again with the old id, which its name still holds
    unstarted.create(_mqtt("globex", "line", "gw-3"))
    assert ended[-1] == ("line", "gw-1") and unstarted.start_waiting() == [("acme", "b")]
    assert unstarted.status("acme", "a").last_error.startswith("cannot start: MQTT client id 'gw-1' is in use")
    unstarted.delete("acme", "b")
    assert unstarted.start_waiting() == [("acme", "a")] and unstarted.status("acme", "a").state != "down"


def test_a_stored_declaration_reading_its_own_commands_back_is_down_until_declared_again_fixed(
        tmp_path: Path, unstarted: Unstarted, monkeypatch: pytest.MonkeyPatch) -> None:
    """An `ack_topic` (or a route) matching a command topic is refused for a new declaration; one stored before that
    was started at every start of the service, taking each command it sent for its asset's answer. Now it is down,
    saying what to fix, exported as refused and started by no read or resume, until it is declared again fixed."""
    from connectors.manager import ConnectorDown
    from raytwin import metrics

    exported: dict[str, str | None] = {}
    monkeypatch.setattr(metrics, "set_not_started", lambda connector, reason: exported.update({connector: reason}))
    declaration = _declaration("plant", "gw-1")
    declaration["routes"][0]["command_topic"] = "plant/{asset_id}/cmd"
    echoing = MqttSpec(tenant="acme", **declaration, ack_topic="plant/#")
    _declared_in_order(unstarted.store, tmp_path / "store", echoing, _mqtt("acme", "line"))
    assert unstarted.start_declared() == 1 and unstarted.started == [("acme", "line")]
    down = unstarted.status("acme", "plant")
    assert down.state == ConnectorState.down and exported == {"acme/plant": "refused"}
    assert down.last_error == (
        "cannot start: ack_topic 'plant/#' matches command_topic 'plant/{asset_id}/cmd': the connector would take "
        "every command it sends for the asset's answer, acknowledged before the asset answers; give answers their own "
        "topic, e.g. plant/{asset_id}/ack (refused since this connector was declared); declare it again so fixed, "
        "keeping its broker.client_id (the broker keeps its session and what is published meanwhile, within the "
        "session's expiry), or delete it")
    with pytest.raises(ConnectorDown, match="ack_topic 'plant/#' matches command_topic"):
        unstarted.resume("acme", "plant")
    assert unstarted.started == [("acme", "line")]
    fixed = echoing.model_copy(update={"ack_topic": "plant/{asset_id}/ack"})
    assert unstarted.create(fixed).state == ConnectorState.paused  # its client id: claimed by no other connector
    assert unstarted.started[-1] == ("acme", "plant") and exported == {"acme/plant": None}
    assert unstarted.status("acme", "plant").state != ConnectorState.down


def test_a_fenced_service_starts_no_connector_for_a_read(tmp_path: Path, unstarted: Unstarted,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads are answered on a fenced service without `check_writable`, and a status read started a connector whose
    actor was gone: one the store watch had stopped ran again, writing to the store and connecting to the broker
    beside the successor's. Now, once the watch finds the store taken over, a read of a connector not running
    answers `down` naming the store's new holder, starts nothing, and nothing else does; one running answers as
    before."""
    from dataclasses import replace

    from connectors.manager import ConnectorDown
    from raytwin import metrics
    from raytwin.statestore import Lease
    from serve_apps import backend as backend_module
    from serve_apps.backend import Backend
    from serve_apps.connector_ops import ConnectorOps

    monkeypatch.setattr(metrics, "STORE_FENCED", SimpleNamespace(set=lambda value: None))
    monkeypatch.setattr(backend_module, "ray_cluster", lambda: "this")
    monkeypatch.setattr(backend_module, "stop_connector_actors", lambda namespace: unstarted.alive.clear() or 2)
    _declared_in_order(unstarted.store, tmp_path / "store", _mqtt("acme", "plant"), _mqtt("acme", "line"))
    assert unstarted.start_declared() == 2
    ops = ConnectorOps.__new__(ConnectorOps)  # without connectors to start
    ops.reach, ops.operators, ops.connectors = Reach(None), set(), unstarted
    backend = Backend.__new__(Backend)
    mine = Lease(owner="svc-a", epoch=1, shards=2, namespace="ns", acquired_at="2026-12-05T14:00:00+00:00",
                 acquired_by="host-a:1", cluster="this")
    backend.config, backend.twins, backend.connector_ops = SimpleNamespace(namespace="ns"), SimpleNamespace(
        lease=mine), ops
    assert backend._watch_fence(mine, False) is False  # still its store's holder: nothing held
    unstarted.alive.discard(("acme", "line"))  # its actor gone: a read starts it again, as before
    assert Backend.connector(backend, "view", "acme", "line")["status"]["state"] == "paused"
    assert unstarted.started[-1] == ("acme", "line")

    successor = replace(mine, owner="svc-b", epoch=2, cluster="other")
    assert backend._watch_fence(successor, False) is True and unstarted.alive == set()  # stopped
    started = list(unstarted.started)
    for answer in (Backend.connector(backend, "view", "acme", "plant")["status"],
                   *Backend.connector(backend, "list_all", "acme", 100, None)["connectors"]):
        assert answer["state"] == "down" and answer["connected"] is False, answer
        assert "no longer holds its store" in answer["last_error"] and "service svc-b (epoch 2)" in answer["last_error"]
    with pytest.raises(ConnectorDown):
        unstarted.resume("acme", "plant")
    assert unstarted.start_waiting() == [] and unstarted.started == started  # none started again
    unstarted.alive.add(("acme", "plant"))  # one running (a successor in this cluster shares it): answered as before
    assert Backend.connector(backend, "view", "acme", "plant")["status"]["state"] == "paused"
    assert unstarted.started == started


def test_a_write_check_that_finds_the_store_taken_starts_no_connector_before_the_watch(
        tmp_path: Path, unstarted: Unstarted) -> None:
    """The store watch held the connectors up to one watch interval (5 s) after a takeover, while `check_writable`
    (a write, the shadow conclusions every 2 s) already knew: a status read meanwhile started a connector beside the
    successor's. Now the write check's lease read holds them as well, and only a read that shows the store taken:
    one that failed or found no lease (maybe a miss) holds nothing. Held again, the first reason stands."""
    from dataclasses import replace

    from connectors.manager import ConnectorDown
    from raytwin.statestore import Lease, StoreFenced
    from serve_apps.backend import Backend
    from serve_apps.connector_ops import ConnectorOps
    from serve_apps.store_errors import StoreUnavailable, unavailable

    _declared_in_order(unstarted.store, tmp_path / "store", _mqtt("acme", "plant"))
    ops = ConnectorOps.__new__(ConnectorOps)  # without connectors to start
    ops.reach, ops.operators, ops.connectors = Reach(None), set(), unstarted
    mine = Lease(owner="svc-a", epoch=1, shards=2, namespace="ns", acquired_at="2026-12-05T14:00:00+00:00",
                 acquired_by="host-a:1", cluster="this")
    reads: list[Any] = [unavailable("a read of the store's lease did not answer within 5 s", "timeout"), None,
                        replace(mine, owner="svc-b", epoch=2), replace(mine, owner="svc-c", epoch=3)]

    def read_lease(timeout_s: float) -> Lease | None:
        if isinstance(read := reads.pop(0), Exception):
            raise read
        return read

    backend = Backend.__new__(Backend)
    backend.twins, backend.connector_ops, backend._lease_reads = SimpleNamespace(lease=mine), ops, read_lease
    backend._fence, backend._fence_checked = None, -math.inf
    with pytest.raises(StoreUnavailable):  # a store that failed to answer: not proof of a fence
        backend.check_writable()
    with pytest.raises(StoreFenced):  # no lease found: refused, and maybe a read that missed it
        backend.check_writable()
    assert Backend.connector(backend, "view", "acme", "plant")["status"]["state"] == "paused"  # started, as before
    unstarted.alive.clear()  # (its actor gone)
    for _ in range(2):  # svc-b took the store over; then svc-c
        backend._fence_checked = -math.inf
        with pytest.raises(StoreFenced):
            backend.check_writable()
    started = list(unstarted.started)
    answer = Backend.connector(backend, "view", "acme", "plant")["status"]
    assert answer["state"] == "down" and "service svc-b (epoch 2)" in answer["last_error"], answer
    with pytest.raises(ConnectorDown):
        unstarted.resume("acme", "plant")
    assert unstarted.started == started and reads == []
    with unstarted._starts:  # a start in flight: a fence check that finds the connectors held already never waits
        again = threading.Thread(target=ops.hold, args=("again",), daemon=True)
        again.start()
        again.join(5)
        assert not again.is_alive()


def test_a_takeover_after_the_lease_was_taken_starts_no_declared_connector_after_it(
        tmp_path: Path, unstarted: Unstarted) -> None:
    """The backend started every declared connector with no fence check, seconds after its twins took the store's
    lease: a takeover in between started them all beside the successor's until the store watch's first pass. Now the
    lease is read right before each start: from the read that finds another holder on, none is started, and none is
    stopped (in one Ray cluster the successor shares them by name); a read that finds no lease holds nothing. (It is
    read before each connector is stopped or left running, then before each is started.)"""
    from dataclasses import replace

    from connectors.manager import ConnectorDown
    from raytwin.statestore import Lease
    from serve_apps.backend import Backend

    _declared_in_order(unstarted.store, tmp_path / "store", _mqtt("acme", "plant"), _mqtt("acme", "line"),
                       _mqtt("acme", "press"), _mqtt("acme", "mill"))
    unstarted.alive.add(("acme", "mill"))  # one running from before: left alone
    mine = Lease(owner="svc-a", epoch=1, shards=2, namespace="ns", acquired_at="2026-12-07T03:00:00+00:00",
                 acquired_by="host-a:1", cluster="this")
    successor = replace(mine, owner="svc-b", epoch=2, cluster="other")
    reads: list[Lease | None] = [None, mine, mine, mine, mine, mine, successor]  # the stop pass's 4, then each start
    backend = Backend.__new__(Backend)
    backend.twins, backend._lease_reads = SimpleNamespace(lease=mine), lambda timeout_s: reads.pop(0)
    assert unstarted.start_declared(fence=backend._connector_fence) == 2 and reads == []
    assert unstarted.started == [("acme", "plant"), ("acme", "line")] and unstarted.stopped == []
    down = unstarted.status("acme", "press")
    assert down.state == ConnectorState.down and "service svc-b (epoch 2)" in down.last_error
    assert unstarted.status("acme", "mill").state == ConnectorState.paused  # running: answers as before
    with pytest.raises(ConnectorDown, match="no longer holds its store"):
        unstarted.resume("acme", "press")
    assert unstarted.start_declared(fence=lambda: None) == 0 and unstarted.started == [("acme", "plant"),
                                                                                         ("acme", "line")]


def test_an_older_versions_connector_actor_is_restarted_and_every_one_is_stopped_before_any_starts(
        tmp_path: Path, unstarted: Unstarted, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connector actors are detached: across an in-place upgrade of the Serve application an older version's went on
    running (only one without `reach` was restarted), writing command records and dead letters without the index
    markers that the new version's connectors, marking their tenant's indexes complete as they start, made the only
    way to find them. Now an actor whose `markers` differ from this version's (or that has none) is restarted, and
    every actor to restart is stopped before the first one starts."""
    from connectors import manager
    from connectors.runtime import ACTOR_SEPARATOR, MARKERS

    def answers(**methods: Any) -> SimpleNamespace:
        return SimpleNamespace(**{m: SimpleNamespace(remote=lambda v=v: v) for m, v in methods.items()})

    handles = {"current": answers(markers=MARKERS, reach=None, files=None),
               "older": answers(reach=None, files=None),  # a version before the markers
               "newer": answers(markers=MARKERS + 1, reach=None, files=None)}
    monkeypatch.setattr(manager.ray, "get_actor",
                        lambda actor, namespace: handles[actor.rsplit(ACTOR_SEPARATOR, 1)[-1]])
    unstarted.router.namespace = "ns"
    assert [Connectors._outdated(unstarted, "acme", n) for n in handles] == [False, True, True]

    class Upgraded(Unstarted):
        """Every actor running from before is an older version's; what is stopped and started, in order."""

        def __init__(self, root: Path):
            super().__init__(root)
            self.order: list[tuple[str, str]] = []

        def _outdated(self, tenant: str, name: str) -> bool:
            return self._running(tenant, name)

        def _kill(self, tenant: str, name: str) -> None:
            self.order.append(("stop", name))
            super()._kill(tenant, name)

        def _actor(self, tenant: str, name: str) -> Any:
            self.order.append(("start", name))
            return super()._actor(tenant, name)

    _declared_in_order(unstarted.store, tmp_path / "store", _mqtt("acme", "plant"), _mqtt("acme", "line"),
                       _mqtt("acme", "press"))
    upgraded = Upgraded(tmp_path / "store")
    upgraded.alive.update({("acme", "line"), ("acme", "press")})
    assert upgraded.start_declared() == 3
    assert upgraded.order == [("stop", "line"), ("stop", "press"), ("start", "plant"), ("start", "line"),
                              ("start", "press")]


def test_a_connector_declared_again_after_its_sealing_key_was_rotated_out_is_taken(
        tmp_path: Path, unstarted: Unstarted, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its old credentials are read to end the session of the client id it gives up: a key rotated out must not
    refuse the declaration that brings new ones; that session, which cannot be ended, keeps its id claimed."""
    unstarted.create(_mqtt("acme", "line", "gw-1"), Credentials(password="old"))
    monkeypatch.setenv(KEY_ENV, new_key())  # the old key is gone
    restarted = Unstarted(tmp_path / "store")
    restarted.create(_mqtt("acme", "line", "gw-2"), Credentials(password="new"))
    assert restarted.store.credentials("acme", "line").password.get_secret_value() == "new"
    with pytest.raises(SessionTaken):
        restarted.store.claim(_mqtt("globex", "x", "gw-1").session_key(), "globex", "x")


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


def test_a_connectors_lag_counts_from_receipt_not_from_the_events_own_time() -> None:
    """`lag_s` was the server's clock minus the newest applied event's time: a replay of year-old history, taken at
    once, read ~336 days of lag. The lag counts how long the oldest message not yet durable has waited since the
    connector received it (0 once none waits); the events' age is told apart, as `event_age_s`."""
    import time
    from datetime import timedelta

    from connectors.pump import Pump
    from connectors.sink import Delivery, Inbound

    replayed = datetime.now(UTC) - timedelta(days=336)

    class Held:  # a delivery that waits to be let go, of a replayed reading
        release, delivering = threading.Event(), threading.Event()

        def deliver(self, batch: list[Inbound]) -> Delivery:
            self.delivering.set()
            assert self.release.wait(30)
            return Delivery(newest_event_time=replayed)

    sink = Held()
    pump = Pump(sink, "acme/replay", linger_s=0.0)
    try:
        assert (pump.lag_s(), pump.stats.event_age_s()) == (0.0, None)
        pump.put(Inbound("t", [], [], lambda: None, received=time.monotonic() - 5.0))  # received 5 s before
        assert sink.delivering.wait(10)
        assert pump.lag_s() >= 5.0  # still waiting to be durable
        sink.release.set()
        deadline = time.monotonic() + 30
        while pump.stats.acknowledged < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pump.lag_s() == 0.0  # nothing waits: no lag, however old its events
        assert pump.stats.event_age_s() >= timedelta(days=336).total_seconds()
    finally:
        sink.release.set()
        pump.stop()


def test_a_connector_that_cannot_start_still_marks_its_tenants_dead_letter_days(tmp_path: Path, key: str) -> None:
    """A tenant's dead letters written before markers are marked with their sources at a connector's start; one
    whose start failed before that (here a TLS file that is no longer its tenant's) left every connector page of
    the tenant reading every day of its dead letters, for as long as the connector stayed down."""
    from connectors.runtime import ConnectorRuntime
    from connectors.tenant_files import TenantFiles
    from raytwin.statestore import StateStore

    url = str(tmp_path / "store")
    old = StateStore(url)
    old.write_dead_letters("acme", [{"asset_id": "pump-1", "idempotency_key": "1", "raw": "{}",
                                     "reason": "mqtt://plant/plant/pump-1/telemetry: payload is not JSON"}])
    old.fs.rm(f"{old.root}/dead_letter_sources", recursive=True)  # as written before markers
    declared = _declaration("plant", None, "broker.example.com")
    ConnectorStore(url).save(MqttSpec(tenant="acme", **{**declared, "broker": {
        **declared["broker"], "tls": {"ca_file": "/etc/ssl/ca.pem"}}}), Credentials())  # a path: not the tenant's
    assert StateStore(url)._source_days("acme", "plant") is None  # not marked: a page reads every day
    with pytest.raises(ValueError, match="name a file of your tenant's TLS directory"):
        ConnectorRuntime(url, SimpleNamespace(store=lambda: StateStore(url)), "acme", "plant",
                         files=TenantFiles(str(tmp_path / "tls")))
    days = {p.rstrip("/").rsplit("=", 1)[-1] for p in old.fs.ls(f"{old.root}/dead_letters/tenant=acme", detail=False)}
    assert StateStore(url)._source_days("acme", "plant") == days and len(days) == 1  # its day alone is read


def test_a_connectors_status_reads_an_error_half_written_by_another_thread_without_failing() -> None:
    """`status` runs beside the MQTT client's and the pump's threads, which set an error's message, then its time:
    read in between, a first error's message came without its time, and beside the other's error the status failed
    comparing None with a time. Such a half-written error is left out until its time is set."""
    from connectors.runtime import ConnectorRuntime

    now = datetime.now(UTC)
    runtime = SimpleNamespace(adapter=SimpleNamespace(last_error="disconnected from broker", last_error_at=None),
                              pump=SimpleNamespace(stats=SimpleNamespace(last_error="delivery failed", last_error_at=now)),
                              _ledger_error=None)  # (no answer of a command failed to be recorded)
    assert ConnectorRuntime._last_error(runtime) == {"last_error": "delivery failed", "last_error_at": now}


def test_a_connector_leaving_a_call_unanswered_is_503_saying_whether_it_is_slow_and_an_approval_outcome_unknown(
        unstarted: Unstarted, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connector's actor that answered nothing (stopped, hung) held the backend's thread on each call for good, and
    an approval's approver never heard whether the command went out. Past `ANSWER_S` a call is 503
    `connector_unavailable` saying whether the actor is slow (it still answers its status) or answers nothing; an
    approval's says its outcome is unknown and the command's status, and is not sent again by the call."""
    from ray.exceptions import GetTimeoutError

    from connectors.manager import ConnectorUnanswered
    from connectors.mqtt import MqttKind
    from serve_apps.connector_ops import ConnectorOps, ConnectorUnavailable

    monkeypatch.setattr(MqttKind, "command_problem", lambda self, *args: None)
    unstarted.store.save(_mqtt("acme", "plant2", "gw-2"), Credentials())
    command = unstarted.ledger.propose("acme", "plant2", "pump-1", "setpoint", {"x": 1}, by="k1")
    hung, status_hangs, approvals = object(), [], []

    def get(answer: Any, timeout: float | None = None) -> Any:
        if answer is hung:
            assert timeout is not None, "ray.get without a timeout on a hung connector waits forever"
            raise GetTimeoutError("Get timed out: some object(s) not ready")
        return answer

    started = unstarted._actor

    def actor(tenant: str, name: str) -> Any:
        late = SimpleNamespace(remote=lambda *args: approvals.append(args) or hung)
        return SimpleNamespace(status=late if status_hangs else started(tenant, name).status, pause=late,
                               approve=late)

    monkeypatch.setattr("connectors.manager.ray.get", get)
    monkeypatch.setattr("actors.failover.actor_restarting", lambda handle: False)
    monkeypatch.setattr(unstarted, "_actor", actor)
    ops = ConnectorOps.__new__(ConnectorOps)
    ops.connectors = unstarted
    with pytest.raises(ConnectorUnavailable, match="connector 'plant2' left its pause unanswered within 30 s; it is "
                                                   "slow: it still answers its status") as slow:
        ops.pause("acme", "plant2")
    assert (slow.value.status, slow.value.code, slow.value.headers) == (503, "connector_unavailable",
                                                                         {"Retry-After": "5"})
    status_hangs.append(True)
    with pytest.raises(ConnectorUnavailable, match="it is not answering at all: its process is stopped, hung or "
                                                   "unreachable"):
        ops.pause("acme", "plant2")
    approvals.clear()
    with pytest.raises(ConnectorUnanswered, match=f"outcome unknown: connector 'plant2' left the approval of command "
                                                  f"{command.id} unanswered within 30 s.*the command is proposed now"):
        unstarted.approve("acme", command.id, "k2")
    assert [a for a in approvals if a] == [("acme", command.id, "k2")]  # sent once, not again by the call
    assert unstarted.ledger.get("acme", command.id).status == "proposed"
