"""Append-only audit log: who changed which asset, who ran which scenario with which inputs, when.

Each record is one JSON line in its own object
``{store}/audit/{tenant}/{YYYY-MM-DD}/{UTC timestamp}-{uuid}.jsonl``: object stores cannot append
to a file and several ingress replicas write at once, so records are never rewritten, only added,
and the log is the time-ordered union of the objects (names sort by time).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from raytwin.storage import filesystem, replace_file


class AuditRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    time: datetime
    request_id: str | None = Field(description="the server's id of the request (X-RayTwin-Request-ID)")
    client_request_id: str | None = Field(None, description="the client's own X-Request-ID if 1-128 printable "
                                          "chars, else none; never one Serve's proxy made up")
    key_id: str
    tenant: str
    role: str
    action: str = Field(description="e.g. asset.create, asset_type.delete, scenario.run, sweep.submit")
    target: str
    details: dict[str, Any] = Field(default_factory=dict)


class AuditLog:
    def __init__(self, store_url: str, storage_options: dict[str, Any] | None = None):
        self.fs, root = filesystem(store_url, storage_options)
        self.root = f"{root}/audit"

    def append(self, record: AuditRecord) -> None:
        t = record.time.astimezone(UTC)
        folder = f"{self.root}/{record.tenant}/{t:%Y-%m-%d}"
        line = json.dumps(record.model_dump(mode="json"), sort_keys=True, allow_nan=False) + "\n"
        replace_file(self.fs, f"{folder}/{t:%Y%m%dT%H%M%S.%fZ}-{uuid.uuid4().hex}.jsonl", line.encode())

    def records(self, tenant: str, day: str | None = None, limit: int = 1000) -> list[AuditRecord]:
        """The tenant's most recent records (of one ``YYYY-MM-DD`` day if given), oldest first."""
        return self.page(tenant, day, limit).records

    def page(self, tenant: str, day: str | None = None, limit: int = 1000, cursor: str | None = None) -> AuditPage:
        """The newest `limit` records older than `cursor` (none: the newest), oldest first, and the cursor of
        the page before (None: no older record). A cursor is a record's name, ``{day}/{object}``: the log only
        grows at its new end, so the pages before a cursor never change."""
        base = f"{self.root}/{tenant}" + (f"/{day}" if day else "")
        if not self.fs.exists(base):
            return AuditPage([], None)
        named = sorted((_name(p), p) for p in self.fs.find(base) if p.endswith(".jsonl"))
        older = [entry for entry in named if cursor is None or entry[0] < cursor]
        page = older[-limit:]
        blobs = self.fs.cat([p for _, p in page], on_error="raise") if page else {}
        return AuditPage([AuditRecord.model_validate_json(blobs[p]) for _, p in page],
                         page[0][0] if len(older) > len(page) else None)


@dataclass(frozen=True)
class AuditPage:
    records: list[AuditRecord]
    next_cursor: str | None


NEXT_CURSOR = "X-Next-Cursor"
"""The header of `GET /v1/audit` naming the cursor of the page of older records."""
CURSOR_PATTERN = r"^\d{4}-\d{2}-\d{2}/\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{32}$"
"""An audit cursor: a record's day folder and object name, without ``.jsonl``."""


def _name(path: str) -> str:
    """A record's cursor name: its day folder and object name (``2026-01-05/20260105T...Z-<uuid>``)."""
    return "/".join(path.rsplit("/", 2)[-2:]).removesuffix(".jsonl")
