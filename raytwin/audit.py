"""Append-only audit log: who changed which asset, who ran which scenario with which inputs, when.

A core module: the HTTP API (`serve_apps.audit_steps`, its keys' acts and the backend's own) and the offline
`raytwin registry` CLI (`raytwin.lifecycle_cli`, an operator's acts) write one tenant log through it, in the same
two steps (`two_steps`); the record's `key_id` and `role` tell who: an API key (verified by the server), ``system``,
or ``offline-cli`` (`by_offline_cli`: an identity the caller declared, unverified, beside the OS user and host).

Each record is one JSON line in its own object
``{store}/audit/{tenant}/{YYYY-MM-DD}/{UTC timestamp}-{uuid}.jsonl``: object stores cannot append
to a file and several ingress replicas write at once, so records are never rewritten, only added,
and the log is the time-ordered union of the objects (names sort by time).

An action (a command sent to a device, a connector started, a run submitted, a type published, a model moved, a
policy set, the backend's own acts as the system) is audited in two records: its `intent`, written before acting
(no record, no action), and its `outcome`, written after. Both carry one `action_id`, which is also their objects'
uuid, so a reader tells from the names alone whether an intent has its outcome: one without it (the store failed
after the action, or the action is still under way) is answered with `outcome_missing: true`. An outcome written
more than a day after its intent's day (a long job) also leaves an empty ``{action_id}.settled`` object in the
intent's day folder, so that a page of that day finds it without listing the days between (`settle`); those written
before the marks get theirs from the first page that would read an intent as without outcome, once per tenant
(`AuditLog.mark_late_outcomes`: one listing of its whole log; then `MARKS_WHOLE` in its folder). A writer that does
not mark (a version before the marks: a fenced backend, a replica not yet upgraded) can still add one after that:
an intent a page reads as without outcome is looked for in the days after the page's, each day once per intent
(`AuditLog._find_late_outcomes`, noting the days searched in vain as `{action_id}.searched`). A record of
one step (a refusal, a stream's end, a record written before intents existed) has neither field, as before.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import socket
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from raytwin.storage import cat_existing, filesystem, replace_file, scrub_locations
from raytwin.store_failures import store_io

log = logging.getLogger("raytwin.serve.audit")  # (its name from when only the API audited: alerts filter on it)


class AuditRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    time: datetime
    request_id: str | None = Field(description="the server's id of the request (X-RayTwin-Request-ID)")
    client_request_id: str | None = Field(None, description="the client's own X-Request-ID if 1-128 printable "
                                          "chars, else none; never one Serve's proxy made up")
    key_id: str
    tenant: str
    role: str
    action: str = Field(description="e.g. asset.create, asset_type.delete, scenario.run, sweep.submit")
    target: str
    details: dict[str, Any] = Field(default_factory=dict)
    phase: Literal["intent", "outcome"] | None = Field(None, description=(
        "intent: written before the action, what was attempted; outcome: written after it, what came of it "
        "(`details.status`); absent: a record of one step"))
    action_id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$",
                                  description="the id an intent and its outcome share; absent on a record of one step")
    outcome_missing: bool | None = Field(None, description=(
        "set by the reader, never stored: true on an intent no outcome record follows (the store failed after the "
        "action, or it is still under way): what the intent names was attempted, its result is unknown"))

    def as_json(self) -> dict[str, Any]:
        """The record as stored and answered: the phase fields only where set, so a record of one step reads as
        it did before they existed (to older readers, whose model forbids fields it does not know, too)."""
        return self.model_dump(mode="json", exclude=self._unset_phase())

    def json_line(self) -> str:
        """`as_json` as compact JSON text (`raytwin audit`'s lines, the keys file's trail)."""
        return self.model_dump_json(exclude=self._unset_phase())

    def _unset_phase(self) -> set[str]:
        return {name for name in _PHASE_FIELDS if getattr(self, name) is None}


_PHASE_FIELDS = ("phase", "action_id", "outcome_missing")


class AuditLog:
    def __init__(self, store_url: str, storage_options: dict[str, Any] | None = None):
        self.fs, root = filesystem(store_url, storage_options)
        self.root = f"{root}/audit"
        self._marks_whole: set[str] = set()  # tenants whose late outcomes are all marked (`mark_late_outcomes`)

    def append(self, record: AuditRecord) -> None:
        """Add `record` as a new object, named by its time and its `action_id` (a new uuid where none)."""
        t = record.time.astimezone(UTC)
        folder = f"{self.root}/{record.tenant}/{_utc_day(t)}"
        stored = {k: v for k, v in record.as_json().items() if k != "outcome_missing"}
        line = json.dumps(stored, sort_keys=True, allow_nan=False) + "\n"
        name = f"{t:%Y%m%dT%H%M%S.%fZ}-{record.action_id or uuid.uuid4().hex}.jsonl"
        replace_file(self.fs, f"{folder}/{name}", line.encode())

    def mark_settled(self, intent: AuditRecord) -> None:
        """Mark in `intent`'s day folder that its outcome is written (`settle`, for one written on a later day than
        the next, which a page of the intent's day does not list)."""
        replace_file(self.fs, f"{self.root}/{intent.tenant}/{_utc_day(intent.time)}/{intent.action_id}{SETTLED}", b"")

    def mark_late_outcomes(self, tenant: str) -> set[str]:
        """Unless done: mark the intents whose outcomes were written more than a day after their day before `settle`
        marked such intents, then the tenant's marks as whole (`MARKS_WHOLE`); the action ids of the intents marked.
        Why: a page looks for outcomes in the days it lists and the next, so without its mark such an intent read as
        without outcome on every page but the newest. One listing of the tenant's whole log, names alone (an intent
        and its outcome share the action id; the intent is the earlier), once per tenant; a store that refuses the
        marks (read-only credentials) is logged, and the ids found are still answered."""
        if tenant in self._marks_whole or self.fs.exists(f"{self.root}/{tenant}/{MARKS_WHOLE}"):
            self._marks_whole.add(tenant)
            return set()
        base = f"{self.root}/{tenant}"
        days: dict[str, list[date]] = {}  # per action id, the days of its records, oldest first
        for path in sorted(self.fs.find(base) if self.fs.exists(base) else [], key=_name):
            if path.endswith(".jsonl"):
                days.setdefault(_name(path).rsplit("-", 1)[1], []).append(date.fromisoformat(_name(path)[:10]))
        late = {action: found[0] for action, found in days.items() if found[-1] - found[0] > timedelta(days=1)}
        try:
            for action, day in late.items():
                replace_file(self.fs, f"{base}/{day}/{action}{SETTLED}", b"")
            replace_file(self.fs, f"{base}/{MARKS_WHOLE}", b"")  # after the marks: it says they are durable
            self._marks_whole.add(tenant)
        except OSError:
            log.warning("event=audit_marks_unwritten tenant=%s late_outcomes=%d: the audit log's intents settled "
                        "more than a day later are found by listing it whole again", tenant, len(late), exc_info=True)
        return set(late)

    def records(self, tenant: str, day: str | None = None, limit: int = 1000) -> list[AuditRecord]:
        """The tenant's most recent records (of one ``YYYY-MM-DD`` day if given), oldest first."""
        return self.page(tenant, day, limit).records

    @store_io("read")
    def page(self, tenant: str, day: str | None = None, limit: int = 1000, cursor: str | None = None) -> AuditPage:
        """The newest `limit` records older than `cursor` (none: the newest), oldest first, and the cursor of
        the page before (None: no older record). A cursor is a record's name, ``{day}/{object}``: the log only
        grows at its new end, so the pages before a cursor never change.

        Day folders are listed newest first, only until the page and one older record are found: a page costs
        the listings of the days it spans, not of the tenant's whole history (one `find` over a year of records
        took seconds on local disk and a listing request per thousand records on an object store)."""
        known = self._days(tenant) if day is None else None  # the tenant's days, where listed
        days = [day] if known is None else known
        if cursor is not None:
            days = [d for d in days if d <= cursor.split("/", 1)[0]]
        newest_first: list[tuple[str, str]] = []  # (name, path) older than the cursor, newest first
        read: dict[str, list[str]] = {}  # each day folder listed: its records' names
        settled: set[str] = set()  # the action ids those folders mark as settled days later
        for d in reversed(days):
            records, marked = self._listed(tenant, d)
            listed = sorted(records, reverse=True)
            read[d] = [name for name, _ in listed]
            settled |= marked
            newest_first += [entry for entry in listed if cursor is None or entry[0] < cursor]
            if len(newest_first) > limit:
                break
        page = newest_first[:limit][::-1]
        blobs = self.fs.cat([p for _, p in page], on_error="raise") if page else {}
        records = [AuditRecord.model_validate_json(blobs[p]) for _, p in page]
        if any(r.phase == "intent" for r in records):
            records = self._mark_missing_outcomes(records, tenant, read, settled, known)
        return AuditPage(records, page[0][0] if len(newest_first) > limit else None)

    def _days(self, tenant: str) -> list[str]:
        """The tenant's day folders (``YYYY-MM-DD``), oldest first."""
        base = f"{self.root}/{tenant}"
        if not self.fs.exists(base):
            return []
        names = (p.rstrip("/").rsplit("/", 1)[1] for p in self.fs.ls(base, detail=False))
        return sorted(name for name in names if _DAY.match(name))

    def _listed(self, tenant: str, day: str) -> tuple[list[tuple[str, str]], set[str]]:
        """(cursor name, path) of the records of one day folder, and the action ids it marks as settled (`settle`);
        none where it does not exist."""
        folder = f"{self.root}/{tenant}/{day}"
        if not self.fs.exists(folder):
            return [], set()
        paths = self.fs.ls(folder, detail=False)
        return ([(_name(p), p) for p in paths if p.endswith(".jsonl")],
                {p.rsplit("/", 1)[1].removesuffix(SETTLED) for p in paths if p.endswith(SETTLED)})

    def _mark_missing_outcomes(self, records: list[AuditRecord], tenant: str, read: dict[str, list[str]],
                               settled: set[str], known: list[str] | None) -> list[AuditRecord]:
        """`records` with `outcome_missing` set on each intent: whether a record of the day folders the page listed
        (`read`: each one's records' names, not listed again) or of the day after the newest of them (where the
        outcome of an action begun before midnight lies) has its action id, or those folders mark it `settled` (an
        outcome written more than a day after its intent's day: a long job's). An outcome written that late before
        these marks were written gets its mark here (`mark_late_outcomes`), where an intent would read as without, and
        one a writer added unmarked since then is searched for in the days after (`_find_late_outcomes`)."""
        after = str(date.fromisoformat(max(read)) + timedelta(days=1))
        names = [name for listed in read.values() for name in listed]
        names += [name for name, _ in self._listed(tenant, after)[0]]
        seen = Counter(name.rsplit("-", 1)[1] for name in names)

        def missing(intent: AuditRecord) -> bool:
            return seen[intent.action_id] < 2 and intent.action_id not in settled

        if any(r.phase == "intent" and missing(r) for r in records):
            settled = settled | self.mark_late_outcomes(tenant)
        if still := [r for r in records if r.phase == "intent" and missing(r)]:
            settled = settled | self._find_late_outcomes(tenant, still, after, known)
        return [r.model_copy(update={"outcome_missing": missing(r)}) if r.phase == "intent" else r for r in records]

    def _find_late_outcomes(self, tenant: str, intents: list[AuditRecord], after: str, known: list[str] | None
                            ) -> set[str]:
        """The action ids of `intents` (read as without outcome by a page that listed the days up to `after`) whose
        outcomes lie in a day folder after `after`, each marked settled now. Why: a writer that does not mark the
        late outcomes it writes (one of a version before `settle` marked them: a fenced backend still finishing a
        long job, a replica not yet upgraded) may add one after `mark_late_outcomes` marked the log whole. Each day
        is searched about once per intent: an intent found without is noted (`SEARCHED`: the newest day searched),
        and its next search begins the day before it (records are named by their writer's clock: the noted day, or
        the one before it under a clock behind, may have gained some since). `known`: the tenant's days, where
        the page listed them (a page that reads the newest day searches nothing). A store that refuses the marks or
        notes (read-only credentials) is logged; the ids found are still answered."""
        later = [d for d in (self._days(tenant) if known is None else known) if d > after]
        if not later:
            return set()
        base = f"{self.root}/{tenant}"
        notes = {f"{base}/{_utc_day(r.time)}/{r.action_id}{SEARCHED}": r for r in intents}
        searched = {notes[path].action_id: body.decode() for path, body in cat_existing(self.fs, list(notes)).items()}
        start = {r.action_id: max(after, _day_before(searched.get(r.action_id, after))) for r in intents}
        if not (days := [d for d in later if d >= min(start.values())]):  # the noted days since deleted
            return set()
        seen = {d: {name.rsplit("-", 1)[1] for name, _ in self._listed(tenant, d)[0]} for d in days}
        found = {r.action_id for r in intents if any(r.action_id in seen[d] for d in days if d >= start[r.action_id])}
        try:
            for r in intents:
                if r.action_id in found:
                    self.mark_settled(r)
                elif searched.get(r.action_id) != days[-1]:
                    replace_file(self.fs, f"{base}/{_utc_day(r.time)}/{r.action_id}{SEARCHED}", days[-1].encode())
        except OSError:
            log.warning("event=audit_marks_unwritten tenant=%s late_outcomes=%d: intents settled more than a day "
                        "later by a writer that did not mark them are searched for again", tenant, len(found),
                        exc_info=True)
        return found


@dataclass(frozen=True)
class AuditPage:
    records: list[AuditRecord]
    next_cursor: str | None


_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SETTLED = ".settled"
"""The suffix of the empty object that marks, in an intent's day folder, its outcome written days later."""
SEARCHED = ".searched"
"""The suffix of the object that notes, in an intent's day folder, the newest day searched for its outcome in vain
(`AuditLog._find_late_outcomes`)."""
MARKS_WHOLE = "_settled_marked"
"""The empty object in a tenant's folder that says every intent settled days later has its `SETTLED` mark, those of
outcomes written before the marks included (`AuditLog.mark_late_outcomes`)."""
CURSOR_PATTERN = r"^\d{4}-\d{2}-\d{2}/\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{32}$"
"""An audit cursor: a record's day folder and object name, without ``.jsonl``."""


def _utc_day(t: datetime) -> date:
    """The UTC day whose folder (``YYYY-MM-DD``) holds a record written at `t`."""
    return t.astimezone(UTC).date()


def _day_before(day: str) -> str:
    """The ``YYYY-MM-DD`` before `day`."""
    return str(date.fromisoformat(day) - timedelta(days=1))


def _name(path: str) -> str:
    """A record's cursor name: its day folder and object name (``2026-01-05/20260105T...Z-<uuid>``)."""
    return "/".join(path.rsplit("/", 2)[-2:]).removesuffix(".jsonl")


# ---------------------------------------------------------------- the two steps -----
OFFLINE_CLI = "offline-cli"
"""The `key_id` and `role` of an act of the offline CLI: no API key (theirs are hex), no verified identity."""


def write_intent(audit: AuditLog, record: AuditRecord) -> AuditRecord:
    """Append `record` as the intent of an action about to take place (a new `action_id`) and return it; whatever
    the store raises is raised as is: the caller must then not act (`serve_apps.audit_steps.begin` answers 503)."""
    intent = record.model_copy(update={"phase": "intent", "action_id": uuid.uuid4().hex})
    audit.append(intent)
    return intent


def settle(audit: AuditLog, intent: AuditRecord, details: dict[str, Any]) -> None:
    """Append `intent`'s outcome record, later than it (their objects share the action id: their times may not),
    and where that is more than a day after the intent's day, mark the intent settled in its day folder, after the
    outcome (a mark without it would claim an outcome there is none of); a failure is logged, and the intent stays."""
    at = max(datetime.now(UTC), intent.time + timedelta(microseconds=1))
    try:
        audit.append(intent.model_copy(update={"time": at, "phase": "outcome", "details": details}))
        if _utc_day(at) - _utc_day(intent.time) > timedelta(days=1):
            audit.mark_settled(intent)
    except Exception:  # noqa: BLE001 - the action took place: its answer stands, its intent says what it was
        log.exception("event=audit_failed phase=outcome action=%s target=%s action_id=%s request_id=%s "
                      "tenant=%s key_id=%s", intent.action, intent.target, intent.action_id, intent.request_id,
                      intent.tenant, intent.key_id)


def error_outcome(exc: Exception) -> dict[str, Any]:
    """The outcome of an action that failed (not refused): the error, with store locations scrubbed (tenants read
    the log)."""
    return {"status": "error", "error": scrub_locations(f"{type(exc).__name__}: {exc}")[:300]}


def refused_outcome(reason: str, **fields: Any) -> dict[str, Any]:
    """The outcome of an action refused (the caller's fault: role, four eyes, state, evidence), with its reason."""
    return {"status": "refused", **fields, "reason": scrub_locations(reason)[:300]}


@contextmanager
def two_steps(audit: AuditLog, record: AuditRecord, begin: Callable[[AuditLog, AuditRecord], AuditRecord],
              outcome_of: Callable[[Exception], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """`record`'s action in two steps around the body: `begin` writes the intent (if it raises, the body does not
    run), then `settle` writes `record.details`, what the body put in the yielded dict (what it did before it raised,
    too) and ``status`` done, or `outcome_of` what the body raised. Each writer passes how it refuses an action whose
    intent the store did not take (`begin`) and how it tells a refusal from an error (`outcome_of`)."""
    intent = begin(audit, record)
    outcome: dict[str, Any] = {}
    try:
        yield outcome
    except Exception as exc:
        settle(audit, intent, {**record.details, **outcome, **outcome_of(exc)})
        raise
    settle(audit, intent, {**record.details, "status": "done", **outcome})


def by_offline_cli(tenant: str, action: str, target: str, declared_actor: str, declared_roles: frozenset[str],
                   details: dict[str, Any]) -> AuditRecord:
    """A record of an act of the offline CLI, as it can know it: `key_id` and `role` ``offline-cli`` (no API key
    checked anyone), the identity the caller declared (``--actor``, ``--role``) marked unverified, and what the
    machine says: the OS user running it and the host. An auditor tells it from an API key's act by `key_id`."""
    principal = {"via": OFFLINE_CLI, "declared_actor": declared_actor, "declared_roles": sorted(declared_roles),
                 "verified": False, **os_identity()}
    return AuditRecord(time=datetime.now(UTC), request_id=None, key_id=OFFLINE_CLI, tenant=tenant, role=OFFLINE_CLI,
                       action=action, target=target, details={**details, "principal": principal})


def os_identity() -> dict[str, str]:
    """What the machine says about who runs this process, whatever identity its caller declares: the login (its uid
    where the system names none, as in a container) and the host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return {"os_user": user, "host": socket.gethostname()}
