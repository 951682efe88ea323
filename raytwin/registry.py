"""Model registry: simulator + parameter sets under a name and semantic version.

Artifacts are content-addressed: the JSON body is stored once under its SHA-256 and each
``name@version`` points at a hash. Fetching ``name@version`` returns the identical artifact;
registering the same content again is a no-op; registering *different* content under an existing
version is refused (publish a new version instead). Works on a local directory or any fsspec URL.

An artifact pins its simulator's code (`raytwin.modelcode`: distribution, version, content hash);
`get` refuses an artifact whose code has changed since it was registered, unless told to accept it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from pydantic import Field

from raytwin.audit import os_identity
from raytwin.contracts import DEFAULT_TELEMETRY_POLICY, AssetType, Contract, Finite, Identifier, SemVer
from raytwin.modelcode import ModelCode, code_identity, describe_change
from raytwin.sim import ModelCheckError, get_model
from raytwin.sim.discovery import FMU_REF
from raytwin.sim.model import Declared
from raytwin.storage import canonical_json, filesystem, replace_file, write_once
from raytwin.store_failures import store_io


log = logging.getLogger("raytwin.registry")
ALLOW_CODE_CHANGE_ENV = "RAYTWIN_ALLOW_MODEL_CODE_CHANGE"
"""Set to 1 to resolve artifacts whose model code changed (the default of `ModelRegistry.get`'s override)."""


class RegistryError(ValueError):
    """A refused registration or an unknown model reference. The message never names where the
    registry lies (the HTTP API answers with it); `registry_url` does, for logs and the CLI."""

    def __init__(self, message: str, registry_url: str | None = None):
        super().__init__(message)
        self.registry_url = registry_url

    def located(self) -> str:
        """The message and where the registry lies, for a caller who may see it (the CLI, a rerun; not the API)."""
        return f"{self} (registry {self.registry_url})" if self.registry_url else str(self)


class VersionConflict(RegistryError):
    """``name@version`` is registered with other content. `differences` say what makes it another model
    (parameter values, the asset type, the simulator's code); empty when only the metadata differs (who
    published it, what it was fitted on): the same model, which a caller may take as it is."""

    def __init__(self, message: str, differences: tuple[str, ...] = (), existing: ModelArtifact | None = None,
                 registry_url: str | None = None):
        super().__init__(message, registry_url)
        self.differences = differences
        self.existing = existing


class ModelCodeChanged(RegistryError):
    """An artifact whose simulator's code differs from the code it was registered with. `what` is the change
    without the advice, which the HTTP API gives in its own terms (a Python caller's `get` flag means nothing there).
    """

    def __init__(self, message: str, what: str = "", registry_url: str | None = None):
        super().__init__(message, registry_url)
        self.what = what or message


PUBLISHED_BY = "published_by"
"""Artifact metadata: who published the version's content (an API key id); the four-eyes rule keeps them
from approving it (`raytwin.lifecycle`)."""
PUBLISHER_UNVERIFIED = "published_by_verified"
"""Artifact metadata of a version published outside the API (an offline calibration's ``registered_by``): ``false``,
for `PUBLISHED_BY` is then an identity its caller declared, which nothing checked. Beside it `PUBLISHED_VIA` (how),
`PUBLISHED_OS_USER` and `PUBLISHED_HOST` (what the machine said); `publisher_offline` writes all four. A version
without it was published through the API, its publisher the key's principal."""
PUBLISHED_VIA = "published_via"
PUBLISHED_OS_USER = "published_os_user"
PUBLISHED_HOST = "published_host"
POLICY_SET_BY = "policy_set_by"
"""Artifact metadata of a drift recalibration's candidate: who set the recalibration policy it was fitted under
(an API key id; it chose the free parameters, the noise and the window). The four-eyes rule keeps them from
approving it (`raytwin.lifecycle`), as it keeps a publisher."""
JOB_KEY = "recalibration_job"
"""Artifact metadata of a drift recalibration's candidate: the trigger group's job key. Such a candidate without
`POLICY_SET_BY` was fitted under a policy stored before its setter was kept: no approver may promote it."""


def publisher_offline(declared: str, via: str) -> dict[str, str]:
    """The metadata naming the publisher of a version registered outside the API (`via`, e.g. ``offline-calibration``):
    the `declared` id (which the four-eyes rule keeps from approving it, as a key's), marked unverified, beside the OS
    user and host that ran it (`PUBLISHER_UNVERIFIED`)."""
    machine = os_identity()
    return {PUBLISHED_BY: declared, PUBLISHER_UNVERIFIED: "false", PUBLISHED_VIA: via,
            PUBLISHED_OS_USER: machine["os_user"], PUBLISHED_HOST: machine["host"]}


def describe_publisher(metadata: dict[str, str]) -> str | None:
    """Who published a version, as far as it is known: the key's principal, or a declared identity marked unverified
    with how and where it was declared (None: no publisher recorded)."""
    who = metadata.get(PUBLISHED_BY)
    if who is None or metadata.get(PUBLISHER_UNVERIFIED) != "false":
        return who
    return (f"{who} (declared to the {metadata.get(PUBLISHED_VIA, 'offline tools')}, unverified; run by OS user "
            f"{metadata.get(PUBLISHED_OS_USER, '?')} on host {metadata.get(PUBLISHED_HOST, '?')})")


class ModelArtifact(Contract):
    """What a registered model is: its asset type (with the simulator) and parameter values."""

    name: Identifier
    version: SemVer
    asset_type: AssetType
    parameters: dict[str, Finite]
    metadata: dict[str, str] = Field(default_factory=dict)
    code: ModelCode | None = Field(
        default=None, description="The simulator's code when registered; None in artifacts from before code pinning."
    )

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def body(self) -> bytes:
        """The stored JSON; an artifact without `code` keeps the exact bytes (and hash) it had before pinning,
        and one whose type has the default `telemetry_policy` those it had before that field."""
        body = self.model_dump(mode="json", exclude={"code"} if self.code is None else None)
        if self.asset_type.telemetry_policy == DEFAULT_TELEMETRY_POLICY:  # types from before the field: same hash
            del body["asset_type"]["telemetry_policy"]
        return canonical_json(body)

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.body()).hexdigest()

    def code_change(self) -> str | None:
        """How the simulator's code now differs from the pinned code; None when it is the same (or unpinned)."""
        if self.code is None:
            return None
        current = code_identity(self.model())
        if current.sha256 == self.code.sha256 or (current.kind == self.code.kind == "python" and all(
                current.parts.get(name) == digest for name, digest in self.code.parts.items())):
            return None  # every part it pinned is unchanged (a newer RayTwin may pin more: helpers, imports)
        return describe_change(self.code, current)

    def model(self) -> Declared:
        """The simulator: a JAX `raytwin.sim.Model`, or an `raytwin.fmu.FmuModel` for a stored FMU."""
        return get_model(self.asset_type.simulator)

    def param_vector(self) -> list[float]:
        return self.model().param_vector(self.parameters)


def model_differences(registered: ModelArtifact, new: ModelArtifact) -> list[str]:
    """What makes `new` another model than `registered` (the same ``name@version``), for messages that say
    what to change: each parameter value, the asset type's other declarations, the simulator's code.
    Metadata is not the model, nor are the type's default values: the parameters are what runs."""
    out = [f"parameter {n}: registered {registered.parameters.get(n)}, new {new.parameters.get(n)}"
           for n in sorted(set(registered.parameters) | set(new.parameters))
           if registered.parameters.get(n) != new.parameters.get(n)]
    fields = declared_differences(registered.asset_type, new.asset_type)
    if fields:
        out.append(f"the asset type differs at {', '.join(fields[:DIFFERENCES_SHOWN])}"
                   + (f" and {len(fields) - DIFFERENCES_SHOWN} more" if len(fields) > DIFFERENCES_SHOWN else ""))
    if (change := registered.code_change()) is not None:
        out.append(f"the model code changed: {change}")
    return out


DIFFERENCES_SHOWN = 8
"""Fields of an asset type named in a conflict's message (the rest counted)."""


def declared_differences(a: AssetType, b: AssetType) -> list[str]:
    """The dotted paths (``parameters.C.upper``) where two asset types differ, but for their parameters'
    default values."""
    def declared(t: AssetType) -> dict[str, Any]:
        body = t.model_dump(mode="json")
        for spec in body["parameters"].values():
            del spec["default"]
        return body

    return list(_differing(declared(a), declared(b)))


def _differing(a: Any, b: Any, where: str = "") -> Iterator[str]:
    """The dotted paths where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _differing(a.get(key), b.get(key), f"{where}.{key}" if where else key)
    elif a != b:
        yield where or "(the whole type)"


def parse_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition("@")
    if not sep or not name or not version:
        raise RegistryError(f"model reference {ref!r} must look like name@1.2.3")
    return name, version


class ModelRegistry:
    """A registry rooted at `url` (directory or fsspec URL such as ``s3://bucket/models``)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.fs, self.root = filesystem(url, storage_options)

    def _blob(self, digest: str) -> str:
        return f"{self.root}/blobs/sha256/{digest}.json"

    def _pointer(self, name: str, version: str) -> str:
        return f"{self.root}/models/{name}/{version}.json"

    def register(
        self,
        name: str,
        version: str,
        asset_type: AssetType,
        parameters: dict[str, float] | None = None,
        metadata: dict[str, str] | None = None,
        *,
        allow_unstable: bool = False,
    ) -> ModelArtifact:
        """Store an artifact; parameters not given take the asset type's declared defaults (a published
        type's values are what its version runs, not the simulator's typical ones). The simulator must
        pass its registration check (a JAX model: `check_model` and an RK4-stable default step at
        these parameter values, ``allow_unstable=True``: a loud warning instead; an FMU: a probe run)."""
        self.check_fmu_store(f"{name}@{version}", asset_type.simulator)
        try:
            asset_type.check_units()
        except ValueError as exc:
            raise RegistryError(f"{name}@{version}: {exc}") from None
        model = get_model(asset_type.simulator)
        declared = {n: p.default for n, p in asset_type.parameters.items()}
        try:
            params = dict(zip(model.param_names, model.param_vector({**declared, **(parameters or {})})))
        except KeyError as exc:  # an unknown parameter name: a refused registration like a value out of bounds
            raise RegistryError(f"{name}@{version}: {exc.args[0]}") from None
        for pname, value in params.items():
            spec = asset_type.parameters[pname]
            if not spec.lower <= value <= spec.upper:
                raise RegistryError(f"{name}@{version}: parameter {pname}={value} outside [{spec.lower}, {spec.upper}]")
        try:
            model.check_registration(list(params.values()), allow_unstable=allow_unstable)
        except ModelCheckError as exc:
            raise RegistryError(f"{name}@{version}: {exc}") from None
        artifact = ModelArtifact(
            name=name, version=version, asset_type=asset_type, parameters=params, metadata=metadata or {},
            code=code_identity(model),
        )
        self._store(artifact)
        return artifact

    @store_io("write")
    def _store(self, artifact: ModelArtifact) -> None:
        """Write a checked `artifact` (nothing if this version holds it already; `VersionConflict` if it holds
        other content). The version's pointer is created exclusively: of two registrations of one version racing
        (a drift recalibration's and a tenant's, two processes), the second is refused, not written over the first."""
        name, version, digest = artifact.name, artifact.version, artifact.content_hash
        pointer = self._pointer(name, version)
        if not self.fs.exists(pointer):
            replace_file(self.fs, self._blob(digest), artifact.body())  # whole before the pointer names it
            try:
                write_once(self.fs, pointer, canonical_json({"name": name, "version": version, "sha256": digest}))
                return
            except FileExistsError:  # registered since the check: as if it had been there before
                pass
        existing = json.loads(self.fs.cat_file(pointer))["sha256"]
        if existing != digest:
            registered = self._read(name, version, existing)
            differences = model_differences(registered, artifact)
            raise VersionConflict(
                f"{name}@{version} is already registered with different content "
                f"(sha256 {existing[:12]}..., new {digest[:12]}...): "
                + ("; ".join(differences) if differences else "its metadata differs")
                + "; register a new version", tuple(differences), registered)

    def check_fmu_store(self, ref: str, simulator: str) -> None:
        """An FMU is native code: a registry pins only FMUs stored with it (``<registry>/fmus/``, where
        `raytwin.fmu.store_fmu` puts them), never one fetched from wherever an asset type points."""
        if not FMU_REF.match(simulator):
            return
        fs, path = filesystem(simulator)
        # `..` would climb out of `fmus/` into another registry (another tenant's FMUs) while the prefix matches
        if fs.protocol != self.fs.protocol or ".." in path.split("/") or not path.startswith(f"{self.root}/fmus/"):
            raise RegistryError(f"{ref}: FMU {simulator} is not stored in this registry; store it first with "
                                "raytwin.fmu.store_fmu(path, registry_url) and use the model it returns", self.url)

    @store_io("read")
    def _read(self, name: str, version: str, digest: str) -> ModelArtifact:
        artifact = ModelArtifact.model_validate_json(self.fs.cat_file(self._blob(digest)))
        if artifact.content_hash != digest:
            raise RegistryError(
                f"{name}@{version}: stored artifact does not match its hash {digest} (corrupted store?)"
            )
        return artifact

    @store_io("write")
    def remove(self, ref: str) -> None:
        """Delete ``name@version`` (retention, `raytwin.lifecycle`); its blob goes too unless another version
        shares the content. Callers decide what may go: the registry does not know what references it.
        Concurrent removals (two prunes) may meet: a pointer or blob another removed first is gone already."""
        name, version = parse_ref(ref)
        pointer = self._pointer(name, version)
        try:
            digest = json.loads(self.fs.cat_file(pointer))["sha256"]
            self.fs.rm(pointer)
        except FileNotFoundError:
            raise RegistryError(f"no model {ref} in this registry", self.url) from None
        shared = any(self._digest(n, v) == digest for n in self.names() for v in self.versions(n))
        if not shared:
            try:
                self.fs.rm(self._blob(digest))
            except FileNotFoundError:
                pass  # removed by a concurrent removal of a version sharing it
        log.info("event=model_removed ref=%s blob_removed=%s", ref, not shared)

    @store_io("read")
    def _digest(self, name: str, version: str) -> str | None:
        """The content hash ``name@version`` points to (None: removed meanwhile)."""
        try:
            return json.loads(self.fs.cat_file(self._pointer(name, version)))["sha256"]
        except FileNotFoundError:
            return None

    def get(self, ref: str, *, allow_code_change: bool | None = None) -> ModelArtifact:
        """The artifact registered as ``name@version``; its content hash is verified on read, and its pinned
        model code against the code installed here (`ModelCodeChanged` if it differs).

        `allow_code_change` (default: ``RAYTWIN_ALLOW_MODEL_CODE_CHANGE=1``) resolves it anyway, running the
        current code; the run records then carry the current code's identity (`raytwin.modelcode`)."""
        name, version = parse_ref(ref)
        if (digest := self._digest(name, version)) is None:
            known = self.versions(name)
            raise RegistryError(f"no model {ref} in this registry" + (f"; versions: {known}" if known else ""),
                                self.url)
        artifact = self._read(name, version, digest)
        if (change := artifact.code_change()) is not None:
            if allow_code_change is None:
                allow_code_change = os.environ.get(ALLOW_CODE_CHANGE_ENV) == "1"
            if not allow_code_change:
                what = (f"{ref}: the code of simulator {artifact.asset_type.simulator!r} changed since it was "
                        f"registered: {change}")
                raise ModelCodeChanged(f"{what}. Register the model again under a new version to pin the current "
                                       f"code, or accept the change explicitly (get(..., allow_code_change=True), or "
                                       f"{ALLOW_CODE_CHANGE_ENV}=1)", what)
            log.warning("event=model_code_changed ref=%s accepted=true change=%r", ref, change)
        return artifact

    @store_io("read")
    def names(self) -> list[str]:
        base = f"{self.root}/models"
        if not self.fs.exists(base):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))

    @store_io("read")
    def versions(self, name: str) -> list[str]:
        base = f"{self.root}/models/{name}"
        if not self.fs.exists(base):
            return []
        found = [p.rsplit("/", 1)[-1].removesuffix(".json") for p in self.fs.ls(base, detail=False)
                 if p.endswith(".json")]  # not a hidden file a killed writer left (`replace_file`)
        return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))
