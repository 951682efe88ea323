"""The blocking client: `RayTwinClient(url, api_key)`."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from client.calls import Call, Endpoints, T
from client.errors import RayTwinError, from_response, retry_after_s
from client.pages import QueryPager
from client.retry import RETRY_STATUSES, RetryPolicy
from client.subscription import STREAM_READ_TIMEOUT_S, Subscription
from serve_apps.changes import Change


class RayTwinClient(Endpoints):
    """The RayTwin HTTP API. Retries 429/503 (honouring `Retry-After`) and, for requests that are safe
    to resend, network errors; raises `client.errors` exceptions for the API's errors."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0, retry: RetryPolicy = RetryPolicy(),
                 transport: httpx.BaseTransport | None = None):
        self.retry = retry
        self.retries = 0  # requests resent so far (observability)
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {api_key}"})

    def __enter__(self) -> RayTwinClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call[T]) -> T:
        for attempt in range(1, self.retry.attempts + 1):
            last = attempt == self.retry.attempts
            try:
                r = self._http.request(call.method, call.path, params=call.params, json=call.json,
                                       headers=dict(call.headers))
            except httpx.TransportError as exc:
                if last or not call.idempotent:
                    raise RayTwinError(f"{call.method} {call.path}: {exc!r}") from exc
                self._wait(attempt, None)
                continue
            if r.status_code in RETRY_STATUSES and not last:
                self._wait(attempt, retry_after_s(r))
                continue
            if r.is_error:
                raise from_response(r)
            return call.parse(r)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _wait(self, attempt: int, retry_after: float | None) -> None:
        self.retries += 1
        time.sleep(self.retry.delay(attempt, retry_after))

    def query(self, q: str = "", sort: Sequence[str] = (), fields: Sequence[str] | None = None,
              page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every asset matching `q` (serve_apps/README.md, "Queries"), sorted by `sort`, with `fields`
        only, fetched `page_size` at a time following the server's cursor."""
        pager = QueryPager(q, sort, fields, page_size)
        while not pager.done:
            yield from pager.feed(self._send(pager.call()))

    def changes(self, after: int | None = None, asset_ids: tuple[str, ...] = (), type_name: str | None = None,
                kinds: tuple[str, ...] = ()) -> Iterator[Change]:
        """Follow the tenant's change stream (from `after`, 0: the beginning; None: now), forever,
        reconnecting with `Last-Event-ID` whenever the connection drops or the stream fell behind."""
        sub = Subscription(after, tuple(asset_ids), type_name, tuple(kinds))
        failures = 0
        while True:
            params, headers = sub.request()
            try:
                with self._http.stream("GET", "/v1/changes", params=params, headers=headers,
                                       timeout=httpx.Timeout(self._http.timeout.connect,
                                                             read=STREAM_READ_TIMEOUT_S)) as r:
                    if r.is_error and r.status_code not in RETRY_STATUSES:
                        r.read()
                        raise from_response(r)
                    wait = retry_after_s(r) if r.is_error else None
                    if not r.is_error:
                        for line in r.iter_lines():
                            failures = 0
                            yield from sub.feed([line])
                            if sub.fell_behind:
                                break
            except httpx.TransportError:
                wait = None
            if sub.fell_behind:  # resume from the store at once
                continue
            failures += 1
            if failures >= self.retry.attempts:
                raise RayTwinError(f"change stream: {failures} reconnections failed in a row")
            self._wait(failures, wait)
