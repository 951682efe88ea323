"""Deprecation of asset type versions and of the API version, announced in response headers.

`Deprecation` (RFC 9745: a structured-field date, ``@<unix seconds>``) says since when the resource
is deprecated; `Sunset` (RFC 8594: an HTTP-date) says when it may stop working; a `Link` with
``rel="deprecation"`` points at the migration guide when one is given. A type version's marks are
kept per tenant at ``{store}/deprecations/{tenant}/{name}@{version}.json`` by the one backend
replica (read once at start, written through); the API version's mark is configuration
(`ServeConfig.api_deprecation`), added to every ``/v1`` response by `ApiDeprecationHeaders`.
"""

from __future__ import annotations

import json
from datetime import datetime
from email.utils import format_datetime
from typing import Any

from pydantic import Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from raytwin.contracts import DateTime
from raytwin.fields import Contract
from raytwin.storage import canonical_json, filesystem


class Deprecation(Contract):
    """A deprecation mark: since when, until when it keeps working, where to read how to move on."""

    deprecated_at: DateTime = Field(description="Since when it is deprecated (RFC 3339)")
    sunset: DateTime | None = Field(None, description="When it may stop working (RFC 3339); none: not decided")
    link: str | None = Field(None, max_length=2000, pattern=r"^https?://\S+$",
                             description="A page on how to move off it (sent as Link: <...>; rel=\"deprecation\")")

    def headers(self) -> dict[str, str]:
        """The response headers that announce it."""
        out = {"Deprecation": f"@{int(self.deprecated_at.timestamp())}"}
        if self.sunset is not None:
            out["Sunset"] = http_date(self.sunset)
        if self.link is not None:
            out["Link"] = f'<{self.link}>; rel="deprecation"'
        return out


def http_date(ts: datetime) -> str:
    """An IMF-fixdate (RFC 9110), e.g. ``Thu, 31 Dec 2026 23:59:59 GMT``."""
    return format_datetime(ts, usegmt=True)


class TypeDeprecations:
    """The deprecation marks of a store's asset type versions, per tenant (one writer: the backend)."""

    def __init__(self, store_url: str, storage_options: dict[str, Any] | None = None):
        self.fs, root = filesystem(store_url, storage_options)
        self.root = f"{root}/deprecations"
        self.marks: dict[tuple[str, str], Deprecation] = {}  # (tenant, "name@version") -> mark
        if self.fs.exists(self.root):
            for path in self.fs.find(self.root):
                if path.endswith(".json"):
                    tenant, name = path[len(self.root) + 1:].split("/")[:2]
                    self.marks[(tenant, name.removesuffix(".json"))] = Deprecation.model_validate(
                        json.loads(self.fs.cat_file(path)))

    def _path(self, tenant: str, key: str) -> str:
        return f"{self.root}/{tenant}/{key}.json"

    def get(self, tenant: str, key: str) -> Deprecation | None:
        return self.marks.get((tenant, key))

    def put(self, tenant: str, key: str, mark: Deprecation) -> None:
        path = self._path(tenant, key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, canonical_json(mark.model_dump(mode="json")))
        self.marks[(tenant, key)] = mark

    def remove(self, tenant: str, key: str) -> bool:
        if (tenant, key) not in self.marks:
            return False
        self.fs.rm_file(self._path(tenant, key))
        del self.marks[(tenant, key)]
        return True


class ApiDeprecationHeaders:
    """Pure ASGI middleware: every ``/v1`` response carries the API version's deprecation headers
    while `ServeConfig.api_deprecation` is set (read from the app's services on each request)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = getattr(scope.get("app").state, "services", None) if scope["type"] == "http" else None
        mark = getattr(getattr(services, "config", None), "api_deprecation", None)
        if mark is None or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in mark.headers().items()]

        async def announce(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, announce)
