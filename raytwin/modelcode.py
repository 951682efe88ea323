"""Which code a model runs: the distribution that ships it, its version and a hash of the code.

A registered artifact pins this identity (`raytwin.registry`), so a run record names the exact code
behind its numbers and an artifact whose code has changed since registration is refused at resolve
instead of silently running different physics.

- A JAX model's code is the source files of the modules that define its functions (``coefficients``,
  ``derivative``, ``output``, ...) and of the functions and modules that those call, found through
  their global names, transitively: those of the same top-level package, and any other that is
  user code (not in the standard library, an installed distribution or RayTwin's own packages: a
  flat ``helpers.py`` beside ``my_models.py``, whose change would otherwise run silently); and the
  modules of user code those modules import (a ``constants.py`` whose numbers the model uses). Whole
  files, so that module-level constants count; callables left at their framework default (e.g. the
  identity ``project``) are the framework's, not the model's, and are left out. A user package's data
  files count too (those with a data suffix, `DATA_SUFFIXES`, but READMEs, licences and the like, and not in
  caches or hidden directories, by ``package/path``: a table, coefficients in a ``.json``), since numbers a model
  reads from a file are its code as much as a constant;
  they travel to Ray workers with the package (`model_runtime_env`), which a flat module's neighbours do not.
- A model object may provide its own identity with a ``code_identity() -> ModelCode`` method: an FMU
  model returns `file_code` of its ``.fmu`` file.

`model_runtime_env` says how Ray workers get the code: code outside any installed distribution
travels as ``py_modules``; an installed distribution other than RayTwin is a ``pip`` requirement.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import sys
import sysconfig
import types
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from raytwin.contracts import Contract

CORE_DISTRIBUTION = "raytwin"
CORE_PACKAGES = frozenset({"raytwin", "client", "actors", "connectors", "serve_apps", "sweeps", "cluster", "benchmarks",
                           "demo"})
"""RayTwin's own top-level packages (pyproject.toml): code a model calls there is RayTwin's, versioned with it."""
_INSTALLED = tuple(sorted({str(Path(sysconfig.get_paths()[k]).resolve()) for k in ("stdlib", "platstdlib", "purelib",
                                                                                   "platlib")}))


class ModelCodeError(ValueError):
    """A model whose code cannot be identified (e.g. a function defined interactively, with no source)."""


class ModelCode(Contract):
    """The code identity of a model: ``sha256`` over ``parts`` (module or file name -> sha256 of its bytes)."""

    kind: Literal["python", "file"] = Field(description="python: hashed source modules; file: one file (an FMU).")
    distribution: str | None = Field(description="Installed distribution shipping the code; None if not installed.")
    version: str | None = Field(description="That distribution's version.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    parts: dict[str, str]

    def describe(self) -> str:
        """``name version`` (or "code not installed from a distribution") and a short hash, for messages."""
        where = f"{self.distribution} {self.version}" if self.distribution else "code not installed from a distribution"
        return f"{where}, sha256 {self.sha256[:12]}..."


def _digest(parts: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(parts.items())).encode()).hexdigest()


def file_code(path: str | Path, distribution: str | None = None, dist_version: str | None = None) -> ModelCode:
    """The identity of a model delivered as one file (an FMU): the file's SHA-256."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ModelCode(kind="file", distribution=distribution, version=dist_version, sha256=digest,
                     parts={path.name: digest})


@functools.cache
def _distribution(top_level: str) -> tuple[str | None, str | None]:
    """The distribution shipping a top-level package; RayTwin's own even when run from an uninstalled checkout."""
    names = packages_distributions().get(top_level, [])
    if not names:
        from raytwin import __version__

        return (CORE_DISTRIBUTION, __version__) if top_level == CORE_DISTRIBUTION else (None, None)
    try:
        return names[0], version(names[0])
    except PackageNotFoundError:
        return None, None


def _own_callables(model: Any) -> list[Callable]:
    """The model's functions, without those left at the model class's default (framework code)."""
    if dataclasses.is_dataclass(model):
        values = [getattr(model, f.name) for f in dataclasses.fields(model)
                  if getattr(model, f.name) is not f.default]
    else:
        values = list(vars(model).values())
    return [inspect.unwrap(v.func if isinstance(v, functools.partial) else v) for v in values if callable(v)]


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _module_name(fn: Callable) -> str:
    return getattr(fn, "__module__", None) or type(fn).__module__


def _modules(functions: list[Callable], top_level: str) -> tuple[set[str], dict[str, Callable]]:
    """Modules of `functions` and of the same-package functions/modules they reference, transitively;
    plus functions whose module has no source file (hashed by their own source). A callable object
    counts by its class's module."""
    modules: set[str] = set()
    loose: dict[str, Callable] = {}
    todo, seen = list(functions), set()
    while todo:
        fn = todo.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        module = sys.modules.get(_module_name(fn))
        if getattr(module, "__file__", None):
            modules.add(module.__name__)
        else:
            loose[f"{_module_name(fn)}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"] = fn
        if not isinstance(fn, types.FunctionType):
            continue
        for name in _global_names(fn.__code__):
            ref = fn.__globals__.get(name)
            if isinstance(ref, types.ModuleType) and _user_code(ref.__name__, top_level):
                modules.add(ref.__name__)
            elif isinstance(ref, types.FunctionType) and _user_code(ref.__module__, top_level):
                todo.append(ref)
    return modules, loose


def _imported(modules: set[str], top_level: str) -> set[str]:
    """`modules` and the modules of user code they import (read from their source), transitively: a constant
    the model takes from a ``constants.py`` is its code as much as a function is. RayTwin's own modules
    (the reference models') are pinned by RayTwin's version, not followed."""
    found, todo = set(modules), [m for m in modules if m.split(".")[0] not in CORE_PACKAGES]
    while todo:
        module = sys.modules[todo.pop()]
        for node in ast.walk(ast.parse(Path(module.__file__).read_bytes())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__) \
                    if node.level else node.module or ""
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]  # a submodule imported by name
            else:
                continue
            for name in names:
                if name not in found and getattr(sys.modules.get(name), "__file__", None) and \
                        _user_code(name, top_level):
                    found.add(name)
                    todo.append(name)
    return found


DATA_SUFFIXES = frozenset({".csv", ".tsv", ".txt", ".dat", ".json", ".yaml", ".yml", ".toml", ".ini", ".npy",
                           ".npz", ".parquet", ".feather", ".arrow", ".h5", ".hdf5", ".nc", ".mat", ".pkl",
                           ".pickle", ".bin", ".xml", ".fmu"})
"""Suffixes of the files a model reads numbers from: those a package's files are pinned by (a README, a notebook,
an editor's backup are no model's numbers, and a change to them must not stop its twins)."""
NOT_DATA_NAMES = frozenset({"README", "LICENSE", "LICENCE", "COPYING", "NOTICE", "CHANGELOG", "CHANGES", "HISTORY",
                            "AUTHORS", "CONTRIBUTING", "REQUIREMENTS"})


def _package_data(modules: set[str]) -> dict[str, str]:
    """The data files of the user packages `modules` belong to, by ``package/relative/path`` (see module doc);
    none for flat modules and RayTwin's own packages."""
    parts = {}
    for top in sorted({m.split(".")[0] for m in modules} - CORE_PACKAGES):
        roots = getattr(sys.modules.get(top), "__path__", None)
        for root in map(Path, roots or ()):
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root)
                hidden = any(p.startswith(".") or p == "__pycache__" for p in rel.parts)
                data = path.suffix.lower() in DATA_SUFFIXES and path.stem.upper() not in NOT_DATA_NAMES
                if data and not hidden and path.is_file():
                    stat = path.stat()
                    parts[f"{top}/{rel.as_posix()}"] = _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)
    return parts


@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's SHA-256, once per version of it in a process (a restarting shard re-identifies its models)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _user_code(module_name: str, top_level: str) -> bool:
    """Whether a module the model calls is part of its code: its own package's, or one outside the standard
    library, installed distributions and RayTwin (a helper module beside the model's)."""
    top = module_name.split(".")[0]
    if top == top_level:
        return True
    if top in CORE_PACKAGES or top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return False
    file = getattr(sys.modules.get(module_name), "__file__", None)
    return bool(file) and not str(Path(file).resolve()).startswith(_INSTALLED)


def _python_parts(model: Any) -> tuple[dict[str, str], str]:
    """The hashed parts of a Python model's code and its top-level package (see module doc)."""
    functions = _own_callables(model)
    if not functions:
        raise ModelCodeError(f"model {getattr(model, 'name', model)!r} has no functions to identify its code by")
    top_level = _module_name(functions[0]).split(".")[0]
    modules, loose = _modules(functions, top_level)
    modules = _imported(modules, top_level)
    parts = {name: hashlib.sha256(Path(sys.modules[name].__file__).read_bytes()).hexdigest() for name in modules}
    parts |= _package_data(modules)
    for name, fn in loose.items():
        try:
            parts[name] = hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
        except (OSError, TypeError):
            raise ModelCodeError(f"model {getattr(model, 'name', model)!r}: function {name} has no source to hash; "
                                 "define the model in a module (a .py file)") from None
    return parts, top_level


def python_code(model: Any) -> ModelCode:
    """The identity of a model written in Python: hashes of its modules' source files (see module doc)."""
    parts, top_level = _python_parts(model)
    distribution, dist_version = _distribution(top_level)
    return ModelCode(kind="python", distribution=distribution, version=dist_version, sha256=_digest(parts),
                     parts=parts)


def code_identity(model: Any) -> ModelCode:
    """The model's own ``code_identity()`` when it has one (an FMU), else `python_code`."""
    own = getattr(model, "code_identity", None)
    return own() if callable(own) else python_code(model)


def code_digest(model: Any) -> str:
    """``code_identity(model).sha256`` without finding the distribution that ships the code: that
    reads every installed distribution's file list (~0.6 s on the development VM, once per process),
    which a restarting twin shard should not wait for."""
    own = getattr(model, "code_identity", None)
    return own().sha256 if callable(own) else _digest(_python_parts(model)[0])


def describe_change(recorded: ModelCode, current: ModelCode) -> str:
    """What differs between two identities, e.g. ``module pumpkit.physics changed (registered: pumpkit 1.0.0,
    sha256 1f2e...; now: pumpkit 1.1.0, sha256 9a8b...)``."""
    changes = [f"{_noun(recorded, name)} {name} " + ("removed" if name not in current.parts else
                                                     "added" if name not in recorded.parts else "changed")
               for name in sorted(set(recorded.parts) | set(current.parts))
               if recorded.parts.get(name) != current.parts.get(name)]
    text = ", ".join(changes) or f"{recorded.kind} code replaced by {current.kind} code"
    return f"{text} (registered: {recorded.describe()}; now: {current.describe()})"


def _noun(code: ModelCode, part: str) -> str:
    """A part of Python code is a module (dotted name) or a package's data file (``package/path``)."""
    return "module" if code.kind == "python" and "/" not in part else "file"


def model_runtime_env(models: Iterable[Any]) -> dict[str, list[str]]:
    """Ray ``runtime_env`` entries that give workers the models' code: ``py_modules`` for code outside any
    installed distribution (its top-level package directory, or the module file), ``pip`` for installed
    distributions other than RayTwin (pinned to the installed version). Empty entries are left out."""
    py_modules: list[str] = []
    pip: list[str] = []
    for model in models:
        code = code_identity(model)
        if code.kind != "python":
            continue
        own = _module_name(_own_callables(model)[0]).split(".")[0]
        helpers = sorted({name.split(".")[0] for name in code.parts if name in sys.modules} - {own})  # beside it
        if code.distribution is not None and code.distribution != CORE_DISTRIBUTION and \
                (req := f"{code.distribution}=={code.version}") not in pip:
            pip.append(req)
        for top in ([own] if code.distribution is None else []) + helpers:
            module = sys.modules[top]
            path = str(Path(module.__file__).parent if hasattr(module, "__path__") else Path(module.__file__))
            if path not in py_modules:
                py_modules.append(path)
    return {key: value for key, value in (("py_modules", py_modules), ("pip", pip)) if value}
