"""Fair scheduling of queued jobs across tenants: one queue per tenant, taken in turns, and a cap on each tenant's
running jobs, so that one tenant's long sweeps cannot hold every slot while another tenant's job waits.

`TenantQueues` decides only which queued job runs next; `serve_apps.jobs.JobQueue` owns the slots and the records.
`QueueWait` is what a queued job's status says about why it waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, Field

W = TypeVar("W")

WaitingFor = Literal["tenant_limit", "slot", "turn"]


class QueueWait(BaseModel):
    """Why a queued job has not started yet."""

    position: int = Field(ge=1, description="1: the tenant's next job to start; n: n-1 of the tenant's queued jobs "
                          "start before it (a tenant's jobs start in the order they were submitted)")
    waiting_for: WaitingFor = Field(description="`tenant_limit`: the tenant already runs "
                                    "`max_running_jobs_per_tenant` jobs; `slot`: all `max_concurrent_jobs` slots are "
                                    "busy (tenants take turns for the next free one); `turn`: starting now")
    tenant_running: int = Field(description="the tenant's jobs running now")
    tenant_limit: int = Field(description="at most this many of a tenant's jobs run at once")
    reason: str = Field(description="the same in words")


class TenantQueues(Generic[W]):
    """Queued jobs per tenant, in submission order; tenants take turns (round robin) for free slots."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[tuple[str, W]]] = {}  # insertion order: the tenants' turn order

    def push(self, tenant: str, job_id: str, work: W) -> None:
        self._queues.setdefault(tenant, deque()).append((job_id, work))

    def remove(self, tenant: str, job_id: str) -> None:
        """Take a queued job out (cancelled); nothing if it is not queued."""
        queue = self._queues.get(tenant)
        if queue is None:
            return
        kept = deque(item for item in queue if item[0] != job_id)
        if kept:
            self._queues[tenant] = kept
        else:
            del self._queues[tenant]

    def pop_next(self, running: Mapping[str, int], limit: int) -> tuple[str, str, W] | None:
        """The next job to start, (tenant, job id, work), or None when no tenant may start one: of the tenants that
        run fewer than `limit` jobs, the one that runs fewest (the first in turn among equals) gives its oldest job
        and goes to the end of the turn order."""
        eligible = [tenant for tenant in self._queues if running.get(tenant, 0) < limit]
        if not eligible:
            return None
        tenant = min(eligible, key=lambda t: running.get(t, 0))  # min keeps the first of equals: the turn order
        queue = self._queues.pop(tenant)
        job_id, work = queue.popleft()
        if queue:
            self._queues[tenant] = queue  # back of the line
        return tenant, job_id, work

    def position(self, tenant: str, job_id: str) -> int | None:
        """1-based place of the job among its tenant's queued jobs (None: not queued)."""
        for i, (queued, _) in enumerate(self._queues.get(tenant, ())):
            if queued == job_id:
                return i + 1
        return None

    def job_ids(self) -> Iterator[str]:
        for queue in self._queues.values():
            for job_id, _ in queue:
                yield job_id

    def __bool__(self) -> bool:
        return bool(self._queues)


def queue_wait(position: int, tenant_running: int, tenant_limit: int, running: int, slots: int) -> QueueWait:
    """Why the tenant's queued job at `position` waits, with `running` of `slots` busy (the other tenants' jobs are
    counted together, never named)."""
    before = f"{position - 1} of this tenant's queued jobs start before it; " if position > 1 else ""
    if tenant_running >= tenant_limit:
        waiting_for: WaitingFor = "tenant_limit"
        why = (f"this tenant already runs {tenant_running} job(s), the most a tenant may run at once "
               f"(max_running_jobs_per_tenant={tenant_limit}): it starts when one of them finishes")
    elif running >= slots:
        waiting_for = "slot"
        why = (f"all {slots} job slots are busy (max_concurrent_jobs), {tenant_running} with this tenant's jobs: it "
               "starts in the next free slot its tenant's turn gets (tenants take turns)")
    else:
        waiting_for, why = "turn", "a slot is free: it is starting"
    return QueueWait(position=position, waiting_for=waiting_for, tenant_running=tenant_running,
                     tenant_limit=tenant_limit, reason=before + why)
