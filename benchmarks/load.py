"""Bounded open-loop load generation: a fixed offered rate for a fixed time, then it stops.

Request i is due at ``t0 + i / rate`` whatever happened to earlier ones, and its latency is
measured from that due time, so a server that falls behind shows its queueing delay instead of
silently slowing the client down (no "coordinated omission"). Requests still unsent when the
deadline (by default twice the duration plus 5 s) passes are counted as `unsent`: an overloaded
server cannot stretch a run indefinitely.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LoadResult:
    offered_per_s: float
    sent: int
    unsent: int
    ok: int
    failed: int
    elapsed_s: float
    latencies_s: np.ndarray  # of the successful requests, from their due time

    @property
    def achieved_per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.latencies_s.size else float("nan")

    @classmethod
    def combine(cls, runs: list[LoadResult]) -> LoadResult:
        """Repeated runs at the same offered rate as one: counts add up, latencies pool."""
        if not runs or len({r.offered_per_s for r in runs}) != 1:
            raise ValueError("combine needs one or more runs at the same offered rate")
        return cls(runs[0].offered_per_s, sum(r.sent for r in runs), sum(r.unsent for r in runs),
                   sum(r.ok for r in runs), sum(r.failed for r in runs), sum(r.elapsed_s for r in runs),
                   np.concatenate([r.latencies_s for r in runs]))

    def summary(self) -> dict[str, float]:
        return {"offered_per_s": self.offered_per_s, "achieved_per_s": self.achieved_per_s, "sent": self.sent,
                "unsent": self.unsent, "ok": self.ok, "failed": self.failed, "elapsed_s": self.elapsed_s,
                **{f"p{q}_ms": self.percentile_ms(q) for q in (50, 95, 99)}}


def _deadline(duration_s: float, deadline_s: float | None) -> float:
    return 2.0 * duration_s + 5.0 if deadline_s is None else deadline_s


def paced_sync(rate_per_s: float, duration_s: float, call: Callable[[int], bool], *,
               deadline_s: float | None = None) -> LoadResult:
    """Run `call(i)` (True on success) at `rate_per_s` for `duration_s`, one at a time."""
    n = max(1, round(rate_per_s * duration_s))
    latencies, failed, sent = [], 0, 0
    t0 = time.perf_counter()
    stop = t0 + _deadline(duration_s, deadline_s)
    for i in range(n):
        if time.perf_counter() > stop:
            break
        sent += 1
        due = t0 + i / rate_per_s
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if call(i):
            latencies.append(time.perf_counter() - due)
        else:
            failed += 1
    return LoadResult(rate_per_s, sent, n - sent, len(latencies), failed, time.perf_counter() - t0,
                      np.asarray(latencies))


async def paced_async(rate_per_s: float, duration_s: float, call: Callable[[int], Awaitable[bool]], *,
                      max_in_flight: int = 256, timeout_s: float = 5.0, deadline_s: float | None = None) -> LoadResult:
    """Issue `call(i)` at `rate_per_s` for `duration_s`, concurrently (at most `max_in_flight`)."""
    n = max(1, round(rate_per_s * duration_s))
    gate = asyncio.Semaphore(max_in_flight)
    latencies: list[float] = []
    failed = 0
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stop = t0 + _deadline(duration_s, deadline_s)

    async def one(i: int, due: float) -> None:
        nonlocal failed
        async with gate:
            try:
                ok = await asyncio.wait_for(call(i), timeout_s)
            except (TimeoutError, OSError):
                ok = False
        if ok:
            latencies.append(loop.time() - due)
        else:
            failed += 1

    tasks = []
    for i in range(n):
        due = t0 + i / rate_per_s
        await asyncio.sleep(max(0.0, due - loop.time()))
        if loop.time() > stop:
            break
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    return LoadResult(rate_per_s, len(tasks), n - len(tasks), len(latencies), failed, loop.time() - t0,
                      np.asarray(latencies))


class HttpError(OSError):
    """The server's answer was not a well-formed HTTP/1.1 response this client can read."""


class KeepAliveClient:
    """A lean HTTP/1.1 GET client: a bounded pool of keep-alive connections to one host.

    Why not httpx: the load generator shares the server's cores, and httpx's per-request Python
    cost (~0.5 ms) is of the same order as the server's. Here a request is one pre-built header
    write and a ``Content-Length`` read (or a chunked one: Serve's proxy sends its own backpressure
    503s chunked). A request that fails or is cancelled closes its connection, so a late answer can
    never be read as the next request's.
    """

    def __init__(self, host: str, port: int, headers: dict[str, str], max_connections: int = 64):
        self.host, self.port = host, port
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of ``GET path``."""
        status, body, _ = await self.get_with_headers(path)
        return status, body

    async def get_with_headers(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, header fields by lower-case name) of ``GET path``."""
        async with self._slots:
            reader, writer = self._idle.pop() if self._idle else await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\n{self._headers}\r\n".encode("latin-1"))
                status, fields = _parse_head(await reader.readuntil(b"\r\n\r\n"))
                keep = fields.get("connection", "").lower() != "close"
                if "content-length" in fields:
                    body = await reader.readexactly(int(fields["content-length"]))
                else:
                    body = await _read_chunked(reader)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                writer.close()
                raise HttpError(f"connection closed or response too large: {exc}") from None
            except BaseException:
                writer.close()
                raise
            if keep:
                self._idle.append((reader, writer))
            else:
                writer.close()
            return status, body, fields

    async def close(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()
            await writer.wait_closed()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A ``Transfer-Encoding: chunked`` body (what Serve's proxy sends for its own backpressure 503s)."""
    parts = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, then the blank line
        pass
    return b"".join(parts)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """(status, header fields by lower-case name) of a response head with a numeric ``content-length``
    or chunked transfer encoding."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"malformed status line {lines[0]!r}")
    fields = {}
    for line in filter(None, lines[1:]):
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    chunked = fields.get("transfer-encoding", "").lower() == "chunked"
    if not chunked and not fields.get("content-length", "").isdigit():
        raise HttpError(f"response without a Content-Length (transfer-encoding {fields.get('transfer-encoding')!r})")
    return int(parts[1]), fields
