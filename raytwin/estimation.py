"""State estimation for live twins: an extended Kalman filter over any `raytwin.sim.Model`, and the
batched kernel machinery every filter shares (`scan_kernels`, `assimilate_runs`; the unscented
filter in `raytwin.ukf` plugs its own per-twin predict and update into it).

One filter serves linear and nonlinear models: the Jacobians come from `jax.jacfwd` of the
model's own RK4 step and output map, so for a linear model (``thermal_rc``) they are exact and the
filter *is* the linear Kalman filter; for ``battery_ecm`` / ``two_tank`` it is the EKF.

Why this shape:
- kernels are jitted per *model* (not per asset) and per padded run length (`RUN_LENGTHS`), so a shard
  holding thousands of twins of a type compiles a handful of times and then only dispatches;
- one dispatch applies a whole run of events to each of `LANES` twins (`assimilate_runs`): the
  per-event cost of a live twin used to be the Python->XLA dispatch, not the arithmetic;
- between measurements the state is propagated with sub-steps of at most ``model.default_dt``
  (inputs zero-order held), so a telemetry gap is integrated as accurately as the simulator, up to
  `MAX_SUBSTEPS` sub-steps: a longer gap (a device whose clock jumped years) is integrated for that
  horizon only and the covariance grows by the process noise of the rest (`substeps`), so its cost
  is bounded;
- an event whose update or next step is not finite is refused and the twin keeps its state; a measurement
  whose prediction over its gap is not finite (a drained ``two_tank``'s infinite Jacobian) updates the state
  before the gap instead, its covariance grown by the gap's process noise (`scan_kernels`), which is also what
  the explicit look-ahead predicts then (`ExtendedKalmanFilter.predict`);
- the measurement update is iterated (`IEKF_ITERATIONS` linearisations of the output map, Gauss-Newton
  to the MAP estimate): a single linearisation at the prior mean made a fresh ``battery_ecm`` twin
  (prior soc 0.5 +- 0.2, cubic OCV, 2 mV sensor) step to an estimate 0.06 off with a std of 0.01,
  NEES ~200 against 3 over Monte-Carlo runs; iterated, NEES is inside its chi-square band
  (tests/test_filters.py). For a linear output map the iterations repeat the first (the KF);
- the covariance update uses the Joseph form (stays symmetric positive semi-definite) and
  measurements may carry any subset of the outputs (missing rows are masked out exactly);
- divergence indicators (normalised innovation squared, residual mean / RMS) are exponentially
  weighted so they follow the recent behaviour of the asset; `drift` is a sequential test
  (`raytwin.drift`: two-sided CUSUMs with two allowances on the normalised innovations, thresholds set by a false-alarm
  interval in event time) that latches until cleared (`clear_drift`), and fires whenever the state,
  its covariance or NIS stops being finite (`Divergence.diverged`: NaN > bound is false, so a broken
  filter would otherwise look healthy); the process noise adapts down from the declared value to
  what the innovations support (`raytwin.drift`).

Everything is float64 and deterministic: the same events in the same order give bit-identical
states however they are split into calls and whichever twins share a dispatch, which is what
recovery and time travel rely on (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial
from itertools import chain, repeat
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np

from raytwin import drift as detector
from raytwin.executables import StoredKernel, kernel_identity, stored_kernels_dir
from raytwin.sim import Model
from raytwin.sim.precision import in_float64


def model_defaults(model: Model) -> dict[str, dict[str, float]]:
    """The filter defaults a model declares (in its declared units), by kind: ``initial_state``/``initial_std``
    (a new twin's prior: `State.nominal`/`prior_std`), ``process_std`` (per state, units/sqrt(s);
    Q = q^2 dt per sub-step), ``measurement_std`` (per output) and ``inputs`` (the value an input
    holds until first measured: `Input.nominal`). Undeclared values are left out."""
    pick = lambda variables, field: {v.name: getattr(v, field) for v in variables  # noqa: E731
                                     if getattr(v, field) is not None}
    return {"initial_state": pick(model.states, "nominal"), "initial_std": pick(model.states, "prior_std"),
            "process_std": pick(model.states, "process_std"), "measurement_std": pick(model.outputs, "measurement_std"),
            "inputs": pick(model.inputs, "nominal")}


EWMA_ALPHA = 0.05
"""Weight of the newest update in the divergence indicators (~40-update memory)."""
IEKF_ITERATIONS = 4
"""Linearisations of the output map per update (see `_kernels`)."""


class Divergence(NamedTuple):
    """Innovation statistics and the drift detector of one twin (folded in by the filter kernel).

    NamedTuples (here and in `FilterState`): a live batch makes one per twin it touches, at a
    third of a frozen dataclass's cost."""

    updates: int = 0
    nis_last: float = 0.0
    nis_mean: float = 0.0  # EWMA of NIS / measured dimensions (1.0 for a consistent filter)
    residual_mean: tuple[float, ...] = ()
    residual_ms: tuple[float, ...] = ()
    cusum: tuple[float, ...] = ()  # per allowance (`drift.ALLOWANCES`): per output the upward, then the downward
    drift_score: float = 0.0  # largest CUSUM over its threshold at the last update (>= 1: alarm)
    alarm: bool = False  # latched when drift_score reached 1; cleared only by `clear_drift`
    gap_mean: float = 0.0  # EWMA of the event-time seconds between measurements (0: none yet)
    since: float = 0.0  # event-time seconds since the last measurement
    q_scale: float = 1.0  # adapted factor on the declared process-noise variance, in (0, 1]
    refused: int = 0  # events refused because the model's update of the state was not finite (`scan_kernels`)
    refused_states: int = 0  # why the last event was refused, as bits (`refused_names`); 0: it was not
    restarts: int = 0  # measured events updated from the state before their gap, not its prediction (`scan_kernels`)
    restarted: bool = False  # whether the last event was one of those

    @property
    def diverged(self) -> bool:
        """The filter broke down: the kernel makes `nis_mean` NaN once the state or its covariance is
        not finite, and an overflowing innovation makes it inf."""
        return not math.isfinite(self.nis_mean)

    @property
    def drift(self) -> bool:
        """The model no longer explains the measurements (a CUSUM alarm, latched until cleared) or the
        filter diverged."""
        return self.diverged or self.alarm


def clear_drift(fs: FilterState) -> FilterState:
    """`fs` with the drift alarm acknowledged: CUSUMs restarted from zero and the latch released
    (the innovation statistics, mean gap and adapted process noise are kept). A persisting fault
    raises the alarm again after the detection delay it took the first time."""
    d = fs.divergence
    return fs._replace(divergence=d._replace(cusum=(0.0,) * len(d.cusum), drift_score=0.0, alarm=False))


class FilterState(NamedTuple):
    """Mean, covariance, held inputs and the time they refer to (epoch seconds, None = prior)."""

    t: float | None
    x: np.ndarray
    P: np.ndarray
    u: np.ndarray
    divergence: Divergence = Divergence()


class _Kernels(NamedTuple):
    predict: Callable
    assimilate: Callable


class _Layout(NamedTuple):
    """Per-twin shapes of what `scan_kernels`' `assimilate` takes, each group packed in one float64
    array along its last axis: the carry (x, P, then `Divergence`'s fields, with the dtypes they are
    unpacked to), the constants (params, process-noise rates, measurement variances, detector settings)
    and each event's columns (sub-step length, skipped seconds, held and new inputs, measurements, their
    mask). Why packed: every argument and result array of a dispatch costs a gather, a conversion and a
    scatter (a jitted call with 24 arguments and 13 results took ~190 us against ~35 us with the same
    data in 3 and 3); a live batch's filter step (100 twins, 1-2 events each) takes 0.90x the time with
    the same bits. A static argument of the jitted kernel: one compile per model and run length, as
    before. Read off the arrays packed (`of`), so it cannot disagree with them; a twin's carry row
    between dispatches (`PackedState`) keeps the layout it was packed with."""

    carry: tuple[tuple[int, ...], ...]
    carry_dtypes: tuple[np.dtype, ...]  # int64 and bool fields cross as float64 exactly (counts below 2**53, 0/1)
    consts: tuple[tuple[int, ...], ...]
    events: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, carry: tuple[tuple[tuple[int, ...], ...], tuple[np.dtype, ...]], consts: tuple[tuple[int, ...], ...],
           events: Sequence[np.ndarray]) -> _Layout:
        """The layout of a carry's (shapes, dtypes), of a filter's constants' shapes (`ExtendedKalmanFilter.consts`)
        and of these per twin and event fields (events)."""
        return cls(*carry, consts, tuple(f.shape[2:] for f in events))


@lru_cache(maxsize=256)
def _columns(shapes: tuple[tuple[int, ...], ...]) -> tuple[slice, ...]:
    """Where each field of these shapes lies along a packed array's last axis (cached: a layout's few
    shapes are asked for on every dispatch and every state unpacked)."""
    out, start = [], 0
    for shape in shapes:
        out.append(slice(start, start + math.prod(shape)))
        start += math.prod(shape)
    return tuple(out)


def _unpack(packed, shapes: tuple[tuple[int, ...], ...], dtypes: Sequence[np.dtype] = ()):
    """The fields of a packed array (last axis) in their shapes (and `dtypes`, if given), leading axes
    kept (JAX or NumPy)."""
    return [_unpack_field(packed, shapes, dtypes, k) for k in range(len(shapes))]


def _unpack_field(packed, shapes: tuple[tuple[int, ...], ...], dtypes: Sequence[np.dtype], k: int):
    """Field `k` of `_unpack` alone (a live batch reads a few fields of its trace, `ModelTrace`)."""
    field = packed[..., _columns(shapes)[k]].reshape(*packed.shape[:-1], *shapes[k])
    dtype = dtypes[k] if k < len(dtypes) else np.float64
    return field if dtype == np.float64 else (field != 0) if dtype == np.bool_ else field.astype(dtype)


def _pack(xp, fields: Sequence, lead: tuple[int, ...]):
    """Fields with leading axes `lead` as one float64 array (their values flattened along the last axis)."""
    return xp.concatenate([xp.reshape(f, (*lead, math.prod(f.shape[len(lead):]))).astype(xp.float64) for f in fields],
                          axis=-1)


class FilterTrace(NamedTuple):
    """The filter state after each event of one run (or of several runs of one model, back to back);
    the fields after `u` are `Divergence`'s, in its order, one row per event."""

    t: np.ndarray  # (n,)
    x: np.ndarray  # (n, states)
    P: np.ndarray  # (n, states, states)
    u: np.ndarray  # (n, inputs)
    updates: np.ndarray  # (n,)
    nis_last: np.ndarray
    nis_mean: np.ndarray
    residual_mean: np.ndarray  # (n, outputs)
    residual_ms: np.ndarray
    cusum: np.ndarray  # (n, allowances * 2 * outputs)
    drift_score: np.ndarray
    alarm: np.ndarray  # (n,) bool
    gap_mean: np.ndarray
    since: np.ndarray
    q_scale: np.ndarray
    refused: np.ndarray  # (n,) int
    refused_states: np.ndarray  # (n,) int: why this event was refused (`refused_names`), 0 if it was not
    restarts: np.ndarray  # (n,) int
    restarted: np.ndarray  # (n,) bool: this event was updated from the state before its gap (`scan_kernels`)

    def __len__(self) -> int:
        return len(self.t)

    def state(self, i: int) -> FilterState:
        return self.states([i])[0]

    def states(self, rows: Sequence[int] | np.ndarray) -> list[FilterState]:
        """The states after the events `rows`, gathered field by field (one NumPy gather per field
        for all of them: a live batch takes one final state per twin it touched)."""
        rows = np.asarray(rows, dtype=np.intp)
        cols = [getattr(self, name)[rows].tolist() for name in Divergence._fields]
        never = [j for j, updates in enumerate(cols[0]) if not updates]
        for i in _PER_OUTPUT_INDEX:  # tuples, empty before the first update
            cols[i] = list(map(tuple, cols[i]))
            for j in never:
                cols[i][j] = ()
        divs = map(Divergence._make, zip(*cols))
        return list(map(FilterState, self.t[rows].tolist(), self.x[rows], self.P[rows], self.u[rows], divs))


_PER_OUTPUT = ("residual_mean", "residual_ms", "cusum")
"""The `Divergence` fields that hold one value per output (two per allowance for `cusum`)."""
_PER_OUTPUT_INDEX = [Divergence._fields.index(n) for n in _PER_OUTPUT]


class FinalRows(NamedTuple):
    """The states one model's dispatch left its runs in, as columns with a row per run (struct of arrays):
    the time of each run's last event, its held inputs, its row of the kernel's packed carry (x, P and
    `Divergence`'s fields, laid out as `layout.carry`) and whether it drifts (`Divergence.drift`, which a
    shard reads after every call). Never written after it is made: twins that share it read their rows.

    Why: a live shard's twins go from one dispatch into the next together, so the next dispatch gathers
    their starts with one fancy index per column (`_start_columns`) instead of stacking a carry, a time and
    an input row per twin, and a dispatch's results are kept as one object, not an object per twin."""

    kernels: _Kernels  # the kernel whose dispatch left them (another kernel's dispatch unpacks a row first)
    layout: _Layout
    t: np.ndarray  # (runs,)
    u: np.ndarray  # (runs, inputs)
    carry: np.ndarray  # (runs, carry columns)
    drift: list[bool]


class PackedState(NamedTuple):
    """A twin's filter state as its last dispatch left it: its row of that dispatch's `FinalRows`.

    Why: a live twin's state goes from one dispatch into the next many times a second and is read far
    less often (a query, a migration), so `assimilate_runs` takes and gives states in this form and
    `state` unpacks one only when asked: packing ~100 twins' `FilterState`s into a dispatch and making
    them again from its result was a third of a live batch's filter step (0.66x without it, in one
    process). Same bits: the row is exactly what packing `state()` gives back (counts and flags cross
    float64 exactly)."""

    rows: FinalRows
    row: int

    @property
    def kernels(self) -> _Kernels:
        return self.rows.kernels

    @property
    def layout(self) -> _Layout:
        return self.rows.layout

    @property
    def t(self) -> float:
        """The time of the twin's last event (epoch seconds)."""
        return self.rows.t[self.row].item()

    @property
    def u(self) -> np.ndarray:
        """The held inputs (a view of the shared row: not to be written)."""
        return self.rows.u[self.row]

    @property
    def carry(self) -> np.ndarray:
        """The packed carry row (a view of the shared row: not to be written)."""
        return self.rows.carry[self.row]

    @property
    def drift(self) -> bool:
        return self.rows.drift[self.row]

    def state(self) -> FilterState:
        """The `FilterState` `FilterTrace.states` makes of this row (same values and types), built from
        the row directly: every state read unpacks one twin, and a trace's gathers for many rows made it
        1.6x slower."""
        return _row_state(self.layout, self.t, self.u, self.carry)

    def detached(self) -> PackedState:
        """This row alone, in its own `FinalRows` (copies): a state kept for long (a twin's checkpoint) must
        not keep the other rows of its dispatch alive."""
        r, i = self.rows, self.row
        return PackedState(FinalRows(r.kernels, r.layout, r.t[i:i + 1].copy(), r.u[i:i + 1].copy(),
                                     r.carry[i:i + 1].copy(), [r.drift[i]]), 0)


def _row_state(layout: _Layout, t: float, u: np.ndarray, carry: np.ndarray) -> FilterState:
    """`PackedState.state` of a carry row laid out as `layout.carry` (its own copies of the arrays)."""
    x, P, *div = (f[0] for f in _unpack(carry[None], layout.carry, layout.carry_dtypes))
    fields = [f.tolist() for f in div]
    for i in _PER_OUTPUT_INDEX:  # tuples, empty before the first update
        fields[i] = tuple(fields[i]) if fields[0] else ()
    return FilterState(t, x.copy(), P.copy(), u.copy(), Divergence._make(fields))


class ModelTrace(NamedTuple):
    """What one model's dispatches left for its runs' events, back to back (run order): each event's time
    and held inputs after it, and the kernel's packed carry after it (x, P, `Divergence`; laid out as
    `layout.carry`). `Traces` unpacks it into a `FilterTrace` only when one is asked for: a live batch
    reads a few of its fields (`field`) and a few rows (`state`), and unpacking every field (17 arrays)
    was ~5 % of its filter step."""

    t: np.ndarray
    u: np.ndarray
    carry: np.ndarray
    layout: _Layout

    def field(self, name: str, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """`Divergence` field `name` (as `FilterTrace` holds it) of the events `rows`."""
        return _unpack_field(self.carry[rows], self.layout.carry, self.layout.carry_dtypes,
                             2 + Divergence._fields.index(name))

    def state(self, i: int) -> FilterState:
        """`FilterTrace.state(i)`, made from event i's carry row alone (`PackedState.state`)."""
        return _row_state(self.layout, self.t[i].item(), self.u[i], self.carry[i])

    def unpacked(self) -> FilterTrace:
        """Every field of every event, as `FilterTrace` holds them."""
        out_x, out_P, *out_div = _unpack(self.carry, self.layout.carry, self.layout.carry_dtypes)
        return FilterTrace(self.t, out_x, out_P, self.u, *out_div)


@dataclass(frozen=True)
class Traces:
    """What `assimilate_runs` returns: for each run, the state after each of its events.

    The runs of one model share one `ModelTrace` (run k is `lengths[k]` rows from `starts[k]`), so
    the final states of all runs come out of one gather per model (`final_states`, or `final_packed`
    for the next dispatch) instead of a slice and an object per run and field; it is unpacked into a
    `FilterTrace` (`packed`) only where a whole trace is read."""

    models: dict[_Kernels, ModelTrace]
    groups: dict[_Kernels, list[int]]  # the runs of each kernel (model and kind of filter)
    kernels: list[_Kernels]  # the kernel of each run
    starts: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.kernels)

    @cached_property
    def packed(self) -> dict[_Kernels, FilterTrace]:
        """Each model's `FilterTrace`, unpacked on first use (`ModelTrace`)."""
        return {kernels: model.unpacked() for kernels, model in self.models.items()}

    def __getitem__(self, k: int) -> FilterTrace:
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        start = int(self.starts[k])
        return FilterTrace(*(f[start:start + int(self.lengths[k])] for f in self.packed[self.kernels[k]]))

    def state(self, k: int, i: int) -> FilterState:
        """Run k's state after its event i."""
        return self.models[self.kernels[k]].state(int(self.starts[k]) + i)

    def final_states(self) -> list[FilterState]:
        """Each run's state after its last event, in run order."""
        ends = self.starts + self.lengths - 1
        out: dict[int, FilterState] = {}
        for kernels, ks in self.groups.items():
            out.update(zip(ks, self.packed[kernels].states(ends[ks])))
        return [out[k] for k in range(len(self))]

    def refused(self) -> dict[int, list[tuple[int, int]]]:
        """For each run with events refused (`scan_kernels`), their (index in the run, `refused_states`):
        one scan per model, nothing more in the common case of none."""
        return self._nonzero("refused_states")

    def restarted(self) -> dict[int, list[int]]:
        """For each run with events updated from the state before their gap (`scan_kernels`, `Divergence.restarted`),
        their indexes in the run: what a shard counts and logs (rare, and invisible in the state otherwise)."""
        return {k: [i for i, _ in found] for k, found in self._nonzero("restarted").items()}

    def _nonzero(self, name: str) -> dict[int, list[tuple[int, int]]]:
        """For each run with events whose `Divergence` field `name` is not 0, their (index in the run, value)."""
        out: dict[int, list[tuple[int, int]]] = {}
        for kernels, ks in self.groups.items():
            why = self.models[kernels].field(name)
            rows = np.flatnonzero(why)
            if rows.size:
                ends = self.starts[ks] + self.lengths[ks]
                for row, w in zip(rows.tolist(), np.searchsorted(ends, rows, side="right").tolist()):
                    out.setdefault(ks[w], []).append((row - int(self.starts[ks[w]]), int(why[row])))
        return out

    def final_packed(self) -> list[PackedState]:
        """`final_states` as the kernel left them (`PackedState`): one gather per model into its `FinalRows`,
        no unpacking."""
        ends = self.starts + self.lengths - 1
        out: dict[int, PackedState] = {}
        for kernels, ks in self.groups.items():
            trace, last = self.models[kernels], ends[ks]
            # `Divergence.drift` column-wise (diverged: NIS not finite; or the latched alarm): keep them one rule
            drift = (~np.isfinite(trace.field("nis_mean", last)) | trace.field("alarm", last)).tolist()
            if len(last) == len(trace.t):  # one event a run: the trace is the final rows (no gather)
                rows = FinalRows(kernels, trace.layout, trace.t, trace.u, trace.carry, drift)
            else:
                rows = FinalRows(kernels, trace.layout, trace.t[last], trace.u[last], trace.carry[last], drift)
            # the tuple constructor, not the NamedTuple's Python-level one: ~100 a live call, 2.7 % of it
            states = map(tuple.__new__, repeat(PackedState), zip(repeat(rows), range(len(ks))))
            if len(self.groups) == 1:  # one model (a shard's usual batch): its runs are all, in order
                return list(states)
            out.update(zip(ks, states))
        return [out[k] for k in range(len(self))]


RUN_LENGTHS = (2, 8, 64)
"""The padded scan lengths of event runs: a run is padded to the shortest that holds it and a
longer one continues in the next dispatch. Three shapes per model means three compiles (~1-2 s
each), done when the model's first filter is made (`ExtendedKalmanFilter.warm_up`) so that a live
event never waits for one (compiling on demand for every power of two stalled a live stream for
seconds). 2 fits a live batch, about one event per twin (padded to 8, the kernel did four times
the arithmetic: 1.15 -> 0.80 ms for a batch of 100 twins, measured in a shard), 8 a short burst,
64 keeps a long replay to few dispatches; no length is 1 (a one-iteration loop XLA would inline
and could fuse differently)."""

MAX_RUN = RUN_LENGTHS[-1]
"""Longest run of events in one dispatch."""

LANES = 128
"""Every filter dispatch runs exactly this many twins side by side (unused lanes are no-ops).

Why a fixed width: with one shape per run length, each twin's arithmetic is the same vector code
whatever lane it gets and whoever its neighbours are, so a twin's state has the same bits in a
live batch and in a replay alone (a vmap over a varying number of twins does NOT give that for
the nonlinear models: measured). Why 128: a dispatch costs ~0.25 ms whatever its width (argument
and result transfers, the loop's launches) and ~0.26 us per lane and step on top, so a live batch
touching ~100 twins with ~1 event each costs one dispatch (0.40 ms measured) instead of four of
32 lanes (1.3 ms).
"""


MAX_SUBSTEPS = 32_768
"""Most integration sub-steps between two events of a twin (`substeps`).

Why a cap: a twin's event-time gap is integrated in sub-steps of at most ``model.default_dt``, and
the lanes of a dispatch run in lockstep, so one device whose clock jumped 10 years (5.3M sub-steps
of `thermal_rc`'s 60 s) held its whole shard for seconds to minutes. Why this many: a dispatch of
128 twins with one capped gap took 43 ms (`thermal_rc`) and 127 ms (`battery_ecm`) on the shared
2-core machine at load 6, and the cap covers gaps of 22.7 days for `thermal_rc` (the slow mode of
the reference building has a 21 h time constant: a longer gap ends at its steady state) and 9.1 h
for `battery_ecm` and `two_tank` (RC pairs and tanks settle within minutes), far more than a live
sensor's silence between readings, whose prediction therefore stays exact."""


SUBSTEP_SLACK = 1e-3
"""A gap longer than n ``default_dt`` by less than this fraction of a step is n sub-steps: event
times are epoch seconds, whose rounding (~2.4e-7 s) made a 0.1 s gap of a 0.01 s model 11 sub-steps
of 0.0091 s, shorter than a fixed-step FMU's step (which then does not advance at all)."""


def substeps(gap: np.ndarray, default_dt: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How to propagate over event-time gaps [s]: (sub-steps, their length, seconds left unintegrated).

    Up to `MAX_SUBSTEPS` sub-steps of at most `default_dt` cover the gap exactly (nothing left). A
    longer gap is integrated for `MAX_SUBSTEPS * default_dt` with the inputs held and the rest is
    skipped: what held inputs drive a stable state to has settled by then, and the covariance grows
    by the process noise of the skipped time (q^2 per second, the kernel's `skipped`). That is
    exactly what integrating does to a state that does not decay (a battery's charge) and more than
    it does to one that does, so the filter is never more confident than the full integration would
    make it, and the next measurements pull the estimate back (tested: a 10-year gap).
    """
    n = np.where(gap > 0, np.maximum(np.ceil(gap / default_dt - SUBSTEP_SLACK), 1.0), 0.0)
    long = n > MAX_SUBSTEPS
    n_sub = np.minimum(n, MAX_SUBSTEPS).astype(np.int32)
    dt = np.where(long, default_dt, np.divide(gap, n_sub, out=np.zeros_like(gap), where=n_sub > 0))
    return n_sub, dt, np.where(long, gap - MAX_SUBSTEPS * default_dt, 0.0)


def bucket(n: int) -> int:
    """The padded scan length for a run of `n` (<= `MAX_RUN`) events."""
    return next(length for length in RUN_LENGTHS if n <= length)


def _mm(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """A small matrix product as broadcast multiply + sum: XLA fuses it with its neighbours,
    where a `dot` would be a separate kernel launch per filter step."""
    return (a[:, :, None] * b[None, :, :]).sum(axis=1)


def _solve_spd(S: jnp.ndarray, B: jnp.ndarray) -> jnp.ndarray:
    """S^-1 B for a small symmetric positive definite S, by unrolled Gauss-Jordan elimination
    (no pivoting needed for SPD): fused elementwise code instead of a LAPACK call per step."""
    n = S.shape[0]
    A = jnp.concatenate([S, B], axis=1)
    for i in range(n):
        row = A[i] / A[i, i]
        A = (A - A[:, i:i + 1] * row[None, :]).at[i].set(row)
    return A[:, n:]


@lru_cache(maxsize=None)
def _kernels(model: Model) -> _Kernels:
    """The EKF's kernels for one model, shared by every twin of that model (`scan_kernels`)."""
    step = model.step_vector
    jac_step = jax.jacfwd(step)
    jac_obs = jax.jacfwd(model.observe_vector)

    def predict(x, P, u, p, q_var_rate, n, dt, skipped):
        def body(_, carry):
            x, P = carry
            F = jac_step(x, u, p, dt)
            P = _mm(_mm(F, P), F.T) + jnp.diag(q_var_rate * dt)
            return step(x, u, p, dt), 0.5 * (P + P.T)

        x, P = jax.lax.fori_loop(0, n, body, (x, P))
        return x, skip(P, q_var_rate, skipped)

    def update(x, P, u, p, z, mask, r_var):
        r_diag = jnp.diag(jnp.where(mask > 0, r_var, 1.0))

        def gain(x_lin):
            """H at `x_lin`, the innovation linearised there, S^-1 [H P, y] (masked rows are exact no-ops)."""
            H = jac_obs(x_lin, u, p) * mask[:, None]
            y = (z - model.observe_vector(x_lin, u, p) - _mm(H, (x - x_lin)[:, None])[:, 0]) * mask
            HP = _mm(H, P)
            S = _mm(HP, H.T) + r_diag
            return H, y, _solve_spd(S, jnp.concatenate([HP, y[:, None]], axis=1)), jnp.diagonal(S)

        # the iterated EKF: re-linearise the output map at the updated estimate (Gauss-Newton to the
        # MAP estimate); the innovation statistics are those of the prediction (first pass)
        H, y, sol, s_diag = gain(x)
        innovation, nis = y, (y * sol[:, -1]).sum()
        for _ in range(IEKF_ITERATIONS - 1):
            H, y, sol, _ = gain(x + (sol[:, :-1].T * y).sum(axis=1))
        K = sol[:, :-1].T  # P H^T S^-1 (S, P symmetric)
        ikh = jnp.eye(x.shape[0]) - _mm(K, H)
        P_new = _mm(_mm(ikh, P), ikh.T) + _mm(K * (r_var * mask), K.T)
        x_new = jnp.stack(model.project(tuple(x + (K * y).sum(axis=1))))
        return x_new, 0.5 * (P_new + P_new.T), innovation, nis, s_diag

    return scan_kernels(predict, update, identity=lambda: kernel_identity("ekf", model), look_ahead="step")


STATE_BITS = 50
"""States named one bit each in `Divergence.refused_states` (the carry crosses float64: exact below 2**53);
a state after them sets bit `STATE_BITS` ("more")."""
STEP_BIT = 2 ** (STATE_BITS + 1)
"""Set in `refused_states` when the update was finite but the filter's step from it is not (`scan_kernels`)."""


def _state_bits(bad: jnp.ndarray) -> jnp.ndarray:
    """The states flagged in `bad` as `refused_states` bits (int64)."""
    idx = jnp.arange(bad.shape[0])
    bits = jnp.where(bad & (idx < STATE_BITS), 2 ** jnp.minimum(idx, STATE_BITS - 1), 0).astype(jnp.int64).sum()
    return bits + jnp.where(jnp.any(bad & (idx >= STATE_BITS)), 2 ** STATE_BITS, 0)


def refused_names(why: int, state_names: Sequence[str]) -> tuple[list[str], bool]:
    """The states an event was refused for (`Divergence.refused_states`), and whether it was the filter's
    step from its finite update (True) rather than the update itself that was not finite."""
    names = [n for j, n in enumerate(state_names[:STATE_BITS]) if why >> j & 1]
    if why >> STATE_BITS & 1:
        names.append(f"{len(state_names) - STATE_BITS} more")
    return names, bool(why & STEP_BIT)


def skip(P: jnp.ndarray, q_var_rate: jnp.ndarray, skipped: jnp.ndarray) -> jnp.ndarray:
    """P grown by the process noise of the seconds a capped gap left unintegrated (see `substeps`)."""
    return jnp.where(skipped > 0, P + jnp.diag(q_var_rate * skipped), P)


LookAhead = Literal["none", "step", "gap"]
"""How `scan_kernels` checks that the filter can step from an event's result: not at all, one sub-step of
``default_dt`` (a model traced into the kernel), or the event's own gap again (a host stepper: `HOST_LOOK_AHEAD`)."""

HOST_LOOK_AHEAD = 16
"""Most sub-steps of a ``"gap"`` look-ahead (`scan_kernels`): each runs the model on the host once per sigma
point, so an event after a long silence (up to `MAX_SUBSTEPS` sub-steps) does not pay for its gap twice; 16
covers a 0.01 s FMU fed every 0.1 s."""


def _gap_again(changed: jnp.ndarray, n: jnp.ndarray, dt: jnp.ndarray, gap0: jnp.ndarray
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The ``"gap"`` look-ahead's sub-steps and their length: the event's own (at most `HOST_LOOK_AHEAD`), one
    of ``default_dt`` after an event with none (a twin's first), none with a NaN length after one that changed
    nothing (a padding step: a host stepper answers NaN without running the model for a lane in lockstep)."""
    return (jnp.where(changed, jnp.clip(n, 1, HOST_LOOK_AHEAD), 0),
            jnp.where(changed, jnp.where(n > 0, dt, gap0), jnp.nan))


_Q_SCALE = Divergence._fields.index("q_scale")


def _finite(x: jnp.ndarray, P: jnp.ndarray) -> jnp.ndarray:
    """Whether a state and its covariance are all finite numbers."""
    return jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(P))


def scan_kernels(predict: Callable, update: Callable, *, identity: Callable[[], str | None],
                 look_ahead: LookAhead = "none") -> _Kernels:
    """Jitted kernels from one filter's per-twin `predict` (x, P, u, p, q_var_rate, n_sub, dt, skipped)
    -> (x, P) and `update` (x, P, u, p, z, mask, r_var) -> (x, P, innovation, NIS, diagonal of the
    innovation covariance S).

    `assimilate` runs a sorted run of events for each of `LANES` twins in ONE dispatch (a
    `lax.scan` over predict + update + divergence statistics and drift detector, vmapped over
    twins, each with its own parameters, noise and detector settings `det` = (false-alarm interval
    [s], gap assumed before the first [s], log of the smallest process-noise factor)): the
    per-event cost of a live twin was the Python->XLA dispatch, not the arithmetic. Padding steps
    have no sub-steps and no measurement, which makes them exact no-ops, so the state after an event
    depends only on the events before it - never on how they were split into calls (live batches
    vs log replay). `predict`, with the restart below where it is not finite, serves explicit look-ahead
    (`ExtendedKalmanFilter.predict`).

    One event's step is a `jit` of its own, so it is traced once per process and not once per run
    length: a restarted shard traced the EKF's step three times before its first write (0.15-0.43 s
    each); the second and third lengths now take ~0.12 s instead of ~0.27 s to make ready. XLA
    inlines the call: the results are bit-identical to the step written inside the scan (checked for
    every built-in model and both filters).

    **An event whose update is not finite is refused** (a model not defined there: a square root of a
    negative number, an overflow): its step keeps the state before it, with the covariance grown by the
    process noise of the event's gap (as a capped gap's skipped seconds, `skip`), counts it in
    `Divergence.refused` and says why (`refused_states`, `refused_names`); the next event predicts from
    there. **A measured event whose prediction over its gap is not finite** from a finite state (a long silence
    drains a ``two_tank`` twin's tank to 0, where the EKF's Jacobian of ``sqrt(h)`` is infinite) is not refused:
    its update starts from the state before the gap, the covariance grown by the gap's process noise as above
    (`skip`), so the fresh reading re-anchors the twin instead of being dead-lettered; counted in
    `Divergence.restarts`, and `restarted` marks the event. An event with no measurement is refused as before (its
    state would be the same).

    With a `look_ahead` it also refuses a finite update from which the filter's next step (with the new inputs)
    is not finite: the filter can step from every state a twin keeps, so one measurement beyond the model's domain
    (an air temperature above a square root's bound, a tank level projected to 0 where the EKF's Jacobian of
    ``sqrt(h)`` is infinite, a state an FMU's step fails or overflows from) is refused instead of every event
    after it. ``"step"`` (the EKF, the UKF on a JAX model): one sub-step of
    ``default_dt``, a model step and for the EKF its Jacobian; its cost: one predict sub-step per event,
    for every twin (not measured). ``"gap"`` (the UKF on a host stepper, an FMU, where a model step is a
    host call per sigma point, 2n+1, and an FMU's state can run away over several of its steps before it
    overflows): the prediction over the event's own gap again, split alike, with the process noise as
    adapted by this event (at most `HOST_LOOK_AHEAD` sub-steps; `_gap_again`): what the next event's
    prediction computes when its gap is split alike, whose FMU steps `raytwin.fmu.FmuStepper` then answers
    from memory. Its cost: the host calls of up to `HOST_LOOK_AHEAD` predict sub-steps per event; none
    again where the next gap gives bit-equal sub-steps (event times on a grid that float64 represents
    exactly, e.g. whole seconds), twice the host calls of the prediction where it does not (epoch seconds
    0.1 s apart differ in their last bits: 4 in 5 gaps); events that change nothing (padding) none.
    Deterministic, so a log replay refuses the same events. A state that is already not finite (a
    snapshot of an older version) is not "kept": it stays flagged (`Divergence.diverged`) and recovery
    starts from an earlier finite snapshot (`actors.recovery`).

    `identity` gives `raytwin.executables.kernel_identity` of what the filter's predict and update
    are made from (None if unknown; asked only where there is a store): in a process with a store of
    serialized kernels (twin shards), a restarted process loads `assimilate`'s executables from it
    instead of tracing and compiling.
    """
    if look_ahead not in get_args(LookAhead):
        raise ValueError(f"look_ahead must be one of {get_args(LookAhead)}, got {look_ahead!r}")

    @jax.jit
    def event(consts, carry, ev):
        p, q_var_rate, r_var, det = consts
        interval, gap0, log_q_min = det[0], det[1], det[2]
        x0, P0, div0 = carry
        (updates, nis_last, nis_mean, res_mean, res_ms, cusum, score, alarm, gap_mean, since, q_scale, refused, _,
         restarts, _) = div0
        n, dt, skipped, u_held, u_new, z, mask = ev
        x, P = predict(x0, P0, u_held, p, q_var_rate * q_scale, n, dt, skipped)
        measured = mask > 0
        has = jnp.any(measured)
        # a measurement after a gap whose prediction is not finite (a drained tank's infinite Jacobian of sqrt(h))
        # updates the state before the gap, grown by the gap's process noise, instead of being refused
        grown = skip(P0, q_var_rate * q_scale, n * dt + skipped)
        restart = has & ~_finite(x, P) & _finite(x0, P0)
        x, P = jnp.where(restart, x0, x), jnp.where(restart, grown, P)
        x_upd, P_upd, y, nis, s_diag = update(x, P, u_new, p, z, mask, r_var)
        dims = jnp.maximum(mask.sum(), 1.0)
        a = jnp.where(updates == 0, 1.0, EWMA_ALPHA)
        since = since + n * dt + skipped
        clipped = jnp.minimum(since, detector.GAP_CLIP * gap_mean)
        gap_new = jnp.where(gap_mean > 0, gap_mean + detector.GAP_ALPHA * (clipped - gap_mean), since)
        gap = jnp.where(since > 0, gap_new, gap_mean)
        # per allowance, two one-sided CUSUMs per output on e = y / sqrt(S_ii) (`raytwin.drift`)
        e = jnp.where(measured, y / jnp.sqrt(jnp.where(measured, s_diag, 1.0)), 0.0)
        allowance = jnp.asarray(detector.ALLOWANCES)[:, None]  # one row of CUSUMs per allowance
        both = jnp.concatenate([measured, measured])[None, :]
        grid = cusum.reshape(allowance.shape[0], -1)
        cusum_new = jnp.where(both, jnp.maximum(grid + jnp.concatenate([e, -e])[None, :] - allowance, 0.0), grid)
        arl = detector.required_arl(interval, jnp.where(gap > 0, gap, gap0), cusum.shape[0])
        score_new = (cusum_new / detector.cusum_threshold(arl, allowance, xp=jnp)).max()
        cusum_new = cusum_new.reshape(cusum.shape)
        alarm_new = alarm | (score_new >= 1.0)
        # process noise follows the innovations' likelihood gradient, frozen while alarmed
        grad = 0.5 * jnp.where(measured, (jnp.minimum(e * e, detector.ADAPT_CLIP) - 1.0)
                               * (1.0 - r_var / jnp.where(measured, s_diag, 1.0)), 0.0).sum()
        step = jnp.where(alarm_new, 0.0, detector.ADAPT_RATE * grad / dims)
        q_scale_new = jnp.exp(jnp.clip(jnp.log(q_scale) + step, log_q_min, 0.0))
        div_new = (
            updates + 1, nis, nis_mean + a * (nis / dims - nis_mean),
            jnp.where(measured, res_mean + a * (y - res_mean), res_mean),
            jnp.where(measured, res_ms + a * (y * y - res_ms), res_ms),
            cusum_new, score_new, alarm_new, gap, jnp.zeros_like(since), q_scale_new, refused, 0,
            restarts + restart, restart,
        )
        x, P = jnp.where(has, x_upd, x), jnp.where(has, P_upd, P)
        kept_div = (*div0[:9], since, q_scale, refused, 0, restarts, False)  # no update: the statistics stay
        div = jax.tree.map(lambda new, old: jnp.where(has, new, old), div_new, kept_div)
        finite = _finite(x, P)  # else flag it (`Divergence.diverged`)
        div = (*div[:2], jnp.where(finite, div[2], jnp.nan), *div[3:])
        bad = ~jnp.isfinite(x) | ~jnp.all(jnp.isfinite(P), axis=1)
        step_bad = jnp.zeros_like(bad)
        if look_ahead == "step":
            x_next, P_next = predict(x, P, u_new, p, q_var_rate * q_scale, 1, gap0, 0.0)
        elif look_ahead == "gap":
            changed = (n > 0) | (skipped > 0) | has | jnp.any(u_new != u_held)
            x_next, P_next = predict(x, P, u_new, p, q_var_rate * div[_Q_SCALE], *_gap_again(changed, n, dt, gap0),
                                     skipped)
        if look_ahead != "none":
            step_bad = ~jnp.isfinite(x_next) | ~jnp.all(jnp.isfinite(P_next), axis=1)
        why = jnp.where(finite, _state_bits(step_bad) + jnp.where(jnp.any(step_bad), STEP_BIT, 0), _state_bits(bad))
        refuse = (why != 0) & _finite(x0, P0)  # see the docstring
        kept = (x0, grown, (*kept_div[:-4], refused + 1, why, restarts, False))
        carry = jax.tree.map(lambda old, new: jnp.where(refuse, old, new), kept, (x, P, div))
        return carry, carry

    def one_twin(layout, carry, consts, n_sub, events):
        x, P, *div = _unpack(carry, layout.carry, layout.carry_dtypes)
        consts = tuple(_unpack(consts, layout.consts))
        dt, skipped, u_held, u_new, z, mask = _unpack(events, layout.events)
        xs, Ps, divs = jax.lax.scan(lambda c, ev: event(consts, c, ev), (x, P, tuple(div)),
                                    (n_sub, dt, skipped, u_held, u_new, z, mask))[1]
        return _pack(jnp, [xs, Ps, *divs], n_sub.shape)

    @partial(jax.jit, static_argnames="layout")
    def assimilate(carry, consts, n_sub, events, *, layout):
        return jax.vmap(partial(one_twin, layout))(carry, consts, n_sub, events)

    def look_ahead_predict(x0, P0, u, p, q_var_rate, n, dt, skipped):
        """`predict`, or where it is not finite from a finite state, the state before the gap with its covariance
        grown by the gap's process noise: what `event` updates a measurement at the gap's end from (a restart) and
        keeps for an event without one (a refusal)."""
        x, P = predict(x0, P0, u, p, q_var_rate, n, dt, skipped)
        restart = ~_finite(x, P) & _finite(x0, P0)
        return jnp.where(restart, x0, x), jnp.where(restart, skip(P0, q_var_rate, n * dt + skipped), P)

    directory = stored_kernels_dir()
    if directory is not None and (key := identity()) is not None:
        assimilate = StoredKernel(assimilate, key, directory)
    return _Kernels(in_float64(jax.jit(look_ahead_predict)), in_float64(assimilate))


class ExtendedKalmanFilter:
    """The filter for one model and parameter set; cheap to construct (kernels are shared).

    The base of every filter: a subclass changes only the kernels (`_make_kernels`), so priors,
    bookkeeping, batching across twins (`assimilate_runs`) and snapshots stay the same."""

    kind = "ekf"

    def __init__(
        self,
        model: Model,
        params: list[float] | np.ndarray,
        *,
        process_std: dict[str, float] | None = None,
        measurement_std: dict[str, float] | None = None,
        false_alarm_interval_s: float = detector.FALSE_ALARM_INTERVAL_S,
        adapt_process_noise: bool = True,
    ):
        """`false_alarm_interval_s`: event-time seconds per false drift alarm the detector allows
        (`raytwin.drift`); `adapt_process_noise`: let Q shrink below the declared `process_std`
        to what the innovations support (off: the fixed-Q textbook filter)."""
        if not (math.isfinite(false_alarm_interval_s) and false_alarm_interval_s > 0):
            raise ValueError(f"false_alarm_interval_s must be a positive number of seconds, "
                             f"got {false_alarm_interval_s!r}")
        if self.kind not in model.filters:
            raise ValueError(f"model {model.name} cannot run the {self.kind!r} filter: it supports {list(model.filters)}"
                             + (" (the EKF needs Jacobians, jax.jacfwd of a model's JAX code; a black box such as an "
                                "FMU has none: use the derivative-free 'ukf')" if self.kind == "ekf" else ""))
        self.model = model
        self.defaults = model_defaults(model)
        self.params = np.asarray(params, dtype=np.float64)  # NumPy: packed into every dispatch
        q = _complete("process_std", model.state_names, process_std, self.defaults)
        r = _complete("measurement_std", model.output_names, measurement_std, self.defaults)
        self.q_var_rate = q**2
        self.r_var = r**2
        self.det = np.array([false_alarm_interval_s, model.default_dt,
                             math.log(detector.MIN_Q_SCALE) if adapt_process_noise else 0.0])
        self._kernels = self._make_kernels()
        self.measured_names = tuple(dict.fromkeys((*model.input_names, *model.output_names)))
        """The value columns of `assimilate_many`: the model's inputs, then its outputs."""
        col = {n: i for i, n in enumerate(self.measured_names)}
        self._input_cols = np.array([col[n] for n in model.input_names], dtype=np.intp)
        self._output_cols = np.array([col[n] for n in model.output_names], dtype=np.intp)

    def _make_kernels(self) -> _Kernels:
        return _kernels(self.model)

    @cached_property
    def consts(self) -> tuple[np.ndarray, tuple[tuple[int, ...], ...]]:
        """This filter's row of a dispatch's constants (params, process-noise rates, measurement variances,
        detector settings, packed as `_pack` does) and their shapes (`_Layout.consts`). Made on first use
        and kept: the fields are set once, in the constructor, and packing them again for every dispatch
        was ~1 % of a live shard call."""
        fields = [np.asarray(getattr(self, name)) for name in ("params", "q_var_rate", "r_var", "det")]
        return _pack(np, fields, ()), tuple(f.shape for f in fields)

    def initial(
        self,
        state: dict[str, float] | None = None,
        std: dict[str, float] | None = None,
        inputs: dict[str, float] | None = None,
    ) -> FilterState:
        """The prior: given values over the model defaults (unknown names refused)."""
        m = self.model
        x = _complete("initial_state", m.state_names, state, self.defaults)
        s = _complete("initial_std", m.state_names, std, self.defaults)
        u = _complete("inputs", m.input_names, inputs, self.defaults)
        if np.any(s <= 0):
            raise ValueError(f"initial std must be > 0, got {dict(zip(m.state_names, s.tolist()))}")
        return FilterState(t=None, x=x, P=np.diag(s**2), u=u)

    def predict(self, fs: FilterState, t: float) -> FilterState:
        """Advance to time `t` with held inputs, in sub-steps of at most ``default_dt`` (at most
        `MAX_SUBSTEPS` of them: see `substeps`) and the twin's adapted process noise.

        Where that prediction is not finite from a finite `fs` (a long silence drains a ``two_tank`` twin to 0,
        where the EKF's Jacobian of ``sqrt(h)`` is infinite), it is `fs`'s state with its covariance grown by the
        gap's process noise, as the kernel restarts (`scan_kernels`): the prior a measurement at `t` updates from,
        so a look-ahead (a shadow evaluation's score of the event, `raytwin.shadow`) is finite where the twin is,
        and no more confident than the process noise allows."""
        gap = 0.0 if fs.t is None else t - fs.t
        if gap < 0:
            raise ValueError(f"cannot predict backwards in time ({fs.t} -> {t}); rewind instead")
        n, dt, skipped = substeps(np.float64(gap), self.model.default_dt)
        if n == 0:
            return fs._replace(t=t)
        x, P = self._kernels.predict(fs.x, fs.P, fs.u, self.params, self.q_var_rate * fs.divergence.q_scale, n, dt,
                                     skipped)
        return fs._replace(t=t, x=np.asarray(x), P=np.asarray(P))

    def assimilate(self, fs: FilterState, t: float, values: dict[str, float], use_outputs: bool = True) -> FilterState:
        """One event: predict to `t`, take the measured inputs (held from `t` on), update with the outputs.

        `values` maps input/output names to SI values; unknown names are refused.
        """
        unknown = set(values) - set(self.measured_names)
        if unknown:
            raise KeyError(f"{self.model.name} has no input/output {sorted(unknown)}")
        row = np.array([[values.get(n, np.nan) for n in self.measured_names]], dtype=np.float64)
        return self.assimilate_many(fs, np.array([t], dtype=np.float64), row, np.array([use_outputs])).state(0)

    def warm_up(self) -> None:
        """Compile this filter's kernel for every run length now (when a twin is created or
        recovered), not when a live event first needs it; once per kernel and process."""
        if self._kernels in _WARM:
            return
        m, cols = self.model, len(self.measured_names)
        # any prior compiles the same kernel: declared values where the model has them (an FMU
        # declares no prior std; its twins get one at registration), a small spread elsewhere
        nominal = lambda kind, names: np.array([self.defaults[kind].get(n, 0.0) for n in names])  # noqa: E731
        std = np.array([self.defaults["initial_std"].get(n, 1e-3) for n in m.state_names])
        prior = FilterState(None, nominal("initial_state", m.state_names), np.diag(std**2),
                            nominal("inputs", m.input_names))
        for n in RUN_LENGTHS:
            t = np.arange(n, dtype=np.float64) * self.model.default_dt
            assimilate_runs([Run(self, prior, t, np.full((n, cols), np.nan), np.zeros(n, dtype=bool))])
        _WARM.add(self._kernels)

    def assimilate_many(self, fs: FilterState, t: np.ndarray, values: np.ndarray, use_outputs: np.ndarray) -> FilterTrace:
        """One twin's run of events (see `Run`); the trace holds the state after each event."""
        return assimilate_runs([Run(self, fs, t, values, use_outputs)])[0]


_WARM: set[_Kernels] = set()


class Run(NamedTuple):
    """Events of one twin in time order, to apply from `start`.

    `t` (n,) epoch seconds; `values` (n, len(filter.measured_names)) in the model's declared units, NaN = not
    measured; `use_outputs` (n,) False for events whose outputs must not update the estimate
    (bad quality). Arrays or sequences (of rows, for `values`): a live batch hands over each
    twin's few events as lists and `assimilate_runs` packs all twins' events at once. Inputs are
    held from their last measurement; an event without outputs only predicts. `start`: a `FilterState`,
    or the `PackedState` a previous dispatch left (`Traces.final_packed`).
    """

    filter: ExtendedKalmanFilter
    start: FilterState | PackedState
    t: Sequence[float] | np.ndarray
    values: Sequence[np.ndarray] | np.ndarray
    use_outputs: Sequence[bool] | np.ndarray


def assimilate_runs(runs: Sequence[Run]) -> Traces:
    """Apply each (non-empty) run to its twin: one kernel dispatch per `LANES` twins of a model
    and kind of filter, and per `MAX_RUN` events (a longer run continues in the next round)."""
    lengths = np.array([len(run.t) for run in runs], dtype=np.int64)
    if np.any(lengths == 0):
        raise ValueError("every run needs at least one event")
    filters, starts = [run.filter for run in runs], [run.start for run in runs]
    if np.all(lengths == 1):
        return assimilate_events(filters, starts, np.fromiter((r.t[0] for r in runs), dtype=np.float64, count=len(runs)),
                                 [r.values[0] for r in runs],
                                 np.fromiter((r.use_outputs[0] for r in runs), dtype=bool, count=len(runs)))
    return _traces(filters, starts, lengths, lambda ks, *shape: _run_events([runs[k] for k in ks], *shape))


def assimilate_events(filters: Sequence[ExtendedKalmanFilter], starts: Sequence[FilterState | PackedState],
                      t: np.ndarray, values: np.ndarray | Sequence[np.ndarray], use_outputs: np.ndarray) -> Traces:
    """`assimilate_runs` of one-event runs given as columns (run k: `filters[k]` from `starts[k]`, its
    event at `t[k]` with `values[k]` and `use_outputs[k]`): a live batch's usual shape, which a shard
    hands over without a `Run` per twin, and whose kernel inputs are built from one row per run
    (`_single_events`). `values`: a matrix, or a row per run where the models measure different columns
    (stacked per model: one matrix of rows of different lengths cannot be made)."""
    def events(ks: list[int], n: np.ndarray, width: int, t0: np.ndarray, u0: np.ndarray) -> tuple[np.ndarray, ...]:
        rows = slice(None) if len(ks) == len(filters) else ks
        vals = (values[rows] if isinstance(values, np.ndarray)
                else np.array(values if len(ks) == len(filters) else [values[k] for k in ks], dtype=np.float64))
        return _single_events(filters[ks[0]], t[rows], vals, use_outputs[rows], width, t0, u0)
    return _traces(filters, starts, np.ones(len(filters), dtype=np.int64), events)


def _traces(filters: Sequence[ExtendedKalmanFilter], starts: Sequence[FilterState | PackedState], lengths: np.ndarray,
            events: Callable[..., tuple[np.ndarray, ...]]) -> Traces:
    """The runs' traces, one `_assimilate_model` per kernel (model and kind of filter): `events(ks, n, width,
    t0, u0)` packs the events of the runs `ks` (`_run_events`)."""
    groups: dict[_Kernels, list[int]] = {}
    for k, f in enumerate(filters):
        groups.setdefault(f._kernels, []).append(k)
    first = np.zeros(len(filters), dtype=np.int64)
    models = {}
    for kernels, ks in groups.items():
        first[ks] = np.cumsum(lengths[ks]) - lengths[ks]
        models[kernels] = _assimilate_model([filters[k] for k in ks], [starts[k] for k in ks], lengths[ks],
                                            partial(events, ks))
    return Traces(models, groups, [f._kernels for f in filters], first, lengths)


def _assimilate_model(filters: list[ExtendedKalmanFilter], starts: list[FilterState | PackedState], n: np.ndarray,
                      events: Callable[..., tuple[np.ndarray, ...]]) -> ModelTrace:
    """The runs of twins of one model and kernel, packed as (run, event) arrays by `events(n, width, t0, u0)`
    and dispatched `LANES` runs at a time; returns their traces back to back (run order)."""
    f0 = filters[0]
    model = f0.model
    R, E = len(filters), int(n.sum())
    ny = len(model.output_names)
    rounds = range(0, int(n.max()), MAX_RUN)
    width = max(o + bucket(min(int(n.max()) - o, MAX_RUN)) for o in rounds)  # room for every dispatch's padding
    t0, u0, carry, carry_layout = _start_columns(starts, f0._kernels, ny)
    distinct = {f: k for k, f in enumerate(dict.fromkeys(filters))}  # a filter hashes as its identity
    which = np.fromiter(map(distinct.__getitem__, filters), dtype=np.intp, count=R)
    t_events, gap, held, after, z, mask = events(n, width, t0, u0)
    if np.any(gap < 0):
        k = int(np.flatnonzero((gap < 0).any(axis=1))[0])
        at = int(n[:k].sum())
        raise ValueError(f"cannot predict backwards in time ({starts[k].t} -> {t_events[at:at + n[k]].tolist()}); "
                         "rewind instead")
    # sub-steps of at most default_dt into each event from the one before (none from the prior)
    n_sub, dt, skipped = substeps(gap, model.default_dt)

    fields = [dt, skipped, held[:, :-1], held[:, 1:], z, mask]
    layout = _Layout.of(carry_layout, f0.consts[1], fields)
    consts = np.array([f.consts[0] for f in distinct])[which]  # rows of the distinct filters, per run
    events = _pack(np, fields, (R, width))
    skipped_cols, _, _, _, mask_cols = _columns(layout.events)[1:]
    trace = np.empty((E, carry.shape[1]))
    first_event = np.cumsum(n) - n
    assimilate = f0._kernels.assimilate
    for offset in rounds:
        active = np.flatnonzero(n > offset)
        for c in range(0, len(active), LANES):
            runs_c = active[c:c + LANES]
            m = len(runs_c)
            steps = np.zeros(LANES, dtype=np.int64)
            steps[:m] = np.minimum(n[runs_c] - offset, MAX_RUN)
            part = slice(offset, offset + bucket(int(steps.max())))
            live = np.arange(part.stop - offset)[None, :] < steps[:, None]  # this round's events; the rest are no-ops
            # unused lanes repeat the first run's data (finite arithmetic) with no steps
            sel = np.concatenate([runs_c, np.full(LANES - m, runs_c[0])])
            ev = events[sel, part]
            ev[..., skipped_cols] *= live[:, :, None]
            ev[..., mask_cols] *= live[:, :, None]
            out = np.asarray(assimilate(carry[sel], consts[sel], n_sub[sel, part] * live, ev, layout=layout))
            j, i = np.nonzero(live)
            trace[first_event[runs_c[j]] + offset + i] = out[j, i]
            if offset + MAX_RUN < n.max():  # where the next round of a longer run starts
                carry[runs_c] = out[np.arange(m), steps[:m] - 1]
    return ModelTrace(t_events, after, trace, layout)


def _run_events(runs: list[Run], n: np.ndarray, width: int, t0: np.ndarray, u0: np.ndarray
                ) -> tuple[np.ndarray, ...]:
    """The runs' events as (run, step) arrays of `width` steps, padding after each run's events:
    (event times back to back, the gap into each step, held inputs before the first step and after each,
    the held inputs after each event back to back, outputs measured (0 where not), their mask (1: measured
    and used))."""
    f0, R, E = runs[0].filter, len(runs), int(n.sum())
    lane = np.repeat(np.arange(R), n)  # run of each event
    at = np.arange(E) - np.repeat(np.cumsum(n) - n, n)  # its index within the run
    valid = np.zeros((R, width), dtype=bool)
    valid[lane, at] = True
    t_events = np.fromiter(chain.from_iterable(r.t for r in runs), dtype=np.float64, count=E)
    t = np.zeros((R, width))
    t[lane, at] = t_events
    values = np.full((R, width, len(f0.measured_names)), np.nan)
    values[lane, at] = np.array(list(chain.from_iterable(r.values for r in runs)), dtype=np.float64)
    use = np.zeros((R, width), dtype=bool)
    use[lane, at] = np.fromiter(chain.from_iterable(r.use_outputs for r in runs), dtype=bool, count=E)
    gap = np.diff(t, axis=1, prepend=t0[:, None])
    gap = np.where(valid & ~np.isnan(gap), gap, 0.0)
    # inputs: each held from its last measurement (or from the twin's held value)
    held = np.concatenate([u0[:, None, :], values[:, :, f0._input_cols]], axis=1)
    filled = np.where(np.isnan(held), 0, np.arange(width + 1)[None, :, None])
    held = np.take_along_axis(held, np.maximum.accumulate(filled, axis=1), axis=1)
    z = values[:, :, f0._output_cols]
    mask = (~np.isnan(z) & (use & valid)[:, :, None]).astype(np.float64)
    return t_events, gap, held, held[lane, at + 1], np.nan_to_num(z, nan=0.0), mask


def _single_events(f0: ExtendedKalmanFilter, t_events: np.ndarray, values: np.ndarray, use: np.ndarray, width: int,
                   t0: np.ndarray, u0: np.ndarray) -> tuple[np.ndarray, ...]:
    """`_run_events` where every run is one event (a live batch's usual shape, `width` 2): the same
    arrays, built from one row per run instead of scattered into (run, step) arrays and gathered back
    (the padding step has no gap, no measurement and holds the event's inputs). Same values: only
    selections and the same elementwise operations on the events' own columns."""
    R = len(t_events)
    gap = np.zeros((R, width))
    first = t_events - t0
    gap[:, 0] = np.where(np.isnan(first), 0.0, first)
    measured = values[:, f0._input_cols]
    held = np.empty((R, width + 1, u0.shape[1]))
    held[:, 0] = u0
    held[:, 1:] = np.where(np.isnan(measured), u0, measured)[:, None, :]
    z, mask = np.zeros((R, width, len(f0._output_cols))), np.zeros((R, width, len(f0._output_cols)))
    outputs = values[:, f0._output_cols]
    z[:, 0] = np.nan_to_num(outputs, nan=0.0)
    mask[:, 0] = ~np.isnan(outputs) & use[:, None]
    return t_events, gap, held, held[:, 1], z, mask


def _start_columns(starts: list[FilterState | PackedState], kernels: _Kernels, ny: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[tuple[tuple[int, ...], ...], tuple[np.dtype, ...]]]:
    """The runs' start times (NaN: the prior), held inputs and packed carry, with the carry's (shapes, dtypes):
    where every start is a row of one `FinalRows` this kernel left (a live shard's usual call), gathered
    from its columns; else row by row (`_start_carry`)."""
    first = starts[0]
    if type(first) is PackedState and (rows := first.rows).kernels is kernels and all(
            type(s) is PackedState and s.rows is rows for s in starts):
        at = np.fromiter([s.row for s in starts], dtype=np.intp, count=len(starts))
        return rows.t[at], rows.u[at], rows.carry[at], (rows.layout.carry, rows.layout.carry_dtypes)
    t0 = np.array([np.nan if fs.t is None else fs.t for fs in starts])
    return t0, np.array([fs.u for fs in starts]), *_start_carry(starts, kernels, ny)


def _start_carry(starts: list[FilterState | PackedState], kernels: _Kernels, ny: int
                 ) -> tuple[np.ndarray, tuple[tuple[tuple[int, ...], ...], tuple[np.dtype, ...]]]:
    """The packed carry (x, P, `Divergence`) the runs start from, with its (shapes, dtypes): the rows of
    states this kernel left packed as they are, the others packed here."""
    kept = np.array([type(s) is PackedState and s.kernels is kernels for s in starts])
    if kept.all():
        return np.array([s.carry for s in starts]), (starts[0].layout.carry, starts[0].layout.carry_dtypes)
    states = [s.state() if type(s) is PackedState else s for s, k in zip(starts, kept) if not k]
    fields = [np.array([fs.x for fs in states]), np.array([fs.P for fs in states]),
              *_pack_divergence([fs.divergence for fs in states], ny)]
    packed = _pack(np, fields, (len(states),))
    carry = np.empty((len(starts), packed.shape[1]))
    carry[~kept] = packed
    if kept.any():
        carry[kept] = [s.carry for s, k in zip(starts, kept) if k]
    return carry, (tuple(f.shape[1:] for f in fields), tuple(f.dtype for f in fields))


def _pack_divergence(divs: list[Divergence], ny: int) -> list[np.ndarray]:
    """The kernel's divergence carry for these twins: one array per `Divergence` field (per-output
    fields zero before a twin's first update, and CUSUMs from a snapshot taken with other allowances)."""
    fresh = {"residual_mean": (0.0,) * ny, "residual_ms": (0.0,) * ny,
             "cusum": (0.0,) * (2 * ny * len(detector.ALLOWANCES))}
    columns = []
    for name, values in zip(Divergence._fields, zip(*divs)):
        if name in fresh and any(len(v) != len(fresh[name]) for v in values):
            # before the first update (or from a snapshot older than the field): zeros
            values = [v if len(v) == len(fresh[name]) else fresh[name] for v in values]
        dtype = {"updates": np.int64, "alarm": bool, "refused": np.int64, "refused_states": np.int64,
                 "restarts": np.int64, "restarted": bool}.get(
            name, np.float64)
        columns.append(np.array(values, dtype=dtype).reshape(len(divs), *((len(fresh[name]),) if name in fresh else ())))
    return columns


def _complete(kind: str, names: tuple[str, ...], given: dict[str, float] | None, defaults: dict[str, dict[str, float]]):
    """Values for `names` in order: `given` over the model defaults; unknown or missing refused."""
    given = dict(given or {})
    unknown = set(given) - set(names)
    if unknown:
        raise KeyError(f"{kind}: unknown name(s) {sorted(unknown)}; expected {list(names)}")
    base = defaults[kind]
    missing = [n for n in names if n not in given and n not in base]
    if missing:
        raise KeyError(f"{kind}: no value and no default for {missing} (give them, or declare them on the model)")
    out = np.array([float(given.get(n, base.get(n, 0.0))) for n in names], dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{kind}: values must be finite, got {dict(zip(names, out.tolist()))}")
    return out
