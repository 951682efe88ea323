"""The asyncio client: `AsyncRayTwinClient(url, api_key)`; the same operations as `RayTwinClient`, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from client.calls import Call, Endpoints, T
from client.errors import RayTwinError, from_response, retry_after_s
from client.pages import QueryPager
from client.retry import RETRY_STATUSES, RetryPolicy
from client.subscription import STREAM_READ_TIMEOUT_S, Subscription
from serve_apps.changes import Change


class AsyncRayTwinClient(Endpoints):
    """Every operation returns an awaitable; retries and errors as in `RayTwinClient`."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0, retry: RetryPolicy = RetryPolicy(),
                 transport: httpx.AsyncBaseTransport | None = None):
        self.retry = retry
        self.retries = 0
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport,
                                       headers={"Authorization": f"Bearer {api_key}"})

    async def __aenter__(self) -> AsyncRayTwinClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call[T]) -> T:
        for attempt in range(1, self.retry.attempts + 1):
            last = attempt == self.retry.attempts
            try:
                r = await self._http.request(call.method, call.path, params=call.params, json=call.json,
                                             headers=dict(call.headers))
            except httpx.TransportError as exc:
                if last or not call.idempotent:
                    raise RayTwinError(f"{call.method} {call.path}: {exc!r}") from exc
                await self._wait(attempt, None)
                continue
            if r.status_code in RETRY_STATUSES and not last:
                await self._wait(attempt, retry_after_s(r))
                continue
            if r.is_error:
                raise from_response(r)
            return call.parse(r)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _wait(self, attempt: int, retry_after: float | None) -> None:
        self.retries += 1
        await asyncio.sleep(self.retry.delay(attempt, retry_after))

    async def query(self, q: str = "", sort: Sequence[str] = (), fields: Sequence[str] | None = None,
                    page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """Every asset matching `q`, page after page (see `RayTwinClient.query`)."""
        pager = QueryPager(q, sort, fields, page_size)
        while not pager.done:
            for item in pager.feed(await self._send(pager.call())):
                yield item

    async def changes(self, after: int | None = None, asset_ids: tuple[str, ...] = (), type_name: str | None = None,
                      kinds: tuple[str, ...] = ()) -> AsyncIterator[Change]:
        """Follow the tenant's change stream, reconnecting with `Last-Event-ID` (see `RayTwinClient.changes`)."""
        sub = Subscription(after, tuple(asset_ids), type_name, tuple(kinds))
        failures = 0
        while True:
            params, headers = sub.request()
            try:
                async with self._http.stream("GET", "/v1/changes", params=params, headers=headers,
                                             timeout=httpx.Timeout(self._http.timeout.connect,
                                                                   read=STREAM_READ_TIMEOUT_S)) as r:
                    if r.is_error and r.status_code not in RETRY_STATUSES:
                        await r.aread()
                        raise from_response(r)
                    wait = retry_after_s(r) if r.is_error else None
                    if not r.is_error:
                        async for line in r.aiter_lines():
                            failures = 0
                            for change in sub.feed([line]):
                                yield change
                            if sub.fell_behind:
                                break
            except httpx.TransportError:
                wait = None
            if sub.fell_behind:  # resume from the store at once
                continue
            failures += 1
            if failures >= self.retry.attempts:
                raise RayTwinError(f"change stream: {failures} reconnections failed in a row")
            await self._wait(failures, wait)
