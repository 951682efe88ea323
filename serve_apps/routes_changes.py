"""The change stream route: a tenant's changes as Server-Sent Events, resumable with Last-Event-ID."""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Header, Query
from fastapi.responses import StreamingResponse

from serve_apps.change_stream import ChangeFilter, first_page, past_retention, resume_point, sse_changes
from serve_apps.changes import CHANGE_KINDS, parse_event_id
from serve_apps.deps import CHANGE_STREAM, SVC, Services
from serve_apps.errors import Gone, Unprocessable
from serve_apps.stream_auth import STREAM_AUTH_RECHECK_S, StreamCredential

KIND_FAMILIES = frozenset(k.split(".")[0] for k in CHANGE_KINDS)


def register(app: FastAPI) -> None:
    @app.get("/v1/changes", tags=["changes"], response_class=StreamingResponse, responses={200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "`id: <seq>-<generation>`, `event: <kind>`, `data: <Change as JSON>` per change; "
                       "`fell_behind` once before the stream ends when the client reads too slowly, `gone` when it "
                       "read past the retention, or `error` (data: `status` and the error shape a new request would get, e.g. 401 "
                       f"`unauthorized`) within {STREAM_AUTH_RECHECK_S:g} s of its key's revocation "
                       "(serve_apps/README.md)"}})
    async def changes(
        asset_id: Annotated[list[str] | None, Query(description="Only changes of these assets")] = None,
        type_name: Annotated[str | None, Query(description="Only changes of assets of this type")] = None,
        kind: Annotated[list[str] | None, Query(description="Only these kinds (`twin.state`) or families "
                                                "(`twin`, `asset`, `asset_type`, `job`)")] = None,
        after: Annotated[str | None, Query(max_length=64, description="Start after this event id: one the "
                                           "stream sent (`<seq>-<generation>`, a saved `Change.event_id`: checked "
                                           "as `Last-Event-ID` is, 410 when the log no longer has it) or a plain "
                                           "number (0: from the first change); default: from now")] = None,
        last_event_id: Annotated[str | None, Header(description="Resume after this event id (sent by SSE "
                                                    "clients on reconnect; wins over `after`); 410 when the change "
                                                    "it names is no longer in the log (the store was restored "
                                                    "from an earlier copy)")] = None,
        credential: StreamCredential = CHANGE_STREAM, svc: Services = SVC,
    ) -> StreamingResponse:
        """The caller's tenant's changes as Server-Sent Events: twin states, drift flags, catalog, jobs; for as
        long as the key is valid (a revoked key's stream ends with an `error` event)."""
        who = credential.who
        unknown = sorted(set(kind or ()) - set(CHANGE_KINDS) - KIND_FAMILIES)
        if unknown:
            raise Unprocessable(f"kind: unknown {unknown}; use any of {sorted(CHANGE_KINDS)} or the families "
                                f"{sorted(KIND_FAMILIES)}", details=[{"loc": ["query", "kind"], "unknown": unknown}])
        given, where = (last_event_id, "header") if last_event_id is not None else (after, "query")
        if given is None:
            start = (await svc.backend.call("change_heads", [who.tenant]))[who.tenant]
        else:
            start = _start(given, where)
        page = svc.config.change_page
        first = await first_page(svc.backend, who.tenant, start, page)
        after_id = await resume_point(svc.backend, svc.change_store, who.tenant, start, given, first.head)
        if first.fell_behind and start + 1 < (oldest := svc.change_store.first_seq(who.tenant)):
            raise Gone(past_retention(start, oldest, svc.config.change_retention_s))
        flt = ChangeFilter(frozenset(asset_id) if asset_id else None, type_name, frozenset(kind) if kind else None)
        stream = sse_changes(svc.backend, svc.change_store, svc.changes, who.tenant, start, after_id, first, flt,
                             page, credential)
        return StreamingResponse(svc.streams.hold(who.tenant, stream),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _start(given: str, where: str) -> int:
    """The sequence number a stream resumes after, from a `Last-Event-ID` header or an `after` query (`where`): both
    take an id the stream sent or a plain number, so a saved `Change.event_id` works in a URL too (a browser's
    `EventSource` sets no header on its first connection)."""
    if (parsed := parse_event_id(given)) is None:
        name = "Last-Event-ID" if where == "header" else "after"
        raise Unprocessable(f"{name} must be an event id sent by this stream (`<seq>-<generation>`, e.g. 17-3fa9c2d1) "
                            f"or a plain number (0: from the first change), got {given!r}",
                            details=[{"loc": [where, name]}])
    return parsed[0]
