"""Request and response contracts of asset queries and graph walks (shared with `client`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from raytwin.contracts import RelationshipKind
from raytwin.query import MAX_QUERY_CHARS
from serve_apps.schemas import Metadata

MAX_PAGE = 1000
MAX_GRAPH_DEPTH = 32


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    q: str = Field("", max_length=MAX_QUERY_CHARS, description="A filter (serve_apps/README.md, \"Queries\"); "
                   "empty: every asset. E.g. `type == \"thermal_rc\" and state.T_in > 298.15`")
    sort: list[str] = Field(default_factory=list, max_length=8, description="Fields, `-` in front for "
                            "descending, e.g. `[\"metadata.site\", \"-state.T_in\"]`; ties by id")
    fields: list[str] | None = Field(None, max_length=64, description="Projection, e.g. `[\"metadata.site\", "
                                     "\"state\"]`; default: id, type, version, metadata, relationships")
    limit: int = Field(100, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(None, max_length=4096, description="`next_cursor` of the previous page, unchanged, "
                               "with the same q and sort")


class QueryPage(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: str | None = Field(description="Send it back for the next page; null on the last page")
    matched: int = Field(description="Assets matching the query, over all pages")


class GraphNode(BaseModel):
    id: str
    depth: int
    path: list[str] = Field(description="A shortest path from the start asset to this one, both included")
    kinds: list[RelationshipKind] = Field(description="The relationship kind of each step of `path`")


class AssetGraph(BaseModel):
    asset_id: str
    direction: Literal["descendants", "ancestors"]
    nodes: list[GraphNode]
    truncated: bool = Field(description="Assets lie beyond `depth`: ask again with a larger one")


MAX_BULK_ITEMS = 10_000


class BulkRequest(BaseModel):
    """An operation on every asset a query matches (matched once, when the job is submitted)."""

    model_config = ConfigDict(extra="forbid")
    q: str = Field(max_length=MAX_QUERY_CHARS, description="The filter (as in `POST /v1/query`); required: "
                   "`\"q\": \"\"` (every asset) must be asked for explicitly")
    action: Literal["tag", "delete", "retype"]
    set: Metadata = Field(default_factory=dict, description="tag: metadata keys to set")
    unset: list[str] = Field(default_factory=list, description="tag: metadata keys to remove")
    type_version: str | None = Field(None, pattern=r"^\d+\.\d+\.\d+$", description="retype: the version of the "
                                     "asset's own type to move it to (registered first)")


class BulkProgress(BaseModel):
    total: int
    done: int = 0
    changed: int = 0
    unchanged: int = 0
    failed: int = 0


class BulkItem(BaseModel):
    asset_id: str
    outcome: Literal["changed", "unchanged", "failed"]
    revision: int | None = Field(None, description="The asset's revision after the change")
    error: str | None = None


class BulkReport(BaseModel):
    job_id: str
    action: str
    q: str
    items: list[BulkItem]


class BulkAccepted(BaseModel):
    job_id: str
    state: str
    total: int = Field(description="Assets the query matched: the job's items")
    status_url: str = Field(description="The job, with `bulk` progress")
    report_url: str = Field(description="The outcome of each item, once the job finished")
