"""The API's operations as data (`Call`): built once here, executed by the sync and async clients.

Requests and responses are the server's own pydantic contracts (`raytwin.contracts`,
`serve_apps.schemas`, `serve_apps.changes`, `actors.state`), so a field the server adds or
renames is a type error here, not a silent `KeyError` in a user's code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from actors.state import TwinState
from raytwin.contracts import Asset, AssetType, RelationshipKind, TelemetryEvent
from serve_apps.query_schemas import AssetGraph
from serve_apps.schemas import AssetCreate, AssetUpdate, Divergence, Health, IngestResult

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Revisioned(Generic[T]):
    """A resource and its revision (the `ETag` the server sent): pass `revision` as `if_match`."""

    value: T
    revision: int

    @property
    def etag(self) -> str:
        return f'"{self.revision}"'


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, Any] | None = None
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    idempotent: bool = False  # safe to resend after a network error (the server may have applied it)


def _model(cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda r: cls.model_validate_json(r.content)


def _models(cls: type[M]) -> Callable[[httpx.Response], list[M]]:
    adapter = TypeAdapter(list[cls])
    return lambda r: adapter.validate_json(r.content)


def _revisioned(cls: type[M]) -> Callable[[httpx.Response], Revisioned[M]]:
    return lambda r: Revisioned(cls.model_validate_json(r.content), int(r.headers["etag"].strip('"')))


def _nothing(r: httpx.Response) -> None:
    return None


def _conditions(if_match: int | None, create_only: bool = False) -> dict[str, str]:
    headers = {"If-Match": f'"{if_match}"'} if if_match is not None else {}
    return {**headers, "If-None-Match": "*"} if create_only else headers


def telemetry_body(asset_id: str, events: Iterable[TelemetryEvent | Mapping[str, Any]]) -> dict[str, Any]:
    """The batch with an explicit idempotency key on every event (default ``asset:sequence``, the
    server's own), so a batch resent after a timeout is recognised event by event and applied once."""
    out = []
    for e in events:
        raw = e.model_dump(mode="json", exclude={"ingest_time"}, exclude_none=True) if isinstance(e, BaseModel) \
            else dict(e)
        raw.setdefault("idempotency_key", f"{raw.get('asset_id', asset_id)}:{raw['sequence']}")
        out.append(raw)
    return {"events": out}


class Endpoints(ABC):
    """The operations; `_send` (sync: the value, async: an awaitable of it) is the client's."""

    @abstractmethod
    def _send(self, call: Call[T]) -> Any: ...

    def health(self) -> Health:
        return self._send(Call("GET", "/v1/health", _model(Health), idempotent=True))

    # ---- asset types --------------------------------------------------------------------------
    def create_asset_type(self, asset_type: AssetType, create_only: bool = False) -> Revisioned[AssetType]:
        """Publish a type version (identical content again is a no-op; `create_only`: PreconditionFailed then)."""
        return self._send(Call("POST", "/v1/asset-types", _revisioned(AssetType), json=asset_type.model_dump(
            mode="json"), headers=_conditions(None, create_only), idempotent=not create_only))

    def get_asset_type(self, name: str, version: str) -> Revisioned[AssetType]:
        return self._send(Call("GET", f"/v1/asset-types/{name}/{version}", _revisioned(AssetType), idempotent=True))

    def list_asset_types(self, name: str | None = None) -> list[AssetType]:
        return self._send(Call("GET", "/v1/asset-types", _models(AssetType), params=_present(name=name),
                               idempotent=True))

    # ---- assets -----------------------------------------------------------------------------
    def create_asset(self, asset: AssetCreate, create_only: bool = False) -> Revisioned[Asset]:
        """Create an asset and its live twin (Conflict if it exists; `create_only`: PreconditionFailed)."""
        return self._send(Call("POST", "/v1/assets", _revisioned(Asset), json=asset.model_dump(mode="json"),
                               headers=_conditions(None, create_only)))

    def get_asset(self, asset_id: str) -> Revisioned[Asset]:
        return self._send(Call("GET", f"/v1/assets/{asset_id}", _revisioned(Asset), idempotent=True))

    def list_assets(self, type_name: str | None = None, type_version: str | None = None,
                    related_to: str | None = None, relationship: RelationshipKind | None = None) -> list[Asset]:
        return self._send(Call("GET", "/v1/assets", _models(Asset), idempotent=True, params=_present(
            type_name=type_name, type_version=type_version, related_to=related_to, relationship=relationship)))

    def update_asset(self, asset_id: str, update: AssetUpdate, if_match: int | None = None) -> Revisioned[Asset]:
        """Replace an asset; with `if_match` only at that revision (else PreconditionFailed, nothing changed)."""
        return self._send(Call("PUT", f"/v1/assets/{asset_id}", _revisioned(Asset),
                               json=update.model_dump(mode="json"), headers=_conditions(if_match),
                               idempotent=if_match is not None))

    def delete_asset(self, asset_id: str, if_match: int | None = None) -> None:
        return self._send(Call("DELETE", f"/v1/assets/{asset_id}", _nothing, headers=_conditions(if_match)))

    # ---- twins ------------------------------------------------------------------------------
    def send_telemetry(self, asset_id: str, events: Iterable[TelemetryEvent | Mapping[str, Any]]) -> IngestResult:
        """Send a batch; retried safely (every event has an idempotency key): resent events count as duplicates."""
        return self._send(Call("POST", f"/v1/assets/{asset_id}/telemetry", _model(IngestResult),
                               json=telemetry_body(asset_id, events), idempotent=True))

    def state(self, asset_id: str, at: datetime | None = None) -> Revisioned[TwinState]:
        """The twin's state now, or as of `at` (timezone-aware)."""
        return self._send(Call("GET", f"/v1/assets/{asset_id}/state", _revisioned(TwinState), idempotent=True,
                               params=_present(at=at.isoformat() if at is not None else None)))

    def asset_graph(self, asset_id: str, direction: Literal["descendants", "ancestors"] = "descendants",
                    kinds: Iterable[RelationshipKind] = (), depth: int = 8) -> AssetGraph:
        """Assets reachable along relationships (`kinds`: only these; default all), with shortest paths."""
        return self._send(Call("GET", f"/v1/assets/{asset_id}/graph", _model(AssetGraph), idempotent=True,
                               params={"direction": direction, "kind": list(kinds), "depth": depth}))

    def divergence(self, asset_id: str) -> Divergence:
        return self._send(Call("GET", f"/v1/assets/{asset_id}/divergence", _model(Divergence), idempotent=True))


def _present(**params: Any) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}
