"""Prometheus metrics of one ingress replica, in its own `CollectorRegistry`.

Aggregation: every ingress replica counts its own requests, latencies, events and scenario
steps; a scrape of ``/metrics`` answers with the replica that Serve routed it to, labelled
``replica``. Cluster-wide gauges (live twins, sweep jobs by state) come from the singleton
backends at scrape time, so every replica reports the same value. For exact cluster-wide request
totals scrape Ray's metrics endpoint on each node too, where Serve exports
``ray_serve_num_http_requests_total`` per route (see README).
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LAG_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 86400.0)


class ServeMetrics:
    def __init__(self, replica: str):
        self.replica = replica
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("raytwin_http_requests", "HTTP requests by route and status.",
                                ["replica", "method", "route", "status"], registry=r)
        self.latency = Histogram("raytwin_http_request_duration_seconds", "HTTP request latency.",
                                 ["replica", "method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.accepted = Counter("raytwin_events_accepted", "Telemetry events applied by a twin.",
                                ["replica"], registry=r)
        self.duplicates = Counter("raytwin_events_duplicate", "Telemetry events already seen (idempotency key).",
                                  ["replica"], registry=r)
        self.rejected = Counter("raytwin_events_rejected", "Telemetry events refused.", ["replica", "reason"],
                                registry=r)
        self.ingest_lag = Histogram("raytwin_ingest_lag_seconds", "Ingest time minus event time of accepted events.",
                                    ["replica"], buckets=LAG_BUCKETS, registry=r)
        self.live_twins = Gauge("raytwin_live_twins", "Live twins registered (cluster-wide).", registry=r)
        self.sweep_jobs = Gauge("raytwin_sweep_jobs", "Scenario jobs by state (cluster-wide).", ["state"], registry=r)
        self.connector_counts = Gauge(
            "raytwin_connector_messages", "Connector messages by outcome since the connector process started "
            "(received, acknowledged, pending, accepted, duplicates, rejected, dead_lettered, errors; cluster-wide).",
            ["tenant", "connector", "outcome"], registry=r)
        self.connector_lag = Gauge("raytwin_connector_lag_seconds", "Server clock minus the newest applied event "
                                   "time, per connector (cluster-wide).", ["tenant", "connector"], registry=r)
        self.connector_up = Gauge("raytwin_connector_connected", "1 while the connector is connected to its source.",
                                  ["tenant", "connector"], registry=r)
        self._lock = threading.Lock()
        self._sync = [0, 0.0]  # this replica's inline scenario-steps and seconds
        self._async = [0, 0.0]  # cluster-wide job scenario-steps and seconds, from the job queue
        r.register(self)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(self.replica, method, route, str(status)).inc()
        self.latency.labels(self.replica, method, route).observe(seconds)

    def observe_scenarios(self, steps: int, seconds: float) -> None:
        with self._lock:
            self._sync[0] += steps
            self._sync[1] += seconds

    def set_cluster(self, live_twins: int, jobs: dict) -> None:
        """Cluster-wide values from the backend: twins, jobs by state, job steps and seconds."""
        self.live_twins.set(live_twins)
        for state, n in jobs["states"].items():
            self.sweep_jobs.labels(state).set(n)
        with self._lock:
            self._async = [jobs["steps"], jobs["compute_s"]]

    def set_connectors(self, statuses: list[dict]) -> None:
        """Cluster-wide connector figures from the backend (`ConnectorStatus` as JSON)."""
        for gauge in (self.connector_counts, self.connector_lag, self.connector_up):
            gauge.clear()  # a deleted connector disappears
        for s in statuses:
            who = (s["tenant"], s["name"])
            for outcome in ("messages", "acknowledged", "pending", "accepted", "duplicates", "rejected",
                            "dead_lettered", "errors"):
                self.connector_counts.labels(*who, outcome).set(s[outcome])
            self.connector_up.labels(*who).set(1.0 if s["connected"] else 0.0)
            if s["lag_s"] is not None:
                self.connector_lag.labels(*who).set(s["lag_s"])

    def collect(self):
        """Scenario throughput = rate(steps) / rate(compute seconds); inline runs per replica, jobs cluster-wide."""
        steps = CounterMetricFamily("raytwin_scenario_steps", "Simulated scenario-steps (scenarios x steps).",
                                    labels=["replica", "mode"])
        seconds = CounterMetricFamily("raytwin_scenario_compute_seconds", "Wall time spent simulating.",
                                      labels=["replica", "mode"])
        with self._lock:
            for replica, mode, (n, s) in ((self.replica, "sync", self._sync), ("cluster", "async", self._async)):
                steps.add_metric([replica, mode], n)
                seconds.add_metric([replica, mode], s)
        yield steps
        yield seconds

    def render(self) -> bytes:
        return generate_latest(self.registry)
