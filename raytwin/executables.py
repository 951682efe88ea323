"""Compiled filter kernels kept on disk, so that a restarted process loads them instead of making them again.

JAX's persistent compilation cache saves a restarted process the XLA compile, but it still traces and
lowers every kernel to find the cache entry: on the 2-core development machine that was ~95 % of a
restarted twin shard's recovery (~1.5 s per model for the three run lengths, against ~0.3 s to load
the same executables serialized; benchmarks/RESULTS.md, *Failover*). `StoredKernel` keeps each
executable the first real compile made under `DIR_ENV` and loads it in later processes without tracing.

Skipping the trace means nothing checks that the code is still the code that was compiled, so an
entry is used only under the same key: the kernel's identity (`kernel_identity`: which filter, the
model's code identity from `raytwin.modelcode` and the model object's value), RayTwin's own source,
the installed distributions and their versions, the JAX and jaxlib versions, the backend and its
devices, ``XLA_FLAGS``, the CPU count the backend splits loops for (`raytwin.sim.cpu.backend_cpu_count`),
and per call the static arguments and the argument shapes and dtypes. A model whose traced code depends on
anything else (a file it reads, an environment variable, local code outside its own package and outside any
installed distribution) must not use the store: leave `DIR_ENV` unset for its processes. Entries hold native
code, like JAX's cache: the directory must be writable only by the service's own user.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import sys
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jax
from jax.experimental.serialize_executable import deserialize_and_load, serialize

from raytwin.modelcode import ModelCodeError, code_digest
from raytwin.sim.cpu import backend_cpu_count

log = logging.getLogger("raytwin.executables")

DIR_ENV = "RAYTWIN_EXECUTABLES_DIR"
"""Where processes keep and find serialized kernels (`actors.failover` sets it for twin shards);
unset or empty: kernels are traced and compiled as usual."""

MAX_STORE_BYTES = 1 << 30
"""The store's size bound: past it, the entries used least recently are removed (an entry is ~0.6 MB
for a small model's kernel; every RayTwin or model upgrade starts new ones)."""

_UNSERIALIZABLE = "unserializable"
"""An entry's payload for a kernel JAX cannot serialize (e.g. one calling back into Python, an FMU's):
later processes go straight to `jax.jit` instead of compiling once more to find out."""


_counts = {"loaded": 0, "compiled": 0, "not_storable": 0}


def kernel_counts() -> dict[str, int]:
    """Kernels this process loaded from its store, compiled (and stored), or found not storable: a
    restarted shard's start-up log says whether its store served it."""
    return dict(_counts)


def stored_kernels_dir() -> Path | None:
    """This process's store of serialized kernels (`DIR_ENV`), None when it has none."""
    return Path(os.environ[DIR_ENV]) if os.environ.get(DIR_ENV) else None


def kernel_identity(kind: str, model: Any, *parts: Any) -> str | None:
    """A digest of what a model's kernel is traced from: the filter `kind`, the model's code
    identity, and the model object (with the other `parts`, e.g. a UKF's dynamics) as pickled.
    None when one of them cannot be identified (a model defined interactively, an object that does
    not pickle): such kernels are never stored."""
    try:
        code = code_digest(model)
        value = pickle.dumps((model, *parts), protocol=5)
    except (ModelCodeError, pickle.PicklingError, TypeError, AttributeError):
        return None
    return hashlib.sha256(b"\0".join([kind.encode(), code.encode(), value])).hexdigest()


@cache
def _environment() -> str:
    """What every entry of this process depends on besides its kernel (see module docstring)."""
    package = Path(__file__).parent
    source = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        source.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    # distributions by their metadata directories' names (``name-version.dist-info``): reading every
    # METADATA file through importlib.metadata took ~0.2 s, this a few milliseconds
    installed = sorted({entry.name for folder in map(Path, sys.path) if folder.is_dir()
                        for entry in os.scandir(folder) if entry.name.endswith((".dist-info", ".egg-info"))})
    backend = jax.devices()[0].client
    return "\n".join([
        f"raytwin {source.hexdigest()}", f"jax {jax.__version__} jaxlib {jax.lib.__version__}",
        f"backend {backend.platform} {backend.platform_version}",
        f"devices {sorted({d.device_kind for d in jax.devices()})}", f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')}",
        f"loops split for {backend_cpu_count()} CPUs",
        *installed])


class StoredKernel:
    """`jitted` (a `jax.jit` function) called through executables stored under `directory` by `identity`.

    The first call with new static arguments or argument shapes loads that executable if a process
    stored it before, else compiles it for real and stores it; later calls go straight to it.
    Results are bit-identical to `jitted`'s (the same executable). Arguments must be arrays.
    """

    def __init__(self, jitted: Callable[..., Any], identity: str, directory: Path) -> None:
        self.jitted, self.identity, self.directory = jitted, identity, directory
        self._executables: dict[tuple, Callable[..., Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **static: Any) -> Any:
        key = (tuple(static.items()), tuple((a.shape, a.dtype) for a in args))
        executable = self._executables.get(key)
        if executable is not None:
            return executable(*args)
        with self._lock:
            executable = self._executables.get(key)  # another thread may have loaded it meanwhile
            return executable(*args) if executable is not None else self._first_call(key, args, static)

    def _first_call(self, key: tuple, args: tuple, static: dict[str, Any]) -> Any:
        """Find (or make and store) the executable for `key`, keep it for the next calls and call it.
        A loaded executable that fails its first call (e.g. one stored without its code, see
        `_real_compile`) is dropped with its entry, and the kernel compiled again."""
        text = f"{self.identity}\n{key!r}\n{_environment()}"
        path = self.directory / f"{hashlib.sha256(text.encode()).hexdigest()}.xla"
        loaded = self._load(path, text)
        if loaded is not None and not isinstance(loaded, str):
            try:
                result = loaded(*args)
            except jax.errors.JaxRuntimeError as exc:
                log.warning("event=stored_kernel_unusable path=%s error=%r", path, exc)
                path.unlink(missing_ok=True)
                loaded = None
            else:
                self._executables[key] = loaded
                _counts["loaded"] += 1
                return result
        if loaded is None:
            loaded = self._compile_and_store(path, text, args, static)
        executable = (lambda *a: self.jitted(*a, **static)) if isinstance(loaded, str) else loaded
        self._executables[key] = executable
        return executable(*args)

    def _compile_and_store(self, path: Path, text: str, args: tuple, static: dict[str, Any]) -> Any:
        """A real compile of the kernel for these arguments, stored (or `_UNSERIALIZABLE`, also stored:
        a kernel calling back into Python runs through plain `jax.jit`, with JAX's own caches)."""
        compiled = _real_compile(self.jitted.lower(*args, **static))
        try:
            payload: Any = serialize(compiled)
        except (ValueError, NotImplementedError, pickle.PicklingError, AttributeError, TypeError) as exc:
            log.info("event=kernel_not_storable identity=%s reason=%r", self.identity[:12], exc)
            self._store(path, text, _UNSERIALIZABLE)
            _counts["not_storable"] += 1
            return _UNSERIALIZABLE
        self._store(path, text, payload)
        _counts["compiled"] += 1
        return compiled

    def _load(self, path: Path, text: str) -> Any:
        """The entry's executable (or `_UNSERIALIZABLE`); None when there is none or it is unusable."""
        try:
            with open(path, "rb") as f:
                stored_text, payload = pickle.load(f)
            if stored_text != text:
                raise ValueError("entry written for another key")
            os.utime(path)  # used now: the last to be evicted
            return payload if isinstance(payload, str) else deserialize_and_load(*payload)
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - a damaged entry is replaced, whatever broke it
            log.warning("event=stored_kernel_unusable path=%s error=%r", path, exc)
            return None

    def _store(self, path: Path, text: str, payload: Any) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
            with open(partial, "wb") as f:
                pickle.dump((text, payload), f, protocol=5)
            os.replace(partial, path)  # readers see the whole entry or none
            _evict(self.directory, MAX_STORE_BYTES)
        except OSError as exc:
            log.warning("event=stored_kernel_not_written path=%s error=%r", path, exc)


def _evict(directory: Path, max_bytes: int) -> None:
    """Remove the least recently used entries until the store holds at most `max_bytes`."""
    entries = []
    for entry in os.scandir(directory):
        try:
            stat = entry.stat()
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        entries.append((stat.st_mtime_ns, stat.st_size, entry.path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        Path(path).unlink(missing_ok=True)
        total -= size


def _real_compile(lowered: Any) -> Any:
    """`lowered.compile()`, never answered from JAX's persistent compilation cache: an executable
    loaded from there serializes without its code (the reloaded copy fails when called: "NOT_FOUND:
    Function ... not found"). A compile option that only embeds the program in the executable gives
    the compile a cache key of its own, and entries are not written to JAX's cache meanwhile, so that
    key never gets one either."""
    limit = jax.config.jax_persistent_cache_min_entry_size_bytes
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 2**62)
    try:
        return lowered.compile(compiler_options={"xla_embed_ir_in_executable": True})
    finally:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", limit)
