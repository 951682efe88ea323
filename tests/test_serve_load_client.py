"""The serve benchmark's load generator: the keep-alive HTTP client and combined load results."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from benchmarks.load import HttpError, KeepAliveClient, LoadResult


async def _serve(handler) -> tuple[asyncio.AbstractServer, int, list[int]]:
    """A loopback HTTP/1.1 server answering each request head with `handler(path)` bytes."""
    connections: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1].decode()
                assert b"authorization: bearer k" in head.lower()
                writer.write(handler(path))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


def _response(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_client_reuses_connections_and_reads_each_body():
    async def run():
        server, port, connections = await _serve(lambda path: _response(path.encode()))
        client = KeepAliveClient("127.0.0.1", port, {"Authorization": "Bearer k"}, max_connections=2)
        answers = [await client.get(f"/seq/{i}") for i in range(5)]
        answers += await asyncio.gather(*(client.get(f"/par/{i}") for i in range(6)))
        await client.close()
        server.close()
        return answers, len(connections)

    answers, opened = asyncio.run(run())
    assert [a[1] for a in answers] == [f"/seq/{i}".encode() for i in range(5)] + [f"/par/{i}".encode() for i in range(6)]
    assert {a[0] for a in answers} == {200}
    assert opened == 2  # never more than max_connections, reused across requests


def test_client_honours_connection_close_reads_chunked_bodies_and_refuses_unframed_ones():
    async def run():
        closing, port, connections = await _serve(lambda path: _response(b"{}", "connection: close\r\n"))
        client = KeepAliveClient("127.0.0.1", port, {"Authorization": "Bearer k"})
        assert [await client.get("/") for _ in range(3)] == [(200, b"{}")] * 3
        closing.close()
        chunked, port2, _ = await _serve(lambda path: b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n"
                                         b"retry-after: 1\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n")
        client = KeepAliveClient("127.0.0.1", port2, {"Authorization": "Bearer k"})
        for _ in range(2):  # the connection is reused after a chunked body
            assert await client.get_with_headers("/") == (503, b"hello, world", {
                "transfer-encoding": "chunked", "retry-after": "1"})
        chunked.close()
        unframed, port3, _ = await _serve(lambda path: b"HTTP/1.1 200 OK\r\nx: y\r\n\r\nbody")
        with pytest.raises(HttpError, match="Content-Length"):
            await KeepAliveClient("127.0.0.1", port3, {"Authorization": "Bearer k"}).get("/")
        unframed.close()
        return len(connections)

    assert asyncio.run(run()) == 3  # a new connection after every "connection: close"


def test_load_results_combine_counts_and_latencies():
    a = LoadResult(100.0, 10, 0, 9, 1, 0.1, np.full(9, 0.002))
    b = LoadResult(100.0, 10, 2, 8, 0, 0.12, np.full(8, 0.004))
    both = LoadResult.combine([a, b])
    assert (both.sent, both.unsent, both.ok, both.failed) == (20, 2, 17, 1)
    assert both.latencies_s.size == 17 and both.achieved_per_s == pytest.approx(17 / 0.22)
    with pytest.raises(ValueError, match="same offered rate"):
        LoadResult.combine([a, LoadResult(50.0, 1, 0, 1, 0, 0.1, np.zeros(1))])
