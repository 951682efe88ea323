"""The NetworkPolicy rendered beside a spec's KubeRay resource, and a check of its `networking.k8s.io/v1` shape.

Every Ray pod holds the store's credentials (`env_from_secrets`), and Ray's control plane runs any code it
is handed, so only the Serve API is meant for clients: Ray's own ports are open between the cluster's pods,
the dashboard/job API to the KubeRay operator, the spec's job submitters and the operators the spec names,
the Ray client port to those operators only, the metrics port to Prometheus. Egress is left open (the store,
brokers and package indexes are the spec's business); cluster/README.md, "Network policy", says how to close it.

What the KubeRay operator itself connects to (ray-project/kuberay, ray-operator/controllers/ray): the
dashboard, 8265 (`utils.FetchHeadServiceURL(..., utils.DashboardPortName)`: RayJob status, RayService
`updateServeDeployment`/`getAndCheckServeStatus`), and the head pod's Serve proxy, 8000
(`RayHttpProxyClient.CheckProxyActorHealth` from `updateHeadPodServeLabel`). Never the GCS (6379) nor the Ray
client port (10001); its pods' probes are exec'd inside the pods or sent by the kubelet, which a
NetworkPolicy does not stop.
"""

from __future__ import annotations

from typing import Any

import jsonschema

from cluster.crd_validation import ManifestInvalid, kubernetes_to_json_schema, schema_problems
from cluster.manifests import CLIENT_LABEL, PART_OF, Kind, pod_labels
from cluster.spec import ClusterSpec, Peers

API_VERSION = "networking.k8s.io/v1"
SERVE_PORT, DASHBOARD_PORT, CLIENT_PORT, METRICS_PORT = 8000, 8265, 10001, 8080
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def _namespace(name: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: name}}}


def _peers(peers: Peers) -> list[dict[str, Any]]:
    return [_namespace(name) for name in peers.namespaces] + [{"ipBlock": {"cidr": cidr}} for cidr in peers.cidrs]


def _ports(*numbers: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": number} for number in numbers]


def policy_name(spec: ClusterSpec, kind: Kind = Kind.RAYCLUSTER) -> str:
    """`<name>-raytwin`, shared by the spec's RayCluster and RayService (the same rules); `<name>-rayjob-raytwin`
    for its RayJobs, so applying a job does not replace the long-running cluster's policy."""
    return f"{spec.name}-rayjob-raytwin" if kind is Kind.RAYJOB else f"{spec.name}-raytwin"


def render_network_policy(spec: ClusterSpec, kind: Kind = Kind.RAYCLUSTER) -> dict[str, Any]:
    """The ingress NetworkPolicy of the Ray pods of `spec`'s `kind`: its RayCluster and RayService share one; its
    RayJobs' clusters, which serve no API, have their own without the API port."""
    settings = spec.network_policy
    kuberay = {**_namespace(settings.kuberay_namespace),
               "podSelector": {"matchLabels": dict(settings.kuberay_pod_labels)}}
    submitters = {"podSelector": {"matchLabels": {CLIENT_LABEL: spec.name}}}  # `ray job submit` uses only 8265
    operators = _peers(settings.operator_from)
    api: dict[str, Any] = {"ports": _ports(SERVE_PORT)}
    if settings.api_from is not None:  # KubeRay checks the head's Serve proxy on this port
        api["from"] = [*_peers(settings.api_from), kuberay]
    ingress = [
        {"from": [{"podSelector": {"matchLabels": pod_labels(spec, kind)}}]},  # Ray's own ports, all of them
        *([] if kind is Kind.RAYJOB else [api]),
        {"from": [kuberay, submitters, *operators], "ports": _ports(DASHBOARD_PORT)},
    ]
    if operators:  # a rule with no `from` would admit everyone
        ingress.append({"from": operators, "ports": _ports(CLIENT_PORT)})
    if settings.prometheus_namespace:
        ingress.append({"from": [_namespace(settings.prometheus_namespace)], "ports": _ports(METRICS_PORT)})
    return {
        "apiVersion": API_VERSION,
        "kind": "NetworkPolicy",
        "metadata": {"name": policy_name(spec, kind), "namespace": spec.namespace,
                     "labels": dict(PART_OF)},
        "spec": {"podSelector": {"matchLabels": pod_labels(spec, kind)}, "policyTypes": ["Ingress"],
                 "ingress": ingress},
    }


def _selector() -> dict[str, Any]:
    requirement = {"type": "object", "required": ["key", "operator"], "properties": {
        "key": {"type": "string"}, "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        "values": {"type": "array", "items": {"type": "string"}}}}
    return {"type": "object", "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": requirement}}}


def _peer() -> dict[str, Any]:
    ip_block = {"type": "object", "required": ["cidr"], "properties": {
        "cidr": {"type": "string"}, "except": {"type": "array", "items": {"type": "string"}}}}
    return {"type": "object", "minProperties": 1, "properties": {
        "podSelector": _selector(), "namespaceSelector": _selector(), "ipBlock": ip_block}}


_PORT = {"type": "object", "properties": {
    "protocol": {"type": "string", "enum": ["TCP", "UDP", "SCTP"]},
    "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
    "endPort": {"type": "integer", "format": "int32"}}}


def _rule(direction: str) -> dict[str, Any]:
    return {"type": "object", "properties": {direction: {"type": "array", "items": _peer()},
                                              "ports": {"type": "array", "items": _PORT}}}


NETWORK_POLICY_SCHEMA = kubernetes_to_json_schema({
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"type": "string", "enum": [API_VERSION]},
        "kind": {"type": "string", "enum": ["NetworkPolicy"]},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "required": ["podSelector"], "properties": {
            "podSelector": _selector(),
            "policyTypes": {"type": "array", "items": {"type": "string", "enum": ["Ingress", "Egress"]}},
            "ingress": {"type": "array", "items": _rule("from")},
            "egress": {"type": "array", "items": _rule("to")}}}}})
"""The parts of Kubernetes' `networking.k8s.io/v1` NetworkPolicy that RayTwin renders, unknown fields refused (as
the API server's strict field validation does); no cluster is needed to check a rendered policy."""
_VALIDATOR = jsonschema.Draft4Validator(NETWORK_POLICY_SCHEMA)


def validate_network_policy(manifest: dict[str, Any]) -> None:
    """Raise `ManifestInvalid` unless `manifest` has the shape of a `networking.k8s.io/v1` NetworkPolicy."""
    problems = schema_problems(_VALIDATOR, manifest)
    if problems:
        name = (manifest.get("metadata") or {}).get("name", "<unnamed>")
        raise ManifestInvalid(f"NetworkPolicy {name}", problems, schema="the networking.k8s.io/v1 NetworkPolicy shape")
