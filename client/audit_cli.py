"""`raytwin audit`: the tenant's audit log through the HTTP API (an admin key), one JSON record a line."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from client.cli_support import API_KEY, API_URL, remote


def audit(
    url: API_URL, key: API_KEY,
    day: Annotated[datetime | None, typer.Option(formats=["%Y-%m-%d"], help="Only this UTC day (YYYY-MM-DD).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="The most recent this many records.")] = 1000,
) -> None:
    """Who changed what and when: the key's tenant's most recent audit records, oldest first."""
    with remote(url, key) as api:
        for record in api.audit(day.date() if day else None, limit):
            typer.echo(record.model_dump_json())
