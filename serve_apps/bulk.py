"""Bulk operations by filter (tag, delete, re-register to a new type version), run as jobs.

The ingress matches the query (with live state, as `POST /v1/query` does) and submits the ids;
the job runs in the backend, which owns the catalog, one asset at a time through the same
backend methods as single writes (so every item is checked, compare-and-set, recorded in the
change log and audited like a single write, with the job id in its audit details), off the
event loop so reads go on meanwhile. Progress is saved with the job every `SAVE_EVERY` items;
the report of each item is a JSON file next to the job record (`GET /v1/jobs/{id}/report`). One
item failing (a delete of an asset others point at, metadata the twin refuses) fails only that
item. Tag writes are compare-and-set on the revision read just before, retried when a
concurrent write got there first, so a bulk tag never loses a concurrent change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from raytwin.contracts import Asset
from serve_apps.audit import AuditLog, AuditRecord
from serve_apps.audit_steps import audited
from serve_apps.conditional import EntityTags, Precondition
from serve_apps.errors import ApiError, PreconditionFailed, Unprocessable
from serve_apps.query_schemas import BulkItem, BulkProgress, BulkReport, BulkRequest
from serve_apps.schemas import MAX_METADATA_KEYS

log = logging.getLogger("raytwin.serve.bulk")
SAVE_EVERY = 50
CAS_ATTEMPTS = 3
REPORT = "report.json"


class Writes(Protocol):
    """What an item needs of the backend (`serve_apps.backend.Backend`)."""

    def get_asset_revision(self, tenant: str, asset_id: str) -> tuple[Asset, int]: ...
    def update_asset(self, asset: Asset, pre: Precondition) -> int: ...
    def delete_asset(self, tenant: str, asset_id: str, pre: Precondition) -> None: ...


@dataclass(frozen=True)
class Caller:
    tenant: str
    key_id: str
    role: str
    request_id: str | None


@dataclass
class BulkWork:
    caller: Caller
    request: BulkRequest
    asset_ids: list[str]
    backend: Writes
    audit: AuditLog
    job_id: str  # chosen by the submitting request, which audits it first

    async def run(self, job: Any, save: Callable[[Any], None], write: Callable[[Any, str, bytes], str]
                  ) -> dict[str, Any]:
        """Apply the operation to every asset; the job's result (`JobQueue` fields) with the report's URL."""
        t0 = time.perf_counter()
        progress: BulkProgress = job.bulk
        items: list[BulkItem] = []
        for asset_id in self.asset_ids:
            item = await asyncio.to_thread(self.apply, asset_id)
            items.append(item)
            progress.done += 1
            setattr(progress, item.outcome, getattr(progress, item.outcome) + 1)
            if progress.done % SAVE_EVERY == 0:
                save(job)
        report = BulkReport(job_id=job.job_id, action=self.request.action, q=self.request.q, items=items)
        url = write(job, REPORT, report.model_dump_json().encode())
        log.info("event=bulk_done job_id=%s action=%s total=%d changed=%d unchanged=%d failed=%d", job.job_id,
                 self.request.action, progress.total, progress.changed, progress.unchanged, progress.failed)
        return {"quantiles": [], "compute_s": time.perf_counter() - t0, "result_url": url, "run_id": None}

    def apply(self, asset_id: str) -> BulkItem:
        """One asset; never raises for the API's errors (they become the item's `error`)."""
        try:
            return self._apply(asset_id)
        except ApiError as exc:
            return BulkItem(asset_id=asset_id, outcome="failed", error=f"{exc.code}: {exc.message}")

    def _apply(self, asset_id: str) -> BulkItem:
        tenant, req = self.caller.tenant, self.request
        for attempt in range(1, CAS_ATTEMPTS + 1):
            asset, revision = self.backend.get_asset_revision(tenant, asset_id)
            pre = Precondition(if_match=EntityTags(tags=frozenset({str(revision)})))  # the revision read just now
            try:
                if req.action == "delete":
                    with self._audited("asset.delete", asset_id, {}):
                        self.backend.delete_asset(tenant, asset_id, pre)
                    return BulkItem(asset_id=asset_id, outcome="changed")
                changed = self._changed(asset)
                if changed == asset:
                    return BulkItem(asset_id=asset_id, outcome="unchanged", revision=revision)
                with self._audited("asset.update", asset_id, {"asset": changed.model_dump(mode="json")}):
                    new_revision = self.backend.update_asset(changed, pre)
                return BulkItem(asset_id=asset_id, outcome="changed", revision=new_revision)
            except PreconditionFailed:
                if attempt == CAS_ATTEMPTS:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _changed(self, asset: Asset) -> Asset:
        req = self.request
        if req.action == "retype":
            return asset.model_copy(update={"type_version": req.type_version})
        metadata = {k: v for k, v in {**asset.metadata, **req.set}.items() if k not in req.unset}
        if len(metadata) > MAX_METADATA_KEYS > len(asset.metadata):
            raise Unprocessable(f"tagging would give the asset {len(metadata)} metadata keys, more than "
                                f"{MAX_METADATA_KEYS}")
        return asset.model_copy(update={"metadata": metadata})

    def _audited(self, action: str, target: str, details: dict[str, Any]) -> AbstractContextManager[dict[str, Any]]:
        """One asset's change audited in two steps (`serve_apps.audit_steps`), as the API's own writes are: its
        intent first (the item fails, `store_unavailable`, with nothing done where the store refuses it), its
        outcome after; both with the job's id, action and query."""
        c = self.caller
        details = {**details, "bulk": {"job_id": self.job_id, "action": self.request.action, "q": self.request.q}}
        return audited(self.audit, AuditRecord(time=datetime.now(UTC), request_id=c.request_id, key_id=c.key_id,
                                               tenant=c.tenant, role=c.role, action=action, target=target,
                                               details=details))
