"""Serve's HAProxy mode (``raytwin serve --haproxy``): HAProxy answers on the API's port, forwards to the
Ingress replica's own HTTP server, and the proxy gate runs there sized to one replica, with the app on the
replica's own event loop as ``raytwin serve --haproxy`` runs it (a state query waiting on the shard must not hold
that loop, or the gate could not refuse).

Serve reads the switch when its processes start, so this runs in a fresh interpreter with its own local Ray
(`_check_in_fresh_ray`), ~20 s on 2 cores. The gate's refusal is made deterministic by stopping the twin
shard's process: of three state queries sent then, two hold the replica's two places until the shard
continues and the third is refused.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time

import httpx

from benchmarks.harness import run_python, subprocess_env_without
from benchmarks.serve_api import haproxy_ports_env
from serve_apps.admission import Admission
from serve_apps.config import Autoscaling
from serve_apps.proxy_gate import REPLICA_MAX_IN_FLIGHT_ENV, REPLICA_SATURATED_IN_FLIGHT_ENV
from serve_apps.serve_env import environment, haproxy_environment

RESULT = "HAPROXY_CHECK "
PLACES = 2
"""The replica gate's limit here: with 1, a request sent the moment the previous answer arrived could find
its place still held by Serve's work after the answer (serve_apps/proxy_gate.py)."""


def _listener(port: int) -> str:
    """The name of the process listening on 127.0.0.1:`port` (Linux /proc)."""
    inodes = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # LISTEN
            inodes.add(fields[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").removeprefix("socket:[").rstrip("]") in inodes:
                    return open(f"/proc/{pid}/comm").read().strip()
        except OSError:  # the process ended, or its descriptors are not ours to read
            continue
    return ""


def _check_in_fresh_ray() -> None:
    """In the fresh interpreter: start the app under HAProxy mode, check, print the findings."""
    import ray
    from ray import serve

    from actors.routing import shard_name
    from raytwin.contracts import AssetType
    from raytwin.ports import free_port
    from raytwin.sim import THERMAL_RC
    from serve_apps.app import build_app
    from serve_apps.auth import create_key
    from serve_apps.endpoints import http_targets

    tmp = tempfile.mkdtemp(prefix="raytwin-haproxy-")
    _, key = create_key(f"{tmp}/keys.json", "acme", "admin", owner="admin")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {"store_url": f"{tmp}/store", "keys_file": f"{tmp}/keys.json", "twin_shards": 1, "state_cache_s": 0,
              "namespace": "raytwin-haproxy-test", "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    serve.run(build_app(config), name="raytwin", route_prefix="/")
    found: dict = {"listener": _listener(port), "targets": [p for _, p in http_targets("raytwin")], "port": port}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                      timeout=60.0) as http:
        for path, body in (("/v1/asset-types", AssetType.from_model(THERMAL_RC).model_dump(mode="json")),
                           ("/v1/assets", {"id": "zone-1", "type_name": "thermal_rc",
                                           "type_version": THERMAL_RC.version,
                                           "initial_state": {"T_in": 293.0, "T_m": 292.0}})):
            created = http.post(path, json=body)
            assert created.status_code == 201, f"POST {path}: {created.status_code} {created.text}"
        state = http.get("/v1/assets/zone-1/state")
        assert state.status_code == 200, f"GET state: {state.status_code} {state.headers} {state.text}"
        found["state"] = state.json()["state"]
        shard = ray.get_actor(shard_name(f"{tmp}/store/twins", 0, 1), namespace=config["namespace"])
        pid = ray.get(shard.pid.remote())
        time.sleep(0.5)  # Serve's work after the last answer has freed its place
        os.kill(pid, signal.SIGSTOP)
        answers: list[httpx.Response] = []
        queries = [threading.Thread(target=lambda: answers.append(http.get("/v1/assets/zone-1/state", timeout=300)))
                   for _ in range(PLACES + 1)]
        try:
            for query in queries:
                query.start()
            deadline = time.monotonic() + 120.0
            while not answers and time.monotonic() < deadline:  # PLACES wait on the shard, the one more is refused
                time.sleep(0.05)
        finally:
            os.kill(pid, signal.SIGCONT)
        for query in queries:
            query.join(300.0)
        found["statuses"] = sorted(a.status_code for a in answers)
        refused = next((a for a in answers if a.status_code == 503), None)
        if refused is not None:
            found["refused"] = {"retry_after": refused.headers.get("retry-after"), "body": refused.json()}
    print(RESULT + json.dumps(found))


def test_haproxy_forwards_to_the_replica_whose_gate_refuses_beyond_one_replicas_limit() -> None:
    env = {**subprocess_env_without("RAY_ADDRESS"),
           **environment(Autoscaling(min_replicas=1, max_replicas=1), Admission()),
           **haproxy_environment(), **haproxy_ports_env(),
           REPLICA_MAX_IN_FLIGHT_ENV: str(PLACES), REPLICA_SATURATED_IN_FLIGHT_ENV: str(PLACES)}
    out = run_python("from tests.test_serve_haproxy import _check_in_fresh_ray; _check_in_fresh_ray()", env,
                     timeout_s=300)
    [line] = [ln for ln in out.splitlines() if ln.startswith(RESULT)]
    found = json.loads(line[len(RESULT):])
    assert found["listener"] == "haproxy"  # not Serve's Python proxy
    assert found["targets"] == [found["port"]]  # Serve's target groups name HAProxy
    assert found["state"] == {"T_in": 293.0, "T_m": 292.0}
    assert found["statuses"] == [200] * PLACES + [503]  # the queries on the stopped shard answered once it went on
    refused = found["refused"]
    assert refused["retry_after"] == str(Admission().retry_after_s)
    assert refused["body"]["error"]["code"] == "overloaded"
    assert f"this replica's limit of {PLACES} requests in flight" in refused["body"]["error"]["message"]
