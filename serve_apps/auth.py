"""API keys: hashed at rest, mapped to a tenant and a role.

The keys file is a JSON list of ``{"key_id", "sha256", "tenant", "role", "grants", "owner"}``; only SHA-256 digests
of keys are stored, so the file reveals no usable secret. A revoked key stays in it as ``{"key_id", "tenant", "role",
"grants", "owner", "revoked"}`` (`RevokedKey`): without its digest, so no key authenticates as it, but with its owner,
so that who held it can still be told (`KeyStore.owner`: what a record made under its key id is compared as).
A key is presented as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` and looked up by digest, then
confirmed with `hmac.compare_digest` (constant time). Keys look like ``rtk_<key_id>_<secret>``.

A key's `role` is its rank (reader < writer < admin); its `grants` are roles outside that order, such
as ``approver`` (may approve a model version into production, `raytwin.lifecycle`): an admin is not an
approver unless granted, so that approving stays a separate, deliberate duty. Its `owner` names the person who
holds it: the four-eyes rules compare owners (`Principal.person`), so that one person's two keys (a key and its
successor while it is rotated) are one pair of eyes. A key without an owner cannot be told from another key of its
holder, so it approves nothing (`require_owner`), and `create_key` (``raytwin keys create``) makes no writer, admin or
granted key without one (`OWNER_NEEDED`); such keys stored before keep working for everything else, and
`set_key_owner` (``raytwin keys set-owner``) names the holder of one. It names an owner only where there is none:
four eyes compares what was done under a key (a command it proposed, a version it submitted, still waiting for
approval) with its owner's other keys, looked up when the approval comes, so moving a key from one owner to another
would let the first owner's other keys approve the first owner's work. A key that passes to another person is
replaced instead (its old holder knows its secret): a new key for them, the old one revoked.

Every key created, revoked or given an owner (`create_key`, `revoke_key`, `set_key_owner`: ``raytwin keys
create/revoke/set-owner``) is audited in the keys file's audit trail, ``{keys file}.audit.jsonl`` beside it
(`key_audit_trail`): the keys file is where keys change, and the command is given no store (keys are made before the
service's store exists, on a machine that may not reach it). Each change holds the file's lock, ``{keys file}.lock``,
from its read to its write, and its audit record is in the trail before the changed file replaces the old one (a change
the trail cannot take is not made): two changes at once would otherwise each write what they read (a key one revoked
back in the file the other wrote).
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import hmac
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import IntEnum
from functools import partial
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from raytwin.contracts import Identifier
from serve_apps.errors import Forbidden, ServiceUnavailable, Unauthorized

log = logging.getLogger("raytwin.serve.auth")


class Role(IntEnum):
    """Ordered roles: each may do everything the ones below it may."""

    reader = 1  # GET
    writer = 2  # + telemetry, scenarios
    admin = 3  # + asset type / asset changes, audit log


RoleName = Literal["reader", "writer", "admin"]
GrantName = Literal["approver"]


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    key_id: Identifier
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: Identifier
    role: RoleName
    grants: tuple[GrantName, ...] = ()
    owner: Identifier | None = None


class RevokedKey(BaseModel):
    """A revoked key as the keys file keeps it: no digest (nothing authenticates as it), its holder kept for four
    eyes and audit (a recommendation it computed, a command it proposed, are still its owner's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    key_id: Identifier
    tenant: Identifier
    role: RoleName
    grants: tuple[GrantName, ...] = ()
    owner: Identifier | None = None
    revoked: datetime


KeyEntry = KeyRecord | RevokedKey

OWNER_NEEDED = ("four eyes compares who acts, and a key without an owner is a person of its own: one person holding "
                "two such keys (a key and its successor while it is rotated) would approve their own work")


class KeyChangeRefused(ValueError):
    """A key change refused for four eyes' sake (a key without the owner it needs, an owner changed); the message
    says what to do instead."""


def ownerless_fix(key_id: str) -> str:
    """How to make ownerless key `key_id` one that approves: name its holder as its owner."""
    return (f"give the key its holder as owner: `raytwin keys set-owner {key_id} --owner PERSON` (the same PERSON as on "
            "that person's other keys)")


def require_owner(who: Principal, act: str) -> None:
    """403 for a key without an owner doing `act` (an approval): four eyes cannot tell its holder from the holder
    of the key whose work it approves."""
    if who.owner is None:
        raise Forbidden(f"key {who.key_id} has no owner, so it may not {act}: {OWNER_NEEDED}; "
                        f"{ownerless_fix(who.key_id)}")


class Principal(BaseModel):
    """Who is calling: the key's id, tenant, role, grants and owner (never the key itself)."""

    model_config = ConfigDict(frozen=True)
    key_id: str
    tenant: str
    role: RoleName
    grants: tuple[GrantName, ...] = ()
    owner: str | None = None

    def allows(self, needed: Role) -> bool:
        return Role[self.role] >= needed

    @property
    def person(self) -> str:
        """Who acts, for the four-eyes rules (a version's author, publisher and recalibration policy setter, a
        command's proposer and approver): the key's owner where the keys file names one, else the key itself (which
        approves nothing: `require_owner`). Two keys that compared as two people let one person approve their own
        work with their second key."""
        return self.owner or self.key_id


_ENTRIES = TypeAdapter(list[KeyEntry])


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(path: str | Path) -> list[KeyEntry]:
    """The keys in `path`, revoked ones too (an empty list if the file does not exist yet)."""
    p = Path(path)
    if not p.exists():
        return []
    return _ENTRIES.validate_json(p.read_bytes())


class KeysUnavailable(ServiceUnavailable):
    """The keys file cannot be read: every request is refused, none is let through unchecked."""


class KeyStore:
    """Authenticates presented keys against the hashed records of a keys file.

    The file is re-read when its modification time changes, so keys added with
    ``raytwin keys create`` (or a rotated Kubernetes Secret) work without a restart.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"API keys file {path} does not exist; create keys with `raytwin keys create`")
        self._mtime: float | None = -1.0
        self._by_digest: dict[str, KeyRecord] = {}
        self._by_id: dict[str, KeyEntry] = {}
        self._broken: str | None = None
        self._refresh()

    def _refresh(self) -> None:
        """Re-read a changed file. One that does not parse (a hand edit's typo, a write caught half done)
        refuses every key until it is fixed (`KeysUnavailable`): keeping the old keys would keep a key valid
        that the edit revoked."""
        try:
            mtime: float | None = self.path.stat().st_mtime
        except OSError as exc:  # moved away, or a Secret being remounted: no key can be checked
            if self._mtime is not None:  # said once; read again whenever it is back (a move keeps its mtime)
                log.error("event=keys_file_invalid path=%s error=%r: every request is refused (503) until it is "
                          "back", self.path, exc.strerror or str(exc))
            mtime, self._mtime, self._broken = None, None, f"{type(exc).__name__}: {exc.strerror or exc}"
        if mtime is not None and mtime != self._mtime:
            self._mtime = mtime
            try:
                entries = load_keys(self.path)
                self._by_digest = {r.sha256: r for r in entries if isinstance(r, KeyRecord)}
                self._by_id = {r.key_id: r for r in entries}
                self._broken = None
            except ValueError as exc:
                self._broken = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                log.error("event=keys_file_invalid path=%s error=%r: every request is refused (503) until it is "
                          "fixed; `raytwin keys create/revoke` rewrite it atomically", self.path, self._broken)
        if self._broken is not None:
            raise KeysUnavailable("the server's API keys file is missing or invalid: no key can be checked until its "
                                  "operator fixes it")

    def authenticate(self, key: str) -> Principal | None:
        return self.principal(digest(key))

    def has_key_id(self, key_id: str) -> bool:
        """Whether a key of this id is in the file now: a refused key naming it had another secret."""
        self._refresh()
        return isinstance(self._by_id.get(key_id), KeyRecord)

    def entry(self, key_id: str) -> KeyEntry | None:
        """The file's entry for key `key_id`, a revoked key's too (None: the file never had it, or it was removed
        before revoked keys were kept): who held a key outlives the key (`owner`)."""
        self._refresh()
        return self._by_id.get(key_id)

    def owner(self, key_id: str) -> str | None:
        """The owner the file names for the key `key_id`, revoked or not (None: none, or no such key): what a record
        made under a key id (a run's `user`) is compared as, so that another key of the same person is the same pair
        of eyes, after that key was revoked too."""
        entry = self.entry(key_id)
        return entry.owner if entry is not None else None

    def key_ids(self, tenant: str, owner: str | None) -> frozenset[str]:
        """The ids of the tenant's keys held by `owner` (None: those without one), revoked ones too: what a record
        made under a key id may be another key of `owner`'s (four eyes)."""
        self._refresh()
        return frozenset(k for k, e in self._by_id.items() if e.tenant == tenant and e.owner == owner)

    def principal(self, key_sha256: str) -> Principal | None:
        """Who holds the key of this digest now (None: unknown or revoked): what an open stream re-checks
        without keeping the key itself. A stat of the file; it is read again only when it changed."""
        self._refresh()
        record = self._by_digest.get(key_sha256)
        if record is None or not hmac.compare_digest(record.sha256, key_sha256):
            return None
        return Principal(key_id=record.key_id, tenant=record.tenant, role=record.role, grants=record.grants,
                         owner=record.owner)


def create_key(path: str | Path, tenant: str, role: RoleName, grants: tuple[GrantName, ...] = (), *,
               owner: Identifier | None = None) -> tuple[KeyRecord, str]:
    """Append a new key's hash to `path`, held by `owner` (the person who holds it); returns the record and the key
    (shown once, never stored). `KeyChangeRefused` for a writer, admin or granted key without an owner (`OWNER_NEEDED`;
    only a reader key's acts are compared by no rule), pydantic's `ValidationError` for an owner, tenant or grant that
    is not one."""
    if owner is None and (role != "reader" or grants):
        raise KeyChangeRefused(f"a {role} key{' with a grant' if grants else ''} needs an owner, the person who holds "
                               f"it (e.g. alice): {OWNER_NEEDED}; give every key of one person the same owner")
    key_id = secrets.token_hex(6)
    key = f"rtk_{key_id}_{secrets.token_urlsafe(32)}"
    record = KeyRecord(key_id=key_id, sha256=digest(key), tenant=tenant, role=role, grants=tuple(sorted(set(grants))),
                       owner=owner)
    with _one_change_at_a_time(Path(path)):
        _write_keys(Path(path), load_keys(path) + [record], partial(_audit_key_change, Path(path), "key.create",
                                                                    record))
    return record, key


def revoke_key(path: str | Path, key_id: str) -> KeyRecord:
    """Revoke key `key_id` in `path`: its digest is dropped (a running server refuses it from its next request and
    ends its open change streams within `serve_apps.stream_auth.STREAM_AUTH_RECHECK_S`), its owner kept
    (`RevokedKey`); `KeyError` if there is no such key, or it is revoked already."""
    with _one_change_at_a_time(Path(path)):
        entries = load_keys(path)
        live = [r for r in entries if r.key_id == key_id and isinstance(r, KeyRecord)]
        if not live:
            gone = next((r for r in entries if r.key_id == key_id), None)
            if isinstance(gone, RevokedKey):  # the id is listed: "no key" would contradict `raytwin keys list`
                raise KeyError(f"key {key_id} was revoked already, at {gone.revoked.isoformat()}; nothing was "
                               "changed")
            raise KeyError(f"no key {key_id!r} in {path}; `raytwin keys list` shows the key ids (revoked ones "
                           "marked)")
        revoked = RevokedKey(**live[0].model_dump(exclude={"sha256"}), revoked=datetime.now(UTC))
        _write_keys(Path(path), [revoked if r is live[0] else r for r in entries],
                    partial(_audit_key_change, Path(path), "key.revoke", live[0]))
        return live[0]


def set_key_owner(path: str | Path, key_id: str, owner: Identifier) -> KeyRecord:
    """Name `owner` as the holder of key `key_id`, stored without one: what it did so far becomes `owner`'s (none of
    their keys approves it; another person's may), and it may approve from now on. `KeyError` for no such key;
    `KeyChangeRefused` for a revoked key (what it did stays compared as it was when it was revoked) or one that has an
    owner (see the module's docstring: changing it would let its first owner's other keys approve their own work)."""
    with _one_change_at_a_time(Path(path)):
        entries = load_keys(path)
        found = next((r for r in entries if r.key_id == key_id), None)
        if found is None:
            raise KeyError(f"no key {key_id!r} in {path}; `raytwin keys list` shows the key ids")
        if isinstance(found, RevokedKey):
            raise KeyChangeRefused(f"key {key_id} is revoked: it keeps the owner it had ({found.owner or 'none'}), "
                                   "what four eyes compares its work with; nothing was changed")
        if found.owner is not None:
            raise KeyChangeRefused(
                f"key {key_id} is held by {found.owner} already and an owner is never changed: four eyes compares "
                f"what was done under the key, approvals in flight too, with its owner's other keys, so another owner "
                f"would let {found.owner}'s other keys approve {found.owner}'s work; nothing was changed. If another "
                f"person holds it now, create them their own key (`raytwin keys create ... --owner PERSON`) and "
                f"`raytwin keys revoke {key_id}` (its old holder knows its secret)")
        record = KeyRecord.model_validate({**found.model_dump(), "owner": owner})
        _write_keys(Path(path), [record if r is found else r for r in entries],
                    partial(_audit_key_change, Path(path), "key.set_owner", record))
        return record


def key_audit_trail(keys_file: str | Path) -> Path:
    """The keys file's audit trail: one `serve_apps.audit.AuditRecord` a line, appended, never rewritten."""
    p = Path(keys_file)
    return p.with_name(p.name + ".audit.jsonl")


def _audit_key_change(keys_file: Path, action: str, record: KeyRecord) -> None:
    """Append `action` on the key of `record` to the trail: `key_id`, `tenant` and `role` are the key's own (it made
    no request), `details.by` the user and host that ran the command."""
    from serve_apps.audit import AuditRecord

    entry = AuditRecord(time=datetime.now(UTC), request_id=None, key_id=record.key_id, tenant=record.tenant,
                        role=record.role, action=action, target=record.key_id,
                        details={"grants": list(record.grants), "by": f"{getpass.getuser()}@{socket.gethostname()}",
                                 "keys_file": keys_file.name, "owner": record.owner})
    fd = os.open(key_audit_trail(keys_file), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as trail:
        trail.write(entry.json_line() + "\n")


@contextmanager
def _one_change_at_a_time(p: Path) -> Iterator[None]:
    """Hold the keys file's lock (``{keys file}.lock`` beside it, exclusive) while a change reads the file, changes it
    and writes it whole: two at once (a `raytwin keys create` beside a `raytwin keys revoke`) each wrote what it had
    read, so the key the other revoked came back, or the key the other created was lost."""
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p.with_name(p.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (releases the lock)


def _write_keys(p: Path, records: list[KeyEntry], audit: Callable[[], None] | None = None) -> None:
    """Whole or not at all (a server re-reads the file on change and must never see half of it), owner-only.
    `audit`: the change's trail record, appended once the new file is written and before it replaces the old one: a
    change whose record the trail does not take (a full disk, a trail its user may not write) is not made either,
    where it was made unaudited."""
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_bytes(_ENTRIES.dump_json(records, indent=2, exclude_none=True))  # no `owner` where none: as before
    tmp.chmod(0o600)
    if audit is not None:
        try:
            audit()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    tmp.replace(p)


SEND_A_KEY = "send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def parse_credentials(authorization: str | None, x_api_key: str | None) -> str | None:
    """The presented key (`X-API-Key` first, else ``Authorization: Bearer``), or None when neither header is sent.

    A credential sent that holds no key (another scheme, e.g. ``Basic``; ``Bearer`` without a key; an empty
    `X-API-Key`) is 401 on every route, health included: read as no key, health answered it as an anonymous
    "ok", so a monitor with a broken credential never learnt it. The message never repeats the header."""
    if x_api_key is not None:
        if not x_api_key.strip():
            raise Unauthorized(f"the X-API-Key header is empty: {SEND_A_KEY}", headers=BEARER_CHALLENGE)
        return x_api_key.strip()
    if authorization is None:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("the Authorization header holds no API key (only the Bearer scheme is read, e.g. not "
                           f"Basic): {SEND_A_KEY}", headers=BEARER_CHALLENGE)
    return value.strip()

