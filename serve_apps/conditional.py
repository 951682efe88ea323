"""Revisions as HTTP entity tags, and the preconditions of conditional writes (RFC 9110, section 13).

Every asset, asset type and twin state has an integer revision; its ETag is the revision and a
digest of the content it names (``"17-9c1e02ab44d1"``, `content_tag`), a strong validator for the
catalog. Catalog revisions are the sequence numbers of the tenant's change log (`serve_apps.changes`),
so they only grow, also across a delete and re-create, and a stale ETag never matches a newer asset
of the same id. Why the digest: a store restored from an earlier copy gives its new writes the
revisions of writes that were lost with the restore, and a client's ETag from before it named other
content under the same number; with the digest it no longer matches (412), and an unchanged resource
keeps its ETag. A bare revision (``"17"``, what ETags were before) still matches, unchecked.

The route only parses the headers into a `Precondition`; the backend evaluates it under the
catalog lock, in the same step as the write (compare-and-set), so two replicas can never both
pass the check for one revision. A read that answers an ETag evaluates both against what it read
(`Precondition.read`: If-Match 412, If-None-Match 304); any other route refuses them (412,
`refuse_unevaluated`) rather than ignore them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Header, Request, Response
from fastapi.dependencies.models import Dependant

from serve_apps.errors import PreconditionFailed


def content_tag(revision: int, content: Any) -> str:
    """The opaque value of an entity tag: `revision` and a digest of `content` (JSON), so that a revision number
    reused for other content (after a restore of the store) is another tag."""
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)  # a diverged state's NaN too
    return f"{revision}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def etag(revision: int, *, weak: bool = False, content: Any = None) -> str:
    """The entity tag of `revision` of `content` (None: the bare revision, for a lifecycle log): strong (one
    revision is one representation), or weak for a twin's state, whose revision counts applied events while a
    drift clear or a migration changes the body too."""
    tag = str(revision) if content is None else content_tag(revision, content)
    return f'W/"{tag}"' if weak else f'"{tag}"'


def state_etag(view: dict[str, Any]) -> str:
    """The weak ETag of a twin's state view (`actors.state.TwinState.view`), over its state, std, event time,
    divergence report and, for a stale read (the last durable state), that it is stale: GET .../state and
    .../divergence send it, and runs from the live state echo it (`raytwin.contracts.StartedFrom`). Why the report:
    a drift clear changes it without a new revision or state, and a tag without it answered the cleared alarm's
    If-None-Match with 304, so a client kept showing the alarm. Why staleness: a shard back from a restart answers
    the revision and state its snapshot held, so a client that cached the stale read got 304 and kept its body's
    ``stale: true`` (a 304 updates stored headers, never the body, and a fresh read sends no `RayTwin-Stale` to
    replace a stored one); a live read's tag is as it was before, so tags cached from live reads still match."""
    content = [view["state"], view["std"], view.get("event_time"), view.get("divergence")]
    return etag(view["revision"], weak=True, content=content + (["stale"] if view.get("stale") else []))


@dataclass(frozen=True)
class EntityTags:
    """A parsed `If-Match` / `If-None-Match` value: ``*`` or a list of entity tags."""

    any: bool = False
    tags: frozenset[str] = frozenset()  # the opaque values, without quotes
    raw: str = ""

    @classmethod
    def parse(cls, value: str | None, weak: bool = False) -> EntityTags | None:
        """None for an absent header. Malformed tags never match. Weak tags (``W/"3"``) match only
        with `weak`: RFC 9110 (13.1.2) compares If-None-Match weakly, since a cache or proxy may have
        weakened the ETag, while If-Match compares strongly; the 412 message then shows the expected form."""
        if value is None:
            return None
        if value.strip() == "*":
            return cls(any=True, raw=value)
        found = set()
        for tag in value.split(","):
            tag = tag.strip()
            if weak:
                tag = tag.removeprefix("W/")
            if len(tag) > 2 and tag[0] == tag[-1] == '"' and '"' not in tag[1:-1]:
                found.add(tag[1:-1])
        return cls(tags=frozenset(found), raw=value)

    def matches(self, current: int | None, tag: str | None = None) -> bool:
        """Whether the resource at revision `current` (None: absent) with entity tag `tag` (its `content_tag`) is
        named: by `*`, its tag, or its bare revision (unchecked: tags before content digests)."""
        return current is not None and (self.any or str(current) in self.tags or tag in self.tags)

    def names(self, tag: str) -> bool:
        """Whether `*` or the tag itself is named (no bare revision: a twin's revision count restarts when its asset
        is deleted and created again)."""
        return self.any or tag in self.tags


@dataclass(frozen=True)
class Precondition:
    """What a conditional request asks for; `check` raises 412 `precondition_failed` when it does not hold."""

    if_match: EntityTags | None = None
    if_none_match: EntityTags | None = None

    @property
    def create_only(self) -> bool:
        return self.if_none_match is not None and self.if_none_match.any

    def check(self, current: int | None, what: str, tag: str | None = None) -> None:
        """Evaluate against the resource's current revision (None: it does not exist) and tag (`content_tag`)."""
        if self.if_match is not None and current is None:
            raise PreconditionFailed(
                f"{what} does not exist, so If-Match: {self.if_match.raw} (a condition on an existing one) does "
                "not hold; nothing was changed. Check the id, or create it first (POST, or for an asset PUT with "
                "If-None-Match: *)",
                details=[{"header": "If-Match", "current_revision": None}])
        if self.if_match is not None and not self.if_match.matches(current, tag):
            now = f'"{tag or current}"'
            raise PreconditionFailed(
                f"{what} is at revision {current} (ETag {now}), which does not match If-Match: "
                f"{self.if_match.raw}; nothing was changed. Read it again (GET returns its ETag), reapply your "
                f"change and send If-Match with that ETag, quoted as returned, e.g. If-Match: {now}",
                details=[{"header": "If-Match", "current_revision": current}])
        if self.if_none_match is not None and self.if_none_match.matches(current, tag):
            raise PreconditionFailed(
                f"{what} already exists (revision {current}) and If-None-Match: {self.if_none_match.raw} asks to "
                "write only if it does not; nothing was changed",
                details=[{"header": "If-None-Match", "current_revision": current}])

    def read(self, response: Response, revision: int, what: str) -> Response | None:
        """Evaluate a conditional read of the representation at `revision` whose headers the route set on `response`
        (its `ETag`, RFC 9110, 13.2.2): 412 where If-Match does not name it, else 304 (no body) where If-None-Match
        does, else None (answer in full). If-Match compares strongly, so a weak ETag (a twin state's) is named by `*`
        alone; If-None-Match compares weakly. A strong ETag's bare revision matches too (a catalog or lifecycle
        revision only grows). The 304 carries every header the route set, as the 200 would have (RFC 9110, 15.4.5):
        a cache updates its stored answer with them, so a type version deprecated since (`Deprecation`) shows while
        the representation is unchanged; it carried the ETag alone. (A twin's staleness is in its ETag, `state_etag`:
        a read going stale or fresh again is a 200.)"""
        sent = response.headers["ETag"]
        weak, tag = sent.startswith("W/"), sent.removeprefix("W/").strip('"')

        def named(tags: EntityTags) -> bool:
            return tags.names(tag) if weak else tags.matches(revision, tag)

        if self.if_match is not None and not (self.if_match.any or not weak and named(self.if_match)):
            why = (f"its ETag {sent} is weak and If-Match compares strongly (RFC 9110, 13.1.1), so only If-Match: * "
                   "holds here" if weak else f"it is at revision {revision} (ETag {sent}), which does not match it")
            raise PreconditionFailed(
                f"If-Match: {self.if_match.raw} does not hold for {what}: {why}; nothing is answered. Read it without "
                "If-Match (or with the ETag it answers), or send If-None-Match with the ETag you hold to read it only "
                "once it changed", details=[{"header": "If-Match", "current_revision": revision}])
        if self.if_none_match is not None and named(self.if_none_match):
            return Response(status_code=304, headers=response.headers)
        return None


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


ETAG = _header('The resource\'s revision and a digest of its content, e.g. `"17-9c1e02ab44d1"` (opaque): send it as '
               "`If-Match` to write only at this revision, or as `If-None-Match` to read only once it changed")
STATE_ETAG = _header('Weak, e.g. `W/"17-40d2f1a97c03"` (opaque): the twin state\'s revision (events applied) and a '
                     "digest of its state; `If-Match` compares strongly, so it never matches there")
LIFECYCLE_ETAG = _header('The lifecycle log\'s revision and the start of its head hash, e.g. `"7-3f2a9c01be4d"`: '
                         "`If-Match` of a transition or rollback, which then applies only to the log as read")


def with_etag(responses: dict[int | str, dict[str, Any]], *statuses: int, header: dict[str, Any] = ETAG
              ) -> dict[int | str, dict[str, Any]]:
    """A route's OpenAPI `responses` with `header` declared as the `ETag` of each of `statuses` (merged into the
    answer of the route's model), so generated clients learn of the tag that conditional requests take."""
    out = dict(responses)
    for status in statuses:
        out[status] = {**out.get(status, {}), "headers": {"ETag": header}}
    return out


NOT_MODIFIED: dict[int | str, dict[str, Any]] = {304: {"description": "Not modified: `If-None-Match` names the "
                                                          "current ETag"}}
"""The OpenAPI answer of a read that evaluates its conditions (`conditional_read`)."""


async def conditional_read(
    if_match: str | None = Header(None, description='Answer only if the resource\'s ETag is one of these '
                                  '(`"17-9c1e02ab44d1"`, compared strongly: a weak ETag only by `*`), else 412'),
    if_none_match: str | None = Header(None, description="An ETag this client holds (or `*`): 304 (no body) while it "
                                       "is still current"),
) -> Precondition:
    """A read route's dependency: the request's preconditions, which the route evaluates against the representation
    it read (`Precondition.read`). Declaring them is what keeps `refuse_unevaluated` from refusing them."""
    return Precondition(EntityTags.parse(if_match), EntityTags.parse(if_none_match, weak=True))


CONDITIONAL_READ = Depends(conditional_read)


async def precondition(
    request: Request,
    if_match: str | None = Header(None, description='Write only if the resource\'s ETag is one of these '
                                  '(`"17-9c1e02ab44d1"`) or it exists (`*`); else 412'),
    if_none_match: str | None = Header(None, description="`*`: create only, 412 if the resource exists"),
) -> Precondition:
    """A route dependency: the request's preconditions (evaluated where the write happens). A conditional write
    is safe to resend after its backend died (`serve_apps.resend`): 412 if its first try took effect."""
    pre = Precondition(EntityTags.parse(if_match), EntityTags.parse(if_none_match, weak=True))
    if if_match is not None or if_none_match is not None:
        request.state.resend_advice = ("it may have taken effect; resending it is safe (it is conditional: 412 if it "
                                       "took effect)")
    return pre


CONDITIONS = ("If-Match", "If-None-Match", "If-Unmodified-Since")
"""The preconditions a client may put on a request (RFC 9110, section 13.1)."""
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def unevaluated_conditions(dependant: Dependant) -> tuple[str, ...]:
    """The preconditions of `CONDITIONS` a route never reads: a condition a write ignores is one a client believes
    holds, e.g. `If-Match` on `PUT /v1/lifecycle-policy` replaced a policy another admin had just changed, and a read
    that ignores If-Match answers a representation the client said not to (RFC 9110, 13.1.1: 412). A route reads a
    header by declaring it, in its signature or a dependency (a read: `CONDITIONAL_READ`)."""
    read = _headers_read(dependant)
    return tuple(header for header in CONDITIONS if header.lower() not in read)


def _headers_read(dependant: Dependant) -> set[str]:
    """The header names (lower case, ``-`` separated) `dependant` and its dependencies declare."""
    names = {param.alias.lower().replace("_", "-") for param in dependant.header_params}
    return names.union(*(_headers_read(sub) for sub in dependant.dependencies))


def refuse_unevaluated(request: Request) -> None:
    """412 for a request carrying a condition its route does not evaluate (the route's `unevaluated`, kept by
    `serve_apps.json_route.JsonRoute`): refused rather than ignored, as for telemetry (`unconditional`), before
    anything is written or read. `serve_apps.deps.require` calls it once the caller's key, rate limit and role
    passed, so an anonymous caller gets 401 (and a reader 403) whatever headers it sends, never an answer about the
    route."""
    headers: tuple[str, ...] = getattr(request.scope.get("route"), "unevaluated", ())
    for header in headers:
        if (value := request.headers.get(header)) is not None:
            honoured = [h for h in CONDITIONS if h not in headers]
            write = request.method in WRITES
            instead = f" (this {'write' if write else 'read'} evaluates {' and '.join(honoured)})" if honoured else ""
            raise PreconditionFailed(
                f"{request.method} {request.url.path} does not evaluate {header}, so {header}: {value} is refused "
                f"rather than ignored; {'nothing was changed' if write else 'nothing is answered'}. Send it without "
                f"{header}{instead}", details=[{"header": header, "current_revision": None}])


def unconditional(what: str, why: str) -> Any:
    """A route dependency for a write that takes no precondition: `If-Match` / `If-None-Match` get 412, not
    silence (a client that sends one believes the write is conditional, and telemetry with a stale If-Match
    was applied). `what` names the write, `why` says what orders it instead. Declare it as a parameter after the
    route's key (`who: Principal = WRITER`): dependencies run in that order, and a route's own `dependencies=` list
    runs before them all, so there it would answer 412 before the credentials were checked."""

    async def refuse(if_match: str | None = Header(None, include_in_schema=False),
                     if_none_match: str | None = Header(None, include_in_schema=False),
                     if_unmodified_since: str | None = Header(None, include_in_schema=False)) -> None:
        for header, value in (("If-Match", if_match), ("If-None-Match", if_none_match),
                              ("If-Unmodified-Since", if_unmodified_since)):
            if value is not None:
                raise PreconditionFailed(
                    f"{what} is not a conditional write ({why}), so {header}: {value} is refused rather than "
                    "ignored; nothing was applied. Send it without If-Match / If-None-Match / If-Unmodified-Since",
                    details=[{"header": header, "current_revision": None}])

    return Depends(refuse)
