"""The audit log's reader (`serve_apps.audit.AuditLog.page`): pages by cursor, outcomes paired with intents, and
what a page costs in listings."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from serve_apps.audit import AuditLog, AuditRecord

T0 = datetime(2026, 3, 1, 9, tzinfo=UTC)


def _record(t: datetime, target: str, phase: str | None = None, action_id: str | None = None) -> AuditRecord:
    return AuditRecord(time=t, request_id="r", key_id="k", tenant="acme", role="admin", action="asset.create",
                       target=target, phase=phase, action_id=action_id)


def _log_of_days(tmp_path, days: int, per_day: int) -> tuple[AuditLog, list[str]]:
    log = AuditLog(str(tmp_path))
    targets = []
    for d in range(days):
        for i in range(per_day):
            targets.append(f"a{d:02d}-{i}")
            log.append(_record(T0 + timedelta(days=d, minutes=i), targets[-1]))
    return log, targets


class Listings:
    """Counts the filesystem's listings of the log (its `ls` and `find`, wrapped through `monkeypatch`: fsspec shares
    one local filesystem object across the process)."""

    def __init__(self, log: AuditLog, monkeypatch: pytest.MonkeyPatch):
        self.paths: list[str] = []
        self.finds = 0
        ls, find = log.fs.ls, log.fs.find

        def counted_ls(path, *args, **kwargs):
            self.paths.append(path)
            return ls(path, *args, **kwargs)

        def counted_find(path, *args, **kwargs):
            self.finds += 1
            return find(path, *args, **kwargs)

        monkeypatch.setattr(log.fs, "ls", counted_ls)
        monkeypatch.setattr(log.fs, "find", counted_find)


def test_pages_walk_back_through_every_record_once_in_order(tmp_path):
    log, targets = _log_of_days(tmp_path, days=6, per_day=5)
    seen, cursor = [], None
    while True:
        page = log.page("acme", limit=7, cursor=cursor)
        seen = [r.target for r in page.records] + seen
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == targets
    assert [r.target for r in log.page("acme", day=str((T0 + timedelta(days=2)).date()), limit=3).records] == \
        targets[12:15]
    assert log.page("acme", limit=30).next_cursor is None and log.page("acme", limit=29).next_cursor is not None


def test_a_page_lists_only_the_days_it_spans_not_the_tenants_whole_history(tmp_path, monkeypatch):
    """Every page listed the tenant's whole log (a recursive `find`): with a year of records a page took seconds on
    local disk (1.6 s at 100,000) and a listing request per thousand records on an object store."""
    log, targets = _log_of_days(tmp_path, days=40, per_day=3)
    listings = Listings(log, monkeypatch)
    page = log.page("acme", limit=4)
    assert [r.target for r in page.records] == targets[-4:]
    day_folders = {p for p in listings.paths if p.rstrip("/").rsplit("/", 1)[1][:4] == "2026"}
    assert listings.finds == 0 and len(day_folders) <= 3, sorted(day_folders)


def test_an_intents_outcome_is_found_on_a_later_day_of_the_newest_page_and_of_its_own_days(tmp_path, monkeypatch):
    """An action begun on one day and settled two days later (a long job): its intent read as never settled
    (`outcome_missing`) on every page but the newest, which alone lists the days between. Its outcome now marks the
    intent's day folder, so a page of that day, or an older page, finds it without listing any other folder; one
    still open, or settled on the next day, reads as before. One settled that late before the marks (none on any page
    but the newest) gets its mark from the first page that would read an intent as without outcome: one listing of
    the tenant's whole log, once (`mark_late_outcomes`), then none, in another process too; one still open is searched
    for in the days after once each (`_find_late_outcomes`: a page then lists the tenant's days and, from the day
    before the one it noted, the newest)."""
    from raytwin import audit as core

    log = AuditLog(str(tmp_path))
    long_id, open_id, next_id, old_id = (uuid.uuid4().hex for _ in range(4))
    intents = {name: _record(T0 + timedelta(minutes=i), name, "intent", action_id)
               for i, (name, action_id) in enumerate((("long", long_id), ("open", open_id), ("next", next_id),
                                                      ("old", old_id)))}
    for intent in intents.values():
        log.append(intent)
    for name, days in (("long", 2), ("next", 1)):
        clock = type("Clock", (datetime,), {"now": staticmethod(lambda tz, days=days: T0 + timedelta(days=days))})
        monkeypatch.setattr(core, "datetime", clock)
        core.settle(log, intents[name], {"status": "done"})
    log.append(_record(T0 + timedelta(days=3), "old", "outcome", old_id))  # as written before the marks
    log.append(_record(T0 + timedelta(days=4), "later", None))
    missing = {(name, "intent"): name == "open" for name in intents}
    listings = Listings(log, monkeypatch)
    by_day = {(r.target, r.phase): r.outcome_missing for r in log.page("acme", day=str(T0.date())).records}
    assert by_day == missing and listings.finds == 1  # "open" and "old" read as without: the log listed once
    listings.paths.clear()
    newest = {(r.target, r.phase): r.outcome_missing for r in log.page("acme").records}
    assert len(listings.paths) == len(set(listings.paths))  # each folder listed once: the outcomes' lookup reuses them
    assert newest == {**missing, ("next", "outcome"): None, ("long", "outcome"): None, ("old", "outcome"): None,
                      ("later", None): None}
    listings.paths.clear()
    for reader in (log, AuditLog(str(tmp_path))):  # this process, and another: its marks are whole, read as such
        by_day = {(r.target, r.phase): r.outcome_missing for r in reader.page("acme", day=str(T0.date())).records}
        assert by_day == missing
    # and "open", searched for in the later days by the first page, from the day before the one it noted
    noted = [str((T0 + timedelta(days=d)).date()) for d in (3, 4)]
    assert sorted(p.rstrip("/").rsplit("/", 1)[1] for p in listings.paths) == sorted(2 * [
        str(T0.date()), str((T0 + timedelta(days=1)).date()), "acme", *noted])
    older = log.page("acme", limit=4, cursor=log.page("acme", limit=4).next_cursor)  # the page of the 4 intents
    assert {(r.target, r.phase): r.outcome_missing for r in older.records} == missing and listings.finds == 1


def test_an_outcome_a_writer_adds_unmarked_after_the_log_was_marked_whole_is_found_and_marked(tmp_path, monkeypatch):
    """`mark_late_outcomes` lists the tenant's log once, then trusts its marks: an outcome settled more than a day
    late by a writer that does not mark it (a version before the marks: a fenced backend finishing a long job, a
    replica not yet upgraded), added after that, was never found, and its intent read as without outcome on every
    page but those reaching its outcome's day. A page now searches the later days for it and marks it; an intent
    still open is searched again only from the last day it noted."""
    log = AuditLog(str(tmp_path))
    late_id, open_id = uuid.uuid4().hex, uuid.uuid4().hex
    for i, (name, action_id) in enumerate((("late", late_id), ("open", open_id))):
        log.append(_record(T0 + timedelta(minutes=i), name, "intent", action_id))
    for days in (2, 4):
        log.append(_record(T0 + timedelta(days=days), "later", None))
    day = str(T0.date())

    def outcome_missing() -> dict[str, bool | None]:
        return {r.target: r.outcome_missing for r in log.page("acme", day=day).records}

    assert outcome_missing() == {"late": True, "open": True}  # the log is marked whole here
    log.append(_record(T0 + timedelta(days=3), "late", "outcome", late_id))  # the older writer's, unmarked
    assert outcome_missing() == {"late": False, "open": True}
    listings = Listings(log, monkeypatch)
    for reader in (log, AuditLog(str(tmp_path))):  # marked: found from the intent's day alone, in another process too
        assert {r.target: r.outcome_missing for r in reader.page("acme", day=day).records} == \
            {"late": False, "open": True}
    searched = [p.rstrip("/").rsplit("/", 1)[1] for p in listings.paths]
    noted = [str((T0 + timedelta(days=d)).date()) for d in (3, 4)]  # the day "open" noted, and the one before
    assert sorted(searched) == sorted(2 * [day, "acme", *noted]), searched  # not the first "later" record's day
    assert listings.finds == 0
