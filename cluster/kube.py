"""Apply, read and delete KubeRay resources through the official `kubernetes` client (`CustomObjectsApi`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from cluster.manifests import Kind

GROUP = "ray.io"
VERSION = "v1"


class KubeRayNotFound(LookupError):
    """The named KubeRay resource does not exist."""


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
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise KubeConfigError(f"no Kubernetes access ({where}: {reason}): set KUBECONFIG or pass --kubeconfig "
                              "(and --context), or run in a pod whose service account has in-cluster access") from None


class KubeRayClient:
    """Create-or-replace, status and delete for RayCluster/RayService/RayJob objects in one namespace."""

    def __init__(self, api_client: client.ApiClient, namespace: str = "default") -> None:
        self.api = client.CustomObjectsApi(api_client)
        self.namespace = namespace

    def _args(self, kind: Kind) -> dict[str, str]:
        return {"group": GROUP, "version": VERSION, "namespace": self.namespace, "plural": kind.plural}

    def apply(self, manifest: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Create the object, or replace it if it exists; returns ("created" | "replaced", server object).

        A replace carries the current `resourceVersion`, so a concurrent change makes it fail (409) instead of
        silently overwriting someone else's edit. A NetworkPolicy (rendered beside the KubeRay resource) goes
        through the networking API the same way.
        """
        name = manifest["metadata"]["name"]
        if manifest["kind"] == "NetworkPolicy":
            net = client.NetworkingV1Api(self.api.api_client)
            plain = self.api.api_client.sanitize_for_serialization
            return _create_or_replace(
                manifest,
                lambda body: plain(net.create_namespaced_network_policy(self.namespace, body)),
                lambda: net.read_namespaced_network_policy(name, self.namespace).metadata.resource_version,
                lambda body: plain(net.replace_namespaced_network_policy(name, self.namespace, body)))
        kind = Kind(manifest["kind"].lower())
        return _create_or_replace(
            manifest,
            lambda body: self.api.create_namespaced_custom_object(body=body, **self._args(kind)),
            lambda: self.get(kind, name)["metadata"]["resourceVersion"],
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

    def delete(self, kind: Kind, name: str) -> bool:
        """Delete the object; False if it did not exist, so deleting twice is harmless."""
        try:
            self.api.delete_namespaced_custom_object(name=name, **self._args(kind))
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True


def _create_or_replace(manifest: dict[str, Any], create: Callable[[dict[str, Any]], Any],
                       current_version: Callable[[], str],
                       replace: Callable[[dict[str, Any]], Any]) -> tuple[str, Any]:
    """Create; on 409 replace carrying the stored `resourceVersion` (a concurrent change then fails, 409)."""
    try:
        return "created", create(manifest)
    except ApiException as exc:
        if exc.status != 409:
            raise
    body = {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": current_version()}}
    return "replaced", replace(body)
