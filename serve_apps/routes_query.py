"""Routes for asset queries (`POST /v1/query`) and graph walks (`GET /v1/assets/{id}/graph`).

Every query runs on the caller's tenant only: the backend's catalog pass reads that tenant's
assets, live state is read with the tenant in the shard call, and a cursor is bound to the
tenant (`raytwin.query_pages.fingerprint`). A malformed query, sort or field is a 422 whose
details give where: ``[{"in": "q", "position": 17, "reason": ...}]``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Query, Request

from raytwin.contracts import Asset, RelationshipKind
from raytwin.graph import Direction
from raytwin.query import RELATIONSHIP_KINDS, Expr, QuerySyntaxError, Record, evaluate, needs_state, parse
from raytwin.query_pages import (
    DEFAULT_FIELDS,
    InvalidCursor,
    SortKey,
    fingerprint,
    paginate,
    parse_fields,
    parse_sort,
)
from raytwin.query_pages import needs_state as shown_state
from serve_apps.asset_queries import LiveStates
from serve_apps.auth import Principal
from serve_apps.deps import READER, SVC, Services
from serve_apps.errors import Unprocessable
from serve_apps.query_schemas import MAX_GRAPH_DEPTH, AssetGraph, QueryPage, QueryRequest


def _checked(body: QueryRequest) -> tuple[Expr, tuple[SortKey, ...], tuple[str, ...]]:
    """The parsed query, sort and projection; 422 naming the part and the character position."""
    part, index = "q", None
    try:
        expr = parse(body.q)
        part = "sort"
        for index, spec in enumerate(body.sort):
            parse_sort([spec])
        part = "fields"
        for index, spec in enumerate(body.fields or ()):
            parse_fields([spec])
    except QuerySyntaxError as exc:
        where = part if index is None else f"{part}[{index}]"
        raise Unprocessable(f"{where}: {exc}", details=[{"in": where, "position": exc.position,
                                                         "reason": exc.reason}]) from None
    return expr, parse_sort(body.sort), tuple(body.fields) if body.fields is not None else DEFAULT_FIELDS


async def _context(request: Request, svc: Services) -> tuple[bytes, LiveStates]:
    """The cursor key (the backend's, fetched once) and this replica's bulk state reader."""
    state = request.app.state
    if getattr(state, "query_secret", None) is None:
        state.query_secret = await svc.backend.call("query_cursor_secret")
        state.live_states = LiveStates(svc.twins)
    return state.query_secret, state.live_states


def register(app: FastAPI) -> None:
    tags = ["queries"]

    @app.post("/v1/query", response_model=QueryPage, tags=tags)
    async def query_assets(body: QueryRequest, request: Request, who: Principal = READER,
                           svc: Services = SVC) -> QueryPage:
        """Filter, sort, project and page the caller's assets and their twins' live state
        (language and examples: serve_apps/README.md, "Queries"). Malformed `q`, `sort` or
        `fields`: 422 with the position in `details`; a cursor altered or from another query: 422."""
        expr, keys, fields = _checked(body)
        secret, live_states = await _context(request, svc)
        found: list[Asset] = await svc.backend.call("query_candidates", who.tenant, expr)
        live = needs_state(expr) or shown_state(keys, fields)
        states = await live_states.get(who.tenant, [a.id for a in found]) if live else {}
        records = [Record.of(a, states.get(a.id)) for a in found]
        if needs_state(expr):
            records = [r for r in records if evaluate(expr, r)]
        try:
            page = paginate(records, keys, fields, body.limit, secret, fingerprint(who.tenant, body.q, body.sort),
                            body.cursor)
        except InvalidCursor as exc:
            raise Unprocessable(f"cursor: {exc}", details=[{"in": "cursor", "reason": str(exc)}]) from None
        return QueryPage(items=page.items, next_cursor=page.next_cursor, matched=page.matched)

    @app.get("/v1/assets/{asset_id}/graph", response_model=AssetGraph, tags=["assets"])
    async def asset_graph(
        asset_id: str, direction: Direction = "descendants",
        kind: Annotated[list[RelationshipKind] | None, Query(description="Follow only these relationship "
                                                                         "kinds (repeat it); default: all")] = None,
        depth: Annotated[int, Query(ge=1, le=MAX_GRAPH_DEPTH, description="Steps from the asset at most")] = 8,
        who: Principal = READER, svc: Services = SVC,
    ) -> AssetGraph:
        """Assets reachable from this one along relationships, each once at its shortest depth with
        one shortest path: `descendants` follow `contains`/`feeds` to their targets and `part_of` to
        its source; `ancestors` the other way. Cycles are safe; `truncated` says `depth` cut the walk."""
        return await svc.backend.call("asset_graph", who.tenant, asset_id, direction,
                                      list(kind or RELATIONSHIP_KINDS), depth)
