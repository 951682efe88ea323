"""RayTwin: live digital twins and massive scenario sweeps on Ray, with JAX simulators."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("raytwin")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
