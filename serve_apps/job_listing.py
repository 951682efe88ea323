"""Listing jobs, newest first, a page at a time: for `GET /v1/jobs` (a tenant's jobs, from the backend's table) and
`raytwin jobs list` (every tenant's, read from the store, where each job's record is ``jobs/{tenant}/{id}/job.json``).

The cursor is the last listed job's submission time and id, so a page stays in place while jobs are added: a job
submitted after the first page is not listed on later pages (list again from the start to see it).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from datetime import datetime

from pydantic import BaseModel, Field

from serve_apps.errors import Unprocessable
from serve_apps.jobs import Job, JobRecord


class JobPage(BaseModel):
    jobs: list[Job] = Field(description="newest first (by submission time)")
    next_cursor: str | None = Field(description="send it back as `cursor` for the next page; null on the last page")


def _sort_key(job: JobRecord) -> tuple[datetime, str]:
    return job.submitted, job.job_id


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


def select(records: Iterable[JobRecord], state: str | None = None, limit: int = 100,
           cursor: str | None = None) -> tuple[list[JobRecord], str | None]:
    """One page of `records` (of `state` if given), newest first, after `cursor`: the records and the next cursor
    (None: the last page)."""
    after = decode_cursor(cursor) if cursor else None
    chosen = sorted((r for r in records if state is None or r.state == state), key=_sort_key, reverse=True)
    if after is not None:
        chosen = [r for r in chosen if _sort_key(r) < after]
    shown = chosen[:limit]
    return shown, encode_cursor(shown[-1]) if len(chosen) > limit else None
