"""Reporting a damaged store file (an unreadable snapshot, a cut log segment) once per process.

Why: readers of the store go on past a damaged file (the previous snapshot, the readable rows of
a segment) so that one bad file never takes a shard or a read down; what was lost must then still
reach an operator: an error log line naming the file and what the reader did, and a counter
(`raytwin.metrics.STORE_DAMAGED_FILES`) an alert can watch. Readers meet the same file on every
recovery, time-travel read and key-index lookup: it is reported once per process and file state.
"""

from __future__ import annotations

import logging
import threading
from typing import Literal

from raytwin import metrics

DamagedKind = Literal["snapshot", "log_segment"]  # `metrics.DAMAGED_KINDS`

log = logging.getLogger("raytwin.store")
_reported: set[tuple[str, str]] = set()
_lock = threading.Lock()


def report_damaged(kind: DamagedKind, path: str, state: str, message: str, *args: object) -> bool:
    """Log `message` (% `args`) as an error and count the file, unless this process reported `path` in `state`
    (e.g. its size) before; True when it was reported now."""
    with _lock:
        if (path, state) in _reported:
            return False
        _reported.add((path, state))
    log.error(message, *args)
    metrics.STORE_DAMAGED_FILES.inc(kind=kind)
    return True
