"""`JsonRoute`: the route class of every API route (the app's and the routers' alike)."""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.routing import APIRoute

from serve_apps.conditional import unevaluated_conditions
from serve_apps.errors import ApiError, TooDeeplyNested, Unprocessable, UnsupportedMediaType

MAX_JSON_DEPTH = 200
"""Nesting levels a JSON body may have: pydantic-core's parser refuses deeper documents (a fixed
limit of its own, pinned by tests/test_serve_api.py); RayTwin's bodies need fewer than 10."""


class JsonRoute(APIRoute):
    """A route whose JSON body is parsed once, and whose body errors are answered after authentication.

    FastAPI parses a body before it runs the route's dependencies, so a malformed body got 422
    before the credentials were looked at, telling an anonymous caller about the schema. Here a
    body that is not declared JSON (415 `unsupported_media_type`), nests deeper than
    `MAX_JSON_DEPTH` (400 `too_deeply_nested`) or is malformed (422 `invalid_request`) is handed
    on as *no* body, its error kept in ``request.state.body_error``: the dependencies
    (credentials, rate limit, role) run first and may answer 401/429/403; otherwise the missing
    (required) body fails validation and the validation handler answers with the kept error.
    A good body is parsed once, by pydantic-core (faster than `json.loads`, refuses NaN and
    Infinity, bounded recursion), and FastAPI gets the parsed value.

    A route's preconditions that it does not evaluate (`If-Match`, `If-None-Match`, `If-Unmodified-Since`: those it
    declares no header parameter for; a read that answers an ETag evaluates the first two, `CONDITIONAL_READ`) are
    kept as `unevaluated`; a request carrying one answers 412 once its key, rate limit and role passed
    (`serve_apps.conditional.refuse_unevaluated`, called by `serve_apps.deps.require`), before the body is checked
    and anything runs, so no route, new ones included, ignores a condition its client believes holds.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **options: Any) -> None:
        super().__init__(path, endpoint, **options)
        self.unevaluated = unevaluated_conditions(self.dependant)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def parse_then_handle(request: Request) -> Response:
            return await handler(await _parsed(request))

        return parse_then_handle


class _ParsedRequest(Request):
    """A request whose body was read and parsed already (FastAPI asks for both)."""

    def __init__(self, request: Request, body: bytes, value: Any):
        super().__init__(request.scope, request.receive)
        self._raw, self._value = body, value

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._value


async def _parsed(request: Request) -> Request:
    body = await request.body()
    if not body:
        return request  # FastAPI reports a missing required body, after the dependencies
    content_type = request.headers.get("content-type", "")
    error: ApiError
    if not _is_json(content_type):
        error = UnsupportedMediaType(f"the body must be JSON sent with `Content-Type: application/json` "
                                     f"(got {content_type or 'no Content-Type'!r})")
    else:
        try:
            return _ParsedRequest(request, body, pydantic_core.from_json(body, allow_inf_nan=False))
        except ValueError as exc:
            if "recursion limit" in str(exc):
                error = TooDeeplyNested(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels",
                                        details=[{"max_depth": MAX_JSON_DEPTH}])
            else:
                problem = (f"NaN and Infinity are not JSON numbers and must not be sent ({exc}); send finite "
                           "numbers only (Python's json.dumps writes them unless allow_nan=False)"
                           if _non_finite_literal(body, str(exc)) else f"malformed JSON: {exc}")
                error = Unprocessable(f"<body>: {problem}", details=[
                    {"loc": ["body"], "msg": f"JSON decode error: {exc}", "type": "json_invalid"}])
    request.state.body_error = error
    return _ParsedRequest(request, b"", None)


_ERROR_AT = re.compile(r"at line (?P<line>\d+) column (?P<column>\d+)$")
"""Where pydantic-core's JSON parser reports an error."""


def _non_finite_literal(body: bytes, error: str) -> bool:
    """Whether the parser stopped at a ``NaN``, ``Infinity`` or ``-Infinity`` literal: some encoders write
    them for non-finite floats (Python's `json` does by default), and "expected value" does not say so."""
    where = _ERROR_AT.search(error)
    if where is None:
        return False
    line, column = int(where["line"]), int(where["column"])  # 1-based; columns count bytes
    lines = body.split(b"\n")
    return line <= len(lines) and lines[line - 1][column - 1:].startswith((b"NaN", b"Infinity"))


def _is_json(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json``, with any parameters (charset)."""
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
