"""An open stream's key, checked again while the stream lasts: revoking a key ends its streams.

A key is checked when a request arrives, and a change stream is one request that lasts hours: a
revoked key kept receiving its tenant's changes (every twin state, every catalog write) for as long
as its client listened. So a stream re-checks its key before it sends anything once
`STREAM_AUTH_RECHECK_S` has passed since the last check, and at least that often while idle,
against the replica's `KeyStore` (a stat of the keys file, read again only when it changed; the
stream keeps the key's SHA-256, never the key). A key revoked, moved to another tenant or below the
stream's role, or a keys file that cannot be read (closed, as for a new request), ends the stream
with the error a new request would get, logged and audited.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from serve_apps.auth import KeyStore, Principal, Role
from serve_apps.errors import ApiError, Forbidden, Unauthorized

log = logging.getLogger("raytwin.serve.auth")

STREAM_AUTH_RECHECK_S = 2.0
"""Seconds: the longest a stream sends anything after its key was revoked (once the revocation is in the replica's
keys file: `raytwin keys revoke` writes it at once, a remounted Kubernetes Secret when the kubelet syncs it)."""


@dataclass
class StreamCredential:
    """The key of one open stream and who it was when the stream opened (`serve_apps.deps.streaming`)."""

    keys: KeyStore
    who: Principal
    key_sha256: str
    needed: Role
    stream: str  # names the stream in logs and audit actions: ``change_stream``
    request_id: str | None
    audit: Callable[[ApiError], Awaitable[None]]  # records the stream's end in its tenant's audit log
    recheck_s: float = STREAM_AUTH_RECHECK_S
    clock: Callable[[], float] = time.monotonic
    _checked: float = field(init=False)

    def __post_init__(self) -> None:
        self._checked = self.clock()  # authenticated just now, by the request's own dependency

    async def ended(self) -> ApiError | None:
        """Why the stream must end now (logged and audited), or None: its key still allows it, or it was checked
        less than `recheck_s` ago (a stat per event would be wasted; the bound is per interval)."""
        if self.clock() - self._checked < self.recheck_s:
            return None
        refusal = self.refusal()
        if refusal is not None:
            log.warning("event=stream_ended_by_auth stream=%s key_id=%s tenant=%s status=%d code=%s request_id=%s "
                        "reason=%r", self.stream, self.who.key_id, self.who.tenant, refusal.status, refusal.code,
                        self.request_id, refusal.message)
            try:
                await self.audit(refusal)
            except Exception:  # noqa: BLE001 - the stream ends whether or not the store takes the record
                log.exception("event=stream_end_audit_failed stream=%s key_id=%s tenant=%s", self.stream,
                              self.who.key_id, self.who.tenant)
        return refusal

    def refusal(self) -> ApiError | None:
        """The error a new request with this stream's key would get now (None: it may go on); checks now."""
        self._checked = self.clock()
        try:
            now = self.keys.principal(self.key_sha256)
        except ApiError as exc:  # the keys file is missing or invalid: no key can be checked, none goes on
            return exc
        if now is None:
            return Unauthorized("unknown API key: it was revoked (or removed from the server's keys file) while this "
                                "stream was open, which ends the stream; reconnect with a valid key",
                                headers={"WWW-Authenticate": "Bearer"})
        if now.tenant != self.who.tenant:
            return Forbidden(f"this API key was moved from tenant {self.who.tenant!r} to another while this stream "
                             "was open, which ends it; reconnect without Last-Event-ID (its ids were the old "
                             "tenant's)")
        if not now.allows(self.needed):
            return Forbidden(f"role {now.role!r} may not do this (needs {self.needed.name}); the key's role was "
                             "lowered while this stream was open, which ends it")
        return None
