"""Telemetry as columns: the table schemas, the contract check of a whole table, and its entries.

Why columns: at tens of thousands of events per second a pydantic object, a dict and a tuple
per event cost more than the filter. Tables are checked with Arrow/NumPy vector operations
applying the rules of the `TelemetryEvent` contract; a row that fails the fast check (or a
table the fast check cannot read, e.g. a JSON `measurements` column) is re-checked row by row
by the contract itself (`parse_rows`), so its dead-letter reason is exactly the contract's and a
row the fast check is stricter about than the contract is still accepted. Validated tables
(`VALIDATED_SCHEMA`: defaults filled in) travel to the shard actors as Arrow (cheap to pickle).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import TypeAdapter

from raytwin import units
from raytwin.contracts import MAX_FUTURE_SKEW, SCHEMA_VERSION, AssetType, Identifier, TelemetryEvent, describe_error
from raytwin.statestore import TIME, to_micros

MEASUREMENTS = pa.map_(pa.string(), pa.struct([("value", pa.float64()), ("unit", pa.string())]))
TELEMETRY_SCHEMA = pa.schema([
    ("asset_id", pa.string()),
    ("event_time", TIME),
    ("sequence", pa.int64()),
    ("idempotency_key", pa.string()),
    ("quality", pa.string()),
    ("measurements", MEASUREMENTS),
])
"""The canonical telemetry table (files, replays); `ingest_time` may be added as a column."""
VALIDATED_SCHEMA = TELEMETRY_SCHEMA.append(pa.field("ingest_time", TIME))
"""A contract-checked table: no nulls, idempotency key, quality and ingest time filled in."""

_TYPES = {f.name: f.type for f in VALIDATED_SCHEMA}
_REQUIRED = {"asset_id", "event_time", "sequence", "measurements"}
_IDENTIFIER = TypeAdapter(Identifier).json_schema()["pattern"]
_QUALITIES = pa.array(["good", "uncertain", "bad"])
_MAX_SKEW_US = MAX_FUTURE_SKEW // timedelta(microseconds=1)
_KNOWN_IDS_MAX, _KNOWN_ID_CHARS = 20_000, 256
_known_ids: dict[str, bool] = {}
"""Asset ids already checked against `_IDENTIFIER`: a stream names the same assets in every batch, and
Arrow compiles the pattern on every call (~0.2 ms: its {0,127} repeat), more than the rest of a small
batch's column checks together. At most `_KNOWN_IDS_MAX` ids of at most `_KNOWN_ID_CHARS` characters
(a few MB): a stream of ever new or very long ids is checked every time instead."""


def events_to_table(events: Iterable[TelemetryEvent], schema: pa.Schema = TELEMETRY_SCHEMA) -> pa.Table:
    """Events in the canonical telemetry table form (for files and replays)."""
    rows = [{
        "asset_id": e.asset_id, "event_time": e.event_time, "sequence": e.sequence,
        "idempotency_key": e.idempotency_key, "quality": e.quality, "ingest_time": e.ingest_time,
        "measurements": [(k, {"value": m.value, "unit": m.unit}) for k, m in e.measurements.items()],
    } for e in events]
    return pa.Table.from_pylist(rows, schema=schema)


def validated_table(events: Iterable[TelemetryEvent]) -> pa.Table:
    """Already validated events as a `VALIDATED_SCHEMA` table."""
    return events_to_table(events, VALIDATED_SCHEMA)


def table_bytes(table: pa.Table) -> bytes:
    """`table` as an Arrow IPC stream: how batches travel to shard actors. Why: Ray pickles a
    `pyarrow.Table` buffer by buffer in Python (~27 % of a live stream's driver time at 10k
    events/s, 2 shards); bytes cross as they are, and reading them back costs ~20 us."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def bytes_table(payload: pa.Table | bytes) -> pa.Table:
    """A table sent as `table_bytes` (a table is returned as is)."""
    return payload if isinstance(payload, pa.Table) else pa.ipc.open_stream(payload).read_all()


def parse_rows(rows: Iterable[Any]) -> tuple[list[TelemetryEvent], list[dict[str, str]]]:
    """Contract-check raw rows one by one: (valid events, rejects with raw JSON and a one-line reason).

    Whatever one row raises makes that row a reject: a row must never fail its batch, or an
    at-least-once producer re-delivering the batch would be stuck on it forever."""
    events, rejects = [], []
    for row in rows:
        try:
            if not isinstance(row, dict):
                raise TypeError(f"a telemetry row must be a JSON object, not {type(row).__name__}")
            data = {k: v for k, v in row.items() if v is not None}
            m = data.get("measurements")
            if isinstance(m, str):
                data["measurements"] = json.loads(m)
            elif isinstance(m, list):  # an Arrow map arrives as (key, value) pairs
                data["measurements"] = dict(m)
            events.append(TelemetryEvent.model_validate(data))
        except Exception as exc:  # noqa: BLE001 - see the docstring
            rejects.append(_dead_letter(row, describe_error(exc)))
    return events, rejects


def _dead_letter(row: Any, reason: str) -> dict[str, str | None]:
    """The dead letter of a row the contract refused: its asset and key when they are text, the reason,
    and the row as JSON (or, for a row JSON cannot hold, a bounded description of it)."""
    text = lambda v: _escaped(v) if isinstance(v, str) else None  # noqa: E731
    fields = row if isinstance(row, dict) else {}
    return {"asset_id": text(fields.get("asset_id")), "idempotency_key": text(fields.get("idempotency_key")),
            "reason": _escaped(reason), "raw": _raw_json(row)}


def _escaped(text: str) -> str:
    """`text` with what Arrow cannot store (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _raw_json(row: Any) -> str:
    """The row as JSON (times as text). A row JSON cannot hold (nesting beyond the recursion limit, an
    integer beyond Python's 4,300-digit conversion limit, keys of mixed types) is described by its type
    and the keys it has instead: the dead letter must still be written."""
    try:
        return json.dumps(row, default=str, sort_keys=True)
    except (ValueError, TypeError, RecursionError) as exc:
        keys = sorted(k[:64] for k in row if isinstance(k, str)) if isinstance(row, dict) else []
        return json.dumps({"unserializable": type(row).__name__, "keys": keys, "error": type(exc).__name__})


_ROW_KEYS = frozenset((*VALIDATED_SCHEMA.names, "schema_version"))
_ENTRY_KEYS = frozenset(("value", "unit"))
_NUMBERS = (float, int)
_TIMES = ("event_time", "ingest_time")
_JSON_SCHEMA = pa.schema([pa.field(f.name, pa.string()) if f.name in _TIMES else f for f in VALIDATED_SCHEMA])
_ISO_TIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$"
"""The time text Arrow and the contract read alike (Arrow also reads a bare "+01" offset, which the
contract refuses, and neither reads nanoseconds alike): other forms go to the contract."""
_MIN_US = -62_135_596_800_000_000  # 0001-01-01T00:00:00Z: Python's (and the contract's) first time
_MAX_US = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z: its last


def _json_shaped(row: Any) -> bool:
    """A parsed-JSON row that Arrow holds exactly as the contract reads it: known keys only (and the
    contract's schema version, if given), an integer sequence (Arrow would take 3.0 or true as a
    sequence), times as text (Arrow would read a naive `datetime` as UTC) and measurements as
    objects of a number (not a boolean, which Arrow takes as 1.0) and a unit (Arrow would drop an
    unknown key the contract refuses)."""
    if type(row) is not dict or not row.keys() <= _ROW_KEYS or type(row.get("sequence")) is not int:
        return False
    version = row.get("schema_version", SCHEMA_VERSION)
    if type(version) is not int or version != SCHEMA_VERSION:
        return False
    for name in _TIMES:
        value = row.get(name)
        if not (value is None or isinstance(value, str)):
            return False
    m = row.get("measurements")
    if type(m) is not dict:
        return False
    for e in m.values():  # loops, not generators: this runs for every row of a live stream (~1 us)
        if type(e) is not dict or not e.keys() <= _ENTRY_KEYS or type(e.get("value")) not in _NUMBERS:
            return False
    return True


def rows_table(rows: list[Any]) -> pa.Table | None:
    """Parsed-JSON telemetry rows (e.g. NDJSON lines) as a telemetry table for `validate_table`,
    or None when some row is not plainly JSON-shaped or Arrow cannot read a value exactly (wrong
    type, a number beyond 64 bits, text Arrow cannot store, a time in another form than
    `_ISO_TIME` or outside the years 1-9999 in UTC): those are checked row by row by the contract.

    Why: building an Arrow table costs ~1 us a row, the contract ~40 us (pydantic plus the table
    built from its events), which would bound a live stream to ~25k events/s per core.
    """
    if not all(_json_shaped(r) for r in rows):
        return None
    try:
        table = pa.Table.from_pylist(rows, schema=_JSON_SCHEMA)
        text = pa.concat_arrays([table.column(name).combine_chunks() for name in _TIMES])  # one pattern compile
        if pc.match_substring_regex(text, _ISO_TIME).false_count:
            return None
        us = text.cast(TIME)
        if not _in_range(_micros(us, 0)).all():
            return None
        for i, name in enumerate(_TIMES):
            table = table.set_column(table.schema.get_field_index(name), name, us.slice(i * len(rows), len(rows)))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeEncodeError):
        return None
    return table


def _in_range(us: np.ndarray) -> np.ndarray:
    """Whether each time (microseconds since the epoch) lies in the years 1-9999 (UTC), the times
    Python and the contract can hold."""
    return (us >= _MIN_US) & (us <= _MAX_US)


def _known_units(unit_column: pa.Array) -> np.ndarray:
    """Whether each unit is known (False where null): each distinct unit string parsed once per batch,
    and once per process through `units.is_unit`'s cache."""
    encoded = unit_column.dictionary_encode()
    return _per_row(encoded, [units.is_unit(u) for u in encoded.dictionary.to_pylist()])


def _micros(times: pa.Array | pa.ChunkedArray, null: int) -> np.ndarray:
    """Times as microseconds since the epoch, `null` where missing."""
    return _filled(times.cast(pa.int64()), null)


def _filled(values: pa.Array | pa.ChunkedArray, null: Any) -> np.ndarray:
    """`values` as NumPy, `null` where missing. Why: `pc.fill_null` costs ~20-60 us of Python and Arrow set-up
    however few the rows, and a live stream's chunk of ~200 rows has a dozen columns to read, most without a
    null; those are read as they are."""
    return (pc.fill_null(values, null) if values.null_count else values).to_numpy(zero_copy_only=False)


def _identifiers(ids: pa.Array) -> np.ndarray:
    """Whether each id matches the contract's `Identifier` pattern (False where null), each distinct
    id checked once per process (`_known_ids`)."""
    encoded = ids.dictionary_encode()
    names = encoded.dictionary.to_pylist()
    verdicts = [_known_ids.get(n) for n in names]  # read once: another thread may clear the cache
    new = [n for n, v in zip(names, verdicts) if v is None]
    if new:
        checked = dict(zip(new, _bools(pc.match_substring_regex(pa.array(new, pa.string()), _IDENTIFIER)).tolist()))
        verdicts = [checked[n] if v is None else v for n, v in zip(names, verdicts)]
        remember = [(n, v) for n, v in checked.items() if len(n) <= _KNOWN_ID_CHARS][:_KNOWN_IDS_MAX]
        if len(_known_ids) + len(remember) > _KNOWN_IDS_MAX:
            _known_ids.clear()
        _known_ids.update(remember)
    return _per_row(encoded, verdicts)


def _per_row(encoded: pa.DictionaryArray, verdicts: Sequence[bool | None]) -> np.ndarray:
    """The verdict on each row's value from `verdicts` on the distinct values (False where null)."""
    by_code = np.array([*verdicts, False], dtype=bool)  # the last: null
    return by_code[_filled(encoded.indices, len(verdicts))]


def _python_rows(table: pa.Table) -> list[dict[str, Any]]:
    """The table's rows as Python values for the contract. Times Python cannot hold (a Parquet
    timestamp before year 1 or after 9999) become their ISO text (RFC 3339's "T" form, as the
    contract reads it), which the contract refuses with its reason, instead of failing the whole table."""
    try:
        return table.to_pylist()
    except (ValueError, OverflowError):
        for name in _TIMES:
            if name in table.column_names and pa.types.is_timestamp(table.schema.field(name).type):
                index = table.schema.get_field_index(name)
                text = pc.replace_substring(table.column(name).cast(pa.string()), " ", "T", max_replacements=1)
                table = table.set_column(index, name, text)
        return table.to_pylist()


ROW_COLUMN = "_row"
"""An optional column of a validated table sent to a shard: each event's position in the caller's list,
which the shard's rejects carry back (`actors.state.Reject.index`)."""
SOURCE_COLUMN = "_source"
"""An optional column of a validated table sent to a shard: where each event came from (a connector's
``mqtt://NAME/topic``), which leads the reason of the shard's dead letter of it, as a connector's own dead
letters are led: a connector's dead letters are then also those the twins wrote (unknown twin, too late)."""


def row_event(table: pa.Table, i: int) -> TelemetryEvent:
    """Row `i` of a validated table as a `TelemetryEvent` (for the rare row that needs one), judged by
    the clock it was validated at (its ingest time), not by this process's."""
    row = table.slice(i, 1).to_pylist()[0]
    row.pop(ROW_COLUMN, None)
    row.pop(SOURCE_COLUMN, None)
    return TelemetryEvent.model_validate({**row, "measurements": dict(row["measurements"])},
                                         context={"now": row["ingest_time"]})


class Entries(NamedTuple):
    """The measurement entries of a table's rows, flattened: entry j belongs to row `row[j]`."""

    offsets: np.ndarray  # (rows + 1,) entries of row i are offsets[i]:offsets[i + 1]
    row: np.ndarray
    names: pa.Array  # string
    items: pa.StructArray  # value, unit
    value: np.ndarray  # float64, NaN where missing

    @classmethod
    def of(cls, measurements: pa.Array) -> Entries:
        offsets = measurements.offsets.to_numpy().astype(np.int64)
        start, stop = int(offsets[0]), int(offsets[-1])
        items = measurements.items.slice(start, stop - start)
        value = items.field("value")
        # NaN where missing; without nulls (every validated batch) the values' own buffer, ~60x cheaper than a fill
        value = (pc.fill_null(value, np.nan) if value.null_count else value).to_numpy(zero_copy_only=False)
        return cls(offsets - start, np.repeat(np.arange(len(measurements)), np.diff(offsets)),
                   measurements.keys.slice(start, stop - start), items, value)


def _bools(arr: pa.Array) -> np.ndarray:
    return _filled(arr, False)


def _column(table: pa.Table, name: str) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(table.num_rows, _TYPES[name])
    return table.column(name).combine_chunks()


def _fast_checkable(schema: pa.Schema) -> bool:
    return _REQUIRED <= set(schema.names) <= set(_TYPES) and all(schema.field(n).type == _TYPES[n] for n in schema.names)


def validate_table(table: pa.Table, rows: list[Any] | None = None) -> tuple[pa.Table, list[dict[str, str]]]:
    """Contract-check a telemetry table: (valid rows as a `VALIDATED_SCHEMA` table in source order, rejects).

    `rows`: the parsed-JSON rows the table was built from (`rows_table`); a row the column check
    refuses is then re-checked as it arrived, so its dead letter is the one the row-by-row path
    writes (reason and raw JSON), whatever the path its batch took."""
    if not _fast_checkable(table.schema):
        events, rejects = parse_rows(_python_rows(table))
        return validated_table(events), rejects
    asset, event_time, sequence, key, quality, measurements, ingest_time = (
        _column(table, name) for name in VALIDATED_SCHEMA.names)
    now = datetime.now(UTC)
    now_us = to_micros(now)
    # the contract's clock rules (`TelemetryEvent`): nothing after the server's clock + skew, an event
    # not after its (earlier) ingest time + skew either, the ingest time defaulting to the clock
    ingest_us = _micros(ingest_time, now_us)
    event_us = _micros(event_time, 0)
    on_time = (ingest_us <= now_us + _MAX_SKEW_US) & (event_us <= np.minimum(ingest_us, now_us) + _MAX_SKEW_US)
    ingest_time = pc.fill_null(ingest_time, pa.scalar(now, TIME))
    if key.null_count:
        key = pc.if_else(key.is_null(), pc.binary_join_element_wise(asset, pc.cast(sequence, pa.string()), ":"), key)
    quality = pc.fill_null(quality, "good") if quality.null_count else quality
    key_length = pc.utf8_length(key)
    entries = Entries.of(measurements)
    ok = (_identifiers(asset) & _bools(event_time.is_valid()) & _in_range(event_us)
          & _in_range(ingest_us) & on_time & _bools(pc.greater_equal(sequence, 0))
          & _bools(pc.and_(pc.greater_equal(key_length, 1), pc.less_equal(key_length, 256)))
          & _bools(pc.is_in(quality, value_set=_QUALITIES))
          & _bools(measurements.is_valid()) & (np.diff(entries.offsets) >= 1))
    entry_ok = (_bools(entries.items.is_valid()) & np.isfinite(entries.value)
                & _known_units(entries.items.field("unit")))
    ok[entries.row[~entry_ok]] = False
    # a name twice in one row: the contract keeps the last one, so let it decide
    name_code = entries.names.dictionary_encode().indices.to_numpy().astype(np.int64)
    base = int(name_code.max(initial=0)) + 1
    pair = np.sort(entries.row * base + name_code)
    ok[pair[1:][pair[1:] == pair[:-1]] // base] = False

    valid = pa.table([asset, event_time, sequence, key, quality, measurements, ingest_time], schema=VALIDATED_SCHEMA)
    if ok.all():
        return valid, []
    bad = np.flatnonzero(~ok)
    rejects, rescued = [], []
    for i, row in zip(bad, _python_rows(table.take(bad)) if rows is None else [rows[i] for i in bad]):
        events, rejected = parse_rows([row])
        rejects += rejected
        rescued += [(int(i), e) for e in events]
    valid = valid.filter(ok)
    if rescued:  # rows only the contract could accept: back into source order
        order = np.concatenate([np.flatnonzero(ok), [i for i, _ in rescued]])
        valid = pa.concat_tables([valid, validated_table(e for _, e in rescued)]).take(np.argsort(order, kind="stable"))
    return valid, rejects


class _LastCodes:
    """A string column's `dictionary_encode` (distinct values, each entry's index among them), kept for the last
    column encoded and reused while the next is equal. Why: a stream's batches name the same measurements in
    the same units in the same order, and comparing two columns costs ~1/20 of encoding one (two encodings
    were ~5 % of a live shard call)."""

    def __init__(self) -> None:
        self._last: tuple[pa.Array, list[str], np.ndarray] | None = None

    def of(self, column: pa.Array) -> tuple[list[str], np.ndarray]:
        """(distinct values in order of first appearance, each entry's index among them: read-only)."""
        last = self._last
        if last is not None and last[0].equals(column):
            return last[1], last[2]
        encoded = column.dictionary_encode()
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        codes.flags.writeable = False
        self._last = (column, encoded.dictionary.to_pylist(), codes)
        return self._last[1], codes


_NAME_CODES, _UNIT_CODES = _LastCodes(), _LastCodes()
"""`normalize_entries`' encodings of measurement names and units (a shard process runs one call at a time)."""


class Normalized(NamedTuple):
    """Measurement entries converted to their asset type's units (`normalize_measurements`, per column)."""

    si: np.ndarray  # per entry: the value in the asset type's unit (NaN where it does not fit)
    column: np.ndarray  # per entry: index of its name in the row's target columns (-1 where it does not fit)
    misfit: np.ndarray  # per row: some measurement is not part of the type, has an incompatible unit or is implausible


class _Conversion(NamedTuple):
    """What `normalize_entries` does to each entry of a batch: SI value = (value * src_scale + src_offset -
    dst_offset) / dst_scale where `converts`, plausible within [lower, upper], in column `column` of its twin's
    filter; an entry `refused` does not fit (its type does not declare it, or not in a compatible unit); one of
    neither has no twin. Read only: the last one is reused (`_LastConversion`)."""

    converts: np.ndarray
    refused: np.ndarray
    src_scale: np.ndarray
    src_offset: np.ndarray
    dst_offset: np.ndarray
    dst_scale: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    column: np.ndarray  # -1 where it does not convert


def _conversion(triple: np.ndarray, name_list: list[str], unit_list: list[str],
                targets: Sequence[tuple[AssetType, tuple[str, ...]]]) -> _Conversion:
    """The `_Conversion` of entries coded (target, name, unit) as `triple` (negative: no twin), with
    `units.to_unit`'s constants and `normalize_measurements`' rules, one distinct triple at a time."""
    n_names, n_units, n = len(name_list), len(unit_list), len(triple)
    converts, refused = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    src_scale, src_offset, dst_offset, dst_scale = np.ones(n), np.zeros(n), np.zeros(n), np.ones(n)
    lower, upper = np.full(n, -np.inf), np.full(n, np.inf)
    column = np.full(n, -1, dtype=np.int64)
    for code in np.unique(triple[triple >= 0]).tolist():
        t, rest = divmod(code, n_names * n_units)
        name, unit = name_list[rest // n_units], unit_list[rest % n_units]
        asset_type, columns = targets[t]
        declared = asset_type.measurable().get(name)
        sel = triple == code
        if declared is None or units.canonical(unit) != units.canonical(declared.unit):
            refused[sel] = True
            continue
        src, dst = units.unit_def(unit), units.unit_def(declared.unit)
        converts[sel] = True
        src_scale[sel], src_offset[sel], dst_offset[sel], dst_scale[sel] = src.scale, src.offset, dst.offset, dst.scale
        if declared.lower is not None:
            lower[sel] = declared.lower
        if declared.upper is not None:
            upper[sel] = declared.upper
        column[sel] = columns.index(name)
    for array in (converts, refused, src_scale, src_offset, dst_offset, dst_scale, lower, upper, column):
        array.flags.writeable = False
    return _Conversion(converts, refused, src_scale, src_offset, dst_offset, dst_scale, lower, upper, column)


class _LastConversion:
    """The last batch's `_Conversion`, reused while the next codes its entries alike (equal triples, names and
    units) for the same asset types and columns. Why: a stream's batches name the same measurements in the same
    units for the same twins, and deciding them per distinct triple was ~2.5 % of a live shard call."""

    def __init__(self) -> None:
        self._last: tuple[np.ndarray, list[str], list[str], list[tuple[AssetType, tuple[str, ...]]],
                          _Conversion] | None = None

    def of(self, triple: np.ndarray, name_list: list[str], unit_list: list[str],
           targets: Sequence[tuple[AssetType, tuple[str, ...]]]) -> _Conversion:
        last = self._last
        if (last is not None and last[1] == name_list and last[2] == unit_list and len(last[3]) == len(targets)
                and all(a is b and c == d for (a, c), (b, d) in zip(last[3], targets))  # frozen: the same type
                and np.array_equal(last[0], triple)):
            return last[4]
        conversion = _conversion(triple, name_list, unit_list, targets)
        self._last = (triple, name_list, unit_list, list(targets), conversion)
        return conversion


_CONVERSIONS = _LastConversion()
"""`normalize_entries`' last conversion (a shard process runs one call at a time)."""


def normalize_entries(entries: Entries, row_target: np.ndarray,
                      targets: list[tuple[AssetType, tuple[str, ...]]]) -> Normalized:
    """Convert each entry to the unit its row's asset type declares, with `units.to_unit`'s arithmetic,
    and mark the rows `normalize_measurements` refuses (`Normalized.misfit`), plausible ranges included.

    `row_target[i]` indexes `targets` (asset type, value columns) for row i, or is -1 (no twin: skipped).
    """
    name_list, name_codes = _NAME_CODES.of(entries.names)
    unit_list, unit_codes = _UNIT_CODES.of(entries.items.field("unit"))
    triple = (row_target[entries.row] * len(name_list) + name_codes) * len(unit_list) + unit_codes
    conv = _CONVERSIONS.of(triple, name_list, unit_list, targets)
    with np.errstate(over="ignore"):  # a finite value may overflow to inf here: implausible, refused below
        value = (entries.value * conv.src_scale + conv.src_offset - conv.dst_offset) / conv.dst_scale
    ok = np.where(conv.converts, np.isfinite(value) & (value >= conv.lower) & (value <= conv.upper), ~conv.refused)
    misfit = np.zeros(len(row_target), dtype=bool)
    misfit[entries.row[~ok]] = True
    return Normalized(np.where(conv.converts, value, np.nan), conv.column, misfit)


def value_matrix(entries: Entries, normalized: Normalized, rows: np.ndarray, n_columns: int) -> np.ndarray:
    """(table rows, n_columns) SI values of the entries of `rows` (a boolean row mask); NaN = not measured."""
    out = np.full((len(rows), n_columns), np.nan)
    sel = rows[entries.row] & (normalized.column >= 0)
    out[entries.row[sel], normalized.column[sel]] = normalized.si[sel]
    return out


def si_map(entries: Entries, normalized: Normalized) -> pa.MapArray:
    """Each row's measurements as name -> SI value (the event log's `values` column)."""
    # offsets narrowed by NumPy: an Arrow cast of the int64 array is ~4x this whole call
    return pa.MapArray.from_arrays(pa.array(entries.offsets.astype(np.int32)), entries.names, pa.array(normalized.si))
