"""The model lifecycle (raytwin.lifecycle) through the library and `raytwin registry`: stages, four eyes,
rollback, compare-and-set under concurrency (local disk and S3), the tamper-evident log, retention."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import raytwin.lifecycle as lifecycle_module
from raytwin.cli import app
from raytwin.contracts import Asset, AssetType
from raytwin.lifecycle import (
    Actor,
    ApprovalRequired,
    ChainBroken,
    Evidence,
    LifecycleError,
    LifecyclePolicy,
    ModelLifecycle,
    PruneIncomplete,
    TenantMismatch,
    TransitionConflict,
    UnknownModel,
)
from raytwin.registry import ModelRegistry, RegistryError
from raytwin.sim import THERMAL_RC
from raytwin.storage import canonical_json, filesystem, write_once
from sweeps.runs import RunRecord, RunStore

THERMAL = AssetType.from_model(THERMAL_RC)
ALICE = Actor(id="alice", tenant="acme")  # writes candidates
BOB = Actor(id="bob", tenant="acme", roles=frozenset({"approver"}))
CAROL = Actor(id="carol", tenant="acme", roles=frozenset({"approver"}))
EVE = Actor(id="eve", tenant="globex", roles=frozenset({"approver"}))
RUN = "calibration-20260105T120000Z-1a2b3c4d"


def _lifecycle(url: str, versions: int) -> ModelLifecycle:
    registry = ModelRegistry(url)
    for i in range(versions):
        registry.register("zone", f"1.{i}.0", THERMAL, {"R_io": 0.01 * (1 + i / 10)})
    return ModelLifecycle(registry)


def _to_staging(lc: ModelLifecycle, version: str, author: Actor = ALICE) -> None:
    lc.submit(f"zone@{version}", author, "calibrated on last week", Evidence(run_ids=[RUN]))
    lc.transition(f"zone@{version}", "staging", author, "shadow evaluation passed")


@pytest.fixture
def lc(tmp_path) -> ModelLifecycle:
    return _lifecycle(str(tmp_path / "registry"), 3)


def test_stages_four_eyes_and_rollback(lc):
    assert lc.stage("zone@1.0.0") == "candidate"  # registered, never submitted
    with pytest.raises(LifecycleError, match="never submitted: submit it as a candidate first"):
        lc.transition("zone@1.0.0", "staging", ALICE, "skip")
    _to_staging(lc, "1.0.0")
    with pytest.raises(ApprovalRequired, match="needs a principal with the 'approver' role"):
        lc.transition("zone@1.0.0", "production", ALICE, "self-service")
    author_approver = Actor(id="alice", tenant="acme", roles=frozenset({"approver"}))
    with pytest.raises(ApprovalRequired, match="alice is the author of zone@1.0.0 and may not approve it"):
        lc.transition("zone@1.0.0", "production", author_approver, "my own")
    first = lc.transition("zone@1.0.0", "production", BOB, "four eyes", Evidence(shadow_metrics={"nis": 1.01}))
    assert (first.action, first.actor, first.displaced, first.automatic) == ("promote", "bob", None, False)

    lc.submit("zone@1.1.0", ALICE, "second fit")
    with pytest.raises(LifecycleError, match="candidate; it cannot move to production: from candidate it may move "
                                             "to staging, archived"):
        lc.transition("zone@1.1.0", "production", BOB, "skip staging")
    lc.transition("zone@1.1.0", "staging", ALICE, "ok")
    second = lc.transition("zone@1.1.0", "production", CAROL, "better")
    assert second.displaced == "1.0.0"
    assert (lc.stage("zone@1.0.0"), lc.stage("zone@1.1.0")) == ("archived", "production")
    with pytest.raises(LifecycleError, match="archived; it cannot move to production: archived versions are never "
                                             "promoted again"):
        lc.transition("zone@1.0.0", "production", BOB, "bring it back")
    with pytest.raises(ApprovalRequired, match="rolling zone back needs the 'approver' role"):
        lc.rollback("zone", ALICE, "regression")

    back = lc.rollback("zone", BOB, "innovations out of band")
    assert (back.version, back.displaced, back.action) == ("1.0.0", "1.1.0", "rollback")
    assert (lc.stage("zone@1.0.0"), lc.stage("zone@1.1.0")) == ("production", "archived")
    with pytest.raises(LifecycleError, match="no previous production version"):
        lc.rollback("zone", BOB, "again")
    state = lc.verify("zone")
    assert [r.action for r in lc.records("zone")] == ["submit", "stage", "promote", "submit", "stage", "promote",
                                                     "rollback"]
    assert state.revision == 6 and state.versions["1.1.0"].author == "alice"

    # production left with no way back in (archived versions are never promoted again) needs an approver too
    with pytest.raises(ApprovalRequired, match="archiving zone@1.0.0, the production version, needs the 'approver' "
                                               "role \\(actor alice has none\\)"):
        lc.transition("zone@1.0.0", "archived", ALICE, "retire")
    assert lc.stage("zone@1.0.0") == "production"
    retired = lc.transition("zone@1.0.0", "archived", BOB, "retire")
    assert (retired.action, retired.automatic, lc.verify("zone").production) == ("archive", False, None)


def test_verify_refuses_a_model_the_registry_does_not_know_and_passes_a_registered_one_with_no_log(lc):
    """`verify("zne")` (a typo) returned an empty, intact state in Python, where the CLI and the API refuse it."""
    assert lc.verify("zone").revision == -1  # registered, nothing submitted yet: a lifecycle about to start
    with pytest.raises(RegistryError, match=r"^no model zne in this registry: check the model's name") as unknown:
        lc.verify("zne")
    assert unknown.value.registry_url == lc.registry.url


def test_current_refuses_a_model_the_registry_does_not_know_naming_the_known_ones(lc):
    """`current("zne")` (what a request reads) answered an empty state, as if a lifecycle were about to start."""
    assert lc.current("zone").revision == -1  # registered, nothing submitted yet
    for _ in range(2):  # the empty state is remembered: the second call asks again
        with pytest.raises(UnknownModel, match=r"^no model zne in this registry: check the model's name \(it holds "
                                               r"zone\), or register a version of zne first") as unknown:
            lc.current("zne")
        assert unknown.value.registry_url == lc.registry.url
    with pytest.raises(UnknownModel, match="no model zne"):
        lc.rollback("zne", BOB, "back")


def test_requests_on_a_type_without_a_registered_model_pass_the_lifecycle_as_before(lc):
    """A type the catalog holds from before types were registered stays deletable, and an asset naming an unknown
    type is answered by the catalog (404), not by the lifecycle's `UnknownModel`."""
    from serve_apps.backend import Backend
    from serve_apps.type_usage import refuse_held_type

    refuse_held_type(lc, [], "legacy", "1.0.0")
    backend = SimpleNamespace(_registry=lambda tenant: lc.registry)
    Backend._require_production(backend, Asset(id="a", tenant="acme", type_name="legacy", type_version="1.0.0"))


def test_another_tenants_model_and_bad_evidence_are_refused(lc):
    _to_staging(lc, "1.0.0")
    with pytest.raises(TenantMismatch, match="model zone belongs to tenant acme; eve of tenant globex may not"):
        lc.submit("zone@1.1.0", EVE, "mine now")
    with pytest.raises(TenantMismatch):
        lc.transition("zone@1.0.0", "production", EVE, "approve from outside")
    with pytest.raises(ValueError, match="fit_report"):
        Evidence(fit_report="see my laptop")
    with pytest.raises(ValueError, match="run_ids"):
        Evidence(run_ids=["rm -rf /"])
    with pytest.raises(LifecycleError, match="reason"):
        lc.transition("zone@1.0.0", "archived", ALICE, "")
    assert len(lc.records("zone")) == 2


def test_the_setter_of_a_recalibration_policy_may_not_approve_its_candidate(tmp_path):
    """One approver key set the drift recalibration policy (free parameters, noise, window), sent the telemetry
    and promoted the fit alone: the candidate's author is the system `recalibration`, which is no second pair
    of eyes. The setter recorded in the candidate's metadata is refused; another approver may promote it."""
    from raytwin.registry import POLICY_SET_BY

    registry = ModelRegistry(str(tmp_path / "registry"))
    registry.register("zone", "1.0.1", THERMAL, {"R_io": 0.02}, metadata={POLICY_SET_BY: "bob"})
    lc = ModelLifecycle(registry)
    _to_staging(lc, "1.0.1", author=Actor(id="recalibration", tenant="acme"))
    with pytest.raises(ApprovalRequired, match=r"^bob is the setter of the recalibration policy \(its free "
                                               r"parameters, noise and window\) that fitted zone@1.0.1 and "
                                               r"may not approve it \(four eyes\): another principal with the "
                                               r"'approver' role must promote it \(tenant acme's policy does not "
                                               r"allow automatic promotion\)$"):
        lc.transition("zone@1.0.1", "production", BOB, "fit looks fine")
    assert lc.stage("zone@1.0.1") == "staging"
    assert lc.transition("zone@1.0.1", "production", CAROL, "fit report checked").actor == "carol"


def test_automatic_promotion_is_a_tenant_policy(lc):
    _to_staging(lc, "1.0.0")
    _to_staging(lc, "1.1.0", author=BOB)
    with pytest.raises(ApprovalRequired, match=r"^bob is the author of zone@1.1.0 and may not approve it \(four eyes\)"):
        lc.transition("zone@1.1.0", "production", BOB, "mine")
    lc.set_policy("acme", LifecyclePolicy(auto_promote=True))
    record = lc.transition("zone@1.0.0", "production", ALICE, "policy allows it")
    assert record.automatic and lc.stage("zone@1.0.0") == "production"
    # an approver-author promotes as any writer may under the policy: automatically, not as its own approver
    # (it was refused, "another principal must promote it", which the policy does not ask)
    record = lc.transition("zone@1.1.0", "production", BOB, "policy allows it")
    assert record.automatic and lc.stage("zone@1.1.0") == "production"
    # one approver alone switching four eyes off: its policy promotes nothing its setter had a hand in
    lc.set_policy("acme", LifecyclePolicy(auto_promote=True), set_by=frozenset({"bob", "key-b1"}))
    assert lc.policy("acme") == LifecyclePolicy(auto_promote=True)
    _to_staging(lc, "1.2.0", author=BOB)
    for who in (BOB, ALICE):
        with pytest.raises(ApprovalRequired, match=r"^zone@1.2.0: the tenant's automatic promotion was set by bob, "
                                                   r"key-b1, the author of zone@1.2.0: it promotes no version"):
            lc.transition("zone@1.2.0", "production", who, "policy allows it")
    assert not lc.transition("zone@1.2.0", "production", CAROL, "reviewed").automatic  # a second pair of eyes
    with pytest.raises(ValueError, match="keep_archived"):
        LifecyclePolicy(keep_archived=-1)
    assert lc.policy("globex") == LifecyclePolicy()  # untouched tenant: the safe default


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exclusive_writes_have_one_winner(where, tmp_path, request, monkeypatch):
    url = str(tmp_path) if where == "local" else request.getfixturevalue("s3_url")
    if where == "s3":  # widen the store's window between a conditional write's check and its write (in-process moto)
        from moto.s3.models import S3Backend

        put = S3Backend.put_object
        monkeypatch.setattr(S3Backend, "put_object", lambda *a, **k: (time.sleep(0.05), put(*a, **k))[1])
    fs, root = filesystem(url)
    fs.makedirs(root, exist_ok=True)
    wins, barrier = [], threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        try:
            write_once(fs, f"{root}/seq-0.json", f"writer {i}".encode())
            wins.append(i)
        except FileExistsError:
            pass

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(wins) == 1 and fs.cat_file(f"{root}/seq-0.json") == f"writer {wins[0]}".encode()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_promotions_do_not_both_succeed(where, tmp_path, request):
    url = str(tmp_path / "registry") if where == "local" else request.getfixturevalue("s3_url") + "/registry"
    lc = _lifecycle(url, 3)
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        _to_staging(lc, version)
    revision = lc.verify("zone").revision
    outcomes: dict[str, str] = {}
    barrier = threading.Barrier(3)

    def promote(version: str, approver: Actor) -> None:
        barrier.wait()
        try:
            ModelLifecycle(ModelRegistry(url)).transition(f"zone@{version}", "production", approver, "race",
                                                          expected_revision=revision)
            outcomes[version] = "won"
        except TransitionConflict as exc:
            outcomes[version] = str(exc)

    threads = [threading.Thread(target=promote, args=(v, a)) for v, a in
               (("1.0.0", BOB), ("1.1.0", CAROL), ("1.2.0", BOB))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [v for v, o in outcomes.items() if o == "won"]
    assert len(winners) == 1, outcomes
    assert all("reload and retry" in o for o in outcomes.values() if o != "won")
    state = lc.verify("zone")
    assert state.production == winners[0] and state.revision == revision + 1


def _chain(tmp_path: Path) -> tuple[ModelLifecycle, Path]:
    lc = _lifecycle(str(tmp_path / "registry"), 2)
    _to_staging(lc, "1.0.0")
    lc.transition("zone@1.0.0", "production", BOB, "approved")
    _to_staging(lc, "1.1.0")  # 5 records: 0..4
    return lc, tmp_path / "registry" / "lifecycle" / "zone" / "log"


def test_editing_deleting_or_reordering_a_record_is_detected(tmp_path):
    lc, log = _chain(tmp_path)
    head = lc.verify("zone").head_hash
    pristine = {p.name: p.read_bytes() for p in log.iterdir()}

    def restore() -> None:
        shutil.rmtree(log)
        log.mkdir()
        for name, data in pristine.items():
            (log / name).write_bytes(data)

    # edited: the approver's name changed, hash left alone
    record = json.loads(pristine["00000002.json"])
    (log / "00000002.json").write_bytes(canonical_json({**record, "actor": "alice"}))
    with pytest.raises(ChainBroken, match="record 2 does not match its hash") as err:
        lc.verify("zone")
    assert err.value.record == 2
    with pytest.raises(ChainBroken):  # no transition on a broken chain
        lc.transition("zone@1.1.0", "production", BOB, "go")
    # edited and re-hashed: the next record no longer links to it
    body = {k: v for k, v in record.items() if k != "hash"} | {"actor": "alice"}
    rehashed = {**body, "hash": hashlib.sha256(canonical_json(body)).hexdigest()}
    (log / "00000002.json").write_bytes(canonical_json(rehashed))
    with pytest.raises(ChainBroken, match="record 3 does not link to the record before it"):
        lc.verify("zone")
    restore()
    # deleted in the middle, renumbered to hide the gap
    (log / "00000001.json").unlink()
    for i, name in enumerate(sorted(p.name for p in log.iterdir())):
        (log / name).rename(log / f"tmp-{i}")
    for i in range(4):
        (log / f"tmp-{i}").rename(log / f"{i:08d}.json")
    with pytest.raises(ChainBroken, match="record 1 has sequence number 2"):
        lc.verify("zone")
    restore()
    # reordered: two records swap places
    (log / "00000003.json").write_bytes(pristine["00000004.json"])
    (log / "00000004.json").write_bytes(pristine["00000003.json"])
    with pytest.raises(ChainBroken, match="record 3 has sequence number 4"):
        lc.verify("zone")
    restore()
    # the last record removed: only the head hash noted elsewhere can tell
    (log / "00000004.json").unlink()
    assert lc.verify("zone").revision == 3
    with pytest.raises(ChainBroken, match="records were removed from the end"):
        lc.verify("zone", expected_head=head)
    restore()
    assert lc.verify("zone", expected_head=head).revision == 4


def _reads(lc: ModelLifecycle, monkeypatch) -> list[str]:
    """What `lc` reads of its lifecycle logs from now on, in order: a record's file name, ``ls`` for a listing."""
    read: list[str] = []
    cat_file, ls = lc.fs.cat_file, lc.fs.ls

    def note(path: str, what: str) -> None:
        if "/lifecycle/" in str(path):
            read.append(what)

    monkeypatch.setattr(lc.fs, "cat_file", lambda path, *a, **k: note(path, str(path).rsplit("/", 1)[-1]) or
                        cat_file(path, *a, **k))
    monkeypatch.setattr(lc.fs, "ls", lambda path, *a, **k: note(path, "ls") or ls(path, *a, **k))
    return read


def test_a_request_reads_only_the_records_after_the_verified_prefix_and_checks_them(tmp_path, monkeypatch):
    lc, log = _chain(tmp_path)
    lc.verify("zone")  # records 0..4: the prefix
    other = _lifecycle(str(tmp_path / "registry"), 0)  # another writer appends record 5
    other.transition("zone@1.1.0", "production", CAROL, "approved")
    read = _reads(lc, monkeypatch)
    assert lc.stage("zone@1.1.0") == "production"
    assert read == ["00000004.json", "00000005.json", "00000006.json"]  # the prefix's last, the new one, none after
    read.clear()
    assert lc.stage("zone@1.0.0") == "archived"
    assert read == ["00000005.json", "00000006.json"]
    # a record someone else appended that is not sound is refused, and so are transitions after it
    forged = json.loads((log / "00000005.json").read_bytes()) | {"seq": 6, "actor": "mallory"}
    (log / "00000006.json").write_bytes(canonical_json(forged))
    with pytest.raises(ChainBroken, match="record 6 does not match its hash"):
        lc.stage("zone@1.1.0")
    with pytest.raises(ChainBroken, match="record 6"):
        lc.transition("zone@1.1.0", "archived", BOB, "retire")


def test_an_old_record_edited_is_found_by_the_full_verify_and_the_audit_and_refused_until_restored(
        tmp_path, caplog):
    lc, log = _chain(tmp_path)
    lc.verify("zone")
    pristine = (log / "00000001.json").read_bytes()
    (log / "00000001.json").write_bytes(canonical_json(json.loads(pristine) | {"actor": "mallory"}))
    assert lc.stage("zone@1.1.0") == "staging"  # a request reads no record of the verified prefix (documented)
    with pytest.raises(ChainBroken, match="record 1 does not match its hash"):
        lc.verify("zone")  # the explicit check (CLI, GET .../lifecycle/verify)
    (log / "00000001.json").write_bytes(pristine)
    lc.verify("zone")
    (log / "00000001.json").write_bytes(canonical_json(json.loads(pristine) | {"actor": "mallory"}))
    broken = lc.audit()  # the backend's start and its periodic audit
    assert list(broken) == ["zone"] and broken["zone"].record == 1
    assert "event=lifecycle_chain_broken model=zone record=1" in caplog.text
    with pytest.raises(ChainBroken, match="record 1"):  # refused until the log verifies again
        lc.transition("zone@1.1.0", "production", BOB, "go")
    (log / "00000001.json").write_bytes(pristine)  # restored from a backup
    assert lc.transition("zone@1.1.0", "production", BOB, "go").seq == 5


def test_a_request_verifies_the_whole_chain_once_its_last_whole_verify_is_too_old(tmp_path, monkeypatch):
    lc, log = _chain(tmp_path)
    lc.verify("zone")
    (log / "00000001.json").write_bytes(canonical_json(json.loads((log / "00000001.json").read_bytes()) |
                                                       {"actor": "mallory"}))
    assert lc.stage("zone@1.1.0") == "staging"  # within FULL_VERIFY_S of the whole verify: the prefix is trusted
    monkeypatch.setattr(lifecycle_module, "FULL_VERIFY_S", -1.0)  # (that long later)
    with pytest.raises(ChainBroken, match="record 1 does not match its hash"):
        lc.transition("zone@1.1.0", "production", BOB, "go")


def test_the_backend_verifies_every_lifecycle_log_whole_each_audit_round(tmp_path, caplog, monkeypatch):
    from raytwin import metrics
    from serve_apps.backend import Backend

    # the round exports its count: the real gauge would stay at 1 in this process, a Ray driver that later tests'
    # Prometheus scrapes (tests/test_observability.py's healthy run fired RayTwinLifecycleLogBroken)
    monkeypatch.setattr(metrics, "LIFECYCLE_LOGS_BROKEN", SimpleNamespace(set=lambda _v: None))
    lc, log = _chain(tmp_path)
    lc.verify("zone")
    (log / "00000001.json").write_bytes(canonical_json(json.loads((log / "00000001.json").read_bytes()) |
                                                       {"actor": "mallory"}))
    rounds = iter([False, True])  # one round, then closed
    backend = SimpleNamespace(_watch_stop=SimpleNamespace(wait=lambda _s: next(rounds)),
                              catalog=SimpleNamespace(tenants=lambda: ["acme"]), _registry=lambda _t: lc.registry)
    Backend._audit_lifecycles(backend)
    assert "event=lifecycle_chain_broken model=zone record=1" in caplog.text
    with pytest.raises(ChainBroken, match="record 1"):
        lc.transition("zone@1.1.0", "production", BOB, "go")


def test_the_backend_exports_how_many_lifecycle_logs_its_audit_found_broken(tmp_path, monkeypatch):
    """A broken chain was only a log line (event=lifecycle_chain_broken): no metric, so no alert. Each audit round
    (the first at the start) exports the count; a tenant whose round fails keeps its count, and a restored log
    counts no more."""
    from raytwin import metrics
    from serve_apps.backend import Backend

    lc, log = _chain(tmp_path)
    pristine = (log / "00000001.json").read_bytes()
    exported: list[float] = []
    monkeypatch.setattr(metrics, "LIFECYCLE_LOGS_BROKEN", SimpleNamespace(set=exported.append))
    registries = {"acme": lc.registry}

    def edit() -> None:
        (log / "00000001.json").write_bytes(canonical_json(json.loads(pristine) | {"actor": "mallory"}))

    def store_down() -> None:
        registries["acme"] = SimpleNamespace(fs=SimpleNamespace(exists=_down), root="s3://gone")

    def restore() -> None:
        registries["acme"] = lc.registry
        (log / "00000001.json").write_bytes(pristine)

    steps = iter([edit, store_down, restore, None])  # between rounds; None: closed
    backend = SimpleNamespace(_watch_stop=SimpleNamespace(wait=lambda _s: (step := next(steps)) is None or step()),
                              catalog=SimpleNamespace(tenants=lambda: ["acme"]), _registry=registries.__getitem__)
    Backend._audit_lifecycles(backend)
    assert exported == [0.0, 1.0, 1.0, 0.0]


def _down(_path: str) -> bool:
    raise OSError("the store is unreachable")


def test_a_replaced_or_shrunk_log_is_verified_whole_by_a_request(tmp_path, monkeypatch):
    lc, log = _chain(tmp_path)
    lc.verify("zone")
    pristine = {p.name: p.read_bytes() for p in log.iterdir()}
    # replaced: another history under the same names, an old record of it edited
    edited = json.loads(pristine["00000001.json"]) | {"actor": "mallory"}
    rehashed = {k: v for k, v in edited.items() if k != "hash"}
    (log / "00000001.json").write_bytes(canonical_json({**rehashed, "hash": hashlib.sha256(
        canonical_json(rehashed)).hexdigest()}))
    head = json.loads(pristine["00000004.json"]) | {"reason": "another"}
    (log / "00000004.json").write_bytes(canonical_json(head))
    read = _reads(lc, monkeypatch)
    with pytest.raises(ChainBroken, match="record 2 does not link to the record before it"):
        lc.stage("zone@1.1.0")
    assert "ls" in read  # the whole log was read
    for name, data in pristine.items():
        (log / name).write_bytes(data)
    assert lc.stage("zone@1.1.0") == "staging"
    # shrunk: the prefix's last record gone
    (log / "00000004.json").unlink()
    read.clear()
    assert lc.stage("zone@1.1.0") == "candidate" and "ls" in read


def _run(store: RunStore, run_id: str, tenant: str, ref: str, started: datetime) -> None:
    store.save(RunRecord(run_id=run_id, kind="calibration", status="succeeded", user="alice", tenant=tenant,
                         model_ref=ref, model_hash="0" * 64, spec={}, seeds={}, package_versions={},
                         code_version="test", started=started, finished=started,
                         output_url=store.output_url(run_id)))


def test_retention_keeps_the_last_k_and_everything_referenced(tmp_path):
    lc = _lifecycle(str(tmp_path / "registry"), 7)
    t0 = datetime(2026, 1, 5, tzinfo=UTC)
    runs = RunStore(str(tmp_path / "runs"))
    old_evidence, old, newest, foreign = (f"calibration-20260105T12000{i}Z-0000000{i}" for i in range(4))
    _run(runs, old_evidence, "acme", "zone@1.1.0", t0)
    _run(runs, old, "acme", "zone@1.2.0", t0 + timedelta(hours=1))
    _run(runs, newest, "acme", "zone@1.0.0", t0 + timedelta(hours=2))
    _run(runs, foreign, "globex", "zone@1.2.0", t0)  # another tenant's: not this tenant's to prune
    for i in range(6):  # 1.0.0 .. 1.5.0 promoted in turn: 1.0.0 .. 1.4.0 archived, 1.4.0 the rollback target
        _to_staging(lc, f"1.{i}.0")
        lc.transition(f"zone@1.{i}.0", "production", BOB, "approved")
    lc.submit("zone@1.6.0", ALICE, "new fit", Evidence(run_ids=[old_evidence]))
    lc.transition("zone@1.6.0", "staging", ALICE, "in shadow")
    lc.set_policy("acme", LifecyclePolicy(keep_archived=1, keep_runs=1))

    report = lc.prune("zone", CAROL, str(tmp_path / "runs"), in_use={"1.2.0"})  # a live twin runs 1.2.0
    # archived 1.0.0-1.4.0, keep the last 1 (1.4.0, also the rollback target) and what kept runs used
    # (1.0.0 by the newest run, 1.1.0 by the run that staging 1.6.0 names as evidence)
    assert report.versions_removed == ["1.3.0"] and report.runs_removed == [old]
    assert lc.prune("zone", CAROL, str(tmp_path / "runs")).versions_removed == ["1.2.0"]  # the twin is gone
    assert lc.registry.versions("zone") == ["1.0.0", "1.1.0", "1.4.0", "1.5.0", "1.6.0"]
    assert sorted(r.run_id for r in runs.list()) == sorted([old_evidence, newest, foreign])
    assert lc.registry.get("zone@1.1.0").version == "1.1.0"
    state = lc.verify("zone")
    assert state.production == "1.5.0" and state.versions["1.6.0"].stage == "staging"
    assert [r.version for r in lc.records("zone") if r.action == "prune"] == ["1.3.0", "1.2.0"]
    assert lc.prune("zone", CAROL, str(tmp_path / "runs")).versions_removed == []  # idempotent
    assert lc.rollback("zone", BOB, "still possible").version == "1.4.0"


def test_concurrent_prunes_log_each_version_once_and_a_crash_leaves_nothing_unlogged(tmp_path, monkeypatch):
    """Three prunes at once logged versions twice, and one that answered 409 had removed an artifact it never
    logged. Each version is logged by one prune (the others see it pruned and skip it), and the log comes
    before the artifact's removal: a crash between leaves an artifact, which the next prune removes."""
    import threading

    lc = _lifecycle(str(tmp_path / "registry"), 7)
    for i in range(7):  # 1.0.0 .. 1.5.0 archived, 1.5.0 the rollback target
        _to_staging(lc, f"1.{i}.0")
        lc.transition(f"zone@1.{i}.0", "production", BOB, "approved")
    lc.set_policy("acme", LifecyclePolicy(keep_archived=0, keep_runs=0))
    doomed = ["1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0"]
    crashed = ModelLifecycle(ModelRegistry(lc.registry.url))

    def crash(ref: str) -> None:
        raise OSError(f"killed before removing {ref}")

    monkeypatch.setattr(crashed.registry, "remove", crash)
    with pytest.raises(PruneIncomplete) as stopped:  # it says what it logged: the API audits that
        crashed.prune("zone", CAROL)
    assert str(stopped.value.__cause__) == "killed before removing zone@1.0.0"
    assert [r.version for r in stopped.value.done.records] == doomed == stopped.value.done.versions_removed
    assert [r.version for r in lc.records("zone") if r.action == "prune"] == doomed  # logged, then the crash
    assert lc.registry.versions("zone") == [*doomed, "1.5.0", "1.6.0"]

    lc.registry.register("zone", "1.7.0", THERMAL, {"R_io": 0.02})  # more to prune, by three at once
    _to_staging(lc, "1.7.0")
    lc.transition("zone@1.7.0", "production", BOB, "approved")  # 1.6.0 the rollback target, 1.5.0 to prune
    reports, errors = [], []

    def prune(who: Actor) -> None:
        try:
            reports.append(ModelLifecycle(ModelRegistry(lc.registry.url)).prune("zone", who))
        except Exception as exc:  # noqa: BLE001 - collected: the test fails on any
            errors.append(exc)

    threads = [threading.Thread(target=prune, args=(who,)) for who in (CAROL, BOB, CAROL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(v for r in reports for v in r.versions_removed) == ["1.5.0"]
    pruned = [r.version for r in lc.records("zone") if r.action == "prune"]
    assert pruned == [*doomed, "1.5.0"] and lc.verify("zone").production == "1.7.0"
    assert lc.registry.versions("zone") == ["1.6.0", "1.7.0"]  # the crash's leftovers removed too


def test_cli_moves_verifies_and_refuses_with_reasons(tmp_path, monkeypatch):
    lc = _lifecycle(str(tmp_path / "registry"), 1)
    monkeypatch.setenv("RAYTWIN_REGISTRY_URL", str(tmp_path / "registry"))
    monkeypatch.setenv("RAYTWIN_TENANT", "acme")
    cli = CliRunner()

    def run(*args: str, code: int = 0):
        out = cli.invoke(app, ["registry", *args])
        assert out.exit_code == code, out.output
        return out.output

    assert "- -> candidate\talice" in run("submit", "zone@1.0.0", "--reason", "fit", "--actor", "alice")
    run("stage", "zone@1.0.0", "--reason", "shadow ok", "--actor", "alice")
    assert "may not approve it (four eyes)" in run("promote", "zone@1.0.0", "--reason", "mine", "--actor", "alice",
                                                   "--role", "approver", code=1)
    assert "staging -> production\tbob" in run("promote", "zone@1.0.0", "--reason", "ok", "--actor", "bob",
                                               "--role", "approver")
    assert "zone@1.0.0\tproduction\talice" in run("status", "zone")
    assert "ok: 3 records" in run("verify", "zone")
    assert (f"error: no model zone@9.9.9 in this registry; versions: ['1.0.0'] (registry {tmp_path / 'registry'})"
            in run("stage", "zone@9.9.9", "--reason", "typo", "--actor", "alice", code=1))
    assert "keep_archived" in run("policy", "--keep-archived", "-2", code=2)
    log = tmp_path / "registry" / "lifecycle" / "zone" / "log" / "00000001.json"
    log.write_text(log.read_text().replace("shadow ok", "shadow great"))
    assert "lifecycle record 1 does not match its hash" in run("verify", "zone", code=1)


def test_cli_rollback_from_a_version_goes_back_once(tmp_path, monkeypatch):
    """`raytwin registry rollback` run twice (a retry, two operators on one incident) went back two versions; with
    --from-version the second run is refused, naming the first one's record, and production stays put."""
    lc = _lifecycle(str(tmp_path / "registry"), 3)
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        _to_staging(lc, v)
        lc.transition(f"zone@{v}", "production", BOB, "approved")
    monkeypatch.setenv("RAYTWIN_REGISTRY_URL", str(tmp_path / "registry"))
    monkeypatch.setenv("RAYTWIN_TENANT", "acme")
    args = ["registry", "rollback", "zone", "--reason", "alarm", "--actor", "bob", "--role", "approver",
            "--from-version", "1.2.0"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0 and "rollback\tzone@1.1.0\tarchived -> production (archived 1.2.0)" in first.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "zone@1.2.0 is no longer the production version of zone (production is " \
        "1.1.0): rollback record" in again.output
    assert lc.verify("zone").production == "1.1.0"


def test_the_cli_log_prints_a_reason_as_one_line_whatever_it_holds(tmp_path, monkeypatch):
    """A writer's reason is free text: one with a newline and tabs printed a second line of `raytwin registry log`
    that read as another record (a promotion by an approver that never happened). It is escaped now."""
    lc = _lifecycle(str(tmp_path / "registry"), 1)
    monkeypatch.setenv("RAYTWIN_REGISTRY_URL", str(tmp_path / "registry"))
    monkeypatch.setenv("RAYTWIN_TENANT", "acme")
    forged = "fit ok\n2\t2026-12-06T03:00:00+00:00\tpromote\tzone@1.0.0\tstaging -> production\tbob\u202e"
    lc.submit("zone@1.0.0", ALICE, forged)
    out = CliRunner().invoke(app, ["registry", "log", "zone"])
    assert out.exit_code == 0, out.output
    line, = out.output.splitlines()
    fields = line.split("\t")
    assert len(fields) == 7 and fields[5] == "alice"
    assert fields[6] == r"fit ok\n2\t2026-12-06T03:00:00+00:00\tpromote\tzone@1.0.0\tstaging -> production\tbob\u202e"
    assert lc.records("zone")[0].reason == forged  # recorded as given: the listing escapes it


def _cli(tmp_path: Path, monkeypatch) -> Callable[..., str]:
    """`raytwin registry ...` on `tmp_path/store/registry/acme`, as `raytwin serve` lays a store out."""
    monkeypatch.setenv("RAYTWIN_REGISTRY_URL", str(tmp_path / "store" / "registry" / "acme"))
    monkeypatch.setenv("RAYTWIN_TENANT", "acme")

    def run(*args: str, code: int = 0) -> str:
        out = CliRunner().invoke(app, ["registry", *args])
        assert out.exit_code == code, out.output
        return out.output

    return run


def test_cli_refuses_lifecycle_changes_on_a_store_a_running_service_holds(tmp_path, monkeypatch):
    """A promotion written beside a running service moved production while its twins kept the old version
    (a split fleet until it restarted), missed its audit log and took `--role approver` on the caller's word:
    the service must be the one writer. Reads stay open; a store no service holds is the CLI's."""
    import threading

    from raytwin.statestore import Lease, StateStore
    from tests.fixtures_lease import renewing, watched_quickly

    watched_quickly(monkeypatch)  # (6 s in a service, whose shards renew every 2 s)
    lc = _lifecycle(str(tmp_path / "store" / "registry" / "acme"), 2)
    run = _cli(tmp_path, monkeypatch)
    for version in ("1.0.0", "1.1.0"):
        _to_staging(lc, version)
    run("promote", "zone@1.0.0", "--reason", "offline: no service holds it", "--actor", "bob", "--role", "approver")
    twins = StateStore(str(tmp_path / "store" / "twins"))
    lease = Lease(owner="svc1", epoch=1, shards=1, namespace="raytwin", acquired_at="2026-03-01T00:00:00+00:00",
                  acquired_by="host:42", cluster="session_1")
    twins.write_lease(lease)
    stop = threading.Event()
    renewer = renewing(twins, lease, stop.is_set)  # its shards
    try:
        revision = lc.verify("zone").revision
        transitions = "POST /v1/models/zone/versions/1.1.0/transitions"
        for args, route in (
                (("promote", "zone@1.1.0"), f'{transitions} with {{"to": "production"}}'),
                (("archive", "zone@1.1.0"), f'{transitions} with {{"to": "archived"}}'),
                (("rollback", "zone"), "POST /v1/models/zone/rollback"),
                (("prune", "zone"), "POST /v1/models/zone/prune")):
            refused = run(*args, *(() if args[0] == "prune" else ("--reason", "r")), "--actor", "bob", "--role",
                          "approver", code=1)
            assert "belongs to a store that a running service holds (service svc1, started by host:42" in refused
            assert f"change it through that service's HTTP API, {route}, which swaps its twins, audits" in refused
        assert "PUT /v1/lifecycle-policy" in run("policy", "--keep-archived", "0", code=1)
        assert lc.verify("zone").revision == revision and lc.policy("acme").keep_archived == 5  # nothing written
        assert "production: 1.0.0" in run("status", "zone") and "ok:" in run("verify", "zone")  # reads stay open
        assert '"keep_archived":5' in run("policy")
    finally:
        stop.set()  # it crashed: offline work again
        renewer.join()
    assert "staging -> production (archived 1.0.0)\tbob" in run("promote", "zone@1.1.0", "--reason", "service down",
                                                                 "--actor", "bob", "--role", "approver")


def test_cli_prune_keeps_the_versions_the_stores_twins_need(tmp_path, monkeypatch):
    """`raytwin registry prune` passed no versions in use: it removed the version a twin runs after its swap
    was refused, and one its history was applied by. It reads them from the twin store (beside a served
    store's registry, or `--twins`), as the HTTP route does."""
    from raytwin.statestore import StateStore

    lc = _lifecycle(str(tmp_path / "store" / "registry" / "acme"), 4)
    run = _cli(tmp_path, monkeypatch)
    for i in range(4):  # 1.0.0 .. 3.0.0 promoted in turn: 1.0.0, 1.1.0 archived, 1.2.0 the rollback target
        _to_staging(lc, f"1.{i}.0")
        lc.transition(f"zone@1.{i}.0", "production", BOB, "approved")
    lc.set_policy("acme", LifecyclePolicy(keep_archived=0))
    twins = StateStore(str(tmp_path / "store" / "twins"))
    artifact = lambda v: lc.registry.get(f"zone@{v}").model_dump(mode="json")  # noqa: E731
    twins.save_registration("acme", "a-1", {"artifact": artifact("1.0.0")})  # then swapped to 1.3.0: 1.0.0 history
    twins.save_model_swaps("acme", "a-1", [{"at_us": 1, "artifact": artifact("1.3.0")}])
    def disk_gone(self, ref: str) -> None:
        raise OSError("disk gone")

    with monkeypatch.context() as m:  # the store fails after the removal is logged: said, not a traceback
        m.setattr(ModelRegistry, "remove", disk_gone)
        stopped = run("prune", "zone", "--actor", "carol", code=1)
    assert "removed versions: 1.1.0;" in stopped and "the prune stopped: OSError('disk gone')" in stopped
    out = run("prune", "zone", "--actor", "carol")  # the next one finishes it
    assert "removed versions: none;" in out and "kept zone@1.0.0: twin(s) a-1 run it" in out
    assert lc.registry.versions("zone") == ["1.0.0", "1.2.0", "1.3.0"]

    elsewhere = StateStore(str(tmp_path / "twins-elsewhere"))
    assert "removed versions: 1.0.0;" in run("prune", "zone", "--twins", elsewhere.url, "--actor", "carol")


def _audit(store: Path, tenant: str = "acme") -> list:
    """The tenant's audit records, as the API reads them (`GET /v1/audit`: the same log and record)."""
    from serve_apps.audit import AuditLog

    return AuditLog(str(store)).records(tenant)


def test_cli_changes_are_audited_in_two_steps_in_the_stores_tenant_log_as_declared_unverified(tmp_path, monkeypatch):
    """F15: `raytwin registry` took --actor and --role on trust and audited nothing: an offline promotion left no
    trace in the tenant's audit log. Each change is now audited as the API's is (intent, then outcome, in the log of
    the `raytwin serve` store the registry lies in), its identity the declared one, marked unverified, beside the OS
    user and host: an auditor tells it from an API key's act. A refusal (four eyes) is audited as refused."""
    import getpass
    import socket

    lc = _lifecycle(str(tmp_path / "store" / "registry" / "acme"), 2)
    run = _cli(tmp_path, monkeypatch)
    run("submit", "zone@1.0.0", "--reason", "fit", "--actor", "alice")
    run("stage", "zone@1.0.0", "--reason", "shadow ok", "--actor", "alice")
    run("promote", "zone@1.0.0", "--reason", "mine", "--actor", "alice", "--role", "approver", code=1)
    run("promote", "zone@1.0.0", "--reason", "ok", "--actor", "bob", "--role", "approver")
    run("policy", "--keep-archived", "0", "--actor", "carol")
    run("prune", "zone", "--actor", "carol")
    records = _audit(tmp_path / "store")
    assert [(r.action, r.phase) for r in records] == [
        (a, p) for a in ("model.submit", "model.stage", "model.promote", "model.promote", "lifecycle_policy.update",
                         "model.prune") for p in ("intent", "outcome")]
    assert all(r.key_id == r.role == "offline-cli" and r.tenant == "acme" and r.request_id is None for r in records)
    assert [r.details["principal"]["declared_actor"] for r in records[::2]] == [
        "alice", "alice", "alice", "bob", "carol", "carol"]
    assert records[6].details["principal"] == {
        "via": "offline-cli", "declared_actor": "bob", "declared_roles": ["approver"], "verified": False,
        "os_user": getpass.getuser(), "host": socket.gethostname()}
    refused, promoted = records[5], records[7]
    assert refused.details["status"] == "refused" and "may not approve it (four eyes)" in refused.details["reason"]
    head = lc.records("zone")[-1]
    assert promoted.details == {**records[6].details, "status": "done", "version": "1.0.0", "seq": head.seq,
                                "displaced": None, "hash": head.hash}  # tied to the log record it wrote
    assert records[8].details["policy"]["keep_archived"] == 0 and records[11].details["removed"] == []
    assert records[6].action_id == promoted.action_id and not records[6].outcome_missing

    ModelRegistry(str(tmp_path / "plain")).register("zone", "1.0.0", THERMAL)  # a registry no service lays out
    run("submit", "zone@1.0.0", "--registry", str(tmp_path / "plain"), "--reason", "fit", "--actor", "alice")
    assert [r.phase for r in _audit(tmp_path / "plain")] == ["intent", "outcome"]  # its own log, unless told
    run("stage", "zone@1.0.0", "--registry", str(tmp_path / "plain"), "--reason", "ok", "--actor", "alice",
        "--audit-store", str(tmp_path / "elsewhere"))
    assert [r.action for r in _audit(tmp_path / "elsewhere")] == ["model.stage", "model.stage"]


def test_the_cli_does_not_act_when_the_store_refuses_its_audit_intent(tmp_path, monkeypatch):
    """An act whose intent the audit log does not take does not happen (as the API's 503): nothing unaudited."""
    from raytwin.audit import AuditLog

    lc = _lifecycle(str(tmp_path / "store" / "registry" / "acme"), 1)
    run = _cli(tmp_path, monkeypatch)
    _to_staging(lc, "1.0.0")

    def full(self, record) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AuditLog, "append", full)
    out = run("promote", "zone@1.0.0", "--reason", "ok", "--actor", "bob", "--role", "approver", code=1)
    assert "error: model.promote of zone@1.0.0 was not done: its audit record could not be written first" in out
    assert "No space left on device" in out
    assert lc.verify("zone").production is None and len(lc.records("zone")) == 2


def test_the_cli_refuses_a_served_stores_registry_of_another_tenant(tmp_path, monkeypatch):
    """Its changes belong in the audit log of the tenant whose registry it is, not the one --tenant names."""
    _lifecycle(str(tmp_path / "store" / "registry" / "acme"), 1)
    run = _cli(tmp_path, monkeypatch)
    out = run("submit", "zone@1.0.0", "--reason", "fit", "--actor", "eve", "--tenant", "globex", code=1)
    assert "is tenant acme's" in out and "give --tenant acme" in out
    assert _audit(tmp_path / "store", "globex") == [] and _audit(tmp_path / "store") == []


def test_the_cli_checks_the_evidence_the_api_checks(tmp_path, monkeypatch):
    """The CLI recorded any --metric as a shadow evaluation's and any --run as support: an approver read an
    operator's numbers as the system's. It checks what the API checks (`check_given_evidence`), nothing audited."""
    lc = _lifecycle(str(tmp_path / "store" / "registry" / "acme"), 1)
    lc.registry.register("other", "1.0.0", THERMAL)
    run = _cli(tmp_path, monkeypatch)
    runs = RunStore(str(tmp_path / "store" / "runs" / "acme"))  # the served store's, found without --runs
    other_run = "calibration-20260105T120000Z-0000000f"
    _run(runs, RUN, "acme", "zone@1.0.0", datetime(2026, 1, 5, tzinfo=UTC))
    _run(runs, other_run, "acme", "other@1.0.0", datetime(2026, 1, 5, tzinfo=UTC))
    submit = ("submit", "zone@1.0.0", "--reason", "fit", "--actor", "alice")
    assert "evidence.shadow_metrics is recorded by the system" in run(*submit, "--metric", "nis=1.02", code=1)
    assert f"run {other_run!r} ran other@1.0.0, not a version of zone" in run(*submit, "--run", other_run, code=1)
    missing = "calibration-20260105T120000Z-00000000"
    assert f"no run {missing!r} of this tenant" in run(*submit, "--run", missing, code=1)
    assert lc.records("zone") == [] and _audit(tmp_path / "store") == []
    run(*submit, "--run", RUN)
    assert lc.records("zone")[0].evidence.run_ids == [RUN]

    ModelRegistry(str(tmp_path / "plain")).register("zone", "1.0.0", THERMAL)
    plain = ("submit", "zone@1.0.0", "--registry", str(tmp_path / "plain"), "--reason", "fit", "--run", RUN)
    assert "give --runs with the root" in run(*plain, code=1)
    run(*plain, "--runs", runs.root)


def test_the_cli_promotes_a_partial_fit_over_the_fleet_only_when_asked(tmp_path, monkeypatch):
    """As the API (409 without "fleet": true): a version a drift recalibration fitted on one twin's telemetry is
    promoted over the store's other twins of the model only with --fleet, which its audit records."""
    from raytwin.recalibration import DriftTrigger
    from raytwin.statestore import StateStore

    lc = _lifecycle(str(tmp_path / "store" / "registry" / "acme"), 1)
    run = _cli(tmp_path, monkeypatch)
    trigger = DriftTrigger(seq=1, asset_id="a-1", type_name="zone", type_version="1.0.0", event_time=None,
                           drift_score=2.0, nis_mean=3.0, nis_last=3.0)
    lc.submit("zone@1.0.0", Actor(id="recalibration", tenant="acme"), "drift", Evidence(triggers=[trigger]))
    lc.transition("zone@1.0.0", "staging", ALICE, "ok")
    twins = StateStore(str(tmp_path / "store" / "twins"))
    for asset in ("a-1", "a-2"):
        twins.save_registration("acme", asset, {"artifact": lc.registry.get("zone@1.0.0").model_dump(mode="json")})
    promote = ("promote", "zone@1.0.0", "--reason", "ok", "--actor", "bob", "--role", "approver")
    refused = run(*promote, code=1)
    assert "was fitted on the telemetry of a-1" in refused and "1 other twin(s) (a-2)" in refused
    assert "give --fleet if they share them" in refused and lc.verify("zone").production is None
    run(*promote, "--fleet")
    assert lc.verify("zone").production == "1.0.0"
    assert [r.details.get("fleet") for r in _audit(tmp_path / "store")] == [True, True]


def test_the_cli_policy_needs_an_approver_to_switch_automatic_promotion_and_keeps_its_setter(tmp_path, monkeypatch):
    """As the API: turning auto_promote on needs the approver grant (role), and whoever set it may not have their
    own version promoted by it (four eyes). The CLI set it for anyone and kept no setter."""
    lc = _lifecycle(str(tmp_path / "store" / "registry" / "acme"), 1)
    run = _cli(tmp_path, monkeypatch)
    assert "turning auto_promote on needs the 'approver' grant" in run("policy", "--auto-promote", "--actor", "alice",
                                                                       code=1)
    assert not lc.policy("acme").auto_promote and _audit(tmp_path / "store") == []
    run("policy", "--auto-promote", "--actor", "alice", "--role", "approver")
    _to_staging(lc, "1.0.0")  # alice's
    assert "the tenant's automatic promotion was set by alice" in run(
        "promote", "zone@1.0.0", "--reason", "auto", "--actor", "dave", code=1)


def test_an_offline_publisher_is_recorded_as_declared_and_unverified_and_its_fit_is_still_promoted(tmp_path):
    """F7: an offline calibration's `registered_by` is whatever its caller declared. The version records it so
    (`publisher_offline`: declared, unverified, with the OS user and host that ran the fit): an approver who ran it
    under their login is refused, naming it; another approver promotes the fit (approvers need offline fits)."""
    import getpass

    from raytwin.registry import describe_publisher, publisher_offline

    metadata = publisher_offline("key-fitter", "offline calibration")
    registry = ModelRegistry(str(tmp_path / "registry"))
    registry.register("zone", "1.0.0", THERMAL, metadata=metadata)
    lc = ModelLifecycle(registry)
    _to_staging(lc, "1.0.0")
    user = getpass.getuser()
    assert metadata["published_by_verified"] == "false" and metadata["published_os_user"] == user
    declared = describe_publisher(metadata)
    assert declared.startswith(f"key-fitter (declared to the offline calibration, unverified; run by OS user {user}")
    for who in ("key-fitter", user):
        with pytest.raises(ApprovalRequired, match=r"the publisher .* unverified; run by OS user"):
            lc.transition("zone@1.0.0", "production", Actor(id=who, tenant="acme", roles=frozenset({"approver"})),
                          "mine")
    assert lc.transition("zone@1.0.0", "production", BOB, "approved").to_stage == "production"
    assert describe_publisher({"published_by": "k1"}) == "k1"  # an API key's: verified by the server


def test_the_cli_names_a_model_or_registry_it_does_not_know_instead_of_answering_for_an_empty_log(tmp_path,
                                                                                                  monkeypatch):
    """`raytwin registry verify` of a mistyped model or registry said "ok: 0 records" (exit 0), and `status` showed a
    model without production: a tamper check that passed on nothing. Each command names what it did not find."""
    _lifecycle(str(tmp_path / "registry"), 1)
    monkeypatch.setenv("RAYTWIN_TENANT", "acme")
    for registry, model in ((tmp_path / "registry", "zonee"), (tmp_path / "registy", "zone")):
        for command in ("verify", "status", "log", "prune"):
            out = CliRunner().invoke(app, ["registry", command, model, "--registry", str(registry)])
            assert out.exit_code == 1 and f"error: no model {model} in registry {registry}" in out.output, out.output
    assert CliRunner().invoke(app, ["registry", "verify", "zone", "--registry", str(tmp_path / "registry")]
                              ).output.startswith("ok: 0 records")  # registered, no transition yet


def test_the_cli_names_the_tenants_registry_when_given_a_served_stores_registry_folder(tmp_path):
    """The runbook's `raytwin registry verify MODEL --registry STORE/registry` (one folder short: a served store keeps
    one registry per tenant, `STORE/registry/TENANT`) said only "no model": the error names the tenants' registries
    that hold the model."""
    _lifecycle(str(tmp_path / "registry" / "acme"), 1)
    out = CliRunner().invoke(app, ["registry", "verify", "zone", "--registry", str(tmp_path / "registry")])
    assert out.exit_code == 1 and f"--registry {tmp_path / 'registry' / 'acme'}" in out.output, out.output
