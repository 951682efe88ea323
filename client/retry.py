"""When to retry a request, and how long to wait first: what a failed try says about the request (`Verdict`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

import httpx

from client.errors import PROXY_TIMEOUT, error_code

_RNG = random.Random()
MAYBE_APPLIED_CODES = frozenset({"backend_unavailable", "twin_unavailable"})
"""RayTwin's 503 codes after which the request may have taken effect (the process applying it died or stalled)."""
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
"""Network errors raised before any byte of the request left the client: the server never saw it."""


class Verdict(Enum):
    """A failed try that may succeed when sent again, and whether it may have taken effect meanwhile."""

    NOT_APPLIED = "not_applied"  # refused before any work, or never reached RayTwin: any call may be resent
    MAYBE_APPLIED = "maybe_applied"  # may have taken effect: resent only if the call is safe to resend


def verdict(answer: httpx.Response | httpx.TransportError) -> Verdict | None:
    """What `answer` says, or None where it is final (a success, or an error no resend cures).

    Not applied: a failed connect; 429; RayTwin's own 503 but `MAYBE_APPLIED_CODES` (overloaded, store fenced);
    a proxy's bare 503 or 404 (Serve's proxy answers ``404 Path ... not found`` while the app deploys: no RayTwin
    route saw it; RayTwin's own 404 carries its error body and is final). Maybe applied: any other network error
    (the request may have been written before the connection broke), RayTwin's `MAYBE_APPLIED_CODES`, a proxy's
    bare 408 (Serve's proxy answers ``408 Request ... timed out`` once its `request_timeout_s` passed while the
    replica still worked on it) and its other 5xx (500, 502, 504: the upstream failed or timed out after it got
    the request)."""
    if isinstance(answer, httpx.TransportError):
        return Verdict.NOT_APPLIED if isinstance(answer, NOT_SENT) else Verdict.MAYBE_APPLIED
    if not answer.is_error:  # a success may be a stream not read yet: its body is the caller's
        return None
    status, code = answer.status_code, error_code(answer)
    if status == 429:
        return Verdict.NOT_APPLIED
    if code is not None:  # RayTwin answered: only its 503s are "try later"
        if status != 503:
            return None
        return Verdict.MAYBE_APPLIED if code in MAYBE_APPLIED_CODES else Verdict.NOT_APPLIED
    if status in (404, 503):
        return Verdict.NOT_APPLIED
    return Verdict.MAYBE_APPLIED if status >= 500 or status == PROXY_TIMEOUT else None


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped; a server's `Retry-After` wins when it says more.

    `attempts` counts the first try: 1 turns retries off.
    """

    attempts: int = 5
    backoff_s: float = 0.2
    max_backoff_s: float = 10.0

    def delay(self, attempt: int, retry_after_s: float | None, rng: random.Random = _RNG) -> float:
        """Seconds to wait before try `attempt + 1` (`attempt` = tries made so far, >= 1)."""
        backoff = rng.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
        return max(backoff, retry_after_s or 0.0)
