"""Lazy package exports (PEP 562), so that `raytwin --help` does not pay for importing Ray and JAX."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple


class LazyExports(NamedTuple):
    """A package's ``__all__``, ``__getattr__`` and ``__dir__``, to unpack into its namespace."""

    all: list[str]
    getattr: Callable[[str], Any]
    dir: Callable[[], list[str]]


def lazy_exports(package: str, modules: Mapping[str, tuple[str, ...]]) -> LazyExports:
    """Exports of `package` that import their module (``modules``: module path -> the names it
    exports) on first use; one name exported by two modules is refused at import."""
    where: dict[str, str] = {}
    for module, names in modules.items():
        for name in names:
            if where.setdefault(name, module) != module:
                raise ValueError(f"{package}: {name} is exported by both {where[name]} and {module}")

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name]), name)

    exported = sorted(where)
    return LazyExports(exported, __getattr__, lambda: exported)
