"""Waiting for a job (scenario, sweep, bulk), shared by the sync and async clients: a `JobWait` says
what to ask next and how long to sleep; the clients only send and sleep.

Polls start fast (a small bulk job ends in well under a second) and back off geometrically to
`max_poll_s`, so a sweep of an hour costs a few hundred requests, not thousands.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from client.calls import Call, job_call
from client.errors import RayTwinError

if TYPE_CHECKING:
    from serve_apps.jobs import Job


class JobFailed(RayTwinError):
    """The job ended in `failed` or `cancelled`; `job` is its last status (`job.error` says why)."""

    def __init__(self, job: Job):
        super().__init__(f"job {job.job_id} ({job.kind}) {job.state}: {job.error}")
        self.job = job


class JobTimeout(RayTwinError):
    """The job did not finish in time; it keeps running on the server (wait again, or read `job`)."""

    def __init__(self, job: Job, timeout_s: float):
        super().__init__(f"job {job.job_id} ({job.kind}) still {job.state} after {timeout_s:g} s")
        self.job = job


@dataclass
class JobWait:
    """``while True: job = send(w.call()); if w.finished(job): break; sleep(w.delay())``."""

    job_id: str
    timeout_s: float
    on_progress: Callable[[Job], None] | None = None
    first_poll_s: float = 0.1
    max_poll_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _polls: int = 0
    _seen: Any = None
    _deadline: float = field(init=False)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.first_poll_s <= 0 or self.max_poll_s < self.first_poll_s:
            raise ValueError("wait_job: timeout_s and first_poll_s must be > 0 and max_poll_s >= first_poll_s")
        self._deadline = self.clock() + self.timeout_s

    def call(self) -> Call[Job]:
        return job_call(self.job_id)

    def finished(self, job: Job) -> bool:
        """Report progress when it changed; True once the job succeeded (raises if it failed, was cancelled or
        time is up)."""
        self._polls += 1
        seen = (job.state, job.bulk)
        if self.on_progress is not None and seen != self._seen:
            self.on_progress(job)
        self._seen = seen
        if job.state in ("failed", "cancelled"):
            raise JobFailed(job)
        if job.state == "succeeded":
            return True
        if self.clock() >= self._deadline:
            raise JobTimeout(job, self.timeout_s)
        return False

    def delay(self) -> float:
        """Seconds before the next poll: doubling from `first_poll_s`, capped at `max_poll_s`; the last
        poll is at the deadline."""
        backoff = min(self.max_poll_s, self.first_poll_s * 2 ** max(0, self._polls - 1))
        return max(0.0, min(backoff, self._deadline - self.clock()))

