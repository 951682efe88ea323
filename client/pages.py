"""Pagination of asset queries, the listings (jobs, assets, asset types, commands, connectors, dead letters) and the
audit log, shared by the sync and the async client: a `QueryPager`, `CursorPager` or `AuditPager` builds each page's
request from the last page's cursor; the clients only send and loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import httpx
from pydantic import TypeAdapter

from client.calls import (ANSWER_EXTRA, AssetFilter, Call, _model, _present, argument_model, asset_types_call,
                          assets_call, jobs_call, names)
from client.connector_calls import commands_call, connectors_call, dead_letters_call
from connectors.commands import Command
from raytwin.contracts import Asset, AssetType
from serve_apps.audit import NEXT_CURSOR, AuditRecord
from serve_apps.query_schemas import QueryPage, QueryRequest
from serve_apps.schemas import AssetPage, AssetTypePage, CommandPage, DeadLetter, DeadLetterPage

if TYPE_CHECKING:  # import Ray: loaded with the first page (`client.calls._lazy`)
    from connectors.runtime import ConnectorStatus
    from serve_apps.job_listing import JobPage
    from serve_apps.jobs import Job
    from serve_apps.routes_connectors import ConnectorPage


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


class Paged(Protocol):
    next_cursor: str | None


P = TypeVar("P", bound=Paged)
I = TypeVar("I")


class CursorPager(Generic[P, I]):
    """Follows a listing's `next_cursor` to its last page: `GET /v1/jobs`, and the assets, asset types, commands,
    connectors and a connector's dead letters (`serve_apps.listing`). `call(cursor)` builds a page's request,
    `items(page)` takes its items."""

    def __init__(self, call: Callable[[str | None], Call[P]], items: Callable[[P], list[I]]):
        self._call, self._items = call, items
        self.cursor: str | None = None
        self.done = False

    def call(self) -> Call[P]:
        return self._call(self.cursor)

    def feed(self, page: P) -> list[I]:
        self.cursor = page.next_cursor
        self.done = self.cursor is None
        return self._items(page)


def job_pager(state: str | None = None, page_size: int = 100) -> CursorPager[JobPage, Job]:
    """The tenant's jobs (of one `state` if given), newest first by submission; jobs submitted after the first page
    are not on later ones."""
    return CursorPager(lambda cursor: jobs_call(state, page_size, cursor), lambda page: page.jobs)


def asset_pager(where: AssetFilter, page_size: int = 100) -> CursorPager[AssetPage, Asset]:
    """The tenant's assets `where` selects, in id order."""
    return CursorPager(lambda cursor: assets_call(where, page_size, cursor), lambda page: page.assets)


def asset_type_pager(name: str | None = None, page_size: int = 100) -> CursorPager[AssetTypePage, AssetType]:
    """The tenant's asset types (of one `name` if given), in `name@version` order."""
    return CursorPager(lambda cursor: asset_types_call(name, page_size, cursor), lambda page: page.asset_types)


def command_pager(asset_id: str | None = None, page_size: int = 100) -> CursorPager[CommandPage, Command]:
    """The tenant's commands (of one asset if given), in id order."""
    return CursorPager(lambda cursor: commands_call(asset_id, page_size, cursor), lambda page: page.commands)


def connector_pager(page_size: int = 100) -> CursorPager[ConnectorPage, ConnectorStatus]:
    """The tenant's connectors with their statuses, in name order."""
    return CursorPager(lambda cursor: connectors_call(page_size, cursor), lambda page: page.connectors)


def dead_letter_pager(name: str, day: date | None = None,
                      page_size: int = 100) -> CursorPager[DeadLetterPage, DeadLetter]:
    """A connector's dead letters (of one UTC `day` if given), newest first; those added after the first page are
    not on later ones."""
    return CursorPager(lambda cursor: dead_letters_call(name, day, page_size, cursor), lambda page: page.dead_letters)


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
