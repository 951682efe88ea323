"""Per-request dependencies: the replica's services, authentication, rate limit and role checks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Annotated, Any

import ray
from fastapi import Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from fsspec import AbstractFileSystem
from starlette.concurrency import run_in_threadpool

from raytwin.contracts import IDENTIFIER_PATTERN
from serve_apps.audit import AuditLog, AuditRecord
from serve_apps.audit_steps import audited
from serve_apps.auth import BEARER_CHALLENGE, SEND_A_KEY, KeyStore, Principal, Role, digest, parse_credentials
from serve_apps.change_stream import HeadWatcher
from serve_apps.changes import ChangeStore
from serve_apps.conditional import refuse_unevaluated
from serve_apps.config import ServeConfig
from serve_apps.errors import (ApiError, BackendUnavailable, Forbidden, RateLimited, Unauthorized, Unprocessable,
                               error_response, unwrap)
from serve_apps.limits import TokenBuckets
from serve_apps.refused_credentials import CredentialRefusals
from serve_apps.request_log import PRINCIPAL
from serve_apps.store_errors import StoreUnavailable
from serve_apps.stream_auth import StreamCredential
from serve_apps.stream_slots import StreamSlots
from serve_apps.twin_reads import TwinReader

log = logging.getLogger("raytwin.serve")


class BackendClient:
    """Calls into the `Backend` deployment: ``await backend.call("get_asset", tenant, id)``.

    Errors raised there (`ApiError`s) come back wrapped by Ray; they are re-raised unwrapped so
    the error handlers see the original status and message. The backend replica itself dying meanwhile
    is 503 `BackendUnavailable` on every route (a 500 would say the request is at fault).
    """

    def __init__(self, handle: Any):
        self.handle = handle

    async def call(self, method: str, *args: Any, lost: str | None = None) -> Any:
        """The backend's `method(*args)`; `lost`: what the client should know, should the replica die meanwhile,
        about whether its request took effect and may be resent (default: by the request, `resend.advice`)."""
        try:
            return await getattr(self.handle, method).remote(*args)
        except Exception as exc:
            if replica_died(exc):
                raise BackendUnavailable(type(exc).__name__, lost) from None
            raise unwrap(exc) from None


def replica_died(exc: BaseException) -> bool:
    """Whether a backend call's `exc` is the replica's own death (`ActorDiedError`, `ActorUnavailableError`),
    not an actor that the backend called dying (that one arrives wrapped in a `RayTaskError`)."""
    return isinstance(exc, ray.exceptions.RayActorError) and not isinstance(exc, ray.exceptions.RayTaskError)


@dataclass
class Services:
    config: ServeConfig
    keys: KeyStore
    backend: BackendClient
    audit: AuditLog
    buckets: TokenBuckets
    fs: AbstractFileSystem  # the store (job results)
    twins: TwinReader  # state reads straight from the twin shards
    changes: HeadWatcher  # wakes this replica's change streams
    change_store: ChangeStore  # the change log on the store, for streams replaying history
    streams: StreamSlots = field(init=False)  # this replica's open change streams
    refusals: CredentialRefusals = field(default_factory=CredentialRefusals)  # 401s, for the operator

    def __post_init__(self) -> None:
        self.streams = StreamSlots(self.config.admission)

    async def record(self, request: Request, who: Principal, action: str, target: str, **details: Any) -> None:
        """Append an audit record of one step (blocking store I/O runs off the event loop)."""
        await run_in_threadpool(self.audit.append, _record(request, who, action, target, details))

    @asynccontextmanager
    async def audited(self, request: Request, who: Principal, action: str, target: str,
                      **attempted: Any) -> AsyncIterator[dict[str, Any]]:
        """Audit an action in two steps (`serve_apps.audit_steps.audited`): its intent (`attempted`) before the body
        acts, and a 503 that does not act where the intent cannot be written; its outcome after: `attempted` again
        (the outcome reads as the one record written after the action did before intents), with `status` done, or
        refused/error as the body raised, and what the body put in the yielded dict. An outcome the store fails to
        take is logged: the body's answer stands, for the action took place (a 503 would invite doing it again)."""
        steps = audited(self.audit, _record(request, who, action, target, attempted))  # stepped off the loop
        try:
            outcome = await run_in_threadpool(steps.__enter__)
        except StoreUnavailable:
            request.state.resend_advice = "nothing was done: resending it is safe"
            raise
        try:
            yield outcome
        except Exception as exc:
            await run_in_threadpool(steps.__exit__, type(exc), exc, exc.__traceback__)  # settles it, and lets it be
            raise
        await run_in_threadpool(steps.__exit__, None, None, None)


def _record(request: Request, who: Principal, action: str, target: str, details: dict[str, Any]) -> AuditRecord:
    """An audit record of `who`'s `action` now, tied to `request` by its ids."""
    state = request.state
    return AuditRecord(time=datetime.now(UTC), request_id=getattr(state, "request_id", None),
                       client_request_id=getattr(state, "client_request_id", None), key_id=who.key_id,
                       tenant=who.tenant, role=who.role, action=action, target=target, details=details)


async def services(request: Request) -> Services:
    """Async on purpose: FastAPI runs a plain `def` dependency in a thread pool, a thread hop per request."""
    return request.app.state.services


def require(role: Role, *, refuses_conditions: bool = True):
    """A dependency: the authenticated caller, rate limited, with at least `role` (401/429/403), whose write carries
    no precondition its route does not evaluate (412, `serve_apps.conditional.refuse_unevaluated`). A route that
    checks a higher role in its body passes `refuses_conditions=False` and calls `refuse_unevaluated` itself after
    that check, so a caller below its role gets 403, never a 412 telling it what the route evaluates."""

    async def dependency(
        request: Request,
        authorization: str | None = Header(None, description="`Bearer <API key>`"),
        x_api_key: str | None = Header(None, description="The API key (alternative to Authorization)"),
        svc: Services = Depends(services),
    ) -> Principal:
        key = parse_credentials(authorization, x_api_key)  # 401 for a credential that holds no key
        if key is None:
            raise Unauthorized(f"missing API key: {SEND_A_KEY}", headers=BEARER_CHALLENGE)
        who = svc.keys.authenticate(key)
        if who is None:
            raise Unauthorized("unknown API key", headers=BEARER_CHALLENGE)
        setattr(request.state, PRINCIPAL, who)  # for the request's log line and a refusal's audit record
        wait = svc.buckets.take(who.key_id)
        if wait > 0:
            raise RateLimited(f"rate limit of {svc.config.rate_per_s:g} requests/s per key exceeded",
                              details=[{"retry_after_s": wait}],
                              headers={"Retry-After": TokenBuckets.retry_after(wait)})
        require_role(who, role)
        if refuses_conditions:  # 412 for a condition the route ignores: only now, after 401, 429 and 403
            refuse_unevaluated(request)
        return who

    return dependency


def streaming(role: Role, stream: str):
    """A dependency for a route that streams for as long as its client listens: `require(role)`, and the key for
    the stream to check again while it lasts (`serve_apps.stream_auth`); its end by the key is audited as
    ``{stream}.end``."""

    async def dependency(request: Request, who: Principal = Depends(require(role)),
                         svc: Services = Depends(services)) -> StreamCredential:
        key = parse_credentials(request.headers.get("authorization"), request.headers.get("x-api-key"))
        assert key is not None  # `require` refused the request otherwise

        async def audit(refusal: ApiError) -> None:
            await svc.record(request, who, f"{stream}.end", request.url.path, http_status=refusal.status,
                             code=refusal.code, reason=refusal.message)

        return StreamCredential(svc.keys, who, digest(key), role, stream, getattr(request.state, "request_id", None),
                                audit)

    return dependency


async def audit_refusal(request: Request, exc: Exception) -> JSONResponse:
    """The handler of 403 `Forbidden`: answered as every error, and audited as ``access.denied`` (target: the path;
    details: method, route, reason) when the caller's key is known, so the audit log shows denied attempts too."""
    assert isinstance(exc, ApiError)
    who: Principal | None = getattr(request.state, PRINCIPAL, None)
    if who is not None:
        route = getattr(request.scope.get("route"), "path", "unmatched")
        try:
            await request.app.state.services.record(request, who, "access.denied", request.url.path,
                                                    method=request.method, route=route, http_status=exc.status,
                                                    reason=exc.message)
        except Exception:  # noqa: BLE001 - the refusal is answered whatever the store does; the log keeps it
            log.exception("event=audit_failed action=access.denied request_id=%s tenant=%s key_id=%s",
                          getattr(request.state, "request_id", None), who.tenant, who.key_id)
    return error_response(request, exc.status, exc.code, exc.message_for(request), exc.details, exc.headers)


def require_role(who: Principal, role: Role) -> None:
    """403 unless `who` has at least `role`; for routes that check it themselves, to audit a refusal too."""
    if not who.allows(role):
        raise Forbidden(f"role {who.role!r} may not do this (needs {role.name})")


async def utc_day(day: Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}-\d{2}$")] = None) -> str | None:
    """The `day` query parameter of the routes that read one day's records (audit, dead letters): a calendar date
    (a pattern alone passes 2026-02-30), or None for the newest records of any day."""
    if day is not None:
        try:
            date.fromisoformat(day)
        except ValueError as exc:
            raise Unprocessable(f"query.day: {day} is not a calendar date ({exc}); give a UTC day as "
                                "YYYY-MM-DD, e.g. 2026-01-05", details=[{"loc": ["query", "day"]}]) from None
    return day


async def writable(request: Request) -> None:
    """503 `store_fenced` once another service took the store over (`Backend.check_writable`), for routes that
    write the store from this replica (run records, the lifecycle log, policies) rather than through the backend."""
    await (await services(request)).backend.call("check_writable")


async def writable_now(request: Request) -> None:
    """`writable` from a read of the store's lease made now (`Backend.check_writable(fresh=True)`), for a route that
    decides for good (a model's transition or rollback, kept by the lifecycle log): the verdict `writable` answers may
    be a second old, and within it a service taken over would record a promotion beside its successor, which neither
    decided it nor swaps its twins to it."""
    await (await services(request)).backend.call("check_writable", True)


IdPath = Annotated[str, Path(pattern=IDENTIFIER_PATTERN)]
"""A path segment naming something of the caller's tenant by its identifier (a model, a type, a connector, a command):
422 for anything else before it names a file in the store (a NUL answered 500, a 5,000-character name a false 503
`store_unavailable`)."""

Limit = Annotated[int, Query(ge=1, le=10_000)]
"""How many of the newest records a read of records (the audit log) answers."""
DeadLetterLimit = Annotated[int, Query(ge=1, le=1000, description="at most 1000: a dead letter keeps up to 4 KiB "
                                       "of what was refused (more as `\\x..` escapes), so an answer stays some MB")]
"""How many dead letters a page holds: fewer than `Limit`, as each is larger than an audit record."""

READER = Depends(require(Role.reader))
WRITER = Depends(require(Role.writer))
ADMIN = Depends(require(Role.admin))
READER_ROLE_IN_BODY = Depends(require(Role.reader, refuses_conditions=False))
"""A reader, for a route that checks a higher role in its body (to audit the refusal as its own action): the route
calls `serve_apps.conditional.refuse_unevaluated` right after that check."""
WRITER_ROLE_IN_BODY = Depends(require(Role.writer, refuses_conditions=False))
"""A writer, for a route whose role depends on its body (bulk: tag is a writer's, delete and retype an admin's): the
route calls `serve_apps.conditional.refuse_unevaluated` right after its role check."""
CHANGE_STREAM = Depends(streaming(Role.reader, "change_stream"))
FILE_DOWNLOAD = Depends(streaming(Role.reader, "file_download"))
"""A file download's key, checked again while the file streams (`serve_apps.downloads`)."""
SVC = Depends(services)
DAY = Depends(utc_day)
WRITABLE = Depends(writable)
WRITABLE_NOW = Depends(writable_now)
