"""An in-process ASGI app served over real HTTP, for the `raytwin` commands that call the API."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from raytwin.ports import free_port
from tests.fixtures_connectors import wait_for


@contextmanager
def served(app) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the API listens")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
