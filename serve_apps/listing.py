"""Listing a tenant's assets, asset types, commands and connectors a page at a time, as `GET /v1/jobs` lists jobs
(`serve_apps.job_listing`): `limit` (1-1000, default 100), an opaque `cursor`, and `next_cursor` in the answer.
A connector's dead letters are paged with these cursors too, newest first (`serve_apps.dead_letters`).

A page holds the items whose keys (asset id, ``name@version``, command id, connector name) come after the cursor's,
in key order, so a page stays in place while items are added or deleted: the cursor is the last listed item's key,
not a position, and an item deleted meanwhile (the cursor's own included) moves no other item to another page.
An item added after the cursor's key is listed on a later page; one added before it is not (list again from the
start to see it). A page reads its keys from the cursor on until it has `limit` and one more: not every item
(a window of `limit` + 1 keys at a time, so items read from the store are read in batches).

Each cursor names its listing (``assets|zone-1``, base64): another listing's cursor, or text that is none, is a 422
saying what to send.
"""

from __future__ import annotations

import base64
import binascii
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, TypeVar

from fastapi import Query

from serve_apps.errors import Unprocessable

T = TypeVar("T")

PageLimit = Annotated[int, Query(ge=1, le=1000, description="How many items a page holds (at most 1000)")]
PAGE_LIMIT = 100
"""A page's size when the request names none: bounded, so no answer grows with the tenant."""
Cursor = Annotated[str | None, Query(description="`next_cursor` of the previous page, unchanged; none for the first page")]


def encode_cursor(listing: str, key: str) -> str:
    """The cursor after `key` in `listing` (``assets``, ``asset-types``, ``commands``, ``connectors``)."""
    return base64.urlsafe_b64encode(f"{listing}|{key}".encode()).decode()


def decode_cursor(listing: str, cursor: str) -> str:
    """The key a cursor of `listing` stands for; 422 for a cursor this listing did not give."""
    try:
        named, key = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        named = key = ""
    if named != listing or not key:
        raise not_a_cursor(listing)
    return key


def not_a_cursor(listing: str) -> Unprocessable:
    """The 422 for a cursor `listing` did not give (another listing's, edited, or no cursor at all)."""
    return Unprocessable(f"query.cursor: not a cursor of GET /v1/{listing}; a cursor is the `next_cursor` of a "
                         f"page of GET /v1/{listing} (it names that page's last item): send it back unchanged "
                         "for the next page, or no cursor for the first page", details=[{"loc": ["query", "cursor"]}])


def page(listing: str, keys: Sequence[str], items: Callable[[Sequence[str]], Mapping[str, T]], limit: int = PAGE_LIMIT,
         cursor: str | None = None) -> tuple[list[T], str | None]:
    """One page of `keys` (ascending) after `cursor`: the items `items` gives for them (a batch of keys at a time,
    each key it lists with its item: one a filter misses, or whose record is gone, is left out) and the next cursor
    (None: the last page). Reads `limit` and one more keys at a time from the cursor on, until the page and one more
    are found: a store read is one batch per window, not one per item."""
    start = bisect_right(keys, decode_cursor(listing, cursor)) if cursor else 0
    chosen: list[tuple[str, T]] = []
    while len(chosen) <= limit and start < len(keys):
        window = keys[start:start + limit + 1]
        found = items(window)
        chosen += [(key, found[key]) for key in window if key in found]
        start += len(window)
    shown = chosen[:limit]
    return [item for _, item in shown], encode_cursor(listing, shown[-1][0]) if len(chosen) > limit else None
