"""Append-only audit log: who changed which asset, who ran which scenario with which inputs, when.

Each record is one JSON line in its own object
``{store}/audit/{tenant}/{YYYY-MM-DD}/{UTC timestamp}-{uuid}.jsonl``: object stores cannot append
to a file and several ingress replicas write at once, so records are never rewritten, only added,
and the log is the time-ordered union of the objects (names sort by time).
"""

from __future__ import annotations

import json
import uuid
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
        base = f"{self.root}/{tenant}" + (f"/{day}" if day else "")
        if not self.fs.exists(base):
            return []
        paths = sorted(p for p in self.fs.find(base) if p.endswith(".jsonl"))[-limit:]
        blobs = self.fs.cat(paths, on_error="raise")
        return [AuditRecord.model_validate_json(blobs[p]) for p in paths]
