"""The environment RayTwin's Serve processes start with: the proxy's overload gate and its limit.

Serve reads these variables when its processes (proxies, replicas) import it, so they must be in
the environment of every Ray node before Ray starts: ``raytwin serve`` sets them for the local Ray
it starts (`apply`), and the KubeRay manifests put them in every Ray container's ``env``
(`cluster.manifests`). An operator's own value of any of them wins over these.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from serve_apps.admission import Admission
from serve_apps.config import Autoscaling
from serve_apps.endpoints import HAPROXY_ENV
from serve_apps.proxy_gate import (
    MAX_IN_FLIGHT_ENV,
    ONE_REPLICA,
    REPLICA_MAX_IN_FLIGHT_ENV,
    REPLICA_SATURATED_IN_FLIGHT_ENV,
    RETRY_AFTER_ENV,
    SATURATED_IN_FLIGHT_ENV,
    max_in_flight,
    saturated_in_flight,
)

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "serve_apps.proxy_gate:proxy_middlewares"
USER_CODE_THREAD_ENV = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"


def environment(autoscaling: Autoscaling | None = None, admission: Admission | None = None) -> dict[str, str]:
    """The Serve environment for an app with these settings (defaults: `ServeConfig`'s): the proxy refuses
    the excess before it routes it (serve_apps/proxy_gate.py), sized to the Ingress deployment, and so does
    each replica's own HTTP server where replicas answer HTTP (direct ingress, HAProxy), sized to one replica."""
    autoscaling, admission = autoscaling or Autoscaling(), admission or Admission()
    return {PROXY_CALLBACK_ENV: PROXY_CALLBACK, MAX_IN_FLIGHT_ENV: str(max_in_flight(autoscaling, admission)),
            SATURATED_IN_FLIGHT_ENV: str(saturated_in_flight(autoscaling, admission)),
            REPLICA_MAX_IN_FLIGHT_ENV: str(max_in_flight(ONE_REPLICA, admission)),
            REPLICA_SATURATED_IN_FLIGHT_ENV: str(saturated_in_flight(ONE_REPLICA, admission)),
            RETRY_AFTER_ENV: str(admission.retry_after_s)}


def replica_server_environment() -> dict[str, str]:
    """Serve's switch where the Ingress replicas answer HTTP themselves (direct ingress, HAProxy): the app runs
    on the replica's own event loop, beside its HTTP server, not on a thread and loop of its own. Through
    HAProxy that took the server CPU per state query at half load from 1.32-1.33 to 0.87-0.90 ms and the
    replica's closed-loop capacity from 907-909 to 1,644-1,688 queries/s (benchmarks/RESULTS.md, "The app on
    the replica's loop"); through Serve's Python proxy it changed nothing measurable, so it is not set there. The
    cost: the replica's gate refuses on the loop that also runs the app, so refusals wait behind admitted
    work when the offered rate is far beyond capacity. Serve still runs the backend's sync methods in its
    thread pool (``RAY_SERVE_RUN_SYNC_IN_THREADPOOL``, on by default), so they do not block the loop."""
    return {USER_CODE_THREAD_ENV: "0"}


def haproxy_environment() -> dict[str, str]:
    """Serve's HAProxy mode as RayTwin runs it (`raytwin serve --haproxy`, the cluster spec's ``serve.ingress:
    haproxy``): HAProxy in front of the Ingress replicas' own HTTP servers, the app on each replica's loop."""
    return {HAPROXY_ENV: "1", **replica_server_environment()}


def environment_for_args(args: Mapping[str, Any]) -> dict[str, str]:
    """`environment` for the app's arguments as written in a Serve config (``autoscaling``, ``admission``)."""
    return environment(Autoscaling(**args.get("autoscaling", {})), Admission(**args.get("admission", {})))


def apply(env: Mapping[str, str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Add `env` to `environ`, keeping any value already set there."""
    for name, value in env.items():
        environ.setdefault(name, value)


def nodes_without_proxy_callback(timeout_s: float = 30.0) -> list[str]:
    """Alive nodes of the connected cluster whose processes start without RayTwin's proxy callback (a cluster
    started by ``ray start`` without `environment`): their Serve proxies have no overload gate and keep no
    client request ids. Read by a zero-CPU task pinned to each node (workers inherit the node's environment)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def callback() -> str | None:
        return os.environ.get(PROXY_CALLBACK_ENV)

    nodes = [n for n in ray.nodes() if n["Alive"]]
    refs = [callback.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    return [n["NodeManagerAddress"] for n, value in zip(nodes, ray.get(refs, timeout=timeout_s)) if value is None]
