"""The asyncio client: `AsyncRayTwinClient(url, api_key)`; the same operations as `RayTwinClient`, awaited."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from client.base import ClientBase
from client.calls import AssetFilter, Call, T, _nothing
from client.downloads import CHUNK_BYTES, JOB_FILE, RUN_FILE, FileDownload, download_target
from client.errors import from_response
from client.jobs import JobWait
from client.model_calls import needs_production, rollback_call, run_file_call
from client.pages import (AuditPager, CursorPager, QueryPager, asset_pager, asset_type_pager, command_pager,
                          connector_pager, dead_letter_pager, job_pager)
from client.retry import RetryPolicy
from client.scenario_calls import job_file_call
from client.subscription import Subscription
from serve_apps.changes import Change

if TYPE_CHECKING:
    from datetime import date

    from connectors.commands import Command
    from connectors.runtime import ConnectorStatus
    from raytwin.contracts import Asset, AssetType, RelationshipKind
    from serve_apps.audit import AuditRecord
    from serve_apps.jobs import Job
    from serve_apps.routes_models import RollbackRequest, TransitionAnswer
    from serve_apps.schemas import DeadLetter

I = TypeVar("I")


class AsyncRayTwinClient(ClientBase):
    """Every operation returns an awaitable; retries and errors as in `RayTwinClient`."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0, retry: RetryPolicy = RetryPolicy(),
                 transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(retry)
        self._http = httpx.AsyncClient(**self._http_options(base_url, api_key, timeout, transport))

    async def __aenter__(self) -> AsyncRayTwinClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call[T]) -> T:
        maybe_applied = False
        for attempt in range(1, self.retry.attempts + 1):
            try:
                answer: httpx.Response | httpx.TransportError = await self._http.request(
                    call.method, call.path, params=call.params, json=call.json, headers=dict(call.headers))
            except httpx.TransportError as exc:
                answer = exc
            delay = self._resend_after(call, attempt, answer, maybe_applied)
            maybe_applied = maybe_applied or self.may_have_applied(answer)
            if delay is None:
                assert isinstance(answer, httpx.Response)
                return call.result(answer)
            await self._pause(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _pause(self, seconds: float) -> None:
        self.retries += 1
        await asyncio.sleep(seconds)

    async def wait_job(self, job_id: str, timeout_s: float = 600.0, on_progress: Callable[[Job], None] | None = None,
                       max_poll_s: float = 5.0) -> Job:
        """Poll a job until it succeeded (see `RayTwinClient.wait_job`)."""
        wait = JobWait(job_id, timeout_s, on_progress, max_poll_s=max_poll_s)
        while not wait.finished(job := await self._send(wait.call())):
            await asyncio.sleep(wait.delay())
        return job

    async def rollback_model(self, model: str, request: RollbackRequest) -> TransitionAnswer:
        """Back to the previous production version (`twins`: the twins swapped back, and those refused). Without
        `from_version` or `expected_revision` it reads the production version first and names it as `from_version`,
        so resending after a lost answer goes back one version, never two (`client.model_calls.rollback_call`)."""
        production = (await self.model_lifecycle(model)).production if needs_production(request) else None
        return await self._send(rollback_call(model, request, production))

    async def download_run_file(self, run_id: str, name: str, path: str | os.PathLike[str],
                                verify: bool = True) -> Path:
        """Stream a run's output file to `path` (see `RayTwinClient.download_run_file`), writing it off the
        event loop."""
        return await self._download(FileDownload(run_file_call(run_id, name, _nothing), download_target(path),
                                                 RUN_FILE, verify))

    async def download_job_file(self, job_id: str, name: str, path: str | os.PathLike[str],
                                verify: bool = True) -> Path:
        """Stream a succeeded job's result file to `path` (see `RayTwinClient.download_job_file`)."""
        return await self._download(FileDownload(job_file_call(job_id, name, _nothing), download_target(path),
                                                 JOB_FILE, verify))

    async def _download(self, download: FileDownload) -> Path:
        """Stream `download`'s file to its target (see `RayTwinClient._download`)."""
        call = download.call
        for attempt in range(1, self.retry.attempts + 1):
            try:
                async with self._http.stream(call.method, call.path, headers=dict(call.headers)) as r:
                    if r.is_error:
                        await r.aread()  # the problem's body, for the error `_resend_after` raises
                    delay = self._resend_after(call, attempt, r)
                    if delay is None:
                        with download.file(r) as out:
                            async for chunk in r.aiter_bytes(CHUNK_BYTES):
                                await asyncio.to_thread(out.write, chunk)
                            return await asyncio.to_thread(out.commit)
            except httpx.TransportError as exc:
                delay = self._resend_after(call, attempt, exc)
            assert delay is not None  # the last attempt returns or raises
            await self._pause(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def query(self, q: str = "", sort: Sequence[str] = (), fields: Sequence[str] | None = None,
                    page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """Every asset matching `q`, page after page (see `RayTwinClient.query`)."""
        pager = QueryPager(q, sort, fields, page_size)
        while not pager.done:
            for item in pager.feed(await self._send(pager.call())):
                yield item

    def iter_jobs(self, state: str | None = None, page_size: int = 100) -> AsyncIterator[Job]:
        """Every job of the tenant, newest first, page after page (see `RayTwinClient.iter_jobs`)."""
        return self._walk(job_pager(state, page_size))

    def iter_assets(self, type_name: str | None = None, type_version: str | None = None,
                    related_to: str | None = None, relationship: RelationshipKind | None = None,
                    page_size: int = 100) -> AsyncIterator[Asset]:
        """Every asset of the tenant, in id order, page after page (see `RayTwinClient.iter_assets`)."""
        return self._walk(asset_pager(AssetFilter(type_name, type_version, related_to, relationship), page_size))

    def iter_asset_types(self, name: str | None = None, page_size: int = 100) -> AsyncIterator[AssetType]:
        """Every asset type of the tenant, in `name@version` order, page after page."""
        return self._walk(asset_type_pager(name, page_size))

    def iter_commands(self, asset_id: str | None = None, page_size: int = 100) -> AsyncIterator[Command]:
        """Every command of the tenant (of one asset if given), in id order, page after page."""
        return self._walk(command_pager(asset_id, page_size))

    def iter_connectors(self, page_size: int = 100) -> AsyncIterator[ConnectorStatus]:
        """Every connector of the tenant with its status, in name order, page after page."""
        return self._walk(connector_pager(page_size))

    def iter_connector_dead_letters(self, name: str, day: date | None = None,
                                    page_size: int = 100) -> AsyncIterator[DeadLetter]:
        """Every dead letter of the connector (of one UTC day if given), newest first, page after page."""
        return self._walk(dead_letter_pager(name, day, page_size))

    async def _walk(self, pager: CursorPager[Any, I]) -> AsyncIterator[I]:
        while not pager.done:
            for item in pager.feed(await self._send(pager.call())):
                yield item

    async def audit_records(self, day: date | None = None, page_size: int = 1000) -> AsyncIterator[AuditRecord]:
        """Every audit record of the tenant (of one UTC day if given), newest first (see `RayTwinClient.audit_records`)."""
        pager = AuditPager(day, page_size)
        while not pager.done:
            for record in pager.feed(await self._send(pager.call())):
                yield record

    async def changes(self, after: int | str | None = None, asset_ids: tuple[str, ...] = (), type_name: str | None = None,
                      kinds: tuple[str, ...] = ()) -> AsyncIterator[Change]:
        """Follow the tenant's change stream, reconnecting with `Last-Event-ID` (see `RayTwinClient.changes`)."""
        sub = Subscription(after, asset_ids, type_name, kinds)
        while True:
            try:
                async with self._http.stream(**sub.connection(self._http.timeout.connect)) as r:
                    if r.is_error:
                        await r.aread()  # a refusal's body (small), read before `refused` parses its error code
                    if sub.refused(r):
                        raise from_response(r)
                    if not r.is_error:
                        async for line in r.aiter_lines():
                            for change in sub.feed([line]):
                                yield change
                            if sub.fell_behind:
                                break
            except httpx.TransportError:
                sub.dropped()
            if (delay := sub.reconnect_delay(self.retry)) is not None:
                await self._pause(delay)
