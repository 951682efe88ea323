"""Shared helpers for the cluster tests: where the KubeRay CRDs are, a small valid spec to vary, and what a
local cluster is running."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx

from cluster.local import LocalClusterInfo

REPO_ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = Path(os.environ.get("RAYTWIN_KUBERAY_CRDS") or REPO_ROOT.parent / "shared" / "kuberay-crds")

_BASE: dict[str, Any] = {
    "name": "twin",
    "namespace": "sim",
    "image": "ghcr.io/example/raytwin:0.1.0",
    "ray_version": "2.60.0",
    "head": {"cpu": 1, "memory": "4Gi"},
    "worker_groups": [{"name": "cpu", "cpu": 2, "memory": "8Gi", "min_replicas": 1, "max_replicas": 4}],
    "keys_secret": "raytwin-keys",
}


def spec_data(**overrides: Any) -> dict[str, Any]:
    """A fresh copy of a valid CPU-only spec with top-level fields replaced."""
    return {**copy.deepcopy(_BASE), **overrides}


def worker(**fields: Any) -> dict[str, Any]:
    """A valid CPU worker group with fields replaced."""
    return {**copy.deepcopy(_BASE["worker_groups"][0]), **fields}


def cluster_processes(temp_dir: str) -> list[str]:
    """Live (non-zombie) processes whose command line mentions a local cluster's temp dir."""
    listing = subprocess.run(["ps", "-A", "-o", "stat=,args="], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if temp_dir in line and not line.lstrip().startswith("Z")]


def alive_node_ids(info: LocalClusterInfo) -> list[str]:
    """Sorted ids of the cluster's ALIVE nodes, from the dashboard's state API."""
    reply = httpx.get(f"{info.dashboard_url}/api/v0/nodes", headers=info.auth_headers, timeout=10)
    nodes = reply.json()["data"]["result"]["result"]
    return sorted(node["node_id"] for node in nodes if node["state"] == "ALIVE")
