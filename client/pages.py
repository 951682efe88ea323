"""Pagination of asset queries, shared by the sync and the async client: a `QueryPager` builds
each page's request from the last page's cursor; the clients only send and loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from client.calls import Call, _model
from serve_apps.query_schemas import QueryPage, QueryRequest


def query_call(request: QueryRequest) -> Call[QueryPage]:
    """One page; resending it is safe (a query changes nothing)."""
    return Call("POST", "/v1/query", _model(QueryPage), json=request.model_dump(mode="json", exclude_none=True),
                idempotent=True)


class QueryPager:
    """Follows `next_cursor` until the last page: ``while not pager.done: items = pager.feed(send(pager.call()))``."""

    def __init__(self, q: str = "", sort: Sequence[str] = (), fields: Sequence[str] | None = None,
                 page_size: int = 100):
        self.request = QueryRequest(q=q, sort=list(sort), fields=None if fields is None else list(fields),
                                    limit=page_size)
        self.done = False
        self.matched: int | None = None  # all matches, known after the first page

    def call(self) -> Call[QueryPage]:
        return query_call(self.request)

    def feed(self, page: QueryPage) -> list[dict[str, Any]]:
        self.matched = page.matched
        self.done = page.next_cursor is None
        self.request = self.request.model_copy(update={"cursor": page.next_cursor})
        return page.items
