"""Listing jobs, newest first, a page at a time: for `GET /v1/jobs` (a tenant's jobs, from the backend's table) and
`raytwin jobs list` (every tenant's, read from the store, where each job's record is ``jobs/{tenant}/{id}/job.json``).

The cursor is the last listed job's submission time and id, so a page stays in place while jobs are added: a job
submitted after the first page is not listed on later pages (list again from the start to see it).

A page reads the jobs from its cursor back until it has `limit` and one more (`page`, over the jobs' (submitted,
id) keys in order, which the backend keeps per tenant): not every job the service ever ran, which the backend's
table holds (a page sorted all 100,000 of them, about 50 ms on its event loop).
"""

from __future__ import annotations

import base64
import binascii
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

from pydantic import BaseModel, Field

from serve_apps.errors import Unprocessable
from serve_apps.jobs import Job, JobRecord


class JobPage(BaseModel):
    jobs: list[Job] = Field(description="newest first (by submission time)")
    next_cursor: str | None = Field(description="send it back as `cursor` for the next page; null on the last page")


def encode_cursor(job: JobRecord) -> str:
    return base64.urlsafe_b64encode(f"{job.submitted.isoformat()}|{job.job_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (submitted, job id) a cursor stands for; 422 for one this service did not make."""
    try:
        submitted, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(submitted), job_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise Unprocessable("query.cursor: not a cursor of this listing; send the `next_cursor` of the previous page "
                            "unchanged, or none for the first page", details=[{"loc": ["query", "cursor"]}]) from None


def page(keys: Sequence[tuple[datetime, str]], job: Callable[[str], JobRecord], state: str | None = None, limit: int = 100,
         cursor: str | None = None) -> tuple[list[JobRecord], str | None]:
    """One page of the jobs of `keys` (their `JobRecord.listed_at`, ascending; `job`: the record of an id), of `state` if given,
    newest first, after `cursor`: the records and the next cursor (None: the last page). Reads the records from
    the cursor back until the page and one more are found."""
    end = bisect_left(keys, decode_cursor(cursor)) if cursor else len(keys)
    chosen: list[JobRecord] = []
    for i in range(end - 1, -1, -1):
        record = job(keys[i][1])
        if state is None or record.state == state:
            chosen.append(record)
            if len(chosen) > limit:
                break
    shown = chosen[:limit]
    return shown, encode_cursor(shown[-1]) if len(chosen) > limit else None


def select(records: Iterable[JobRecord], state: str | None = None, limit: int = 100,
           cursor: str | None = None) -> tuple[list[JobRecord], str | None]:
    """`page` of `records`, in no order (every tenant's, as `raytwin jobs list` reads them from the store)."""
    by_id = {r.job_id: r for r in records}
    return page(sorted(r.listed_at for r in by_id.values()), by_id.__getitem__, state, limit, cursor)
