"""Owner references from what `raytwin cluster apply` creates beside a KubeRay resource (its NetworkPolicy) to
that resource, so that Kubernetes' garbage collector deletes them with it, and how `raytwin cluster delete`
tells which policies are its own to report or remove (those applied before owner references, which have none).

Secrets are not among them: the Ray token, the API keys and the store credentials are created by the user
(`kubectl create secret`), may serve several clusters, and outlive any one of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    """A reference to `owner` as the API server stored it (its `uid` included). Not `controller`: no controller
    manages the policy, and the RayCluster and RayService of one spec share theirs while at most one reference
    may be the controller. No `blockOwnerDeletion`: it would only order a foreground deletion, and where the
    OwnerReferencesPermissionEnforcement admission plugin runs (OpenShift) setting it needs `update` on the
    owner's `finalizers` subresource, which users who may apply a RayCluster seldom have."""
    metadata = owner["metadata"]
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": metadata["name"],
            "uid": metadata["uid"], "controller": False, "blockOwnerDeletion": False}


def owned_by(manifest: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
    """`manifest` with an owner reference to `owner`, a KubeRay object already created (it has a `uid`)."""
    return {**manifest, "metadata": {**manifest["metadata"], "ownerReferences": [owner_reference(owner)]}}


def _key(reference: dict[str, Any]) -> tuple[str, str]:
    return reference["kind"], reference["name"]


def merge_owner_references(stored: Iterable[dict[str, Any]], ours: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The references a replaced object keeps: the other owners' (a spec's RayService when its RayCluster is
    applied; a spec's other RayJobs), then ours, which replace a stored one to the same kind and name (a deleted
    predecessor's uid, which the garbage collector would otherwise count as a gone owner)."""
    replaced = {_key(reference) for reference in ours}
    return [reference for reference in stored if _key(reference) not in replaced] + ours


def left_by_predecessors(stored: list[dict[str, Any]], ours: list[dict[str, Any]]) -> bool:
    """Whether every owner of a stored object is a deleted predecessor of ours (same kind and name, another uid):
    the object then awaits the garbage collector, which deletes it by uid even after a replace."""
    keys, uids = {_key(reference) for reference in ours}, {reference["uid"] for reference in ours}
    return bool(stored) and all(_key(ref) in keys and ref["uid"] not in uids for ref in stored)


def owners(stored: dict[str, Any]) -> list[dict[str, Any]]:
    """The owner references of an object as the API server returns it (camelCase keys)."""
    return list(stored["metadata"].get("ownerReferences") or [])


def describe(reference: dict[str, Any], namespace: str) -> str:
    """`RayService sim/twin`: an owner as the CLI names it."""
    return f"{reference['kind']} {namespace}/{reference['name']}"


def pod_labels_of(kuberay: dict[str, Any]) -> dict[str, str]:
    """The labels of a stored KubeRay object's head pod template, which its NetworkPolicy selects (a RayJob's and
    a RayService's cluster are under `rayClusterSpec` and `rayClusterConfig`)."""
    spec = kuberay.get("spec") or {}
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    template = (cluster.get("headGroupSpec") or {}).get("template") or {}
    return dict((template.get("metadata") or {}).get("labels") or {})


def selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether `policy` (a non-empty `podSelector.matchLabels`) selects pods labelled `labels`."""
    match = ((policy.get("spec") or {}).get("podSelector") or {}).get("matchLabels") or {}
    return bool(match) and match.items() <= labels.items()
