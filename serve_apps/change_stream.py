"""A tenant's change log as Server-Sent Events, served by the Ingress replicas.

A stream is a loop over the backend's change log (`serve_apps.changes`): read a page after the
last position, send the changes that pass the filter, and when caught up wait for the log's
head to move. Its position is the log's sequence number, which with the change's generation is each
event's `id:` (``<seq>-<generation>``, `serve_apps.changes.event_id`; `resume_point` refuses one the
log no longer holds, as after a restore of the store), so a
client resumes with `Last-Event-ID` on any replica, after any restart, with no gap and no
duplicate. Memory is bounded: a stream holds one page; waiting streams of one replica share one
poller that asks the backend for the heads of their tenants every `change_poll_s`. A stream
that has caught up reads only the backend's in-memory window (`change_memory` changes per
tenant); when its position has left that window, because its client reads slower than the
tenant changes, it gets one `fell_behind` event and ends, and the client resumes from the store
with its `Last-Event-ID`. Ingestion never waits for a stream. A stream whose key is revoked ends
with an `error` event within `STREAM_AUTH_RECHECK_S` (`serve_apps.stream_auth`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serve_apps.changes import Change, ChangePage, ChangeStore, event_id, parse_event_id
from serve_apps.errors import Gone, Unprocessable, error_body
from serve_apps.stream_auth import StreamCredential
from serve_apps.unawaited import orphan

if TYPE_CHECKING:  # deps imports this module for its Services
    from serve_apps.deps import BackendClient

log = logging.getLogger("raytwin.serve.changes")
HEARTBEAT_S = 15.0
"""A comment line this often keeps proxies from closing an idle stream."""


@dataclass(frozen=True)
class ChangeFilter:
    """Which changes a stream sends: any of `asset_ids`, of type `type_name`, of one of `kinds` (a kind
    such as ``twin.state``, or a family: ``twin``, ``asset``, ``asset_type``, ``job``). None: all."""

    asset_ids: frozenset[str] | None = None
    type_name: str | None = None
    kinds: frozenset[str] | None = None

    def matches(self, change: Change) -> bool:
        if self.asset_ids is not None and change.asset_id not in self.asset_ids:
            return False
        if self.type_name is not None and change.type_name != self.type_name:
            return False
        return self.kinds is None or change.kind in self.kinds or change.kind.split(".")[0] in self.kinds


class HeadWatcher:
    """Wakes the streams of one replica when their tenant's log grows, with one backend call per poll."""

    def __init__(self, backend: BackendClient, poll_s: float):
        self.backend = backend
        self.poll_s = poll_s
        self._waiting: dict[str, int] = {}  # tenant -> streams waiting
        self._heads: dict[str, int] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task | None = None

    async def wait(self, tenant: str, after: int, timeout_s: float) -> bool:
        """True once the tenant's head is past `after`; False after `timeout_s`."""
        self._waiting[tenant] = self._waiting.get(tenant, 0) + 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())
            orphan(self._task, "change head poll", logging.WARNING)  # the streams' own waits do not read it
        try:
            async with asyncio.timeout(timeout_s):
                while self._heads.get(tenant, -1) <= after:
                    await self._events.setdefault(tenant, asyncio.Event()).wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting[tenant] -= 1
            if not self._waiting[tenant]:
                del self._waiting[tenant]
                self._heads.pop(tenant, None)

    async def _poll(self) -> None:
        while self._waiting:
            try:
                heads = await self.backend.call("change_heads", sorted(self._waiting))
            except Exception:  # the backend restarting: streams keep waiting, the next poll retries
                log.warning("event=change_heads_failed", exc_info=True)
                heads = {}
            for tenant, head in heads.items():
                if head != self._heads.get(tenant):
                    self._heads[tenant] = head
                    event = self._events.pop(tenant, None)
                    if event is not None:
                        event.set()
            await asyncio.sleep(self.poll_s)


async def first_page(backend: BackendClient, tenant: str, after: int, page: int) -> ChangePage:
    """The stream's first read (before the response starts, so errors still get a status code)."""
    return await backend.call("changes_after", tenant, after, page)


async def change_at(backend: BackendClient, store: ChangeStore, tenant: str, seq: int) -> Change | None:
    """Change `seq` from the backend's memory, else from the store (None: not in the log, or removed)."""
    if seq <= 0:
        return None
    page = await backend.call("changes_after", tenant, seq - 1, 1)
    found = await asyncio.to_thread(store.read, tenant, seq - 1, 1) if page.fell_behind else page.changes
    return found[0] if found and found[0].seq == seq else None


async def resume_point(backend: BackendClient, store: ChangeStore, tenant: str, after: int, given: str | None,
                       head: int) -> str:
    """The event id a stream resumes after: that of change `after` (the client's `given` id, None for a plain
    number or "from now"). An id whose generation is not that of the change now under its number, or that is
    ahead of the log, names a change this log no longer has (the store was restored from an earlier copy, and
    new changes reuse the numbers after it): 410, never a silent resume past the changes under the reused
    numbers. A plain number (an id sent before generations, or `after`) is resumed unchecked."""
    parsed = None if given is None else parse_event_id(given)
    generation = None if parsed is None else parsed[1]
    change = await change_at(backend, store, tenant, after) if 0 < after <= head else None
    lost = generation is not None and (after > head or (change is not None and change.generation != generation))
    if lost:
        newest = await change_at(backend, store, tenant, head)
        now = newest.event_id if newest is not None else str(head)
        raise Gone(f"event id {given} names a change this tenant's change log no longer has: the store was restored "
                   f"from an earlier copy, and changes since reuse its numbers, so resuming after it would skip "
                   f"changes. Re-read what you mirror (POST /v1/query, GET the assets and twin states), then "
                   f"reconnect without an id (Last-Event-ID or after), or with Last-Event-ID: {now} (the newest "
                   f"change now)",
                   details=[{"header": "Last-Event-ID", "last_event_id": given, "head": now}])
    if after > head:
        raise Unprocessable(f"event id {after} is ahead of this tenant's change log (newest {head}); "
                            "resume from an id this stream sent, or leave it out to start from now")
    return change.event_id if change is not None else event_id(after, generation) if after else "0"


async def sse_changes(backend: BackendClient, store: ChangeStore, watcher: HeadWatcher, tenant: str, after: int,
                      after_id: str, first: ChangePage, flt: ChangeFilter, page: int, credential: StreamCredential,
                      heartbeat_s: float = HEARTBEAT_S) -> AsyncIterator[str]:
    """SSE frames of the tenant's changes after `after`, starting with the already-read page `first`, until the
    stream's key no longer allows it: then one `error` event with the error a new request would get, and the end.
    The key is checked before any frame once `credential.recheck_s` has passed since its last check, and while idle
    at least that often (`serve_apps.stream_auth`); a comment after `heartbeat_s` without a frame keeps proxies
    from closing the stream."""
    quiet_since = credential.clock()
    frames = _changes(backend, store, watcher, tenant, after, after_id, first, flt, page, credential.recheck_s)
    async with aclosing(frames):
        async for out in frames:
            refusal = await credential.ended()
            if refusal is not None:
                yield frame("error", {"status": refusal.status, **error_body(
                    refusal.code, refusal.message, refusal.details, credential.request_id)})
                return
            if out is None:  # idle
                if credential.clock() - quiet_since < heartbeat_s:
                    continue
                out = ": keep-alive\n\n"
            quiet_since = credential.clock()
            yield out


async def _changes(backend: BackendClient, store: ChangeStore, watcher: HeadWatcher, tenant: str, after: int,
                   after_id: str, first: ChangePage, flt: ChangeFilter, page: int,
                   idle_s: float) -> AsyncIterator[str | None]:
    """The frames of `sse_changes`, and None after each `idle_s` in which the log did not move.

    Behind the backend's memory window, a stream that has not caught up yet reads the store here
    (off the event loop); one that had caught up falls behind instead."""
    position = sent = after  # read up to / the client's resume point
    position_id = after_id  # the event id of `position`
    live = False
    current: ChangePage | None = first
    yield f"id: {after_id}\n\n"  # the resume point, also for a client that started "from now"
    while True:
        if current is None:
            current = await backend.call("changes_after", tenant, position, page)
        if current.fell_behind and not live:
            replay = await asyncio.to_thread(store.read, tenant, position, min(page, current.head - position))
            if replay and replay[0].seq != position + 1:  # deleted by the retention while this stream read
                yield frame("gone", {"last_event_id": position_id, "oldest": replay[0].seq,
                                     "message": past_retention(position, replay[0].seq, None)})
                return
            current = current.model_copy(update={"changes": replay, "fell_behind": False})
        if current.fell_behind:
            log.info("event=change_stream_fell_behind tenant=%s position=%d head=%d", tenant, position, current.head)
            yield frame("fell_behind", {
                "last_event_id": position_id, "head": current.head, "oldest_in_memory": current.oldest,
                "message": f"this stream fell more than the server's in-memory window behind the change log (at "
                           f"{position}, newest {current.head}); reconnect with Last-Event-ID: {position_id} to "
                           "resume from the store"})
            return
        for change in current.changes:
            position, position_id = change.seq, change.event_id
            if flt.matches(change):
                yield frame(change.kind, change.model_dump(mode="json"), position_id)
                sent = position
        caught_up = not current.changes or position >= current.head
        current = None
        if not caught_up:
            continue
        live = True
        if sent != position:  # changes the filter skipped: move the client's resume point past them
            yield f"id: {position_id}\n\n"
            sent = position
        if not await watcher.wait(tenant, position, idle_s):
            yield None


def past_retention(after: int, oldest: int, retention_s: float | None) -> str:
    """Why a stream cannot resume after `after`, and what to do instead."""
    kept = f" (the server keeps {retention_s / 86_400:g} days)" if retention_s else ""
    return (f"the changes after event id {after} up to {oldest - 1} were deleted by the change log's retention{kept}: "
            f"read the current state, then resume after {oldest - 1} or leave Last-Event-ID out to start from now")


def frame(event: str, data: dict, event_id: str | None = None) -> str:
    """One SSE event: `id` (absent on `fell_behind`, `gone` and `error`, so the client's resume point stays),
    `event`, `data`."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
