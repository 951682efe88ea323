"""`raytwin audit`: the tenant's audit log through the HTTP API (an admin key), one JSON record a line."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from client.cli_support import API_KEY, API_URL, remote


def audit(
    url: API_URL, key: API_KEY,
    day: Annotated[datetime | None, typer.Option(formats=["%Y-%m-%d"], help="Only this UTC day (YYYY-MM-DD).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, max=10_000,
                                              help="The most recent this many records (default 1000).")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every record, newest first, read a page at a time (the "
                                                      "server answers at most 10,000 a request).")] = False,
) -> None:
    """Who changed what and when: the key's tenant's most recent audit records, oldest first (`--all`: every
    record, newest first, so a long log streams without holding it all). An intent without its outcome record
    (`outcome_missing`) is also named on stderr."""
    if every and limit is not None:
        raise typer.BadParameter("give either --all or --limit", param_hint="--all")
    with remote(url, key) as api:
        records = api.audit_records(day.date() if day else None) if every else api.audit(
            day.date() if day else None, limit or 1000)
        for record in records:
            typer.echo(record.json_line())
            if record.outcome_missing:
                typer.echo(f"warning: {record.action} of {record.target} at {record.time.isoformat()} (action_id "
                           f"{record.action_id}) has no outcome record: it was attempted, its result is unknown "
                           "(the store failed after it, or it is still under way)", err=True)
