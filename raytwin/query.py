"""The asset filter language: parse a query string into an expression tree and evaluate it.

Grammar (keywords are lower case; whitespace between tokens is free)::

    query      := [or_expr]                        -- empty: every asset
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | primary
    primary    := "(" or_expr ")"
                | "exists" "(" field ")"
                | field ("==" | "!=" | "<" | "<=" | ">" | ">=") literal
                | field "in" "[" literal ("," literal)* "]"
    field      := "id" | "type" | "version" | "metadata." NAME | "state." NAME | "std." NAME
                | "relationships." ("contains" | "feeds" | "part_of")
    literal    := STRING ("..." or '...', with \\" \\' \\\\ escapes) | NUMBER

`state.<name>` and `std.<name>` are the live twin's estimate and its standard deviation
(numbers); every other field is a string. `version` compares by semantic version
(``"1.10.0" > "1.9.0"``). `relationships.<kind>` holds the targets of the asset's relationships
of that kind; a comparison on it holds when it holds for some target. A comparison with a missing
field (no such metadata key, no live state) is false, so ``not metadata.site == "north"`` also
matches assets without a site; a `state.`/`std.` name that no asset type of the tenant declares is
refused by the server instead (`live_fields`, `type_scope`, `serve_apps.asset_queries.check_state_names`),
as a typo would otherwise match nothing. Why hand-written: the language must never run code
(no `eval`), and a malformed query must say where it went wrong (`QuerySyntaxError.position`).

Evaluation is in two steps so the catalog and live state can live in different processes:
`evaluate(expr, record, None)` decides on the catalog alone (True/False, or None where live state
is needed), and the candidates left undecided are evaluated again with their state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

Value = str | float
Op = Literal["==", "!=", "<", "<=", ">", ">="]
RELATIONSHIP_KINDS = ("contains", "feeds", "part_of")
NUMERIC_ROOTS = ("state", "std")
MAX_QUERY_CHARS = 4096
MAX_DEPTH = 64


class QuerySyntaxError(ValueError):
    """A malformed query; `position` is the 0-based character offset of the offending token."""

    def __init__(self, message: str, position: int):
        super().__init__(f"{message} (at character {position})")
        self.reason = message
        self.position = position

    def __reduce__(self) -> tuple[type[QuerySyntaxError], tuple[str, int]]:
        """Rebuilt from its parts when it crosses processes (Ray, Serve), as the default pickle cannot."""
        return type(self), (self.reason, self.position)


# ------------------------------------------------------------------------------- the tree ----
@dataclass(frozen=True)
class Field:
    root: str  # id | type | version | metadata | state | std | relationships
    name: str | None = None  # the key after the dot

    @property
    def path(self) -> str:
        return self.root if self.name is None else f"{self.root}.{self.name}"

    @property
    def numeric(self) -> bool:
        return self.root in NUMERIC_ROOTS

    @property
    def live(self) -> bool:
        return self.root in NUMERIC_ROOTS


@dataclass(frozen=True)
class Compare:
    field: Field
    op: Op
    value: Value


@dataclass(frozen=True)
class In:
    field: Field
    values: tuple[Value, ...]


@dataclass(frozen=True)
class Exists:
    field: Field


@dataclass(frozen=True)
class Not:
    operand: Expr


@dataclass(frozen=True)
class And:
    operands: tuple[Expr, ...]


@dataclass(frozen=True)
class Or:
    operands: tuple[Expr, ...]


@dataclass(frozen=True)
class All:
    """The empty query."""


Expr = Compare | In | Exists | Not | And | Or | All


# ------------------------------------------------------------------------------ the lexer ----
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<number>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<punct>[()\[\],])
  | (?P<name>[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z_][A-Za-z0-9_\-]*)?)
""", re.VERBOSE)
KEYWORDS = {"and", "or", "not", "in", "exists"}


@dataclass(frozen=True)
class Token:
    kind: str  # number | string | op | punct | name | keyword | end
    text: str
    pos: int


def tokenize(text: str) -> list[Token]:
    if len(text) > MAX_QUERY_CHARS:
        raise QuerySyntaxError(f"query longer than {MAX_QUERY_CHARS} characters", MAX_QUERY_CHARS)
    out: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos] in "\"'":
                raise QuerySyntaxError("unterminated string", pos)
            raise QuerySyntaxError(f"unexpected character {text[pos]!r}", pos)
        kind = m.lastgroup or ""
        if kind != "ws":
            word = m.group()
            out.append(Token("keyword" if kind == "name" and word in KEYWORDS else kind, word, pos))
        pos = m.end()
    out.append(Token("end", "", len(text)))
    return out


# ----------------------------------------------------------------------------- the parser ----
class _Parser:
    def __init__(self, text: str):
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, kind: str, text: str, what: str) -> Token:
        if self.tok.kind != kind or self.tok.text != text:
            raise QuerySyntaxError(f"expected {what}, found {_describe(self.tok)}", self.tok.pos)
        return self.take()

    def query(self) -> Expr:
        if self.tok.kind == "end":
            return All()
        expr = self.or_expr()
        if self.tok.kind != "end":
            raise QuerySyntaxError(f"expected 'and', 'or' or the end of the query, found {_describe(self.tok)}",
                                   self.tok.pos)
        return expr

    def nest(self) -> None:
        """Count one level down (the parser recurses: a bound keeps a hostile query from the stack limit)."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise QuerySyntaxError(f"query nested deeper than {MAX_DEPTH} levels", self.tok.pos)

    def or_expr(self) -> Expr:
        self.nest()
        parts = [self.and_expr()]
        while self.tok.kind == "keyword" and self.tok.text == "or":
            self.take()
            parts.append(self.and_expr())
        self.depth -= 1
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def and_expr(self) -> Expr:
        parts = [self.not_expr()]
        while self.tok.kind == "keyword" and self.tok.text == "and":
            self.take()
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def not_expr(self) -> Expr:
        if self.tok.kind == "keyword" and self.tok.text == "not":
            self.take()
            self.nest()
            operand = self.not_expr()
            self.depth -= 1
            return Not(operand)
        return self.primary()

    def primary(self) -> Expr:
        tok = self.tok
        if tok.kind == "punct" and tok.text == "(":
            self.take()
            expr = self.or_expr()
            self.expect("punct", ")", "')'")
            return expr
        if tok.kind == "keyword" and tok.text == "exists":
            self.take()
            self.expect("punct", "(", "'(' after exists")
            field = self.field()
            self.expect("punct", ")", "')'")
            return Exists(field)
        field = self.field()
        if self.tok.kind == "op":
            op = self.take().text
            return Compare(field, op, self.literal(field, ordered=op not in ("==", "!=")))  # type: ignore[arg-type]
        if self.tok.kind == "keyword" and self.tok.text == "in":
            self.take()
            self.expect("punct", "[", "'[' after in")
            values = [self.literal(field)]
            while self.tok.kind == "punct" and self.tok.text == ",":
                self.take()
                values.append(self.literal(field))
            self.expect("punct", "]", "',' or ']'")
            return In(field, tuple(values))
        raise QuerySyntaxError(f"expected a comparison (==, !=, <, <=, >, >=) or 'in' after {field.path}, "
                               f"found {_describe(self.tok)}", self.tok.pos)

    def field(self) -> Field:
        tok = self.tok
        if tok.kind != "name":
            raise QuerySyntaxError(f"expected a field (id, type, version, metadata.<key>, state.<name>, "
                                   f"std.<name>, relationships.<kind>), found {_describe(tok)}", tok.pos)
        self.take()
        return parse_field(tok.text, tok.pos)

    def literal(self, field: Field, ordered: bool = False) -> Value:
        tok = self.take()
        if tok.kind == "number":
            if not field.numeric:
                raise QuerySyntaxError(f"{field.path} is a string: compare it with a quoted string", tok.pos)
            return float(tok.text)
        if tok.kind == "string":
            if field.numeric:
                raise QuerySyntaxError(f"{field.path} is a number: compare it with a number", tok.pos)
            value = re.sub(r"\\(.)", r"\1", tok.text[1:-1])
            if field.root == "version" and ordered and semver(value) is None:
                raise QuerySyntaxError(f"version compares as MAJOR.MINOR.PATCH; {value!r} is not one", tok.pos)
            return value
        raise QuerySyntaxError(f"expected a number or a quoted string, found {_describe(tok)}", tok.pos)


def parse_field(text: str, pos: int = 0) -> Field:
    """A field path (as in queries, `sort` and `fields`); `pos` places errors in the caller's text."""
    root, _, name = text.partition(".")
    if root in ("id", "type", "version") and not name:
        return Field(root)
    if root in ("metadata", "state", "std") and name:
        return Field(root, name)
    if root == "relationships" and name in RELATIONSHIP_KINDS:
        return Field(root, name)
    if root == "relationships":
        raise QuerySyntaxError(f"relationships.<kind> needs a kind among {', '.join(RELATIONSHIP_KINDS)}", pos)
    raise QuerySyntaxError(f"unknown field {text!r}: use id, type, version, metadata.<key>, state.<name>, "
                           f"std.<name> or relationships.<kind>", pos)


def _describe(tok: Token) -> str:
    return "the end of the query" if tok.kind == "end" else repr(tok.text)


def parse(text: str) -> Expr:
    """The expression for `text`; `QuerySyntaxError` (with the character position) if malformed."""
    return _Parser(text).query()


def needs_state(expr: Expr) -> bool:
    """Whether deciding `expr` needs live state (`state.*`, `std.*`)."""
    match expr:
        case Compare(field=f) | In(field=f) | Exists(field=f):
            return f.live
        case Not(operand=e):
            return needs_state(e)
        case And(operands=es) | Or(operands=es):
            return any(needs_state(e) for e in es)
    return False


def live_fields(expr: Expr) -> list[Field]:
    """The `state.*`/`std.*` fields `expr` reads, in order: the server checks their names against the
    tenant's asset types, as a misspelt name would otherwise match nothing without a word."""
    match expr:
        case Compare(field=f) | In(field=f) | Exists(field=f):
            return [f] if f.live else []
        case Not(operand=e):
            return live_fields(e)
        case And(operands=es) | Or(operands=es):
            return [f for e in es for f in live_fields(e)]
    return []


def type_scope(expr: Expr) -> frozenset[str] | None:
    """The type names `expr` keeps to by a top-level ``type == ...`` or ``type in [...]`` (None: any type),
    whose states alone its state fields can be read from."""
    match expr:
        case Compare(field=Field(root="type"), op="==", value=v):
            return frozenset((str(v),))
        case In(field=Field(root="type"), values=vs):
            return frozenset(str(v) for v in vs)
        case And(operands=es):
            scopes = [s for e in es if (s := type_scope(e)) is not None]
            return frozenset.intersection(*scopes) if scopes else None
    return None


# --------------------------------------------------------------------------- evaluation ----
@dataclass(frozen=True)
class Record:
    """What a query sees of one asset; `state`/`std` None: live state not loaded (or no twin);
    `stale`: the state is the twin's last durable one (its shard was restarting)."""

    id: str
    type: str
    version: str
    metadata: Mapping[str, str]
    relationships: Mapping[str, tuple[str, ...]]
    state: Mapping[str, float] | None = None
    std: Mapping[str, float] | None = None
    stale: bool = False

    @classmethod
    def of(cls, asset: Any, state: Mapping[str, Any] | None = None) -> Record:
        """From an `Asset` and, optionally, its twin state (a dict with ``state`` and ``std``)."""
        rels: dict[str, list[str]] = {}
        for r in asset.relationships:
            rels.setdefault(r.kind, []).append(r.target)
        return cls(asset.id, asset.type_name, asset.type_version, asset.metadata,
                   {k: tuple(v) for k, v in rels.items()}).with_state(state)

    def with_state(self, state: Mapping[str, Any] | None) -> Record:
        """This record with a twin's live state (a dict with ``state``, ``std`` and optionally ``stale``)
        attached: what the catalog built once is reused by every query instead of being rebuilt per asset."""
        if state is None:
            return self if self.state is None else replace(self, state=None, std=None, stale=False)
        return replace(self, state=state.get("state", {}), std=state.get("std", {}), stale=bool(state.get("stale")))

    def values(self, field: Field) -> tuple[Value, ...]:
        """The field's values (none: missing; several: relationship targets)."""
        if field.root == "id":
            return (self.id,)
        if field.root == "type":
            return (self.type,)
        if field.root == "version":
            return (self.version,)
        if field.root == "metadata":
            v = self.metadata.get(field.name or "")
            return () if v is None else (v,)
        if field.root == "relationships":
            return self.relationships.get(field.name or "", ())
        source = self.state if field.root == "state" else self.std
        v = None if source is None else source.get(field.name or "")
        return () if v is None else (float(v),)


def semver(text: str) -> tuple[int, int, int] | None:
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def _holds(field: Field, op: str, left: Value, right: Value) -> bool:
    if op == "==":
        return left == right
    if op == "!=":
        return left != right
    if field.root == "version":
        a, b = semver(str(left)), semver(str(right))
        if a is None or b is None:
            return False
        left, right = a, b  # type: ignore[assignment]
    if op == "<":
        return left < right  # type: ignore[operator]
    if op == "<=":
        return left <= right  # type: ignore[operator]
    if op == ">":
        return left > right  # type: ignore[operator]
    return left >= right  # type: ignore[operator]


def evaluate(expr: Expr, record: Record, live: bool = True) -> bool | None:
    """Whether `record` matches; with ``live=False`` a part that needs live state is None (unknown),
    combined by three-valued logic, so False means "no state can make it match"."""
    match expr:
        case All():
            return True
        case Compare(field=f, op=op, value=v):
            if f.live and not live:
                return None
            return any(_holds(f, op, x, v) for x in record.values(f))
        case In(field=f, values=vs):
            if f.live and not live:
                return None
            return any(x in vs for x in record.values(f))
        case Exists(field=f):
            if f.live and not live:
                return None
            return bool(record.values(f))
        case Not(operand=e):
            r = evaluate(e, record, live)
            return None if r is None else not r
        case And(operands=es):
            return _connective(es, record, live, decisive=False)
        case Or(operands=es):
            return _connective(es, record, live, decisive=True)
    raise TypeError(f"not a query expression: {expr!r}")


def _connective(operands: tuple[Expr, ...], record: Record, live: bool, *, decisive: bool) -> bool | None:
    """Three-valued `and` (`decisive` False) or `or` (True): an operand equal to `decisive` decides at once;
    otherwise any unknown operand (None: live state not read) makes the whole unknown."""
    unknown = False
    for e in operands:
        r = evaluate(e, record, live)
        if r is decisive:
            return decisive
        unknown |= r is None
    return None if unknown else not decisive
