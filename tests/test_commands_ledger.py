"""The command ledger's index: a query for one asset's commands, and a restarted connector, read the records they
answer with alone (before, every command of the tenant), with the answers of a whole read, on stores written
before the index too."""

from __future__ import annotations

import shutil
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from connectors.commands import Command, CommandError, CommandLedger, CommandStatus


class Reads:
    """The folders a ledger lists and the files it reads (its filesystem's methods patched for the test alone)."""

    def __init__(self, ledger: CommandLedger, monkeypatch: pytest.MonkeyPatch):
        self.listed: list[str] = []
        self.read: list[str] = []
        ls, cat_file = ledger.fs.ls, ledger.fs.cat_file
        monkeypatch.setattr(ledger.fs, "ls", lambda path, *a, **k: self.listed.append(path) or ls(path, *a, **k))
        monkeypatch.setattr(ledger.fs, "cat_file",
                            lambda path, *a, **k: self.read.append(path) or cat_file(path, *a, **k))


def _history(ledger: CommandLedger, asset_id: str, connector: str = "c") -> dict[str, Command]:
    """Commands of every status but *sending* (a restart settles it) for `asset_id`, by status."""
    def proposed() -> Command:
        return ledger.propose("acme", connector, asset_id, "setpoint", {"x": 1}, by="k1")

    def approved() -> Command:
        return ledger.approve("acme", proposed().id, by="k2")

    def sent() -> Command:
        return ledger.sent(ledger.claim("acme", approved().id, connector), 300.0)

    done = {"proposed": proposed(), "approved": approved(), "sent": sent(),
            "refused": ledger.refuse("acme", proposed().id, "k2", "no"),
            "acknowledged": ledger.acknowledged("acme", sent().id, {"status": "ok"}, True),
            "failed": ledger.failed(sent(), "broker gone")}
    expired = sent()
    done["expired"] = ledger.expire("acme", expired.id, expired.ack_deadline)
    late = sent()
    ledger.expire("acme", late.id, late.ack_deadline)
    done["answered late"] = ledger.acknowledged("acme", late.id, {"status": "ok"}, True)
    return done


def _forget_index(store: Path) -> None:
    """The store as the ledger wrote it before its index: the same records, no markers."""
    shutil.rmtree(store / "connectors/commands/tenant=acme/index")


def test_one_assets_commands_are_read_alone_with_the_answers_of_a_whole_read(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = CommandLedger(str(tmp_path))
    ledger.index("acme")  # (as its connectors' start does)
    mine = _history(ledger, "a1")
    for asset_id in ("a2", "a3"):
        _history(ledger, asset_id)
    whole = ledger.list("acme")
    expected = [c for c in whole if c.asset_id == "a1"]
    assert {c.id for c in expected} == {c.id for c in mine.values()} and len(whole) == 3 * len(expected)

    reads = Reads(ledger, monkeypatch)
    assert ledger.list("acme", "a1") == expected
    assert {Path(p).stem for p in reads.read} == {c.id for c in expected} and len(reads.read) == len(expected)
    assert [Path(p).name for p in reads.listed] == ["asset_id=a1"]
    assert ledger.list("acme", "a9") == []

    _forget_index(tmp_path)  # written before the index: read whole, the same answers, until it is indexed
    before = CommandLedger(str(tmp_path))
    assert before.list("acme", "a1") == expected
    before.index("acme")
    reads = Reads(before, monkeypatch)
    assert before.list("acme", "a1") == expected
    assert len(reads.read) == len(expected) and len(reads.listed) == 1


def test_a_restarted_connector_reads_its_unsettled_commands_alone(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = CommandLedger(str(tmp_path))
    made = _history(ledger, "a1")
    other = _history(ledger, "a1", connector="d")
    sending = ledger.claim("acme", ledger.approve("acme", ledger.propose(
        "acme", "c", "a2", "setpoint", {"x": 2}, by="k1").id, by="k2").id, "c")
    _forget_index(tmp_path)  # a store written before the index: the first restart indexes it

    restarted = CommandLedger(str(tmp_path))
    settled = restarted.recover("acme", "c", timedelta(days=1))
    assert {c.id: c.status for c in settled} == {made["approved"].id: CommandStatus.failed,
                                                 sending.id: CommandStatus.failed}
    reads = Reads(restarted, monkeypatch)
    awaited = restarted.unsettled("acme", "c")
    assert [c.id for c in awaited] == [made["sent"].id, made["expired"].id]  # oldest first
    assert awaited == [restarted.get("acme", c.id) for c in awaited]
    assert {Path(p).stem for p in reads.read} == {c.id for c in awaited}  # not the settled ones, nor d's
    assert [Path(p).name for p in reads.listed] == ["connector=c"]
    assert [c.id for c in restarted.unsettled("acme", "d")] == [other["approved"].id, other["sent"].id,
                                                                 other["expired"].id]

    restarted.acknowledged("acme", made["sent"].id, {"status": "ok"}, True)  # settled: no longer read
    restarted.recover("acme", "c", timedelta(0))  # the expired one's late answer no longer awaited
    reads.read.clear()
    assert restarted.unsettled("acme", "c") == [] and reads.read == []
    assert restarted.list("acme", "a1") == [c for c in restarted.list("acme") if c.asset_id == "a1"]


def test_a_new_tenants_commands_are_indexed_from_its_first_proposal(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenant's index was complete once a connector of it had started (`index`, from `recover`): until then one
    asset's query read every command of the tenant. A tenant without commands is indexed by its first proposal
    (another ledger's first proposal of it after that changes nothing); one with commands written before the index
    stays read whole, whoever proposes after them."""
    def one_assets(store: Path) -> tuple[list[Command], list[Command], Reads]:
        reader = CommandLedger(str(store))
        whole = reader.list("acme")
        reads = Reads(reader, monkeypatch)
        return reader.list("acme", "a1"), [c for c in whole if c.asset_id == "a1"], reads

    new, old = tmp_path / "new", tmp_path / "old"
    first, other = CommandLedger(str(new)), CommandLedger(str(new))  # (two processes: the API's, a connector's)
    _history(first, "a1")
    _history(other, "a2")
    other.propose("acme", "c", "a1", "setpoint", {"x": 2}, by="k1")
    got, expected, reads = one_assets(new)
    assert got == expected and len(expected) == 9
    assert {Path(p).stem for p in reads.read} == {c.id for c in expected} and len(reads.read) == len(expected)
    assert [Path(p).name for p in reads.listed] == ["asset_id=a1"]

    _history(CommandLedger(str(old)), "a2")
    _forget_index(old)  # written before the index
    CommandLedger(str(old)).propose("acme", "c", "a1", "setpoint", {"x": 2}, by="k1")
    got, expected, reads = one_assets(old)
    assert got == expected and len(expected) == 1 and len(reads.read) == 9  # every command, as before


def test_a_command_gets_one_decision_where_two_deciders_both_read_it_proposed(tmp_path: Path, monkeypatch):
    """An approval (in the connector's actor) and a refusal (in the backend), or a backend fenced between its lease
    read and its write and its successor (the takeover window), both read a command proposed and wrote a decision:
    the later record replaced the earlier, so a refused command could read approved, be claimed and sent. The first
    decision is claimed by an exclusive create: the other decider is refused and the record keeps the first."""
    from connectors.commands import CommandError

    store = str(tmp_path / "store")
    fenced, successor = CommandLedger(store), CommandLedger(store)
    command = fenced.propose("acme", "c", "a1", "setpoint", {"x": 1}, by="k1")
    monkeypatch.setattr(fenced, "get", lambda tenant, command_id: command)  # read before the successor's refusal
    successor.refuse("acme", command.id, "k3", "unsafe now")
    with pytest.raises(CommandError, match=f"command {command.id} was refused by k3 already"):
        fenced.approve("acme", command.id, "k2")
    assert successor.get("acme", command.id).status is CommandStatus.refused
    with pytest.raises(CommandError, match="only an approved command is sent"):
        successor.claim("acme", command.id, "c")  # never sent

    # a decider that stopped between its decision's claim and its record: the next one saves a claimed refusal; an
    # approval waits for its approver's retry (`_saves_claimed`), the other deciders refused meanwhile
    stopped = CommandLedger(store)
    other = stopped.propose("acme", "c", "a1", "setpoint", {"x": 2}, by="k1")
    refused = stopped.propose("acme", "c", "a1", "setpoint", {"x": 4}, by="k1")

    def killed(command: Command) -> Command:
        raise SystemExit("killed between the claim and the record")

    monkeypatch.setattr(stopped, "_save", killed)
    for command_id, decide in ((other.id, lambda i: stopped.approve("acme", i, "k2")),
                               (refused.id, lambda i: stopped.refuse("acme", i, "k2", "no"))):
        with pytest.raises(SystemExit):
            decide(command_id)
        assert successor.get("acme", command_id).status is CommandStatus.proposed
    with pytest.raises(CommandError, match=f"command {refused.id} was refused by k2 already"):
        successor.approve("acme", refused.id, "k3")
    assert successor.get("acme", refused.id).status is CommandStatus.refused
    with pytest.raises(CommandError, match=f"command {other.id} was approved by k2 already"):
        successor.refuse("acme", other.id, "k3", "no")
    assert successor.get("acme", other.id).status is CommandStatus.proposed
    saved = successor.approve("acme", other.id, "k2")
    assert (saved.status, saved.approved_by) == (CommandStatus.approved, "k2")
    # a decision whose record's write failed after its claim landed (the store's outage): the key's retry decides
    third = successor.propose("acme", "c", "a1", "setpoint", {"x": 3}, by="k1")
    with pytest.raises(SystemExit):
        stopped.approve("acme", third.id, "k2")
    assert (successor.approve("acme", third.id, "k2").status, successor.claim("acme", third.id, "c").status) == (
        CommandStatus.approved, CommandStatus.sending)
    assert successor.ids("acme") == sorted([command.id, other.id, refused.id, third.id])  # decisions are no records


def test_a_refusal_that_read_a_command_proposed_never_puts_its_sent_approval_back(tmp_path: Path, monkeypatch):
    """A refusal (in the backend) read the command proposed, then an approval (in the connector's actor) claimed the
    decision, saved it and sent the command. The refusal, losing the claim and reading the record proposed still (its
    read from before the approval's save), saved the approval over *sent*: the asset's answer was then ignored, and a
    connector restart failed the command as "not sent: propose it again", though it was sent."""
    from connectors.commands import CommandError

    store = str(tmp_path / "store")
    backend, connector = CommandLedger(store), CommandLedger(store)
    command = backend.propose("acme", "c", "a1", "setpoint", {"x": 1}, by="k1")
    connector.approve("acme", command.id, "k2")
    sent = connector.sent(connector.claim("acme", command.id, "c"), 30.0)
    monkeypatch.setattr(backend, "get", lambda tenant, command_id: command)  # its reads before the approval's save
    with pytest.raises(CommandError, match=f"command {command.id} was approved by k2 already"):
        backend.refuse("acme", command.id, "k3", "unsafe now")
    assert connector.get("acme", command.id).status is CommandStatus.sent
    answer = {"correlation_id": sent.correlation_id, "status": "ok"}
    assert connector.acknowledged("acme", command.id, answer, ok=True).status is CommandStatus.acknowledged


def test_a_deleted_connectors_open_commands_are_settled_by_the_system_each_once(tmp_path: Path, monkeypatch):
    """A deleted connector left its commands open for good: proposed ones stayed proposed (approving one answered a
    bare 404), sent ones never expired (only its own process expires them). Its delete settles them, by the system,
    each detail naming the delete; a decision claimed meanwhile by a key stands (one decision), and another
    connector's commands are left alone."""
    ledger = CommandLedger(str(tmp_path))
    made = _history(ledger, "a1")
    other = _history(ledger, "a1", connector="d")
    sending = ledger.claim("acme", ledger.approve("acme", ledger.propose(
        "acme", "c", "a1", "setpoint", {"x": 2}, by="k1").id, by="k2").id, "c")
    unconfirmed = ledger.propose("acme", "c", "a1", "setpoint", {"x": 3}, by="k1")
    ledger.approve("acme", unconfirmed.id, by="k2")
    ledger.sent(ledger.claim("acme", unconfirmed.id, "c"), 300.0, "unconfirmed: broker b did not confirm")
    claimed = ledger.propose("acme", "c", "a1", "setpoint", {"x": 4}, by="k1")  # a key's refusal, its record unsaved
    refusing = CommandLedger(str(tmp_path))
    monkeypatch.setattr(refusing, "_save", lambda command: command)
    refusing.refuse("acme", claimed.id, "k3", "unsafe")

    deleted = "connector 'c' was deleted"
    settled = {c.id: (c.status, c.history[-1].by, c.history[-1].detail)
               for c in ledger.settle_deleted("acme", "c")}
    assert settled == {
        made["proposed"].id: (CommandStatus.refused, "system", f"{deleted}: a command proposed through it can no "
                              "longer be sent; propose it again through another connector"),
        made["approved"].id: (CommandStatus.failed, "system", f"not sent: {deleted} before sending; propose it again"),
        made["sent"].id: (CommandStatus.expired, "system", f"{deleted} before asset a1 answered: whether it executed "
                          "the command is unknown; check the asset"),
        sending.id: (CommandStatus.failed, "system", f"outcome unknown: {deleted} while sending; not re-sent"),
        unconfirmed.id: (CommandStatus.failed, "system", f"outcome unknown: {deleted} before the broker confirmed the "
                         "command; not re-sent")}
    assert ledger.get("acme", claimed.id).history[-1].by == "k3"  # the key's decision, saved, not the system's
    assert ledger.get("acme", claimed.id).status is CommandStatus.refused
    assert ledger.unsettled("acme", "c") == []  # no late answer awaited by a connector declared again under its name
    assert ledger.settle_deleted("acme", "c") == []  # a delete tried again decides nothing twice
    assert {c.id: c.status for c in ledger.list("acme") if c.connector == "d"} == {
        c.id: c.status for c in other.values()}
    # a kind whose send is the answer (OPC UA): recorded sent once the server accepted it, so acknowledged
    ledger.approve("acme", (opcua := ledger.propose("acme", "o", "a1", "setpoint", {"x": 5}, by="k1")).id, by="k2")
    ledger.sent(ledger.claim("acme", opcua.id, "o"), 300.0)
    assert [(c.status, c.history[-1].by) for c in ledger.settle_deleted("acme", "o", answered_by_send=True)] == [
        (CommandStatus.acknowledged, "system")]


def test_a_deleted_connectors_command_whose_approval_was_claimed_unsaved_is_settled_as_its_keys_approval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An approval claimed (its decision's exclusive create) and never saved on the record, the connector's actor
    killed between the two writes, left the command proposed: every refusal lost to the claim, and the approver's
    retry, the only one to save it, found no connector once it was deleted, so the delete's refusal lost too and it
    stayed proposed for good. The delete saves the claimed approval, as its key's, and fails it "not sent"."""
    ledger = CommandLedger(str(tmp_path))
    command = ledger.propose("acme", "c", "a1", "setpoint", {"x": 1}, by="k1")
    killed = CommandLedger(str(tmp_path))  # the connector's actor, killed between the claim and the record
    monkeypatch.setattr(killed, "_save", lambda command: command)
    killed.approve("acme", command.id, by="k2")
    with pytest.raises(CommandError, match="was approved by k2 already"):
        ledger.refuse("acme", command.id, "k3", "unsafe")
    audited: list[tuple[CommandStatus, str]] = []

    def audit(moved: Command) -> AbstractContextManager[dict[str, Any]]:
        audited.append((moved.status, moved.history[-1].by))
        return nullcontext({})

    [settled] = ledger.settle_deleted("acme", "c", audited=audit)
    assert [(step.status, step.by) for step in settled.history] == [
        (CommandStatus.proposed, "k1"), (CommandStatus.approved, "k2"), (CommandStatus.failed, "system")]
    assert settled.approved_by == "k2"
    assert settled.history[-1].detail == "not sent: connector 'c' was deleted before sending; propose it again"
    assert audited == [(CommandStatus.failed, "system")]  # the system's act is the settling, not the approval
    assert ledger.get("acme", command.id) == settled
    assert ledger.unsettled("acme", "c") == []
    assert ledger.settle_deleted("acme", "c") == []  # a delete tried again decides nothing twice
