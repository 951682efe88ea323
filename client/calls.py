"""The API's operations as data (`Call`): built once here, executed by the sync and async clients.

Requests and responses are the server's own pydantic contracts (`raytwin.contracts`,
`serve_apps.schemas`, `serve_apps.changes`, `actors.state`), so a field the server renames or
removes is a type error here, not a silent `KeyError` in a user's code. A field it adds is
ignored (`ANSWER_EXTRA`): a client keeps working against a newer server.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from importlib import import_module
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import to_jsonable_python

from actors.state import TwinState
from client.errors import InvalidArgument, UnexpectedAnswer
from raytwin.contracts import IDENTIFIER_PATTERN, Asset, AssetType, RelationshipKind, TelemetryEvent, describe_error
from raytwin.migration import MigrationRequest
from serve_apps.deprecation import Deprecation
from serve_apps.query_schemas import AssetGraph, BulkAccepted, BulkReport, BulkRequest
from serve_apps.audit import AuditRecord
from serve_apps.schemas import (AssetCreate, AssetPage, AssetTypePage, AssetUpdate, Divergence, DriftClear, Health,
                                IngestResult, Related)

if TYPE_CHECKING:  # answers whose server modules import Ray or JAX: loaded on first use (see `_lazy`)
    from serve_apps.job_listing import JobPage
    from serve_apps.jobs import Job
    from serve_apps.routes_evolution import CompatibilityReport, MigrationResult

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)

ANSWER_EXTRA: Literal["ignore"] = "ignore"
"""How answers are parsed where the contracts forbid unknown fields (as they do for requests): a field a newer
server added (e.g. `warnings` on a recommendation) is dropped, so a client released before it keeps working
during a rolling upgrade, as Kubernetes and protobuf clients do."""


@dataclass(frozen=True)
class Revisioned(Generic[T]):
    """A resource, its revision and its entity tag (the `ETag` the server sent, without quotes): pass `etag` as
    `if_match` (a bare `revision` is accepted too, but unchecked against a restore of the server's store)."""

    value: T
    revision: int
    tag: str = ""

    @property
    def etag(self) -> str:
        return f'"{self.tag or self.revision}"'


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request. `route` is the server's path template (``/v1/assets/{asset_id}``), filled from
    `path_params`; deprecation warnings are issued once per route.

    Every path parameter must be an identifier (`raytwin.contracts.IDENTIFIER_PATTERN`: asset, type,
    model and connector names, versions, job, command and run ids all are), else `InvalidArgument`
    before anything is sent. Percent-encoding alone would not keep an id on its route: the server
    decodes ``%2F`` before routing, so ``zone-1/state`` would read the state route. A parameter named in
    `relative_paths` fills a ``{name:path}`` route (a run's output file ``search/part-000000.parquet``):
    each of its ``/``-separated parts must be an identifier (so never ``..``), and its ``/`` are sent as such."""

    method: str
    route: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, Any] | None = None
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    idempotent: bool = False  # safe to resend after a network error (the server may have applied it)
    conditional: bool = False  # a compare-and-set (If-Match, expected_revision): a resend may find its own write
    path_params: Mapping[str, str] = field(default_factory=dict)
    warn_deprecated: bool = True  # False where the answer echoes a mark the caller itself just set
    relative_paths: frozenset[str] = frozenset()  # path parameters that may hold "/" between identifiers
    idempotency_keys: tuple[str, ...] = ()  # a telemetry batch's: named when its outcome is unknown

    def __post_init__(self) -> None:
        for name, value in self.path_params.items():
            parts = value.split("/") if isinstance(value, str) and name in self.relative_paths else [value]
            if not all(isinstance(part, str) and _IDENTIFIER.fullmatch(part) for part in parts):
                what = "a path of identifiers joined by '/'" if name in self.relative_paths else "an identifier"
                raise InvalidArgument(
                    f"{self.method} {self.route}: {name}={value!r} is not {what}, so it names nothing "
                    f"on the server and nothing was sent; pass the {name} as the API gave it: a letter or "
                    f"digit, then up to 127 letters, digits, '_', '.', ':' or '-' ({IDENTIFIER_PATTERN})")

    @property
    def path(self) -> str:
        return self.route.format_map({k: quote(v, safe="/" if k in self.relative_paths else "")
                                      for k, v in self.path_params.items()})

    @property
    def resend_advice(self) -> str:
        """What to do with this write when a try may have been applied and the client could not learn whether
        (`client.errors.OutcomeUnknown`)."""
        if self.conditional:
            return "read the resource and check whether it holds your change before you apply it again"
        if self.idempotency_keys:
            keys = self.idempotency_keys
            shown = ", ".join(keys) if len(keys) <= 2 else f"{keys[0]} ... {keys[-1]}, {len(keys)} events"
            return (f"resend the batch as it was, with the same idempotency keys ({shown}) and event times: the "
                    "server applies each event once and counts the others as duplicates")
        if self.idempotent:
            return "send it again as it was: sent again, it takes effect once"
        return "check whether it took effect before you send it again (sent again, it could take effect twice)"

    def result(self, response: httpx.Response) -> T:
        """The answer as the client's model; one that does not fit it raises `UnexpectedAnswer` naming
        the fields, never pydantic's own error (callers catch `client.errors` only)."""
        try:
            return self.parse(response)
        except ValidationError as exc:
            raise UnexpectedAnswer(f"{self.method} {self.path}", exc,
                                   response.headers.get("x-raytwin-request-id")) from exc


def _model(cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda r: cls.model_validate_json(r.content, extra=ANSWER_EXTRA)


def _models(cls: type[M]) -> Callable[[httpx.Response], list[M]]:
    adapter = TypeAdapter(list[cls])
    return lambda r: adapter.validate_json(r.content, extra=ANSWER_EXTRA)


def _lazy(ref: str, many: bool = False) -> Callable[[httpx.Response], Any]:
    """A parser for the server model ``module:Name`` whose module imports Ray, JAX or FastAPI routes:
    imported on the first answer (`many`: a list of them), so `import client` stays light."""
    adapters: list[TypeAdapter[Any]] = []

    def parse(r: httpx.Response) -> Any:
        if not adapters:
            module, _, name = ref.partition(":")
            target: Any = getattr(import_module(module), name)
            adapters.append(TypeAdapter(list[target] if many else target))
        return adapters[0].validate_json(r.content, extra=ANSWER_EXTRA)

    return parse


def _revisioned(cls: type[M]) -> Callable[[httpx.Response], Revisioned[M]]:
    def read(r: httpx.Response) -> Revisioned[M]:
        tag = r.headers["etag"].removeprefix("W/").strip('"')  # a twin's state carries a weak one
        return Revisioned(cls.model_validate_json(r.content, extra=ANSWER_EXTRA), int(tag.split("-", 1)[0]), tag)
    return read


def _nothing(r: httpx.Response) -> None:
    return None


def _conditions(if_match: int | str | None, create_only: bool = False) -> dict[str, str]:
    """`if_match`: an ETag as the server sent it (`Revisioned.etag`), or a bare revision."""
    tag = if_match if isinstance(if_match, str) and if_match.startswith('"') else f'"{if_match}"'
    headers = {"If-Match": tag} if if_match is not None else {}
    return {**headers, "If-None-Match": "*"} if create_only else headers


def argument_model(cls: type[M], call: str, **values: Any) -> M:
    """`cls(**values)`, a request body the client builds from a caller's arguments; values no server accepts are an
    `InvalidArgument` naming `call` and the fields, nothing sent (pydantic's own `ValidationError` is no
    `RayTwinError`, so a caller's handlers of client errors let it through)."""
    try:
        return cls(**values)
    except ValidationError as exc:
        raise InvalidArgument(f"{call}: {describe_error(exc)}; nothing was sent") from None


def _aware(at: datetime) -> datetime:
    """`at`, refused before anything is sent unless it names its time zone (whose "12:00" would it be?)."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise InvalidArgument(f"at={at.isoformat()} has no time zone: give a timezone-aware datetime, e.g. "
                              "datetime(2026, 1, 5, 12, tzinfo=UTC)")
    return at


def telemetry_body(asset_id: str, events: Iterable[TelemetryEvent | Mapping[str, Any]]) -> dict[str, Any]:
    """The batch with an explicit idempotency key on every event (default ``asset:sequence``, the
    server's own), so a batch resent after a timeout is recognised event by event and applied once."""
    out = []
    for e in events:
        raw = e.model_dump(mode="json", exclude={"ingest_time"}, exclude_none=True) if isinstance(e, BaseModel) \
            else _json_values(dict(e), len(out))
        if "sequence" not in raw:
            raise InvalidArgument(f"event {len(out)} of the batch has no 'sequence' (the device's counter; with the "
                                  "event time and key it identifies the event, so a resent batch applies once)")
        raw.setdefault("idempotency_key", f"{raw.get('asset_id', asset_id)}:{raw['sequence']}")
        out.append(raw)
    return {"events": out}


def names(argument: str, values: Iterable[str]) -> tuple[str, ...]:
    """`values` (ids, kinds, sort keys, fields) as a tuple; one bare string is an `InvalidArgument`: iterated, the
    filter ``asset_ids="zone-1"`` became the one-letter ids z, o, n, e, -, 1, valid ids that silently matched none of
    the caller's changes."""
    if isinstance(values, str):
        raise InvalidArgument(f"{argument}={values!r} is one string, where a sequence of them is expected: write "
                              f"{argument}=({values!r},); nothing was sent")
    return tuple(values)


def _json_values(event: dict[str, Any], index: int) -> dict[str, Any]:
    """`event` (the batch's `index`-th) in JSON values: a datetime as RFC 3339 text, a NumPy scalar as its number
    (what a producer built from arrays holds). Anything else JSON cannot carry is an `InvalidArgument` before
    anything is sent, not the encoder's `TypeError` (which no `RayTwinError` handler catches)."""

    def plain(value: Any) -> Any:
        if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):  # a NumPy scalar
            return value.item()
        raise InvalidArgument(f"event {index} of the batch holds a value of type {type(value).__name__}, which JSON "
                              "cannot carry: give numbers, strings, timezone-aware datetimes, and dicts and lists of "
                              "them")

    return to_jsonable_python(event, fallback=plain)


class Sender(ABC):
    """Where calls go: `_send` (sync: the value, async: an awaitable of it) is the client's."""

    @abstractmethod
    def _send(self, call: Call[T]) -> Any: ...


class Endpoints(Sender):
    """The catalog, twin, schema evolution, job and audit operations (the others: `client.model_calls`,
    `client.connector_calls`, `client.scenario_calls`)."""

    def health(self) -> Health:
        return self._send(Call("GET", "/v1/health", _model(Health), idempotent=True))

    # ---- asset types --------------------------------------------------------------------------
    def create_asset_type(self, asset_type: AssetType, create_only: bool = False) -> Revisioned[AssetType]:
        """Publish a type version (identical content again is a no-op; `create_only`: PreconditionFailed then).
        Conflict, with nothing published: other content under the version, or the tenant's model registry holds
        the version as another model (a fit registered there: the message says what differs and what to do)."""
        return self._send(Call("POST", "/v1/asset-types", _revisioned(AssetType), json=asset_type.model_dump(
            mode="json"), headers=_conditions(None, create_only), idempotent=not create_only))

    def get_asset_type(self, name: str, version: str) -> Revisioned[AssetType]:
        return self._send(Call("GET", "/v1/asset-types/{name}/{version}", _revisioned(AssetType), idempotent=True,
                               path_params={"name": name, "version": version}))

    def list_asset_types(self, name: str | None = None, limit: int = 100, cursor: str | None = None) -> AssetTypePage:
        """A page of the tenant's asset types (of one `name` if given) in `name@version` order; pass its `next_cursor`
        back as `cursor` for the next page (`iter_asset_types` walks them all)."""
        return self._send(asset_types_call(name, limit, cursor))

    def delete_asset_type(self, name: str, version: str, if_match: int | str | None = None) -> None:
        """Remove an unused type version (admin; Conflict while assets name it, while its model's lifecycle needs it or
        twins run it; `if_match`: only at that revision)."""
        return self._send(Call("DELETE", "/v1/asset-types/{name}/{version}", _nothing, headers=_conditions(if_match),
                               path_params={"name": name, "version": version}))

    # ---- assets -----------------------------------------------------------------------------
    def create_asset(self, asset: AssetCreate, create_only: bool = False) -> Revisioned[Asset]:
        """Create an asset and its live twin (Conflict if it exists; `create_only`: PreconditionFailed)."""
        return self._send(Call("POST", "/v1/assets", _revisioned(Asset), json=asset.model_dump(mode="json"),
                               headers=_conditions(None, create_only)))

    def get_asset(self, asset_id: str) -> Revisioned[Asset]:
        return self._send(Call("GET", "/v1/assets/{asset_id}", _revisioned(Asset), idempotent=True,
                               path_params={"asset_id": asset_id}))

    def list_assets(self, type_name: str | None = None, type_version: str | None = None,
                    related_to: str | None = None, relationship: RelationshipKind | None = None, limit: int = 100,
                    cursor: str | None = None) -> AssetPage:
        """A page of the tenant's assets (filtered by type and relationship) in id order; pass its `next_cursor` back
        as `cursor` for the next page (`iter_assets` walks them all; `query` also sorts, projects and reads state)."""
        return self._send(assets_call(AssetFilter(type_name, type_version, related_to, relationship), limit, cursor))

    def update_asset(self, asset_id: str, update: AssetUpdate, if_match: int | str | None = None) -> Revisioned[Asset]:
        """Replace an asset; with `if_match` only at that revision (else PreconditionFailed, nothing changed)."""
        return self._send(Call("PUT", "/v1/assets/{asset_id}", _revisioned(Asset),
                               json=update.model_dump(mode="json"), headers=_conditions(if_match),
                               idempotent=if_match is not None, conditional=if_match is not None,
                               path_params={"asset_id": asset_id}))

    def delete_asset(self, asset_id: str, if_match: int | str | None = None) -> None:
        return self._send(Call("DELETE", "/v1/assets/{asset_id}", _nothing, headers=_conditions(if_match),
                               path_params={"asset_id": asset_id}))

    def relationships(self, asset_id: str) -> Related:
        """Relationships from this asset (`outgoing`) and to it (`incoming`: kind and source)."""
        return self._send(Call("GET", "/v1/assets/{asset_id}/relationships", _model(Related), idempotent=True,
                               path_params={"asset_id": asset_id}))

    # ---- twins ------------------------------------------------------------------------------
    def send_telemetry(self, asset_id: str, events: Iterable[TelemetryEvent | Mapping[str, Any]]) -> IngestResult:
        """Send a batch; retried safely (every event has an idempotency key): resent events count as duplicates.
        `OutcomeUnknown` when a try may have been applied and the resends failed: resend the batch as it was."""
        body = telemetry_body(asset_id, events)
        return self._send(Call("POST", "/v1/assets/{asset_id}/telemetry", _model(IngestResult), json=body,
                               idempotent=True, path_params={"asset_id": asset_id},
                               idempotency_keys=tuple(str(e["idempotency_key"]) for e in body["events"])))

    def state(self, asset_id: str, at: datetime | None = None) -> Revisioned[TwinState]:
        """The twin's state now, or as of `at` (timezone-aware)."""
        return self._send(Call("GET", "/v1/assets/{asset_id}/state", _revisioned(TwinState), idempotent=True,
                               params=_present(at=_aware(at).isoformat() if at is not None else None),
                               path_params={"asset_id": asset_id}))

    def asset_graph(self, asset_id: str, direction: Literal["descendants", "ancestors"] = "descendants",
                    kinds: Iterable[RelationshipKind] = (), depth: int = 8) -> AssetGraph:
        """Assets reachable along relationships (`kinds`: only these; default all), with shortest paths."""
        return self._send(Call("GET", "/v1/assets/{asset_id}/graph", _model(AssetGraph), idempotent=True,
                               params={"direction": direction, "kind": list(names("kinds", kinds)), "depth": depth},
                               path_params={"asset_id": asset_id}))

    def divergence(self, asset_id: str) -> Divergence:
        return self._send(Call("GET", "/v1/assets/{asset_id}/divergence", _model(Divergence), idempotent=True,
                               path_params={"asset_id": asset_id}))

    def clear_drift(self, asset_id: str, reason: str) -> Divergence:
        """Acknowledge the twin's drift alarm (its detector restarts from zero); `reason` goes to the audit log."""
        return self._send(Call("POST", "/v1/assets/{asset_id}/drift/clear", _model(Divergence),
                               json=argument_model(DriftClear, "clear_drift", reason=reason).model_dump(mode="json"),
                               path_params={"asset_id": asset_id}))

    # ---- schema evolution -------------------------------------------------------------------
    def migrate_asset(self, asset_id: str, migration: MigrationRequest, if_match: int | str | None = None
                      ) -> MigrationResult:
        """Move an asset and its twin to another version of its type, mapping the state; `inverse` in
        the answer moves it back. Not resent after a network error unless `if_match` makes it safe."""
        return self._send(Call("POST", "/v1/assets/{asset_id}/migrate", _lazy("serve_apps.routes_evolution:"
                               "MigrationResult"), json=migration.model_dump(mode="json"), headers=_conditions(
                               if_match), idempotent=if_match is not None, conditional=if_match is not None,
                               path_params={"asset_id": asset_id}))

    def check_compatibility(self, asset_type: AssetType) -> CompatibilityReport:
        """A candidate type version's changes against the newest older one and the bump they need (writes nothing)."""
        return self._send(Call("POST", "/v1/asset-types/compatibility",
                               _lazy("serve_apps.routes_evolution:CompatibilityReport"),
                               json=asset_type.model_dump(mode="json"), idempotent=True))

    def deprecate_asset_type(self, name: str, version: str, mark: Deprecation) -> Deprecation:
        """Mark a type version deprecated: answers about it then carry `Deprecation`/`Sunset` headers."""
        return self._send(Call("PUT", "/v1/asset-types/{name}/{version}/deprecation", _model(Deprecation),
                               json=mark.model_dump(mode="json"), idempotent=True, warn_deprecated=False,
                               path_params={"name": name, "version": version}))

    def undeprecate_asset_type(self, name: str, version: str) -> None:
        """Withdraw a type version's deprecation mark (NotFound if it has none)."""
        return self._send(Call("DELETE", "/v1/asset-types/{name}/{version}/deprecation", _nothing,
                               path_params={"name": name, "version": version}))

    # ---- jobs -------------------------------------------------------------------------------
    def bulk(self, request: BulkRequest) -> BulkAccepted:
        """Tag, delete or retype every asset `request.q` matches, as a job (wait for it with `wait_job`)."""
        return self._send(Call("POST", "/v1/bulk", _model(BulkAccepted), json=request.model_dump(mode="json")))

    def job(self, job_id: str) -> Job:
        """A scenario, sweep or bulk job's status (bulk: `bulk` progress); `wait_job` polls it to the end."""
        return self._send(job_call(job_id))

    def jobs(self, state: str | None = None, limit: int = 100, cursor: str | None = None) -> JobPage:
        """A page of the tenant's jobs, newest first (of one `state` if given: queued, running, succeeded, failed,
        cancelled); pass its `next_cursor` back as `cursor` for the next page. A queued job's `queue` says why it
        waits."""
        return self._send(jobs_call(state, limit, cursor))

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a queued or running scenario or sweep job (Conflict once it finished, and for bulk jobs); its
        state becomes `cancelled` (`wait_job` then raises `JobFailed`). Resending is safe (a second try: Conflict)."""
        return self._send(Call("POST", "/v1/jobs/{job_id}/cancel", _lazy("serve_apps.jobs:Job"),
                               path_params={"job_id": job_id}))

    def job_report(self, job_id: str) -> BulkReport:
        """The outcome of each item of a bulk job that succeeded (Conflict before)."""
        return self._send(Call("GET", "/v1/jobs/{job_id}/report", _model(BulkReport), idempotent=True,
                               path_params={"job_id": job_id}))


    # ---- audit ------------------------------------------------------------------------------
    def audit(self, day: date | None = None, limit: int = 1000) -> list[AuditRecord]:
        """The tenant's most recent audit records (of one UTC day if given), oldest first (admin)."""
        return self._send(Call("GET", "/v1/audit", _models(AuditRecord), idempotent=True,
                               params=_present(day=day.isoformat() if day is not None else None, limit=limit)))


@dataclass(frozen=True)
class AssetFilter:
    """What `list_assets` and `iter_assets` filter the tenant's assets by (None: any)."""

    type_name: str | None = None
    type_version: str | None = None
    related_to: str | None = None
    relationship: RelationshipKind | None = None


def assets_call(where: AssetFilter, limit: int, cursor: str | None) -> Call[AssetPage]:
    """A page of the tenant's assets in id order (`Endpoints.list_assets`, `client.pages.asset_pager`)."""
    return Call("GET", "/v1/assets", _model(AssetPage), idempotent=True, params=_present(
        type_name=where.type_name, type_version=where.type_version, related_to=where.related_to,
        relationship=where.relationship, limit=limit, cursor=cursor))


def asset_types_call(name: str | None, limit: int, cursor: str | None) -> Call[AssetTypePage]:
    """A page of the tenant's asset types (`Endpoints.list_asset_types`, `client.pages.asset_type_pager`)."""
    return Call("GET", "/v1/asset-types", _model(AssetTypePage), idempotent=True,
                params=_present(name=name, limit=limit, cursor=cursor))


def jobs_call(state: str | None, limit: int, cursor: str | None) -> Call[JobPage]:
    """A page of the tenant's jobs, newest first (`Endpoints.jobs`, `client.pages.job_pager`)."""
    return Call("GET", "/v1/jobs", _lazy("serve_apps.job_listing:JobPage"), idempotent=True,
                params=_present(state=state, limit=limit, cursor=cursor))


def job_call(job_id: str) -> Call[Job]:
    return Call("GET", "/v1/jobs/{job_id}", _lazy("serve_apps.jobs:Job"), idempotent=True,
                path_params={"job_id": job_id})


def _present(**params: Any) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}
