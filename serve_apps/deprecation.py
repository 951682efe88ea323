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
import logging
from datetime import datetime
from email.utils import format_datetime
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from raytwin.contracts import DateTime, describe_error
from raytwin.fields import Contract
from raytwin.storage import canonical_json, filesystem, replace_file
from raytwin.store_failures import store_io
from serve_apps.private_answers import v1_route

log = logging.getLogger("raytwin.serve.deprecation")

LINK_DELIMITERS = '<>";,'
"""Characters that end a URL in a ``Link`` header or start another parameter or link there."""


class Deprecation(Contract):
    """A deprecation mark: since when, until when it keeps working, where to read how to move on."""

    deprecated_at: DateTime = Field(description="Since when it is deprecated (RFC 3339)")
    sunset: DateTime | None = Field(None, description="When it may stop working (RFC 3339, not before "
                                    "deprecated_at); none: not decided")
    link: str | None = Field(None, max_length=2000, pattern=r"^https?://.+",
                             description="A page on how to move off it (sent as Link: <...>; rel=\"deprecation\"): "
                             "printable ASCII without spaces or any of <>\";, (percent-encode them)")

    @field_validator("link")
    @classmethod
    def _one_plain_url(cls, link: str | None) -> str | None:
        """The link is sent as is inside ``Link: <...>; rel="deprecation"``: a delimiter there would let the
        admin's text add parameters or other links, and a non-ASCII character cannot be sent in a header."""
        bad = sorted({c for c in link or "" if c in LINK_DELIMITERS or not "!" <= c <= "~"})
        if bad:
            raise ValueError(f"characters not allowed in link: {' '.join(map(repr, bad))} (whitespace, control and "
                             f"non-ASCII characters and {LINK_DELIMITERS} would end the URL or add parameters or "
                             "links to the Link header); percent-encode them, e.g. a space as %20, ',' as %2C")
        return link

    @model_validator(mode="after")
    def _sunset_not_before_deprecation(self) -> Deprecation:
        if self.sunset is not None and self.sunset < self.deprecated_at:
            raise ValueError(f"sunset {self.sunset.isoformat()} is before deprecated_at "
                             f"{self.deprecated_at.isoformat()}: a version stops working only after it was "
                             "deprecated; give a later sunset, or none while it is not decided")
        return self

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
        self._load()

    @store_io("read")
    def _load(self) -> None:
        if self.fs.exists(self.root):
            for path in self.fs.find(self.root):
                if path.endswith(".json"):
                    tenant, name = path[len(self.root) + 1:].split("/")[:2]
                    try:
                        mark = Deprecation.model_validate(json.loads(self.fs.cat_file(path)))
                    except ValidationError as exc:  # stored before the checks it now fails: one must not stop the rest
                        log.error("event=deprecation_skipped path=%s error=%s; PUT the type version's deprecation "
                                  "again", path, describe_error(exc))
                        continue
                    self.marks[(tenant, name.removesuffix(".json"))] = mark

    def _path(self, tenant: str, key: str) -> str:
        return f"{self.root}/{tenant}/{key}.json"

    def get(self, tenant: str, key: str) -> Deprecation | None:
        return self.marks.get((tenant, key))

    def put(self, tenant: str, key: str, mark: Deprecation) -> None:
        path = self._path(tenant, key)
        replace_file(self.fs, path, canonical_json(mark.model_dump(mode="json")))
        self.marks[(tenant, key)] = mark

    @store_io("write")
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
        if mark is None or not v1_route(scope):
            await self.app(scope, receive, send)
            return
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in mark.headers().items()]

        async def announce(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, announce)
