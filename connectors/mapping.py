"""The declared mapping from a device payload to telemetry rows, checked when a connector starts.

A protocol adapter finds *which* asset a message belongs to (an MQTT topic, an OPC UA node id);
a `PayloadMapping` says *what* the payload holds: which JSON fields are measurements (and in which
unit), where the event time is, and what identifies the event (a sequence counter and/or an
idempotency key). Identity comes from the payload, never from the delivery, so a message the
broker delivers twice maps to the same event and the twin counts it as a duplicate.

A payload that does not fit becomes a `DeadLetter` naming its source and the reason: a row must
never fail its batch, or an at-least-once source re-delivering it would be stuck on it forever.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from raytwin.contracts import MAX_SEQUENCE, Identifier, Unit
from raytwin.statestore import to_micros

FieldPath = Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$",
                                 description="a dotted path into the JSON payload, e.g. `data.temp`")]
MAX_EVENTS_PER_MESSAGE = 10_000
"""A payload may carry a JSON array of readings; more than this is refused (bounded memory)."""
DEFAULT_PAYLOAD_BYTES = 1 << 20
"""A connector's default `max_payload_bytes`: 10,000 readings of ~100 bytes, the most one message may carry."""
MAX_PAYLOAD_BYTES = 256 << 20
"""The most `max_payload_bytes` may be: MQTT's largest packet (256 MiB)."""
RAW_KEPT = 4096
"""A dead letter keeps at most this many bytes of what was refused (then its length and SHA-256): 40 random
5 MB payloads grew the dead-letter store by 190 MB and one page of the API's dead letters to 200 MB."""
TEXT_KEPT = 1024
"""A dead letter's other text (reason, idempotency key, asset id, source) keeps at most this many characters: a
reason quoting a 900,000-character time, or such a key (refused by the contract, kept whole), made 1,000 dead
letters ~2 GB."""
QUOTE_KEPT = 200
"""A value an error message quotes is cut to this many characters (its repr)."""
SOURCE_KEPT = 256
"""Of a stored reason, what its source keeps (an MQTT topic may be 65,535 bytes); the reason keeps `REASON_KEPT`."""
_MARK = 40
"""The most `clipped` adds: ``…(N characters)``."""
REASON_KEPT = TEXT_KEPT - SOURCE_KEPT - 2 * _MARK - 2


EMPTY_PAYLOAD = ("payload is empty (0 bytes): no readings; an empty message is also how a retained message is "
                 "cleared at the broker (the broker delivers it to subscribers): nothing to fix then, else the device "
                 "sent nothing")
"""The reason a message without bytes is dead-lettered (counted, as every message is, in an outcome)."""


class FrozenSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MeasurementField(FrozenSpec):
    """Where one measurement is in the payload and its unit (any unit `raytwin.units` knows)."""

    field: FieldPath
    unit: Unit


class PayloadMapping(FrozenSpec):
    """JSON payload fields -> one telemetry row per reading (an object, or each item of an array)."""

    measurements: Annotated[dict[Identifier, MeasurementField], Field(min_length=1)]
    event_time: FieldPath = "ts"
    time_format: Literal["rfc3339", "epoch_s", "epoch_ms"] = "rfc3339"
    sequence: FieldPath | None = Field(
        "seq", description="the device's per-asset counter; None: the event time in microseconds is the sequence")
    idempotency_key: FieldPath | None = Field(None, description="a field with the event's unique key, if any")
    quality: FieldPath | None = Field(None, description="a field with good/uncertain/bad, if any")

    @functools.cached_property
    def _measured(self) -> str:
        """What a reading of this mapping measures, in the default key of events without a sequence: two
        routes of one asset (a topic per signal) stamp their readings with the same times. Hashed when long
        (keys have at most 256 characters)."""
        names = ",".join(sorted(self.measurements))
        return names if len(names) <= 64 else hashlib.sha256(names.encode()).hexdigest()[:16]

    def rows(self, asset_id: str, payload: bytes, source: str) -> tuple[list[dict[str, Any]], list[DeadLetter]]:
        """The telemetry rows (JSON-shaped, as NDJSON lines are) of one message for `asset_id`, and a
        dead letter for each reading the mapping cannot read. The contract checks the rows later, a
        batch at a time (`actors.ingest.validate_batch`: column-wise from 32 rows, ~1 us a row plus ~1 ms a
        batch; row by row below, 25-50 us a row)."""
        if not payload:  # read as JSON: "Expecting value: line 1 column 1 (char 0)", which told nobody why
            return [], [DeadLetter.of(source, asset_id, None, EMPTY_PAYLOAD, payload)]
        try:
            doc = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return [], [DeadLetter.of(source, asset_id, None, f"payload is not JSON: {exc}", payload)]
        except ValueError:  # the only other: an integer of more digits than Python converts (4300)
            return [], [DeadLetter.of(source, asset_id, None, "payload has an integer of more than "
                                      f"{sys.get_int_max_str_digits()} digits: out of range for any field (a "
                                      f"sequence is at most {MAX_SEQUENCE})", payload)]
        except RecursionError:
            return [], [DeadLetter.of(source, asset_id, None, "payload nests deeper than JSON decoding allows "
                                      "(past the interpreter's recursion limit)", payload)]
        readings = doc if isinstance(doc, list) else [doc]
        if not readings:  # acknowledged, it would be counted nowhere but in `messages`
            return [], [DeadLetter.of(source, asset_id, None, "payload is an empty JSON array: no readings", payload)]
        if len(readings) > MAX_EVENTS_PER_MESSAGE:
            return [], [DeadLetter.of(source, asset_id, None, f"{len(readings)} readings in one message exceed "
                                      f"the limit of {MAX_EVENTS_PER_MESSAGE}", payload)]
        rows, dead = [], []
        for reading in readings:
            try:
                rows.append(self._row(asset_id, reading))
            except ValueError as exc:
                raw = json.dumps(reading, allow_nan=True, default=str).encode()
                key = _lookup(reading, self.idempotency_key) if isinstance(reading, dict) else None
                key = key if isinstance(key, str) else str(key) if _integer(key) else None
                dead.append(DeadLetter.of(source, asset_id, key, str(exc), raw))
        return rows, dead

    def _row(self, asset_id: str, reading: Any) -> dict[str, Any]:
        if not isinstance(reading, dict):
            raise ValueError(f"a reading must be a JSON object, not {type(reading).__name__}")
        event_time = self._time(_required(reading, self.event_time))
        row: dict[str, Any] = {
            "asset_id": asset_id, "event_time": event_time,
            "sequence": _whole(reading, self.sequence) if self.sequence else _micros(event_time),
            "measurements": {name: {"value": _number(reading, m.field, m.unit), "unit": m.unit}
                             for name, m in self.measurements.items()},
        }
        if self.idempotency_key:
            row["idempotency_key"] = _key(_required(reading, self.idempotency_key), self.idempotency_key)
        elif not self.sequence:  # the time alone would make readings of other measurements at that time conflicts
            row["idempotency_key"] = f"{asset_id}:{row['sequence']}:{self._measured}"
        if self.quality:
            row["quality"] = _required(reading, self.quality)
        return row

    def _time(self, value: Any) -> Any:
        """The event time as RFC 3339 text (the contract parses it and requires an offset)."""
        if self.time_format == "rfc3339":
            if _numeric(value):
                raise ValueError(f"{self.event_time}: expected RFC 3339 text (the route's time_format), got the number "
                                 f"{quoted(value)}: if the device sends time since the epoch, set the route's "
                                 "payload.time_format to epoch_ms or epoch_s")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{self.event_time}: expected a number of {self.time_format[6:]} since the epoch, "
                             f"got {quoted(value)}")
        seconds = value / 1000 if self.time_format == "epoch_ms" else value
        try:
            return datetime.fromtimestamp(seconds, UTC).isoformat()
        except (OverflowError, OSError, ValueError) as exc:
            raise ValueError(f"{self.event_time}: {quoted(value)} is not a representable time ({exc})") from None


def _micros(event_time: Any) -> int:
    """The sequence of a device that sends none: its event time in microseconds (unique per asset)."""
    if not isinstance(event_time, str):
        raise ValueError(f"event time {quoted(event_time)} is not RFC 3339 text")
    try:
        return to_micros(datetime.fromisoformat(event_time)) % (MAX_SEQUENCE + 1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"event time {quoted(event_time)}: {exc}") from None


_MISSING = object()


def _lookup(doc: dict[str, Any], path: str | None, missing: Any = None) -> Any:
    node: Any = doc
    for part in (path or "").split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(doc: dict[str, Any], path: str, unit: str) -> int | float:
    """A measurement's value: a JSON number, in the unit the route declares. Anything else the contract refused as
    `measurements.h1.value.float: Input should be a valid number; measurements.h1.value.int: ...`, naming neither
    the payload's field nor what it held (`"405 mm"`, `"high"`, `true`)."""
    value = _required(doc, path)
    if not _numeric(value):
        raise ValueError(f"{path}: expected a number, got {quoted(value)}: send the bare number, in {unit} (the unit "
                         "the route declares for it)")
    return value


def _whole(doc: dict[str, Any], path: str) -> int:
    """A sequence: a whole JSON number (the contract refused `"12"`, `10.5` or `true` as `sequence: Input should be a
    valid integer`, naming neither the payload's field nor what it held). Its range is the contract's to check."""
    value = _required(doc, path)
    if not _integer(value):
        raise ValueError(f"{path}: the sequence must be a whole number (the device's counter), got {quoted(value)}")
    return value


def _key(value: Any, path: str) -> str:
    """An idempotency key: text, or a JSON integer as its decimal text (`12345` -> "12345", so devices that number
    their messages need no quotes). Not a fraction or a boolean: `1.0` and `1` would be one key or two by accident."""
    if isinstance(value, str):
        return value
    if _integer(value):
        return str(value)
    kind = "a boolean" if isinstance(value, bool) else "a fractional number" if isinstance(value, float) else \
        f"a JSON {'array' if isinstance(value, list) else 'object'}"
    raise ValueError(f"{path}: an idempotency key must be text or an integer, not {kind} ({json.dumps(value)[:80]})")


def _required(doc: dict[str, Any], path: str) -> Any:
    """The field's value; a JSON null is not one (it read "field missing" beside the field, null)."""
    value = _lookup(doc, path, _MISSING)
    if value is _MISSING:
        raise ValueError(f"{path}: field missing from the payload")
    if value is None:
        raise ValueError(f"{path}: null in the payload, where a value is needed (a device without a reading sends "
                         "none, or leaves the field out, which is dead-lettered too)")
    return value


@dataclass(frozen=True)
class DeadLetter:
    """A reading that could not become an event: where it came from, why, and its raw bytes (as text)."""

    source: str
    asset_id: str | None
    idempotency_key: str | None
    reason: str
    raw: str
    once: bool = False
    """Whether `raw` identifies the reading (an OPC UA value change: node and source timestamp), so that a
    re-delivery of it is not dead-lettered again (`connectors.seen_letters`)."""

    @classmethod
    def of(cls, source: str, asset_id: str | None, key: str | None, reason: str, raw: bytes,
           once: bool = False) -> DeadLetter:
        """A dead letter of bounded size: the fields as `bounded` keeps them, the source and reason as `led` does."""
        letter = bounded({"asset_id": asset_id, "idempotency_key": key, "raw": raw})
        return cls(clipped(source, SOURCE_KEPT), letter["asset_id"], letter["idempotency_key"],
                   clipped(reason, REASON_KEPT), letter["raw"], once)

    def row(self) -> dict[str, str | None]:
        """The dead-letter store's row (`StateStore.write_dead_letters`): the source leads the reason."""
        return {"asset_id": self.asset_id, "idempotency_key": self.idempotency_key,
                "reason": led(self.source, self.reason), "raw": self.raw}


def source_pattern(name: str) -> str:
    """The regular expression a reason of connector `name` starts with (`led`): a URI scheme, then ``://NAME/``
    (a connector name has no ``/``, so ``web`` never matches ``webx``'s)."""
    return rf"^[a-z][a-z0-9+.-]*://{re.escape(name)}/"


def led(source: str, reason: str) -> str:
    """A stored reason: `source` leads it (the API finds a connector's dead letters by it), both cut to fit in
    `TEXT_KEPT` characters, so that reading it back (`bounded`) cuts nothing more."""
    return f"{clipped(source, SOURCE_KEPT)}: {clipped(reason, REASON_KEPT)}"


def clipped(text: str, limit: int = TEXT_KEPT) -> str:
    """`text` up to `limit` characters, else its first `limit` and ``…(N characters)``, N its whole length."""
    if len(text) <= limit or _already(text, _CLIPPED, limit):
        return text
    return f"{text[:limit]}…({len(text)} characters)"


_CLIPPED = re.compile(r"…\(\d+ characters\)\Z")
_CUT_RAW = re.compile(rb"\n\[cut: the first \d+ of \d+ bytes kept; SHA-256 of all: [0-9a-f]{64}\]\Z")


def _already(text: Any, mark: re.Pattern[Any], limit: int) -> bool:
    """Whether `text` was cut before (ends with `mark`, what precedes it within `limit`): a dead letter is bounded
    when made, again when stored and when read; cutting the cut would lose the whole's length (and hash)."""
    found = mark.search(text)
    return found is not None and found.start() <= limit


def quoted(value: Any) -> str:
    """`value` as an error message quotes it (its repr), cut to `QUOTE_KEPT` characters: a device's field may be
    megabytes long, and the reason that quotes it is stored and served with each dead letter."""
    return clipped(repr(value), QUOTE_KEPT)


def bounded(letter: dict[str, Any]) -> dict[str, Any]:
    """A dead letter (made here, refused by the contract, or read back from the store, written before the bounds)
    as it is kept: its `raw` as `kept` keeps it, any other text cut to `TEXT_KEPT` characters (`clipped`)."""
    return {name: kept(value) if name == "raw" else clipped(value) if isinstance(value, str) else value
            for name, value in letter.items()}


def kept(raw: bytes | str) -> str:
    """What a dead letter keeps of `raw` (bytes that are not UTF-8 as ``\\x..`` escapes): all of it up to
    `RAW_KEPT` bytes, else its first `RAW_KEPT` bytes and a last line with its length and SHA-256 (of its UTF-8
    bytes, for text), ``[cut: the first 4096 of 5242880 bytes kept; SHA-256 of all: 9f86d0...]``."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    if len(data) <= RAW_KEPT or isinstance(raw, str) and _already(data, _CUT_RAW, 4 * RAW_KEPT):  # (escapes: 4 a byte)
        return raw if isinstance(raw, str) else data.decode("utf-8", "backslashreplace")
    head = data[:RAW_KEPT].decode("utf-8", "backslashreplace")  # a character cut in two shows as escapes
    digest = hashlib.sha256(data).hexdigest()
    return f"{head}\n[cut: the first {RAW_KEPT} of {len(data)} bytes kept; SHA-256 of all: {digest}]"
