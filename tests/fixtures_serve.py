"""The RayTwin application on the shared Serve proxy (the `serve_proxy` fixture of `tests/conftest.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def deployed(config: dict[str, Any], name: str = "raytwin") -> Iterator[None]:
    """The application built from `config` (`ServeConfig` fields) at route ``/`` of the shared proxy, deleted
    at the end, also when a module's set-up fails half-way (the next module deploys at ``/`` too)."""
    from ray import serve

    from serve_apps.app import build_app

    try:
        serve.run(build_app(config), name=name, route_prefix="/")
        yield
    finally:
        serve.delete(name)
