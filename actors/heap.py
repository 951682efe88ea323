"""Keeping long-lived objects out of CPython's full garbage collections on the live path.

Why: a process running twins or a live stream holds ~250k long-lived objects (JAX, Ray, Arrow,
compiled kernels, the twins). A full collection scans them all: ~130-160 ms measured, once every
few hundred live batches, and every batch queued behind it waits (the tail of ingest->queryable
latency). Frozen objects are skipped by the collector (a full collection then takes ~3 ms) and
are still freed by reference counting.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


def freeze_heap() -> None:
    """Freeze every object alive now; young garbage is collected first (cheap) so that little is
    frozen with them."""
    gc.collect(1)
    gc.freeze()


@contextmanager
def frozen_heap() -> Iterator[None]:
    """The heap frozen for the duration of the block (a live stream), then as it was; a process
    that froze its heap itself is left alone."""
    if gc.get_freeze_count():
        yield
        return
    freeze_heap()
    try:
        yield
    finally:
        gc.unfreeze()
