"""Routes for asset queries (`POST /v1/query`), graph walks (`GET /v1/assets/{id}/graph`) and bulk
operations by query (`POST /v1/bulk`, run as jobs: `serve_apps.bulk`).

Every query runs on the caller's tenant only: the backend's catalog pass reads that tenant's
assets, live state is read with the tenant in the shard call, and a cursor is bound to the
tenant (`raytwin.query_pages.fingerprint`). A malformed query, sort or field is a 422 whose
details give where: ``[{"in": "q", "position": 17, "reason": ...}]``; so is a state name that none of
the tenant's asset types has, checked in the backend's catalog pass (no call of its own):
``[{"in": "sort[0]", "field": "state.nope", "reason": ..., "known": ["T_in", "T_m"]}]``.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from raytwin.contracts import RelationshipKind
from raytwin.graph import Direction
from raytwin.query import (
    RELATIONSHIP_KINDS,
    Expr,
    QuerySyntaxError,
    Record,
    evaluate,
    live_fields,
    needs_state,
    parse,
    parse_field,
)
from raytwin.query_pages import (
    DEFAULT_FIELDS,
    WHOLE,
    InvalidCursor,
    SortKey,
    fingerprint,
    paginate,
    parse_fields,
    parse_sort,
)
from raytwin.query_pages import needs_state as shown_state
from raytwin.store_failures import store_io
from serve_apps.asset_queries import LiveStates
from serve_apps.auth import Principal, Role
from serve_apps.bulk import REPORT, Caller
from serve_apps.conditional import refuse_unevaluated
from serve_apps.deps import READER, SVC, WRITER_ROLE_IN_BODY, Services
from serve_apps.errors import CONFLICT, Conflict, Forbidden, NotFound, Unprocessable
from serve_apps.jobs import Job, JobRecord
from serve_apps.resend import resend_safe
from serve_apps.query_schemas import (
    MAX_BULK_ITEMS,
    MAX_GRAPH_DEPTH,
    AssetGraph,
    BulkAccepted,
    BulkReport,
    BulkRequest,
    QueryPage,
    QueryRequest,
)


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


async def _secret(request: Request, svc: Services) -> bytes:
    """The key that signs cursors (the backend's, fetched once per replica)."""
    state = request.app.state
    if getattr(state, "query_secret", None) is None:
        state.query_secret = await svc.backend.call("query_cursor_secret")
    return state.query_secret


def _state_reads(expr: Expr, keys: tuple[SortKey, ...], fields: tuple[str, ...]) -> list[tuple[str, str]]:
    """(where, field) of each `state.<name>`/`std.<name>` the query reads, for the backend to check
    against the tenant's asset types (`serve_apps.asset_queries.check_state_names`)."""
    return ([("q", f.path) for f in live_fields(expr)]
            + [(f"sort[{i}]", k.field.path) for i, k in enumerate(keys) if k.field.live]
            + [(f"fields[{i}]", spec) for i, spec in enumerate(fields) if spec not in WHOLE and parse_field(spec).live])


async def _matching(request: Request, svc: Services, tenant: str, expr: Expr, keys: tuple[SortKey, ...] = (),
                    fields: tuple[str, ...] = ()) -> list[Record]:
    """The tenant's assets matching `expr` (with their live state when it decides or is shown); 422 for a
    state name that none of the tenant's types has, checked in the catalog pass (no call of its own)."""
    state = request.app.state
    if getattr(state, "live_states", None) is None:
        state.live_states = LiveStates(svc.twins)
    found: list[Record] = await svc.backend.call("query_candidates", tenant, expr, _state_reads(expr, keys, fields))
    show_state = shown_state(keys, fields)
    if not (needs_state(expr) or show_state):
        return found
    states = await state.live_states.get(tenant, [r.id for r in found])
    records = [r.with_state(states.get(r.id)) for r in found]
    return [r for r in records if evaluate(expr, r)] if needs_state(expr) else records


def register(app: FastAPI) -> None:
    tags = ["queries"]

    @app.post("/v1/query", response_model=QueryPage, tags=tags, dependencies=[resend_safe("a query changes nothing")])
    async def query_assets(body: QueryRequest, request: Request, response: Response, who: Principal = READER,
                           svc: Services = SVC) -> QueryPage:
        """Filter, sort, project and page the caller's assets and their twins' live state
        (language and examples: serve_apps/README.md, "Queries"). Malformed `q`, `sort` or
        `fields`: 422 with the position in `details`; a `state.<name>`/`std.<name>` that none of your
        asset types has (or none of the types a top-level `type ==`/`type in` keeps to): 422 naming the
        known states; a cursor altered or from another query: 422.
        While a twin shard restarts, its twins' state is their last durable one: such items say
        `"stale": true` and the response has the header `RayTwin-Stale: true`."""
        expr, keys, fields = _checked(body)
        secret = await _secret(request, svc)
        records = await _matching(request, svc, who.tenant, expr, keys, fields)
        if any(r.stale for r in records):  # state that decided or sorted the query, shown or not
            response.headers["RayTwin-Stale"] = "true"
        try:
            page = paginate(records, keys, fields, body.limit, secret, fingerprint(who.tenant, body.q, body.sort),
                            body.cursor)
        except InvalidCursor as exc:
            raise Unprocessable(f"cursor: {exc}", details=[{"in": "cursor", "reason": str(exc)}]) from None
        return QueryPage(items=page.items, next_cursor=page.next_cursor, matched=page.matched)

    @app.post("/v1/bulk", response_model=BulkAccepted, status_code=202, tags=["jobs"])
    async def bulk(body: BulkRequest, request: Request, who: Principal = WRITER_ROLE_IN_BODY,
                   svc: Services = SVC) -> BulkAccepted:
        """Tag (writer), delete or re-register to another version of their type (admin) every asset the
        query matches now, as a job: poll `status_url` for progress, read each item's outcome at
        `report_url`. Every item is a conditional write, in the change log and in the audit log."""
        if body.action != "tag" and not who.allows(Role.admin):
            raise Forbidden(f"bulk {body.action} needs the admin role (like a single {body.action}); writers may tag")
        refuse_unevaluated(request)  # after the role, which depends on the body: a writer is not told what it evaluates
        if body.action == "tag" and not (body.set or body.unset):
            raise Unprocessable("tag: give metadata keys to `set` and/or `unset`")
        if body.action == "tag" and (both := sorted(body.set.keys() & set(body.unset))):
            raise Unprocessable(f"tag: {both} in both `set` and `unset`; a key is either set or removed: "
                                "keep each key in one of them", details=[{"in_set_and_unset": both}])
        if body.action == "retype" and body.type_version is None:
            raise Unprocessable("retype: give the `type_version` to move the assets to")
        expr, _, _ = _checked(QueryRequest(q=body.q))
        matched = await _matching(request, svc, who.tenant, expr)
        ids = sorted(r.id for r in matched)
        if len(ids) > MAX_BULK_ITEMS:
            raise Unprocessable(f"the query matches {len(ids)} assets, more than {MAX_BULK_ITEMS} per bulk job: "
                                "narrow it (e.g. by metadata) and submit several jobs")
        if body.action == "retype":  # a version that does not exist: 422 now, as for one asset, not a failed job
            await svc.backend.call("evolution", "require_version", who.tenant, sorted({r.type for r in matched}),
                                   body.type_version)
        caller = Caller(who.tenant, who.key_id, who.role, getattr(request.state, "request_id", None))
        job_id = uuid.uuid4().hex  # named before it exists, for its intent to be audited first
        async with svc.audited(request, who, "bulk.submit", job_id, q=body.q, operation=body.action, items=len(ids),
                               set=body.set, unset=body.unset, type_version=body.type_version):
            job: Job = await svc.backend.call("submit_bulk", caller, body, ids, job_id)
        return BulkAccepted(job_id=job.job_id, state=job.state, total=len(ids), status_url=f"/v1/jobs/{job.job_id}",
                            report_url=f"/v1/jobs/{job.job_id}/report")

    @app.get("/v1/jobs/{job_id}/report", response_model=BulkReport, tags=["jobs"], responses=CONFLICT)
    async def bulk_report(job_id: str, who: Principal = READER, svc: Services = SVC) -> Any:
        """The outcome of each item of a bulk job that succeeded (409 before; a failed job has none)."""
        job: JobRecord = await svc.backend.call("get_job", who.tenant, job_id)
        if job.kind != "bulk":
            raise NotFound(f"job {job_id} is a {job.kind} job: it has no bulk report")
        if job.state == "failed":
            raise Conflict(f"job {job_id} failed: {job.error}; a failed job has no report (`bulk` in "
                           f"GET /v1/jobs/{job_id} counts the items done before it failed)")
        if job.state != "succeeded":
            raise Conflict(f"job {job_id} is {job.state}; its report is there once it succeeded: poll "
                           f"GET /v1/jobs/{job_id}")
        path = svc.config.url("jobs", who.tenant, job_id, REPORT)
        return BulkReport.model_validate_json(await run_in_threadpool(store_io("read")(svc.fs.cat_file), path))

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
