"""Apply, read and delete KubeRay resources through the official `kubernetes` client (`CustomObjectsApi`), and
the NetworkPolicies they own (`NetworkingV1Api`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from cluster.manifests import CLUSTER_LABEL, PART_OF, Kind
from cluster.ownership import (
    describe,
    left_by_predecessors,
    merge_owner_references,
    owned_by,
    owner_reference,
    owners,
    pod_labels_of,
    selects,
)

GROUP = "ray.io"
VERSION = "v1"


class KubeRayNotFound(LookupError):
    """The named KubeRay resource does not exist."""


class KubeForbidden(PermissionError):
    """The API server refused a request RayTwin needs (403): the user's role lacks a permission."""


class KubeConfigError(RuntimeError):
    """No usable Kubernetes access (no kubeconfig, a broken one, an unknown context)."""


def api_client_from_kubeconfig(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """An API client for the given kubeconfig/context; without either, $KUBECONFIG or ~/.kube/config, or the
    pod's service account when running in-cluster with no kubeconfig set. `KubeConfigError` says what to set."""
    if kubeconfig is None and context is None and not os.environ.get("KUBECONFIG"):
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except (config.ConfigException, OSError, yaml.YAMLError) as exc:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        missing = [p for p in where.split(os.pathsep) if not os.path.exists(os.path.expanduser(p))]
        # the client says "Invalid kube-config file" of a file that is not there: a typo read as a broken file
        reason = (f"no such file: {', '.join(missing)}" if missing
                  else " ".join(str(exc).split()) or type(exc).__name__)
        raise KubeConfigError(f"no Kubernetes access ({where}: {reason}): set KUBECONFIG or pass --kubeconfig "
                              "(and --context), or run in a pod whose service account has in-cluster access") from None


class KubeRayClient:
    """Create-or-replace, status and delete for RayCluster/RayService/RayJob objects in one namespace, and the
    NetworkPolicies applied beside them."""

    def __init__(self, api_client: client.ApiClient, namespace: str = "default") -> None:
        self.api = client.CustomObjectsApi(api_client)
        self.net = client.NetworkingV1Api(api_client)
        self.namespace = namespace

    def _args(self, kind: Kind) -> dict[str, str]:
        return {"group": GROUP, "version": VERSION, "namespace": self.namespace, "plural": kind.plural}

    def _plain(self, model: Any) -> Any:
        """A client model (V1NetworkPolicy, ...) as the API's JSON: camelCase keys, like the custom objects."""
        return self.api.api_client.sanitize_for_serialization(model)

    def apply(self, manifest: dict[str, Any], owner: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Create the object, or replace it if it exists; returns ("created" | "replaced", server object).

        A replace carries the current `resourceVersion`, so a concurrent change makes it fail (409) instead of
        silently overwriting someone else's edit. A NetworkPolicy (rendered beside the KubeRay resource) goes
        through the networking API the same way; with `owner`, the KubeRay object as stored (its `uid`), it gets
        an owner reference, so Kubernetes' garbage collector deletes it with that object, and a replace keeps
        the references to its other owners.
        """
        if owner is not None:
            manifest = owned_by(manifest, owner)
        name = manifest["metadata"]["name"]
        if manifest["kind"] == "NetworkPolicy":
            return _create_or_replace(
                manifest,
                lambda body: self._plain(self.net.create_namespaced_network_policy(self.namespace, body)),
                lambda: self._plain(self.net.read_namespaced_network_policy(name, self.namespace)),
                lambda body: self._plain(self.net.replace_namespaced_network_policy(name, self.namespace, body)),
                lambda: self.net.delete_namespaced_network_policy(name, self.namespace),
                self._policy_owners)
        kind = Kind(manifest["kind"].lower())
        return _create_or_replace(
            manifest,
            lambda body: self.api.create_namespaced_custom_object(body=body, **self._args(kind)),
            lambda: self.get(kind, name),
            lambda body: self.api.replace_namespaced_custom_object(name=name, body=body, **self._args(kind)))

    def get(self, kind: Kind, name: str) -> dict[str, Any]:
        """The object as stored by the API server; `KubeRayNotFound` if absent."""
        try:
            return self.api.get_namespaced_custom_object(name=name, **self._args(kind))
        except ApiException as exc:
            if exc.status == 404:
                raise KubeRayNotFound(f"{kind.kind} {self.namespace}/{name} not found") from None
            raise

    def status(self, kind: Kind, name: str) -> dict[str, Any]:
        """The operator-maintained `.status` of the object (empty until KubeRay reconciles it)."""
        return self.get(kind, name).get("status", {})

    def delete(self, kind: Kind, name: str) -> list[str]:
        """Delete the object; returns a line for it ("deleted" or "not found") and one for each NetworkPolicy of
        its pods: one it owns goes with it (the garbage collector's work), one without owner (applied by RayTwin
        before owner references) is deleted here unless another KubeRay object's pods still use it. Deleting
        twice is harmless: the second says "not found"."""
        try:
            found: dict[str, Any] | None = self.get(kind, name)
        except KubeRayNotFound:
            found = None
        # with the object gone already, a RayCluster's or RayService's pods were labelled with its name
        labels = pod_labels_of(found) if found else ({} if kind is Kind.RAYJOB else {CLUSTER_LABEL: name})
        policies = self._policies()  # first: the collector may delete the owned ones as soon as their owner goes
        deleted = found is not None and _deleted(
            lambda: self.api.delete_namespaced_custom_object(name=name, **self._args(kind)))
        lines = [f"{kind.kind} {self.namespace}/{name} {'deleted' if deleted else 'not found'}"]
        return lines + [line for policy in policies if (line := self._policy_after_delete(policy, kind, name, labels))]

    def _policy_owners(self, stored: dict[str, Any]) -> list[dict[str, Any]]:
        """A stored policy's owners; for one applied by an older raytwin (none), the KubeRay objects whose pods it
        selects: owning it with the one applied now, they keep it while their pods use it."""
        return owners(stored) or [owner_reference(item) for _, item in self._selected_by(stored)]

    def _policies(self) -> list[dict[str, Any]]:
        """The namespace's NetworkPolicies applied by RayTwin; `KubeForbidden` if the role may not list them."""
        try:
            listed = self.net.list_namespaced_network_policy(
                self.namespace, label_selector=",".join(f"{key}={value}" for key, value in PART_OF.items()))
        except ApiException as exc:
            if exc.status != 403:
                raise
            raise KubeForbidden(
                f"listing NetworkPolicies in namespace {self.namespace} was refused (403): `cluster delete` needs "
                "`list` and `delete` on networkpolicies (networking.k8s.io) to find the resource's policies; "
                "nothing was deleted") from None
        return self._plain(listed)["items"]

    def _policy_after_delete(self, policy: dict[str, Any], kind: Kind, name: str,
                             labels: dict[str, str]) -> str | None:
        """What becomes of `policy` once `kind` `name` is deleted, as a line; None if it is not that object's."""
        policy_name = policy["metadata"]["name"]
        said, owner = f"NetworkPolicy {self.namespace}/{policy_name}", f"{kind.kind} {self.namespace}/{name}"
        references = owners(policy)
        ours = [reference for reference in references if describe(reference, self.namespace) == owner]
        if ours:
            others = [describe(reference, self.namespace) for reference in references if reference not in ours]
            if others:
                return f"{said} kept: also owned by {', '.join(others)}"
            return f"{said} deleted with it by Kubernetes' garbage collector (owned by {owner})"
        if references or not selects(policy, labels):
            return None
        users = [f"{other.kind} {self.namespace}/{item['metadata']['name']}"
                 for other, item in self._selected_by(policy) if (other, item["metadata"]["name"]) != (kind, name)]
        if users:
            return f"{said} kept: the pods of {', '.join(users)} use it too (it has no owner reference)"
        if not _deleted(lambda: self.net.delete_namespaced_network_policy(policy_name, self.namespace)):
            return None
        return f"{said} deleted (it had no owner reference: applied by an older raytwin)"

    def _selected_by(self, policy: dict[str, Any]) -> list[tuple[Kind, dict[str, Any]]]:
        """The KubeRay objects in the namespace, but those being deleted, whose pods `policy` selects."""
        return [(kind, item) for kind in Kind
                for item in self.api.list_namespaced_custom_object(**self._args(kind))["items"]
                if not item["metadata"].get("deletionTimestamp") and selects(policy, pod_labels_of(item))]


def _deleted(delete: Callable[[], Any]) -> bool:
    """Run a delete call; False if the object did not exist (404), so deleting twice is harmless."""
    try:
        delete()
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _create_or_replace(manifest: dict[str, Any], create: Callable[[dict[str, Any]], Any],
                       current: Callable[[], dict[str, Any]], replace: Callable[[dict[str, Any]], Any],
                       delete: Callable[[], Any] | None = None,
                       stored_owners: Callable[[dict[str, Any]], list[dict[str, Any]]] = owners) -> tuple[str, Any]:
    """Create; on 409 replace carrying the stored `resourceVersion` (a concurrent change then fails, 409).

    A manifest with owner references keeps the stored object's other owners (`stored_owners`). With `delete`, a
    stored object whose owners are all deleted predecessors of ours (`cluster delete`, then `apply` at once) is
    deleted and created anew: the garbage collector, about to delete it, would take a replaced one too (it
    deletes by uid)."""
    try:
        return "created", create(manifest)
    except ApiException as exc:
        if exc.status != 409:
            raise
    stored, ours = current(), manifest["metadata"].get("ownerReferences")
    theirs = stored_owners(stored) if ours else []
    if ours and delete is not None and left_by_predecessors(theirs, ours):
        _deleted(delete)
        return "replaced", create(manifest)
    metadata = {**manifest["metadata"], "resourceVersion": stored["metadata"]["resourceVersion"]}
    if ours:
        metadata["ownerReferences"] = merge_owner_references(theirs, ours)
    return "replaced", replace({**manifest, "metadata": metadata})
