"""Validation of rendered manifests against the KubeRay CRDs' OpenAPI v3 schemas.

The CRDs are read from a directory the user supplies (`--crds DIR` or `RAYTWIN_KUBERAY_CRDS`), never from a
copy inside the package, so manifests are checked against the operator version actually deployed.

Kubernetes' structural schemas are not plain JSON Schema; `kubernetes_to_json_schema` translates the parts
that matter so that `jsonschema` checks what the API server would:
- `x-kubernetes-int-or-string` becomes `oneOf: [integer, string]` (a string still has to match `pattern`,
  e.g. a resource quantity such as "4Gi");
- `nullable: true` also admits null;
- objects with declared `properties` reject unknown fields (the API server's strict field validation, as
  `kubectl apply` requests), unless marked `x-kubernetes-preserve-unknown-fields`;
- `format: int32` / `int64` are range-checked;
- like the API server, the schema's `default`s are applied first (`apply_defaults`: a missing field, or a
  null one that is not nullable, gets its default, recursively), so a manifest that leaves out a required
  field with a default (e.g. a worker group's `minReplicas`/`maxReplicas`) is accepted;
- `metadata.generateName` stands in for `metadata.name`, as on the API server.
CEL rules (`x-kubernetes-validations`) are not evaluated; the few in these CRDs concern immutability on
update and fields RayTwin never sets.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRDS_ENV = "RAYTWIN_KUBERAY_CRDS"
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


class CrdError(RuntimeError):
    """The CRD directory is missing or holds no usable KubeRay CRDs."""


class ManifestInvalid(ValueError):
    """A manifest that the KubeRay CRD schema refuses, with one line per violation."""

    def __init__(self, manifest_name: str, problems: list[str], schema: str = "its KubeRay CRD schema") -> None:
        super().__init__(f"{manifest_name} does not match {schema}:\n" + "\n".join(problems))
        self.problems = problems


_SCHEMA_MAPS = ("properties", "patternProperties", "definitions")  # name -> schema
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")


def kubernetes_to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """A JSON-Schema (draft 4) equivalent of a Kubernetes structural schema node, recursively.

    Only schema positions are rewritten; values such as `enum`, `default` or field names are kept as they are.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key in _SCHEMA_MAPS:
            out[key] = {name: kubernetes_to_json_schema(schema) for name, schema in value.items()}
        elif key in _SCHEMA_LISTS:
            out[key] = [kubernetes_to_json_schema(schema) for schema in value]
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = kubernetes_to_json_schema(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        for key in ("anyOf", "type"):
            out.pop(key, None)
        out["oneOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """A copy of `value` with the `default`s of `schema` (a translated CRD schema) filled in, recursively.

    The API server's structural-schema defaulting: in every object, a property that is absent, or null
    without being nullable, gets a copy of its default (itself defaulted); objects, arrays and maps that
    are present are walked; nothing absent without a default is created.
    """
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {key: apply_defaults(properties.get(key, extra if isinstance(extra, dict) else {}), item)
               for key, item in value.items()}
        for key, sub in properties.items():
            if "default" in sub and out.get(key) is None and not (key in out and _nullable(sub)):
                out[key] = apply_defaults(sub, copy.deepcopy(sub["default"]))
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def _nullable(schema: dict[str, Any]) -> bool:
    return isinstance(schema.get("type"), list) and "null" in schema["type"]


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()
    for name, (low, high) in _INT_RANGES.items():
        checker.checks(name)(lambda value, low=low, high=high: not isinstance(value, int) or low <= value <= high)
    return checker


@dataclass(frozen=True)
class CrdSchemas:
    """The served versions of the ray.io CRDs in a directory, keyed by (apiVersion, kind)."""

    validators: dict[tuple[str, str], jsonschema.protocols.Validator]

    @classmethod
    def from_dir(cls, directory: str | Path) -> CrdSchemas:
        return _load(Path(directory).resolve())

    def validate(self, manifest: dict[str, Any]) -> None:
        """Raise `ManifestInvalid` unless `manifest`, with the CRD's defaults applied, matches its CRD's schema."""
        key = (manifest.get("apiVersion", ""), manifest.get("kind", ""))
        metadata = manifest.get("metadata") if isinstance(manifest.get("metadata"), dict) else {}
        name = f"{key[1] or 'manifest'} {metadata.get('name') or metadata.get('generateName', '<unnamed>')!s}"
        validator = self.validators.get(key)
        if validator is None:
            known = ", ".join(f"{kind} ({api})" for api, kind in sorted(self.validators))
            raise ManifestInvalid(name, [f"  no CRD for apiVersion={key[0]!r} kind={key[1]!r}; known: {known}"])
        defaulted = apply_defaults(validator.schema, manifest)
        problems = schema_problems(validator, defaulted)
        if not metadata.get("name") and not metadata.get("generateName"):
            problems.append("  metadata.name: required (or metadata.generateName)")
        if problems:
            raise ManifestInvalid(name, problems)


def schema_problems(validator: jsonschema.protocols.Validator, instance: Any) -> list[str]:
    """One line per violation, in document order, each naming the field's path."""
    return [f"  {'.'.join(str(part) for part in error.absolute_path) or '(root)'}: {error.message}"
            for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.path))]


@cache
def _load(directory: Path) -> CrdSchemas:
    if not directory.is_dir():
        raise CrdError(f"KubeRay CRD directory {directory} does not exist (pass --crds DIR or set {CRDS_ENV})")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    validators: dict[tuple[str, str], jsonschema.protocols.Validator] = {}
    checker = _format_checker()
    for path in sorted(directory.glob("*.y*ml")):
        for doc in yaml.load_all(path.read_text(), Loader=loader):
            if not doc or doc.get("kind") != "CustomResourceDefinition" or doc["spec"].get("group") != "ray.io":
                continue
            for version in doc["spec"]["versions"]:
                if version.get("served"):
                    schema = kubernetes_to_json_schema(version["schema"]["openAPIV3Schema"])
                    key = (f"ray.io/{version['name']}", doc["spec"]["names"]["kind"])
                    validators[key] = jsonschema.Draft4Validator(schema, format_checker=checker)
    if not validators:
        raise CrdError(f"no ray.io CustomResourceDefinitions found in {directory}")
    return CrdSchemas(validators)

