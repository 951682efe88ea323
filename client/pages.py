"""Pagination of asset queries, the job list and the audit log, shared by the sync and the async client: a
`QueryPager`, `JobPager` or `AuditPager` builds each page's request from the last page's cursor; the clients only send
and loop."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import TypeAdapter

from client.calls import ANSWER_EXTRA, Call, _model, _present, argument_model, jobs_call, names
from serve_apps.audit import NEXT_CURSOR, AuditRecord
from serve_apps.query_schemas import QueryPage, QueryRequest

if TYPE_CHECKING:  # imports Ray: loaded with the first page (`client.calls._lazy`)
    from serve_apps.job_listing import JobPage
    from serve_apps.jobs import Job


def query_call(request: QueryRequest) -> Call[QueryPage]:
    """One page; resending it is safe (a query changes nothing)."""
    return Call("POST", "/v1/query", _model(QueryPage), json=request.model_dump(mode="json", exclude_none=True),
                idempotent=True)


class QueryPager:
    """Follows `next_cursor` until the last page: ``while not pager.done: items = pager.feed(send(pager.call()))``."""

    def __init__(self, q: str = "", sort: Sequence[str] = (), fields: Sequence[str] | None = None,
                 page_size: int = 100):
        self.request = argument_model(QueryRequest, "query (page_size is the request's limit)", q=q,
                                      sort=list(names("sort", sort)),
                                      fields=None if fields is None else list(names("fields", fields)), limit=page_size)
        self.done = False
        self.matched: int | None = None  # all matches, known after the first page

    def call(self) -> Call[QueryPage]:
        return query_call(self.request)

    def feed(self, page: QueryPage) -> list[dict[str, Any]]:
        self.matched = page.matched
        self.done = page.next_cursor is None
        self.request = self.request.model_copy(update={"cursor": page.next_cursor})
        return page.items


class JobPager:
    """Follows `GET /v1/jobs`' `next_cursor` to the last page: the tenant's jobs (of one `state` if given), newest
    first by submission; jobs submitted after the first page are not on later ones."""

    def __init__(self, state: str | None = None, page_size: int = 100):
        self.state, self.page_size = state, page_size
        self.cursor: str | None = None
        self.done = False

    def call(self) -> Call[JobPage]:
        return jobs_call(self.state, self.page_size, self.cursor)

    def feed(self, page: JobPage) -> list[Job]:
        self.cursor = page.next_cursor
        self.done = self.cursor is None
        return page.jobs


_AUDIT = TypeAdapter(list[AuditRecord])


def _audit_page(r: httpx.Response) -> tuple[list[AuditRecord], str | None]:
    return _AUDIT.validate_json(r.content, extra=ANSWER_EXTRA), r.headers.get(NEXT_CURSOR)


class AuditPager:
    """Follows `GET /v1/audit`'s `X-Next-Cursor` to the oldest record: each page holds the records before the last,
    so `feed` gives them newest first and the whole log reads newest first."""

    def __init__(self, day: date | None = None, page_size: int = 1000):
        self.day, self.page_size = day, page_size
        self.cursor: str | None = None
        self.done = False

    def call(self) -> Call[tuple[list[AuditRecord], str | None]]:
        return Call("GET", "/v1/audit", _audit_page, idempotent=True, params=_present(
            day=self.day.isoformat() if self.day is not None else None, limit=self.page_size, cursor=self.cursor))

    def feed(self, page: tuple[list[AuditRecord], str | None]) -> list[AuditRecord]:
        records, self.cursor = page
        self.done = self.cursor is None
        return records[::-1]
