"""Refused credentials (401) for the operator: they have no tenant, so no tenant's audit log can hold them.

Each is counted (`metrics.CREDENTIALS_REFUSED`, by reason) and logged as ``event=credential_refused`` with its reason,
route, request id and `key_fp`: the first 8 hex digits of the SHA-256 of the key id the key presents (``rtk_<key
id>_...``; ``-`` where it names none), never the key. A flood of bad keys must not flood the log: within a minute only
the first refusal of each (reason, key_fp) is logged, for at most `MAX_LINES` of them; the next refusal after the
minute logs how many went unlogged (``event=credentials_refused_unlogged``). The counter counts every one.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from raytwin import metrics
from serve_apps.auth import KeyStore, parse_credentials
from serve_apps.errors import ApiError, Unauthorized, error_response

log = logging.getLogger("raytwin.serve.credentials")

WINDOW_S = 60.0
MAX_LINES = 20
"""The most refusals logged one by one a minute: distinct (reason, key_fp) beyond these are only counted."""
_KEY_ID = re.compile(r"^rtk_([0-9a-f]{12})_")


class CredentialRefusals:
    """Counts every refused credential; logs the first of each kind a minute (one ingress replica's, in its process)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._start = -WINDOW_S
        self._logged: set[tuple[str, str]] = set()
        self._unlogged = 0

    def refused(self, reason: str, key_fp: str, route: str, request_id: str | None) -> None:
        metrics.CREDENTIALS_REFUSED.inc(reason=reason)
        now = self._clock()
        if now - self._start >= WINDOW_S:
            if self._unlogged:
                log.warning("event=credentials_refused_unlogged count=%d window_s=%g: refused credentials beyond the "
                            "first of each kind (see raytwin_credentials_refused_total)", self._unlogged, WINDOW_S)
            self._start, self._logged, self._unlogged = now, set(), 0
        if (reason, key_fp) in self._logged or len(self._logged) >= MAX_LINES:
            self._unlogged += 1
            return
        self._logged.add((reason, key_fp))
        log.warning("event=credential_refused request_id=%s route=%s reason=%s key_fp=%s", request_id or "-", route,
                    reason, key_fp)


def refusal_of(request: Request, keys: KeyStore) -> tuple[str, str]:
    """Why `request`'s credential was refused, and the fingerprint of the key id it presents."""
    try:
        key = parse_credentials(request.headers.get("authorization"), request.headers.get("x-api-key"))
    except Unauthorized:
        return "malformed", "-"
    if key is None:
        return "missing", "-"
    named = _KEY_ID.match(key)
    if named is None:
        return "unknown_key", "-"
    key_id = named.group(1)
    try:
        known = keys.has_key_id(key_id)
    except ApiError:  # the keys file broke since: the key is refused whatever it was
        known = False
    return ("wrong_secret" if known else "unknown_key"), hashlib.sha256(key_id.encode()).hexdigest()[:8]


async def log_refused_credential(request: Request, exc: Exception) -> JSONResponse:
    """The handler of 401 `Unauthorized`: answered as every error, counted and logged for the operator."""
    assert isinstance(exc, ApiError)
    services = request.app.state.services
    reason, key_fp = refusal_of(request, services.keys)
    services.refusals.refused(reason, key_fp, getattr(request.scope.get("route"), "path", "unmatched"),
                              getattr(request.state, "request_id", None))
    return error_response(request, exc.status, exc.code, exc.message_for(request), exc.details, exc.headers)
