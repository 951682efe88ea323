"""The tenant audit log as the API answers it: the log itself is the core's (`raytwin.audit`), which the offline
`raytwin registry` CLI writes too; this module names it for the API's routes and clients, and adds the paging
header of `GET /v1/audit`."""

from __future__ import annotations

from raytwin.audit import CURSOR_PATTERN, AuditLog, AuditPage, AuditRecord

__all__ = ["CURSOR_PATTERN", "NEXT_CURSOR", "AuditLog", "AuditPage", "AuditRecord"]

NEXT_CURSOR = "X-Next-Cursor"
"""The header of `GET /v1/audit` naming the cursor of the page of older records. A header, not a `next_cursor` field as
the other listings' (`serve_apps.listing`): the answer is a JSON array of records since v1, which clients read as
such (the SDK's `audit`, `raytwin audit`); a field would make it an object, a breaking change left to a ``/v2``."""
