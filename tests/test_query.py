"""The query language, sort, pagination and graph walks, in-process (no Ray), against brute force:
random queries over 10,000 generated assets, each built twice, as query text and as a Python
predicate over plain dicts, which must agree."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from raytwin.graph import adjacency, walk
from raytwin.query import QuerySyntaxError, Record, evaluate, live_fields, needs_state, parse, type_scope
from raytwin.query_pages import InvalidCursor, encode_cursor, fingerprint, paginate, parse_sort

N = 10_000
SITES = ["north", "south", "east", "west"]
TYPES = ["thermal_rc", "battery", "tanks"]
VERSIONS = ["1.0.0", "1.2.0", "1.10.0", "2.0.0"]
SECRET = b"k" * 32


def generate(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        meta = {}
        if rng.random() < 0.8:
            meta["site"] = rng.choice(SITES)
        if rng.random() < 0.5:
            meta["floor"] = str(rng.randint(0, 9))
        rels = [("part_of" if rng.random() < 0.5 else "feeds", f"a{rng.randrange(n):05d}") for _ in range(rng.randint(0, 2))]
        state = {"T_in": round(rng.uniform(280, 310), 2), "T_m": round(rng.uniform(280, 310), 2)} \
            if rng.random() < 0.9 else None
        out.append({"id": f"a{i:05d}", "type": rng.choice(TYPES), "version": rng.choice(VERSIONS),
                    "metadata": meta, "rels": [(k, t) for k, t in rels if t != f"a{i:05d}"], "state": state})
    return out


def record(d: dict) -> Record:
    asset = SimpleNamespace(id=d["id"], type_name=d["type"], type_version=d["version"], metadata=d["metadata"],
                            relationships=[SimpleNamespace(kind=k, target=t) for k, t in d["rels"]])
    live = None if d["state"] is None else {"state": d["state"], "std": {k: 0.5 for k in d["state"]}}
    return Record.of(asset, live)


def vkey(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


OPS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
       "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def atom(rng: random.Random):
    """(query text, predicate over the generated dicts) for one random comparison."""
    kind = rng.choice(["type", "site", "floor", "version", "T_in", "in", "exists", "rel"])
    op = rng.choice(list(OPS))
    if kind == "type":
        v = rng.choice(TYPES)
        return f'type {op} "{v}"', lambda d: OPS[op](d["type"], v)
    if kind in ("site", "floor"):
        v = rng.choice(SITES) if kind == "site" else str(rng.randint(0, 9))
        return (f"metadata.{kind} {op} '{v}'",
                lambda d: kind in d["metadata"] and OPS[op](d["metadata"][kind], v))
    if kind == "version":
        v = rng.choice(VERSIONS)
        return f'version {op} "{v}"', lambda d: OPS[op](vkey(d["version"]), vkey(v))
    if kind == "T_in":
        v = round(rng.uniform(280, 310), 1)
        return f"state.T_in {op} {v}", lambda d: d["state"] is not None and OPS[op](d["state"]["T_in"], v)
    if kind == "in":
        vs = rng.sample(SITES, 2)
        return f"metadata.site in {vs}".replace("'", '"'), lambda d: d["metadata"].get("site") in vs
    if kind == "exists":
        f = rng.choice(["metadata.floor", "state.T_m", "relationships.feeds"])
        pred = {"metadata.floor": lambda d: "floor" in d["metadata"], "state.T_m": lambda d: d["state"] is not None,
                "relationships.feeds": lambda d: any(k == "feeds" for k, _ in d["rels"])}[f]
        return f"exists({f})", pred
    target = f"a{rng.randrange(N):05d}"
    return (f'relationships.part_of == "{target}"',
            lambda d: any(k == "part_of" and t == target for k, t in d["rels"]))


def random_query(rng: random.Random, depth: int = 0):
    if depth >= 3 or rng.random() < 0.35:
        return atom(rng)
    form = rng.choice(["and", "or", "not"])
    if form == "not":
        text, pred = random_query(rng, depth + 1)
        return f"not ({text})", lambda d: not pred(d)
    (lt, lp), (rt, rp) = random_query(rng, depth + 1), random_query(rng, depth + 1)
    if form == "and":
        return f"({lt}) and ({rt})", lambda d: lp(d) and rp(d)
    return f"({lt}) or ({rt})", lambda d: lp(d) or rp(d)


@pytest.fixture(scope="module")
def assets():
    data = generate(N)
    return data, [record(d) for d in data]


def test_filters_agree_with_brute_force_on_10000_assets(assets):
    data, records = assets
    rng = random.Random(11)
    nonempty = 0
    for _ in range(60):
        text, pred = random_query(rng)
        expr = parse(text)
        got = {r.id for r in records if evaluate(expr, r)}
        want = {d["id"] for d in data if pred(d)}
        assert got == want, text
        nonempty += 0 < len(want) < N
        # the catalog-only pass never drops an asset that matches with its state
        catalog = {r.id for r in records if evaluate(expr, r, live=False) is not False}
        assert want <= catalog, text
        assert needs_state(expr) == ("state." in text)
    assert nonempty > 30  # the generated queries discriminate


def test_the_example_query(assets):
    data, records = assets
    expr = parse('type == "thermal_rc" and metadata.site == "north" and state.T_in > 298.15')
    got = [r.id for r in records if evaluate(expr, r)]
    want = [d["id"] for d in data if d["type"] == "thermal_rc" and d["metadata"].get("site") == "north"
            and d["state"] is not None and d["state"]["T_in"] > 298.15]
    assert got == want and len(want) > 100


@pytest.mark.parametrize("text, position, says", [
    ('type == "a" and', 15, "expected a field"),
    ('type = "a"', 5, "unexpected character '='"),
    ('metadata.site == "north', 17, "unterminated string"),
    ("state.T_in > 'hot'", 13, "is a number"),
    ("type > 3", 7, "is a string"),
    ("colour == 'red'", 0, "unknown field 'colour'"),
    ("relationships.owns == 'x'", 0, "needs a kind"),
    ("(type == 'a'", 12, "expected ')'"),
    ("type == 'a' type", 12, "expected 'and', 'or'"),
    ("version > '1.x'", 10, "MAJOR.MINOR.PATCH"),
    ("metadata.site in ['a' 'b']", 22, "',' or ']'"),
    ("exists metadata.site", 7, "'(' after exists"),
])
def test_malformed_queries_say_where(text, position, says):
    with pytest.raises(QuerySyntaxError) as err:
        parse(text)
    assert err.value.position == position and says in err.value.reason, err.value


def test_nesting_is_bounded():
    with pytest.raises(QuerySyntaxError, match="nested deeper"):
        parse("(" * 100 + "id == 'a'" + ")" * 100)
    with pytest.raises(QuerySyntaxError, match="nested deeper"):
        parse("not " * 100 + "id == 'a'")


def test_pagination_walks_every_match_once_in_order(assets):
    data, records = assets
    expr = parse("exists(metadata.site)")
    matching = [r for r in records if evaluate(expr, r)]
    sort = ["metadata.site", "-state.T_in"]
    keys, bound = parse_sort(sort), fingerprint("acme", "exists(metadata.site)", sort)
    seen, cursor = [], None
    while True:
        page = paginate(matching, keys, ["metadata.site", "state.T_in"], 997, SECRET, bound, cursor)
        seen += page.items
        cursor = page.next_cursor
        if cursor is None:
            break
    want = sorted((d for d in data if "site" in d["metadata"]),
                  key=lambda d: (d["metadata"]["site"], d["state"] is None,
                                 -(d["state"] or {"T_in": 0})["T_in"], d["id"]))
    assert [i["id"] for i in seen] == [d["id"] for d in want]
    assert seen[0] == {"id": want[0]["id"], "metadata": {"site": "east"}, "state": {"T_in": want[0]["state"]["T_in"]}}


def test_pagination_by_version_orders_semantically(assets):
    _, records = assets
    keys = parse_sort(["-version"])
    bound = fingerprint("acme", "", ["-version"])
    first = paginate(records, keys, ["version"], 3000, SECRET, bound)
    second = paginate(records, keys, ["version"], 3000, SECRET, bound, first.next_cursor)
    versions = [i["version"] for i in first.items + second.items]
    assert versions == sorted(versions, key=vkey, reverse=True) and versions[0] == "2.0.0"
    assert len({i["id"] for i in first.items} & {i["id"] for i in second.items}) == 0


def test_cursors_cannot_be_edited_forged_or_reused_for_another_query(assets):
    _, records = assets
    keys, bound = parse_sort([]), fingerprint("acme", "", [])
    cursor = paginate(records, keys, ["id"], 10, SECRET, bound).next_cursor
    payload, mac = cursor.split(".")
    tampered = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1] + "." + mac
    for bad in (tampered, encode_cursor(b"other-key", bound, ["a00000"]), "garbage"):
        with pytest.raises(InvalidCursor, match="altered"):
            paginate(records, keys, ["id"], 10, SECRET, bound, bad)
    with pytest.raises(InvalidCursor, match="another query"):
        paginate(records, keys, ["id"], 10, SECRET, fingerprint("globex", "", []), cursor)


def node(asset_id: str, *rels: tuple[str, str]):
    return SimpleNamespace(id=asset_id, relationships=[SimpleNamespace(kind=k, target=t) for k, t in rels])


def test_graph_walks_are_cycle_safe_and_depth_limited():
    assets = [node("site"), node("zone1", ("part_of", "site")), node("zone2", ("part_of", "site")),
              node("ahu", ("feeds", "zone1"), ("part_of", "site")), node("chiller", ("feeds", "ahu")),
              node("pump", ("feeds", "chiller")), node("tower", ("feeds", "pump"), ("contains", "fan")),
              node("fan"), node("loop", ("feeds", "tower"))]
    assets[5].relationships.append(SimpleNamespace(kind="feeds", target="tower"))  # pump -> tower: a cycle
    down = walk(adjacency(assets, "descendants"), "site", 5)
    assert [(r.id, r.depth) for r in down.reached] == [("ahu", 1), ("zone1", 1), ("zone2", 1)]
    feeds = walk(adjacency(assets, "descendants", ["feeds"]), "chiller", 10)
    assert [(r.id, r.path) for r in feeds.reached] == [
        ("ahu", ("chiller", "ahu")), ("zone1", ("chiller", "ahu", "zone1"))]
    up = walk(adjacency(assets, "ancestors", ["feeds"]), "zone1", 10)  # through the pump/tower cycle
    assert [r.id for r in up.reached] == ["ahu", "chiller", "pump", "tower", "loop"] and not up.truncated
    assert up.reached[-1].kinds == ("feeds",) * 5
    short = walk(adjacency(assets, "ancestors", ["feeds"]), "zone1", 2)
    assert [r.id for r in short.reached] == ["ahu", "chiller"] and short.truncated
    assert [r.id for r in walk(adjacency(assets, "ancestors"), "fan", 3).reached] == ["tower", "loop", "pump"]


def test_items_showing_state_from_the_store_say_stale():
    asset = SimpleNamespace(id="a1", type_name="t", type_version="1.0.0", metadata={"site": "north"},
                            relationships=[])
    stale = Record.of(asset, {"state": {"T_in": 290.0}, "std": {"T_in": 0.5}, "stale": True})
    live = stale.with_state({"state": {"T_in": 291.0}, "std": {"T_in": 0.4}})
    assert stale.stale and not live.stale and not stale.with_state(None).stale
    keys, bound = parse_sort([]), fingerprint("acme", "", [])
    [shown] = paginate([stale], keys, ["state.T_in"], 10, SECRET, bound).items
    assert shown == {"id": "a1", "state": {"T_in": 290.0}, "stale": True}
    [hidden] = paginate([stale], keys, ["metadata.site"], 10, SECRET, bound).items
    assert hidden == {"id": "a1", "metadata": {"site": "north"}}  # no state shown: nothing stale shown
    assert paginate([live], keys, ["std"], 10, SECRET, bound).items == [{"id": "a1", "std": {"T_in": 0.4}}]


@pytest.mark.parametrize("text, scope", [
    ('type == "battery" and state.T_in > 1', {"battery"}),
    ('type in ["battery", "tanks"] and (type == "tanks" and exists(state.T_m))', {"tanks"}),
    ('type == "battery" or state.T_in > 1', None), ('not type == "battery"', None), ("state.T_in > 1", None),
])
def test_the_types_a_query_keeps_to_bound_the_state_names_it_may_read(text, scope):
    """Only a top-level ``type == / in`` narrows the types whose states a query reads (the server refuses other
    names): under `or` or `not` any type may match."""
    expr = parse(text)
    assert type_scope(expr) == (None if scope is None else frozenset(scope))
    assert [f.path for f in live_fields(expr)] == [p for p in ("state.T_in", "state.T_m") if p in text]
