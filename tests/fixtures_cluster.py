"""Shared helpers for the cluster tests: where the KubeRay CRDs are, and a small valid spec to vary."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = Path(os.environ.get("RAYTWIN_KUBERAY_CRDS") or REPO_ROOT.parent / "shared" / "kuberay-crds")

_BASE: dict[str, Any] = {
    "name": "twin",
    "namespace": "sim",
    "image": "ghcr.io/example/raytwin:0.1.0",
    "ray_version": "2.60.0",
    "head": {"cpu": 1, "memory": "4Gi"},
    "worker_groups": [{"name": "cpu", "cpu": 2, "memory": "8Gi", "min_replicas": 1, "max_replicas": 4}],
}


def spec_data(**overrides: Any) -> dict[str, Any]:
    """A fresh copy of a valid CPU-only spec with top-level fields replaced."""
    return {**copy.deepcopy(_BASE), **overrides}


def worker(**fields: Any) -> dict[str, Any]:
    """A valid CPU worker group with fields replaced."""
    return {**copy.deepcopy(_BASE["worker_groups"][0]), **fields}
