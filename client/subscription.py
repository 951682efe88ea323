"""Following the change stream: SSE parsing and the resume point, shared by the sync and async clients.

The client keeps the id of the last frame it received (events, and the bare `id:` frames the
server sends at the start and after filtered changes) and reconnects with `Last-Event-ID` after
a dropped connection, a restarted replica or a `fell_behind` event: the stream continues with
no gap and no duplicate (serve_apps/README.md, "Change stream"). A stream the server ends with an
`error` event (its key was revoked: 401) raises that error, as a refused connection does, instead
of reconnecting.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import ValidationError

from client.calls import ANSWER_EXTRA, names
from client.errors import Gone, RayTwinError, UnexpectedAnswer, from_error, retry_after_s
from client.retry import RetryPolicy, verdict
from serve_apps.changes import Change, parse_event_id

STREAM_READ_TIMEOUT_S = 45.0
"""No byte for this long (the server sends a keep-alive every 15 s): the connection is dead, reconnect."""


@dataclass
class Subscription:
    """The stream's state and every reconnect decision, so the sync and async clients' loops only
    open, read and sleep: open ``stream(**sub.connection(...))``; if ``sub.refused(r)`` read and raise
    it; unless ``r.is_error``, yield ``sub.feed([line])`` per line until ``sub.fell_behind``; on a
    transport error ``sub.dropped()``; then sleep ``sub.reconnect_delay(policy)`` (None: reconnect at
    once) and open again. Memory stays bounded: one frame is held, never the stream."""

    after: int | str | None = None  # a number, or an event id the stream sent (`Change.event_id`: checked)
    asset_ids: tuple[str, ...] = ()
    type_name: str | None = None
    kinds: tuple[str, ...] = ()
    last_id: int | str | None = None
    fell_behind: bool = False
    failures: int = 0  # connections in a row that delivered nothing
    answered: bool = False  # some connection was answered: the server exists, outages end
    _retry_after: float | None = None
    _frame: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.asset_ids, self.kinds = names("asset_ids", self.asset_ids), names("kinds", self.kinds)
        self.last_id = self.after

    def request(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(query, headers) of the next connection: from the last id received, else from `after`/now."""
        self.fell_behind, self._frame = False, {}
        params: dict[str, Any] = {"asset_id": list(self.asset_ids), "kind": list(self.kinds)}
        if self.type_name is not None:
            params["type_name"] = self.type_name
        headers = {"Accept": "text/event-stream"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = str(self.last_id)
        return params, headers

    def connection(self, connect_timeout: float | None) -> dict[str, Any]:
        """Keyword arguments of the next `stream()` call (method, url, params, headers, timeout)."""
        params, headers = self.request()
        return {"method": "GET", "url": "/v1/changes", "params": params, "headers": headers,
                "timeout": httpx.Timeout(connect_timeout, read=STREAM_READ_TIMEOUT_S)}

    def refused(self, response: httpx.Response) -> bool:
        """An error that reconnecting will not cure (raise it); notes `Retry-After` of one it may (the server
        answered: it exists, and a full replica or the tenant's stream limit is waited out like an outage; so is
        a proxy's answer while the service restarts, such as Serve's bare 404 while the app deploys)."""
        self._retry_after = retry_after_s(response) if response.is_error else None
        self.answered = self.answered or "x-raytwin-request-id" in response.headers  # RayTwin, not a bare proxy
        return response.is_error and verdict(response) is None

    def dropped(self) -> None:
        """The connection failed or broke: reconnect after a backoff (no `Retry-After` to honour)."""
        self._retry_after = None

    def reconnect_delay(self, policy: RetryPolicy) -> float | None:
        """Seconds to wait before reconnecting (None: at once, the stream fell behind and resumes from
        the store). Once the server has answered, it reconnects for as long as the server is away (a
        restart, a rolling upgrade), backing off up to `policy.max_backoff_s`; before that (a wrong URL, a
        server that never answered) it raises `RayTwinError` after `policy.attempts` failed connections."""
        if self.fell_behind:
            return None
        self.failures += 1
        if self.failures >= policy.attempts and not self.answered:
            raise RayTwinError(f"change stream: {self.failures} connections failed in a row, none answered")
        return policy.delay(min(self.failures, 32), self._retry_after)

    def feed(self, lines: Iterable[str]) -> list[Change]:
        """The changes completed by these lines; notes ids and `fell_behind`. A change that does not fit
        the client's `Change` raises `UnexpectedAnswer` (not pydantic's error); a `gone` event (the changes
        after the resume point were deleted by the retention) raises `Gone`, as a 410 at connect does; an
        `error` event raises its error (`Unauthorized` for a revoked key), unless a later connection may
        succeed (429, 503: the stream ends and is reconnected after a backoff, as a refused connect is)."""
        out = []
        for line in lines:
            self.failures, self.answered = 0, True
            if line:
                if not line.startswith(":"):
                    name, _, value = line.partition(":")
                    self._frame[name] = value[1:] if value.startswith(" ") else value
                continue
            frame, self._frame = self._frame, {}
            if parse_event_id(frame.get("id", "")) is not None:
                self.last_id = frame["id"].strip()
            if frame.get("event") == "fell_behind":
                self.fell_behind = True
            elif frame.get("event") == "gone":
                body = json.loads(frame.get("data") or "{}")
                raise Gone(410, "gone", str(body.get("message", "the changes after the resume point were deleted")),
                           [body])
            elif frame.get("event") == "error":  # 429/503: the server ends the stream; reconnected after a backoff
                body = json.loads(frame.get("data") or "{}")
                error = from_error(int(body.get("status") or 500),
                                   body.get("error") or {"message": "the server ended the change stream"})
                if error.status not in (429, 503):
                    raise error
            elif "data" in frame and frame.get("event"):
                try:
                    out.append(Change.model_validate_json(frame["data"], extra=ANSWER_EXTRA))
                except ValidationError as exc:
                    raise UnexpectedAnswer(f"GET /v1/changes (event id {frame.get('id')})", exc) from exc
        return out
