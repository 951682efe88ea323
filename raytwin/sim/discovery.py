"""Finding models: Python entry points (group ``raytwin.models``) and import paths (``pkg.mod:MODEL``).

A package makes its models known by declaring them in its ``pyproject.toml``::

    [project.entry-points."raytwin.models"]
    pump = "acme_models.pump:PUMP"

and once it is installed, ``get_model("pump")`` finds it; ``get_model("acme_models.pump:PUMP")``
imports a model that is not declared anywhere (a module on ``sys.path``), and
``get_model("s3://bucket/models/fmus/<sha256>.fmu")`` opens an FMU stored by `raytwin.fmu.store_fmu`
(fetched from any fsspec URL and refused unless its SHA-256 is the one in its name). RayTwin's reference models
are declared the same way in RayTwin's own ``pyproject.toml``; a source tree that is not installed,
or was installed before its entry points changed, reads them from that file instead, so a fresh
checkout resolves them too.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import posixpath
import re
import sys
import sysconfig
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raytwin.sim.model import DeclarationError, Model, ModelCheckError
from raytwin.storage import scrub_locations

if TYPE_CHECKING:
    from raytwin.fmu.describe import FmuModel

log = logging.getLogger("raytwin.sim")
GROUP = "raytwin.models"
FMU_REF = re.compile(r"^\S+/(?P<sha256>[0-9a-f]{64})\.fmu$")
"""A stored FMU (``<store>/fmus/<sha256>.fmu``, a path or fsspec URL): a simulator reference too."""
_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


class UnknownModelError(KeyError, ValueError):
    """No model under that name or path (a ValueError too, so pydantic reports it as a validation error)."""

    def __str__(self) -> str:
        return str(self.args[0])


def declared() -> dict[str, str]:
    """Model name -> import path of every model declared in the ``raytwin.models`` entry-point group
    (installed distributions, then this source tree's ``pyproject.toml`` for names still missing)."""
    found = {ep.name: ep.value for ep in entry_points(group=GROUP)}
    return {**_source_tree_models(), **found}


@cache
def _source_tree_models() -> dict[str, str]:
    """RayTwin's own declaration when it runs from a source tree (no file in an installed wheel)."""
    if not _PYPROJECT.is_file():
        return {}
    project = tomllib.loads(_PYPROJECT.read_text()).get("project", {})
    if project.get("name") != "raytwin":
        return {}
    return dict(project.get("entry-points", {}).get(GROUP, {}))


IMPORT_CHECK: ContextVar[Callable[[str, str], None] | None] = ContextVar("raytwin_import_check", default=None)
"""Called as `check(ref, package)` before `get_model` resolves an import path `ref` naming `package`
(`imported_package`), in this context only: a server's allow-list for the request whose body it validates
(`serve_apps.model_packages`), which raises to refuse the package before anything of it is imported. None: any."""
TENANT_FMU_ROOT: ContextVar[str | None] = ContextVar("raytwin_tenant_fmu_root", default=None)
"""The registry (URL or path) whose stored FMUs `get_model` may open, in this context only: a server's caller's
tenant's registry (`serve_apps.model_packages`), as `restrict_fmu_sources` holds every tenant's registries. None:
those roots."""
_LOADED: dict[str, Model | FmuModel] = {}
_REFS: dict[int, str] = {}
_FMU_ROOTS: tuple[tuple[str, str], ...] | None = None


def restrict_fmu_sources(roots: Sequence[str]) -> None:
    """Fetch FMUs only from under `roots` (URLs or paths) in this process.

    A library user may open an FMU from anywhere; a server must not: validating a request's asset
    type resolves its simulator, so without this an FMU reference in a request body would make the
    server fetch any URL it names (server-side request forgery). The HTTP API's ingress replicas,
    which parse requests, call this with their store's registry at start-up; it holds for the whole
    process, so a library user never calls it."""
    global _FMU_ROOTS
    _FMU_ROOTS = tuple(_split_url(root) for root in roots)


def _split_url(url: str) -> tuple[str, str]:
    """(protocol, normalised path): ``..`` cannot climb out of a root, ``file://`` is the local disk."""
    protocol, sep, path = url.partition("://")
    if not sep:
        protocol, path = "file", os.path.abspath(url)
    return protocol, posixpath.normpath("/" + path).rstrip("/") + "/"


def _check_fmu_source(url: str) -> None:
    """Refuse an FMU outside the roots this context may open: a request's tenant's registry (another tenant's FMU,
    named by its URL, was opened to validate the request, and its variables and units were told in the answer), else
    the process's."""
    tenant_root = TENANT_FMU_ROOT.get()
    roots = _FMU_ROOTS if tenant_root is None else (_split_url(tenant_root),)
    if roots is None:
        return
    protocol, path = _split_url(url)
    if not any(protocol == p and path.startswith(root) for p, root in roots):
        where = "" if tenant_root is None else ", under your tenant's"
        raise UnknownModelError(f"simulator {url}: this server opens only FMUs stored in its registry{where}; store "
                                "the FMU there (raytwin.fmu.store_fmu) and use the URL it returns")


def imported_package(ref: str) -> str | None:
    """The top-level package that resolving `ref` imports because `ref` names it (``acme_models`` for
    ``acme_models.pump:PUMP``); None for a declared model's name or a stored FMU, whose code the operator installed.
    Resolving imports the module and runs its code: a server checks this against the packages it allows (the
    caller's, `serve_apps.model_packages`, through `IMPORT_CHECK`) before anything is imported."""
    if not isinstance(ref, str) or FMU_REF.match(ref) or ":" not in ref:
        return None
    return _top_level(ref)


def declared_packages() -> frozenset[str]:
    """The top-level packages of the declared models (``raytwin`` for its reference models): installed and
    declared by the operator to be run, so their import paths are as safe as their names."""
    return frozenset(_top_level(path) for path in declared().values())


def _top_level(path: str) -> str:
    return path.partition(":")[0].split(".")[0]


def simulator_label(ref: str) -> str:
    """A metric tag for the simulator `ref`: a declared model's name (installed by the operator: a bounded set),
    else ``fmu`` or ``custom`` (an import path). Never the reference itself: an FMU's URL or a tenant's import
    path is theirs to choose, and each new one would be a new series."""
    if FMU_REF.match(ref):
        return "fmu"
    return ref if ref in declared() else "custom"


def get_model(ref: str) -> Model | FmuModel:
    """The model declared under the name `ref`, at the import path ``package.module:ATTR``, or the
    FMU stored at `ref` (`FMU_REF`). The one place a simulator reference becomes a model object."""
    if not isinstance(ref, str) or not ref:
        raise UnknownModelError(f"a model reference is a name, package.module:ATTR or a stored FMU's URL, got {ref!r}")
    if match := FMU_REF.match(ref):
        _check_fmu_source(ref)  # before the cache too: a server's restriction holds for every request
    elif (check := IMPORT_CHECK.get()) is not None and (package := imported_package(ref)) is not None:
        check(ref, package)  # before the cache too: another tenant's import may have loaded it
    if ref in _LOADED:
        return _LOADED[ref]
    if match:
        model = _load_fmu(ref, match["sha256"])
    elif ":" in ref:
        model = load_model(ref)
    else:
        paths = declared()
        if ref not in paths:
            fmu = ref.lower().endswith(".fmu")  # a file: it reads as a simulator only once stored, under its hash
            raise UnknownModelError(f"unknown simulator {ref!r}; known: {sorted(paths)} " + (
                "(an FMU file: store it with raytwin.fmu.store_fmu(path, registry_url) and give the URL it returns, "
                ".../fmus/<sha256>.fmu; raytwin/fmu/README.md)" if fmu else
                "(or give an import path package.module:MODEL)"))
        model = load_model(paths[ref], expected_name=ref)
    _LOADED[ref] = model
    _REFS.setdefault(id(model), ref)
    return model


def _load_fmu(url: str, sha256: str) -> FmuModel:
    """The FMU stored at `url`; one it cannot be is an unknown simulator, but the store failing its read
    (`StoreIOError`: a 503) or this machine's disk filling up (`FmuCacheFull`) is no fault of the reference."""
    from raytwin.fmu.describe import FmuCacheFull, FmuError, FmuModel
    from raytwin.store_failures import StoreIOError

    try:
        return FmuModel.load(url, expected_hash=sha256)
    except (StoreIOError, FmuCacheFull):
        raise
    except (FmuError, OSError) as exc:
        raise UnknownModelError(f"simulator {url}: {exc}") from None


IMPORTABLE = ("install its package where the model runs: for `raytwin serve`, where its Serve replicas and Ray workers "
              "run (they import installed packages and the PYTHONPATH `raytwin serve` was started with; with "
              "--address, the cluster nodes' packages), or ship it with Ray's runtime_env "
              "(`raytwin.modelcode.model_runtime_env`; on a cluster: cluster/README.md, \"Model code on the cluster\")")
"""How to make a model module importable, said where it is not: the process that failed may be a server's replica,
not the machine where the model was written and tested."""


def load_model(path: str, *, expected_name: str | None = None) -> Model:
    """Import the `Model` at ``package.module:ATTR`` (ATTR may be dotted); one-line errors (a declaration
    refused while the module runs: `ModelCheckError` naming `path`, as the model has no name yet)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UnknownModelError(f"model path {path!r} must look like package.module:MODEL")
    if _python_own(module_name):
        raise UnknownModelError(f"model path {path!r}: {module_name} is part of Python itself, not a model package; "
                                f"name a model of an installed package or a module of your own ({IMPORTABLE})")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownModelError(f"model path {path!r}: cannot import {module_name}: {_unplaced(path, exc)}; "
                                f"{IMPORTABLE}") from None
    except DeclarationError as exc:  # a Param or variable refused while the module built the model
        raise ModelCheckError(path, exc.field, exc.reason) from None
    except SyntaxError as exc:
        _unplaced(path, exc)
        raise UnknownModelError(f"model path {path!r}: {module_name} does not parse: {exc.msg} "
                                f"({os.path.basename(exc.filename or '?')}, line {exc.lineno})") from None
    except Exception as exc:  # noqa: BLE001 - the module failed while it ran: say where, in one line
        raise UnknownModelError(f"model path {path!r}: importing {module_name} raised "
                                f"{type(exc).__name__}: {_unplaced(path, exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UnknownModelError(f"model path {path!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Model):
        raise UnknownModelError(f"model path {path!r} is a {type(obj).__name__}, not a raytwin Model")
    if expected_name is not None and obj.name != expected_name:
        raise UnknownModelError(f"entry point {expected_name!r} ({path}) loads a model named {obj.name!r}")
    return obj


def _unplaced(path: str, exc: BaseException) -> str:
    """`exc`'s text without absolute paths or URLs, which the error of a server's request must not show (where the
    server's files and packages lie: a server validates a request's import path); logged with them, for whoever
    runs the process."""
    log.warning("event=model_import_failed path=%s error=%s: %s", path, type(exc).__name__,
                f"{exc} ({exc.filename}, line {exc.lineno})" if isinstance(exc, SyntaxError) else exc)
    return scrub_locations(str(exc))


def _python_own(module_name: str) -> bool:
    """Whether `module_name` is Python's own (standard library, built in or frozen, or its `test` package), found
    without running it. No model lives there, and an asset type's simulator is imported where a request is
    validated: `this` printed into the server's log; `antigravity` would open a browser and `test.autotest` run
    CPython's whole test suite inside the API's replica, for any tenant's admin key."""
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return True
    try:
        spec = importlib.util.find_spec(top)  # a top-level module: found, not run
    except (ImportError, ValueError):
        return False  # importing it fails too, with the message that says why
    if spec is None:
        return False
    if spec.origin in ("built-in", "frozen"):
        return True
    where = os.path.realpath(spec.origin or next(iter(spec.submodule_search_locations or ()), ""))
    paths = sysconfig.get_paths()
    installed = {os.path.realpath(paths[k]) for k in ("purelib", "platlib")}
    stdlib = os.path.realpath(paths["stdlib"])
    return where.startswith(stdlib + os.sep) and not any(where.startswith(p + os.sep) for p in installed)


def model_ref(model: Any) -> str:
    """How to find `model` again (what an `AssetType` stores as its simulator): a model's own
    ``ref`` (a stored FMU's URL), its declared name, else the import path it was loaded from, else
    the path of a module attribute that holds it."""
    if id(model) in _REFS:
        return _REFS[id(model)]
    if not isinstance(model, Model):
        return model.ref
    paths = declared()
    if model.name in paths and get_model(model.name) is model:
        return model.name
    script = sys.modules.get("__main__")
    for module_name, module in list(sys.modules.items()):
        if module is script:  # also as `__mp_main__` (multiprocessing, imported with Ray): no path imports it
            continue
        for attr, value in list(getattr(module, "__dict__", {}).items()):
            if value is model:
                ref = f"{module_name}:{attr}"
                _REFS[id(model)] = ref
                _LOADED[ref] = model
                return ref
    raise UnknownModelError(f"model {model.name} is neither declared (entry point group {GROUP}) nor an attribute "
                            "of an importable module (a script's own names are not: workers cannot import it); "
                            "define it at module level of a module on the path, or declare it")


class Catalog(Mapping[str, Model]):
    """The declared models by name, loaded on first access (`raytwin.sim.MODELS`)."""

    def __getitem__(self, name: str) -> Model:
        if name not in declared():
            raise KeyError(name)
        return get_model(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(declared()))

    def __len__(self) -> int:
        return len(declared())

    def __contains__(self, name: object) -> bool:
        return name in declared()


MODELS = Catalog()
"""The declared models by name (entry-point group ``raytwin.models``), loaded on first access."""
