"""Versions of RayTwin, its key dependencies and the code, for run records and `raytwin version`; and the platform
a run computed on (`compute_platform`), which run records keep beside them."""

from __future__ import annotations

import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

KEY_PACKAGES = ("raytwin", "ray", "jax", "jaxlib", "numpy", "scipy", "pyarrow", "pydantic", "optax", "fmpy")
"""What a run's numbers depend on: optax steps a recommendation's gradient search, fmpy runs FMU sweeps and fits."""


def package_versions(names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str]:
    """Installed versions of `names` ("not installed" where missing)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


@cache
def code_version() -> str:
    """The git commit of the source tree (with "+dirty" when modified), or the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return package_versions(("raytwin",))["raytwin"]


def compute_platform(kernel: Literal["jax", "fmu"] = "jax") -> str:
    """What this process computes on, for a run record's ``summary.platforms``: for JAX ``cpu`` or ``gpu: <device
    kind>`` (a GPU runs the fused Pallas kernel, a CPU the XLA scan), for an FMU fmpy's platform (``linux64``,
    ``darwin64``: each has its own compiled binary). Results of two platforms agree within rounding, not bit for
    bit, so a rerun elsewhere says why its outputs differ (`sweeps.runs.rerun`)."""
    if kernel == "fmu":
        from fmpy import platform

        return platform
    import jax

    device = jax.devices()[0]
    return device.platform if device.platform == "cpu" else f"{device.platform}: {device.device_kind}"
