"""Retained copies: an MQTT broker sends each matching retained message at every SUBSCRIBE, and a connector subscribes
at every connection. MQTT 5 asks for them on a new subscription only (Retain Handling 1); MQTT 3.1.1 has no such
option, so each resume, broker or connector restart read a retained reading again (a duplicate the twins drop) and
dead-lettered a retained bad payload again.

A retained message is left unread here only where it is a copy of what this process delivered: its payload is the one
delivered last (durable in the twins, or dead-lettered) on its topic. The route and the mapping are the declaration's,
fixed for the process, so it would map to the same rows (the twins' duplicates, by their idempotency keys) and dead
letters. The flags cannot tell that: a broker flags retained what it sends for a SUBSCRIBE, on a held subscription too,
so the only copy of a value published while the connector was away is flagged as a re-sent one is (published at QoS 0,
which a broker queues for no absent session, or dropped from a full queue), and not every broker clears the flag on
what it forwards to a held subscription; the subscriptions the broker granted before (its SUBACKs, the session present
flag) say which filters may get copies, not that a message is one. So those were not used (connectors/README.md).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

RETAINED_TOPICS_KEPT = 10_000
"""Topics whose last delivered payload is kept (a digest each, for topics a retained message came on): beyond them, a
retained copy is read again, a duplicate the twins drop, rather than memory growing with the topics."""


def _digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


class RetainedCopies:
    """The payload delivered last on each topic a retained message came on (as a digest), for this process."""

    def __init__(self, limit: int = RETAINED_TOPICS_KEPT):
        self.limit = limit
        self._lock = threading.Lock()  # the receive thread reads, the pump's thread (acknowledging) writes
        self._delivered: dict[str, bytes] = {}

    def delivering(self, topic: str, payload: bytes, retained: bool,
                   ack: Callable[[], None]) -> Callable[[], None] | None:
        """How to acknowledge a message once delivered: `ack`, first remembering its payload for its topic where a
        retained message came on that topic. None for a retained copy of the payload delivered last on its topic,
        acknowledged here unread."""
        with self._lock:
            last = self._delivered.get(topic)
        if last is None and not retained:
            return ack
        digest = _digest(payload)
        if retained and digest == last:
            ack()
            return None

        def delivered() -> None:
            with self._lock:
                if topic in self._delivered or len(self._delivered) < self.limit:
                    self._delivered[topic] = digest
            ack()
        return delivered
