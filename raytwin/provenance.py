"""Versions of RayTwin, its key dependencies and the code, for run records and `raytwin version`."""

from __future__ import annotations

import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

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
