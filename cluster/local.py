"""A multi-node Ray cluster on one machine: a head and worker nodes as separate `ray start` processes.

It exists to exercise real multi-node behaviour (scheduling across raylets, job submission through the
dashboard) without Kubernetes. Every node gets its own temp dir under one fresh directory and its own free
ports, so it never collides with another Ray instance on the machine, and it is stopped by process group and
temp dir, never by a machine-wide `ray stop`. The dashboard listens on 127.0.0.1 only and every address
handed out is 127.0.0.1 (`ray start` itself maps loopback to the machine's IP for node-to-node traffic).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from raytwin.ports import free_ports
from serve_apps import serve_env

HOST = "127.0.0.1"
DEFAULT_STATE_FILE = Path.home() / ".raytwin" / "local-cluster.json"
STATE_FILE_ENV = "RAYTWIN_LOCAL_CLUSTER_STATE"


class LocalClusterError(RuntimeError):
    """The local cluster could not be started, or its state file is unusable."""


@dataclass(frozen=True)
class LocalClusterInfo:
    """Where a running local cluster is, and what to stop to end it."""

    address: str  # GCS address, for `ray start --address` / `ray.init(address=...)`
    dashboard_url: str  # HTTP address of the dashboard and job-submission API
    temp_dir: str
    auth_token: str  # Ray token authentication secret of this cluster
    pids: tuple[int, ...]  # one `ray start --block` per node, each leading its own process group; head first

    @property
    def auth_headers(self) -> dict[str, str]:
        """HTTP headers that authenticate a client to the dashboard and job API."""
        return {"Authorization": f"Bearer {self.auth_token}"}

    def save(self, path: Path) -> None:
        """Write the state (it holds the token, so readable by the owner only)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> LocalClusterInfo:
        try:
            data = json.loads(path.read_text())
            return cls(**{**data, "pids": tuple(data["pids"])})
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise LocalClusterError(f"no usable local-cluster state in {path}: {exc}") from None


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


NODE_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port")  # per node; Ray would otherwise fix them machine-wide and nodes would clash


class LocalCluster:
    """Context manager running a head plus `num_workers` worker nodes; yields a `LocalClusterInfo`."""

    def __init__(
        self,
        num_workers: int = 1,
        cpus_per_node: int = 1,
        object_store_mb: int = 100,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 0 or cpus_per_node < 1 or object_store_mb < 75:
            raise ValueError("need num_workers >= 0, cpus_per_node >= 1 and object_store_mb >= 75 (Ray's minimum)")
        self.num_workers = num_workers
        self.cpus_per_node = cpus_per_node
        self.object_store_mb = object_store_mb
        self.startup_timeout_s = startup_timeout_s
        self.info: LocalClusterInfo | None = None
        self._processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> LocalClusterInfo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LocalClusterInfo:
        """Start the head, then the workers, and return once every node is alive in the dashboard."""
        # A short path under /tmp: Ray's Unix sockets live below it and AF_UNIX paths are limited to 107 bytes.
        temp_dir = Path(tempfile.mkdtemp(prefix="rtw-", dir="/tmp" if os.path.isdir("/tmp") else None))
        # Every node's ports at once, so that no two are the same (Ray refuses a node whose ports repeat).
        nodes = self.num_workers + 1
        gcs_port, dashboard_port, client_port, autoscaler_port, dashboard_metric_port, *node_ports = free_ports(
            5 + nodes * len(NODE_PORTS), HOST)
        address = f"{HOST}:{gcs_port}"
        token = secrets.token_hex(32)
        _write_private(temp_dir / "auth_token", token)
        self.info = LocalClusterInfo(address, f"http://{HOST}:{dashboard_port}", str(temp_dir), token, ())
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            self._start_node(0, node_ports[:len(NODE_PORTS)], [
                "--head", f"--port={gcs_port}", "--include-dashboard=true", f"--dashboard-host={HOST}",
                f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={client_port}",
            ], {"AUTOSCALER_METRIC_PORT": str(autoscaler_port), "DASHBOARD_METRIC_PORT": str(dashboard_metric_port)})
            self._wait(lambda: (temp_dir / "node-0" / "ray_current_cluster").exists(), deadline, "head node")
            for index in range(1, nodes):
                own = node_ports[index * len(NODE_PORTS):(index + 1) * len(NODE_PORTS)]
                self._start_node(index, own, [f"--address={address}"])
            self._wait(lambda: self._alive_nodes() == nodes, deadline, "all nodes to join")
        except BaseException:
            self.stop()
            raise
        return self.info

    def _start_node(
        self, index: int, ports: list[int], role_args: list[str], role_env: dict[str, str] | None = None,
    ) -> None:
        assert self.info is not None
        node_dir = Path(self.info.temp_dir) / f"node-{index}"
        node_dir.mkdir()
        command = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
            f"--temp-dir={node_dir}", f"--num-cpus={self.cpus_per_node}",
            "--num-gpus=0", f"--object-store-memory={self.object_store_mb * 2**20}", *(f"--{name}={port}" for name, port in zip(NODE_PORTS, ports, strict=True)), *role_args,
        ]
        env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        # Ray's gRPC ports listen on the machine's IP, so the cluster always requires its own token, whatever
        # ~/.ray/auth_token or the caller's RAY_AUTH_MODE say; raylets pass it on to workers and job drivers.
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(Path(self.info.temp_dir) / "auth_token")
        env.update(role_env or {})
        serve_env.apply(serve_env.environment(), env)  # Serve's proxies get RayTwin's gate; an operator's value wins
        # Draining on SIGTERM protects Serve traffic in production; here it only delays `down`.
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        with open(Path(self.info.temp_dir) / f"node-{index}.log", "wb") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._processes.append(process)
        self.info = LocalClusterInfo(**{**asdict(self.info), "pids": (*self.info.pids, process.pid)})

    def _alive_nodes(self) -> int:
        assert self.info is not None
        try:
            reply = httpx.get(f"{self.info.dashboard_url}/api/v0/nodes", headers=self.info.auth_headers, timeout=5)
            nodes = reply.json()["data"]["result"]["result"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return 0
        return sum(1 for node in nodes if node.get("state") == "ALIVE")

    def _wait(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        assert self.info is not None
        while not ready():
            dead = [process.pid for process in self._processes if process.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {log.name} ---\n{log.read_text(errors='replace')[-2000:]}"
                    for log in sorted(Path(self.info.temp_dir).glob("node-*.log"))
                )
                reason = f"node process(es) {dead} exited" if dead else f"timed out after {self.startup_timeout_s}s"
                raise LocalClusterError(f"local Ray cluster: waiting for {what}: {reason}\n{logs}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop every node (idempotent) and remove the cluster's temp dir."""
        if self.info is not None:
            stop_local_cluster(self.info)
            for process in self._processes:
                process.wait()  # reap our children; they are already gone
            self.info, self._processes = None, []


def _process_table() -> list[tuple[int, int, str]]:
    """(pid, process group, command line) of every live, non-zombie process, via portable `ps`."""
    listing = subprocess.run(["ps", "-A", "-o", "pid=,pgid=,stat=,args="], capture_output=True, text=True, check=True)
    rows = []
    for line in listing.stdout.splitlines():
        pid, pgid, stat, *args = line.split(None, 3)
        if not stat.startswith("Z"):
            rows.append((int(pid), int(pgid), args[0] if args else ""))
    return rows


def _signal_until_gone(select: Callable[[int, int, str], bool], grace_s: float) -> list[int]:
    """SIGTERM the selected processes, give them `grace_s` to exit, then SIGKILL the rest; those still there after
    (e.g. stuck in uninterruptible I/O) are returned: a stop that leaves them must not report the cluster gone."""
    pids: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace_s
        while pids := [pid for pid, pgid, args in _process_table() if select(pid, pgid, args)]:
            if time.monotonic() > deadline:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        else:
            return []
    return pids


def stop_local_cluster(info: LocalClusterInfo, grace_s: float = 10.0) -> None:
    """Stop each node's process group (workers first, so the head outlives them), then any Ray process still
    running from this cluster's temp dir (Ray workers get process groups of their own), and remove the dir.
    `LocalClusterError` if a process outlives SIGKILL (the dir is kept for it: stop again once it has exited)."""
    left = {pid for leader in reversed(info.pids)
            for pid in _signal_until_gone(lambda pid, pgid, args: pgid == leader, grace_s)}
    node_dirs = f"{info.temp_dir}/node-"
    left.update(_signal_until_gone(lambda pid, pgid, args: node_dirs in args and pid != os.getpid(), grace_s))
    if left:
        pids = ",".join(map(str, sorted(left)))
        raise LocalClusterError(f"processes {pids} of the local cluster outlived SIGKILL (`ps -o pid,stat,args -p "
                                f"{pids}`: state D waits on I/O); run `raytwin cluster down --local` again once they "
                                "have exited")
    shutil.rmtree(info.temp_dir, ignore_errors=True)
