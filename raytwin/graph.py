"""Traversal of the asset graph along relationships: descendants, ancestors, paths.

Relationships are stored on their source asset (``A --feeds--> B``). For traversal each one is
read as a parent -> child edge: ``contains`` and ``feeds`` point from parent to child, ``part_of``
from child to parent (``zone part_of site``: the site is the zone's parent). Descendants follow
edges to children, ancestors to parents. Breadth-first with a visited set: every asset appears
once, at its shortest depth, with one shortest path from the start, so cycles (``feeds`` loops
are legitimate: a chilled-water loop) end the walk instead of looping, and `max_depth` bounds
the work on deep graphs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from raytwin.query import RELATIONSHIP_KINDS

Direction = Literal["descendants", "ancestors"]
DOWNWARD = {"contains": True, "feeds": True, "part_of": False}  # does source -> target point to a child?


@dataclass(frozen=True)
class Reached:
    id: str
    depth: int
    path: tuple[str, ...]  # from the start to this asset, both included
    kinds: tuple[str, ...]  # the relationship kind of each step of `path`


@dataclass(frozen=True)
class Walk:
    reached: list[Reached]
    truncated: bool  # some asset lies beyond max_depth


def adjacency(assets: Iterable[Any], direction: Direction,
              kinds: Iterable[str] = RELATIONSHIP_KINDS) -> dict[str, list[tuple[str, str]]]:
    """id -> [(neighbour, kind)] in `direction`, over `Asset`s (anything with id and relationships)."""
    wanted = set(kinds)
    out: dict[str, list[tuple[str, str]]] = {}
    for a in assets:
        for r in a.relationships:
            if r.kind not in wanted:
                continue
            parent, child = (a.id, r.target) if DOWNWARD[r.kind] else (r.target, a.id)
            src, dst = (parent, child) if direction == "descendants" else (child, parent)
            out.setdefault(src, []).append((dst, r.kind))
    for edges in out.values():
        edges.sort()
    return out


def walk(edges: dict[str, list[tuple[str, str]]], start: str, max_depth: int) -> Walk:
    """The assets reachable from `start` within `max_depth` steps (the start not included), breadth-first."""
    seen = {start}
    frontier: deque[Reached] = deque([Reached(start, 0, (start,), ())])
    out: list[Reached] = []
    truncated = False
    while frontier:
        node = frontier.popleft()
        for nxt, kind in edges.get(node.id, ()):
            if nxt in seen:
                continue
            if node.depth == max_depth:
                truncated = True
                continue
            seen.add(nxt)
            step = Reached(nxt, node.depth + 1, node.path + (nxt,), node.kinds + (kind,))
            out.append(step)
            frontier.append(step)
    return Walk(out, truncated)
