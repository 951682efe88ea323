"""One live twin: event ordering, de-duplication, late-event merging and the filter (no Ray here).

The twin's state is, by construction, the filter applied to all accepted events *in key order*
(event time, sequence, idempotency key) from the prior. Events arriving in order are applied
directly; an event older than the last applied one (but within the allowed lateness) rewinds to
the newest in-memory checkpoint before it and re-applies the window in order. So shuffled input
gives a bit-identical state to ordered input, and recovery (snapshot + sorted log replay) gives a
bit-identical state to an uninterrupted run.

Checkpoints are taken every `checkpoint_every` applied events. Everything older than the newest
checkpoint that lies before the watermark (latest event time - allowed lateness) is dropped: no
accepted event can ever land before it, which is also what makes that checkpoint a *sealed*,
durable snapshot. Memory per twin is therefore bounded by the events within the allowed lateness
(plus up to `checkpoint_every`).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat
from typing import NamedTuple

import numpy as np

from actors.state import DivergenceReport, TwinState
from actors.swap import Segment, SwapRefused, check_compatible, map_state
from raytwin import units
from raytwin.contracts import AssetType, TelemetryEvent, normalize_measurements
from raytwin.estimation import (Divergence, ExtendedKalmanFilter, FilterState, PackedState, Run, Traces,
                                assimilate_events, assimilate_runs, clear_drift, refused_names)
from raytwin.registry import ModelArtifact
from raytwin.sim.model import Declared
from raytwin.statestore import EventKey, LoggedEvent, Snapshot, from_micros, to_micros
from raytwin.ukf import make_filter

DUPLICATE = "duplicate"
CONFLICT = "conflict"
TOO_LATE = "too late"
NON_FINITE = "non-finite update"
BEFORE_MIGRATION = ("before migration: the twin moved to another asset type version after this event's time; "
                    "events up to that point are the old version's history and cannot be applied any more")


def logged_event(ev: TelemetryEvent, asset_type: AssetType) -> LoggedEvent:
    """The event as the log keeps it: its order key and values in the type's SI units (or ContractError)."""
    return LoggedEvent((to_micros(ev.event_time), ev.sequence, ev.idempotency_key), ev.quality,
                       normalize_measurements(ev, asset_type), to_micros(ev.ingest_time))


_FILTERS: dict[tuple[str, str, str], ExtendedKalmanFilter] = {}


def _shared_filter(artifact: ModelArtifact, kind: str, process_std: dict | None, measurement_std: dict | None):
    """One (stateless) filter per distinct artifact, kind (`raytwin.ukf.FILTERS`) and noise:
    thousands of twins of a type share it."""
    key = (artifact.content_hash, kind, json.dumps([process_std, measurement_std], sort_keys=True))
    if key not in _FILTERS:
        _FILTERS[key] = make_filter(kind, artifact.model(), artifact.param_vector(),
                                    process_std=process_std, measurement_std=measurement_std)
        _FILTERS[key].warm_up()
    return _FILTERS[key]


def _key(e: Pending) -> EventKey:
    return e.key


class Pending(NamedTuple):
    """An accepted event as a twin holds it: order key (its identity), values in its filter's
    `measured_names` columns (SI, NaN = not measured) and its quality (part of its content, with
    the values)."""

    key: EventKey
    values: np.ndarray
    quality: str

    @property
    def use_outputs(self) -> bool:
        """Whether its outputs may update the estimate: not from a sensor flagged bad (its inputs still count)."""
        return self.quality != "bad"


def pendings(keys: Iterable[EventKey], values: Iterable[np.ndarray], qualities: Iterable[str]) -> list[Pending]:
    """A `Pending` per (key, values row, quality), made by the tuple constructor the NamedTuple's own wraps in a
    Python-level call: a live shard call makes one per row, and that call was half of its admission's cost."""
    return list(map(tuple.__new__, repeat(Pending), zip(keys, values, qualities)))


class EventColumns(NamedTuple):
    """One event per twin as the columns a dispatch packs (`raytwin.estimation.assimilate_events`): event times
    (epoch seconds), values (the twins' filter columns, SI: a matrix, or a row per twin) and whether outputs update
    the estimate. A shard has them as its batch's columns already: gathering them back from the events was ~4 % of
    a live call."""

    t: np.ndarray
    values: np.ndarray | list[np.ndarray]
    use_outputs: np.ndarray


def same_content(a: Pending, b: Pending) -> bool:
    """Whether two events with one identity carry the same content: a re-delivery, not a conflict."""
    return a.quality == b.quality and np.array_equal(a.values, b.values, equal_nan=True)


def conflict_reason(key: EventKey) -> str:
    """Why an event whose identity (event time, sequence, idempotency key) was applied with other values is
    refused, and what a source that sends it does wrong (an OPC UA node's key is its node id for every reading:
    the message alone read as if the node were used up)."""
    return (f"conflict: idempotency key {key[2]!r} was already applied with different content (event time "
            f"{from_micros(key[0]).isoformat()}, sequence {key[1]}): an event is identified by its event time, "
            "sequence and key, and one sent again must carry the same values; a source that stamps two different "
            "readings with one time (a coarse timestamp) must give them distinct sequences or keys")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    key: EventKey | None  # None: the prior, before any event
    state: FilterState | PackedState  # packed: as a dispatch left it (unpacked when read, `fs`)
    events_applied: int

    @property
    def fs(self) -> FilterState:
        """The filter state at this checkpoint (a packed one unpacked: checkpoints are read far less often
        than they are taken, by a rewind, a drift clear, a snapshot)."""
        return self.state.state() if type(self.state) is PackedState else self.state


class Twin:
    """A twin's in-memory state machine; the shard actor owns many and persists what they produce."""

    def __init__(
        self,
        tenant: str,
        asset_id: str,
        artifact: ModelArtifact,
        *,
        initial_state: dict[str, float] | None = None,
        initial_std: dict[str, float] | None = None,
        noise: dict[str, dict[str, float]] | None = None,
        filter_kind: str | None = None,
        allowed_lateness_s: float = 3600.0,
        checkpoint_every: int = 64,
        swaps: list[tuple[int, ModelArtifact]] = (),
    ):
        """`swaps`: (boundary in epoch microseconds, artifact) of each model swap (`actors.swap`)."""
        if allowed_lateness_s < 0 or checkpoint_every < 1:
            raise ValueError("allowed_lateness_s must be >= 0 and checkpoint_every >= 1")
        self.tenant, self.asset_id = tenant, asset_id
        self.noise = noise or {}
        self.kind = filter_kind or artifact.model().filters[0]  # the model's default: EKF for JAX code, UKF for an FMU
        self.initial_state, self.initial_std = initial_state or {}, initial_std or {}
        self.segments = [self.segment(None, artifact)]
        self.artifact, self.filter = artifact, self.segments[0].filter
        self.lateness_us = round(allowed_lateness_s * 1e6)
        self.checkpoint_every = checkpoint_every
        self._reset(Checkpoint(None, self.segments[0].prior, 0))
        self.restored_revision = 0  # the revision of the snapshot it started from (`restore`; 0: none)
        self.max_time_us: int | None = None
        self.floor: EventKey | None = None  # the migration point (`start_at`): nothing at or before it applies
        # when a previous twin of this asset id was deleted (`StateStore.history_floors`): events ingested
        # until then are its history, not this twin's
        self.history_floor_us: int | None = None
        # the drift clears' points, in key order (`clear_drift`), from the oldest checkpoint's on (`_prune`)
        self.clears: list[EventKey] = []
        for at_us, later in swaps:
            self.add_swap(at_us, later)

    def start_at(self, key: EventKey, revision: int, max_time_us: int | None, t: float | None,
                 u: dict[str, tuple[float, str]], q_scale: float) -> None:
        """Continue a migrated twin from the point where its previous version stopped: its prior
        (the mapped state) stands at event `key`, revision `revision`, filter time `t`, held inputs
        `u` (name -> (value, unit), converted to this model's units; an input the old version lacked, or
        had in another dimension, keeps the model's nominal) and the adapted process-noise scale
        `q_scale` (the drift detector restarts). Events at or before `key` are refused."""
        def held_input(var, nominal: float) -> float:
            value, unit = u.get(var.name, (None, None))
            if value is None or units.dimension(unit) != units.dimension(var.unit):
                return nominal
            return units.to_unit(value, unit, var.unit)

        held = np.array([held_input(v, n) for v, n in zip(self.filter.model.inputs, self.fs.u.tolist())],
                        dtype=np.float64)
        fs = self.fs._replace(t=t, u=held, divergence=self.fs.divergence._replace(q_scale=q_scale))
        self._reset(Checkpoint(tuple(key), fs, revision))  # type: ignore[arg-type]
        self.max_time_us = max_time_us
        self.floor = tuple(key)  # type: ignore[assignment]


    # ------------------------------------------------------------------- model swaps ----
    def segment(self, start_us: int | None, artifact: ModelArtifact) -> Segment:
        """A model version for this twin: its filter (same kind and noise settings) and prior."""
        noise = self.noise
        try:
            f = _shared_filter(artifact, self.kind, noise.get("process_std"), noise.get("measurement_std"))
            # the registered version takes the prior as given (unknown names refused); a later version
            # takes the part of it that names its own states and inputs
            keep = lambda d, known: d if start_us is None else {k: v for k, v in d.items() if k in known}  # noqa: E731
            prior = f.initial(keep(self.initial_state, f.model.state_names),
                              keep({**noise.get("initial_std", {}), **self.initial_std}, f.model.state_names),
                              keep(noise.get("inputs", {}), f.model.input_names))
        except (KeyError, ValueError) as exc:
            if start_us is None:
                raise
            raise SwapRefused(f"twin {self.tenant}/{self.asset_id} cannot run {artifact.ref}: {exc}") from None
        return Segment(start_us, artifact, f, prior)

    def _segment_of(self, key: EventKey | None) -> int:
        """Index of the segment whose model applies the event `key` (None: the prior's, the first)."""
        if key is None:
            return 0
        return bisect.bisect_right([s.start_us for s in self.segments[1:]], key[0])

    def _use(self, i: int) -> None:
        self.artifact, self.filter = self.segments[i].artifact, self.segments[i].filter

    def add_swap(self, at_us: int, artifact: ModelArtifact) -> None:
        """From event time `at_us` on, apply events with `artifact` (`prepare_swap`, then `enter_swap`)."""
        self.enter_swap(self.prepare_swap(at_us, artifact))

    def prepare_swap(self, at_us: int, artifact: ModelArtifact) -> Segment:
        """The segment a swap to `artifact` at `at_us` adds, checked without changing the twin: refused
        (`SwapRefused`) at or before the last swap, at or before the watermark (events before it are
        sealed) or for a model the estimate cannot be carried over to (`actors.swap.check_compatible`)."""
        last = self.segments[-1]
        if last.start_us is not None and at_us <= last.start_us:
            raise SwapRefused(f"twin {self.tenant}/{self.asset_id} already swaps to {last.artifact.ref} at "
                              f"{from_micros(last.start_us).isoformat()}; a new swap must come after it")
        wm = self.watermark_us
        if wm is not None and at_us <= wm:
            raise SwapRefused(f"boundary {from_micros(at_us).isoformat()} is before twin {self.tenant}/"
                              f"{self.asset_id}'s watermark {from_micros(wm).isoformat()} (newest event time minus "
                              "the allowed lateness): events before it are sealed; choose a later boundary")
        check_compatible(last.filter.model, artifact.model())
        return self.segment(at_us, artifact)

    def enter_swap(self, seg: Segment) -> None:
        """Add a prepared swap; events at or after its boundary already applied are re-applied by it."""
        at_us = seg.start_us
        redo = self._rewind_before((at_us, -1, "")) if self.last_key is not None and self.last_key[0] >= at_us else []
        self.segments.append(seg)
        self._use(self._segment_of(self.last_key))
        if redo:
            self.apply(redo)

    @property
    def fs(self) -> FilterState:
        """The filter state after the last applied event (unpacked from the last dispatch's carry on
        first use: `raytwin.estimation.PackedState`)."""
        if self._fs is None:
            self._fs = self._packed.state()
        return self._fs

    @fs.setter
    def fs(self, fs: FilterState) -> None:
        self._fs, self._packed = fs, None

    def _start_from(self, state: FilterState | PackedState) -> None:
        """Continue from a checkpoint's state, a packed one kept packed (the next dispatch takes its row as is)."""
        if type(state) is PackedState:
            self._fs, self._packed = None, state
        else:
            self.fs = state

    @property
    def drift(self) -> bool:
        """`Divergence.drift` of the current state, without unpacking it."""
        return self._packed.drift if self._fs is None else self._fs.divergence.drift

    def _reset(self, base: Checkpoint) -> None:
        self._start_from(base.state)
        self.last_key = base.key
        self.events_applied = base.events_applied
        self.checkpoints = [base]
        self.window: list[Pending] = []  # applied events after checkpoints[0], in key order

    def _applied(self, key: EventKey) -> Pending | None:
        """The window's event with identity `key`, if any: found by bisection in the key-ordered window
        instead of a dict kept beside it (one insert per applied event and one delete per pruned one)."""
        window = self.window
        i = bisect.bisect_left(window, key, key=_key)
        return window[i] if i < len(window) and window[i].key == key else None

    # ------------------------------------------------------------------- classification ----
    @property
    def watermark_us(self) -> int | None:
        return None if self.max_time_us is None else self.max_time_us - self.lateness_us

    def classify(self, events: list[Pending]) -> list[str | None]:
        """For each event of a batch, in order: None if it can be applied, else DUPLICATE (its
        identity, the key (event time, sequence, idempotency key), was applied before or earlier in
        this batch, with the same content), CONFLICT (the same identity with other content) or
        TOO_LATE (older than the watermark). An idempotency key re-used with another time or
        sequence (a rebooted device) is another event."""
        wm = self.watermark_us
        taken: dict[EventKey, Pending] = {}
        verdicts: list[str | None] = []
        for ev in events:
            first = self._applied(ev.key) or taken.get(ev.key)
            if first is not None:
                verdicts.append(DUPLICATE if same_content(first, ev) else CONFLICT)
            elif wm is not None and ev.key[0] < wm:
                verdicts.append(TOO_LATE)
            elif self.floor is not None and ev.key <= self.floor:
                verdicts.append(BEFORE_MIGRATION)
            else:
                taken[ev.key] = ev
                verdicts.append(None)
        return verdicts

    def takes_next(self, key: EventKey) -> bool:
        """Whether the event `key` applies as this twin's next, on its only model: after its last applied
        event (so neither applied before nor earlier in its batch, which has one event for it), within the
        lateness window, after its migration floor. `classify` gives it None then, and `apply_many` runs it
        without a rewind or a swap: a live batch's usual event, decided without `classify`'s lists."""
        last, newest, floor = self.last_key, self.max_time_us, self.floor
        return ((last is None or key > last) and (newest is None or key[0] >= newest - self.lateness_us)
                and (floor is None or key > floor) and len(self.segments) == 1 and not self._clear_ahead())

    def _clear_ahead(self) -> bool:
        """A recorded drift clear after the last applied event (a recovery's or time travel's replay): the events
        up to it run first and the twin clears there (`_plan`, `_absorb`), not on the one-event path."""
        return bool(self.clears) and (self.last_key is None or self.last_key < self.clears[-1])

    def pending(self, ev: LoggedEvent) -> Pending:
        """A logged event in this twin's filter columns."""
        return Pending(ev.key, np.array([ev.values.get(n, np.nan) for n in self.filter.measured_names]), ev.quality)

    # ------------------------------------------------------------------------- applying ----
    def apply(self, events: list[Pending]) -> None:
        """Apply accepted events (any order; already classified as applicable)."""
        apply_many([(self, events)])

    def _plan(self, events: list[Pending]) -> tuple[list[Pending], Run, list[Pending]]:
        """The events to run through the filter now, in key order (rewinding first if one is late),
        and the rest: those after a model swap boundary, run in the next round (`apply_many`)."""
        if len(events) > 1:
            events = sorted(events, key=_key)
        if self.last_key is not None and events[0].key < self.last_key:
            events = sorted([*self._rewind_before(events[0].key), *events], key=_key)
        rest: list[Pending] = []
        if len(self.segments) > 1:
            now, first = self._segment_of(self.last_key), self._segment_of(events[0].key)
            for i in range(now + 1, first + 1):  # carry the estimate over each boundary crossed
                self.fs = map_state(self.fs, self.segments[i - 1].filter, self.segments[i].filter,
                                    self.segments[i].prior)
            self._use(first)
            if first + 1 < len(self.segments):
                cut = bisect.bisect_left([e.key for e in events], (self.segments[first + 1].start_us, -1, ""))
                events, rest = events[:cut], events[cut:]
        if self._clear_ahead():
            events, rest = self._cut_at_clear(events, rest)
        # lists, not arrays: `assimilate_runs` packs the events of all twins of a batch at once
        start = self.fs if self._packed is None else self._packed
        if len(events) == 1:  # a live batch's usual twin: no list built in a loop (a third of the cost)
            e = events[0]
            return events, Run(self.filter, start, [e.key[0] / 1e6], [e.values], [e.use_outputs]), rest
        return events, Run(self.filter, start, [e.key[0] / 1e6 for e in events], [e.values for e in events],
                           [e.use_outputs for e in events]), rest

    def _cut_at_clear(self, events: list[Pending], rest: list[Pending]) -> tuple[list[Pending], list[Pending]]:
        """`_plan`'s events cut after the first drift clear's point they pass (a rewind to before a clear, or a
        recovery's replay): run up to it first, cleared there (`_absorb`), then the rest, as it happened live."""
        clears = self.clears
        for clear in clears[0 if self.last_key is None else bisect.bisect_right(clears, self.last_key):]:
            if clear >= events[-1].key:
                break
            cut = bisect.bisect_right(events, clear, key=_key)
            if cut:
                return events[:cut], events[cut:] + rest
            self._clear_here()  # the clear's own event is not among them (not in the log): cleared before the next
        return events, rest

    def _absorb(self, events: list[Pending], traces: Traces, k: int, final: PackedState) -> None:
        """Take the filter's states after `events` (run `k` of `traces`, ending in `final`):
        checkpoints, window, bookkeeping."""
        first, n, every, checkpoints = self.events_applied, len(events), self.checkpoint_every, self.checkpoints
        i = (-first - 1) % every
        while i < n:  # the state after every `checkpoint_every`-th applied event (the last: `final`'s row, copied)
            checkpoints.append(Checkpoint(events[i].key, final.detached() if i == n - 1 else traces.state(k, i),
                                          first + i + 1))
            i += every
        self._fs, self._packed = None, final
        self.last_key = last = events[-1].key
        self.events_applied = first + n
        self.window += events
        if self.max_time_us is None or last[0] > self.max_time_us:  # events are in key order: the last is newest
            self.max_time_us = last[0]
        clears = self.clears
        if clears and last <= clears[-1] and last in clears:  # (re-)applied up to a drift clear's point: cleared
            self._clear_here()
        wm = self.max_time_us - self.lateness_us
        if len(checkpoints) > 1 and checkpoints[1].key[0] < wm:
            self._prune(wm)  # a checkpoint after the base is sealed now (rare in a live batch)

    def _rewind_before(self, key: EventKey) -> list[Pending]:
        """Restore the newest checkpoint before `key`; return the window events to re-apply."""
        i = max(j for j, c in enumerate(self.checkpoints) if c.key is None or c.key < key)
        base = self.checkpoints[i]
        keep = [e for e in self.window if base.key is None or e.key > base.key]
        self.window = [e for e in self.window if not (base.key is None or e.key > base.key)]
        del self.checkpoints[i + 1:]
        self._start_from(base.state)
        self.last_key, self.events_applied = base.key, base.events_applied
        self._use(self._segment_of(base.key))
        return keep

    def _prune(self, wm: int) -> None:
        """Forget everything before the newest checkpoint older than the watermark `wm` (it is sealed);
        for a twin whose checkpoint after the base is older than `wm`."""
        checkpoints = self.checkpoints
        i = max(j for j in range(1, len(checkpoints)) if checkpoints[j].key[0] < wm)
        base = checkpoints[i]
        cut = bisect.bisect_right(self.window, base.key, key=_key)  # the window is in key order
        del self.window[:cut]
        del self.checkpoints[:i]
        # no rewind goes before the base, so no clear before it is passed again (`_cut_at_clear`, `_absorb`), and the
        # last clear is compared with keys at or after it (`_clear_ahead`, `clear_drift`, `_unsnapshotable`), which a
        # clear before it never decides: kept, the list grew one key per clear for good
        del self.clears[:bisect.bisect_left(self.clears, base.key)]

    def clear_drift(self) -> None:
        """Acknowledge a drift alarm: restart the detector's CUSUMs and release the latch
        (`raytwin.estimation.clear_drift`) at the last applied event, the clear's point. Checkpoints before
        it keep their evidence: a late event that rewinds to one re-applies the events up to the point and
        clears there again (`_plan`, `_absorb`), as recovery replays the clear in place (the store records
        it, `TwinShard.clear_drift`). Why not clear those checkpoints too: the events re-applied from a cleared
        one ran unalarmed (the process noise adapting where the alarm froze it), so a restart changed the state."""
        if self.last_key is not None and (not self.clears or self.last_key > self.clears[-1]):
            self.clears.append(self.last_key)
        self._clear_here()

    def replay_clears(self, keys: list[EventKey]) -> None:
        """Clear again at each of `keys` (recorded drift clears, in key order, none before the twin's last applied
        event) as the events replayed after it pass their points (`_plan`): recovery's and time travel's."""
        self.clears = list(keys)
        if self.last_key is not None and self.last_key in self.clears:  # a snapshot taken at a clear's point
            self._clear_here()

    def _clear_here(self) -> None:
        """Clear the drift evidence of the current state, and of the checkpoint taken at it if there is one."""
        self.fs = clear_drift(self.fs)
        last = self.checkpoints[-1]
        if last.key == self.last_key:
            self.checkpoints[-1] = Checkpoint(last.key, clear_drift(last.fs), last.events_applied)

    # ------------------------------------------------------------------ persistence ----
    @property
    def sealed_revision(self) -> int | None:
        """The revision `sealed_snapshot` would have (None: nothing to snapshot), without encoding it."""
        return None if self._unsnapshotable(self.checkpoints[0]) else self.checkpoints[0].events_applied

    def _unsnapshotable(self, base: Checkpoint) -> bool:
        """Nothing sealed yet; a migration point (rebuilt from the registration); or a checkpoint from
        before the last drift clear: it holds the evidence the clear dropped, which a read while the shard
        is down (`actors.recovery.durable_state`, no replay) would answer as the twin's alarm."""
        return (base.key is None or base.key == self.floor
                or (bool(self.clears) and base.key < self.clears[-1]))

    def sealed_snapshot(self) -> Snapshot | None:
        """The oldest retained checkpoint: final (no accepted event can precede it) and durable-safe."""
        base = self.checkpoints[0]
        if self._unsnapshotable(base):
            return None
        return Snapshot(base.key, base.events_applied, _encode(base.fs, self.max_time_us))

    def restore(self, snap: Snapshot) -> None:
        """Start from a durable snapshot (then replay the log after it with `apply`)."""
        fs, max_time_us = _decode(snap.payload)
        self._reset(Checkpoint(snap.key, fs, snap.revision))
        self.restored_revision = snap.revision
        self._use(self._segment_of(snap.key))
        self.max_time_us = max_time_us

    # ------------------------------------------------------------------------ views ----
    def view(self) -> TwinState:
        return state_view(self.tenant, self.asset_id, self.artifact.ref, self.filter.model, self.fs, self.last_key,
                          self.events_applied)


def state_view(tenant: str, asset_id: str, model_ref: str, model: Declared, fs: FilterState, last_key: EventKey | None,
               events_applied: int, stale: bool = False) -> TwinState:
    """The API's view of a filter state (a live twin's, or a snapshot's while its shard restarts)."""
    div = fs.divergence
    outputs = model.output_names
    return TwinState(
        tenant=tenant,
        asset_id=asset_id,
        model_ref=model_ref,
        revision=events_applied,
        event_time=None if last_key is None else from_micros(last_key[0]),
        state=dict(zip(model.state_names, fs.x.tolist())),
        std=dict(zip(model.state_names, np.sqrt(np.diag(fs.P)).tolist())),
        covariance=fs.P.tolist(),
        divergence=DivergenceReport(
            nis_mean=div.nis_mean,
            nis_last=div.nis_last,
            residual_mean=dict(zip(outputs, div.residual_mean)),
            residual_rms={n: math.sqrt(v) for n, v in zip(outputs, div.residual_ms)},
            drift=div.drift,
            diverged=div.diverged,
            drift_score=div.drift_score,
            process_noise_scale=div.q_scale,
            restarts=div.restarts,
            outside_range=outside_range(model, fs.x),
        ),
        events_applied=events_applied,
        stale=stale,
    )


def outside_range(model: Declared, x: np.ndarray) -> list[str]:
    """The states whose estimate lies outside their declared range (`raytwin.sim.model.Var`): by the declaration,
    values the quantity cannot take, so the estimate no longer describes the asset. NaN (a diverged filter,
    `DivergenceReport.diverged`) is not named here."""
    return [v.name for v, value in zip(model.states, x.tolist()) if value < v.lower or value > v.upper]


def _encode(fs: FilterState, max_time_us: int | None) -> dict:
    return {
        "t": fs.t, "x": fs.x.tolist(), "P": fs.P.tolist(), "u": fs.u.tolist(), "max_time_us": max_time_us,
        "divergence": {k: list(v) if isinstance(v, tuple) else v for k, v in fs.divergence._asdict().items()},
    }


def _decode(payload: dict) -> tuple[FilterState, int | None]:
    # a snapshot written before a field existed takes its default (`Divergence`)
    div = Divergence(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload["divergence"].items()})
    fs = FilterState(payload["t"], np.asarray(payload["x"], dtype=np.float64), np.asarray(payload["P"], dtype=np.float64),
                     np.asarray(payload["u"], dtype=np.float64), div)
    return fs, payload["max_time_us"]


def encode_state(fs: FilterState) -> dict:
    """A filter state as JSON (a snapshot's payload without the watermark); `decode_snapshot` reads it."""
    return _encode(fs, None)


def decode_snapshot(payload: dict) -> FilterState:
    """The filter state a snapshot's payload holds."""
    return _decode(payload)[0]


class Refused(NamedTuple):
    """An event the filter refused (`raytwin.estimation.scan_kernels`: the model's update of the twin's
    state was not finite there, or the model's next step from it was not, or failed), with why
    (`Divergence.refused_states`)."""

    twin: Twin
    event: Pending
    why: int

    def reason(self) -> str:
        """The dead letter's reason: where, which states, and that the twin kept its state."""
        names, step = refused_names(self.why, self.twin.filter.model.state_names)
        what = ("a state from which the model's next step is not finite or fails (NaN; an FMU's step that returns "
                "fmi2Discard or fmi2Error counts as NaN)" if step else "a non-finite state (NaN)")
        return (f"{NON_FINITE}: the model's update of {self.twin.asset_id} at "
                f"{from_micros(self.event.key[0]).isoformat()} gave {what} for {', '.join(names)}: the model is not "
                "defined there (check its domain, e.g. a square root of a negative number); the twin keeps its "
                "state before this event")


class Restarted(NamedTuple):
    """An event updated from the twin's state before its gap, the filter's prediction over the gap not being
    finite (`raytwin.estimation.scan_kernels`, `Divergence.restarted`): the twin re-anchored on it. Why kept:
    nothing else tells an operator that a twin's estimate started over (`metrics.FILTER_RESTARTS`)."""

    twin: Twin
    event: Pending
    gap_s: float  # from the state before the event (the previous event, or the run's start) to the event


class Applied(NamedTuple):
    """What `apply_many` found worth reporting: the events the filter refused, and those it restarted on."""

    refused: list[Refused]
    restarted: list[Restarted]


def apply_many(batches: list[tuple[Twin, list[Pending]]], each_next: bool = False) -> Applied:
    """Apply accepted events to many twins at once: their filter runs share kernel dispatches
    (`raytwin.estimation.assimilate_runs`), with the same bits as applying each twin alone. A twin
    whose events cross a model swap boundary runs them in one round per model version. Returns the
    events the filter refused (events of the window a late one re-applies included): they keep their
    place in the order (and the revision), the state is the one before them; and the events the filter
    restarted on (`Restarted`). `each_next`: the caller found each twin's one event `Twin.takes_next` (not
    checked again): `apply_next` runs them."""
    todo = [(twin, events) for twin, events in batches if events]
    if todo and (each_next or _each_next(todo)):  # a later round is never such: only a swapping twin has one
        return apply_next([twin for twin, _ in todo], [events[0] for _, events in todo])
    applied = Applied([], [])
    while todo:
        plans = [(twin, *twin._plan(events)) for twin, events in todo]
        twins, runs = [twin for twin, *_ in plans], [events for _, events, _, _ in plans]
        traces = assimilate_runs([run for _, _, run, _ in plans])
        _report(traces, twins, runs, applied)
        for k, (twin, events, final) in enumerate(zip(twins, runs, traces.final_packed())):
            twin._absorb(events, traces, k, final)
        todo = [(twin, later) for twin, _, _, later in plans if later]
    return applied


def apply_next(twins: list[Twin], events: list[Pending], columns: EventColumns | None = None) -> Applied:
    """`apply_many` of one event a twin, each `Twin.takes_next` (the caller checked): a live batch's usual call,
    packed as columns over all twins at once (`columns`, the events' own if the caller has them; else gathered from
    `events`) and taken by the twins in one pass (`_absorb_next`). The same bits as `apply_many`'s general path."""
    traces = _assimilate_next(events, twins, columns)
    applied = Applied([], [])
    _report(traces, twins, list(zip(events)), applied)
    _absorb_next(twins, events, traces.final_packed())
    return applied


def _report(traces: Traces, twins: list[Twin], runs: list[list[Pending]] | list[tuple[Pending]],
            into: Applied) -> None:
    """Add the events of `traces` the filter refused and those it restarted on to `into` (before the twins
    absorb them: a restart's gap is from the state before it)."""
    for k, found in traces.refused().items():
        into.refused.extend(Refused(twins[k], runs[k][i], why) for i, why in found)
    for k, found in traces.restarted().items():
        into.restarted.extend(Restarted(twins[k], runs[k][i], _gap_s(twins[k], runs[k], i)) for i in found)


def _absorb_next(twins: list[Twin], events: list[Pending], finals: list[PackedState]) -> None:
    """`Twin._absorb` of each twin's one event (its run of a dispatch of one-event runs, ending in its `finals`
    row), in one loop: per twin, a call and the general case's checkpoint loop were half its cost in a live call.
    Kept in step with `_absorb` by `tests/test_twins.py` (both paths' twins compared field by field)."""
    for twin, ev, final in zip(twins, events, finals):
        key, applied = ev.key, twin.events_applied + 1
        checkpoints = twin.checkpoints
        if applied % twin.checkpoint_every == 0:  # `_absorb`'s checkpoint at the run's last (only) event
            checkpoints.append(Checkpoint(key, final.detached(), applied))
        twin._fs, twin._packed = None, final
        twin.last_key, twin.events_applied = key, applied
        twin.window.append(ev)
        newest = twin.max_time_us
        if newest is None or key[0] > newest:
            twin.max_time_us = newest = key[0]
        wm = newest - twin.lateness_us
        if len(checkpoints) > 1 and checkpoints[1].key[0] < wm:
            twin._prune(wm)


def _gap_s(twin: Twin, events: list[Pending], i: int) -> float:
    """Seconds from the state before `events[i]` to it: the previous event's, or (before `Twin._absorb`) the twin's."""
    before = events[i - 1].key[0] / 1e6 if i else (twin.fs if twin._packed is None else twin._packed).t
    return events[i].key[0] / 1e6 - before


def _each_next(todo: list[tuple[Twin, list[Pending]]]) -> bool:
    """Whether each twin takes one event, after its last applied, on its only model (no rewind, no swap, no drift
    clear ahead)."""
    return all(len(events) == 1 and len(twin.segments) == 1 and (twin.last_key is None or events[0].key > twin.last_key)
               and not twin._clear_ahead() for twin, events in todo)


def _assimilate_next(events: list[Pending], twins: list[Twin], columns: EventColumns | None = None) -> Traces:
    """Each twin's one event, next after its last applied (no rewind, no model swap): a live batch's usual
    call, packed as columns over all twins at once (`raytwin.estimation.assimilate_events`) instead of a
    `Twin._plan` and a `Run` per twin; the same bits as `_plan`'s runs. `columns`: the events' (else gathered)."""
    if columns is None:
        count = len(events)
        columns = EventColumns(np.fromiter((e.key[0] for e in events), dtype=np.float64, count=count) / 1e6,
                               [e.values for e in events],  # rows: twins of other models measure other columns
                               np.fromiter((e.use_outputs for e in events), dtype=bool, count=count))
    starts = [twin.fs if twin._packed is None else twin._packed for twin in twins]
    return assimilate_events([twin.filter for twin in twins], starts, *columns)


def replay(twin: Twin, events: list[LoggedEvent]) -> Twin:
    """Apply logged events after the twin's last key (recovery, time travel), skipping known ones."""
    replay_many([(twin, events)])
    return twin


def replay_many(batches: list[tuple[Twin, list[LoggedEvent]]]) -> None:
    """`replay` for many twins through shared filter dispatches (same bits as one by one); an event after the
    twin's last applied one is not in its window either."""
    apply_many([(twin, [twin.pending(e) for e in events if twin.last_key is None or e.key > twin.last_key])
                for twin, events in batches])
