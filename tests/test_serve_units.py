"""Serve building blocks without Ray: keys, rate limits, config, catalog and audit log on S3, CLI."""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import threading
import time
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from client import RayTwinClient
from client.errors import NotFound as ClientNotFound
from raytwin.contracts import Asset, AssetType, Relationship
from raytwin.sim import THERMAL_RC, TWO_TANK
from serve_apps.audit import AuditLog, AuditRecord
from serve_apps.backend import FENCE_CHECK_S, Backend
from serve_apps.auth import (KeyRecord, KeyStore, KeysUnavailable, _write_keys, create_key, digest, key_audit_trail,
                              load_keys, revoke_key, set_key_owner)
from serve_apps.catalog import Catalog
from serve_apps.cli import autoscaling_args, keys_app, serve_app
from serve_apps.config import ServeConfig
from serve_apps.errors import Conflict, NotFound, Unprocessable
from serve_apps.limits import TokenBuckets
from tests.fixtures_serve import AuditWrites


def test_keys_are_stored_hashed_and_reloaded(tmp_path):
    path = tmp_path / "keys.json"
    record, key = create_key(path, "acme", "reader")
    store = KeyStore(path)
    assert store.authenticate(key).model_dump() == {"key_id": record.key_id, "tenant": "acme", "role": "reader",
                                                     "grants": (), "owner": None}
    assert store.authenticate(key).person == record.key_id and '"owner"' not in path.read_text()  # its own, as before
    assert store.authenticate(key + "x") is None and store.authenticate("") is None
    assert key not in path.read_text() and digest(key) in path.read_text()
    _, second = create_key(path, "globex", "reader")  # appended; the running store sees it without restart
    assert store.authenticate(second).tenant == "globex" and store.authenticate(key).tenant == "acme"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    _, approver = create_key(path, "acme", "writer", ("approver",), owner="bob")  # a grant: outside the role order
    assert store.authenticate(approver).grants == ("approver",) and store.authenticate(key).grants == ()
    _, alices = create_key(path, "acme", "admin", owner="alice")  # held by a person: who acts for four eyes
    assert store.authenticate(alices).person == "alice"


def test_a_revoked_key_is_refused_and_a_broken_keys_file_refuses_every_key(tmp_path):
    """Rotation without a restart; a hand edit that does not parse fails closed with a 503 saying so, not a
    500 per request, and never keeps a key the edit meant to revoke."""
    path = tmp_path / "keys.json"
    old, old_key = create_key(path, "acme", "writer", owner="alice")
    _, new_key = create_key(path, "acme", "writer", owner="alice")
    store = KeyStore(path)
    out = CliRunner().invoke(keys_app, ["revoke", old.key_id, "--keys-file", str(path)])
    assert out.exit_code == 0 and f"revoked {old.key_id} (acme writer)" in out.output
    assert store.authenticate(old_key) is None and store.authenticate(new_key).tenant == "acme"
    again = CliRunner().invoke(keys_app, ["revoke", old.key_id, "--keys-file", str(path)])
    assert again.exit_code == 2 and f"key {old.key_id} was revoked already" in again.output

    good = path.read_text()
    path.write_text(good[:-20])  # an editor's half-written save
    os.utime(path, (1, 1))  # a new modification time, whatever the clock's resolution
    with pytest.raises(KeysUnavailable, match="API keys file is missing or invalid") as refused:
        store.authenticate(new_key)
    assert (refused.value.status, refused.value.code) == (503, "unavailable")
    path.write_text(good)
    assert store.authenticate(new_key).tenant == "acme"

    path.rename(tmp_path / "moved.json")  # moved away (a Secret remounted): 503 as well, not a 500 per request
    with pytest.raises(KeysUnavailable, match="missing or invalid"):
        store.authenticate(new_key)
    (tmp_path / "moved.json").rename(path)  # back, with the modification time it had
    assert store.authenticate(new_key).tenant == "acme"


def test_cli_creates_keys_and_writes_the_committed_openapi(tmp_path):
    keys = tmp_path / "k.json"
    result = CliRunner().invoke(keys_app, ["create", "--tenant", "acme", "--role", "admin", "--owner", "ops",
                                           "--keys-file", str(keys)])
    assert result.exit_code == 0, result.output
    key = result.output.splitlines()[0]
    assert KeyStore(keys).authenticate(key).role == "admin"
    listed = CliRunner().invoke(keys_app, ["list", "--keys-file", str(keys)]).output
    assert "\tacme\tadmin" in listed and key not in listed and digest(key) not in listed
    bad = CliRunner().invoke(keys_app, ["create", "--tenant", "acme", "--role", "root", "--keys-file", str(keys)])
    assert bad.exit_code != 0
    granted = CliRunner().invoke(keys_app, ["create", "--tenant", "acme", "--role", "writer", "--grant", "approver",
                                            "--owner", "ops", "--keys-file", str(keys)])
    assert granted.exit_code == 0
    assert KeyStore(keys).authenticate(granted.output.splitlines()[0]).grants == ("approver",)
    unknown = CliRunner().invoke(keys_app, ["create", "--tenant", "acme", "--role", "writer", "--grant", "root",
                                            "--keys-file", str(keys)])
    assert unknown.exit_code != 0 and "unknown grant" in unknown.output
    owned = CliRunner().invoke(keys_app, ["create", "--tenant", "acme", "--role", "admin", "--owner", "alice",
                                          "--keys-file", str(keys)])
    assert owned.exit_code == 0 and KeyStore(keys).authenticate(owned.output.splitlines()[0]).person == "alice"
    nameless = CliRunner().invoke(keys_app, ["create", "--tenant", "acme", "--role", "admin", "--owner", "a b",
                                             "--keys-file", str(keys)])
    assert nameless.exit_code == 2 and "owner: String should match pattern" in nameless.output
    out = tmp_path / "openapi.json"
    assert CliRunner().invoke(serve_app, ["openapi", "--out", str(out)]).exit_code == 0
    committed = Path(__file__).parents[1] / "serve_apps" / "openapi.json"
    assert json.loads(out.read_text()) == json.loads(committed.read_text())
    assert CliRunner().invoke(serve_app, ["--port", "1"]).exit_code == 2  # no store/keys: a usage error


def test_openapi_cli_prints_the_document_in_any_directory_and_refuses_an_unwritable_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: no serve_apps/ here
    printed = CliRunner().invoke(serve_app, ["openapi"])
    assert printed.exit_code == 0, printed.output
    committed = Path(__file__).parents[1] / "serve_apps" / "openapi.json"
    assert json.loads(printed.stdout) == json.loads(committed.read_text()) and not list(tmp_path.iterdir())
    refused = CliRunner().invoke(serve_app, ["openapi", "--out", "no-such-dir/openapi.json"])
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.stderr == ("error: --out no-such-dir/openapi.json: No such file or directory; give a file in an "
                              "existing, writable directory\n")


def test_serve_env_prints_what_a_cluster_s_nodes_start_with_and_the_session_ray_has_it(ray_session, tmp_path):
    """A cluster RayTwin did not start had Serve proxies without the overload gate and nothing said so: `raytwin
    serve --address` warns of such nodes, and `raytwin serve env` prints what their `ray start` needs."""
    from serve_apps import serve_env

    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"autoscaling": {"max_replicas": 3}, "admission": {"max_concurrent": 2}}))
    printed = CliRunner().invoke(serve_app, ["env", "--config", str(config), "--replica-servers"])
    assert printed.exit_code == 0, printed.output
    lines = printed.stdout.splitlines()
    assert "export RAYTWIN_PROXY_MAX_IN_FLIGHT=6" in lines  # 3 replicas x 2 at once
    assert "export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_apps.proxy_gate:proxy_middlewares" in lines
    assert "export RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0" in lines
    assert len(lines) == len(serve_env.environment()) + 1
    assert serve_env.nodes_without_proxy_callback() == []  # the session's Ray started with a callback


def test_serve_haproxy_without_a_binary_is_a_usage_error_before_ray_starts(tmp_path, monkeypatch):
    import ray
    from ray.serve._private import haproxy

    def missing() -> str:
        raise FileNotFoundError("Could not find an HAProxy binary.")

    def started(*args, **kwargs) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(haproxy, "get_haproxy_binary", missing)
    monkeypatch.setattr(ray, "init", started)
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    keys = tmp_path / "keys.json"
    create_key(keys, "acme", "admin", owner="alice")
    result = CliRunner().invoke(serve_app, ["--store", str(tmp_path / "store"), "--keys-file", str(keys), "--haproxy",
                                            "--no-block"])
    said = " ".join(result.output.replace("│", " ").split())  # the message as one line, without its box
    assert result.exit_code == 2 and "--haproxy: Could not find an HAProxy binary." in said
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" in said
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ  # nothing switched for a Ray started later


@pytest.mark.parametrize("flags, on_loop", [([], False), (["--direct-ingress"], True), (["--haproxy"], True)])
def test_serve_runs_the_app_on_the_replicas_loop_where_replicas_answer_http(tmp_path, monkeypatch, flags, on_loop):
    """`raytwin serve` puts `serve_env.replica_server_environment` in the environment of the local Ray it starts
    with `--direct-ingress` or `--haproxy` (Serve reads it when its processes start), and not by default."""
    from ray.serve._private import haproxy

    from serve_apps.endpoints import DIRECT_INGRESS_ENV, HAPROXY_ENV
    from serve_apps.serve_env import USER_CODE_THREAD_ENV, environment, replica_server_environment

    class Started(Exception):
        pass

    seen: dict[str, str | None] = {}

    def started(*args, **kwargs) -> None:
        seen.update({name: os.environ.get(name) for name in replica_server_environment()})
        raise Started

    for name in (DIRECT_INGRESS_ENV, HAPROXY_ENV, USER_CODE_THREAD_ENV, *environment()):  # restored afterwards
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(haproxy, "get_haproxy_binary", lambda: "/usr/sbin/haproxy")
    result = _serve_without_ray(tmp_path, monkeypatch, started, *flags)
    assert result.exit_code == 1 and "error: the local Ray did not start: Started" in result.output, result.output
    assert seen == (replica_server_environment() if on_loop else dict.fromkeys(replica_server_environment()))


def _serve_without_ray(tmp_path, monkeypatch, init, *flags: str):
    """`raytwin serve --no-block FLAGS` on a fresh store with `init` in place of `ray.init`."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    keys = tmp_path / "keys.json"
    create_key(keys, "acme", "admin", owner="alice")
    return CliRunner().invoke(serve_app, ["--store", str(tmp_path / "store"), "--keys-file", str(keys), *flags,
                                          "--no-block"])


def test_a_local_ray_that_times_out_starting_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    """On a loaded machine `ray.init` gave up on its node after 30 s with a bare `Exception`, which `raytwin serve`
    printed as a ~60-line traceback."""
    def timed_out(**kwargs) -> None:
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    result = _serve_without_ray(tmp_path, monkeypatch, timed_out)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: the local Ray did not start: The current node timed out during startup.")
    assert "probably loaded" in result.output and "retry" in result.output and "--address" in result.output
    assert "Traceback" not in result.output


def test_serve_temp_dir_is_the_local_rays_and_refused_with_an_address(tmp_path, monkeypatch):
    class Started(Exception):
        pass

    asked: dict[str, object] = {}

    def started(**kwargs) -> None:
        asked.update(kwargs)
        raise Started

    _serve_without_ray(tmp_path, monkeypatch, started, "--temp-dir", str(tmp_path / "ray"))
    assert asked["_temp_dir"] == str((tmp_path / "ray").resolve())
    refused = _serve_without_ray(tmp_path, monkeypatch, started, "--temp-dir", "r", "--address", "127.0.0.1:1")
    said = " ".join(refused.output.replace("│", " ").split())
    assert refused.exit_code == 2 and "--temp-dir apply to a Ray this command starts" in said, said


@pytest.mark.parametrize(("content", "said"), [
    (None, "file '{path}' does not exist"), ("[1]", "a JSON object of ServeConfig fields is expected, not a list"),
    ("{", "not a JSON file (Expecting property name"),
    ('{"bogus": 1}', "the service's settings (--config {path}, RAYTWIN_SERVE_* variables, options): bogus: Extra "
                     "inputs are not permitted"),
])
def test_a_config_file_that_cannot_be_used_is_one_line_naming_it(tmp_path, monkeypatch, content, said):
    """A missing `--config` file printed a traceback ending in FileNotFoundError (a missing keys file was one line)."""
    path = tmp_path / "serve.json"
    if content is not None:
        path.write_text(content)
    result = _serve_without_ray(tmp_path, monkeypatch, lambda **kwargs: None, "--config", str(path))
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and said.format(path=path) in text and "Traceback" not in result.output, text


def test_token_bucket_refuses_after_the_burst():
    buckets = TokenBuckets(rate=0.01, burst=3)
    assert [buckets.take("k1") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = buckets.take("k1")
    assert wait > 1.0 and TokenBuckets.retry_after(wait) == str(int(-(-wait // 1)))
    assert buckets.take("k2") == 0.0  # per key


def test_config_from_args_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYTWIN_SERVE_RATE_PER_S", "7.5")
    monkeypatch.setenv("RAYTWIN_API_KEYS_FILE", str(tmp_path / "keys.json"))
    config = ServeConfig.from_args({"store_url": "s3://bucket/raytwin", "max_body_bytes": 4096})
    assert (config.rate_per_s, config.max_body_bytes) == (7.5, 4096)
    assert config.keys_file == str(tmp_path / "keys.json")
    assert config.url("registry", "acme") == "s3://bucket/raytwin/registry/acme"
    with pytest.raises(ValidationError, match="min_replicas"):
        ServeConfig.from_args({"store_url": "x", "autoscaling": {"min_replicas": 5, "max_replicas": 2}})
    with pytest.raises(ValidationError, match="extra"):
        ServeConfig.from_args({"store_url": "x", "bogus": 1})
    # a shard compiling kernels for a creation the API still waits for must not read as stuck to readiness
    with pytest.raises(ValidationError, match=r"readiness_stuck_s \(30\) must be at least shard_create_timeout_s "
                                              r"\(60\)"):
        ServeConfig.from_args({"store_url": "x", "readiness_stuck_s": 30})
    assert ServeConfig.from_args({"store_url": "x", "readiness_stuck_s": 90, "shard_create_timeout_s": 90}
                                 ).readiness_stuck_s == 90
    # unset, it follows a longer creation wait instead of refusing the config
    assert ServeConfig.from_args({"store_url": "x", "shard_create_timeout_s": 300}).readiness_stuck_s == 600
    assert ServeConfig.from_args({"store_url": "x"}).readiness_stuck_s == 120


def test_the_autoscaling_target_follows_the_ingress_concurrency_unless_set():
    base = {"store_url": "x", "keys_file": "keys.json"}
    assert ServeConfig.from_args(base).autoscaling.target_ongoing_requests == 4.0
    config = ServeConfig.from_args({**base, "admission": {"max_concurrent": 8}})
    assert config.autoscaling.target_ongoing_requests == 8.0
    config = ServeConfig.from_args({**base, "admission": {"max_concurrent": 8},
                                    "autoscaling": {"target_ongoing_requests": 2}})
    assert config.autoscaling.target_ongoing_requests == 2.0
    # `raytwin serve`: an option given overrides the config file, one left out keeps the file's value
    from_file = {"max_replicas": 8, "target_ongoing_requests": 6.0}
    assert autoscaling_args(from_file, min_replicas=None, max_replicas=None, target_ongoing_requests=None) == from_file
    assert autoscaling_args(from_file, min_replicas=2, max_replicas=None, target_ongoing_requests=3.0) == {
        "max_replicas": 8, "target_ongoing_requests": 3.0, "min_replicas": 2}


def test_asset_and_type_listings_are_paged_by_key_and_a_page_stays_in_place_under_inserts_and_deletes(tmp_path):
    """`GET /v1/assets` and `/v1/asset-types` answered every asset at once (100,000 in one answer, built in the
    backend's memory). They are paged by key (`serve_apps.listing`), 100 a page unless asked: the cursor is the last
    listed key, not a position, so an asset deleted or added meanwhile moves no other one to another page (an offset
    would skip or repeat one); a cursor no listing gave is a 422 saying what to send."""
    from serve_apps.listing import encode_cursor

    thermal, tank = AssetType.from_model(THERMAL_RC), AssetType.from_model(TWO_TANK)
    catalog = Catalog(str(tmp_path))
    catalog.put_type("acme", thermal, 1)
    catalog.put_type("acme", tank, 2)

    def create(asset_id: str) -> None:
        catalog.create_asset(Asset(id=asset_id, tenant="acme", type_name=thermal.name, type_version=thermal.version), 3)

    for i in (*range(100, 0, -1), 0):
        create(f"a{i:03d}")
    first, cursor = catalog.page_assets("acme")
    assert [a.id for a in first] == [f"a{i:03d}" for i in range(100)] and cursor is not None  # a bounded default
    assert ([a.id for a in catalog.page_assets("acme", cursor=cursor)[0]], catalog.page_assets(
        "acme", cursor=cursor)[1]) == (["a100"], None)
    assert [a.id for a in catalog.page_assets("acme", limit=2)[0]] == ["a000", "a001"]
    after = catalog.page_assets("acme", limit=2)[1]
    catalog.delete_asset("acme", "a001", 4)  # the cursor's own asset
    create("a0005")  # before the cursor: not on later pages
    create("a0015")  # after it: on the next
    assert [a.id for a in catalog.page_assets("acme", limit=2, cursor=after)[0]] == ["a0015", "a002"]
    assert [a.id for a in Catalog(str(tmp_path)).page_assets("acme", limit=2, cursor=after)[0]] == ["a0015", "a002"]
    assert catalog.page_assets("acme", type_name=tank.name) == ([], None)
    assert catalog.page_assets("globex") == ([], None)

    types, cursor = catalog.page_types("acme", limit=1)
    assert [t.key for t in types] == [thermal.key] and [t.key for t in catalog.page_types(
        "acme", limit=1, cursor=cursor)[0]] == [tank.key]
    assert catalog.page_types("acme", name=tank.name) == ([tank], None)
    for bad in ("zone-1", encode_cursor("asset-types", "a000"), "%%"):
        with pytest.raises(Unprocessable, match=r"query.cursor: not a cursor of GET /v1/assets; a cursor is the "
                           r"`next_cursor` of a page of GET /v1/assets .*send it back unchanged"):
            catalog.page_assets("acme", cursor=bad)


def test_catalog_persists_on_s3_and_keeps_tenants_apart(s3_url):
    thermal, tank = AssetType.from_model(THERMAL_RC), AssetType.from_model(TWO_TANK)
    catalog = Catalog(s3_url)
    assert catalog.put_type("acme", thermal, 1) is True and catalog.put_type("acme", thermal, 2) is False
    with pytest.raises(Conflict):
        catalog.put_type("acme", thermal.model_copy(update={"description": "other"}), 2)
    catalog.put_type("acme", tank, 2)
    site = Asset(id="site", tenant="acme", type_name=tank.name, type_version=tank.version)
    zone = Asset(id="zone", tenant="acme", type_name=thermal.name, type_version=thermal.version,
                 relationships=[Relationship(kind="feeds", target="site")])
    catalog.create_asset(site, 3)
    catalog.create_asset(zone, 4)
    with pytest.raises(Unprocessable, match="do not exist"):
        catalog.create_asset(Asset(id="x", tenant="acme", type_name=thermal.name, type_version=thermal.version,
                                   relationships=[Relationship(kind="contains", target="nope")]), 5)
    with pytest.raises(Unprocessable, match="asset type"):
        catalog.create_asset(Asset(id="y", tenant="globex", type_name=thermal.name, type_version=thermal.version), 1)

    reloaded = Catalog(s3_url)  # everything came back from the store
    assert [a.id for a in reloaded.list_assets("acme")] == ["site", "zone"]
    assert [a.id for a in reloaded.list_assets("acme", type_name=thermal.name)] == ["zone"]
    assert [a.id for a in reloaded.list_assets("acme", related_to="site", relationship="feeds")] == ["zone"]
    assert reloaded.list_assets("acme", relationship="contains") == []
    assert reloaded.get_type("acme", thermal.name, thermal.version) == thermal
    with pytest.raises(NotFound):
        reloaded.get_asset("globex", "zone")
    with pytest.raises(Conflict, match="zone"):
        reloaded.delete_asset("acme", "site", 7)
    # what queries see follows every write: the records are the catalog's own, rebuilt per write
    reloaded.update_asset(zone.model_copy(update={"metadata": {"site": "north"}}), 6)
    assert {r.id: dict(r.metadata) for r in reloaded.records["acme"].values()} == {"site": {}, "zone": {"site": "north"}}
    assert reloaded.records["acme"]["zone"].relationships == {"feeds": ("site",)}
    reloaded.delete_asset("acme", "zone", 7)
    assert list(reloaded.records["acme"]) == ["site"]
    reloaded.delete_asset("acme", "site", 8)
    reloaded.delete_type("acme", thermal.name, thermal.version, 9)
    assert Catalog(s3_url).list_assets("acme") == [] and len(Catalog(s3_url).list_types("acme")) == 1


def test_audit_log_is_append_only_and_ordered_on_s3(s3_url):
    log = AuditLog(s3_url)
    t0 = datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC)
    for k, action in enumerate(("asset.create", "scenario.run", "asset.delete")):
        log.append(AuditRecord(time=t0 + timedelta(seconds=k), request_id=f"r{k}", key_id="k1", tenant="acme",
                               role="admin", action=action, target="zone", details={"k": k}))
    log.append(AuditRecord(time=t0, request_id=None, key_id="k2", tenant="globex", role="admin",
                           action="asset.create", target="other"))
    assert [r.action for r in log.records("acme")] == ["asset.create", "scenario.run", "asset.delete"]
    assert [r.action for r in log.records("acme", day="2026-03-02")] == ["scenario.run", "asset.delete"]
    assert [r.details["k"] for r in log.records("acme", limit=2)] == [1, 2]
    assert [r.target for r in log.records("globex")] == ["other"]


def test_the_query_cursor_key_is_readable_by_its_owner_only(tmp_path):
    """Whoever reads it forges cursors (page positions): on a local store it is 0600, as the keys file is."""
    from serve_apps.asset_queries import cursor_secret

    key = cursor_secret(str(tmp_path), None)
    path = tmp_path / "secrets" / "query-cursor.key"
    path.chmod(0o644)  # made by an earlier version
    assert cursor_secret(str(tmp_path), None) == key and path.stat().st_mode & 0o777 == 0o600


class _QueryCatalog:
    """A stand-in backend for the query routes: a catalog of tenant acme's types (thermal_rc: T_in, T_m; two_tank:
    h1, h2) with no assets, whose catalog pass is the backend's own."""

    query_candidates = Backend.query_candidates

    def __init__(self):
        types = {f"{t.name}@{t.version}": t for t in map(AssetType.from_model, (THERMAL_RC, TWO_TANK))}
        self.catalog = SimpleNamespace(types={"acme": types}, records={"acme": {}})
        self._lock = threading.Lock()

    def query_cursor_secret(self):
        return b"k" * 32


def test_a_state_name_no_asset_type_has_is_refused_naming_the_known_ones(tmp_path):
    """`state.nope > 3` (a typo) matched nothing, and a sort or projection on it sorted on and showed nothing, without
    a word: each such name is a 422 naming where it is and the states it could be, of the tenant's types or of those
    the query keeps to. A state of some types only (a mixed fleet) stays valid."""
    from tests.fixtures_serve import in_process

    with in_process(_QueryCatalog(), tmp_path) as (http, auth, _):
        def refused(path="/v1/query", **body):
            answer = http.post(path, json=body, headers=auth["admin"])
            assert answer.status_code == 422, answer.text
            return answer.json()["error"]

        error = refused(q="state.nope > 3", sort=["-std.T_in", "state.nop"], fields=["state", "std.no"])
        assert [(d["in"], d["field"], d["known"]) for d in error["details"]] == [
            ("q", "state.nope", ["T_in", "T_m", "h1", "h2"]), ("sort[1]", "state.nop", ["T_in", "T_m", "h1", "h2"]),
            ("fields[1]", "std.no", ["T_in", "T_m", "h1", "h2"])]
        assert "q: unknown field state.nope" in error["message"] and "T_in, T_m, h1, h2" in error["message"]
        scoped = refused(q='type == "two_tank" and exists(state.T_in)')
        assert scoped["details"][0]["known"] == ["h1", "h2"] and "type two_tank" in scoped["message"]
        assert refused("/v1/bulk", q="not state.nope > 3", action="tag", set={"k": "v"})["details"][0]["in"] == "q"
        for body in ({"q": "state.T_in > 3 or state.h1 < 2", "sort": ["-state.h2"], "fields": ["std.T_m"]},
                     {"q": 'type in ["two_tank", "nosuch"] and state.h1 > 0'}, {"q": "", "fields": ["state"]}):
            answer = http.post("/v1/query", json=body, headers=auth["reader"])
            assert answer.status_code == 200 and answer.json()["matched"] == 0, answer.text


def test_asset_metadata_is_bounded_one_line_text():
    """The catalog holds every asset's metadata in the backend's memory, and a newline or NUL in it forges log
    lines: 10,000 keys and control characters were accepted (only the 1 MiB body bounded it)."""
    from pydantic import ValidationError

    from serve_apps.query_schemas import BulkRequest
    from serve_apps.schemas import MAX_METADATA_KEYS, AssetCreate

    def create(metadata: dict) -> AssetCreate:
        return AssetCreate(id="a", type_name="t", type_version="1.0.0", metadata=metadata)

    assert create({"process_std.T_in": "0.1", "site": "north", "Site name": "Nord – Halle 2"}).metadata["site"]
    for metadata, why in (({"site": "a\nb"}, "control character '\\\\n'"), ({"x\x00": "v"}, "control character"),
                          ({"site": "a\x85b"}, "control character"), ({"site": "a\u2028b"}, "control character"),
                          ({"site": "nimda\u202e"}, "control character"),
                          ({"si\u200bte": "v"}, "control character"),
                          ({"k": "v" * 4097}, "at most 4096 characters"), ({"k" * 129: "v"}, "at most 128"),
                          ({f"k{i}": "v" for i in range(MAX_METADATA_KEYS + 1)}, "at most 100 items")):
        with pytest.raises(ValidationError, match=why):
            create(metadata)
    with pytest.raises(ValidationError, match="control character"):
        BulkRequest(q="", action="tag", set={"site": "a\rb"})


def test_a_store_taken_by_another_service_answers_503_naming_it_not_an_internal_error():
    """A reshard took a live service's store: every write it took answered 500 `internal`, the reason only in
    the replica's log."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from raytwin.statestore import StoreFenced
    from serve_apps.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/write")
    async def write() -> None:
        raise StoreFenced("store s3://ops-bucket/twins is leased to service b (epoch 3), not to this writer (epoch 2)")

    answer = TestClient(app, raise_server_exceptions=False).post("/write")  # (Starlette re-raises to the server)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "store_fenced"
    assert "ops-bucket" not in answer.text  # the operator's store location is not the tenants' to see
    assert "leased to service b (epoch 3)" in answer.json()["error"]["message"] and "restart it" in answer.text


@pytest.mark.parametrize("failure, said, error", [
    (OSError(28, "No space left on device", "/srv/raytwin/twins/log/seg-1.arrows"), "disk is full", "disk_full"),
    (OSError(30, "Read-only file system"), "remount it read-write", "read_only"),
    (PermissionError(13, "Permission denied"), "owner and permissions", "permission"),
    (ConnectionRefusedError(111, "Connection refused"), "is up and reachable", "unreachable"),
    ("botocore", "is up and reachable", "unreachable"),
])
def test_a_failing_store_answers_503_store_unavailable_with_retry_after_not_500(failure, said, error, monkeypatch,
                                                                                caplog):
    """A full disk or an S3 outage answered every telemetry batch 500 `internal` without `Retry-After`: producers
    read a bug in their request, and nothing named the store. Each is counted by operation and error class
    (`RayTwinStoreWritesFailing`), where no metric counted them, and logged `event=store_unavailable` with its error
    class, a 503 raised as such too (an outside test's read-only store: no line named those of telemetry whose
    change record the store refused)."""
    from botocore.exceptions import EndpointConnectionError
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from raytwin import metrics
    from raytwin.storage import replace_file
    from serve_apps.errors import install_error_handlers
    from serve_apps.store_errors import unavailable

    counted: list[dict[str, str]] = []
    monkeypatch.setattr(metrics, "STORE_FAILURES", SimpleNamespace(inc=lambda **tags: counted.append(tags)))

    failure = EndpointConnectionError(endpoint_url="http://s3.ops:9000/b/twins/lease.json") \
        if failure == "botocore" else failure
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/assets/a/telemetry")
    async def write() -> None:  # the store's own failure: raised by its storage layer
        replace_file(_FailingStore(failure), "twins/registrations/a.json", b"{}")

    @app.get("/missing")
    async def missing() -> None:
        raise FileNotFoundError("/srv/raytwin/twins/snap.parquet")  # the store answered: a bug's 500, not an outage

    @app.get("/ray-timeout")
    async def ray_timeout() -> None:
        from ray.exceptions import GetTimeoutError

        raise GetTimeoutError("ray.get timed out")  # a TimeoutError, but Ray's, not the store's

    @app.get("/v1/assets/a/state")
    async def read() -> None:  # a store read past its deadline (`BoundedRead`): its 503 raised as such
        raise unavailable("a read of the store's lease did not answer within 5 s", "timeout")

    http = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level("ERROR", logger="raytwin.serve"):
        answer = http.post("/v1/assets/a/telemetry")
        assert http.get("/v1/assets/a/state").status_code == 503
    logged = [r.getMessage().split(" path=")[1] for r in caplog.records if "event=store_unavailable" in r.getMessage()]
    assert len(logged) == 2 and logged[0].startswith(f"/v1/assets/a/telemetry error={error} failure=StoreIOError: ")
    assert logged[1].startswith("/v1/assets/a/state error=timeout failure=the store is unavailable (a read of the "
                                "store's lease did not answer within 5 s)"), logged
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5", answer.text
    body = answer.json()["error"]
    assert body["code"] == "store_unavailable" and type(failure).__name__ in body["message"] and said in body["message"]
    assert "/srv/raytwin" not in answer.text and "s3.ops" not in answer.text  # the store's location is the operator's
    assert http.get("/missing").status_code == http.get("/ray-timeout").status_code == 500
    assert counted == [{"operation": "write", "error": error}, {"operation": "read", "error": "timeout"}]


class _FailingStore:
    """An object store whose every write fails with `failure`."""

    def __init__(self, failure: BaseException):
        self.failure = failure

    def pipe_file(self, path: str, data: bytes, **kwargs) -> None:
        raise self.failure


def _raised_in_a_shard(failure: BaseException, through_the_store: bool) -> BaseException:
    """`failure` raised in a shard (by a store write: as `StoreIOError`) as Ray hands it to the shard's caller: a
    copy of it (pickled: no traceback), the traceback only in Ray's text."""
    import traceback

    from raytwin.storage import replace_file

    try:
        if through_the_store:
            replace_file(_FailingStore(failure), "twins/log/seg-1.arrows", b"")
        raise failure  # the shard's own call: an FMU's library, a connector's broker
    except BaseException as exc:
        return _from_a_shard(exc, traceback.format_exc())


def _from_a_shard(raised: BaseException, text: str) -> BaseException:
    """`raised` in a shard, as Ray hands it to the shard's caller: a pickled copy, `text` its traceback."""
    import pickle

    from ray.exceptions import RayTaskError

    return RayTaskError("ingest", text, pickle.loads(pickle.dumps(raised)), proctitle="ray::TwinShardProcess.ingest",
                        pid=7, ip="10.0.0.5").as_instanceof_cause()


def test_only_the_stores_own_failures_answer_503_store_unavailable():
    """Any OSError or connection error answered 503 `store_unavailable`, wherever it was raised: an FMU whose
    shared library cannot load, a broker refusing a connection, in the API or in a shard. Its operator was sent to
    a healthy store, and clients resent requests that fail the same way each time."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from raytwin.storage import replace_file
    from serve_apps.deps import BackendClient
    from serve_apps.errors import install_error_handlers

    full = OSError(28, "No space left on device")
    raised = {"store": _raised_in_a_shard(full, True),
              "fmu": _raised_in_a_shard(OSError("libfmu.so: cannot open shared object file"), False),
              "broker": _raised_in_a_shard(ConnectionRefusedError(111, "Connection refused"), False)}

    async def remote(case: str) -> None:
        raise raised[case]

    backend = BackendClient(SimpleNamespace(apply=SimpleNamespace(remote=remote)))  # the backend's replica
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/backend/{case}")
    async def through_the_backend(case: str) -> None:  # as every route calls the backend
        await backend.call("apply", case)

    @app.post("/here/{case}")
    async def here(case: str) -> None:  # raised in this process
        if case == "store":
            replace_file(_FailingStore(full), "twins/registrations/a.json", b"{}")
        raise ConnectionRefusedError(111, "Connection refused") if case == "broker" else OSError("no libfmu.so")

    http = TestClient(app, raise_server_exceptions=False)
    for where in ("backend", "here"):
        store = http.post(f"/{where}/store")
        assert store.status_code == 503 and store.json()["error"]["code"] == "store_unavailable", store.text
        assert "disk is full" in store.json()["error"]["message"]
        for case in ("fmu", "broker"):
            other = http.post(f"/{where}/{case}")
            assert (other.status_code, other.json()["error"]["code"]) == (500, "internal"), (where, case, other.text)


def test_an_error_no_route_handles_is_counted_logged_and_headed_with_the_status_its_client_gets(monkeypatch,
                                                                                              caplog):
    """An outside test's read-only store: each telemetry batch answered 503 `store_unavailable` was counted in
    `ray_raytwin_http_requests_total` and logged (`event=request`) as status 500, and came without its
    `X-RayTwin-Request-ID`: Starlette answers an exception no route handles in its outermost layer, after the
    request observer and the request-id middleware had seen it go by."""
    from fastapi.testclient import TestClient

    from raytwin.store_failures import StoreIOError
    from serve_apps import api

    counted: list[str] = []
    monkeypatch.setattr(api, "metrics", SimpleNamespace(
        HTTP_REQUESTS=SimpleNamespace(inc=lambda **tags: counted.append(tags["status"])),
        HTTP_LATENCY=SimpleNamespace(observe=lambda seconds, **tags: None)))
    monkeypatch.setattr("serve_apps.errors._record_store_failure", lambda *args: None)
    app = api.create_api()

    @app.post("/v1/outage")  # (a path of its own: the API's routes need the replica's services)
    async def outage() -> None:
        raise StoreIOError(30, "Read-only file system", operation="write", error="read_only")

    @app.get("/v1/bug")
    async def bug() -> None:
        raise RuntimeError("a bug")

    http = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level("INFO", logger="raytwin.serve.requests"):
        answers = [http.post("/v1/outage"), http.get("/v1/bug")]
    assert [a.status_code for a in answers] == [503, 500] and counted == ["503", "500"]
    for answer in answers:
        assert answer.headers["x-raytwin-request-id"] == answer.json()["error"]["request_id"], answer.headers
    logged = [r.getMessage() for r in caplog.records if r.name == "raytwin.serve.requests"]
    assert [line.split(" status=")[1][:3] for line in logged] == ["503", "500"], logged


def test_the_storage_layers_failure_answers_503_by_its_type_and_the_same_oserror_elsewhere_500():
    """The 503 mapping told the store's failures from others by the files named in their traceback (Ray's text of
    it for another process's error): one whose text named no file of the storage layer answered 500, and another
    OSError whose traceback passed through fsspec answered 503. Every store read and write raises its outages as
    `StoreIOError`, a type that Ray's copy keeps, and the mapping goes by that type alone."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from raytwin.storage import replace_file
    from raytwin.store_failures import StoreIOError
    from serve_apps.deps import BackendClient
    from serve_apps.errors import install_error_handlers

    full = OSError(28, "No space left on device")
    with pytest.raises(StoreIOError) as raised:
        replace_file(_FailingStore(full), "twins/registrations/a.json", b"{}")
    assert raised.value.__cause__ is full and (raised.value.operation, raised.value.error) == ("write", "disk_full")
    text = 'Traceback (most recent call last):\n  File "ingest.py", line 9, in apply\nOSError: [Errno 28] No space'
    through_fsspec = ('Traceback (most recent call last):\n  File "/venv/site-packages/fsspec/spec.py", line 9, in '
                      'cat_file\n  File "/srv/raytwin/raytwin/storage.py", line 80, in replace_file\nOSError: '
                      '[Errno 28] No space')
    raised = {"store": _from_a_shard(raised.value, text), "elsewhere": _from_a_shard(full, text),
              "untyped": _from_a_shard(full, through_fsspec)}

    async def remote(case: str) -> None:
        raise raised[case]

    backend = BackendClient(SimpleNamespace(apply=SimpleNamespace(remote=remote)))
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/backend/{case}")
    async def through_the_backend(case: str) -> None:
        await backend.call("apply", case)

    http = TestClient(app, raise_server_exceptions=False)
    store = http.post("/backend/store")
    assert store.status_code == 503 and store.json()["error"]["code"] == "store_unavailable", store.text
    assert "OSError: [Errno 28] No space left on device" in store.json()["error"]["message"]
    assert "disk is full" in store.json()["error"]["message"]
    for case in ("elsewhere", "untyped"):  # the same OSError, not raised by a store read or write: a bug
        other = http.post(f"/backend/{case}")
        assert (other.status_code, other.json()["error"]["code"]) == (500, "internal"), (case, other.text)


class HealthBackend:
    """The backend calls of the health route, over a real store lease: the shards must not be asked once fenced;
    and the real gate of its writes (`Backend.check_writable`) in front of a connector operation."""

    def __init__(self, store, lease):
        from serve_apps.backend import RENEWAL_STALL_S
        from raytwin.renewal_watch import RenewalWatch
        from serve_apps.store_probe import BoundedRead

        self.twins = SimpleNamespace(store=store, lease=lease,
                                     shards_answering=lambda timeout_s, stuck_s: self.answering)
        self.config = SimpleNamespace(readiness_stuck_s=120.0)
        self._lease_reads = BoundedRead(store.read_lease, "the store's lease")
        self._beat_reads = BoundedRead(store.read_heartbeat, "the store's lease heartbeat")
        self._renewals = RenewalWatch(RENEWAL_STALL_S)
        self._fence, self._fence_checked, self.proposed, self.held = None, -math.inf, [], []
        self.connector_ops = SimpleNamespace(propose=lambda *a: self.proposed.append(a) or {"id": "c1"},
                                             hold=self.held.append)
        self.answering = 2  # twin shards that answer (`Backend.shards_answering`)
        self.waited_s: list[tuple[float, float]] = []  # how long readiness let the shards take to answer, and to
        # be in one call

    def store_fence(self, timeout_s: float = 5.0):
        from serve_apps.backend import Backend

        return Backend.store_fence(self, timeout_s)

    def _fence_read(self, held):
        from serve_apps.backend import Backend

        return Backend._fence_read(self, held)

    def probe_store(self, timeout_s: float):
        from serve_apps.backend import Backend

        return Backend.probe_store(self, timeout_s)

    def _probe(self, lease, deadline: float):
        from serve_apps.backend import Backend

        return Backend._probe(self, lease, deadline)

    def check_writable(self, fresh: bool = False) -> None:
        from serve_apps.backend import Backend

        Backend.check_writable(self, fresh)

    def connector(self, op: str, *args):
        from serve_apps.backend import Backend

        return Backend.connector(self, op, *args)

    def job_stats(self, tenant: str | None = None) -> dict:
        return {"states": {"running": 1}}

    def _fenced(self) -> bool:
        from serve_apps.store_errors import StoreUnavailable

        try:
            return self.store_fence(0.1) is not None
        except StoreUnavailable:  # a store that fails: not fenced, its shards still count
            return False

    def live_twins(self, tenant: str, timeout_s: float) -> int | None:
        assert not self._fenced(), "a fenced service's health asked its shards"
        return 2 if self.answering == 2 else None  # a shard that does not answer leaves the count unanswered

    def shards_answering(self, timeout_s: float, stuck_s: float) -> int:
        assert not self._fenced(), "a fenced service's readiness asked its shards"
        self.waited_s.append((timeout_s, stuck_s))
        return self.answering


def _leased_backend(tmp_path) -> tuple:
    """(store, its lease, the health routes' backend): a service holding a store under `tmp_path`."""
    from raytwin.statestore import Lease, StateStore

    store = StateStore(str(tmp_path / "twins"))
    mine = Lease(owner="svc-a", epoch=1, shards=2, namespace="ns", acquired_at="2026-12-05T14:00:00+00:00",
                 acquired_by="host-a:1")
    store.write_lease(mine)
    return store, mine, HealthBackend(store, mine)


def test_readiness_fails_a_fenced_service_and_one_whose_shards_all_fail_to_answer(tmp_path):
    """Anonymous health answers a status only, and liveness must stay 200 for a service that is alive; so a
    fenced service (every write refused) or one with no shard answering passed every probe, and stayed in the
    load balancer. `reason` says when a shard is why (an outside test's SIGSTOPped shard: health said `degraded`
    alone, readiness `unavailable` alone, though every other cause comes with one)."""
    from dataclasses import replace

    from serve_apps.api import NO_SHARD_ANSWERS, SHARD_UNANSWERED
    from tests.fixtures_serve import in_process

    store, mine, backend = _leased_backend(tmp_path)
    with in_process(backend, tmp_path) as (http, auth, _):
        ready = http.get("/v1/health/ready")
        assert (ready.status_code, ready.json()) == (200, {"status": "ok"})
        for path in ("/v1/health/ready", "/v1/health"):  # what load balancers and probes often send: was 405
            head = http.head(path)
            assert (head.status_code, head.content) == (200, b"")
        backend.answering = 1  # one shard down or hung: its twins are unavailable, the others served
        assert http.get("/v1/health/ready").status_code == 200
        hung = http.get("/v1/health", headers=auth["reader"])
        assert (hung.status_code, hung.json()["status"], hung.json()["reason"]) == (200, "degraded", SHARD_UNANSWERED)
        backend.answering = 0  # every shard down, restarting or hung (`serve shutdown` of the shards, a crash loop)
        down = http.get("/v1/health/ready")
        assert (down.status_code, down.json()) == (503, {"status": "unavailable", "reason": NO_SHARD_ANSWERS})
        assert http.head("/v1/health/ready").status_code == 503
        # not 5 s (`shard_read_timeout_s`): within a probe's 1 s timeout; stuck: longer than any call the API waits for
        assert set(backend.waited_s) == {(0.5, 120.0)}
        assert http.get("/v1/health").status_code == 200  # alive: a restart would not bring shards back
        backend.answering = 2
        store.write_lease(replace(mine, owner="svc-b", epoch=2, acquired_by="host-b:7"))  # a takeover (a reshard)
        fenced = http.get("/v1/health/ready")
        assert (fenced.status_code, fenced.json()) == (503, {"status": "fenced"})  # no holder, no host: anonymous


def test_health_says_fenced_naming_the_stores_new_holder_once_another_service_took_it(tmp_path):
    """A service whose store was taken over answered every write 503 `store_fenced`, and health `ok`."""
    from dataclasses import replace

    from tests.fixtures_serve import in_process

    store, mine, backend = _leased_backend(tmp_path)
    with in_process(backend, tmp_path) as (http, auth, _):
        assert http.get("/v1/health").json() == {"status": "ok"}
        assert http.get("/v1/health", headers=auth["reader"]).json() == {
            "status": "ok", "tenant": "acme", "live_twins": 2, "jobs": {"running": 1}}
        store.write_lease(replace(mine, owner="svc-b", epoch=2, acquired_by="host-b:7"))  # a takeover (a reshard)
        assert http.get("/v1/health").json() == {"status": "fenced"}  # no store URL nor host for anonymous callers
        answer = http.get("/v1/health", headers=auth["reader"])
        assert answer.status_code == 200 and answer.json()["status"] == "fenced", answer.text
        fenced = answer.json()["fenced"]
        assert (fenced["holder"], fenced["epoch"], fenced["acquired_by"]) == ("svc-b", 2, "host-b:7")
        assert "took the store over" in fenced["reason"] and "(epoch 1)" in fenced["reason"]
        assert str(tmp_path) not in answer.text  # the store's location is the operator's, not the tenants''
        assert "live_twins" not in answer.json() and answer.json()["tenant"] == "acme"
        time.sleep(FENCE_CHECK_S)  # the write gate reads the lease once a second at most
        proposal = {"connector": "plant", "asset_id": "pump-1", "name": "setpoint", "value": {"q": 1.0}}
        refused = http.post("/v1/commands", json=proposal, headers=auth["writer"])  # a command sent beside the
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_fenced"  # successor: no
        assert "took the store over" in refused.json()["error"]["message"] and not backend.proposed
        assert len(backend.held) == 1 and "service svc-b (epoch 2) took the store over" in backend.held[0]  # the
        # write check holds the connectors too: none starts, not even for a read, ahead of the store watch
        store.write_lease(replace(mine, released=True))  # its own lease released under it (the service closed)
        fenced = http.get("/v1/health", headers=auth["reader"]).json()["fenced"]
        assert "holder" not in fenced and "was released" in fenced["reason"]


@pytest.mark.parametrize("outage", ["hung", "refused"])
def test_liveness_stays_200_and_readiness_answers_503_within_its_timeout_while_the_store_fails(tmp_path, outage,
                                                                                              monkeypatch):
    """An S3 endpoint that hung held both probes past 25 s (the lease read had no deadline); one that refused
    connections answered them 500: a liveness probe then restarts every healthy pod during a store outage."""
    import threading

    from tests.fixtures_serve import in_process

    store, mine, backend = _leased_backend(tmp_path)
    thaw, cat_file = threading.Event(), store.fs.cat_file

    def failing(path, *args, **kwargs):
        if outage == "refused":
            raise ConnectionRefusedError(111, f"Connection refused: {path}")
        thaw.wait(30)  # a frozen endpoint: the read answers only once thawed
        return cat_file(path, *args, **kwargs)

    with in_process(backend, tmp_path) as (http, auth, _):
        monkeypatch.setattr(store.fs, "cat_file", failing)
        try:
            for _ in range(2):  # a hung read is shared, not one more thread per probe
                t0 = time.monotonic()
                live, ready = http.get("/v1/health"), http.get("/v1/health/ready")
                keyed = http.get("/v1/health", headers=auth["reader"])
                assert time.monotonic() - t0 < 4.0, "a probe waited for the store past its timeout (0.5 s each)"
                assert live.status_code == 200 and live.json()["status"] == "degraded", live.text
                assert ready.status_code == 503 and ready.json()["status"] == "unavailable", ready.text
                assert keyed.json()["status"] == "degraded" and keyed.json()["live_twins"] == 2
                said = "did not answer within 0.5 s" if outage == "hung" else "ConnectionRefusedError"
                assert said in live.json()["reason"] and said in ready.json()["reason"]
                assert str(tmp_path) not in live.text + ready.text + keyed.text
            proposal = {"connector": "plant", "asset_id": "pump-1", "name": "setpoint", "value": {"q": 1.0}}
            if outage == "refused":  # a write's gate reads the lease too: 503 to resend, not 500
                refused = http.post("/v1/commands", json=proposal, headers=auth["writer"])
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
                assert refused.headers["Retry-After"] == "5"
        finally:
            thaw.set()
        monkeypatch.setattr(store.fs, "cat_file", cat_file)
        assert http.get("/v1/health/ready").json() == {"status": "ok"}  # back by itself once the store answers
        assert http.get("/v1/health").json() == {"status": "ok"}


class _Passes(threading.Event):
    """A store watch's stop (`Backend._watch_stop`), set once the watch waited before `n` passes."""

    def __init__(self, n: int):
        super().__init__()
        self.left = n

    def wait(self, timeout: float | None = None) -> bool:
        if self.left == 0:
            self.set()
        self.left -= 1
        return self.is_set()


def test_the_store_watch_exports_the_fence_stops_the_connectors_once_and_writes_the_changes_a_failure_kept(
        tmp_path, monkeypatch):
    """The backend's one store-watch thread (`Backend._watch_store`, every 5 s): once a service of another Ray
    cluster took the store, the fence gauge says so and this service's connectors stop, once, and no connector
    waiting for its client id is started beside the successor's; and a change whose write failed is written when
    the store takes writes again, with no request to carry it."""
    from dataclasses import replace

    from raytwin import metrics
    from serve_apps import backend as backend_module
    from serve_apps.backend import Backend
    from serve_apps.changes import ChangeLog
    from serve_apps.store_probe import BoundedRead

    def disk_full(*args) -> None:
        raise OSError(28, "No space left on device")

    store, mine, _ = _leased_backend(tmp_path)
    store.write_lease(replace(mine, owner="svc-b", epoch=2, cluster="other"))  # taken over from another cluster
    fenced, stopped = [], []
    monkeypatch.setattr(metrics, "STORE_FENCED", SimpleNamespace(set=fenced.append))
    monkeypatch.setattr(backend_module, "stop_connector_actors", lambda namespace: stopped.append(namespace) or 2)
    monkeypatch.setattr(backend_module, "ray_cluster", lambda: "this")
    backend = Backend.__new__(Backend)
    backend.config, backend.twins = SimpleNamespace(namespace="ns"), SimpleNamespace(store=store, lease=mine)
    backend._lease_reads = BoundedRead(store.read_lease, "the store's lease")
    supervised, held = [], []
    backend.connector_ops = SimpleNamespace(supervise=lambda: supervised.append("pass"), hold=held.append)
    backend._export_store_state = lambda lease, deadline: None  # (its own test: the health probe's finding)
    backend.changes = ChangeLog(str(tmp_path / "changes"))
    write = backend.changes.store.write
    backend.changes.store.write = disk_full
    with pytest.raises(OSError):
        backend.changes.record("acme", [{"kind": "asset.updated", "asset_id": "a"}])
    backend.changes.store.write = write  # the disk has space again
    backend._watch_stop = _Passes(2)
    backend._watch_store()
    assert fenced == [0, 1, 1] and stopped == ["ns"] and supervised == []
    assert len(held) == 2 and "service svc-b (epoch 2) took the store over" in held[0]  # none started again
    assert backend.changes.unwritten() == 0
    assert [(c.seq, c.asset_id) for c in backend.changes.store.read("acme", 0, 10)] == [(1, "a")]


def _watched_backend(store, lease):
    """A `Backend` whose store watch has what it reads and writes (the lease, the heartbeat, the change log), over
    `store` held with `lease`; its watch not started."""
    from raytwin.renewal_watch import RenewalWatch
    from serve_apps.backend import RENEWAL_STALL_S, Backend
    from serve_apps.store_probe import BoundedRead

    backend = Backend.__new__(Backend)
    backend.config = SimpleNamespace(namespace="ns", readiness_stuck_s=120.0)
    backend.twins = SimpleNamespace(store=store, lease=lease, shards_answering=lambda timeout_s, stuck_s: 1)
    backend._lease_reads = BoundedRead(store.read_lease, "the store's lease")
    backend._beat_reads = BoundedRead(store.read_heartbeat, "the store's lease heartbeat")
    backend._renewals = RenewalWatch(RENEWAL_STALL_S)
    backend.changes = SimpleNamespace(unwritten=lambda: 0, checkpoint=lambda force=False: None)
    backend.connector_ops = SimpleNamespace(supervise=list)
    return backend


def test_closing_the_backend_ends_its_store_watch(tmp_path, monkeypatch):
    """The store watch looped forever on a daemon thread: a backend built and dropped (tests build several, a
    replica that Serve stops) left it running until the process exited, where it failed with tracebacks."""
    from serve_apps import backend as backend_module

    monkeypatch.setattr(backend_module, "FENCE_WATCH_S", 0.01)
    store, mine, _ = _leased_backend(tmp_path)
    backend, passes = _watched_backend(store, mine), threading.Semaphore(0)
    # each pass ends asking for unwritten changes
    backend.changes = SimpleNamespace(unwritten=passes.release, checkpoint=lambda force=False: None)
    backend._start_store_watch()
    watch = backend._watch_thread
    assert passes.acquire(timeout=30) and passes.acquire(timeout=30)  # it runs: two passes
    backend.close()
    assert not watch.is_alive() and watch not in threading.enumerate()
    backend.close()  # again (Serve's shutdown, then the collector): nothing more to do


def test_the_store_watch_ends_quietly_when_the_process_exits(tmp_path, monkeypatch, caplog):
    """CI's log ended with the store watch's tracebacks at the interpreter's exit: `fence_watch_failed`,
    `RuntimeError: cannot schedule new futures after interpreter shutdown` (its lease reads went through a
    thread pool, which takes no work once the exit begins, while the watch ran on)."""
    import atexit
    import logging
    from concurrent.futures import thread as pool_threads

    from serve_apps import backend as backend_module

    monkeypatch.setattr(backend_module, "FENCE_WATCH_S", 0.01)
    at_exit: list = []  # what the process's exit will call
    monkeypatch.setattr(atexit, "register", at_exit.append)
    monkeypatch.setattr(atexit, "unregister", at_exit.remove)
    store, mine, _ = _leased_backend(tmp_path)
    backend, passes = _watched_backend(store, mine), threading.Semaphore(0)
    # each pass ends asking for unwritten changes
    backend.changes = SimpleNamespace(unwritten=passes.release, checkpoint=lambda force=False: None)
    backend._start_store_watch()
    with monkeypatch.context() as exiting:
        exiting.setattr(pool_threads, "_shutdown", True)  # the exit begins: the other threads are joined first
        assert passes.acquire(timeout=30) and passes.acquire(timeout=30)  # the watch's passes meanwhile
        (exit_call,) = at_exit
        exit_call()
    assert not backend._watch_thread.is_alive() and not at_exit
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_health_and_readiness_say_the_store_takes_no_writes_once_the_shards_heartbeat_stops_changing(tmp_path):
    """A full disk failed every write (the shards' heartbeat included) while reads of the lease worked: health
    and readiness said ok, and nothing named the store. With every shard down (none renews it), health said the
    store took no writes too: it says the shards are down."""
    from raytwin.statestore import Heartbeat
    from tests.fixtures_serve import in_process

    store, mine, backend = _leased_backend(tmp_path)
    backend._renewals.quiet_s = 0.3  # (15 s in a service: several 2 s renewals missed)
    beat = Heartbeat(owner=mine.owner, epoch=mine.epoch, cluster=mine.cluster, at_s=1.0)
    store.write_heartbeat(beat)
    with in_process(backend, tmp_path) as (http, _, _):
        assert http.get("/v1/health/ready").json() == {"status": "ok"}  # the first one seen: not stale yet
        store.write_heartbeat(Heartbeat(**{**beat.__dict__, "at_s": 3.0}))  # renewed: whatever this host's clock
        time.sleep(0.2)
        assert http.get("/v1/health").json() == {"status": "ok"}
        time.sleep(0.4)  # the disk fills: no renewal lands
        live, ready = http.get("/v1/health"), http.get("/v1/health/ready")
        assert live.status_code == 200 and live.json()["status"] == "degraded"
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
        assert "heartbeat" in live.json()["reason"] and "full disk" in ready.json()["reason"]
        assert "shard is down" not in live.json()["reason"]  # a shard answered: the store is the cause
        store.write_heartbeat(Heartbeat(**{**beat.__dict__, "at_s": 5.0}))  # space again: renewals land
        assert http.get("/v1/health/ready").json() == {"status": "ok"}
        backend.answering = 0  # every shard down: none renews the heartbeat, whatever the store takes
        time.sleep(0.4)
        live = http.get("/v1/health").json()
        assert live["status"] == "degraded" and "no twin shard answers" in live["reason"], live
        assert "the shards are down, not necessarily the store" in live["reason"] and "full disk" not in live["reason"]


def test_the_backend_exports_what_its_health_probe_finds_of_the_store(tmp_path, monkeypatch):
    """`raytwin status` and the dashboard reach no health route: they said nothing of a store that took no
    writes. The backend exports the probe's finding, by reason, every 5 s."""
    from raytwin import metrics
    from serve_apps.store_errors import UNAVAILABLE_REASONS

    exported: dict[str, float] = {}
    monkeypatch.setattr(metrics, "STORE_UNAVAILABLE",
                        SimpleNamespace(set=lambda value, reason: exported.__setitem__(reason, value)))
    monkeypatch.setattr(metrics, "STORE_FENCED", SimpleNamespace(set=lambda value: None))
    store, mine, _ = _leased_backend(tmp_path)
    backend = _watched_backend(store, mine)
    backend._watch_pass(False)
    assert exported == {r: 0.0 for r in UNAVAILABLE_REASONS}

    def refused(path, *args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(store.fs, "cat_file", refused)
    backend._watch_pass(False)
    assert {r for r, v in exported.items() if v} == {"unreachable"} and set(exported) == set(UNAVAILABLE_REASONS)
    monkeypatch.setattr(store.fs, "cat_file", lambda path, *args, **kwargs: b'{"owner": ')  # no lease: a bug's
    backend._watch_pass(False)  # logged, and the watch thread lives on (it also stops connectors)
    assert {r for r, v in exported.items() if v} == {"unreachable"}


def test_a_pass_of_the_store_watch_reads_the_lease_once_and_a_read_that_hangs_ends_it_at_its_deadline(
        tmp_path, monkeypatch):
    """Each 5 s pass read the lease twice: to export the store's state (the health probe's finding), then to
    watch the fence. One read serves both now, still waited for at most `FENCE_READ_S`, and tells whether the pass
    may start the connectors waiting for their client id (not while whether the service holds the store is
    unknown)."""
    from raytwin import metrics
    from serve_apps import backend as backend_module
    from serve_apps.store_errors import UNAVAILABLE_REASONS

    exported: dict[str, float] = {}
    watch = threading.get_ident()  # the watch runs here: another test's backend left watching sets these gauges too

    def ours(record):
        return lambda *args, **kwargs: record(*args, **kwargs) if threading.get_ident() == watch else None

    monkeypatch.setattr(metrics, "STORE_UNAVAILABLE",
                        SimpleNamespace(set=ours(lambda value, reason: exported.__setitem__(reason, value))))
    fenced: list[int] = []
    monkeypatch.setattr(metrics, "STORE_FENCED", SimpleNamespace(set=ours(fenced.append)))
    monkeypatch.setattr(backend_module, "FENCE_READ_S", 0.2)
    store, mine, _ = _leased_backend(tmp_path)
    reads, thawed, read_lease = [], threading.Event(), store.read_lease

    def counted() -> object:
        reads.append(1)
        thawed.wait(30)  # a frozen endpoint until thawed
        return read_lease()

    monkeypatch.setattr(store, "read_lease", counted)
    backend, supervised = _watched_backend(store, mine), []
    backend.connector_ops = SimpleNamespace(supervise=lambda: supervised.append("pass"))
    thawed.set()
    backend._watch_stop = _Passes(1)
    backend._watch_store()
    assert len(reads) == 1, "one pass read the lease more than once"
    assert exported == dict.fromkeys(UNAVAILABLE_REASONS, 0.0) and fenced == [0, 0] and supervised == ["pass"]
    thawed.clear()
    backend._watch_stop = _Passes(1)
    backend._watch_store()  # hangs on the read: the pass ends at its deadline
    assert {r for r, v in exported.items() if v} == {"timeout"} and fenced == [0, 0, 0] and supervised == ["pass"]
    thawed.set()


def test_telemetry_validates_against_the_catalogs_type_without_reading_a_model_from_a_store_that_may_hang():
    """With an S3 store that hung, every telemetry request hung past its client's timeout in `model_of`: each
    read the asset's model from the registry (three store reads) before the shard's breaker could refuse it.
    Validation needs the asset's type only, which the catalog holds."""
    import threading

    from serve_apps.backend import Backend
    from serve_apps.twin_writes import TwinWrites

    zone = AssetType.from_model(THERMAL_RC)
    asset = Asset(tenant="acme", id="zone-1", type_name=zone.name, type_version=zone.version)

    class Registry:  # the store hangs (a read fails the test instead)
        def get(self, ref: str):
            raise AssertionError(f"{ref} read from the store")

    backend = Backend.__new__(Backend)
    backend._lock, backend._registries, backend._twin_writes = threading.Lock(), {"acme": Registry()}, TwinWrites()
    backend.moves = SimpleNamespace(try_settle=lambda tenant, asset_id: None)
    backend.catalog = SimpleNamespace(get_asset=lambda tenant, asset_id: asset,
                                      get_type=lambda tenant, name, version: zone)
    assert backend.type_of("acme", "zone-1") == zone


def test_the_backend_keeps_no_copy_of_a_model_that_retention_removed(tmp_path):
    """The backend kept each model it read until it restarted: a version that a prune (which runs in the Ingress
    replica's process) removed from the registry was still found there."""
    from raytwin.registry import ModelRegistry, RegistryError
    from serve_apps.backend import Backend

    zone = AssetType.from_model(THERMAL_RC)
    asset = Asset(tenant="acme", id="zone-1", type_name=zone.name, type_version=zone.version)
    ModelRegistry(str(tmp_path)).register(zone.name, zone.version, zone)
    backend = Backend.__new__(Backend)
    backend._registries = {"acme": ModelRegistry(str(tmp_path))}
    assert backend._artifact("acme", asset).ref == f"{zone.name}@{zone.version}"
    ModelRegistry(str(tmp_path)).remove(f"{zone.name}@{zone.version}")  # the prune route's registry
    with pytest.raises(RegistryError, match="no model"):
        backend._artifact("acme", asset)


def test_health_refuses_a_credential_that_holds_no_key_as_every_route_does(tmp_path):
    """Health answered `Authorization: Basic ...` (or `Bearer` alone, an empty X-API-Key) as an anonymous "ok",
    where every other route refused it with 401: a monitor sending a broken credential never learnt it."""
    from raytwin.statestore import Lease, StateStore
    from tests.fixtures_serve import in_process

    store = StateStore(str(tmp_path / "twins"))
    lease = Lease(owner="svc-a", epoch=1, shards=1, namespace="ns", acquired_at="2026-12-05T14:00:00+00:00",
                  acquired_by="host-a:1")
    store.write_lease(lease)
    with in_process(HealthBackend(store, lease), tmp_path) as (http, auth, _):
        key = auth["reader"]["Authorization"].removeprefix("Bearer ")
        for headers in ({"Authorization": "Basic cmVhZGVyOnMzY3JldA=="}, {"Authorization": "Digest username=x"},
                        {"Authorization": key}, {"Authorization": "Bearer"}, {"Authorization": ""},
                        {"X-API-Key": ""}, {"X-API-Key": "", "Authorization": f"Bearer {key}"}):
            health, assets = http.get("/v1/health", headers=headers), http.get("/v1/assets", headers=headers)
            assert health.status_code == assets.status_code == 401, (headers, health.text)
            assert health.json()["error"]["code"] == assets.json()["error"]["code"] == "unauthorized"
            assert health.json()["error"]["message"] == assets.json()["error"]["message"]  # the same problem
            assert "send `Authorization: Bearer <key>` or `X-API-Key: <key>`" in health.json()["error"]["message"]
            assert health.headers["www-authenticate"] == "Bearer"
            assert "cmVhZGVy" not in health.text and key not in health.text  # the credential is not repeated
        assert http.get("/v1/health").json() == {"status": "ok"}  # no credential at all: liveness, as before
        unknown = http.get("/v1/health", headers={"Authorization": "Bearer rtk_nope_nope"})
        assert unknown.status_code == 401 and "unknown API key" in unknown.text
        behind_a_proxy = http.get("/v1/health", headers={"X-API-Key": key, "Authorization": "Basic cHJveHk6eA=="})
        assert behind_a_proxy.json()["tenant"] == "acme"  # the key in X-API-Key is read first, as on every route


class LedgerConnectors:
    """`connectors.manager.Connectors`' command calls over a real command ledger: `approve` takes the approval and
    the claim, then sends (counted in `sent`) as a connector's actor does; with `dies` set, the process dies then."""

    def __init__(self, root: Path):
        from connectors.commands import CommandLedger

        self.ledger = CommandLedger(str(root / "store"))
        self.sent: list[str] = []
        self.dies: Exception | None = None

    def command(self, tenant: str, command_id: str):
        return self.ledger.get(tenant, command_id)

    def propose(self, tenant: str, connector: str, asset_id: str, name: str, value: dict, by: str,
                recommendation_id: str | None = None, command_id: str | None = None):
        return self.ledger.propose(tenant, connector, asset_id, name, value, by, recommendation_id, command_id)

    def refuse(self, tenant: str, command_id: str, by: str, reason: str):
        return self.ledger.refuse(tenant, command_id, by, reason)

    def approve(self, tenant: str, command_id: str, by: str):
        self.ledger.approve(tenant, command_id, by)
        command = self.ledger.claim(tenant, command_id, self.ledger.get(tenant, command_id).connector)
        self.sent.append(command.correlation_id)
        if self.dies is not None:
            raise self.dies
        return self.ledger.sent(command, ack_timeout_s=300.0)


class LedgerBackend:
    """The `Backend`'s connector operations (the real `ConnectorOps` calls) over `LedgerConnectors`."""

    def __init__(self, root: Path):
        from serve_apps.connector_ops import ConnectorOps

        self.connector_ops = ConnectorOps.__new__(ConnectorOps)  # without connectors to start
        self.connector_ops.connectors = self.connectors = LedgerConnectors(root)
        self.ledger, self.sent = self.connectors.ledger, self.connectors.sent

    def connector(self, op: str, *args: str) -> dict:
        from serve_apps.backend import Backend

        return Backend.connector(self, op, *args)

    def check_writable(self, fresh: bool = False) -> None:
        """This stand-in's store has no other service."""


def _approval_audit(svc, command_id: str, tenant: str) -> list[dict]:
    """What came of each approval attempt of `command_id`: a refusal's record, or the outcome of a sending's intent."""
    return [{"key_id": r.key_id, "role": r.role, **r.details} for r in svc.audit.records(tenant)
            if r.action == "command.approve" and r.target == command_id and r.phase != "intent"]


def test_every_approval_attempt_is_audited_refused_ones_too(tmp_path):
    """A writer's approval, refused by its role (403), left no audit record: only admins' attempts were kept."""
    from tests.fixtures_serve import in_process

    backend = LedgerBackend(tmp_path)
    with in_process(backend, tmp_path) as (http, auth, svc):
        key_ids = {name: svc.keys.authenticate(h["Authorization"].split()[1]).key_id for name, h in auth.items()}
        plain = backend.ledger.propose("acme", "web", "pump-1", "setpoint", {"q": 1.0}, key_ids["writer"]).id
        issued = backend.ledger.propose("acme", "web", "pump-1", "setpoint", {"recommendation": "r1"},
                                        key_ids["writer"]).id
        for name, command_id, status in (("reader", plain, 403), ("writer", plain, 403), ("admin", issued, 403),
                                         ("other", plain, 404), ("approver", plain, 200), ("admin", plain, 409)):
            answer = http.post(f"/v1/commands/{command_id}/approve", headers=auth[name])
            assert answer.status_code == status, (name, answer.text)
        assert backend.sent == [backend.ledger.get("acme", plain).correlation_id]
        by_key = {}
        for record in _approval_audit(svc, plain, "acme") + _approval_audit(svc, plain, "globex"):
            by_key.setdefault(record.pop("key_id"), []).append(record)
        forbidden = {"status": "refused", "http_status": 403, "code": "forbidden"}
        assert by_key[key_ids["writer"]] == [{"role": "writer", **forbidden,
                                              "reason": "role 'writer' may not do this (needs admin)"}]
        assert by_key[key_ids["reader"]] == [{"role": "reader", **forbidden,
                                              "reason": "role 'reader' may not do this (needs admin)"}]
        (other,) = by_key[key_ids["other"]]  # in its own tenant's log, as a missing command
        assert (other["status"], other["http_status"]) == ("refused", 404)
        sent, again = by_key[key_ids["approver"]] + by_key[key_ids["admin"]]
        assert sent["status"] == "sent" and sent["correlation_id"] == backend.sent[0]
        assert (again["status"], again["code"]) == ("refused", "conflict") and "only a proposed" in again["reason"]
        (grantless,) = _approval_audit(svc, issued, "acme")
        assert grantless["key_id"] == key_ids["admin"] and grantless["code"] == "forbidden"
        assert "'approver' grant" in grantless["reason"]


def test_a_command_whose_approval_cannot_be_audited_is_not_sent(tmp_path):
    """The approval was audited after the command was sent: a store failing then left a command sent to a device
    with no audit record. Now its intent is written first; where it cannot be, nothing is sent (503)."""
    from tests.fixtures_serve import in_process

    backend = LedgerBackend(tmp_path)
    with in_process(backend, tmp_path) as (http, auth, svc):
        command = backend.ledger.propose("acme", "web", "pump-1", "setpoint", {"q": 1.0}, "k-writer").id
        svc.audit.fs = AuditWrites(svc.audit.fs, ok=0)
        refused = http.post(f"/v1/commands/{command}/approve", headers=auth["approver"])
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable", refused.text
        assert backend.sent == [] and backend.ledger.get("acme", command).status == "proposed"
        said = refused.json()["error"]["message"]
        assert f"command.approve of {command} was not done: its audit record could not be written first" in said
        assert "disk is full" in said and "resending it is safe" in said


class TakenOverLedgerBackend(LedgerBackend):
    """`LedgerBackend` behind the real gate of its writes (`Backend.check_writable`) over a real store lease, which
    it holds until `take_over`."""

    store_fence, _fence_read, check_writable = Backend.store_fence, Backend._fence_read, Backend.check_writable

    def __init__(self, root: Path):
        from raytwin.statestore import Lease, StateStore
        from serve_apps.store_probe import BoundedRead

        super().__init__(root)
        self.leases = StateStore(str(root / "store" / "twins"))
        mine = Lease(owner="svc-a", epoch=1, shards=2, namespace="ns", acquired_at="2026-12-05T14:00:00+00:00",
                     acquired_by="host-a:1")
        self.leases.write_lease(mine)
        self.twins = SimpleNamespace(lease=mine)
        self._lease_reads = BoundedRead(self.leases.read_lease, "the store's lease")
        self._fence, self._fence_checked = None, -math.inf
        self.held: list[str] = []
        self.connector_ops.hold = self.held.append  # (no connector to hold)

    def take_over(self) -> None:
        """A successor takes the store's lease over right after this backend's fence check found it holding it: the
        check keeps that verdict for `FENCE_CHECK_S` (here for good, however slow this machine)."""
        from dataclasses import replace

        self.check_writable()
        self._fence_checked = time.monotonic() + 3600
        self.leases.write_lease(replace(self.twins.lease, owner="svc-b", epoch=2, acquired_by="host-b:7"))


def test_a_backend_taken_over_within_its_fence_checks_second_decides_no_command_and_moves_no_model_version(tmp_path):
    """`check_writable` keeps its verdict for a second: a backend whose store another service took over within it
    approved (and sent) or refused a command its successor may have decided already, and recorded a model's
    transition beside the successor's. Each of those reads the store's lease now: 503 `store_fenced`, and the commands
    stay proposed, nothing is sent, the lifecycle log is as it was."""
    from raytwin.lifecycle import ModelLifecycle
    from raytwin.registry import ModelRegistry
    from tests.fixtures_serve import in_process

    backend = TakenOverLedgerBackend(tmp_path)
    with in_process(backend, tmp_path) as (http, auth, _):
        approved, refused = (backend.ledger.propose("acme", "web", "pump-1", "setpoint", {"q": q}, "k-writer").id
                             for q in (1.0, 2.0))
        lifecycle = ModelLifecycle(ModelRegistry(str(tmp_path / "store" / "registry" / "acme")))
        lifecycle.registry.register("thermal_rc", "1.0.0", AssetType.from_model(THERMAL_RC))
        versions = "/v1/models/thermal_rc/versions/1.0.0/transitions"
        submitted = http.post(versions, headers=auth["writer"], json={"to": "candidate", "reason": "fits"})
        assert submitted.status_code == 201, submitted.text
        backend.take_over()
        for answer in (http.post(f"/v1/commands/{approved}/approve", headers=auth["approver"]),
                       http.post(f"/v1/commands/{refused}/refuse", headers=auth["admin"], json={"reason": "not now"}),
                       http.post(versions, headers=auth["writer"], json={"to": "staging", "reason": "checked"})):
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "store_fenced", answer.text
            assert "service svc-b (epoch 2) took the store over" in answer.json()["error"]["message"]
        assert [backend.ledger.get("acme", c).status for c in (approved, refused)] == ["proposed", "proposed"]
        assert backend.sent == [] and [r.action for r in lifecycle.records("thermal_rc")] == ["submit"]


def test_a_sent_command_whose_outcome_is_not_audited_shows_as_an_intent_without_outcome(tmp_path, monkeypatch):
    """The outcome's record failing after the send: the intent written before it says what was sent, and the audit
    log's readers (`GET /v1/audit`, `raytwin audit`) answer it `outcome_missing`; a completed action is not."""
    import typer

    from client import audit_cli
    from tests.fixtures_serve import in_process

    backend = LedgerBackend(tmp_path)
    with in_process(backend, tmp_path) as (http, auth, svc):
        first, second = (backend.ledger.propose("acme", "web", "pump-1", "setpoint", {"q": q}, "k-writer").id
                         for q in (1.0, 2.0))
        store = svc.audit.fs
        assert http.post(f"/v1/commands/{first}/approve", headers=auth["approver"]).status_code == 200
        svc.audit.fs = AuditWrites(store, ok=1)  # the intent, not the outcome
        sent = http.post(f"/v1/commands/{second}/approve", headers=auth["approver"])
        assert sent.status_code == 200 and sent.json()["status"] == "sent", sent.text  # it took place: it stands
        svc.audit.fs = store
        records = http.get("/v1/audit", headers=auth["admin"]).json()
        steps = [(r["target"], r["phase"], r.get("outcome_missing")) for r in records]
        assert steps == [(first, "intent", False), (first, "outcome", None), (second, "intent", True)]
        intent = records[-1]
        assert intent["details"] == {"connector": "web", "asset_id": "pump-1", "name": "setpoint",
                                     "value": {"q": 2.0}, "correlation_id": sent.json()["correlation_id"]}
        assert records[0]["action_id"] == records[1]["action_id"] != intent["action_id"]
        assert records[1]["details"] == {**records[0]["details"], "status": "sent", "correlation_id": backend.sent[0]}

    answered = [AuditRecord.model_validate(r) for r in records]  # as the client reads the answer
    monkeypatch.setattr(audit_cli, "remote", lambda url, key: nullcontext(SimpleNamespace(
        audit=lambda day, limit: answered)))
    app = typer.Typer()
    app.command()(audit_cli.audit)
    printed = CliRunner().invoke(app, ["--key", "k", "--url", "http://api"], catch_exceptions=False)
    lines = printed.stdout.splitlines()
    assert [AuditRecord.model_validate_json(line) for line in lines] == answered
    assert ('"outcome_missing":false' in lines[0] and '"outcome_missing"' not in lines[1]
            and '"outcome_missing":true' in lines[2])
    assert f"warning: command.approve of {second} at " in printed.stderr and "result is unknown" in printed.stderr
    assert printed.stderr.count("warning") == 1


def test_no_connector_is_started_paused_resumed_or_deleted_unaudited(tmp_path):
    """Connector changes (a device connection opened or closed) were audited after they took place, as commands
    were: where the store cannot take the intent, the backend is not asked."""
    from tests.fixtures_serve import in_process

    backend = SimpleNamespace(ops=[])
    backend.connector = lambda op, *args: backend.ops.append(op)
    with in_process(backend, tmp_path) as (http, auth, svc):
        admin = auth["admin"]
        unnamed = http.post("/v1/connectors", json={"spec": {"kind": "mqtt"}}, headers=admin)
        assert unnamed.status_code == 422 and "spec.name: None is no connector name" in unnamed.text
        svc.audit.fs = AuditWrites(svc.audit.fs, ok=0)
        answers = [http.post("/v1/connectors", json={"spec": {"name": "plant", "kind": "mqtt"}}, headers=admin),
                   *(http.post(f"/v1/connectors/plant/{op}", headers=admin) for op in ("pause", "resume")),
                   http.delete("/v1/connectors/plant", headers=admin)]
        assert [a.status_code for a in answers] == [503] * 4, answers[0].text
        assert [a.json()["error"]["message"].split(" was not done")[0] for a in answers] == [
            f"connector.{op} of plant" for op in ("create", "pause", "resume", "delete")]
        assert backend.ops == []


class _AssetCatalog:
    """The catalog and twin writes of the asset routes: `acted` lists each call that created, changed or deleted an
    asset (and so started, retyped or stopped its twin), migrated it or cleared its drift alarm."""

    def __init__(self):
        self.acted: list[tuple[str, str]] = []
        self.revision = 0

    def _act(self, op: str, asset_id: str) -> int:
        self.acted.append((op, asset_id))
        self.revision += 1
        return self.revision

    def create_asset(self, asset: Asset, initial_state, pre) -> int:
        if any(done == ("create", asset.id) for done in self.acted):
            raise Conflict(f"asset {asset.id} already exists")
        return self._act("create", asset.id)

    def update_asset(self, asset: Asset, pre) -> int:
        return self._act("update", asset.id)

    def delete_asset(self, tenant: str, asset_id: str, pre) -> None:
        self._act("delete", asset_id)

    def evolution(self, op: str, tenant: str, asset_id: str, *args):
        self._act(op, asset_id)

    def clear_drift(self, tenant: str, asset_id: str) -> None:
        self._act("clear_drift", asset_id)


ASSET_ACTIONS = [  # (method, path, body, headers, what is audited: action of target)
    ("POST", "/v1/assets", {"id": "pump-2", "type_name": "pump", "type_version": "1.0.0",
                            "initial_state": {"q": 1.0}}, {}, "asset.create of pump-2"),
    ("PUT", "/v1/assets/pump-3", {"type_name": "pump", "type_version": "1.0.0"}, {"If-None-Match": "*"},
     "asset.create of pump-3"),
    ("PUT", "/v1/assets/pump-1", {"type_name": "pump", "type_version": "1.0.0"}, {}, "asset.update of pump-1"),
    ("DELETE", "/v1/assets/pump-1", None, {}, "asset.delete of pump-1"),
    ("POST", "/v1/assets/pump-1/migrate", {"type_version": "2.0.0"}, {}, "asset.migrate of pump-1"),
    ("POST", "/v1/assets/pump-1/drift/clear", {"reason": "re-seated"}, {}, "twin.drift_clear of pump-1"),
]


def test_no_asset_is_created_changed_deleted_migrated_or_cleared_unaudited(tmp_path):
    """Asset writes (which start, retype and stop the asset's twin) were audited after they took place, as commands
    were: a store failing in between left an asset created or deleted with no audit record. Where the store cannot
    take the intent, the backend is not asked: 503, nothing done."""
    from tests.fixtures_serve import in_process

    backend = _AssetCatalog()
    with in_process(backend, tmp_path) as (http, auth, svc):
        svc.audit.fs = AuditWrites(svc.audit.fs, ok=0)
        for method, path, body, headers, audited in ASSET_ACTIONS:
            answer = http.request(method, path, json=body, headers={**auth["admin"], **headers})
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "store_unavailable", answer.text
            assert f"{audited} was not done" in answer.json()["error"]["message"]
        assert backend.acted == []


def test_asset_writes_are_audited_as_intent_and_outcome_refused_ones_too(tmp_path):
    """Each asset write leaves its intent (what is attempted: the asset, its initial state) and its outcome (the
    same, `status` done); one the catalog refuses (409) leaves its refused outcome in the caller's log."""
    from tests.fixtures_serve import in_process

    backend = _AssetCatalog()
    create, update, delete = ASSET_ACTIONS[0], ASSET_ACTIONS[2], ASSET_ACTIONS[3]
    with in_process(backend, tmp_path) as (http, auth, svc):
        answers = [http.request(method, path, json=body, headers={**auth["admin"], **headers})
                   for method, path, body, headers, _ in (create, update, delete, create)]  # the 2nd create: 409
        assert [a.status_code for a in answers] == [201, 200, 204, 409], answers[-1].text
        records = svc.audit.records("acme")
    asset = Asset(id="pump-2", tenant="acme", type_name="pump", type_version="1.0.0").model_dump(mode="json")
    assert [(r.action, r.target, r.phase, r.details.get("status")) for r in records] == [
        ("asset.create", "pump-2", "intent", None), ("asset.create", "pump-2", "outcome", "done"),
        ("asset.update", "pump-1", "intent", None), ("asset.update", "pump-1", "outcome", "done"),
        ("asset.delete", "pump-1", "intent", None), ("asset.delete", "pump-1", "outcome", "done"),
        ("asset.create", "pump-2", "intent", None), ("asset.create", "pump-2", "outcome", "refused")]
    assert records[0].details == {"asset": asset, "initial_state": {"q": 1.0}}
    assert records[1].details == {**records[0].details, "status": "done"}
    assert records[2].details == {"asset": {**asset, "id": "pump-1"}} and records[5].details == {"status": "done"}
    assert records[7].details["http_status"] == 409 and records[7].details["reason"] == "asset pump-2 already exists"
    assert all(r.action_id == o.action_id for r, o in zip(records[::2], records[1::2]))
    assert backend.acted == [("create", "pump-2"), ("update", "pump-1"), ("delete", "pump-1")]


def test_a_bulk_jobs_items_are_audited_before_they_act_and_one_the_store_cannot_audit_is_not_done(tmp_path):
    """A bulk job's deletes and tags (run in the backend, one asset at a time) were audited after each change: a
    store failing in between left twins stopped with no audit record. Each item now writes its intent first; where
    the store cannot take it, that item fails, nothing done, and the job goes on."""
    from serve_apps.audit import AuditLog
    from serve_apps.bulk import BulkWork, Caller
    from serve_apps.query_schemas import BulkRequest

    class Catalog(_AssetCatalog):
        def get_asset_revision(self, tenant: str, asset_id: str) -> tuple[Asset, int]:
            return Asset(id=asset_id, tenant=tenant, type_name="pump", type_version="1.0.0"), 7

    audit, backend = AuditLog(str(tmp_path / "store")), Catalog()
    caller = Caller(tenant="acme", key_id="k-admin", role="admin", request_id="r1")
    work = BulkWork(caller, BulkRequest(q="site = 'north'", action="delete"), ["pump-1", "pump-2"], backend, audit,
                    job_id="j1")
    audit.fs = AuditWrites(audit.fs, ok=2)  # pump-1's intent and outcome, then none
    items = [work.apply(a) for a in ("pump-1", "pump-2")]
    assert [i.outcome for i in items] == ["changed", "failed"]
    assert items[1].error.startswith("store_unavailable: asset.delete of pump-2 was not done")
    assert backend.acted == [("delete", "pump-1")]
    audit.fs = audit.fs.fs
    tag = BulkWork(caller, BulkRequest(q="", action="tag", set={"zone": "b"}), ["pump-3"], backend, audit, job_id="j2")
    assert tag.apply("pump-3").outcome == "changed"
    records = audit.records("acme")
    assert [(r.action, r.target, r.phase, r.details.get("status")) for r in records] == [
        ("asset.delete", "pump-1", "intent", None), ("asset.delete", "pump-1", "outcome", "done"),
        ("asset.update", "pump-3", "intent", None), ("asset.update", "pump-3", "outcome", "done")]
    assert records[0].details == {"bulk": {"job_id": "j1", "action": "delete", "q": "site = 'north'"}}
    assert records[2].details["asset"]["metadata"] == {"zone": "b"} and records[2].details["bulk"]["job_id"] == "j2"
    assert records[0].action_id == records[1].action_id != records[2].action_id == records[3].action_id


class _StoreActs(LedgerBackend):
    """The backend calls of the routes whose acts are records in the store (and a real command ledger): `acted` lists
    each type published, deprecated, undeprecated or deleted and each bulk job queued."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.acted: list[tuple[str, str]] = []

    def put_type(self, tenant: str, asset_type: AssetType, pre, published_by: str) -> tuple[bool, int]:
        self.acted.append(("put_type", asset_type.key))
        return True, 1

    def delete_type(self, tenant: str, name: str, version: str, pre) -> None:
        self.acted.append(("delete_type", f"{name}@{version}"))

    def evolution(self, op: str, tenant: str, name: str, version: str, *args) -> None:
        self.acted.append((op, f"{name}@{version}"))

    def list_types(self, tenant: str, name: str | None) -> list[AssetType]:
        return [AssetType.from_model(THERMAL_RC)]

    def list_assets(self, tenant: str, *filters) -> list[Asset]:
        return []

    def submit_bulk(self, caller, request, asset_ids: list[str], job_id: str):
        self.acted.append(("submit_bulk", job_id))
        return SimpleNamespace(job_id=job_id, state="queued")


def _store_actions(proposed: str) -> list[tuple[str, str, dict | None, str, str]]:
    """(method, path, body, key, what is audited: action of target) of each route that acts on the store only."""
    return [
        ("POST", "/v1/asset-types", AssetType.from_model(THERMAL_RC).model_dump(mode="json"), "admin",
         "asset_type.create of thermal_rc@1.0.0"),
        ("PUT", "/v1/asset-types/thermal_rc/1.0.0/deprecation", {"deprecated_at": "2026-01-01T00:00:00Z"}, "admin",
         "asset_type.deprecate of thermal_rc@1.0.0"),
        ("DELETE", "/v1/asset-types/thermal_rc/1.0.0/deprecation", None, "admin",
         "asset_type.undeprecate of thermal_rc@1.0.0"),
        ("DELETE", "/v1/asset-types/thermal_rc/1.0.0", None, "admin", "asset_type.delete of thermal_rc@1.0.0"),
        ("POST", "/v1/commands", {"connector": "web", "asset_id": "pump-1", "name": "setpoint", "value": {"q": 1.0}},
         "writer", "command.propose of "),
        ("POST", f"/v1/commands/{proposed}/refuse", {"reason": "not now"}, "admin", f"command.refuse of {proposed}"),
        ("POST", "/v1/bulk", {"q": "", "action": "tag", "set": {"zone": "b"}}, "writer", "bulk.submit of "),
        ("PUT", "/v1/recalibration-policies/thermal_rc", {"free": ["R_io"], "noise_std": {"T_in": 0.05}}, "admin",
         "recalibration_policy.update of thermal_rc"),
        ("POST", "/v1/models/thermal_rc/versions/1.0.3/transitions", {"to": "staging", "reason": "checked"}, "writer",
         "model.stage of thermal_rc@1.0.3"),
        ("POST", "/v1/models/thermal_rc/rollback", {"reason": "1.0.2 drifts"}, "approver",
         "model.rollback of thermal_rc"),
        ("PUT", "/v1/lifecycle-policy", {"keep_archived": 0}, "admin", "lifecycle_policy.update of acme"),
        ("POST", "/v1/models/thermal_rc/prune", None, "admin", "model.prune of thermal_rc"),
    ]


def test_no_act_on_the_store_is_done_unaudited_and_each_leaves_its_intent_and_outcome(tmp_path, monkeypatch):
    """Acts on the store alone (types, commands proposed or refused, bulk jobs queued, policies, model transitions,
    rollbacks, prunes) were audited after they took place: a store failing in between left them with no record.
    Where the store cannot take the intent, nothing is done (503); a done act leaves its intent and its outcome."""
    from raytwin.lifecycle import Actor, ModelLifecycle
    from raytwin.recalibration import PolicyStore
    from raytwin.registry import ModelRegistry
    from serve_apps import routes_query, routes_shadow
    from tests.fixtures_serve import in_process

    registry = ModelRegistry(str(tmp_path / "store" / "registry" / "acme"))
    lc = ModelLifecycle(registry)
    author, approver = Actor(id="calibrator", tenant="acme"), Actor(id="ops", tenant="acme", roles={"approver"})
    for version in ("1.0.1", "1.0.2", "1.0.3"):
        registry.register("thermal_rc", version, AssetType.from_model(THERMAL_RC))
        lc.submit(f"thermal_rc@{version}", author, "fitted")
    for version in ("1.0.1", "1.0.2"):
        lc.transition(f"thermal_rc@{version}", "staging", author, "checked")
        lc.transition(f"thermal_rc@{version}", "production", approver, "approved")
    logged = lc.records("thermal_rc")
    monkeypatch.setattr(routes_query, "_matching", lambda *args: _matched(SimpleNamespace(id="pump-1")))
    no_twins = SimpleNamespace(swap_marks=lambda *args, **kwargs: {})  # the rollback's swap: none behind (no Ray)
    monkeypatch.setattr(routes_shadow, "live_models", lambda svc: no_twins)
    backend = _StoreActs(tmp_path)
    proposed = backend.ledger.propose("acme", "web", "pump-1", "setpoint", {"q": 2.0}, "k-writer").id
    actions = _store_actions(proposed)
    with in_process(backend, tmp_path) as (http, auth, svc):
        store, svc.audit.fs = svc.audit.fs, AuditWrites(svc.audit.fs, ok=0)
        for method, path, body, key, audited in actions:
            answer = http.request(method, path, json=body, headers=auth[key])
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "store_unavailable", answer.text
            assert answer.json()["error"]["message"].startswith(f"{audited}"), answer.text
            assert " was not done: its audit record could not be written first" in answer.json()["error"]["message"]
        svc.audit.fs = store
        assert backend.acted == [] and lc.records("thermal_rc") == logged and svc.audit.records("acme") == []
        assert [(c.id, c.status.value) for c in backend.ledger.list("acme")] == [(proposed, "proposed")]
        policies = PolicyStore(svc.config.url("recalibration", "policies"))
        assert policies.get("acme", "thermal_rc") is None and lc.policy("acme").keep_archived == 5

        answers = [http.request(method, path, json=body, headers=auth[key]) for method, path, body, key, _ in actions]
        assert [a.status_code for a in answers] == [201, 200, 204, 204, 201, 200, 202, 200, 201, 201, 200, 200], [
            a.text for a in answers if a.status_code >= 300]
        records = [r for r in svc.audit.records("acme") if r.action != "model.swap"]  # the rollback's swap
    assert [f"{r.action} of {r.target}" for r in records[::2]] == [
        audited + {"command.propose of ": answers[4].json()["id"], "bulk.submit of ": answers[6].json()["job_id"]}.get(
            audited, "") for *_, audited in actions]
    assert [r.phase for r in records] == ["intent", "outcome"] * len(actions)
    assert all(i.action_id == o.action_id and i.target == o.target for i, o in zip(records[::2], records[1::2]))
    assert {o.details["status"] for o in records[1::2]} == {"done"}
    outcomes = {r.action: r.details for r in records[1::2]}
    assert outcomes["command.propose"]["correlation_id"] == answers[4].json()["correlation_id"]
    assert outcomes["model.rollback"]["version"] == "1.0.1" and outcomes["model.rollback"]["seq"] == len(logged) + 1
    assert outcomes["model.prune"]["removed"] == [{"version": "1.0.2", "seq": len(logged) + 2,
                                                   "hash": lc.records("thermal_rc")[-1].hash}]


async def _matched(*records):
    """What the query routes' `_matching` answers: the live records the query matched."""
    return list(records)


def test_audit_logs_written_before_intents_read_as_before_and_one_step_records_keep_their_form(tmp_path):
    """Stored logs hold records with no phase; a record of one step is still stored (and answered) without the phase
    fields, so a reader whose model forbids fields it does not know (an older client) reads it."""
    log = AuditLog(str(tmp_path))
    old = {"action": "asset.delete", "client_request_id": None, "details": {}, "key_id": "k", "request_id": "r",
           "role": "admin", "target": "a1", "tenant": "acme", "time": "2026-12-01T10:00:00Z"}
    folder = tmp_path / "audit" / "acme" / "2026-12-01"
    folder.mkdir(parents=True)
    (folder / f"20261201T100000.000000Z-{'ab' * 16}.jsonl").write_text(json.dumps(old) + "\n")
    log.append(AuditRecord.model_validate({**old, "time": "2026-12-01T11:00:00Z", "target": "a2"}))
    read = log.records("acme")
    assert [(r.target, r.phase, r.action_id, r.outcome_missing) for r in read] == [("a1", None, None, None),
                                                                                    ("a2", None, None, None)]
    (new,) = [p for p in folder.iterdir() if "T110000" in p.name]
    assert set(json.loads(new.read_text())) == set(old) == set(read[1].as_json())


def test_one_persons_two_keys_are_one_pair_of_eyes_for_commands_and_model_versions(tmp_path):
    """Four eyes compared key ids: one person holding two keys (a key and its successor while it is rotated, as the
    rotation procedure has it) approved their own command and promoted their own candidate with the second key; and
    a key given an owner later is still refused for what it did under its key id (it approved and sent its own)."""
    from raytwin.registry import PUBLISHED_BY, ModelRegistry
    from tests.fixtures_serve import in_process

    backend = LedgerBackend(tmp_path)
    with in_process(backend, tmp_path) as (http, auth, _):
        keys = tmp_path / "keys.json"
        alice = {name: {"Authorization": f"Bearer {create_key(keys, 'acme', role, grants, owner='alice')[1]}"}
                 for name, role, grants in (("writer", "writer", ()), ("approver", "admin", ("approver",)))}
        bobs, bob_key = _ownerless_key(keys, "acme", "admin", ("approver",))  # no owner yet: its key id acts
        bob = {"Authorization": f"Bearer {bob_key}"}
        command = {"connector": "web", "asset_id": "pump-1", "name": "setpoint", "value": {"q": 1.0}}
        proposed, earlier = (http.post("/v1/commands", headers=h, json=command).json() for h in (alice["writer"], bob))
        assert (proposed["proposed_by"], earlier["proposed_by"]) == ("alice", bobs.key_id)
        own = http.post(f"/v1/commands/{proposed['id']}/approve", headers=alice["approver"])
        assert own.status_code == 409 and "another person must approve it (four eyes)" in own.text, own.text

        ModelRegistry(str(tmp_path / "store" / "registry" / "acme")).register(  # as bob's POST /v1/asset-types
            "thermal_rc", "1.0.0", AssetType.from_model(THERMAL_RC), metadata={PUBLISHED_BY: bobs.key_id})
        versions = "/v1/models/thermal_rc/versions/1.0.0/transitions"
        for stage in ("candidate", "staging"):
            moved = http.post(versions, headers=alice["writer"], json={"to": stage, "reason": "fits better"})
            assert moved.status_code == 201 and moved.json()["actor"] == "alice", moved.text
        promoted = http.post(versions, headers=alice["approver"], json={"to": "production", "reason": "mine"})
        assert promoted.status_code == 403, promoted.text
        assert "alice is the author of thermal_rc@1.0.0 and may not approve it" in promoted.json()["error"]["message"]
        # and one approver alone switching four eyes off is still no second pair of eyes for its own version
        for on in (True, False):
            policy = http.put("/v1/lifecycle-policy", headers=alice["approver"], json={"auto_promote": on})
            assert policy.status_code == 200, policy.text
            if on:
                promoted = http.post(versions, headers=alice["approver"], json={"to": "production", "reason": "auto"})
                assert promoted.status_code == 403, promoted.text
                assert "the tenant's automatic promotion was set by " in promoted.json()["error"]["message"]

        set_key_owner(keys, bobs.key_id, "bob")  # its holder named: what it did is bob's, refused to bob's keys
        os.utime(keys, (1, 1))  # a new modification time, whatever the clock's resolution
        own = http.post(f"/v1/commands/{earlier['id']}/approve", headers=bob)
        assert own.status_code == 409 and "proposed by bob: another person must approve" in own.text, own.text
        promoted = http.post(versions, headers=bob, json={"to": "production", "reason": "mine"})
        assert promoted.status_code == 403 and "bob is the publisher" in promoted.text, promoted.text
        assert backend.sent == []


def test_a_key_without_an_owner_approves_nothing_and_what_it_proposed_no_key_approves(tmp_path):
    """Four eyes held only for keys given an owner: each key stored without one counted as a person, so one person
    holding two (a key and its successor while it is rotated) proposed with one and approved with the other. Such a
    key now approves nothing (403 saying how to give it an owner), and what it proposed or submitted no key
    approves, until the keys file names its owner."""
    from raytwin.registry import ModelRegistry
    from tests.fixtures_serve import in_process

    backend = LedgerBackend(tmp_path)
    with in_process(backend, tmp_path) as (http, auth, _):
        keys = tmp_path / "keys.json"
        old, old_key = _ownerless_key(keys, "acme", "admin", ("approver",))  # stored before owners were needed
        ownerless = {"Authorization": f"Bearer {old_key}"}
        successor = {"Authorization": f"Bearer {create_key(keys, 'acme', 'admin', ('approver',), owner='dave')[1]}"}
        command = {"connector": "web", "asset_id": "pump-1", "name": "setpoint", "value": {"q": 1.0}}
        by_old, by_writer = (http.post("/v1/commands", headers=h, json=command).json()
                             for h in (ownerless, auth["writer"]))
        refused = http.post(f"/v1/commands/{by_writer['id']}/approve", headers=ownerless)
        assert refused.status_code == 403, refused.text
        message = refused.json()["error"]["message"]
        assert f"key {old.key_id} has no owner, so it may not approve a command" in message
        assert f"raytwin keys set-owner {old.key_id} --owner PERSON" in message
        own = http.post(f"/v1/commands/{by_old['id']}/approve", headers=successor)  # dave's two keys
        assert own.status_code == 409 and f"proposed by key {old.key_id}, which has no owner" in own.text, own.text
        assert backend.sent == []
        assert http.post(f"/v1/commands/{by_writer['id']}/approve", headers=successor).status_code == 200

        ModelRegistry(str(tmp_path / "store" / "registry" / "acme")).register(
            "thermal_rc", "1.0.0", AssetType.from_model(THERMAL_RC))
        versions = "/v1/models/thermal_rc/versions/1.0.0/transitions"
        for stage in ("candidate", "staging"):  # submitted by the key without an owner
            assert http.post(versions, headers=ownerless, json={"to": stage, "reason": "fits"}).status_code == 201
        promoted = http.post(versions, headers=ownerless, json={"to": "production", "reason": "fits"})
        assert promoted.status_code == 403, promoted.text
        assert f"key {old.key_id} has the approver grant but no owner" in promoted.json()["error"]["message"]
        promoted = http.post(versions, headers=successor, json={"to": "production", "reason": "mine, unseen"})
        assert promoted.status_code == 403, promoted.text
        assert promoted.json()["error"]["message"].startswith(
            "an API key without an owner is the author of thermal_rc@1.0.0: its holder cannot be told apart from dave")
        set_key_owner(keys, old.key_id, "dave")  # its holder named: the old key's work is dave's
        os.utime(keys, (1, 1))
        promoted = http.post(versions, headers=successor, json={"to": "production", "reason": "mine"})
        assert promoted.status_code == 403 and "dave is the author of thermal_rc@1.0.0" in promoted.text, promoted.text


def test_keys_create_refuses_a_key_whose_acts_four_eyes_compares_without_an_owner(tmp_path):
    """`raytwin keys create` made writer, admin and approver keys without an owner, each a person to four eyes."""
    keys = tmp_path / "keys.json"
    for role, grants in (("writer", []), ("admin", []), ("reader", ["--grant", "approver"])):
        refused = CliRunner().invoke(keys_app, ["create", "--tenant", "acme", "--role", role, *grants,
                                                "--keys-file", str(keys)])
        said = " ".join(refused.output.replace("│", " ").split())  # the message as one line, without its box
        assert refused.exit_code == 2 and f"Invalid value for --owner: a {role} key" in said, said
        assert "needs an owner, the person who holds it" in said, said
    assert not keys.exists()
    reader = CliRunner().invoke(keys_app, ["create", "--tenant", "acme", "--role", "reader", "--keys-file", str(keys)])
    assert reader.exit_code == 0, reader.output  # a reader's acts are compared by no rule


def test_create_key_refuses_as_the_cli_does_a_key_without_the_owner_four_eyes_needs(tmp_path):
    """`serve_apps.auth.create_key` (the Python API under `raytwin keys create`) made writer, admin and granted keys
    without an owner, which the CLI refused: each a person of its own to four eyes."""
    from serve_apps.auth import KeyChangeRefused

    keys = tmp_path / "keys.json"
    for role, grants in (("writer", ()), ("admin", ()), ("reader", ("approver",))):
        with pytest.raises(KeyChangeRefused, match=f"a {role} key.* needs an owner, the person who holds it"):
            create_key(keys, "acme", role, grants)
    with pytest.raises(ValidationError, match="owner"):
        create_key(keys, "acme", "admin", owner="alice smith")
    with pytest.raises(TypeError):
        create_key(keys, "acme", "admin", (), "alice")  # keyword only: a positional string is no grant or owner
    assert not keys.exists()
    assert create_key(keys, "acme", "admin", owner="alice")[0].owner == "alice"
    assert create_key(keys, "acme", "reader")[0].owner is None  # a reader's acts are compared by no rule


def test_keys_set_owner_names_the_holder_of_a_key_without_one_and_changes_no_owner(tmp_path):
    """A key stored without an owner approves nothing, and its holder could only be named by editing the keys file by
    hand, unaudited. `raytwin keys set-owner` names it, audited; it never moves a key from one owner to another
    (that would let the first owner's other keys approve their own work in flight), nor touches a revoked key."""
    keys = tmp_path / "keys.json"
    old, old_key = _ownerless_key(keys, "acme", "admin", ("approver",))
    store = KeyStore(keys)
    assert store.authenticate(old_key).owner is None

    def set_owner(key_id: str, owner: str) -> tuple[int, str]:
        out = CliRunner().invoke(keys_app, ["set-owner", key_id, "--owner", owner, "--keys-file", str(keys)])
        return out.exit_code, " ".join(out.output.replace("│", " ").split())

    assert set_owner(old.key_id, "alice smith")[0] == 2  # no identifier: refused, nothing written
    assert set_owner(old.key_id, "dave") == (0, f"key {old.key_id} (acme admin) is held by dave")
    os.utime(keys, (1, 1))  # a new modification time, whatever the clock's resolution
    assert store.authenticate(old_key).owner == "dave" and store.owner(old.key_id) == "dave"
    (trail,) = [json.loads(line) for line in key_audit_trail(keys).read_text().splitlines()]
    assert (trail["action"], trail["key_id"], trail["details"]["owner"]) == ("key.set_owner", old.key_id, "dave")
    assert trail["details"]["grants"] == ["approver"] and "@" in trail["details"]["by"]

    before = keys.read_bytes()
    code, said = set_owner(old.key_id, "mallory")
    assert code == 2 and f"key {old.key_id} is held by dave already and an owner is never changed" in said, said
    assert f"raytwin keys revoke {old.key_id}" in said and keys.read_bytes() == before
    code, said = set_owner("0123456789ab", "dave")
    assert code == 2 and "no key '0123456789ab'" in said and "raytwin keys list" in said, said
    revoked, _ = _ownerless_key(keys, "acme", "writer")
    revoke_key(keys, revoked.key_id)
    before = keys.read_bytes()
    code, said = set_owner(revoked.key_id, "dave")
    assert code == 2 and f"key {revoked.key_id} is revoked: it keeps the owner it had (none)" in said, said
    assert keys.read_bytes() == before and store.owner(revoked.key_id) is None
    assert [json.loads(line)["action"] for line in key_audit_trail(keys).read_text().splitlines()] == [
        "key.set_owner", "key.revoke"]  # refusals change nothing and record nothing


def _ownerless_key(path: Path, tenant: str, role: str, grants: tuple[str, ...] = ()) -> tuple[KeyRecord, str]:
    """A key as stored before `create_key` needed an owner for it (a writer, an admin, a grant): without one."""
    key_id = secrets.token_hex(6)
    key = f"rtk_{key_id}_{secrets.token_urlsafe(32)}"
    record = KeyRecord(key_id=key_id, sha256=digest(key), tenant=tenant, role=role, grants=grants)
    _write_keys(path, load_keys(path) + [record])
    return record, key


def test_a_revoked_key_keeps_its_owner_and_authenticates_no_more(tmp_path):
    """F14: revoking removed a key's record and its owner with it, so who held it could not be told (a recommendation
    it computed was nobody's). It is kept now, without its digest."""
    path = tmp_path / "keys.json"
    first, first_key = create_key(path, "acme", "writer", owner="carol")
    store = KeyStore(path)
    revoke_key(path, first.key_id)
    assert store.authenticate(first_key) is None and not store.has_key_id(first.key_id)
    assert store.owner(first.key_id) == "carol" and first.sha256 not in path.read_text()
    listed = CliRunner().invoke(keys_app, ["list", "--keys-file", str(path)]).output
    assert listed.startswith(f"{first.key_id}\tacme\twriter\t-\tcarol\trevoked 20"), listed
    with pytest.raises(KeyError, match=f"key {first.key_id} was revoked already, at 20.*nothing was changed"):
        revoke_key(path, first.key_id)  # not "no key": `raytwin keys list` lists it, marked revoked


def test_a_key_revoked_while_another_is_created_stays_revoked(tmp_path, monkeypatch):
    """`raytwin keys create` read the keys file, and a `raytwin keys revoke` that finished before it wrote was undone:
    the create wrote the key list it had read, the revoked key's digest in it, and the key authenticated again. A
    change now holds the file's lock from its read to its write."""
    import serve_apps.auth as auth

    path = tmp_path / "keys.json"
    victim, victim_key = create_key(path, "acme", "writer", owner="carol")
    read, go = threading.Event(), threading.Event()

    def slow_read(p):  # the creating thread's read, held until the revoke had its chance
        entries = load_keys(p)
        if threading.current_thread().name == "create":
            read.set()
            go.wait(5)
        return entries

    monkeypatch.setattr(auth, "load_keys", slow_read)
    create = threading.Thread(target=create_key, args=(path, "acme", "reader"), name="create")
    create.start()
    assert read.wait(5)
    revoke = threading.Thread(target=revoke_key, args=(path, victim.key_id))
    revoke.start()
    revoke.join(0.5)  # done by now unless the create's lock holds it
    go.set()
    create.join(5)
    revoke.join(5)
    assert KeyStore(path).authenticate(victim_key) is None and len(load_keys(path)) == 2  # and the created key


def test_a_key_change_the_audit_trail_does_not_take_is_not_made(tmp_path, monkeypatch):
    """The keys file was written first and the trail after: a trail that took no record (a full disk, a file its user
    may not write) left a key created, revoked or given an owner with no record of it. The record comes first now."""
    import serve_apps.auth as auth

    path = tmp_path / "keys.json"
    kept, kept_key = create_key(path, "acme", "writer", owner="carol")
    before = path.read_bytes()

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(auth, "_audit_key_change", full)
    for change in (lambda: create_key(path, "acme", "admin", owner="dave"), lambda: revoke_key(path, kept.key_id)):
        with pytest.raises(OSError, match="No space"):
            change()
        assert path.read_bytes() == before and not path.with_suffix(".json.tmp").exists()
    assert KeyStore(path).authenticate(kept_key) is not None


def test_keys_list_revoke_and_set_owner_refuse_a_keys_file_that_does_not_exist(tmp_path):
    """`raytwin keys list` in the wrong directory printed nothing (exit 0) and `revoke` said "no key": read as "the
    server has no keys" or "no such key" while the server reads another file. Each names the missing file."""
    missing = tmp_path / "raytwin-keys.json"
    for args in (["list"], ["revoke", "abc"], ["set-owner", "abc", "--owner", "alice"]):
        out = CliRunner().invoke(keys_app, [*args, "--keys-file", str(missing)])
        assert out.exit_code == 2 and "does not exist" in out.output and not missing.exists(), (args, out.output)


def test_whoever_computed_a_recommendation_may_not_approve_the_command_that_issues_it(tmp_path):
    """An approver computed a recommendation (from a start state of its choosing), a writer issued it, and the same
    approver approved it: one pair of eyes. Its author is compared as a person (the key's owner), as a proposer is."""
    from datetime import UTC, datetime

    from sweeps.runs import RunRecord, RunStore, new_run_id
    from tests.fixtures_serve import in_process

    backend = LedgerBackend(tmp_path)
    with in_process(backend, tmp_path) as (http, auth, svc):
        keys = tmp_path / "keys.json"
        carol = [create_key(keys, "acme", "admin", ("approver",), owner="carol") for _ in range(2)]
        writer = svc.keys.authenticate(auth["writer"]["Authorization"].split()[1]).key_id
        runs, now = RunStore(svc.config.url("runs", "acme")), datetime.now(UTC)
        commands = {}
        for who, user in (("approver", svc.keys.authenticate(auth["approver"]["Authorization"].split()[1]).key_id),
                          ("carol", carol[0][0].key_id)):
            run_id = new_run_id("recommendation")
            runs.save(RunRecord(run_id=run_id, kind="recommendation", status="succeeded", user=user, tenant="acme",
                                asset_id="pump-1", model_ref="tank@1.0.0", model_hash="ab" * 32, seeds={},
                                package_versions={}, code_version="x", started=now, finished=now,
                                output_url=runs.output_url(run_id), outputs={}, spec={}))
            commands[who] = backend.ledger.propose("acme", "web", "pump-1", "schedule", {"recommendation": run_id},
                                                   writer, run_id).id
        own = http.post(f"/v1/commands/{commands['approver']}/approve", headers=auth["approver"])
        assert own.status_code == 409 and "computed by " in own.text and "four eyes" in own.text, own.text
        carols_other_key = {"Authorization": f"Bearer {carol[1][1]}"}  # the same person: one pair of eyes
        own = http.post(f"/v1/commands/{commands['carol']}/approve", headers=carols_other_key)
        assert own.status_code == 409 and "computed by carol" in own.text, own.text
        revoke_key(keys, carol[0][0].key_id)  # F14: who held the computing key is still told after its revocation
        own = http.post(f"/v1/commands/{commands['carol']}/approve", headers=carols_other_key)
        assert own.status_code == 409 and "computed by carol" in own.text, own.text
        assert backend.sent == []
        assert http.post(f"/v1/commands/{commands['carol']}/approve", headers=auth["approver"]).status_code == 200
        assert http.post(f"/v1/commands/{commands['approver']}/approve", headers=carols_other_key).status_code == 200
        assert len(backend.sent) == 2
        refused = [r for r in _approval_audit(svc, commands["approver"], "acme") if r["status"] == "refused"]
        assert refused[0]["code"] == "conflict" and "four eyes" in refused[0]["reason"]
        lost = new_run_id("recommendation")
        gone = backend.ledger.propose("acme", "web", "pump-1", "schedule", {"recommendation": lost}, writer, lost).id
        unknown = http.post(f"/v1/commands/{gone}/approve", headers=auth["approver"])  # its author cannot be told
        assert unknown.status_code == 409 and "whose run record is gone" in unknown.text, unknown.text


def test_a_connector_or_command_path_that_is_no_identifier_is_refused_before_it_names_a_store_file(tmp_path):
    """The ids of /v1/connectors/{name} and /v1/commands/{command_id} went into store paths unchecked: a NUL answered
    500 and 5,000 characters 503 `store_unavailable` (file name too long), a store outage any reader could report."""
    from tests.fixtures_serve import in_process

    backend = LedgerBackend(tmp_path)
    with in_process(backend, tmp_path) as (http, auth, _):
        for bad in ("%00", "a" * 5000, "zone-1%00"):
            for method, path in (("GET", f"/v1/commands/{bad}"), ("POST", f"/v1/commands/{bad}/approve"),
                                 ("GET", f"/v1/connectors/{bad}"), ("GET", f"/v1/connectors/{bad}/dead-letters"),
                                 ("POST", f"/v1/connectors/{bad}/pause"), ("DELETE", f"/v1/connectors/{bad}"),
                                 ("POST", f"/v1/commands/{bad}/refuse")):
                assert http.request(method, path).status_code == 401  # credentials first, as on every route
                answer = http.request(method, path, headers=auth["admin"])
                assert answer.status_code == 422, (method, path[:60], answer.text[:300])
                assert "should match pattern" in answer.json()["error"]["message"]
        assert backend.sent == []


class NoTypes:
    """A backend whose tenants published no asset type yet (what a compatibility check asks for)."""

    def list_types(self, tenant: str, name: str) -> list:
        return []


def test_a_simulator_import_path_imports_only_packages_the_operator_allowed_for_the_callers_tenant(tmp_path,
                                                                                                  monkeypatch):
    """Validating an asset type imports its simulator's module in the API's replica, running its code: any tenant's
    admin key made the server import any installed package (`this:s` printed, `test.autotest` ran a test suite) and
    use another tenant's private model package. Refused (422, naming how to allow it) before anything is imported,
    unless `model_packages` lists the package for the caller's tenant; declared models need no listing."""
    import sys

    from tests.fixtures_serve import in_process

    (tmp_path / "globex_models").mkdir()
    (tmp_path / "globex_models" / "__init__.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('ran').write_text('imported')\n")
    (tmp_path / "globex_models" / "room.py").write_text("from raytwin.sim import THERMAL_RC as ROOM\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    private = {**AssetType.from_model(THERMAL_RC).model_dump(mode="json"), "simulator": "globex_models.room:ROOM"}
    with in_process(NoTypes(), tmp_path) as (http, auth, svc):
        svc.config = svc.config.model_copy(update={"model_packages": {"*": ["tests"], "globex": ["globex_models"]}})
        for path in ("/v1/asset-types", "/v1/asset-types/compatibility"):
            refused = http.post(path, json=private, headers=auth["admin"])  # acme's admin
            assert refused.status_code == 422, refused.text
            error = refused.json()["error"]
            assert "no model of package 'globex_models' for tenant acme" in error["message"]
            assert "model_packages (ServeConfig: under 'acme', or '*' for every tenant)" in error["message"]
            assert error["details"] == [{"loc": ["body", "simulator"], "package": "globex_models"}]
            assert "globex_models" not in sys.modules and not (tmp_path / "globex_models" / "ran").exists()
        for simulator in ("thermal_rc", "raytwin.sim.thermal:THERMAL_RC"):  # declared: no listing needed
            declared = {**private, "simulator": simulator}
            assert http.post("/v1/asset-types/compatibility", json=declared, headers=auth["admin"]).status_code == 200
        allowed = http.post("/v1/asset-types/compatibility", json=private, headers=auth["other"])  # globex's admin
        assert allowed.status_code == 200, allowed.text
        assert (tmp_path / "globex_models" / "ran").read_text() == "imported"
        again = http.post("/v1/asset-types/compatibility", json=private, headers=auth["admin"])  # loaded now: still
        assert again.status_code == 422 and "for tenant acme" in again.json()["error"]["message"]  # not acme's
    with pytest.raises(ValidationError, match="no top-level package names: list the package"):
        ServeConfig(store_url="s", keys_file="k", model_packages={"*": ["plant_models.pump:PUMP"]})


@pytest.mark.parametrize("death", ["died", "unavailable"])
def test_a_backend_dying_during_an_approval_answers_503_and_a_resend_never_sends_again(tmp_path, death):
    """A backend replica that died during an approval answered 500 `internal`, and a resend 409 "only a proposed
    command can be approved (propose a new one to send again)" for a command that may have been sent."""
    import ray

    from tests.fixtures_serve import in_process

    backend = LedgerBackend(tmp_path)
    with in_process(backend, tmp_path) as (http, auth, svc):
        command = backend.ledger.propose("acme", "web", "pump-1", "setpoint", {"q": 1.0}, "a-writer")
        approve = f"/v1/commands/{command.id}/approve"
        backend.connectors.dies = (ray.exceptions.ActorDiedError() if death == "died" else
                                   ray.exceptions.ActorUnavailableError("the replica is unreachable", None))
        lost = http.post(approve, headers=auth["approver"])  # died after the claim and the send
        assert lost.status_code == 503 and lost.headers["retry-after"] == "5", lost.text
        error = lost.json()["error"]
        assert error["code"] == "backend_unavailable" and "approving again is safe" in error["message"]
        backend.connectors.dies = None
        again = http.post(approve, headers=auth["approver"])  # the approving key's resend: the command as it is now
        assert again.status_code == 200 and again.json()["status"] == "sending", again.text
        assert backend.sent == [command.correlation_id]  # sent once
        assert http.post(approve, headers=auth["admin"]).status_code == 409  # another key's: decided already
        statuses = [r["status"] for r in _approval_audit(svc, command.id, "acme")]
        assert statuses == ["error", "sending", "refused"]
        assert backend.sent == [command.correlation_id]


class ConnectorsOf:
    """The backend's connector view: 404 for any connector but `names` (tenant, name)."""

    def __init__(self, names: set[tuple[str, str]]):
        self.names = names

    def connector(self, op: str, tenant: str, name: str) -> dict:
        if op != "view" or (tenant, name) not in self.names:
            raise NotFound(f"no connector {name!r} for tenant {tenant!r}")
        return {"spec": {"name": name}, "status": {}}


def test_a_tenant_reads_its_own_connectors_dead_letters_and_never_another_tenants(tmp_path, monkeypatch):
    from connectors.mapping import DeadLetter as MappedDeadLetter
    from raytwin import statestore
    from raytwin.statestore import StateStore
    from tests.fixtures_serve import in_process

    store = StateStore(str(tmp_path / "store" / "twins"))
    day1, day2 = datetime(2026, 12, 4, 10, tzinfo=UTC), datetime(2026, 12, 5, 9, tzinfo=UTC)

    def letters(tenant: str, when: datetime, *reasons: str, stem: str | None = None) -> None:
        monkeypatch.setattr(statestore, "datetime", type("Clock", (datetime,), {"now": staticmethod(lambda tz: when)}))
        store.write_dead_letters(tenant, [{"asset_id": "pump-1", "idempotency_key": None, "reason": r,
                                           "raw": f"{tenant}:{r}"} for r in reasons], stem)

    letters("acme", day1, "mqtt://web/site/pump-1/telemetry: payload is not JSON",
            "opcua://plc/ns=2;i=7: unit 'bar' is not convertible")
    letters("acme", day2, "mqtt://web/site/pump-1/telemetry: no reading", "mqtt://webx/a: not its own",
            "event too late for the twin")  # (a shard's: no source)
    letters("globex", day2, "mqtt://web/g/telemetry: globex's own")
    store.write_dead_letters("acme", [{"asset_id": "a" * 900_000, "idempotency_key": "k" * 900_000,
                                       "raw": "x" * 5_000_000, "reason": "mqtt://big/t: got '" + "A" * 900_000 + "'"}])
    # ^ kept whole before: raw before 913628e, the rest before the text bounds
    cut = MappedDeadLetter.of("mqtt://cut/t", "pump-1", "k" * 300, "got '" + "A" * 900_000 + "'", b"y" * 50_000).row()
    store.write_dead_letters("acme", [cut])  # as the connectors write them now: read back unchanged
    with in_process(ConnectorsOf({("acme", "web"), ("acme", "plc"), ("acme", "big"), ("acme", "cut"),
                                  ("globex", "web")}),
                    tmp_path) as (http, auth, _):
        def read(name: str, key: str = "reader", **params) -> list[dict]:
            answer = http.get(f"/v1/connectors/{name}/dead-letters", headers=auth[key], params=params)
            assert answer.status_code == 200, answer.text
            assert answer.json()["next_cursor"] is None, "a page of them all"
            return answer.json()["dead_letters"]

        web = read("web")
        assert [(d["reason"].split(": ")[1], d["dead_lettered_at"][:10]) for d in web] == [
            ("no reading", "2026-12-05"), ("payload is not JSON", "2026-12-04")]  # newest first; not webx's
        assert web[1] == {"asset_id": "pump-1", "idempotency_key": None, "reason": web[1]["reason"],
                          "raw": f"acme:{web[1]['reason']}", "dead_lettered_at": "2026-12-04T10:00:00Z"}
        assert [d["reason"] for d in read("web", day="2026-12-04")] == [web[1]["reason"]]
        assert read("web", day="2026-12-03") == [] and len(read("plc")) == 1
        assert [d["raw"] for d in read("web", "other")] == ["globex:mqtt://web/g/telemetry: globex's own"]
        for name, key in (("plc", "other"), ("nope", "reader")):  # another tenant's connector is a missing one
            assert http.get(f"/v1/connectors/{name}/dead-letters", headers=auth[key]).status_code == 404
        bad = http.get("/v1/connectors/web/dead-letters", headers=auth["reader"], params={"day": "2026-02-30"})
        assert bad.status_code == 422 and "not a calendar date" in bad.json()["error"]["message"]
        (big,) = read("big")
        digest = hashlib.sha256(b"x" * 5_000_000).hexdigest()
        assert big["raw"] == "x" * 4096 + f"\n[cut: the first 4096 of 5000000 bytes kept; SHA-256 of all: {digest}]"
        assert (big["asset_id"], big["idempotency_key"], big["reason"]) == (
            "a" * 1024 + "…(900000 characters)", "k" * 1024 + "…(900000 characters)",
            "mqtt://big/t: got '" + "A" * (1024 - 19) + "…(900020 characters)")
        (again,) = read("cut")  # its raw was cut again on reading, losing the whole's length and hash
        assert {k: again[k] for k in cut} == cut and cut["raw"].startswith("y" * 4096 + "\n[cut: the first 4096 of "
                                                                           "50000 bytes kept; SHA-256 of all: ")
        many = http.get("/v1/connectors/web/dead-letters", headers=auth["reader"], params={"limit": 1001})
        assert many.status_code == 422 and "less than or equal to 1000" in many.text  # was 10,000 (of up to 5 MB each)
        assert http.get("/v1/connectors/web/dead-letters").status_code == 401
        sdk = RayTwinClient("http://testserver", auth["reader"]["Authorization"].removeprefix("Bearer "),
                            transport=http._transport)
        (newest,) = sdk.connector_dead_letters("web", day=day2.date(), limit=5).dead_letters
        assert newest.reason == web[0]["reason"] and newest.dead_lettered_at == datetime(2026, 12, 5, 9, tzinfo=UTC)
        with pytest.raises(ClientNotFound):
            sdk.connector_dead_letters("webx")

        # more than a page: every one read once, page after page, identical ones of one write included; a page
        # stays in place while newer ones are written; a cursor of another listing is refused saying what to send
        flood = [f"mqtt://web/site/pump-1/telemetry: bad {i % 4}" for i in range(10)]  # each one 2 or 3 times
        letters("acme", day2 + timedelta(hours=1), *flood)
        first = sdk.connector_dead_letters("web", limit=4)
        letters("acme", day2 + timedelta(hours=2), "mqtt://web/site/pump-1/telemetry: newer")
        rest = list(sdk.iter_connector_dead_letters("web", page_size=3))
        again = [*first.dead_letters, *sdk.connector_dead_letters("web", limit=1000, cursor=first.next_cursor)
                 .dead_letters]
        assert again == rest[1:] and rest[0].reason.endswith(": newer") and len(again) == 12
        assert sorted(d.reason for d in again[:10]) == sorted(flood) and [d.reason for d in again[10:]] == [
            d["reason"] for d in web]
        other = http.get("/v1/connectors/plc/dead-letters", headers=auth["reader"],
                         params={"cursor": first.next_cursor})
        assert other.status_code == 422 and "GET /v1/connectors/plc/dead-letters" in other.json()["error"]["message"]

        # a shard's retry writes its batch's dead letters again (the same file, `dead_letter_stem`) between two page
        # reads: they moved to the newest, and a client paging through them missed those it had not read yet
        listed, retried = [d.reason for d in rest], [f"mqtt://web/site/pump-1/telemetry: retried {i}" for i in range(2)]
        letters("acme", day2 + timedelta(minutes=30), *retried, stem="part-retried")  # the killed try's
        walk = sdk.iter_connector_dead_letters("web", page_size=3)
        head = [next(walk).reason for _ in range(3)]  # newer than the retried: the next page reaches them
        letters("acme", day2 + timedelta(hours=3), *retried, stem="part-retried")  # the retry
        walked = head + [d.reason for d in walk]
        assert sorted(walked) == sorted(listed + retried) and walked.index(retried[0]) > 3, walked


def test_serve_prints_the_port_serve_listens_on_and_says_when_it_is_not_the_one_asked(monkeypatch):
    """On a cluster whose Serve already ran, `raytwin serve --port 8000` printed 8000 while the proxy kept its own
    port (Serve ignores the new HTTP options, logging a warning only). The URL printed is the base the CLI's
    --api-url and the client take: printed with /v1, copied into --api-url, every call answered 404 Not Found."""
    from ray.serve import context
    from ray.serve.config import HTTPOptions

    from serve_apps.endpoints import api_address, serving_at

    running = SimpleNamespace(http_config=HTTPOptions(host="0.0.0.0", port=8123))
    monkeypatch.setattr(context, "_get_global_client", lambda: running)
    assert serving_at() == ("0.0.0.0", 8123)
    base = "(routes under /v1, OpenAPI: /docs; the URL for --api-url, RAYTWIN_API_URL and RayTwinClient)"
    assert api_address(("127.0.0.1", 8000), ("127.0.0.1", 8000)) == f"RayTwin API at http://127.0.0.1:8000 {base}"
    first, second = api_address(serving_at(), ("127.0.0.1", 8000), haproxy=True).splitlines()
    assert first == f"RayTwin API at http://0.0.0.0:8123 {base} through HAProxy"
    assert "not at 127.0.0.1:8000 as asked" in second and "`serve shutdown`" in second


def test_a_run_record_is_read_by_its_tenant_without_store_locations_and_its_files_by_name(tmp_path):
    """The evidence a transition names (a drift recalibration's run and its fit report) could be read only by
    whoever had the store: the recalibration named the report by its store URL, which tenants must not see."""
    import hashlib
    from datetime import UTC, datetime

    from client.errors import CorruptDownload
    from sweeps.runs import RunRecord, RunStore
    from tests.fixtures_serve import in_process

    runs = RunStore(str(tmp_path / "store" / "runs" / "acme"))
    run_id = "calibration-20261205T150000Z-1a2b3c4d"
    report = b'{"parameters": {"R_io": 0.02}, "tune_trials": 8}'
    runs.fs.makedirs(runs.output_url(run_id), exist_ok=True)
    runs.fs.pipe_file(f"{runs.output_url(run_id)}/calibration.json", report)
    now = datetime.now(UTC)
    runs.save(RunRecord(
        run_id=run_id, kind="calibration", status="succeeded", user="recalibration", tenant="acme",
        asset_id="zone-1", model_ref="thermal_rc@1.0.0", model_hash="ab" * 32, input_data_url="s3://bucket/acme/t",
        input_data_hash="cd" * 32, seeds={"tune": 0}, package_versions={}, code_version="x", started=now,
        finished=now, output_url=f"{tmp_path}/old-store/runs/acme/{run_id}/output", summary={"weighted_rmse": 0.1},
        outputs={"calibration.json": hashlib.sha256(report).hexdigest(),
                 "search/part-000000.parquet": hashlib.sha256(b"PAR1").hexdigest()},
        spec={"model": "thermal_rc@1.0.0", "registry_url": "s3://bucket/registry/acme", "telemetry": "/srv/t.parquet",
              "signals": {"u": {"kind": "series", "path": "s3://bucket/u.parquet"}}, "free": ["R_io"]}))
    runs.fs.makedirs(f"{runs.output_url(run_id)}/search", exist_ok=True)
    runs.fs.pipe_file(f"{runs.output_url(run_id)}/search/part-000000.parquet", b"PAR1")
    # the record says where the run wrote, a store since moved (restored from a backup): its files are read beside
    # the record in the root the backend is configured with (a 410 when they were read at the recorded path)
    failed_id = "sweep-20261205T150000Z-5e6f7a8b"  # a worker's traceback names files, its node and pid
    runs.save(RunRecord(**{**runs.load(run_id).model_dump(), "run_id": failed_id, "kind": "sweep", "status": "failed",
                           "outputs": {}, "error": "ray::_chunk_task() (pid=31020, ip=192.0.2.2)\n  File "
                           "\"/srv/raytwin/sweeps/runner.py\", line 9\nValueError: series s3://bucket/u.parquet:T: "
                           "needs increasing times (partial output in /srv/store/runs/acme/x/output)"}))
    with in_process(object(), tmp_path) as (http, auth, _):
        answer = http.get(f"/v1/runs/{run_id}", headers=auth["reader"])
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert "bucket" not in answer.text and "/srv/" not in answer.text and str(tmp_path) not in answer.text
        assert body["spec"] == {"model": "thermal_rc@1.0.0", "signals": {"u": {"kind": "series"}}, "free": ["R_io"]}
        assert body["outputs"]["calibration.json"] == hashlib.sha256(report).hexdigest()
        file = http.get(f"/v1/runs/{run_id}/files/calibration.json", headers=auth["reader"])
        assert file.status_code == 200 and file.content == report
        assert file.headers["X-RayTwin-SHA256"] == body["outputs"]["calibration.json"]
        nested = http.get(f"/v1/runs/{run_id}/files/search/part-000000.parquet", headers=auth["reader"])
        assert nested.status_code == 200 and nested.content == b"PAR1"  # a recorded name with a "/" in it
        sdk = RayTwinClient("http://testserver", auth["reader"]["Authorization"].removeprefix("Bearer "),
                            transport=http._transport)
        assert sdk.run_file(run_id, "search/part-000000.parquet") == b"PAR1"  # the SDK refused it before sending
        assert sdk.download_run_file(run_id, "calibration.json", tmp_path / "fit.json").read_bytes() == report
        part = sdk.download_run_file(run_id, "search/part-000000.parquet", tmp_path / "part.parquet")
        runs.fs.pipe_file(f"{runs.output_url(run_id)}/search/part-000000.parquet", b"PAR2")  # not what it recorded
        with pytest.raises(CorruptDownload, match="download it again"):
            sdk.download_run_file(run_id, "search/part-000000.parquet", part)
        assert part.read_bytes() == b"PAR1" and not list(tmp_path.glob(".*.part"))  # as it was, nothing partial
        runs.fs.rm(f"{runs.output_url(run_id)}/calibration.json")  # gone from the store: not a 200 cut short
        assert http.get(f"/v1/runs/{run_id}/files/calibration.json", headers=auth["reader"]).status_code == 410
        failed = http.get(f"/v1/runs/{failed_id}", headers=auth["reader"]).json()
        assert failed["error"] == "ValueError: series <store> needs increasing times (partial output in <store>)"
        for path, headers, status in ((f"/v1/runs/{run_id}", auth["other"], 404),  # another tenant's run
                                      (f"/v1/runs/{run_id}/files/calibration.json", auth["other"], 404),
                                      (f"/v1/runs/{run_id}/files/run.json", auth["reader"], 404),  # not an output
                                      ("/v1/runs/a-b", auth["reader"], 422),  # a run id, no other name under the runs
                                      (f"/v1/runs/{run_id}", {}, 401)):
            assert http.get(path, headers=headers).status_code == status, path
    import httpx

    from client.downloads import RUN_FILE, hashed

    cut = httpx.Response(200, content=report[:10], headers={"X-RayTwin-SHA256": hashlib.sha256(report).hexdigest()},
                         request=httpx.Request("GET", f"http://api/v1/runs/{run_id}/files/calibration.json"))
    with pytest.raises(CorruptDownload, match="download it again; if the same bytes come again, the stored file "
                                              "itself is damaged.*raytwin rerun"):  # the SDK checks what it got
        hashed(RUN_FILE, verify=True)(cut)


def test_a_job_file_comes_with_the_sha256_its_job_recorded_and_the_sdk_streams_it_to_disk_checked(tmp_path):
    """Job files had no hash, and `job_file` held a whole file in memory: a file cut short or damaged in the store went
    unnoticed, and a large one filled the caller's memory. A job now records its files' SHA-256 as it writes them
    (a sweep's as its run record holds them), the route sends it as ``X-RayTwin-SHA256`` (for a job recorded
    before, computed from the stored file), and `download_job_file` streams to disk, checked, renamed into place."""
    import hashlib
    import random

    from client.downloads import CHUNK_BYTES
    from client.errors import CorruptDownload
    from tests.fixtures_serve import JobFiles, in_process, job_results, succeeded_job

    data = random.Random(3).randbytes(2 * CHUNK_BYTES + 7)
    recorded = hashlib.sha256(data).hexdigest()
    files = {"part-000000.parquet": data}
    before = succeeded_job(tmp_path, files, job_id="j0", recorded=False)  # before jobs kept their files' hashes
    with in_process(JobFiles(tmp_path, succeeded_job(tmp_path, files), before), tmp_path) as (http, auth, _):
        for job_id in ("j1", "j0"):
            answer = http.get(f"/v1/jobs/{job_id}/files/part-000000.parquet", headers=auth["reader"])
            assert answer.status_code == 200 and answer.content == data
            assert answer.headers["X-RayTwin-SHA256"] == recorded
        sdk = RayTwinClient("http://testserver", auth["reader"]["Authorization"].removeprefix("Bearer "),
                            transport=http._transport)
        target = tmp_path / "out" / "part.parquet"
        target.parent.mkdir()
        assert sdk.download_job_file("j1", "part-000000.parquet", target) == target and target.read_bytes() == data
        assert sdk.job_file("j0", "part-000000.parquet") == data
        (job_results(tmp_path) / "part-000000.parquet").write_bytes(data[:-1] + b"x")  # damaged after it was written
        with pytest.raises(CorruptDownload, match="but the job recorded .*: download it again.*run the scenario or "
                                                  "sweep again"):
            sdk.download_job_file("j1", "part-000000.parquet", target)
        with pytest.raises(CorruptDownload):
            sdk.job_file("j1", "part-000000.parquet")
        assert target.read_bytes() == data and [p.name for p in target.parent.iterdir()] == ["part.parquet"]
        with pytest.raises(ClientNotFound, match="no file 'nope.parquet'"):
            sdk.download_job_file("j1", "nope.parquet", tmp_path / "out" / "nope.parquet")
        assert http.get("/v1/jobs/j1/files/part-000000.parquet", headers=auth["other"]).status_code == 404


def test_a_job_file_listing_names_the_sha256_each_file_was_recorded_with(tmp_path):
    """`GET /v1/jobs/{id}/files` listed names and sizes only, although the job records each file's SHA-256 (as a run
    record lists its files'): it lists the recorded hash, the one the download sends, and null for a file the job
    recorded none for (a job from before), without reading the file; the SDK's `job_files` carries it."""
    import hashlib

    from tests.fixtures_serve import JobFiles, in_process, succeeded_job

    files = {"part-000000.parquet": b"PAR1 metrics", "trajectories.parquet": b"PAR1 trajectories"}
    recorded = {n: hashlib.sha256(data).hexdigest() for n, data in files.items()}
    jobs = JobFiles(tmp_path, succeeded_job(tmp_path, files), succeeded_job(tmp_path, files, "j0", recorded=False))
    with in_process(jobs, tmp_path) as (http, auth, _):
        listed = http.get("/v1/jobs/j1/files", headers=auth["reader"])
        assert listed.status_code == 200 and listed.json() == [
            {"name": n, "size": len(files[n]), "sha256": recorded[n]} for n in sorted(recorded)]
        assert http.get("/v1/jobs/j1/files/trajectories.parquet", headers=auth["reader"]).headers[
            "X-RayTwin-SHA256"] == recorded["trajectories.parquet"]
        assert [f["sha256"] for f in http.get("/v1/jobs/j0/files", headers=auth["reader"]).json()] == [None, None]
        sdk = RayTwinClient("http://testserver", auth["reader"]["Authorization"].removeprefix("Bearer "),
                            transport=http._transport)
        assert {f.name: f.sha256 for f in sdk.job_files("j1")} == recorded
        assert http.get("/v1/jobs/j1/files", headers=auth["other"]).status_code == 404


def test_a_job_whose_files_are_no_longer_stored_answers_410_saying_so(tmp_path):
    """Retention removes a sweep's run record with its output folder (keep_runs; `raytwin.lifecycle.prune`): the job's
    results, files and file downloads answered 500 (the store's FileNotFoundError), and its status read as if its
    files were there. Each answers 410 saying why and what to do, as a run's removed file does; the status says
    `results_removed`; the SDK raises `Gone`. A file the job recorded, removed by hand, is gone too."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from client.errors import Gone
    from tests.fixtures_serve import JobFiles, in_process, succeeded_job
    from tests.test_serve_api import assert_error

    run_id = "sweep-20260105T120000Z-1a2b3c4d"
    output = tmp_path / "store" / "runs" / "acme" / run_id / "output"  # where the config keeps its run's output
    output.mkdir(parents=True)
    for name in ("part-000000.parquet", "trajectories.parquet"):
        pq.write_table(pa.table({"x": [1.0]}), output / name)
    recorded = {n: hashlib.sha256((output / n).read_bytes()).hexdigest() for n in ("part-000000.parquet",
                                                                                   "trajectories.parquet")}
    sweep = succeeded_job(tmp_path, {}).model_copy(update={"kind": "sweep", "run_id": run_id, "outputs": recorded,
                                                            "result_url": str(output)})
    scenario = succeeded_job(tmp_path, {}, job_id="j2")  # its folder is gone (by hand)
    with in_process(JobFiles(tmp_path, sweep, scenario), tmp_path) as (http, auth, _):
        sdk = RayTwinClient("http://testserver", auth["reader"]["Authorization"].removeprefix("Bearer "),
                            transport=http._transport)
        assert sdk.job("j1").results_removed is False and [f.name for f in sdk.job_files("j1")] == sorted(recorded)
        (output / "trajectories.parquet").unlink()  # one it recorded
        assert sdk.job("j1").results_removed is True
        assert http.get("/v1/jobs/j1/files", headers=auth["reader"]).status_code == 410
        shutil.rmtree(output.parent)  # what retention does to the run
        status = http.get("/v1/jobs/j1", headers=auth["reader"]).json()
        assert (status["state"], status["results_removed"]) == ("succeeded", True)
        for path in ("/v1/jobs/j1/results", "/v1/jobs/j1/files", "/v1/jobs/j1/files/part-000000.parquet"):
            message = assert_error(http.get(path, headers=auth["reader"]), 410, "gone")["message"]
            assert message == (
                f"job j1's result files are no longer in the store (removed by retention or by hand); retention "
                f"removes a sweep's output with its run record ({run_id}: GET /v1/runs/{run_id} answers 404 then); "
                "submit the sweep again (POST /v1/sweeps) to compute them anew"), path
        for call in (lambda: sdk.job_results("j1"), lambda: sdk.job_files("j1"),
                     lambda: sdk.download_job_file("j1", "part-000000.parquet", tmp_path / "part.parquet")):
            with pytest.raises(Gone, match="submit the sweep again"):
                call()
        assert not (tmp_path / "part.parquet").exists()
        assert "run the scenario again (POST /v1/scenarios)" in assert_error(
            http.get("/v1/jobs/j2/files", headers=auth["reader"]), 410, "gone")["message"]
        assert http.get("/v1/jobs/j1/files", headers=auth["other"]).status_code == 404  # another tenant's: not found


def test_a_jobs_results_are_read_in_the_store_configured_now_not_at_the_location_its_record_saved(tmp_path):
    """A job's results and files were read at the `result_url` its record saved (where it wrote): a store moved or
    restored elsewhere answered 410 for files that were there, and the routes read whatever path a record named. A
    scenario job's are read in its ``results`` folder of the store configured now, a sweep job's beside its run record
    in the configured runs root."""
    import io
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.fixtures_serve import JobFiles, in_process, saved_run, succeeded_job

    buf = io.BytesIO()
    pq.write_table(pa.table({"x": [1.0]}), buf)
    files = {"part-000000.parquet": buf.getvalue()}
    old, new, run_id = tmp_path / "old", tmp_path / "new", "sweep-20261205T150000Z-1a2b3c4d"
    saved_run(old / "store" / "runs" / "acme", run_id, files)
    scenario = succeeded_job(old, files)
    sweep = succeeded_job(old, {}, "j2").model_copy(update={
        "kind": "sweep", "run_id": run_id, "outputs": scenario.outputs,
        "result_url": str(old / "store" / "runs" / "acme" / run_id / "output")})
    shutil.copytree(old / "store", new / "store")  # the store restored elsewhere: the records name the old one
    shutil.rmtree(old)
    with in_process(JobFiles(new, scenario, sweep), new) as (http, auth, _):
        for job_id in ("j1", "j2"):
            assert http.get(f"/v1/jobs/{job_id}", headers=auth["reader"]).json()["results_removed"] is False
            results = http.get(f"/v1/jobs/{job_id}/results", headers=auth["reader"])
            assert results.status_code == 200 and results.json()["rows"] == [{"x": 1.0}], job_id
            listed = http.get(f"/v1/jobs/{job_id}/files", headers=auth["reader"]).json()
            assert [f["name"] for f in listed] == ["part-000000.parquet"], job_id
            got = http.get(f"/v1/jobs/{job_id}/files/part-000000.parquet", headers=auth["reader"])
            assert got.status_code == 200 and got.content == files["part-000000.parquet"], job_id


def test_a_scenario_job_records_the_sha256_of_the_file_it_wrote(tmp_path):
    """The hash a job file is sent with is the one of the bytes its job wrote (a sweep's: its run record's), kept in
    the job's record."""
    import asyncio
    import hashlib

    import numpy as np
    import pyarrow.parquet as pq

    from serve_apps.jobs import JobQueue, JobRecord
    from serve_apps.scenarios import PreparedScenario, scenario_to_store
    from tests.fixtures_serve import succeeded_job

    prepared = PreparedScenario(simulator="thermal_rc", model_ref="thermal_rc@1.0.0", content_hash="ab" * 32,
                                step_s=60.0, x0=np.array([294.0, 293.0]), inputs=np.tile([278.0, 0.0, 0.0], (10, 1)),
                                params=np.asarray(THERMAL_RC.param_vector()), overrides={})
    out = scenario_to_store._function(prepared, str(tmp_path / "results"), {})
    written = (tmp_path / "results" / "part-000000.parquet").read_bytes()
    assert out["outputs"] == {"part-000000.parquet": hashlib.sha256(written).hexdigest()}
    assert pq.read_table(tmp_path / "results" / "part-000000.parquet").num_rows == 1

    queue = JobQueue(ServeConfig(store_url=str(tmp_path / "store"), keys_file="unused.json"), max_concurrent=1)
    job = succeeded_job(tmp_path, {}).model_copy(update={"state": "running", "result_url": None})
    queue.jobs[job.job_id], queue.running = job, 1

    async def answered() -> dict:
        return out

    asyncio.run(queue._watch(job, answered()))
    saved = JobRecord.model_validate_json((tmp_path / "store" / "jobs" / "acme" / "j1" / "job.json").read_text())
    assert saved.state == "succeeded" and saved.outputs == out["outputs"]  # kept with the job, for its downloads
    assert "outputs" not in saved.status().model_dump()  # not part of the job's status


def test_a_sweep_job_lost_with_a_restart_links_the_run_record_its_run_left(tmp_path):
    """A job learnt its run_id only from its task's answer: a sweep cancelled, failed or lost with its service
    showed run_id null although its run had recorded how it ended."""
    from serve_apps.jobs import JobQueue, JobRecord
    from sweeps.runs import RunRecord, RunStore, new_run_id

    config = ServeConfig(store_url=str(tmp_path), keys_file="unused.json")
    queue = JobQueue(config, max_concurrent=1)
    ran, never = new_run_id("sweep"), new_run_id("sweep")
    now = datetime.now(UTC)
    for job_id, run_id in (("j-ran", ran), ("j-never", never)):
        queue._save(JobRecord(job_id=job_id, kind="sweep", tenant="acme", key_id="k", asset_id="zone-1",
                              model_ref="thermal_rc@1.0.0", content_hash="h", scenarios=3, n_steps=10, state="running",
                              submitted=now, started=now, planned_run_id=run_id))
    runs = RunStore(config.url("runs", "acme"))
    runs.save(RunRecord(run_id=ran, kind="sweep", status="cancelled", user="k", tenant="acme",
                        model_ref="thermal_rc@1.0.0", model_hash="ab" * 32, spec={}, seeds={}, package_versions={},
                        code_version="x", started=now, finished=now, output_url=runs.output_url(ran),
                        error="sweep cancelled after 0/3 scenarios"))
    restarted = JobQueue(config, max_concurrent=1)  # its jobs were running: failed, not lost
    linked, unlinked = (restarted.get("acme", j).status() for j in ("j-ran", "j-never"))
    assert (linked.state, linked.run_id) == ("failed", ran)  # GET /v1/runs/{run_id} says how it ended
    assert (unlinked.state, unlinked.run_id) == ("failed", None)  # its run never left a record: none to name
    assert "planned_run_id" not in linked.model_dump()  # not an answer's field before its record exists


class DyingBackend:
    """A backend whose replica dies in every call (`death`, as Ray's handle raises it)."""

    def __init__(self, death: Exception):
        self.death = death

    def __getattr__(self, method: str):
        def call(*args):
            raise self.death
        return call


_SAFE, _CHECK = "resending it is safe", "may or may not have taken effect"
BACKEND_LOST = [  # (key, method, path, body, headers, what the 503 advises)
    ("reader", "GET", "/v1/assets", None, {}, "a read changes nothing: resending it is safe"),
    ("admin", "DELETE", "/v1/asset-types/pump/1.0.0", None, {}, _SAFE + " (DELETE is idempotent"),
    ("admin", "PUT", "/v1/asset-types/pump/1.0.0/deprecation", {"deprecated_at": "2026-12-01T00:00:00Z"}, {}, _SAFE),
    ("writer", "POST", "/v1/assets/pump-1/telemetry", {"events": [{"sequence": 1}]}, {}, _SAFE + " (every event has an idempotency"),
    ("reader", "POST", "/v1/query", {"q": ""}, {}, _SAFE + " (a query changes nothing)"),
    ("admin", "POST", "/v1/connectors/rooms/pause", None, {}, _SAFE),
    ("writer", "POST", "/v1/bulk", {"q": "", "action": "tag", "set": {"a": "b"}}, {}, _CHECK),
    ("writer", "POST", "/v1/commands", {"connector": "rooms", "asset_id": "pump-1", "name": "setpoint",
                                        "value": {"q": 1.0}}, {}, "GET /v1/commands?asset_id=pump-1 lists it"),
]


@pytest.mark.parametrize("death", ["died", "unavailable"])
def test_a_backend_replica_dying_answers_503_on_every_route_saying_whether_a_resend_is_safe(tmp_path, death):
    """Routes but the approval answered 500 `internal` (the request's fault, said the answer) when the backend
    replica died mid-call; non-idempotent POSTs may have taken effect, so only the others are told to resend."""
    import ray

    from tests.fixtures_serve import in_process

    backend = DyingBackend(ray.exceptions.ActorDiedError() if death == "died" else
                           ray.exceptions.ActorUnavailableError("the replica is unreachable", None))
    with in_process(backend, tmp_path) as (http, auth, _):
        for key, method, path, body, headers, advice in BACKEND_LOST:
            answer = http.request(method, path, json=body, headers={**auth[key], **headers})
            assert answer.status_code == 503 and answer.headers["retry-after"] == "5", (path, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "backend_unavailable" and advice in error["message"], (method, path, error)
            assert "the backend process handling this request was lost" in error["message"]
            assert (_CHECK in error["message"]) == (advice == _CHECK)
        change = http.put("/v1/assets/pump-1", json={"type_name": "pump", "type_version": "1.0.0"},
                          headers=auth["admin"])  # a twin write: the twin path's own 503, as before
        assert change.status_code == 503 and change.json()["error"]["code"] == "twin_unavailable", change.text
        assert "a PUT or DELETE is idempotent" in change.json()["error"]["message"]
        for headers, advice in (({"If-Match": '"3"'}, _SAFE + " (it is conditional"),  # a twin write too
                                ({}, "its type_version says whether the migration was applied")):
            migrated = http.post("/v1/assets/pump-1/migrate", json={"type_version": "2.0.0"},
                                 headers={**auth["admin"], **headers})
            error = migrated.json()["error"]
            assert migrated.status_code == 503 and error["code"] == "twin_unavailable", migrated.text
            assert advice in error["message"], error
        created = http.post("/v1/assets", json={"id": "pump-2", "type_name": "pump", "type_version": "1.0.0"},
                            headers=auth["admin"])  # told to look before creating again, not to "resend telemetry"
        assert "GET /v1/assets/pump-2 shows the asset if it was created" in created.json()["error"]["message"]


def test_an_actor_dying_under_the_backend_is_not_the_backends_death(tmp_path):
    """An actor the backend called dying (Ray wraps it: `RayTaskError(ActorDiedError)`) is not a lost backend:
    its resend advice would be about the wrong process."""
    import ray

    wrapped = ray.exceptions.RayTaskError("list_assets", "traceback", ray.exceptions.ActorDiedError())
    from tests.fixtures_serve import in_process

    with in_process(DyingBackend(wrapped.as_instanceof_cause()), tmp_path) as (http, auth, _):
        answer = http.get("/v1/assets", headers=auth["reader"])
    assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal", answer.text


def test_a_failed_approvals_audited_error_names_no_store_location():
    """The tenant reads its audit log: a command approval that failed on the store put the store's path (or bucket
    URL) in the record's `error`, which every answer scrubs (`scrub_locations`)."""
    from serve_apps.audit_steps import outcome_of

    failed = outcome_of(OSError(5, "Input/output error", "/srv/raytwin/store/commands/acme/c1.json"))
    assert failed == {"status": "error", "error": "OSError: [Errno 5] Input/output error: '<store>'"}
    assert outcome_of(RuntimeError("s3://plant-bucket/store/x failed"))["error"] == "RuntimeError: <store> failed"
    refused = outcome_of(Unprocessable("broker.tls.ca_file '/srv/raytwin/keys.json' is not a CA bundle"))
    assert refused["reason"] == "broker.tls.ca_file '<store>' is not a CA bundle"  # a refused connector's, say


class FinishedShadows:
    """`LiveModels`' shadow calls over finished evaluations of tenant acme's candidates (ref -> run id)."""

    def __init__(self, runs: dict[str, str]):
        from raytwin.shadow import InnovationStats

        self.runs = runs
        self.production, self.candidate = InnovationStats(5, 5, 5, 9.0, 5.0, -20.0), InnovationStats(5, 5, 5, 5.5, 1.0, -5.0)

    def shadows_running(self, timeout_s: float | None = None) -> list[tuple[str, str]]:
        return [("acme", ref) for ref in self.runs]

    def shadow(self, tenant: str, ref: str, timeout_s: float | None = None):
        from actors.live_models import ShadowReport, UnknownShadow
        from actors.shadow import ShadowTwinReport
        from raytwin.shadow import compare

        if tenant != "acme" or ref not in self.runs:
            raise UnknownShadow(f"no shadow evaluation of {ref}")
        p, c = self.production, self.candidate
        twin = ShadowTwinReport(asset_id="zone-1", production_ref="thermal_rc@1.0.0", candidate_ref=ref, target_events=5,
                                skipped_late=0, done=True, production_stats=p, candidate_stats=c,
                                production=p.summary(), candidate=c.summary())
        return ShadowReport(run_id=self.runs[ref], candidate_ref=ref, target_events=5, done=True,
                            comparison=compare(p, c), twins=[twin])

    def stop_shadow(self, tenant: str, ref: str, timeout_s: float | None = None) -> bool:
        return self.runs.pop(ref, None) is not None


def test_a_migration_its_twin_shard_leaves_unanswered_is_503_not_a_request_held(tmp_path):
    """POST /v1/assets/{id}/migrate waited on the backend's migration of the twin without a deadline, unlike the other
    asset writes: a hung shard held the request (an admission slot) for good. Past `shard_create_timeout_s` it is 503
    `twin_unavailable` with `Retry-After`, saying to read the asset before repeating the change."""
    import asyncio

    from tests.fixtures_serve import in_process

    class HungMigration:
        check_writable = staticmethod(lambda: None)

        async def evolution(self, op, tenant, asset_id, body, pre):
            await asyncio.sleep(1.0)  # the shard answers long after the deadline the test sets
            return {}

    with in_process(HungMigration(), tmp_path) as (http, auth, svc):
        svc.twins.create_timeout_s = 0.05
        r = http.post("/v1/assets/room-1/migrate", json={"type_version": "2.0.0"}, headers=auth["admin"])
    assert (r.status_code, r.json()["error"]["code"], r.headers.get("Retry-After")) == (503, "twin_unavailable", "2")
    assert "read the asset before repeating another change" in r.json()["error"]["message"]


def test_reading_a_finished_shadow_evaluation_writes_nothing_the_service_records_it(tmp_path, monkeypatch):
    """A reader's GET of a finished evaluation wrote its evidence to the lifecycle log and audit records under the
    reader's key. The backend records it (`conclude_running`), a writer's DELETE before it ends one; a GET reads."""
    from raytwin.lifecycle import Actor, ModelLifecycle
    from raytwin.registry import ModelRegistry
    from serve_apps import routes_shadow
    from serve_apps.shadow_conclusions import conclude_running
    from tests.fixtures_serve import in_process

    registry = ModelRegistry(str(tmp_path / "store" / "registry" / "acme"))
    lc = ModelLifecycle(registry)
    for version in ("1.0.1", "1.0.2"):
        registry.register("thermal_rc", version, AssetType.from_model(THERMAL_RC))
        lc.submit(f"thermal_rc@{version}", Actor(id="calibrator", tenant="acme"), "fitted")
    models = FinishedShadows({"thermal_rc@1.0.1": "run-1", "thermal_rc@1.0.2": "run-2"})
    monkeypatch.setattr(routes_shadow, "live_models", lambda svc: models)
    with in_process(SimpleNamespace(check_writable=lambda: None), tmp_path) as (http, auth, svc):
        url = "/v1/models/thermal_rc/versions/{}/shadow"
        for _ in range(2):
            read = http.get(url.format("1.0.1"), headers=auth["reader"])
            assert read.status_code == 200 and read.json()["report"]["done"] and read.json()["recorded"] == []
        assert [r.action for r in lc.records("thermal_rc")] == ["submit", "submit"] and svc.audit.records("acme") == []

        concluded: set[str] = set()
        stopped = http.delete(url.format("1.0.2"), headers=auth["writer"])  # a stop first: recorded, then ended
        assert stopped.status_code == 204, stopped.text
        conclude_running(models, lambda tenant: lc, svc.audit, concluded)
        conclude_running(models, lambda tenant: lc, svc.audit, concluded)  # once per run
        evaluated = [(r.version, r.actor) for r in lc.records("thermal_rc") if r.action == "evaluate"]
        assert evaluated == [("1.0.2", "system"), ("1.0.1", "system")] and concluded == {"run-1"}
        audited = [(r.action, r.target, r.key_id, r.phase) for r in svc.audit.records("acme")]
        assert audited == [("model.shadow_stop", "thermal_rc@1.0.2", _key_of(svc, auth["writer"]), "intent"),
                           ("model.evaluate", "thermal_rc@1.0.2", "system", "intent"),
                           ("model.evaluate", "thermal_rc@1.0.2", "system", "outcome"),
                           ("model.shadow_stop", "thermal_rc@1.0.2", _key_of(svc, auth["writer"]), "outcome"),
                           ("model.evaluate", "thermal_rc@1.0.1", "system", "intent"),
                           ("model.evaluate", "thermal_rc@1.0.1", "system", "outcome")]
        for _ in range(2):  # what the service recorded, on every read
            (record,) = http.get(url.format("1.0.1"), headers=auth["reader"]).json()["recorded"]
            assert record["action"] == "evaluate" and "shadow evaluation run-1:" in record["reason"]


def test_a_finished_shadow_evaluation_is_recorded_only_after_its_audit_intent(tmp_path):
    """The service's record of a finished evaluation (evidence on the lifecycle log) was audited after it was
    written: a store failing in between left it with no audit record. Without its intent nothing is recorded (the
    next round records it); with it, one `model.evaluate` in two steps names the log records written."""
    from raytwin.lifecycle import Actor, ModelLifecycle
    from raytwin.registry import ModelRegistry
    from serve_apps.shadow_conclusions import conclude_running
    from serve_apps.store_errors import StoreUnavailable

    registry = ModelRegistry(str(tmp_path / "store" / "registry" / "acme"))
    lc = ModelLifecycle(registry)
    registry.register("thermal_rc", "1.0.1", AssetType.from_model(THERMAL_RC))
    lc.submit("thermal_rc@1.0.1", Actor(id="calibrator", tenant="acme"), "fitted")
    models, audit, concluded = FinishedShadows({"thermal_rc@1.0.1": "run-1"}), AuditLog(str(tmp_path / "store")), set()
    store, audit.fs = audit.fs, AuditWrites(audit.fs, ok=0)
    with pytest.raises(StoreUnavailable, match="model.evaluate of thermal_rc@1.0.1 was not done"):
        conclude_running(models, lambda tenant: lc, audit, concluded)
    assert [r.action for r in lc.records("thermal_rc")] == ["submit"] and concluded == set()
    audit.fs = store
    conclude_running(models, lambda tenant: lc, audit, concluded)
    (_, evaluated) = lc.records("thermal_rc")
    intent, outcome = audit.records("acme")
    assert (intent.action, intent.key_id, intent.phase, intent.details) == (
        "model.evaluate", "system", "intent", {"run_id": "run-1"})
    assert outcome.action_id == intent.action_id and outcome.details == {"run_id": "run-1", "status": "done",
                                                                         "recorded": [{
        "action": "evaluate", "seq": evaluated.seq, "to_stage": "candidate", "hash": evaluated.hash}]}


def test_a_shard_that_leaves_the_shadow_round_unanswered_is_one_line_saying_it_is_retried(caplog):
    """While a shard started or compiled a new twin's kernel, the backend logged `event=shadow_conclusion_failed` with
    a 24-line GetTimeoutError traceback every round (2 s): a normal wait read as a fault. Now one line says it waits."""
    from types import SimpleNamespace

    from ray.exceptions import GetTimeoutError

    from serve_apps.backend import Backend

    class Busy:
        def shadows_running(self, timeout_s):
            raise GetTimeoutError("Get timed out: some object(s) not ready.")

    backend = Backend.__new__(Backend)
    backend.check_writable, backend._watch_stop = lambda: None, _Passes(2)  # two rounds, then closed
    backend.twins, backend.config = SimpleNamespace(models=Busy()), SimpleNamespace(shard_read_timeout_s=0.5)
    backend.audit, backend._concluded = None, set()
    with caplog.at_level("WARNING", logger="raytwin.serve"):
        backend._conclude_shadows()
    said = [r for r in caplog.records if "event=shadow_conclusion" in r.getMessage()]
    assert len(said) == 2 and all(r.exc_info is None for r in said), [r.getMessage() for r in said]
    assert all("event=shadow_conclusion_deferred retry_in_s=2:" in r.getMessage() and "tried again next round"
               in r.getMessage() for r in said)


def test_recording_a_finished_shadow_evaluation_reads_the_lifecycle_log_once_before_it_writes(tmp_path, monkeypatch):
    """One evaluation read its model's lifecycle log three times before recording it: whether its candidate was
    archived, whether it was recorded, and again in `conclude`. One read answers all three (`evaluate` reads the log
    once more: the head it appends after); an evaluation recorded already costs one read."""
    from raytwin.lifecycle import Actor, ModelLifecycle
    from raytwin.registry import ModelRegistry
    from serve_apps.shadow_conclusions import record_finished

    registry = ModelRegistry(str(tmp_path / "store" / "registry" / "acme"))
    lc = ModelLifecycle(registry)
    registry.register("thermal_rc", "1.0.1", AssetType.from_model(THERMAL_RC))
    lc.submit("thermal_rc@1.0.1", Actor(id="calibrator", tenant="acme"), "fitted")
    reads, read, evaluate, read_before_writing = [], lc.records, lc.evaluate, []
    monkeypatch.setattr(lc, "records", lambda model: reads.append(model) or read(model))
    monkeypatch.setattr(lc, "evaluate",
                        lambda *args, **kw: read_before_writing.append(len(reads)) or evaluate(*args, **kw))
    report = FinishedShadows({"thermal_rc@1.0.1": "run-1"}).shadow("acme", "thermal_rc@1.0.1")
    audit = AuditLog(str(tmp_path / "store"))
    [evaluated] = record_finished(report, lc, audit, "acme")
    assert evaluated.action == "evaluate" and read_before_writing == [1]
    reads.clear()
    assert record_finished(report, lc, audit, "acme") == [] and reads == ["thermal_rc"]


def test_the_backends_own_swaps_and_moves_act_only_after_their_audit_intent(tmp_path, caplog):
    """The backend's acts as the system (finishing a promotion's swap a crash interrupted, a type move whose catalog
    write did not follow) were audited after they took place. Without an intent they are not done now, and stay to
    be done (the next start; the asset's next access); done, each leaves its intent and its outcome."""
    from actors.live_models import SwapOutcome
    from raytwin.lifecycle import Actor, ModelLifecycle
    from raytwin.registry import ModelRegistry
    from serve_apps.asset_moves import AssetMoves
    from serve_apps.promotions import finish_interrupted_swaps

    registry = ModelRegistry(str(tmp_path / "store" / "registry" / "acme"))
    lc, approver = ModelLifecycle(registry), Actor(id="ops", tenant="acme", roles={"approver"})
    registry.register("thermal_rc", "1.0.1", AssetType.from_model(THERMAL_RC))
    for stage in ("candidate", "staging", "production"):
        lc.transition("thermal_rc@1.0.1", stage, Actor(id="calibrator", tenant="acme") if stage == "candidate"
                      else approver, "checked")
    swapped: list[str] = []
    models = SimpleNamespace(swap_marks=lambda tenant, model, other_than, timeout_s: {
                                 "zone-1": ("thermal_rc@1.0.0", None)},
                             swap=lambda tenant, artifact, at, marks, timeout_s: swapped.extend(marks) or SwapOutcome(
                                 states=[], refused={"zone-1": "another state layout"}))
    catalog = _MovedCatalog()
    backend = SimpleNamespace(config=SimpleNamespace(store_url=str(tmp_path / "store"), storage_options=None),
                              catalog=catalog,
                              audit=AuditLog(str(tmp_path / "store")), check_writable=lambda: None,
                              changes=SimpleNamespace(write=lambda tenant, write: [
                                  SimpleNamespace(seq=9, **write(9)[0])]),
                              twins=SimpleNamespace(store=SimpleNamespace(load_registration=lambda tenant, asset_id: {
                                  "asset": {"type_name": "pump", "type_version": "2.0.0"}})))
    moves = AssetMoves(backend)
    moves.begin(catalog.asset.model_copy(update={"type_version": "2.0.0"}), "retype")  # the twin moved, then a crash
    audit = backend.audit
    store, audit.fs = audit.fs, AuditWrites(audit.fs, ok=0)
    assert finish_interrupted_swaps(lc, models, "acme", audit) == {} and swapped == []
    assert "event=interrupted_swap_deferred tenant=acme model=thermal_rc@1.0.1 twins=1" in caplog.text
    moves.try_settle("acme", "pump-1")
    assert catalog.asset.type_version == "1.0.0" and ("acme", "pump-1") in moves.pending  # journaled still
    audit.fs = store
    assert audit.records("acme") == []
    assert finish_interrupted_swaps(lc, models, "acme", audit)["thermal_rc@1.0.1"].refused and swapped == ["zone-1"]
    moves.try_settle("acme", "pump-1")
    assert catalog.asset.type_version == "2.0.0" and not moves.pending
    records = audit.records("acme")
    assert [(r.action, r.target, r.key_id, r.phase) for r in records] == [
        ("model.swap", "thermal_rc@1.0.1", "system", "intent"), ("model.swap", "thermal_rc@1.0.1", "system", "outcome"),
        ("asset.update", "pump-1", "system", "intent"), ("asset.update", "pump-1", "system", "outcome")]
    assert records[0].action_id == records[1].action_id != records[2].action_id == records[3].action_id
    assert (records[1].details["swapped"], records[1].details["refused"]) == ([], {"zone-1": "another state layout"})
    assert records[3].details["revision"] == 9 and records[3].details["recovered"] is True


class _MovedCatalog:
    """The catalog of one asset, pump-1, at revision 3, naming type version 1.0.0 until written."""

    def __init__(self):
        self.asset = Asset(id="pump-1", tenant="acme", type_name="pump", type_version="1.0.0")

    def get_asset(self, tenant: str, asset_id: str) -> Asset:
        return self.asset

    def revision(self, tenant: str, kind: str, asset_id: str) -> int:
        return 3

    def update_asset(self, asset: Asset, seq: int) -> None:
        self.asset = asset


def _key_of(svc, headers: dict[str, str]) -> str:
    return svc.keys.authenticate(headers["Authorization"].split()[1]).key_id



def test_a_write_refuses_a_precondition_it_does_not_evaluate_rather_than_ignoring_it(tmp_path):
    """`If-Match` on `PUT /v1/lifecycle-policy` was ignored: the policy another admin had just changed was replaced.
    Every write route answers 412 for a condition it declares no header for, and changes nothing."""
    from serve_apps.api import create_api
    from serve_apps.conditional import unevaluated_conditions
    from tests.fixtures_serve import in_process

    routes = {(route.path, method): route for route in create_api().routes if hasattr(route, "dependant")
              for method in route.methods}
    assert unevaluated_conditions(routes["/v1/assets/{asset_id}/telemetry", "POST"].dependant) == ()
    assert unevaluated_conditions(routes["/v1/assets/{asset_id}", "PUT"].dependant) == ("If-Unmodified-Since",)
    assert unevaluated_conditions(routes["/v1/assets/{asset_id}", "GET"].dependant) == ("If-Unmodified-Since",)
    policy = {"auto_promote": False, "keep_archived": 2, "keep_runs": 20}
    with in_process(SimpleNamespace(check_writable=lambda: None), tmp_path) as (http, auth, _):
        said = {}
        for path, method, header, value in (("/v1/lifecycle-policy", "PUT", "If-Match", '"3"'),
                                            ("/v1/assets/zone-1", "PUT", "If-Unmodified-Since",
                                             "Sat, 05 Dec 2026 12:00:00 GMT"),
                                            ("/v1/connectors/plc/pause", "POST", "If-None-Match", "*")):
            refused = http.request(method, path, json=policy, headers=auth["admin"] | {header: value})
            error = refused.json()["error"]
            assert refused.status_code == 412 and error["code"] == "precondition_failed", refused.text
            assert f"does not evaluate {header}, so {header}: {value} is refused" in error["message"], error
            assert error["details"] == [{"header": header, "current_revision": None}]
            said[path] = error["message"]
        assert "(this write evaluates If-Match and If-None-Match)" in said["/v1/assets/zone-1"]
        assert http.get("/v1/lifecycle-policy", headers=auth["reader"]).json()["keep_archived"] == 5  # unchanged
        assert http.put("/v1/lifecycle-policy", json=policy, headers=auth["admin"]).json()["keep_archived"] == 2


def test_a_read_that_answers_an_etag_evaluates_if_match_and_if_none_match_and_any_other_read_refuses_them(
        tmp_path, monkeypatch):
    """GET routes that answer an ETag ignored If-Match: a client that asked for the representation it held got
    another one (RFC 9110, 13.1.1: 412), and twin state reads ignored If-None-Match. Each read with an ETag now
    answers 412 when If-Match does not name it (strongly: a weak ETag by `*` alone), else 304 when If-None-Match
    names it (weakly; a twin's bare revision never, as it restarts with a re-created asset); a read with no ETag
    refuses both (412, naming the header), as writes refuse what they do not evaluate. The 304 carries the headers
    the 200 does (RFC 9110, 15.4.5; a cache updates its stored answer with them): it carried the ETag alone, so a
    client polling an unchanged asset never saw its type version deprecated, nor a twin's state go stale."""
    from actors.state import DivergenceReport, TwinState
    from serve_apps.deprecation import Deprecation
    from tests.fixtures_serve import in_process

    asset = Asset(id="zone-1", tenant="acme", type_name="room", type_version="1.0.0")
    report = DivergenceReport(nis_mean=1.0, nis_last=1.0, residual_mean={}, residual_rms={}, drift=False,
                              diverged=False)
    twin = TwinState(tenant="acme", asset_id="zone-1", model_ref="room@1.0.0", revision=7, event_time=None,
                     state={"T": 1.0}, std={"T": 0.1}, covariance=[[0.01]], divergence=report, events_applied=7,
                     stale=True)
    deprecated = Deprecation(deprecated_at=datetime(2026, 12, 1, tzinfo=UTC), sunset=datetime(2027, 1, 1, tzinfo=UTC),
                             link="https://example.com/move-on")
    backend = SimpleNamespace(get_asset_revision=lambda tenant, asset_id: (asset, 7),
                              evolution=lambda *args: deprecated, check_writable=lambda: None)
    other, bare = '"6-000000000000"', '"7"'
    #             If-Match: tag, itself strong, in a list, another, *, bare; If-None-Match: tag, strong, other, bare
    expected = {"strong": [200, 200, 200, 412, 200, 200, 304, 304, 200, 304],
                "weak": [412, 412, 412, 412, 200, 412, 304, 304, 200, 200]}
    with in_process(backend, tmp_path) as (http, auth, svc):
        async def state(tenant: str, asset_id: str, at: datetime | None = None) -> dict:
            return twin.model_dump(mode="json")

        monkeypatch.setattr(svc.twins, "state", state)
        private = {"cache-control", "vary"}  # every /v1 answer's (`serve_apps.private_answers`)
        for path, sent in (("/v1/assets/zone-1", {"etag", "deprecation", "sunset", "link", *private}),
                           ("/v1/assets/zone-1/state", {"etag", "raytwin-stale", *private}),
                           ("/v1/assets/zone-1/divergence", {"etag", "raytwin-stale", *private})):
            full = http.get(path, headers=auth["reader"])
            tag = full.headers["etag"]
            assert sent <= full.headers.keys(), full.headers
            strong = tag.removeprefix("W/")
            conditions = [{"If-Match": tag}, {"If-Match": strong}, {"If-Match": f"{other}, {strong}"},
                          {"If-Match": other}, {"If-Match": "*"}, {"If-Match": bare}, {"If-None-Match": tag},
                          {"If-None-Match": strong}, {"If-None-Match": other}, {"If-None-Match": bare}]
            answers = [http.get(path, headers=auth["reader"] | c) for c in conditions]
            kind = "weak" if tag.startswith("W/") else "strong"
            assert [a.status_code for a in answers] == expected[kind], (path, [a.text for a in answers])
            for a in answers:
                if a.status_code == 200:
                    assert a.json() == full.json()
                elif a.status_code == 304:
                    assert not a.content and {h: a.headers.get(h) for h in sent} == {h: full.headers[h] for h in sent}
                else:
                    assert a.json()["error"]["details"] == [{"header": "If-Match", "current_revision": 7}]
            refused = answers[1 if kind == "weak" else 3].json()["error"]["message"]
            assert "If-None-Match" in refused and ("is weak" in refused) == (kind == "weak"), refused
            both = http.get(path, headers=auth["reader"] | {"If-Match": other, "If-None-Match": tag})
            assert both.status_code == 412  # If-Match is evaluated first (RFC 9110, 13.2.2)
        for header in ("If-Match", "If-None-Match"):  # a read without an ETag has nothing to compare: refused
            refused = http.get("/v1/lifecycle-policy", headers=auth["reader"] | {header: '"3"'})
            message = refused.json()["error"]["message"]
            assert refused.status_code == 412 and "nothing is answered" in message, refused.text
            assert f'does not evaluate {header}, so {header}: "3" is refused' in message, message
        assert http.get("/v1/lifecycle-policy", headers={"If-Match": '"3"'}).status_code == 401  # the key first
        for answer in (http.get("/v1/lifecycle-policy", headers=auth["reader"]), refused):
            assert (answer.headers["cache-control"], answer.headers["vary"]) == ("private, no-cache",
                                                                                 "Authorization, X-API-Key")


def test_a_client_revalidating_a_stale_twin_read_once_its_shard_is_back_reads_it_fresh(tmp_path, monkeypatch):
    """A shard back from a restart answers the revision and state its snapshot held, so the stale read's weak ETag
    was current again: a client revalidating its cached stale read got 304, which updates stored headers, never the
    body (RFC 9111, 4.3.4), and a live read sends no `RayTwin-Stale` to replace a stored one, so it kept showing
    `stale: true`. A stale read's ETag now says it is stale: revalidation answers the fresh 200 (and a live read's
    ETag held while the shard goes stale answers the stale one); an unchanged live read is still a 304."""
    from actors.state import DivergenceReport, TwinState
    from tests.fixtures_serve import in_process

    report = DivergenceReport(nis_mean=1.0, nis_last=1.0, residual_mean={}, residual_rms={}, drift=False,
                              diverged=False)
    live = TwinState(tenant="acme", asset_id="zone-1", model_ref="room@1.0.0", revision=7, event_time=None,
                     state={"T": 1.0}, std={"T": 0.1}, covariance=[[0.01]], divergence=report, events_applied=7)
    shown = {"twin": live.model_copy(update={"stale": True})}  # the shard is restarting: its snapshot, as live
    backend = SimpleNamespace(check_writable=lambda: None)
    with in_process(backend, tmp_path) as (http, auth, svc):
        async def state(tenant: str, asset_id: str, at: datetime | None = None) -> dict:
            return shown["twin"].model_dump(mode="json")

        monkeypatch.setattr(svc.twins, "state", state)
        for path in ("/v1/assets/zone-1/state", "/v1/assets/zone-1/divergence"):
            shown["twin"] = live.model_copy(update={"stale": True})
            cached = http.get(path, headers=auth["reader"])
            assert cached.headers["raytwin-stale"] == "true", cached.headers
            shown["twin"] = live  # back: same revision and state
            again = http.get(path, headers=auth["reader"] | {"If-None-Match": cached.headers["etag"]})
            assert again.status_code == 200 and "raytwin-stale" not in again.headers, (path, again.headers)
            assert again.json().get("stale", False) is False and again.headers["etag"] != cached.headers["etag"]
            unchanged = http.get(path, headers=auth["reader"] | {"If-None-Match": again.headers["etag"]})
            assert unchanged.status_code == 304, (path, unchanged.text)
            shown["twin"] = live.model_copy(update={"stale": True})  # and restarting again
            stale = http.get(path, headers=auth["reader"] | {"If-None-Match": again.headers["etag"]})
            assert stale.status_code == 200 and stale.headers["raytwin-stale"] == "true", (path, stale.headers)


def test_every_v1_answer_is_private_to_its_key_and_a_routes_own_cache_control_is_kept():
    """The key picks the tenant, so one URL answers each tenant its own, yet answers said nothing about caching: a
    shared cache may store a GET's 200 without Cache-Control and answer it to another caller (RFC 9111, 4.2.2), and
    only `Authorization` keeps it from doing so, not `X-API-Key` (3.5). Every /v1 answer is now private, asked
    again each time and varies by key; a route's own Cache-Control (the change stream's) is kept, other paths left."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from serve_apps.private_answers import PrivateAnswers

    def answer(request: Request) -> PlainTextResponse:
        return PlainTextResponse("x", headers={"Cache-Control": "no-cache"} if request.path_params["its"] else {})

    app = PrivateAnswers(Starlette(routes=[Route("/v1/a{its:path}", answer), Route("/docs{its:path}", answer)]))
    with TestClient(app) as http:
        said = {path: (r.headers.get("cache-control"), r.headers.get("vary"))
                for path in ("/v1/a", "/v1/a/own", "/docs", "/docs/own") for r in [http.get(path)]}
    assert said == {"/v1/a": ("private, no-cache", "Authorization, X-API-Key"),
                    "/v1/a/own": ("no-cache", "Authorization, X-API-Key"), "/docs": (None, None),
                    "/docs/own": ("no-cache", None)}
    # behind a Serve route prefix (`cluster.spec`'s serve.route_prefix) the path holds it, and answers went unmarked
    with TestClient(app, root_path="/raytwin") as http:
        prefixed = {path: http.get(f"/raytwin{path}").headers.get("cache-control") for path in ("/v1/a", "/docs")}
    assert prefixed == {"/v1/a": "private, no-cache", "/docs": None}


def test_the_api_versions_deprecation_is_announced_behind_a_serve_route_prefix():
    """Ray Serve mounts the app at its route prefix, which the request's path holds (``/raytwin/v1/...``, its
    ``root_path`` ``/raytwin``): the /v1 check of the path alone announced the API version's deprecation to no caller
    behind a prefix (`serve_apps.private_answers.v1_route`)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from serve_apps.deprecation import ApiDeprecationHeaders, Deprecation

    app = Starlette(routes=[Route("/{its:path}", lambda request: PlainTextResponse("x"))],
                    middleware=[Middleware(ApiDeprecationHeaders)])
    mark = Deprecation(deprecated_at=datetime(2026, 11, 1, tzinfo=UTC))
    app.state.services = SimpleNamespace(config=SimpleNamespace(api_deprecation=mark))
    with TestClient(app, root_path="/raytwin") as http:
        said = {path: "deprecation" in http.get(f"/raytwin{path}").headers for path in ("/v1/assets", "/docs")}
    assert said == {"/v1/assets": True, "/docs": False}


def test_every_route_but_health_authenticates_its_caller_and_every_write_needs_a_writer():
    """Each route, the included routers' too, depends on `serve_apps.deps.require` (a route without it would know no
    tenant to keep its caller to), and each write on a writer at least: all but a read sent as POST (`/v1/query`) and
    the command approval, which checks the admin role in its body to audit the refusal too."""
    import inspect

    from serve_apps.api import create_api
    from serve_apps.auth import Role

    def routes(entries):
        for entry in entries:
            if hasattr(entry, "original_router"):  # an included router (FastAPI >= 0.160 keeps it whole)
                yield from routes(entry.original_router.routes)
            elif hasattr(entry, "dependant"):
                yield entry

    def roles(dependant):
        for dependency in dependant.dependencies:
            if dependency.call.__qualname__ == "require.<locals>.dependency":
                yield inspect.getclosurevars(dependency.call).nonlocals["role"]
            yield from roles(dependency)

    app = create_api()
    found = {(method, route.path): max(roles(route.dependant), default=None) for route in routes(app.routes)
             for method in route.methods - {"HEAD"}}
    assert len(found) == sum(len(ops) for ops in app.openapi()["paths"].values())  # the walk missed no route
    assert {route for route, role in found.items() if role is None} == {("GET", "/v1/health"),
                                                                         ("GET", "/v1/health/ready")}
    below_writer = {route for route, role in found.items() if route[0] != "GET" and role < Role.writer}
    assert below_writer == {("POST", "/v1/query"), ("POST", "/v1/commands/{command_id}/approve")}


def test_shadow_routes_answer_503_while_the_twin_shards_are_not_there(tmp_path, monkeypatch):
    """Ray's `ValueError` for a shard actor it does not know (the backend restarting them) was answered 400
    `bad_request` with Ray's own text ("Failed to look up actor with name 'twinshard-...'"), as if the request were
    wrong. It is 503 `twin_unavailable` with `Retry-After` now."""
    import serve_apps.routes_shadow as routes_shadow
    from tests.fixtures_serve import in_process

    def unknown(name, namespace=None):
        raise ValueError(f"Failed to look up actor with name '{name}'.")

    monkeypatch.setattr(routes_shadow.ray, "get_actor", unknown)
    with in_process(SimpleNamespace(), tmp_path) as (http, auth, _):
        answer = http.get("/v1/models/thermal_rc/versions/1.0.0/shadow", headers=auth["reader"])
    error = answer.json()["error"]
    assert answer.status_code == 503 and error["code"] == "twin_unavailable", answer.text
    assert "twinshard" not in error["message"] and answer.headers["Retry-After"] == "2"


def test_pruning_a_model_the_tenant_does_not_have_is_404_not_an_empty_report(tmp_path):
    """`POST /v1/models/{name}/prune` with a mistyped name answered 200 with nothing removed, as if retention had run;
    like the model's other lifecycle routes it answers 404, auditing nothing."""
    from tests.fixtures_serve import in_process

    backend = SimpleNamespace(check_writable=lambda: None, list_assets=lambda *args: [])
    with in_process(backend, tmp_path) as (http, auth, svc):
        refused = http.post("/v1/models/thermal_rcc/prune", headers=auth["admin"])
        assert refused.status_code == 404 and refused.json()["error"]["message"] == "no model thermal_rcc", refused.text
        assert svc.audit.records("acme") == []


def test_a_tenant_cannot_have_another_tenants_stored_fmu_opened_to_validate_its_request(tmp_path, reference_fmus):
    """The service's FMU roots were the store's whole registry: another tenant's asset type naming acme's stored FMU
    (its URL) had the FMU opened to validate it, and a compatibility check or a unit mismatch told that tenant its
    variables and units. A request's FMUs now come from its own tenant's registry only."""
    from raytwin.fmu import store_fmu
    from tests.fixtures_serve import in_process

    with in_process(SimpleNamespace(list_types=lambda tenant, name: []), tmp_path) as (http, auth, svc):
        stored = store_fmu(reference_fmus[(2, "VanDerPol")], svc.config.url("registry", "acme"))
        vdp = AssetType.from_model(stored.declare(mu={"lower": 0.1, "upper": 5.0}),
                                   name="vdp", version="1.0.0").model_dump(mode="json")
        own = http.post("/v1/asset-types/compatibility", json=vdp, headers=auth["admin"])
        assert own.status_code == 200, own.text
        kelvins = {**vdp, "states": {**vdp["states"], "x0": {**vdp["states"]["x0"], "unit": "K"}}}
        for body in (vdp, kelvins):
            refused = http.post("/v1/asset-types/compatibility", json=body, headers=auth["other"])
            message = refused.json()["error"]["message"]
            assert refused.status_code == 422 and "opens only FMUs stored in its registry, under your tenant's" in message, message


def test_a_precondition_a_write_ignores_is_refused_only_after_the_key_and_role_are_checked(tmp_path):
    """The 412 for a condition a write does not evaluate came before authentication: an anonymous caller sending
    If-Match got 412 instead of 401 (what the route evaluates, and that it exists, told to anyone), and telemetry's own
    refusal ran before the key too. Now 401 without a valid key, 403 below the route's role, then 412."""
    from tests.fixtures_serve import in_process

    policy = {"auto_promote": False, "keep_archived": 2, "keep_runs": 20}
    event = {"events": [{"asset_id": "pump-1", "event_time": "2026-12-06T12:00:00Z", "values": {"q": 1.0}}]}
    cases = (("PUT", "/v1/lifecycle-policy", policy, "If-Match", '"3"', "admin"),
             ("PUT", "/v1/assets/zone-1", policy, "If-Unmodified-Since", "Sat, 05 Dec 2026 12:00:00 GMT", "admin"),
             ("POST", "/v1/connectors/plc/pause", None, "If-None-Match", "*", "admin"),  # a router's route
             ("POST", "/v1/assets/pump-1/telemetry", event, "If-Match", '"3"', "writer"))  # telemetry's own refusal
    with in_process(SimpleNamespace(check_writable=lambda: None), tmp_path) as (http, auth, _):
        for method, path, body, header, value, role in cases:
            for credentials, status in (({}, 401), ({"Authorization": "Bearer rtk_000000000000_wrong"}, 401),
                                        ({"X-API-Key": ""}, 401), (auth["reader"], 403), (auth[role], 412)):
                answer = http.request(method, path, json=body, headers=credentials | {header: value})
                assert answer.status_code == status, (method, path, credentials, answer.text)
                assert (header in answer.json()["error"]["message"]) == (status == 412), answer.text


def test_a_precondition_is_refused_only_after_a_role_the_route_checks_in_its_body(tmp_path):
    """Command approval and bulk delete / retype check the admin role in their body: a writer sending If-Match got the
    412 (what the route evaluates) before its 403. Now 403, audited as before (`access.denied`, and the approval's own
    refusal record); an admin still gets 412, before anything is read or sent (a refused approval attempt, audited)."""
    from tests.fixtures_serve import in_process

    cases = (("/v1/commands/c1/approve", None), ("/v1/bulk", {"q": "", "action": "delete"}),
             ("/v1/bulk", {"q": "", "action": "retype", "type_version": "2.0.0"}))
    with in_process(SimpleNamespace(check_writable=lambda: None), tmp_path) as (http, auth, svc):
        for path, body in cases:
            for name, status in (("writer", 403), ("admin", 412)):
                answer = http.post(path, json=body, headers=auth[name] | {"If-Match": '"3"'})
                assert answer.status_code == status, (path, body, name, answer.text)
                assert ("If-Match" in answer.json()["error"]["message"]) == (status == 412), answer.text
        denied = [r.details["route"] for r in svc.audit.records("acme") if r.action == "access.denied"]
        assert denied == ["/v1/commands/{command_id}/approve", "/v1/bulk", "/v1/bulk"], denied
        assert [r["http_status"] for r in _approval_audit(svc, "c1", "acme")] == [403, 412]  # every attempt


def test_a_backend_refusal_raised_to_serve_is_one_log_line_and_a_fault_keeps_its_traceback(tmp_path, monkeypatch):
    """Serve's replica logs what its method raises with ``logger.exception("Request failed.")`` on its own logger:
    for the backend's refusals (404 for telemetry to an unknown asset, ...) ~40 lines each, at ERROR, which a tenant
    repeats at will. A started Backend keeps a refusal to one INFO line; a fault keeps its traceback. (It exports
    the service's configured shard count once, which `raytwin status` counts the shards reporting against.)"""
    import logging

    from ray.serve._private.constants import SERVE_LOGGER_NAME

    from actors.routing import shard_prefix
    from raytwin import metrics
    from serve_apps.backend import Backend

    exported: list[tuple[float, dict[str, str]]] = []
    monkeypatch.setattr(metrics, "SHARDS_CONFIGURED", SimpleNamespace(set=lambda v, **tags: exported.append((v, tags))))
    serve_log = logging.getLogger(SERVE_LOGGER_NAME)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    serve_log.addHandler(handler)
    config = ServeConfig(store_url=str(tmp_path / "store"), keys_file=str(tmp_path / "keys.json"),
                         namespace=f"refusals-{secrets.token_hex(4)}")
    backend = Backend(config)
    read_only = _raised_in_a_shard(OSError(30, "Read-only file system"), through_the_store=True)
    try:
        for raised in (NotFound("no asset 'zone-9'"), read_only, RuntimeError("the shard's answer was corrupt")):
            try:
                raise raised
            except Exception:
                serve_log.exception("Request failed.")  # as ray.serve._private.replica does
    finally:
        serve_log.removeHandler(handler)
        backend.close()
    refused, outage, fault = records
    assert (refused.levelno, refused.exc_info, refused.getMessage()) == (
        logging.INFO, None, "event=backend_request_refused status=404 code=not_found error=NotFound")
    assert (outage.levelno, outage.exc_info, outage.getMessage()) == (  # a store outage: every request, alike
        logging.WARNING, None,
        "event=backend_request_refused status=503 code=store_unavailable error=StoreIOError reason=read_only")
    assert fault.levelno == logging.ERROR and fault.exc_info[0] is RuntimeError
    # `twin_shards` (default), with which shard actors on the cluster are the service's (`raytwin status`)
    assert exported == [(2, {"namespace": config.namespace, "prefix": shard_prefix(config.url("twins"))})]


def test_a_method_a_path_does_not_take_names_every_method_it_takes_and_an_unknown_path_points_to_the_docs(tmp_path):
    """An app developer's find: `PATCH /v1/assets/zone-1` answered 405 with `Allow: GET`, though the path takes GET,
    PUT and DELETE (Starlette names the methods of the first route of the path only), and the message said
    "Method Not Allowed" alone; an unknown path said "Not Found". Now `Allow` and the message name every method of
    the path, and a path no route has says where the routes are listed."""
    from tests.fixtures_serve import in_process

    with in_process(object(), tmp_path) as (http, auth, _):
        refused = http.patch("/v1/assets/zone-1", json={}, headers=auth["admin"])
        assert refused.status_code == 405 and refused.headers["allow"] == "DELETE, GET, PUT"
        assert refused.json()["error"]["message"] == ("PATCH is not a method of /v1/assets/zone-1: it takes DELETE, "
                                                      "GET, PUT")
        assert http.delete("/v1/query", headers=auth["admin"]).headers["allow"] == "POST"
        unknown = http.get("/v1/asset", headers=auth["admin"])
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
        assert "no route GET /v1/asset" in unknown.json()["error"]["message"]
        assert "/openapi.json" in unknown.json()["error"]["message"]


def test_the_openapi_declares_the_etag_of_every_answer_that_carries_one_and_the_retry_after_of_refusals():
    """An app developer's find: the committed OpenAPI declared no `ETag` on any answer, though the reads and writes of
    assets, types, twin states and model lifecycles send one and `If-Match` takes it (a generated client never learnt
    of it), nor the `Retry-After` of 429 and 503."""
    from serve_apps.api import create_api

    paths = create_api().openapi()["paths"]
    carrying = {("get", "/v1/assets/{asset_id}", "200"), ("post", "/v1/assets", "201"),
                ("put", "/v1/assets/{asset_id}", "200"), ("put", "/v1/assets/{asset_id}", "201"),
                ("get", "/v1/asset-types/{name}/{version}", "200"), ("post", "/v1/asset-types", "200"),
                ("post", "/v1/asset-types", "201"), ("get", "/v1/assets/{asset_id}/state", "200"),
                ("get", "/v1/assets/{asset_id}/divergence", "200"), ("post", "/v1/assets/{asset_id}/drift/clear", "200"),
                ("post", "/v1/assets/{asset_id}/migrate", "200"), ("get", "/v1/models/{model}/lifecycle", "200"),
                ("post", "/v1/models/{model}/versions/{version}/transitions", "201"),
                ("post", "/v1/models/{model}/rollback", "201"),
                ("get", "/v1/assets/{asset_id}", "304"), ("get", "/v1/asset-types/{name}/{version}", "304"),
                ("get", "/v1/assets/{asset_id}/state", "304"), ("get", "/v1/assets/{asset_id}/divergence", "304"),
                ("get", "/v1/models/{model}/lifecycle", "304")}  # each read with an ETag evaluates If-None-Match
    declared = {(method, path, status) for path, ops in paths.items() for method, op in ops.items()
                for status, answer in op["responses"].items() if "ETag" in answer.get("headers", {})}
    assert declared == carrying
    assert paths["/v1/assets/{asset_id}"]["get"]["responses"]["200"]["content"]  # merged into the model's answer
    for status in ("429", "503"):
        assert "Retry-After" in paths["/v1/query"]["post"]["responses"][status]["headers"]


def test_a_put_of_an_asset_that_does_not_exist_says_how_to_create_it(tmp_path):
    """An app developer's find: `PUT /v1/assets/zone-3` of a new id answered 404 "asset zone-3 not found", so a
    client expecting PUT to create (as many APIs' do) learnt nothing of how to; now the 404 says to POST it, or to
    PUT it with `If-None-Match: *`."""
    from tests.fixtures_serve import in_process

    class Missing:
        def update_asset(self, asset, pre):
            raise NotFound(f"asset {asset.id} not found")

    with in_process(Missing(), tmp_path) as (http, auth, _):
        body = {"type_name": "thermal_rc", "type_version": "1.0.0"}
        missing = http.put("/v1/assets/zone-3", json=body, headers=auth["admin"])
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert missing.json()["error"]["message"] == ("asset zone-3 not found: PUT replaces an asset; create it with POST "
                                                  "/v1/assets, or with this PUT and If-None-Match: *")
