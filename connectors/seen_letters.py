"""Which of a connector's dead letters were written already, so a re-delivered reading is not dead-lettered again.

A source sends what a connector may have had before: an OPC UA server sends every item's current value at each
new subscription (a reconnect, a connector restarted by Ray) and the backfill reads `backfill_s` of history
again after a restart. Good readings come back as duplicates the twins count; a bad one (not a number, NaN, no
source timestamp) was dead-lettered again each time, so an operator saw a controller "still sending" a value it
sent once (three dead letters after two restarts).

Only a dead letter whose identity is its reading's (`DeadLetter.once`: an OPC UA value change carries its node
and source timestamp in its raw text) is written once: a raw message without a time of its own (an MQTT payload)
may be sent again for real, and its dead letters are how an operator sees the rate. Rows the twins refuse are
not kept out either: the refusal can change (a twin registered since, a clock caught up), so a re-delivered row
is evaluated again, and dead-lettered again if refused again. (A reading's time is no such verdict for OPC UA: a
device clock ahead is judged against the reading's ServerTimestamp by the connector, `connectors.opcua.values`,
the same at every re-delivery.)

The identities are SHA-256 digests of the raw text, held for the last `KEPT` letters; a restarted connector
starts from the dead letters its tenant's store holds from it since its backfill began (`recent`), so its
backfill does not write them again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from datetime import datetime

import pyarrow.compute as pc
import pyarrow.dataset as ds

from connectors.mapping import DeadLetter, source_pattern
from raytwin.statestore import StateStore

KEPT = 100_000
"""Identities held (about 100 bytes each): a controller sending a bad value a second for a day is 86,400."""


def _identity(raw: str) -> bytes:
    return hashlib.sha256(raw.encode()).digest()


class SeenLetters:
    """The identities of one connector's dead letters written once (`DeadLetter.once`), newest `KEPT`."""

    def __init__(self, raws: list[str] | None = None):
        self._seen: OrderedDict[bytes, None] = OrderedDict((_identity(r), None) for r in (raws or [])[-KEPT:])

    @classmethod
    def recent(cls, store: StateStore, tenant: str, connector: str, since: datetime) -> SeenLetters:
        """The dead letters `tenant`'s store holds from its `connector`, written since `since`: the newest `KEPT`,
        read from the partitions that hold them alone (`StateStore.newest_dead_letters`: the days from `since` on,
        not the tenant's whole history)."""
        ours = pc.match_substring_regex(ds.field("reason"), pattern=source_pattern(connector))
        table = store.newest_dead_letters(tenant, KEPT, where=ours, columns=["raw"], since=since, source=connector)
        return cls(table.column("raw").to_pylist())

    def fresh(self, letters: list[DeadLetter]) -> list[DeadLetter]:
        """`letters` less those written before (`once` letters seen), each `once` letter now seen."""
        out = []
        for letter in letters:
            if letter.once:
                key = _identity(letter.raw)
                if key in self._seen:
                    self._seen.move_to_end(key)
                    continue
                self._seen[key] = None
                if len(self._seen) > KEPT:
                    self._seen.popitem(last=False)
            out.append(letter)
        return out

    def forget(self, letters: list[DeadLetter]) -> None:
        """Letters `fresh` let through whose write failed: the source re-delivers them, to be written then."""
        for letter in letters:
            if letter.once:
                self._seen.pop(_identity(letter.raw), None)
