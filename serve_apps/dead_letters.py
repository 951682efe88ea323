"""A connector's dead letters, read from the store's dead-letter log by the ingress replica (no backend call).

The store keeps one tenant's dead letters together (`raytwin.statestore`: partitioned by tenant and day), without
the connector: a connector leads each reason with the source URI it came from (`mqtt://NAME/topic`,
`opcua://NAME/node`, `connectors.mapping.DeadLetter`), so a connector's are those whose reason names it there.
The rows the twin shards refuse (unknown twin, too late, implausible, conflict) are led by it too: the connector's
sink sends each row's source along (`actors.telemetry.SOURCE_COLUMN`). Those written before that carry none.
What was refused is cut to `connectors.mapping.RAW_KEPT` bytes here too, and any other text (reason, key, asset) to
`TEXT_KEPT` characters (`connectors.mapping.bounded`): dead letters written before those bounds were not.

They are listed a page at a time, newest first, by key as the other listings are (`serve_apps.listing`): a dead
letter's key is its time, a digest of its content (a batch's dead letters share one time) and, for identical dead
letters of one time, its number among them. The cursor is the last listed key, so a page stays in place while
dead letters are added (they are newer than any page's: list again from the start to see them), and while a shard's
retry writes its batch's again: they keep the first try's time (`StateStore.write_dead_letters`), so their keys and
places, and a client paging through them lists each once. A page reads the rows of its cursor's time (one write's)
and the newest `limit` and one more before it, never the connector's whole history (`StateStore.newest_dead_letters`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as ds

from connectors.mapping import bounded, source_pattern
from raytwin.statestore import StateStore, to_micros
from serve_apps.listing import PAGE_LIMIT, decode_cursor, encode_cursor, not_a_cursor
from serve_apps.schemas import DeadLetter, DeadLetterPage

FIELDS = list(DeadLetter.model_fields)
_KEY = re.compile(r"^(-?\d+):([0-9a-f]{16}):([1-9]\d*)$")
"""A dead letter's key in a cursor: its time (epoch microseconds), content digest and number among its equals."""
_US = timedelta(microseconds=1)


@dataclass(frozen=True, order=True)
class Rank:
    """Where a dead letter is listed: ascending ranks are newest first, then by descending content digest."""

    minus_us: int
    minus_digest: int
    number: int  # 1 for the first of identical dead letters of one time, 2 for the next...

    def key(self) -> str:
        return f"{-self.minus_us}:{-self.minus_digest:016x}:{self.number}"

    @classmethod
    def of_key(cls, listing: str, key: str) -> Rank:
        if (found := _KEY.match(key)) is None:
            raise not_a_cursor(listing)
        return cls(-int(found[1]), -int(found[2], 16), int(found[3]))

    @property
    def time(self) -> datetime:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=-self.minus_us)


def connector_dead_letters(store: StateStore, tenant: str, name: str, day: str | None, limit: int = PAGE_LIMIT,
                           cursor: str | None = None) -> DeadLetterPage:
    """A page of `tenant`'s connector `name`'s dead letters (of one UTC ``YYYY-MM-DD`` `day`), newest first, after
    `cursor` (none: the newest). Only `tenant`'s partitions that hold them are read (tenants never see each other's),
    newest day first (`StateStore.newest_dead_letters`): a poison device's millions stay on disk."""
    listing = f"connectors/{name}/dead-letters"
    after = Rank.of_key(listing, decode_cursor(listing, cursor)) if cursor else None
    ours = pc.match_substring_regex(ds.field("reason"), pattern=source_pattern(name))

    def newest(count: int | None, since: datetime | None = None,
               until: datetime | None = None) -> list[tuple[Rank, dict[str, Any]]]:
        table = store.newest_dead_letters(tenant, count, day=day, where=ours, columns=FIELDS, since=since,
                                          until=until, source=name, whole_times=True)
        return ranked(table.to_pylist())

    rows: list[tuple[Rank, dict[str, Any]]] = []
    if after is not None:  # the rest of its time's (one write's), then those before it
        rows = [row for row in newest(None, after.time, after.time + _US) if row[0] > after]
    if len(rows) <= limit:
        rows += newest(limit + 1 - len(rows), until=None if after is None else after.time)
    shown = rows[:limit]
    return DeadLetterPage(dead_letters=[DeadLetter.model_validate(bounded(row)) for _, row in shown],
                          next_cursor=encode_cursor(listing, shown[-1][0].key()) if len(rows) > limit else None)


def ranked(rows: list[dict[str, Any]]) -> list[tuple[Rank, dict[str, Any]]]:
    """`rows` (every dead letter of each time they hold) with their ranks, in rank order (newest first)."""
    keys = [(to_micros(row["dead_lettered_at"]), _digest(row)) for row in rows]
    equals: Counter[tuple[int, int]] = Counter()
    out = []
    for i in sorted(range(len(rows)), key=keys.__getitem__, reverse=True):
        equals[keys[i]] += 1
        out.append((Rank(-keys[i][0], -keys[i][1], equals[keys[i]]), rows[i]))
    return out


def _digest(row: dict[str, Any]) -> int:
    """A dead letter's content as 64 bits: what tells apart the dead letters of one write."""
    text = json.dumps([row["asset_id"], row["idempotency_key"], row["reason"], row["raw"]])
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)
