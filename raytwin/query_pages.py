"""Sort, projection and cursor pagination of query results (`raytwin.query`).

Pagination is by key, not offset: the cursor carries the sort values and id of the last item
returned, and the next page starts after it, so pages neither repeat nor skip items when assets
are added or removed between requests (an asset whose sorted-on *state* changes between pages
may move across the boundary: live state is read anew for every page). Ties are broken by id, so
the order is total. The cursor is opaque and tamper-safe: JSON signed with HMAC-SHA256 under the
server's key, and bound to the query, sort and tenant that made it (`fingerprint`), so it cannot
be edited, forged, or replayed against another query or tenant.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from raytwin.query import Field, QuerySyntaxError, Record, semver, parse_field

WHOLE = ("id", "type", "version", "metadata", "relationships", "state", "std")
DEFAULT_FIELDS = ("id", "type", "version", "metadata", "relationships")


class InvalidCursor(ValueError):
    """A cursor that was not issued by this server for this query, sort and tenant."""


@dataclass(frozen=True)
class SortKey:
    field: Field
    descending: bool = False


def parse_sort(specs: Sequence[str]) -> tuple[SortKey, ...]:
    """``["metadata.site", "-state.T_in"]``: ascending, or descending with a leading ``-``."""
    keys = []
    for spec in specs:
        descending = spec.startswith("-")
        field = parse_field(spec[1:] if descending else spec)
        if field.root == "relationships":
            raise QuerySyntaxError(f"cannot sort by {field.path}: an asset may have several", 0)
        keys.append(SortKey(field, descending))
    return tuple(keys)


def parse_fields(specs: Sequence[str]) -> tuple[str, ...]:
    """Projection paths: a whole part (``metadata``, ``state``...) or one key of it (``state.T_in``)."""
    for spec in specs:
        if spec not in WHOLE:
            parse_field(spec)
    return tuple(specs)


def needs_state(sort: Iterable[SortKey], fields: Iterable[str]) -> bool:
    return any(k.field.live for k in sort) or any(f.split(".")[0] in ("state", "std") for f in fields)


def _sort_value(record: Record, field: Field) -> Any:
    values = record.values(field)
    if not values:
        return None
    return semver(str(values[0])) or values[0] if field.root == "version" else values[0]


def sort_key(record: Record, keys: Sequence[SortKey]) -> list[Any]:
    """The record's position: its sort values (None: missing, sorted last) and its id."""
    return [_sort_value(record, k.field) for k in keys] + [record.id]


def _compare(a: Sequence[Any], b: Sequence[Any], keys: Sequence[SortKey]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        x, y = (tuple(v) if isinstance(v, list) else v for v in (x, y))  # versions come back from JSON as lists
        if x == y:
            continue
        if x is None or y is None:  # missing last, whatever the direction
            return 1 if x is None else -1
        sign = -1 if i < len(keys) and keys[i].descending else 1
        return sign * (1 if x > y else -1)
    return 0


def sort_records(records: Iterable[Record], keys: Sequence[SortKey]) -> list[Record]:
    """Sorted by `keys` then id, missing values last (stable passes, last key first)."""
    rows = sorted(records, key=lambda r: r.id)
    for i in reversed(range(len(keys))):
        values = [_sort_value(r, keys[i].field) for r in rows]
        present = sorted((p for p in zip(values, rows, strict=True) if p[0] is not None),
                         key=lambda p: p[0], reverse=keys[i].descending)
        rows = [r for _, r in present] + [r for v, r in zip(values, rows, strict=True) if v is None]
    return rows


def after(rows: Sequence[Record], keys: Sequence[SortKey], position: Sequence[Any]) -> int:
    """Index of the first of the sorted `rows` that comes after `position` (binary search)."""
    lo, hi = 0, len(rows)
    while lo < hi:
        mid = (lo + hi) // 2
        if _compare(sort_key(rows[mid], keys), position, keys) > 0:
            hi = mid
        else:
            lo = mid + 1
    return lo


def project(record: Record, fields: Sequence[str] = DEFAULT_FIELDS) -> dict[str, Any]:
    """The record as JSON with only `fields` (always its id), and ``"stale": true`` where it shows
    twin state that is the twin's last durable one (`Record.stale`)."""
    out: dict[str, Any] = {"id": record.id}
    for spec in fields:
        root, _, name = spec.partition(".")
        if root in ("id", "type", "version"):
            out[root] = getattr(record, root)
            continue
        whole = {"metadata": record.metadata, "relationships": {k: list(v) for k, v in record.relationships.items()},
                 "state": record.state or {}, "std": record.std or {}}[root]
        part = out.setdefault(root, {})
        if not name:
            part.update(whole)
        elif name in whole:
            part[name] = whole[name]
    if record.stale and ("state" in out or "std" in out):
        out["stale"] = True
    return out


def fingerprint(tenant: str, query: str, sort: Sequence[str]) -> str:
    """What a cursor is bound to."""
    return hashlib.sha256(json.dumps([tenant, query, list(sort)]).encode()).hexdigest()[:32]


def encode_cursor(secret: bytes, bound_to: str, position: Sequence[Any]) -> str:
    payload = base64.urlsafe_b64encode(json.dumps({"f": bound_to, "p": list(position)}, separators=(",", ":"))
                                       .encode()).rstrip(b"=")
    mac = base64.urlsafe_b64encode(hmac.digest(secret, payload, "sha256")).rstrip(b"=")
    return (payload + b"." + mac).decode()


def decode_cursor(secret: bytes, bound_to: str, cursor: str) -> list[Any]:
    """The position a cursor stands for; `InvalidCursor` if it was altered or made for another query."""
    payload, _, mac = cursor.encode().partition(b".")
    expected = base64.urlsafe_b64encode(hmac.digest(secret, payload, "sha256")).rstrip(b"=")
    if not hmac.compare_digest(mac, expected):
        raise InvalidCursor("the cursor was altered or not issued by this server: pass `next_cursor` unchanged")
    data = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    if data["f"] != bound_to:
        raise InvalidCursor("the cursor belongs to another query or sort: send the same q and sort with it")
    return data["p"]


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None
    matched: int  # all matches of the query, on every page


def paginate(records: Iterable[Record], keys: Sequence[SortKey], fields: Sequence[str], limit: int,
             secret: bytes, bound_to: str, cursor: str | None = None) -> Page:
    """One page of the matching `records` in order, and the cursor of the next (None: the last page)."""
    rows = sort_records(records, keys)
    start = 0 if cursor is None else after(rows, keys, decode_cursor(secret, bound_to, cursor))
    chunk = rows[start:start + limit]
    more = start + limit < len(rows)
    next_cursor = encode_cursor(secret, bound_to, sort_key(chunk[-1], keys)) if more and chunk else None
    return Page([project(r, fields) for r in chunk], next_cursor, len(rows))
