"""Every ``/v1`` answer is its caller's alone: ``Cache-Control: private, no-cache`` and ``Vary: Authorization,
X-API-Key``.

The key picks the tenant (`serve_apps.auth`), so one URL answers each tenant its own (two tenants' ``pump-1``), yet
the answers said nothing about caching: a shared cache (a proxy, a CDN) may store a GET's 200 that has no
Cache-Control and answer it to other callers (RFC 9111, sections 3 and 4.2.2). It must not do so for a request with
``Authorization`` (3.5), but ``X-API-Key`` is no such header. `private`: no shared cache stores them; `no-cache`: a
client's own cache asks each time (a read with an ETag then answers 304 while it is current, `serve_apps.conditional`);
`Vary`: it never answers one key's request with another key's answer. A route that sets its own (the change stream's
``Cache-Control: no-cache``) keeps it. A ``/v1`` answer is one under any Serve route prefix too (`v1_route`).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PRIVATE = ((b"cache-control", b"private, no-cache"), (b"vary", b"Authorization, X-API-Key"))
"""The headers every ``/v1`` answer gets where its route set none of that name."""


def v1_route(scope: Scope) -> bool:
    """Whether `scope` asks a ``/v1`` route. Ray Serve mounts the app at its route prefix (`cluster.spec`'s
    ``serve.route_prefix``), and its ``path`` holds that prefix (its ``root_path``): ``/raytwin/v1/assets``, which a
    check of ``path`` alone took for no API answer, so behind a prefix every answer went without its headers."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root):] if root and path.startswith(f"{root}/") else path).startswith("/v1/")


class PrivateAnswers:
    """Pure ASGI middleware (as `serve_apps.api.RequestObserver`, for its cost): adds `PRIVATE` to ``/v1`` answers."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not v1_route(scope):
            await self.app(scope, receive, send)
            return

        async def private(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                message = {**message, "headers": headers + [h for h in PRIVATE if h[0] not in present]}
            await send(message)

        await self.app(scope, receive, private)
