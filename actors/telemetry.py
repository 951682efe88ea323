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
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import TypeAdapter, ValidationError

from raytwin import units
from raytwin.contracts import MAX_FUTURE_SKEW, SCHEMA_VERSION, AssetType, Identifier, TelemetryEvent, describe_error
from raytwin.statestore import TIME

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
_UNITS = pa.array(sorted(units.UNITS))
_MAX_SKEW_US = MAX_FUTURE_SKEW // timedelta(microseconds=1)


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


def parse_rows(rows: Iterable[dict[str, Any]]) -> tuple[list[TelemetryEvent], list[dict[str, str]]]:
    """Contract-check raw rows one by one: (valid events, rejects with raw JSON and a one-line reason)."""
    events, rejects = [], []
    for row in rows:
        data = {k: v for k, v in row.items() if v is not None}
        m = data.get("measurements")
        try:
            if isinstance(m, str):
                data["measurements"] = json.loads(m)
            elif isinstance(m, list):  # an Arrow map arrives as (key, value) pairs
                data["measurements"] = dict(m)
            events.append(TelemetryEvent.model_validate(data))
        except (ValidationError, ValueError, TypeError) as exc:
            rejects.append({
                "asset_id": str(row.get("asset_id")), "idempotency_key": row.get("idempotency_key"),
                "reason": describe_error(exc), "raw": json.dumps(row, default=str, sort_keys=True),
            })
    return events, rejects


_ROW_KEYS = frozenset((*VALIDATED_SCHEMA.names, "schema_version"))
_ENTRY_KEYS = frozenset(("value", "unit"))
_TIMES = ("event_time", "ingest_time")
_JSON_SCHEMA = pa.schema([pa.field(f.name, pa.string()) if f.name in _TIMES else f for f in VALIDATED_SCHEMA])


def _json_shaped(row: dict[str, Any]) -> bool:
    """A parsed-JSON row that Arrow holds exactly as the contract reads it: known keys only (and the
    contract's schema version, if given), times
    as text (Arrow would read a naive `datetime` as UTC) and measurements as objects of value and
    unit (Arrow would drop an unknown key the contract refuses)."""
    m = row.get("measurements")
    version = row.get("schema_version", SCHEMA_VERSION)
    return (row.keys() <= _ROW_KEYS and type(version) is int and version == SCHEMA_VERSION and isinstance(m, dict)
            and all(isinstance(e, dict) and e.keys() <= _ENTRY_KEYS for e in m.values())
            and all(isinstance(row.get(k), str | None) for k in _TIMES))


def rows_table(rows: list[dict[str, Any]]) -> pa.Table | None:
    """Parsed-JSON telemetry rows (e.g. NDJSON lines) as a telemetry table for `validate_table`,
    or None when some row is not plainly JSON-shaped or Arrow cannot read a value exactly (wrong
    type, a time without a zone offset): those are checked row by row by the contract.

    Why: building an Arrow table costs ~1 us a row, the contract ~40 us (pydantic plus the table
    built from its events), which would bound a live stream to ~25k events/s per core.
    """
    if not all(_json_shaped(r) for r in rows):
        return None
    try:
        table = pa.Table.from_pylist(rows, schema=_JSON_SCHEMA)
        for name in _TIMES:
            table = table.set_column(table.schema.get_field_index(name), name, table.column(name).cast(TIME))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return None
    return table


def row_event(table: pa.Table, i: int) -> TelemetryEvent:
    """Row `i` of a validated table as a `TelemetryEvent` (for the rare row that needs one)."""
    row = table.slice(i, 1).to_pylist()[0]
    return TelemetryEvent.model_validate({**row, "measurements": dict(row["measurements"])})


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
        value = pc.fill_null(items.field("value"), np.nan).to_numpy(zero_copy_only=False)
        return cls(offsets - start, np.repeat(np.arange(len(measurements)), np.diff(offsets)),
                   measurements.keys.slice(start, stop - start), items, value)


def _bools(arr: pa.Array) -> np.ndarray:
    return pc.fill_null(arr, False).to_numpy(zero_copy_only=False)


def _column(table: pa.Table, name: str) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(table.num_rows, _TYPES[name])
    return table.column(name).combine_chunks()


def _fast_checkable(schema: pa.Schema) -> bool:
    return _REQUIRED <= set(schema.names) <= set(_TYPES) and all(schema.field(n).type == _TYPES[n] for n in schema.names)


def validate_table(table: pa.Table) -> tuple[pa.Table, list[dict[str, str]]]:
    """Contract-check a telemetry table: (valid rows as a `VALIDATED_SCHEMA` table in source order, rejects)."""
    if not _fast_checkable(table.schema):
        events, rejects = parse_rows(table.to_pylist())
        return validated_table(events), rejects
    asset, event_time, sequence, key, quality, measurements, ingest_time = (
        _column(table, name) for name in VALIDATED_SCHEMA.names)
    ingest_time = pc.fill_null(ingest_time, pa.scalar(datetime.now(UTC), TIME))
    key = pc.if_else(key.is_null(), pc.binary_join_element_wise(asset, pc.cast(sequence, pa.string()), ":"), key)
    quality = pc.fill_null(quality, "good")
    skew = (pc.fill_null(event_time.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
            - ingest_time.cast(pa.int64()).to_numpy(zero_copy_only=False))
    key_length = pc.utf8_length(key)
    entries = Entries.of(measurements)
    ok = (_bools(pc.match_substring_regex(asset, _IDENTIFIER)) & _bools(event_time.is_valid())
          & _bools(pc.greater_equal(sequence, 0)) & (skew <= _MAX_SKEW_US)
          & _bools(pc.and_(pc.greater_equal(key_length, 1), pc.less_equal(key_length, 256)))
          & _bools(pc.is_in(quality, value_set=_QUALITIES))
          & _bools(measurements.is_valid()) & (np.diff(entries.offsets) >= 1))
    entry_ok = (_bools(entries.items.is_valid()) & np.isfinite(entries.value)
                & _bools(pc.is_in(entries.items.field("unit"), value_set=_UNITS)))
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
    for i, row in zip(bad, table.take(bad).to_pylist()):
        events, rejected = parse_rows([row])
        rejects += rejected
        rescued += [(int(i), e) for e in events]
    valid = valid.filter(ok)
    if rescued:  # rows only the contract could accept: back into source order
        order = np.concatenate([np.flatnonzero(ok), [i for i, _ in rescued]])
        valid = pa.concat_tables([valid, validated_table(e for _, e in rescued)]).take(np.argsort(order, kind="stable"))
    return valid, rejects


class Normalized(NamedTuple):
    """Measurement entries converted to their asset type's units (`normalize_measurements`, per column)."""

    si: np.ndarray  # per entry: the value in the asset type's unit (NaN where it does not fit)
    column: np.ndarray  # per entry: index of its name in the row's target columns (-1 where it does not fit)
    misfit: np.ndarray  # per row: some measurement is not part of the type or has an incompatible unit


def normalize_entries(entries: Entries, row_target: np.ndarray,
                      targets: list[tuple[AssetType, tuple[str, ...]]]) -> Normalized:
    """Convert each entry to the unit its row's asset type declares, with `units.to_unit`'s arithmetic.

    `row_target[i]` indexes `targets` (asset type, value columns) for row i, or is -1 (no twin: skipped).
    """
    names = entries.names.dictionary_encode()
    unit_ids = entries.items.field("unit").dictionary_encode()
    name_list, unit_list = names.dictionary.to_pylist(), unit_ids.dictionary.to_pylist()
    n_names, n_units = len(name_list), len(unit_list)
    target = row_target[entries.row]
    triple = (target * n_names + names.indices.to_numpy()) * n_units + unit_ids.indices.to_numpy()
    si = np.full(len(entries.value), np.nan)
    column = np.full(len(entries.value), -1, dtype=np.int64)
    ok = np.ones(len(entries.value), dtype=bool)
    for code in np.unique(triple[target >= 0]).tolist():
        t, rest = divmod(code, n_names * n_units)
        name, unit = name_list[rest // n_units], unit_list[rest % n_units]
        asset_type, columns = targets[t]
        declared = asset_type.measurable().get(name)
        sel = triple == code
        if declared is None or units.canonical(unit) != units.canonical(declared.unit):
            ok[sel] = False
            continue
        src, dst = units.unit_def(unit), units.unit_def(declared.unit)
        si[sel] = (entries.value[sel] * src.scale + src.offset - dst.offset) / dst.scale
        column[sel] = columns.index(name)
    misfit = np.zeros(len(row_target), dtype=bool)
    misfit[entries.row[~ok]] = True
    return Normalized(si, column, misfit)


def value_matrix(entries: Entries, normalized: Normalized, rows: np.ndarray, n_columns: int) -> np.ndarray:
    """(table rows, n_columns) SI values of the entries of `rows` (a boolean row mask); NaN = not measured."""
    out = np.full((len(rows), n_columns), np.nan)
    sel = rows[entries.row] & (normalized.column >= 0)
    out[entries.row[sel], normalized.column[sel]] = normalized.si[sel]
    return out


def si_map(entries: Entries, normalized: Normalized) -> pa.MapArray:
    """Each row's measurements as name -> SI value (the event log's `values` column)."""
    return pa.MapArray.from_arrays(pa.array(entries.offsets, pa.int32()), entries.names, pa.array(normalized.si))
