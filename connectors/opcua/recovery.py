"""Which monitored items' server queues may have discarded value changes, and where their history must be read.

Why: an OPC UA server keeps at most an item's queue size of values between two publish responses and discards
the oldest beyond (many servers, asyncua's among them, without setting the Overflow bits). The size is the one
the server granted (its RevisedQueueSize, which may be less than the `queue_size` asked for: counted by the size
asked, a full queue went unseen). A publish response carrying that many values of one item is the client's only
sign that its queue was full:
values may have been discarded just before the first of them. Such an item is *suspect*; with `backfill_s`
the session reads its history back (`OpcUaSession._recover`), where the discarded values still are.

Which part of the history: what was discarded reached the server after the last value received from that item
before (server order), so history values with an earlier `ServerTimestamp` are left out. HistoryRead selects
by *source* timestamp, though, and the discarded values' source times are unknown. While an item's readings
arrive in source-time order, they lie after the newest reading received before (the read starts there: a few
values). Once an item has delivered a reading stamped before one received earlier (a store-and-forward gateway
forwarding its buffer, a clock stepped back), discarded readings may be stamped anywhere, and its reads cover
`backfill_s` before now; with no reading before the full queue, the read starts `backfill_s` before its first
value.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from asyncua import ua

OVERFLOW = 0x480
"""A DataValue status's info bits saying its monitored item's queue discarded values before it (InfoType
DataValue, bit 10, with Overflow, bit 7: OPC UA Part 4, 7.39)."""


@dataclass(frozen=True)
class Suspect:
    """A history read that recovers what an item's queue may have discarded."""

    since: datetime | None  # source time the read starts at; None: `backfill_s` before now
    after: datetime | None  # keep values the server received at or after this (ServerTimestamp); None: all
    expect: frozenset[datetime] = frozenset()  # source times of values received after the full queue: the
    # history must hold them, else it does not hold what was discarded before them either (not historized,
    # its retention passed, stamped before the read's start)

    def merged(self, other: Suspect) -> Suspect:
        """Both reads in one: the earlier start, the earlier server time (None is the earliest)."""
        return Suspect(_earliest(self.since, other.since), _earliest(self.after, other.after),
                       self.expect | other.expect)


@dataclass
class _Seen:
    newest: datetime | None = None  # newest source timestamp received
    server: datetime | None = None  # server timestamp of the last value received
    late: bool = False  # a reading arrived stamped before one received earlier


class QueueWatch:
    """Follows each item's publish responses, in the order they arrive, and collects the suspect items."""

    def __init__(self, queue_size: int, window: timedelta):
        """`queue_size`: the size asked for each item's queue (an item's until the server's grant is known);
        `window`: how far before its first value a full queue's read starts when no reading came before it."""
        self.queue_size, self.window = queue_size, window
        self._granted: dict[ua.NodeId, int] = {}
        self._seen: dict[ua.NodeId, _Seen] = {}
        self._suspects: dict[ua.NodeId, Suspect] = {}

    def grant(self, nid: ua.NodeId, revised: int) -> None:
        """The queue size the server granted `nid`'s item (its RevisedQueueSize; 0 and 1 both mean one value)."""
        self._granted[nid] = max(1, revised)

    def size(self, nid: ua.NodeId) -> int:
        return self._granted.get(nid, self.queue_size)

    def smallest(self) -> int:
        """The smallest queue any item has: the first to discard values while publishing is off."""
        return min(self._granted.values(), default=self.queue_size)

    def described(self, size: int) -> str:
        """A queue's size as an error names it: the grant, and what was asked where the server granted less."""
        return f"queue_size {size}" + ("" if size >= self.queue_size else
                                       f", all the server granted of the {self.queue_size} asked")

    def published(self, items: dict[ua.NodeId, list[ua.DataValue]]) -> bool:
        """One publish response's values per node, in order; True if an item became suspect."""
        found = False
        for nid, dvs in items.items():
            seen = self._seen.setdefault(nid, _Seen())
            stamps = [dv.SourceTimestamp for dv in dvs if dv.SourceTimestamp is not None and _reading(dv)]
            if stamps and seen.newest is not None and min(stamps) < seen.newest:
                seen.late = True
            overflowed = any(dv.StatusCode is not None and dv.StatusCode.value & OVERFLOW == OVERFLOW for dv in dvs)
            if overflowed or len(dvs) >= self.size(nid):
                since = None if seen.late else self._since(seen.newest, stamps)
                self.mark(nid, Suspect(since, seen.server, frozenset(stamps[:1])))
                found = True
            seen.newest = max([t for t in (seen.newest, *stamps) if t is not None], default=None)
            seen.server = next((dv.ServerTimestamp for dv in reversed(dvs) if dv.ServerTimestamp), seen.server)
        return found

    def _since(self, newest: datetime | None, stamps: list[datetime]) -> datetime | None:
        """Where an in-order item's read starts: at the newest reading received before, or, with none before (a
        first publish, a restarted server's node), `window` before the first value (what was discarded is stamped
        before it, by how much is unknown: read from the first value, it was lost unsaid)."""
        if newest is not None:
            return min([newest, *stamps])
        return min(stamps) - self.window if stamps else None

    def mark(self, nid: ua.NodeId, suspect: Suspect) -> None:
        """`nid`'s history must be read as `suspect` says (merged with a read not yet done)."""
        pending = self._suspects.get(nid)
        self._suspects[nid] = suspect if pending is None else pending.merged(suspect)

    def take(self) -> dict[ua.NodeId, Suspect]:
        """The suspect items to read now; they are no longer suspect."""
        suspects, self._suspects = self._suspects, {}
        return suspects


def _reading(dv: ua.DataValue) -> bool:
    """Whether `dv` carries a value: a status without one (BadWaitingForInitialData, stamped when a restarted server
    started) is no reading, and taken as one it made every reading after it look late (stamped before it), so a
    full queue was read back from `backfill_s` before now and losses were reported that had not happened."""
    return dv.Value is not None and dv.Value.VariantType != ua.VariantType.Null


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return None if a is None or b is None else min(a, b)
