"""The blocking client: `RayTwinClient(url, api_key)`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
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


class RayTwinClient(ClientBase):
    """The RayTwin HTTP API. Resends a try that was not applied (429, 503, a proxy's bare 404, a failed connect;
    honouring `Retry-After`) and, for requests that are safe to resend, one that may have been (a network error,
    a lost backend: `client.retry.verdict`); raises `client.errors` exceptions (client/README.md, "Errors")."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0, retry: RetryPolicy = RetryPolicy(),
                 transport: httpx.BaseTransport | None = None):
        super().__init__(retry)
        self._http = httpx.Client(**self._http_options(base_url, api_key, timeout, transport))

    def __enter__(self) -> RayTwinClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call[T]) -> T:
        maybe_applied = False
        for attempt in range(1, self.retry.attempts + 1):
            try:
                answer: httpx.Response | httpx.TransportError = self._http.request(
                    call.method, call.path, params=call.params, json=call.json, headers=dict(call.headers))
            except httpx.TransportError as exc:
                answer = exc
            delay = self._resend_after(call, attempt, answer, maybe_applied)
            maybe_applied = maybe_applied or self.may_have_applied(answer)
            if delay is None:
                assert isinstance(answer, httpx.Response)
                return call.result(answer)
            self._pause(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _pause(self, seconds: float) -> None:
        self.retries += 1
        time.sleep(seconds)

    def wait_job(self, job_id: str, timeout_s: float = 600.0, on_progress: Callable[[Job], None] | None = None,
                 max_poll_s: float = 5.0) -> Job:
        """Poll a job until it succeeded (backing off from 0.1 s to `max_poll_s`) and return its last
        status; `on_progress(job)` on every change of state or bulk progress. Raises `JobFailed`, or
        `JobTimeout` after `timeout_s` (the job keeps running)."""
        wait = JobWait(job_id, timeout_s, on_progress, max_poll_s=max_poll_s)
        while not wait.finished(job := self._send(wait.call())):
            time.sleep(wait.delay())
        return job

    def rollback_model(self, model: str, request: RollbackRequest) -> TransitionAnswer:
        """Back to the previous production version (`twins`: the twins swapped back, and those refused). Without
        `from_version` or `expected_revision` it reads the production version first and names it as `from_version`,
        so resending after a lost answer goes back one version, never two (`client.model_calls.rollback_call`)."""
        production = self.model_lifecycle(model).production if needs_production(request) else None
        return self._send(rollback_call(model, request, production))

    def download_run_file(self, run_id: str, name: str, path: str | os.PathLike[str], verify: bool = True) -> Path:
        """Stream a run's output file (a name its record lists) to `path`, never whole in memory
        (`client.downloads`): checked against the SHA-256 its record holds as it comes (`CorruptDownload`, and no
        file written), then renamed into place at once. Resent like any read after a network error or a 429/503
        (the partial file dropped first). An answer without the SHA-256 header raises `MissingChecksum` unless
        `verify` is False (then the file is accepted unchecked). Returns the path."""
        return self._download(FileDownload(run_file_call(run_id, name, _nothing), download_target(path), RUN_FILE,
                                           verify))

    def download_job_file(self, job_id: str, name: str, path: str | os.PathLike[str], verify: bool = True) -> Path:
        """Stream a succeeded job's result file (a name `job_files` lists) to `path`, as `download_run_file` does a
        run's: checked against the SHA-256 the job recorded, renamed into place once whole. Returns the path. `Gone`
        once the job's files are no longer in the store (retention removed its run)."""
        return self._download(FileDownload(job_file_call(job_id, name, _nothing), download_target(path), JOB_FILE,
                                           verify))

    def _download(self, download: FileDownload) -> Path:
        """Stream `download`'s file to its target, checked, resent like a read (`client.downloads`)."""
        call = download.call
        for attempt in range(1, self.retry.attempts + 1):
            try:
                with self._http.stream(call.method, call.path, headers=dict(call.headers)) as r:
                    if r.is_error:
                        r.read()  # the problem's body, for the error `_resend_after` raises
                    delay = self._resend_after(call, attempt, r)
                    if delay is None:
                        with download.file(r) as out:
                            for chunk in r.iter_bytes(CHUNK_BYTES):
                                out.write(chunk)
                            return out.commit()
            except httpx.TransportError as exc:
                delay = self._resend_after(call, attempt, exc)
            assert delay is not None  # the last attempt returns or raises
            self._pause(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def query(self, q: str = "", sort: Sequence[str] = (), fields: Sequence[str] | None = None,
              page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every asset matching `q` (serve_apps/README.md, "Queries"), sorted by `sort`, with `fields`
        only, fetched `page_size` at a time following the server's cursor."""
        pager = QueryPager(q, sort, fields, page_size)
        while not pager.done:
            yield from pager.feed(self._send(pager.call()))

    def iter_jobs(self, state: str | None = None, page_size: int = 100) -> Iterator[Job]:
        """Every job of the tenant (of one `state` if given), newest first, `page_size` at a time following the
        server's `next_cursor` (`jobs` answers one page)."""
        return self._walk(job_pager(state, page_size))

    def iter_assets(self, type_name: str | None = None, type_version: str | None = None,
                    related_to: str | None = None, relationship: RelationshipKind | None = None,
                    page_size: int = 100) -> Iterator[Asset]:
        """Every asset of the tenant (filtered as by `list_assets`, which answers one page), in id order, `page_size`
        at a time following the server's `next_cursor`."""
        return self._walk(asset_pager(AssetFilter(type_name, type_version, related_to, relationship), page_size))

    def iter_asset_types(self, name: str | None = None, page_size: int = 100) -> Iterator[AssetType]:
        """Every asset type of the tenant (of one `name` if given), in `name@version` order, page after page."""
        return self._walk(asset_type_pager(name, page_size))

    def iter_commands(self, asset_id: str | None = None, page_size: int = 100) -> Iterator[Command]:
        """Every command of the tenant (of one asset if given), in id order, page after page (`commands`: one)."""
        return self._walk(command_pager(asset_id, page_size))

    def iter_connectors(self, page_size: int = 100) -> Iterator[ConnectorStatus]:
        """Every connector of the tenant with its status, in name order, page after page (`connectors`: one)."""
        return self._walk(connector_pager(page_size))

    def iter_connector_dead_letters(self, name: str, day: date | None = None,
                                    page_size: int = 100) -> Iterator[DeadLetter]:
        """Every dead letter of the connector (of one UTC day if given), newest first, page after page
        (`connector_dead_letters`: one)."""
        return self._walk(dead_letter_pager(name, day, page_size))

    def _walk(self, pager: CursorPager[Any, I]) -> Iterator[I]:
        while not pager.done:
            yield from pager.feed(self._send(pager.call()))

    def audit_records(self, day: date | None = None, page_size: int = 1000) -> Iterator[AuditRecord]:
        """Every audit record of the tenant (of one UTC day if given), newest first, `page_size` at a time following
        the server's cursor (`audit` answers only the newest `limit`, at most 10,000). Admin."""
        pager = AuditPager(day, page_size)
        while not pager.done:
            yield from pager.feed(self._send(pager.call()))

    def changes(self, after: int | str | None = None, asset_ids: tuple[str, ...] = (), type_name: str | None = None,
                kinds: tuple[str, ...] = ()) -> Iterator[Change]:
        """Follow the tenant's change stream (from `after`, 0: the beginning; None: now), forever,
        reconnecting with `Last-Event-ID` whenever the connection drops or the stream fell behind. `after` may be
        a saved `Change.event_id`: `Gone` (410) when the store was restored since and that change is gone."""
        sub = Subscription(after, asset_ids, type_name, kinds)
        while True:
            try:
                with self._http.stream(**sub.connection(self._http.timeout.connect)) as r:
                    if r.is_error:
                        r.read()  # a refusal's body (small), read before `refused` parses its error code
                    if sub.refused(r):
                        raise from_response(r)
                    if not r.is_error:
                        for line in r.iter_lines():
                            yield from sub.feed([line])
                            if sub.fell_behind:
                                break
            except httpx.TransportError:
                sub.dropped()
            if (delay := sub.reconnect_delay(self.retry)) is not None:
                self._pause(delay)
