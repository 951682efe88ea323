"""Calls that go on after their awaiting side went away (a client that gave up, a read answered from the store, a
shard call past its deadline): their outcome is still retrieved, so that asyncio never logs "Task exception was
never retrieved" (a traceback tied to no request, read as a server fault), and a failure that nobody else will
hear of is logged once.

Where the call's failure is nobody's concern (a read answered otherwise), `ignore_outcome`; where it may matter
(a write whose client left), `orphan` logs it once at the level given. An `ApiError` (a 404, a refusal) is the
answer the departed client would have had, not a failure: it is never logged.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import TypeVar

from serve_apps.errors import ApiError, unwrap

log = logging.getLogger("raytwin.serve")

T = TypeVar("T")


def ignore_outcome(call: asyncio.Future) -> None:
    """A done callback for a call whose outcome nobody awaits any more and nobody needs: retrieved, so that
    asyncio does not log "exception was never retrieved" for it."""
    if not call.cancelled():
        call.exception()


def orphan(call: asyncio.Future, what: str, level: int = logging.INFO) -> None:
    """`call` goes on with nobody awaiting it: once done, its outcome is retrieved and a failure (not an
    `ApiError`) logged once at `level`, naming it `what`."""
    call.add_done_callback(partial(_log_failure, what, level))


def _log_failure(what: str, level: int, call: asyncio.Future) -> None:
    if call.cancelled() or (exc := call.exception()) is None:
        return
    if not isinstance(err := unwrap(exc), ApiError):
        log.log(level, "event=unawaited_call_failed call=%r error=%s: %s (nobody awaited it any more)", what,
                type(err).__name__, next(iter(str(err).splitlines()), "")[:300])


async def outlived(call: asyncio.Future[T], what: str, level: int = logging.INFO) -> T:
    """`await call`, except that the awaiting side being cancelled leaves `call` going on as an `orphan`."""
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        orphan(call, what, level)
        raise
