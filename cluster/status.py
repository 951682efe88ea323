"""`raytwin status`: the service (down, fenced), cluster, store, shards, twins, ingest lag, job queue, connectors and
firing alerts on one screen.

It reads what the operators' tools read, so it agrees with them: Ray's state (nodes, CPUs, and the service's own
twin shard actors with how often Ray restarted each, from Ray's state API, picked by the namespace and name prefix its
backend exports: Ray's metrics export counts actors by class and state, every service's on the cluster together, not
their restarts; several services' backends on the cluster: the one `--namespace` and `--store` name, never a guess),
every alive node's metrics export summed (so counts are cluster-wide, as in `raytwin.metrics`; the twins, events, lag
and jobs of that service only, by their series' `metrics.SERVICE_TAGS`; the other lines' series name no service), and,
given ``--prometheus``, the alerts firing there (RayTwin's rules in ops/prometheus). Counters and
the lag quantile from the export cover the life of the processes that recorded them; Prometheus
and the dashboard give rates over windows. The shards expected to report are the service's configured count (the
backend's `ray_raytwin_shards_configured`), not the shard actors Ray has: a shard dead for good leaves Ray's.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Annotated

import httpx
import ray
import typer
from prometheus_client.parser import text_string_to_metric_families

from raytwin import metrics
from raytwin.ray_connect import unreachable

Samples = list[tuple[str, dict[str, str], float]]


@dataclass(frozen=True)
class ShardActors:
    """The service's own twin shard actors that Ray has not given up on (not DEAD), from Ray's state API: their Ray
    state by shard index, and how often Ray restarted each (those restarted at least once)."""

    states: dict[str, str]
    restarts: dict[str, int]


@dataclass
class Status:
    """One screen's worth of state (see the module docstring for where each value comes from)."""

    nodes: int
    cpus: float
    cpus_free: float
    shards: dict[str, int] = field(default_factory=dict)  # TwinShardProcess actors by Ray state
    configured: int | None = None  # the service's shard count (its backend's gauge); None: no backend exports it
    actors: ShardActors | str | None = None  # the service's own shard actors, from Ray's state API (`shard_actors`);
    # a str: why it gave none; None: not asked
    unanswered: dict[str, int] = field(default_factory=dict)  # shard -> calls it left past their deadline (hung)
    fenced: bool | None = None  # the backend's store lease lost to another service; None: no backend exports it
    store_unavailable: list[str] | None = None  # why the backend finds its store unavailable; None: not exported
    store_failures: dict[str, int] = field(default_factory=dict)  # "operation/error" -> store operations failed
    twins: int = 0
    drifting: int = 0
    reporting: set[str] = field(default_factory=set)  # shards whose twins gauge is in the export
    events: dict[str, int] = field(default_factory=dict)  # by outcome
    dead_letters: dict[str, int] = field(default_factory=dict)  # by "stage/reason"
    lag_p95_s: float | None = None  # ingest time -> applied
    jobs: dict[str, int] = field(default_factory=dict)
    oldest_job_age_s: float | None = None
    connectors: dict[str, bool] = field(default_factory=dict)  # "tenant/name" -> connected and receiving
    connector_down_s: dict[str, float] = field(default_factory=dict)  # seconds declared running, not connected
    not_started: dict[str, str] = field(default_factory=dict)  # "tenant/name" -> why the backend does not run it
    alerts: list[str] | str | None = None  # firing; a str: why Prometheus gave none; None: no Prometheus given
    unscraped: dict[str, str] = field(default_factory=dict)  # node exports that did not answer: URL -> why


def scrape_nodes(timeout_s: float = 5.0) -> tuple[Samples, dict[str, str]]:
    """Every sample of every alive node's metrics export, and the exports that did not answer (URL -> why): one
    node's export down (`RayTwinNodeExportDown`) must leave the other nodes' numbers on the screen, not a traceback."""
    samples: Samples = []
    unscraped: dict[str, str] = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            text = httpx.get(url, timeout=timeout_s).raise_for_status().text
        except httpx.HTTPError as exc:
            unscraped[url] = f"{type(exc).__name__}: {exc}"
            continue
        samples += [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]
    return samples, unscraped


def _by(samples: Samples, name: str, *keys: str, **match: str) -> dict[str, float]:
    """`name`'s values summed by `keys`, of the series whose labels are `match` (a label missing: "")."""
    out: dict[str, float] = defaultdict(float)
    for n, labels, value in samples:
        if n == name and all(labels.get(k, "") == v for k, v in match.items()):
            out["/".join(labels.get(k, "") for k in keys)] += value
    return dict(out)


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """`q`-quantile of cumulative bucket counts (upper bound -> count), interpolated within the
    bucket as Prometheus's `histogram_quantile` does; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return lower


def _connected(samples: Samples) -> dict[str, bool]:
    """Each connector's connected gauge, the highest over processes: a restarted connector's dead process
    keeps its last value in the export for a while, so a sum could read 2."""
    out: dict[str, bool] = {}
    for n, labels, value in samples:
        if n == "ray_raytwin_connector_connected":
            out[labels["connector"]] = out.get(labels["connector"], False) or value > 0
    return out


NOT_STARTED = {"refused": "refused by the host policy, connector_hosts", "failed": "its process cannot start"}
"""What each reason of `ray_raytwin_connector_not_started` means (`metrics.NOT_STARTED_REASONS`)."""


def _not_started(samples: Samples) -> dict[str, str]:
    """The connectors a backend holds declared and does not run, with the reason it exports (at 1)."""
    return {labels["connector"]: labels["reason"] for n, labels, value in samples
            if n == "ray_raytwin_connector_not_started" and value > 0}


def _nonzero(values: dict[str, float]) -> dict[str, int]:
    """The counts above 0: processes export their counters' series at 0 from the start (`Metric.zero`)."""
    return {k: int(v) for k, v in values.items() if v}


Service = tuple[str, str]
"""A service on the cluster: its Ray namespace and shard-actor name prefix (`actors.routing.shard_prefix` of its
store's twins), as its backend tags `ray_raytwin_shards_configured`; ("", "") for a backend from before the tags."""


def exported_services(samples: Samples) -> dict[Service, int]:
    """Each service's configured shard count as its backend exports it (the highest per service: a replaced backend's
    process may still be in the export)."""
    out: dict[Service, int] = {}
    for n, labels, v in samples:
        if n == "ray_raytwin_shards_configured":
            key = (labels.get("namespace", ""), labels.get("prefix", ""))
            out[key] = max(out.get(key, 0), int(v))
    return out


class AmbiguousService(Exception):
    """Which service to report on is not known: several export their shards, or none the one asked for; the message
    lists them and how to pick one."""


def store_prefix(store_url: str) -> str:
    """The shard-actor name prefix of the service on `store_url`: of its twins' location, as its backend names its
    shards (`ServeConfig.url`)."""
    from actors.routing import shard_prefix
    from serve_apps.config import ServeConfig

    return shard_prefix(ServeConfig.model_construct(store_url=store_url).url("twins"))


def pick_service(services: dict[Service, int], namespace: str | None = None,
                 store_url: str | None = None) -> Service | None:
    """The service to report on: of `services` (`exported_services`), the one in `namespace` on `store_url` where
    given (the service's `namespace` and `store_url` settings); None when no backend exports one and none was asked
    for. Why not the one with the most shards: with two services on the cluster, status reported whichever was the
    larger, under the other's name as far as the operator could tell."""
    asked = {k: v for k, v in services.items() if namespace in (None, k[0])
             and (store_url is None or k[1] == store_prefix(store_url))}
    if len(asked) == 1:
        return next(iter(asked))
    if not asked and namespace is None and store_url is None:
        return None
    listed = "; ".join(f"namespace {ns or '?'}, shards {prefix or '?'} ({n} configured)"
                       for (ns, prefix), n in sorted(services.items())) or "none"
    if asked:
        raise AmbiguousService(f"the cluster runs {len(asked)} RayTwin services ({listed}): pass --namespace and "
                               "--store, the service's `namespace` and `store_url` settings, to say which")
    raise AmbiguousService(f"no API backend on the cluster exports a service in namespace {namespace or 'any'} on "
                           f"store {store_url or 'any'} (the services exported: {listed}); check --namespace and "
                           "--store against the service's `namespace` and `store_url` settings, and that its backend "
                           "runs (`serve status`)")


def _configured(samples: Samples, service: Service | None) -> int | None:
    """The configured shard count of `service` (`pick_service`); None: of the one service that exports it, where
    one does."""
    services = exported_services(samples)
    if service is not None:
        return services.get(service)
    return next(iter(services.values())) if len(services) == 1 else None


class StateApiUnreachable(Exception):
    """The cluster's state API (its dashboard) cannot be asked from here; the message says why."""


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
"""The dashboard address Ray's own tools (`ray list actors`, `ray job`) take over the registered one: a port-forward
or proxy to it. Status takes it too, checked as the registered one is (`state_api_url`)."""


def state_api_url(gcs_address: str, session_name: str, timeout_s: float = 5.0) -> str:
    """The URL of the state API of the cluster whose GCS is at `gcs_address`: `RAY_API_SERVER_ADDRESS` where set, as
    Ray's tools take it, else the dashboard address its head registered in the GCS, as Ray's state API finds it, with
    a wildcard host (``--dashboard-host=0.0.0.0``) read as the head's. `StateApiUnreachable` where no dashboard of
    that cluster (Ray session `session_name`) answers there: a head without one registers 127.0.0.1:8265 all the
    same, as does one whose dashboard listens on its loopback only, and asked there, this machine's port may be
    another cluster's dashboard, which would report that cluster's shards; the variable may name another cluster's."""
    if override := os.environ.get(API_SERVER_ENV):
        url = override.rstrip("/") if "://" in override else f"http://{override}"
        if not url.startswith(("http://", "https://")):
            raise StateApiUnreachable(f"{API_SERVER_ENV}={override} is no dashboard URL: set it to the dashboard's "
                                      "http://HOST:PORT, or unset it")
        return _same_session(url, session_name, f" ({API_SERVER_ENV}: point it at this cluster's, or unset it)",
                             timeout_s)
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    registered = _internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    if not registered:
        raise StateApiUnreachable("its head registers no dashboard in the GCS: start it with --include-dashboard=true")
    host, port = registered.decode().rsplit(":", 1)
    head = gcs_address.rsplit(":", 1)[0].strip("[]")
    try:
        address = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host.strip("[]"))
    except ValueError:  # a host name: as registered
        address = None
    if address is not None and address.is_unspecified:
        host = f"[{head}]" if ":" in head else head
    elif address is not None and address.is_loopback and not _this_machine(head):
        raise StateApiUnreachable(
            f"its dashboard listens on {registered.decode()} of its head ({head}) only, out of this machine's reach: "
            "run `raytwin status` on the head node, or start the head with --dashboard-host=0.0.0.0")
    return _same_session(f"http://{host}:{port}", session_name, ": this cluster runs none (--include-dashboard=false)",
                         timeout_s)


def _auth_headers() -> dict[str, str]:
    """The headers Ray's SDK sends its dashboard (a token where the cluster requires one)."""
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    return get_auth_headers_if_auth_enabled({})


def _same_session(url: str, session_name: str, other: str, timeout_s: float) -> str:
    """`url`, once the dashboard there answers as Ray session `session_name`; else `StateApiUnreachable` (`other`:
    what to do when another cluster's answers)."""
    try:
        answered = httpx.get(f"{url}/api/version", headers=_auth_headers(),
                             timeout=timeout_s).raise_for_status().json()["session_name"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise StateApiUnreachable(f"no dashboard answers at {url} ({type(exc).__name__}): the cluster runs none "
                                  "(started with --include-dashboard=false), or it failed") from None
    if answered != session_name:
        raise StateApiUnreachable(f"the dashboard at {url} is another Ray cluster's (session {answered}, this one is "
                                  f"{session_name}){other}")
    return url


def _this_machine(host: str) -> bool:
    """Whether `host` is an address of this machine (one it can bind to), where a loopback address reaches it too."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
    except OSError:
        return False
    return True


def shard_actors(service: Service | None, timeout_s: int = 5) -> ShardActors | str:
    """The shard actors not DEAD of `service` (its Ray namespace and `actors.routing.shard_prefix`: `pick_service`),
    from Ray's state API (the dashboard's: Ray's metrics export counts actors by state only, and every service's
    together); why not, as a phrase, when it does not answer or `service` is unknown and the cluster runs the shards
    of several services (another service's shard 1 is not this one's)."""
    from actors.routing import shard_of

    context = ray.get_runtime_context()
    try:
        url = state_api_url(context.gcs_address, context.get_session_name())  # the cluster connected to, not a guess
    except StateApiUnreachable as exc:
        return f"Ray's state API cannot be asked: {exc}"
    try:
        rows = list_shard_actors(url, timeout_s)
    except Exception as exc:  # noqa: BLE001 - the rest of the screen stands without it
        return f"Ray's state API, which its dashboard serves, did not answer at {url}: {type(exc).__name__}"
    found = {(a["ray_namespace"], *parts): a for a in rows if (parts := shard_of(a.get("name"))) is not None}
    services = {key[:2] for key in found}
    if service is None and len(services) > 1:
        return (f"the cluster runs the shards of {len(services)} services and no API backend exports which are its "
                "(ray_raytwin_shards_configured)")
    ours = {key[2]: a for key, a in found.items() if service is None or key[:2] == service}
    return ShardActors(states={i: str(a["state"]) for i, a in ours.items()},  # (counts come as strings over HTTP)
                       restarts={i: n for i, a in ours.items() if (n := int(a.get("num_restarts") or 0))})


def list_shard_actors(url: str, timeout_s: int) -> list[dict]:
    """The TwinShardProcess actors not DEAD, as the state API at `url` lists them (with their restarts). Asked over
    HTTP, as `ray.util.state.list_actors` asks it, which would take `RAY_API_SERVER_ADDRESS`, else `RAY_ADDRESS`'s
    dashboard over the address given: not the one `state_api_url` checked (another cluster's, a wildcard host)."""
    params = {"limit": 10_000, "timeout": timeout_s, "detail": "true", "filter_keys": ["class_name", "state"],
              "filter_predicates": ["=", "!="], "filter_values": ["TwinShardProcess", "DEAD"]}
    body = httpx.get(f"{url}/api/v0/actors", params=params, headers=_auth_headers(),
                     timeout=timeout_s + 5).raise_for_status().json()
    if body.get("result") is False:
        raise RuntimeError(body.get("msg", "the state API failed"))
    return body["data"]["result"]["result"]


def _fenced(samples: Samples) -> bool | None:
    """Whether any backend process exports its store as fenced; None when none exports the gauge."""
    values = [v for n, _, v in samples if n == "ray_raytwin_store_fenced"]
    return any(v > 0 for v in values) if values else None


STORE_UNAVAILABLE = {
    "disk_full": "its disk is full: free space on it",
    "read_only": "its filesystem is read-only: remount it read-write",
    "permission": "the service may not write it: its owner and permissions, or its S3 credentials and bucket policy",
    "io": "its disk reports I/O errors", "unreachable": "its endpoint refuses connections or cannot be reached",
    "timeout": "it does not answer a read within 5 s",
    "no_writes": "no write lands, the shards' lease heartbeat stopped changing (a full disk, a read-only store: the "
                 "shards log event=lease_heartbeat_failed)"}
"""What each reason of `ray_raytwin_store_unavailable` means (`serve_apps.store_errors.UNAVAILABLE_REASONS`)."""


def _store_unavailable(samples: Samples) -> list[str] | None:
    """The reasons a backend exports at 1 (none: the store takes writes); None when no backend exports the gauge."""
    values = [(labels.get("reason", ""), v) for n, labels, v in samples if n == "ray_raytwin_store_unavailable"]
    return sorted({reason for reason, v in values if v > 0}) if values else None


def _shard_states(samples: Samples, actors: ShardActors | str | None) -> dict[str, int]:
    """TwinShardProcess actors by Ray state: the service's own where its `actors` are known, else every service's on
    the cluster (Ray's export counts them by class); DEAD ones from the export (the state API lists none)."""
    exported = {k: int(v) for k, v in _by(samples, "ray_actors", "State", Name="TwinShardProcess", Source="gcs").items()
                if v}
    if not isinstance(actors, ShardActors):
        return exported
    return {**{k: v for k, v in exported.items() if k == "DEAD"}, **Counter(actors.states.values())}


def collect(samples: Samples, prometheus: str | None = None, now: float | None = None,
            unscraped: dict[str, str] | None = None, actors: ShardActors | str | None = None,
            service: Service | None = None) -> Status:
    """The status of `service` (`pick_service`) from Ray's state (and the service's shard `actors`: `shard_actors`),
    `samples` and `unscraped` (`scrape_nodes`) and Prometheus's alerts."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    total, free = ray.cluster_resources(), ray.available_resources()
    of = {} if service is None else metrics.service(*service)  # its twins', events', lag's and jobs' series only
    lag = {float(le): v
           for le, v in _by(samples, "ray_raytwin_ingest_to_applied_seconds_bucket_total", "le", **of).items()}
    oldest = [v for v in _by(samples, "ray_raytwin_job_queue_oldest_submitted_timestamp_seconds", **of).values()
              if v > 0]
    status = Status(
        nodes=len(nodes), cpus=total.get("CPU", 0.0), cpus_free=free.get("CPU", 0.0),
        shards=_shard_states(samples, actors),
        configured=_configured(samples, service),
        actors=actors,
        unanswered=_nonzero(_by(samples, "ray_raytwin_shard_unanswered_total", "shard")),
        fenced=_fenced(samples),
        store_unavailable=_store_unavailable(samples),
        store_failures=_nonzero(_by(samples, "ray_raytwin_store_failures_total", "operation", "error")),
        twins=int(sum(_by(samples, "ray_raytwin_twins", **of).values())),
        reporting=set(_by(samples, "ray_raytwin_twins", "shard", **of)),
        drifting=int(sum(_by(samples, "ray_raytwin_twins_drifting", **of).values())),
        events=_nonzero(_by(samples, "ray_raytwin_twin_events_total", "outcome", **of)),
        dead_letters=_nonzero(_by(samples, "ray_raytwin_dead_letters_total", "stage", "reason")),
        lag_p95_s=bucket_quantile(0.95, lag),
        jobs={k: int(v) for k, v in _by(samples, "ray_raytwin_jobs", "state", **of).items()},
        oldest_job_age_s=(now or time.time()) - min(oldest) if oldest else None,
        connectors=_connected(samples),
        connector_down_s=_by(samples, "ray_raytwin_connector_down_seconds_total", "connector"),
        not_started=_not_started(samples),
        unscraped=unscraped or {},
    )
    if prometheus is not None:
        status.alerts = firing_alerts(prometheus)
    return status


def firing_alerts(prometheus: str) -> list[str] | str:
    """The names of the alerts firing in `prometheus`, or why it gave none: a Prometheus that is down or mistyped
    must not take the rest of the screen with it (a traceback instead of the shards' state, mid-incident)."""
    url = f"{prometheus.rstrip('/')}/api/v1/alerts"
    try:
        alerts = httpx.get(url, timeout=10).raise_for_status().json()["data"]["alerts"]
        return sorted({a["labels"]["alertname"] for a in alerts if a["state"] == "firing"})
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        return (f"UNKNOWN: no alerts from {url} ({type(exc).__name__}: {exc}); check --prometheus, Prometheus's own "
                "address, e.g. http://HOST:9090")


def _counts(values: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(values.items())) or "none"


def _shards(s: Status) -> str:
    """Alive shards first (of the service's configured count, when its backend exports it), none said plainly;
    RESTARTING ones are missing now, and MISSING ones for good: the configured shards no actor alive or restarting
    stands for (dead for good); how often Ray restarted them; DEAD explained: Ray keeps every shard process the
    cluster ever ran, so it counts earlier services' and replaced processes too, and with none alive or restarting
    the stopped service's own (`serve shutdown`); then the shards that left calls unanswered (hung or stalled while
    Ray shows them alive)."""
    alive = s.shards.get("ALIVE", 0)
    of = "" if s.configured is None else f" of {s.configured:,} configured"
    parts = [f"{alive:,} alive{of}" if alive else f"NONE ALIVE{of} (the API is down: no twin can be read or written)"]
    if n := s.shards.get("RESTARTING"):
        parts.append(f"RESTARTING {n:,} (missing now: their twins' reads are stale, their writes wait)")
    if gone := _missing(s):
        count, which = (len(gone), f"shard{'s' * (len(gone) > 1)} {', '.join(gone)}; ") if isinstance(gone, list) \
            else (gone, "")
        parts.append(f"MISSING {count:,} ({which}dead for good: Ray restarts them no more; ops/README.md#shards-down)")
    if isinstance(s.actors, str):
        parts.append(f"restarts unknown ({s.actors})")
    elif s.actors is not None and s.actors.restarts:
        restarts = sorted(s.actors.restarts.items(), key=lambda kv: int(kv[0]))
        parts.append("restarted by Ray: " + ", ".join(f"shard {k} {v:,}x" for k, v in restarts))
    if others := {k: v for k, v in s.shards.items() if k not in ("ALIVE", "RESTARTING", "DEAD")}:
        parts.append(_counts(others))
    if n := s.shards.get("DEAD"):
        whose = "earlier services" if _service_shards(s) else "the stopped service, earlier ones"
        parts.append(f"DEAD {n:,} (processes of {whose}{', the missing' if gone else ''} and replaced ones)")
    if s.unanswered:
        hung = ", ".join(f"shard {k} {v:,}x" for k, v in sorted(s.unanswered.items()))
        parts.append(f"left calls unanswered past their deadline (hung or stalled; in all): {hung}")
    return "; ".join(parts)


def _missing(s: Status) -> list[str] | int:
    """The configured shards that no actor of the service alive or restarting stands for (dead for good): by index
    from its own actors (`shard_actors`), else a count against every service's shard actors on the cluster (Ray's
    export, which may count another service's); none while no shard is alive (the service is down or stopped)."""
    if not s.shards.get("ALIVE", 0) or s.configured is None:
        return 0
    if isinstance(s.actors, ShardActors):
        return [str(i) for i in range(s.configured) if str(i) not in s.actors.states]
    return max(s.configured - _service_shards(s), 0)


def _service_shards(s: Status) -> int:
    """The running service's shard count, from Ray's actor list: every shard actor not DEAD (a stopped or
    restarting one's process exports nothing, Ray still lists its actor)."""
    return sum(n for state, n in s.shards.items() if state != "DEAD")


def _twins(s: Status) -> str:
    """The twins counted and, when fewer shards report than the service has (its configured count, else its shard
    actors not DEAD), which do not: a stopped (SIGSTOP), restarting or dead shard's gauges and counters leave the
    export, and the sums would undercount silently."""
    counted = f"{s.twins:,} live, {s.drifting:,} drifting"
    shards = _service_shards(s) if s.configured is None else s.configured
    if not (missing := [str(i) for i in range(shards) if str(i) not in s.reporting]):
        return counted
    return (f"{counted} (shards {shards - len(missing)} of {shards} reporting: counts are partial; "
            f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} not reporting)")


def _service(s: Status) -> str:
    """The answer to "is the API up?": the problems that make it down or read-only, else what was checked."""
    problems = []
    if s.shards.get("ALIVE", 0) == 0:
        problems.append("DOWN: no twin shard alive")
    if s.fenced:
        problems.append("FENCED: another service holds its store, every write is refused (503 store_fenced; "
                        "ops/README.md#store-fenced)")
    return "; ".join(problems) or "up: twin shards alive" + ("" if s.fenced is None else ", store held")


def _store(s: Status) -> str:
    """Whether the store takes writes, as the backend's health probe finds it, and why not; then the store
    operations that failed (over the processes' lives)."""
    if s.fenced:
        state = "held by another service (see service)"
    elif not s.shards.get("ALIVE", 0):  # the backend finds no renewal then, whatever the store takes
        state = "unknown while no twin shard is alive (see service)"
    elif s.store_unavailable is None:
        state = "unknown (no API backend exports it)"
    elif s.store_unavailable:
        why = "; ".join(STORE_UNAVAILABLE.get(r, r) for r in s.store_unavailable)
        state = f"TAKES NO WRITES: {why} (ops/README.md#store-failing)"
    else:
        state = "takes writes"
    return f"{state}; failed operations: {_counts(s.store_failures)}"


def _connectors(s: Status) -> str:
    """Connected ones counted; those not connected with their down time; those the backend does not run with
    why (a process of theirs that ran before may still be in the export: they are listed once, as not running)."""
    running = {c: up for c, up in s.connectors.items() if c not in s.not_started}
    parts = [f"{sum(running.values())} connected"] if running else []
    if down := [f"{c} (down {s.connector_down_s.get(c, 0.0):.0f} s in all)" for c, up in sorted(running.items())
                if not up]:
        parts.append(f"not connected (or paused): {', '.join(down)}")
    if s.not_started:
        listed = ", ".join(f"{c} ({NOT_STARTED.get(why, why)})" for c, why in sorted(s.not_started.items()))
        parts.append(f"NOT RUNNING: {listed}; their error: `raytwin connectors status NAME`")
    return "; ".join(parts) or "none"


def render(s: Status) -> str:
    lag = "no events applied" if s.lag_p95_s is None else f"p95 {s.lag_p95_s * 1000:.0f} ms (ingest -> applied)"
    age = "" if s.oldest_job_age_s is None else f"; oldest queued {s.oldest_job_age_s:.0f} s"
    alerts = ("unknown (pass --prometheus URL)" if s.alerts is None else s.alerts if isinstance(s.alerts, str)
              else ", ".join(s.alerts) if s.alerts else "none firing")
    unscraped = "".join(f"; EXPORT NOT ANSWERING: {url} ({why}): the counts below leave that node out"
                        for url, why in sorted(s.unscraped.items()))
    return "\n".join([
        f"cluster       {s.nodes} node(s), {s.cpus_free:g} of {s.cpus:g} CPUs free{unscraped}",
        f"service       {_service(s)}",
        f"store         {_store(s)}",
        f"shards        {_shards(s)}",
        f"twins         {_twins(s)}",
        f"events        {_counts(s.events)}",
        f"dead letters  {_counts(s.dead_letters)}",
        f"lag           {lag}",
        f"jobs          {_counts(s.jobs)}{age}",
        f"connectors    {_connectors(s)}",
        f"alerts        {alerts}",
    ])


def status(
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else a running local Ray).")] = None,
    prometheus: Annotated[str | None, typer.Option(help="Prometheus URL with RayTwin's rules, for the firing alerts.")] = None,
    namespace: Annotated[str | None, typer.Option(help="The service's Ray namespace (its `namespace` setting), where "
                                                  "the cluster runs several services.")] = None,
    store: Annotated[str | None, typer.Option(help="The service's store (its `store_url` setting), where the cluster "
                                              "runs several services.")] = None,
) -> None:
    """Cluster, twins, ingest lag, job queue, connectors and firing alerts of the service, on one screen."""
    if not ray.is_initialized():
        if address is None and not os.environ.get("RAY_ADDRESS"):
            from ray._private.services import find_gcs_addresses  # what address="auto" picks one of

            if len(found := sorted(find_gcs_addresses())) > 1:
                typer.echo(f"several Ray clusters run on this machine ({', '.join(found)}): pass --address, the "
                           "one `raytwin serve` or `raytwin cluster up --local` printed", err=True)
                raise typer.Exit(1)
        try:
            if reason := unreachable(address or os.environ.get("RAY_ADDRESS")):  # not after minutes of retries
                raise ConnectionError(reason)
            ray.init(address=address or "auto", logging_level="ERROR")
        except ConnectionError as exc:
            typer.echo(f"no Ray cluster to report on ({exc}); pass --address or set RAY_ADDRESS to a running "
                       "cluster (`raytwin cluster up --local` starts a local one); a cluster that requires a token "
                       "also needs RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN_PATH, as its start printed)", err=True)
            raise typer.Exit(1) from None
    samples, unscraped = scrape_nodes()
    try:
        service = pick_service(exported_services(samples), namespace, store)
    except AmbiguousService as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    actors = shard_actors(service if service and all(service) else None)
    typer.echo(render(collect(samples, prometheus, unscraped=unscraped, actors=actors, service=service)))
