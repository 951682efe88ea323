"""Every RayTwin metric, defined once here and recorded through `ray.util.metrics`.

Why Ray's metrics: the metrics agent on each node exports what every process of that node
records (Serve replicas, twin shards, ingestion tasks, sweep drivers), so Prometheus scraping
each node's export (``ray start --metrics-export-port``, KubeRay's PodMonitor) sees exact
cluster-wide counts with one ``sum``; the Ray dashboard shows the same series. Ray exports a
metric named ``raytwin_x`` as ``ray_raytwin_x`` and appends ``_total`` to counters
(`Metric.exported` gives the names; ops/ dashboards and rules use them).

Adding a metric is one line at the end of this module (``NAME = counter("raytwin_...", "why",
"tag", ...)``); code elsewhere calls ``NAME.inc(tag="...")``. Tags must be low-cardinality
(shard, route, reason, state): never an asset, tenant or request id, nor a name a tenant chose (a
registry reference, a stored FMU's model name: `FMU_STEPS` and `FMU_FAILED_CALLS` name no FMU, sweeps
tag `raytwin.sim.discovery.simulator_label`). One exception: a connector is
named ``tenant/name`` (few per tenant, and an operator must know which one is down), so the export
names tenants and must reach Prometheus only (ops/README.md).

`batch_histogram` exists because a shard applies thousands of events per call (and, being counters, it can be
exported at 0 before its first value, which a Ray `Histogram` cannot: `Metric.zero`): a Ray
`Histogram` costs ~2 us per observed value (measured: 2.3 us; +50 % on a 10k-event batch), so a
batch's values are bucketed with numpy and recorded as cumulative per-bucket counters
(``<name>_bucket_total{le=...}``, ``_sum_total``, ``_count_total``): exact counts at a cost per
bucket, and ``histogram_quantile`` reads them as it reads any histogram.

Counts (`Metric.inc`, `Metric.observe_many`) are summed per series in the process and handed to
Ray every `RECORD_INTERVAL_S` by a daemon thread of the process, at its clean exit, and on `flush`:
a shard call made ~25 Ray counter calls (its lag histograms' buckets, its outcome counts: 65 us of
CPU in a loop, 21 us summed here, 2026-12-06), where one hand-over now serves tens of calls. Ray
exports every `metrics_report_interval_ms` (1 s at the least, 10 s by default), so a count shows at
most one export later, and the totals are the same: counts exactly (integers), float sums
(seconds) up to the rounding of the order they are added in, which Ray's own export already
groups per interval. Gauges are re-recorded by the same thread: Ray's exporter drops a gauge
value that was not recorded again within two export intervals (measured on Ray 2.60: a Serve
replica's gauge set once vanished from the export), which is right for a dead process's gauges
and wrong for a live process whose value did not change.

Recording in a process without Ray is a no-op (CLI runs and unit tests stay metric-free).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

log = logging.getLogger("raytwin.metrics")

Kind = Literal["counter", "gauge", "histogram", "batch_histogram"]

LATENCY_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""HTTP request latency buckets: the API's SLO threshold (250 ms) is one of them."""
LAG_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 86400.0)
"""Ingest lag buckets: 10 ms (the live path) to a day (backfills)."""
DURATION_S = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
"""Calibration run time buckets."""
SERVICE_TAGS = ("namespace", "prefix")
"""The tags that say which service a series counts (several may run on one cluster): its Ray namespace (its `namespace`
setting) and its shard actors' name prefix (`actors.routing.shard_prefix` of its store's twins). `raytwin status
--namespace/--store` reports one service's numbers by them, not the sum of every service's."""
RECORD_INTERVAL_S = 0.5
"""How often a process hands Ray its summed counts and re-records its gauges: under Ray's shortest
export interval (1 s), so a count reaches the export at most one export later than if handed at once."""


@dataclass(frozen=True)
class Metric:
    """One metric's definition; the Ray metric objects behind it are made once per process."""

    name: str
    kind: Kind
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @cached_property
    def _required(self) -> frozenset[str]:
        """The tag keys every record carries (`_checked`, on every count: built once, not per call)."""
        return frozenset(self.tags)

    @property
    def exported(self) -> tuple[str, ...]:
        """The series names as Ray's metrics agent exports them."""
        base = f"ray_{self.name}"
        return {
            "counter": (f"{base}_total",),
            "gauge": (base,),
            "histogram": (f"{base}_bucket", f"{base}_sum", f"{base}_count"),
            "batch_histogram": (f"{base}_bucket_total", f"{base}_sum_total", f"{base}_count_total"),
        }[self.kind]

    def inc(self, value: float = 1.0, **tags: str) -> None:
        """Add `value` (> 0; zero is skipped) to a counter (handed to Ray within `RECORD_INTERVAL_S`)."""
        if value and _recorders(self):
            if not isinstance(value, (int, float)) or value < 0:  # refused at the call, as by Ray's `Counter.inc`
                raise ValueError(f"{self.name}: a counter is increased by an int or float >= 0, not {value!r}")
            _RECORDER.add(self, self._checked(tags), value)

    def zero(self, *tag_sets: dict[str, str]) -> None:
        """Export each of a counter's (or a batch histogram's: every bucket, sum, count) `tag_sets` at 0 now, before
        its first count: a series Prometheus first sees at a value above 0 hides that value from `rate()` and
        `increase()`, so a burst that creates its series (a dead-letter reason's first refusals in a process) would
        never show in a rate-based alert. Ray's `Counter.inc` refuses 0; its `_record` does not, and the exporter
        then sends the series at 0. A Ray `Histogram` has no such record: a `batch_histogram` (counters) does."""
        if self.kind not in ("counter", "batch_histogram"):
            raise TypeError(f"{self.name} is a {self.kind}: only a counter's or a batch histogram's series are "
                            "exported at 0 before use")
        if m := _recorders(self):
            for tags in tag_sets:
                if self.kind == "counter":
                    m[0]._record(0.0, tags)
                    continue
                bucket, total, count = m
                for le in (*self.boundaries, math.inf):
                    bucket._record(0.0, {**tags, "le": _le(le)})
                total._record(0.0, tags)
                count._record(0.0, tags)

    def set(self, value: float, **tags: str) -> None:
        """Set a gauge (kept, and re-recorded until the process ends): recorded at once when its value changed
        (a shard sets its drifting count every call, mostly the same)."""
        if (m := _recorders(self)) and _RECORDER.keep(m[0], value, tags):
            m[0].set(value, tags)

    def observe(self, value: float, **tags: str) -> None:
        """Record one value of a histogram."""
        if m := _recorders(self):
            m[0].observe(value, tags)

    def observe_many(self, values: np.ndarray, **tags: str) -> None:
        """Record many values of a `batch_histogram` at a cost per bucket, not per value: summed with the
        process's other values of the series (its cumulative bucket counts, count and sum) until handed."""
        values = np.asarray(values, dtype=np.float64)
        if not values.size or not _recorders(self):
            return
        counts = np.empty(len(self.boundaries) + 2)  # cumulative count per bucket, +Inf (the count), sum
        counts[:-2] = np.searchsorted(np.sort(values), self.boundaries, side="right")
        counts[-2] = values.size
        counts[-1] = s if (s := float(values.sum())) > 0 else 0.0  # Ray's counters take > 0 only
        _RECORDER.add(self, self._checked(tags), counts)

    def _checked(self, tags: dict[str, str]) -> dict[str, str]:
        """`tags`, refused at the call as Ray would refuse them when they are handed (a missing key, a value
        not a string): a mistake raised on the recording thread would be no caller's."""
        if not tags.keys() >= self._required or not all(type(v) is str for v in tags.values()):
            raise ValueError(f"{self.name} takes string values for the tags {', '.join(self.tags) or 'none'}; "
                             f"got {tags!r}")
        return tags

    def _hand(self, counts: float | np.ndarray, tags: dict[str, str]) -> None:
        """Record counts summed by `_Recorder` in Ray's counters (each series > 0 only, as Ray requires)."""
        if self.kind == "counter":
            _MADE[self][0].inc(float(counts), tags)
            return
        bucket, total, count = _MADE[self]
        *cumulative, n, s = counts.tolist()
        for le, k in zip((*self.boundaries, math.inf), (*cumulative, n)):
            if k:
                bucket.inc(k, {**tags, "le": _le(le)})
        count.inc(n, tags)
        if s > 0:
            total.inc(s, tags)


class _Recorder:
    """This process's counts not yet handed to Ray (summed per series) and the last value of every gauge
    series it set; a daemon thread hands the counts and re-records the gauges every `RECORD_INTERVAL_S`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Metric, dict[str, str], Any]] = {}
        self._gauges: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[Any, float, dict[str, str]]] = {}
        self._thread: threading.Thread | None = None

    def add(self, metric: Metric, tags: dict[str, str], counts: float | np.ndarray) -> None:
        key = (metric.name, tuple(tags.items()))
        with self._lock:
            held = self._counts.get(key)
            self._counts[key] = (metric, tags, counts if held is None else held[2] + counts)
            if self._thread is None:
                self._start()

    def keep(self, gauge: Any, value: float, tags: dict[str, str]) -> bool:
        """Keep the gauge series' value; whether it is new or another than the one kept."""
        key = (id(gauge), tuple(sorted(tags.items())))
        with self._lock:
            held = self._gauges.get(key)
            self._gauges[key] = (gauge, value, tags)
            if self._thread is None:
                self._start()
        return held is None or held[1] != value

    def hand_over(self) -> None:
        """Hand Ray every count summed since the last hand-over (none while Ray is not initialised: after
        `ray.shutdown()` in a driver there is nothing to export to). One series Ray refuses is logged, and
        the others are handed."""
        import ray

        if not ray.is_initialized():
            return
        with self._lock:
            counts, self._counts = self._counts, {}
        for metric, tags, summed in counts.values():
            try:
                metric._hand(summed, tags)
            except Exception:  # noqa: BLE001 - a bug of one series must not stop every metric of the process
                log.exception("event=metric_not_recorded metric=%s tags=%s", metric.name, tags)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="raytwin-metrics", daemon=True)
        self._thread.start()
        atexit.register(self.hand_over)  # a clean exit hands what the thread has not (before Ray's own shutdown)

    def _run(self) -> None:
        import ray

        while True:
            time.sleep(RECORD_INTERVAL_S)
            self.hand_over()
            if not ray.is_initialized():
                continue
            with self._lock:
                gauges = list(self._gauges.values())
            for gauge, value, tags in gauges:
                gauge.set(value, tags)

    def forget(self) -> None:
        """In a forked child: its parent's counts are the parent's to hand, and the thread did not fork."""
        self._lock = threading.Lock()
        self._counts, self._gauges, self._thread = {}, {}, None


_RECORDER = _Recorder()
os.register_at_fork(after_in_child=_RECORDER.forget)


def flush() -> None:
    """Hand Ray this process's counts now, not within `RECORD_INTERVAL_S` (a shard's `flush`: its service
    may stop it next)."""
    _RECORDER.hand_over()


def _le(bound: float) -> str:
    return repr(float(bound)) if math.isfinite(bound) else "+Inf"


_MADE: dict[Metric, tuple[Any, ...]] = {}


def _recorders(metric: Metric) -> tuple[Any, ...]:
    """The Ray metric objects of `metric` in this process; () while Ray is not initialised."""
    made = _MADE.get(metric)
    if made is None:
        import ray

        if not ray.is_initialized():
            return ()
        made = _MADE[metric] = _make(metric)
    return made


def _make(metric: Metric) -> tuple[Any, ...]:
    from ray.util import metrics as rm

    if metric.kind == "counter":
        return (rm.Counter(metric.name, metric.description, tag_keys=metric.tags),)
    if metric.kind == "gauge":
        return (rm.Gauge(metric.name, metric.description, tag_keys=metric.tags),)
    if metric.kind == "histogram":
        return (rm.Histogram(metric.name, metric.description, boundaries=list(metric.boundaries),
                             tag_keys=metric.tags),)
    return (rm.Counter(f"{metric.name}_bucket", f"{metric.description} (cumulative bucket counts)",
                       tag_keys=(*metric.tags, "le")),
            rm.Counter(f"{metric.name}_sum", f"{metric.description} (sum)", tag_keys=metric.tags),
            rm.Counter(f"{metric.name}_count", f"{metric.description} (count)", tag_keys=metric.tags))


ALL: list[Metric] = []
"""Every metric defined below, in definition order (dashboards and tests check against it)."""


def _define(name: str, kind: Kind, description: str, tags: tuple[str, ...], boundaries: tuple[float, ...] = ()) -> Metric:
    if any(m.name == name for m in ALL):
        raise ValueError(f"metric {name!r} is defined twice in raytwin.metrics")
    metric = Metric(name, kind, description, tags, boundaries)
    ALL.append(metric)
    return metric


def counter(name: str, description: str, *tags: str) -> Metric:
    return _define(name, "counter", description, tags)


def gauge(name: str, description: str, *tags: str) -> Metric:
    return _define(name, "gauge", description, tags)


def histogram(name: str, description: str, boundaries: tuple[float, ...], *tags: str) -> Metric:
    return _define(name, "histogram", description, tags, boundaries)


def batch_histogram(name: str, description: str, boundaries: tuple[float, ...], *tags: str) -> Metric:
    return _define(name, "batch_histogram", description, tags, boundaries)


# ---- API (serve_apps) --------------------------------------------------------------------------
HTTP_REQUESTS = counter("raytwin_http_requests", "HTTP requests answered, by route template, method and status.",
                        "route", "method", "status")
HTTP_LATENCY = histogram("raytwin_http_request_duration_seconds", "HTTP request latency in the ingress [s].",
                         LATENCY_S, "route", "method")
CREDENTIALS_REFUSED = counter("raytwin_credentials_refused", "Requests answered 401 for their credential, by reason "
                              "(missing, malformed: a header that holds no key, unknown_key: an unknown or revoked "
                              "key id, wrong_secret: a known key id with another secret).", "reason")
CREDENTIAL_REFUSAL_REASONS = ("missing", "malformed", "unknown_key", "wrong_secret")
"""The reasons `CREDENTIALS_REFUSED` counts, exported at 0 where an API replica starts."""
# ---- ingestion and twins (actors) ---------------------------------------------------------------
TWIN_EVENTS = counter("raytwin_twin_events", "Telemetry events handled by twin shards, by outcome "
                      "(accepted, duplicate, rejected, conflict).", *SERVICE_TAGS, "shard", "outcome")
DEAD_LETTERS = counter("raytwin_dead_letters", "Events refused, by stage (api: answered to the client; ingest, "
                       "shard, connector: written to the dead-letter dataset) and reason.", "stage", "reason")
EVENT_TO_APPLIED = batch_histogram("raytwin_event_to_applied_seconds", "Event time to state applied [s].", LAG_S,
                                   *SERVICE_TAGS)
INGEST_TO_APPLIED = batch_histogram("raytwin_ingest_to_applied_seconds", "Ingest time to state applied [s].", LAG_S,
                                    *SERVICE_TAGS)
SHARD_BACKLOG = gauge("raytwin_shard_backlog_events", "Events sent to a shard and not yet applied, per sending "
                      "process (sum for the shard's backlog).", "shard")
BACKPRESSURE = counter("raytwin_ingest_backpressure_seconds", "Time ingestion waited for busy shards [s].")
TWINS = gauge("raytwin_twins", "Live twins held by a shard.", *SERVICE_TAGS, "shard")
TWINS_DRIFTING = gauge("raytwin_twins_drifting", "Twins whose filter flags model/data drift.", *SERVICE_TAGS, "shard")
FILTER_RESTARTS = counter("raytwin_filter_restarts", "Measured events a twin's filter updated from the state before "
                          "their gap because its prediction over the gap was not finite: the twin re-anchored on the "
                          "reading instead of refusing it (`Divergence.restarts`; the log's `event=filter_restarted` "
                          "names the twin), by simulator (`raytwin.sim.discovery.simulator_label`).", "simulator")
STALE_READS = counter("raytwin_stale_reads", "Twin states answered from the twin's last durable state because "
                      "its shard was restarting or left a call unanswered past its deadline, by read (state: one "
                      "twin; query: asset queries).", "read")
SHARD_STARTED = gauge("raytwin_shard_started_timestamp_seconds", "When this twin shard process finished starting "
                      "(recovering its twins) [Unix s]: a new value per restart, so `changes()` counts a crash loop; "
                      "by service, as shard 0 of every service on a cluster is one shard index.", *SERVICE_TAGS,
                      "shard")
SHARDS_CONFIGURED = gauge("raytwin_shards_configured", "Twin shards the service is configured with (`twin_shards`), "
                          "exported by the API backend: `raytwin status` counts the shards reporting against it, as "
                          "Ray's actor list loses a shard dead for good (out of restarts) from the service's; tagged "
                          "with the Ray namespace and the name prefix of its shard actors (`actors.routing."
                          "shard_prefix`), which tell them from another service's on the cluster.", *SERVICE_TAGS)
SHARD_UNANSWERED = counter("raytwin_shard_unanswered", "Times an Ingress replica found a twin shard leaving a call "
                           "unanswered past its deadline (hung or stalled; serve_apps/shard_deadline.py).", "shard")
FMU_STEPS = counter("raytwin_fmu_steps", "FMU steps the filters of twins on an FMU asked for "
                    "(`raytwin.fmu.FmuStepper`), by source (run: on the FMU; reused: read from the steps it "
                    "remembers, a look-ahead's).", "source")
FMU_FAILED_CALLS = counter("raytwin_fmu_failed_calls", "FMU calls (steps, observations) of twins' filters that the "
                           "FMU failed (fmi2Discard, fmi2Error, fmi2Fatal): NaN to the filter, which refuses the event "
                           "that led there (dead letter `non_finite`); the log's `event=fmu_call_failed` names it.")
# ---- scenarios, sweeps, jobs, calibration ------------------------------------------------------
SCENARIO_STEPS = counter("raytwin_scenario_steps", "Simulated scenario-steps (scenarios x steps), by kind "
                         "(scenario: API runs and jobs; sweep: every sweep).", "kind")
SWEEP_SCENARIOS = counter("raytwin_sweep_scenarios", "Scenarios finished by what-if sweeps, by simulator (a declared "
                          "model's name, custom or fmu: `raytwin.sim.discovery.simulator_label`).", "simulator")
SWEEP_RATE = gauge("raytwin_sweep_scenarios_per_second", "Throughput of the running sweep.", "simulator")
JOBS = gauge("raytwin_jobs", "API jobs by state (queued = the queue's depth).", *SERVICE_TAGS, "state")
JOB_QUEUE_OLDEST = gauge("raytwin_job_queue_oldest_submitted_timestamp_seconds", "Submission time of the oldest "
                         "queued job [Unix s], 0 when none waits: its age is time() minus it.", *SERVICE_TAGS)
CALIBRATIONS = counter("raytwin_calibrations", "Calibration runs finished, by outcome (succeeded, failed).",
                       "outcome")
CALIBRATION_DURATION = batch_histogram("raytwin_calibration_duration_seconds", "Wall time of a calibration run "
                                       "[s] (counters, so that it is exported at 0 before a process's first run).",
                                       DURATION_S)
CONNECTOR_MESSAGES = counter("raytwin_connector_messages", "Device-protocol connector messages by outcome (received, "
                             "acknowledged, accepted, duplicates, rejected, dead_lettered, delivery_errors).",
                             "connector", "outcome")
CONNECTOR_CONNECTED = gauge("raytwin_connector_connected", "1 while a connector is connected to its source and "
                            "receiving (MQTT: every subscription acknowledged; OPC UA: items monitored).", "connector")
CONNECTOR_DOWN = counter("raytwin_connector_down_seconds", "Seconds a connector declared running was not connected "
                         "and receiving; its rate is the share of time down (paused time does not count, and a "
                         "stopped process's series stops growing).", "connector")
CONNECTOR_NOT_STARTED = gauge("raytwin_connector_not_started", "1 while the backend holds a declared connector it "
                              "does not run, by reason (refused: the host policy refuses its source; failed: its "
                              "process could not start), 0 once it runs or is deleted: no process of its own "
                              "exports its down time then.", "connector", "reason")
CONNECTOR_NEWEST_EVENT = gauge("raytwin_connector_newest_event_timestamp_seconds", "Event time of the newest event a "
                               "connector applied [Unix s]: time() minus it is the twins' data's age, no lag (replayed "
                               "or backfilled history is as old as its event times however promptly it is taken).",
                               "connector")
CONNECTOR_LAG = gauge("raytwin_connector_lag_seconds", "Seconds the oldest message a connector received and has not yet "
                      "made durable has waited since it received it (0: none waits), set every second: how far behind "
                      "its source it is, whatever times the events carry.", "connector")
# ---- overload (serve_apps/admission.py) ---------------------------------------------------------
ADMISSION_REFUSED = counter("raytwin_admission_refused", "Requests refused before any work because the service "
                            "was at capacity, by gate (proxy, replica, ingress: 503; telemetry: 429) and reason "
                            "(in_flight, queue_full, wait_budget, backlog).", "gate", "reason")
TELEMETRY_BACKLOG = gauge("raytwin_telemetry_backlog_events", "Telemetry events accepted over HTTP and not yet "
                          "applied by the shards (bounded by admission.telemetry_backlog_events).")
STORE_DAMAGED_FILES = counter("raytwin_store_damaged_files", "Damaged store files a process read past, by kind "
                            "(snapshot: unreadable, recovery used the one before it or the log; log_segment: cut, its "
                            "readable rows kept, its tail lost), once per process and file (`raytwin.damage`).", "kind")
STORE_FENCED = gauge("raytwin_store_fenced", "1 while this service's store is leased to another service (a takeover, a "
                     "reshard) or its lease was released: every write is refused (503 store_fenced); 0 while it holds it.")
STORE_FAILURES = counter("raytwin_store_failures", "Store operations that failed, by operation (read, write: a "
                         "request that reads or changes something, a write the service makes by itself, the shards' "
                         "lease heartbeat) and error class (`raytwin.store_failures.FAILURE_CLASSES`: disk_full, "
                         "read_only, permission, io, unreachable, timeout).", "operation", "error")
STORE_UNAVAILABLE = gauge("raytwin_store_unavailable", "1 while the API backend finds its store unavailable, by reason "
                          "(an error class of `raytwin_store_failures`: a read of its lease fails or does not answer; "
                          "no_writes: the shards' lease heartbeat stopped changing while a shard answers), 0 "
                          "otherwise; checked every 5 s, as the health probes check it.", "reason")
# ---- model lifecycle (raytwin/lifecycle.py) ------------------------------------------------------
LIFECYCLE_LOGS_BROKEN = gauge("raytwin_lifecycle_logs_broken", "Model lifecycle logs the API backend's audit found "
                              "broken (a record edited, removed or reordered) in its last whole verify of each: at its "
                              "start, then every 240 s; their models' transitions are refused until they verify again.")

DEAD_LETTER_REASONS: dict[str, tuple[str, ...]] = {
    "api": ("invalid", "misfit"),
    "ingest": ("invalid",),
    "shard": ("unknown_twin", "misfit", "clock_skew", "conflict", "too_late", "non_finite"),
    "connector": ("mapping", "invalid"),  # its mapping could not read a reading; the contract refused a row
}
"""The reasons each stage dead-letters events for (`DEAD_LETTERS`), exported at 0 where the stage runs."""
DAMAGED_KINDS = ("snapshot", "log_segment")
"""The kinds of file `STORE_DAMAGED_FILES` counts (`raytwin.damage`), exported at 0 where a shard starts."""
FMU_STEP_SOURCES = ("run", "reused")
"""The sources `FMU_STEPS` counts, exported at 0 where a process first steps an FMU."""


def service(namespace: str, prefix: str) -> dict[str, str]:
    """The `SERVICE_TAGS` of the service in Ray namespace `namespace` whose shard actors' names start with `prefix`."""
    return dict(zip(SERVICE_TAGS, (namespace, prefix), strict=True))


def zero_dead_letters(stage: str) -> None:
    """Export `stage`'s dead-letter series at 0 (see `Metric.zero`): once per process that refuses events."""
    DEAD_LETTERS.zero(*({"stage": stage, "reason": r} for r in DEAD_LETTER_REASONS[stage]))


CONNECTOR_OUTCOMES = ("received", "acknowledged", "accepted", "duplicates", "rejected", "dead_lettered",
                      "delivery_errors")
"""The outcomes `CONNECTOR_MESSAGES` counts."""
NOT_STARTED_REASONS = ("refused", "failed")
"""The reasons `CONNECTOR_NOT_STARTED` gives."""


def zero_connector(connector: str) -> None:
    """Export a starting connector's counters at 0 (see `Metric.zero`): its first delivery errors or dead
    letters then show in `rate()`, and so in the alerts."""
    CONNECTOR_MESSAGES.zero(*({"connector": connector, "outcome": o} for o in CONNECTOR_OUTCOMES))
    CONNECTOR_DOWN.zero({"connector": connector})
    zero_dead_letters("connector")


def set_not_started(connector: str, reason: str | None) -> None:
    """Export why the backend does not run `connector` (one of `NOT_STARTED_REASONS`), None: it runs or is gone."""
    for r in NOT_STARTED_REASONS:
        CONNECTOR_NOT_STARTED.set(1.0 if r == reason else 0.0, connector=connector, reason=r)
