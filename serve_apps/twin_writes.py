"""The backend's own writes to one twin's shard: each within a deadline, one at a time per twin, none under a lock
shared across twins.

A twin shard can be alive to Ray and answer nothing (hung or stalled). The backend's thread waiting on it used to wait
for good, and `Backend._lock` with it: every tenant's asset writes queued behind one hung shard until the Ingress
deadline refused them. Now each call waits its deadline (`ServeConfig.shard_create_timeout_s` for an asset's creation
or retype, `shard_write_timeout_s` for a deletion's twin stop or a drift clear) and the caller gets 503
`twin_unavailable`, *outcome unknown*: the call stays queued in the shard, which may still apply it. Until it answers
the twin is *unsettled*: its other writes are refused (503) at once, so that none overtakes the one in flight (a
delete's stop ahead of a late registration would leave a twin without its asset), and what must follow the answer runs
then (`then`): a creation the shard refused removes its asset, a deletion's tombstone is removed, a move is written to
the catalog. No thread waits for that answer meanwhile (Ray completes the call's future).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TypeVar

from actors.service import ShardUnanswered
from serve_apps.shard_deadline import RETRY_AFTER_S, TwinUnavailable

log = logging.getLogger("raytwin.serve.twin_writes")
T = TypeVar("T")
Twin = tuple[str, str]


class TwinWrites:
    """Which twins a backend write runs on, or whose shard left one unanswered (unsettled)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._running: set[Twin] = set()
        self._unsettled: dict[Twin, str] = {}  # what was left unanswered

    @contextmanager
    def one(self, tenant: str, asset_id: str, timeout_s: float) -> Iterator[None]:
        """The block as the twin's only backend write: it waits up to `timeout_s` for one running (then 503), and is
        refused at once (503) while the twin is unsettled."""
        twin = (tenant, asset_id)
        with self._changed:
            if not self._changed.wait_for(lambda: twin not in self._running or twin in self._unsettled, timeout_s):
                raise _busy(asset_id, f"another write of it has run for over {timeout_s:g} s")
            self._refuse_unsettled(twin)
            self._running.add(twin)
        try:
            yield
        finally:
            with self._changed:
                self._running.discard(twin)
                self._changed.notify_all()

    def idle(self, tenant: str, asset_id: str) -> bool:
        """Whether no backend write of the twin runs or is left unanswered: a reader may settle what one left (a
        journaled move) only then, or it would drop a move its shard may still make."""
        twin = (tenant, asset_id)
        with self._changed:
            return twin not in self._running and twin not in self._unsettled

    def wait(self, tenant: str, asset_id: str, call: Callable[[], T], after: str,
             then: Callable[[Future], None] = lambda outcome: None) -> T:
        """`call()`, a shard call with a deadline; past it (`ShardUnanswered`) the twin is unsettled until the shard
        answers, `then(outcome)` runs once it did (on a thread of its own), and the caller gets 503: the outcome is
        unknown, `after` says what the client sees and does."""
        try:
            return call()
        except ShardUnanswered as exc:
            twin = (tenant, asset_id)
            with self._changed:
                self._unsettled[twin] = str(exc)
            log.warning("event=twin_write_unanswered tenant=%s asset=%s: %s; its other writes are refused until the "
                        "shard answers", tenant, asset_id, exc)
            exc.outcome.add_done_callback(lambda outcome: threading.Thread(
                target=self._settle, args=(twin, outcome, then), name="twin-write-settle", daemon=True).start())
            raise TwinUnavailable(f"outcome unknown: {exc} (a hung or stalled shard; other twins are unaffected), and "
                                  f"the shard may still apply it: {after}; retry after {RETRY_AFTER_S} s",
                                  headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def _settle(self, twin: Twin, outcome: Future, then: Callable[[Future], None]) -> None:
        """`then(outcome)`, then the twin's writes are taken again (also where `then` failed: logged)."""
        try:
            then(outcome)
        except Exception:  # noqa: BLE001 - what it left is finished by a retry of the write or the next start
            log.exception("event=twin_write_settle_failed tenant=%s asset=%s", *twin)
        finally:
            with self._changed:
                del self._unsettled[twin]
                self._changed.notify_all()
            log.info("event=twin_write_settled tenant=%s asset=%s", *twin)

    def _refuse_unsettled(self, twin: Twin) -> None:
        if (left := self._unsettled.get(twin)) is not None:
            raise _busy(twin[1], f"its shard has not answered an earlier write yet ({left})")


def _busy(asset_id: str, why: str) -> TwinUnavailable:
    return TwinUnavailable(f"twin {asset_id} takes no write now: {why}; nothing of this request was done; GET the "
                           f"asset (or its state) and retry after {RETRY_AFTER_S} s",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
