"""When to retry a request, and how long to wait first."""

from __future__ import annotations

import random
from dataclasses import dataclass

_RNG = random.Random()
RETRY_STATUSES = frozenset({429, 503})
"""Statuses that mean "try later": rate limited, or no replica could take it (see `MAYBE_APPLIED_CODES`)."""
MAYBE_APPLIED_CODES = frozenset({"backend_unavailable", "twin_unavailable"})
"""503 codes after which the request may have taken effect (the process applying it died or stalled): resent only
if the call is safe to resend, as after a network error."""


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
