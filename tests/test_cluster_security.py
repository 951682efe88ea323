"""What an outside review found missing in the rendered manifests: Ray token auth, container hardening, a
NetworkPolicy, Secrets kept off job submitters, a deadline for RayJobs, and a RayService upgrade that does not
deadlock on the store's single-writer lease. Every manifest still validates against the KubeRay CRDs."""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cluster.cli import cluster_app
from cluster.crd_validation import CrdSchemas, ManifestInvalid
from cluster.manifests import Kind, render, render_rayjob, render_rayservice
from cluster.network_policy import render_network_policy, validate_network_policy
from cluster.spec import SpecError, parse_spec
from tests.fixtures_cluster import CRD_DIR, spec_data, worker

SWEEP_JOB = ["raytwin", "sweep", "run", "/data/spec.json", "--runs", "s3://bucket/runs", "--no-progress"]
STORE_SECRETS = {"env_from_secrets": ["raytwin-secrets"]}
SPECS = {
    "default": spec_data(**STORE_SECRETS),
    "gpu": spec_data(worker_groups=[worker(), worker(name="gpu", gpus=1, image="ghcr.io/example/raytwin:cuda")],
                     **STORE_SECRETS),
    "fixed": spec_data(autoscaling={"enabled": False}, worker_groups=[worker(min_replicas=2, max_replicas=2)]),
    "locked-down": spec_data(
        security={"auth_secret": "ray-token", "run_as_user": 1001, "run_as_group": 1001},
        network_policy={"api_from": {"cidrs": ["203.0.113.0/24"], "namespaces": ["ingress-nginx"]},
                        "operator_from": {"cidrs": ["10.20.0.5/32"], "namespaces": ["ops"]},
                        "kuberay_namespace": "ray-system", "prometheus_namespace": None},
        job={"active_deadline_seconds": 3600}),
    "writable-root": spec_data(security={"read_only_root_filesystem": False}),
}


@pytest.fixture(scope="module")
def crds() -> CrdSchemas:
    return CrdSchemas.from_dir(CRD_DIR)


def _render(name: str, kind: Kind) -> dict[str, Any]:
    return render(parse_spec(SPECS[name]), kind, SWEEP_JOB if kind is Kind.RAYJOB else ())


def _cluster(manifest: dict[str, Any]) -> dict[str, Any]:
    key = {"RayCluster": None, "RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}[manifest["kind"]]
    return manifest["spec"] if key is None else manifest["spec"][key]


def _pods(manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every Ray pod template of a manifest: the head's, each worker group's."""
    cluster = _cluster(manifest)
    yield cluster["headGroupSpec"]["template"]
    for group in cluster["workerGroupSpecs"]:
        yield group["template"]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("kind", list(Kind))
def test_manifests_and_their_network_policy_validate(crds: CrdSchemas, name: str, kind: Kind) -> None:
    crds.validate(_render(name, kind))
    policy = render_network_policy(parse_spec(SPECS[name]), kind)
    validate_network_policy(policy)
    for template in _pods(_render(name, kind)):  # the policy of the kind selects each of its Ray pods
        assert _matches(policy["spec"]["podSelector"], template["metadata"]["labels"])


@pytest.mark.parametrize("kind", list(Kind))
def test_every_ray_container_runs_as_the_ray_user_without_privileges(kind: Kind) -> None:
    manifest = _render("gpu", kind)
    pods = list(_pods(manifest))
    assert len(pods) == 3
    for template in pods:
        pod = template["spec"]
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100,
                                          "fsGroup": 100, "seccompProfile": {"type": "RuntimeDefault"}}
        assert {"name": "ray-tmp", "emptyDir": {}} in pod["volumes"]  # Ray writes /tmp/ray
        (container,) = pod["containers"]
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == 1000
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert context["readOnlyRootFilesystem"] is True
        assert {"name": "ray-tmp", "mountPath": "/tmp"} in container["volumeMounts"]
        env = _env(container)  # the shards' JAX cache and pip's cache move off the read-only home
        assert env["RAYTWIN_JAX_CACHE_DIR"].startswith("/tmp/") and env["XDG_CACHE_HOME"].startswith("/tmp/")
        label = "raytwin.io/job-cluster" if kind is Kind.RAYJOB else "raytwin.io/cluster"
        assert template["metadata"]["labels"] == {label: "twin"}  # what the kind's NetworkPolicy selects
    autoscaler = _cluster(manifest)["autoscalerOptions"]  # the sidecar KubeRay adds to the head pod
    assert autoscaler["securityContext"] == pods[0]["spec"]["containers"][0]["securityContext"]
    assert autoscaler["volumeMounts"] == [{"name": "ray-tmp", "mountPath": "/tmp"}]


def test_security_settings_of_the_spec_reach_the_containers() -> None:
    container = next(_pods(_render("locked-down", Kind.RAYCLUSTER)))["spec"]["containers"][0]
    assert (container["securityContext"]["runAsUser"], container["securityContext"]["runAsGroup"]) == (1001, 1001)
    writable = next(_pods(_render("writable-root", Kind.RAYCLUSTER)))["spec"]["containers"][0]
    assert writable["securityContext"]["readOnlyRootFilesystem"] is False
    assert "RAYTWIN_JAX_CACHE_DIR" not in _env(writable)  # the home directory is writable then
    with pytest.raises(SpecError, match="security.run_as_user: Input should be greater than or equal to 1"):
        parse_spec(spec_data(security={"run_as_user": 0}))  # root


@pytest.mark.parametrize("kind", list(Kind))
def test_ray_token_authentication_is_on_with_the_specs_secret(kind: Kind) -> None:
    assert _cluster(_render("default", kind))["authOptions"] == {"mode": "token", "secretName": "twin-ray-token"}
    assert _cluster(_render("locked-down", kind))["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    off = render(parse_spec(spec_data(security={"auth": "disabled"})), kind, SWEEP_JOB if kind is Kind.RAYJOB else ())
    assert _cluster(off)["authOptions"] == {"mode": "disabled"}


def _drop_auth_secret_name(node: Any) -> int:
    """Remove `secretName` from every `authOptions` schema under `node`; how many were removed."""
    if isinstance(node, list):
        return sum(_drop_auth_secret_name(item) for item in node)
    if not isinstance(node, dict):
        return 0
    auth = node.get("authOptions")
    dropped = int(isinstance(auth, dict) and auth.get("properties", {}).pop("secretName", None) is not None)
    return dropped + sum(_drop_auth_secret_name(value) for value in node.values())


@pytest.fixture(scope="module")
def crds_without_secret_name(crds: CrdSchemas) -> CrdSchemas:
    """The shared CRDs as KubeRay 1.5.x has them: `authOptions` without `secretName` (added in 1.6.0). Taken out
    of copies of the shared CRDs' schemas, not of their 3 MB of YAML (a parse, a dump and a parse again: ~8 s)."""
    validators, dropped = {}, {}
    for (api, kind), validator in crds.validators.items():
        schema = copy.deepcopy(validator.schema)
        dropped[kind] = dropped.get(kind, 0) + _drop_auth_secret_name(schema)
        validators[api, kind] = validator.evolve(schema=schema)
    assert dropped == {"RayCluster": 1, "RayJob": 1, "RayService": 1}, dropped  # each kind's served v1
    return CrdSchemas(validators)


@pytest.mark.parametrize("kind", list(Kind))
def test_crds_of_a_kuberay_without_auth_secret_names_refuse_the_manifests(crds_without_secret_name: CrdSchemas,
                                                                          kind: Kind) -> None:
    """KubeRay before 1.6.0 would drop `authOptions.secretName` and generate a token of its own, which no client
    knows: validating against that release's CRDs says so before anything is applied."""
    older = crds_without_secret_name
    with pytest.raises(ManifestInvalid, match="'secretName' was unexpected"):
        older.validate(_render("default", kind))
    off = render(parse_spec(spec_data(security={"auth": "disabled"})), kind, SWEEP_JOB if kind is Kind.RAYJOB else ())
    older.validate(off)  # without a Secret named, the older CRDs take it


def test_token_auth_needs_a_ray_that_has_it() -> None:
    with pytest.raises(SpecError, match="security.auth: token needs Ray 2.52.0 or newer, the image has 2.51.1"):
        parse_spec(spec_data(ray_version="2.51.1"))
    parse_spec(spec_data(ray_version="2.51.1", security={"auth": "disabled"}))
    parse_spec(spec_data(ray_version="2.52.0"))
    with pytest.raises(SpecError, match="security.auth: Input should be 'token' or 'disabled'"):
        parse_spec(spec_data(security={"auth": "password"}))


def test_a_rayjob_keeps_secrets_off_its_submitter_and_the_api_keys_off_its_cluster() -> None:
    job = _render("default", Kind.RAYJOB)
    submitter = job["spec"]["submitterPodTemplate"]
    assert submitter["spec"]["restartPolicy"] == "Never"
    (container,) = submitter["spec"]["containers"]
    # KubeRay writes `ray job submit` into the first container only when it has no command of its own
    assert "command" not in container and "args" not in container
    assert "envFrom" not in container and "raytwin-secrets" not in yaml.safe_dump(submitter)
    assert "raytwin-keys" not in yaml.safe_dump(submitter)
    assert _env(container) == {"RAY_AUTH_MODE": "token",  # only what `ray job submit` needs
                               "RAY_AUTH_TOKEN": {"secretKeyRef": {"name": "twin-ray-token", "key": "auth_token"}}}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert submitter["metadata"]["labels"] == {"raytwin.io/client-of": "twin"}
    for template in _pods(job):  # the job itself runs on the cluster, with the store's credentials ...
        (ray,) = template["spec"]["containers"]
        assert ray["envFrom"] == [{"secretRef": {"name": "raytwin-secrets"}}]
        # ... but serves no API, so the API keys file is not there
        assert "RAYTWIN_API_KEYS_FILE" not in _env(ray)
        assert all(volume["name"] != "raytwin-api-keys" for volume in template["spec"]["volumes"])
    service = render_rayservice(parse_spec(SPECS["default"]))  # the API's cluster keeps its keys
    assert all(_env(t["spec"]["containers"][0])["RAYTWIN_API_KEYS_FILE"] for t in _pods(service))
    unauthenticated = render_rayjob(parse_spec(spec_data(security={"auth": "disabled"})), SWEEP_JOB)
    assert "env" not in unauthenticated["spec"]["submitterPodTemplate"]["spec"]["containers"][0]


def test_a_rayjob_has_a_deadline_from_the_spec() -> None:
    assert _render("default", Kind.RAYJOB)["spec"]["activeDeadlineSeconds"] == 86400
    assert _render("locked-down", Kind.RAYJOB)["spec"]["activeDeadlineSeconds"] == 3600
    with pytest.raises(SpecError, match="job.active_deadline_seconds: Input should be greater than 0"):
        parse_spec(spec_data(job={"active_deadline_seconds": 0}))
    for kind in (Kind.RAYCLUSTER, Kind.RAYSERVICE):
        assert "activeDeadlineSeconds" not in _render("default", kind)["spec"]


def test_a_rayservice_never_starts_a_second_cluster_on_the_leased_store(crds: CrdSchemas) -> None:
    """KubeRay's default `NewCluster` upgrade starts a second cluster whose Backend the serving cluster's store
    lease refuses for as long as it serves: `None` updates the Serve app in place instead."""
    service = _render("default", Kind.RAYSERVICE)
    assert service["spec"]["upgradeStrategy"] == {"type": "None"}
    assert "upgradeStrategy" not in service["spec"]["rayClusterConfig"]  # a RayCluster's own, KubeRay's default
    broken = copy.deepcopy(service)
    broken["spec"]["upgradeStrategy"]["maxSurgePercent"] = 50  # a misplaced field is still caught
    with pytest.raises(ManifestInvalid, match="'maxSurgePercent' was unexpected"):
        crds.validate(broken)


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}  # all RayTwin renders
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def _admits(policy: dict[str, Any], port: int, *, pod: dict[str, str] | None = None, namespace: str = "sim",
            ip: str | None = None) -> bool:
    """Whether `policy` lets a connection in to `port` of a selected pod: from a pod (`pod`, its labels) of
    `namespace`, or from outside the cluster (`ip`). NetworkPolicy semantics: a rule admits when its `ports`
    (absent: all) hold the port and any of its `from` peers (absent: everyone) matches; a peer with a
    namespaceSelector matches pods of those namespaces (and its podSelector), one without matches pods of
    the policy's namespace; an ipBlock matches addresses outside the cluster."""
    def peer_matches(peer: dict[str, Any]) -> bool:
        if "ipBlock" in peer:
            return ip is not None and ipaddress.ip_address(ip) in ipaddress.ip_network(peer["ipBlock"]["cidr"])
        if pod is None:
            return False
        in_namespace = (_matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
                        if "namespaceSelector" in peer else namespace == policy["metadata"]["namespace"])
        return in_namespace and _matches(peer.get("podSelector", {}), pod)

    for rule in policy["spec"]["ingress"]:
        if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
            continue
        if "from" not in rule or any(peer_matches(peer) for peer in rule["from"]):
            return True
    return False


RAY_POD = {"raytwin.io/cluster": "twin", "ray.io/node-type": "worker"}
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}


def test_the_network_policy_opens_only_the_api_to_clients() -> None:
    policy = render_network_policy(parse_spec(SPECS["default"]))
    assert policy["spec"]["podSelector"] == {"matchLabels": {"raytwin.io/cluster": "twin"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress (store, brokers) left open
    for port in (6379, 8265, 10001, 52365, 12345):  # Ray's own ports: between the cluster's pods only
        assert _admits(policy, port, pod=RAY_POD)
        assert not _admits(policy, port, pod={"app": "other"})
        assert not _admits(policy, port, ip="198.51.100.7")
    assert not _admits(policy, 6379, pod={"raytwin.io/cluster": "another-twin"})  # another spec's cluster
    assert _admits(policy, 8000, ip="198.51.100.7") and _admits(policy, 8000, pod={"app": "x"}, namespace="web")
    # the dashboard/job API: the KubeRay operator and this spec's RayJob submitters
    assert _admits(policy, 8265, pod=OPERATOR, namespace="default")
    assert not _admits(policy, 8265, pod=OPERATOR, namespace="tenant-a")
    assert not _admits(policy, 8265, pod={"app": "x"}, namespace="default")
    assert _admits(policy, 8265, pod={"raytwin.io/client-of": "twin"})
    assert not _admits(policy, 8265, pod={"raytwin.io/client-of": "twin"}, namespace="other")
    # the Ray client port: neither the operator nor `ray job submit` uses it, and nobody else is named
    assert not _admits(policy, 10001, pod=OPERATOR, namespace="default")
    assert not _admits(policy, 10001, pod={"raytwin.io/client-of": "twin"})
    assert not _admits(policy, 10001, ip="10.20.0.5")
    assert [rule for rule in policy["spec"]["ingress"] if "from" not in rule] == [  # open to all: the API only
        {"ports": [{"protocol": "TCP", "port": 8000}]}]
    assert _admits(policy, 8080, pod={"app": "prometheus"}, namespace="monitoring")
    assert not _admits(policy, 8080, pod={"app": "prometheus"}, namespace="web")
    assert not _admits(policy, 8265, pod={"app": "prometheus"}, namespace="monitoring")


@pytest.mark.parametrize("spec", ["default", "locked-down"])
def test_a_rayjobs_network_policy_opens_no_api_and_leaves_the_long_running_clusters_alone(spec: str) -> None:
    """A job's cluster serves no API; and with the long-running cluster's name and pod label, applying a RayJob
    replaced that cluster's policy (and policies add up, so either would have opened 8000 on the other's pods)."""
    job = render_network_policy(parse_spec(SPECS[spec]), Kind.RAYJOB)
    cluster = render_network_policy(parse_spec(SPECS[spec]), Kind.RAYCLUSTER)
    assert job["metadata"]["name"] == "twin-rayjob-raytwin" != cluster["metadata"]["name"] == "twin-raytwin"
    assert render_network_policy(parse_spec(SPECS[spec]), Kind.RAYSERVICE) == cluster  # one policy, the same rules
    job_pod = {"raytwin.io/job-cluster": "twin", "ray.io/node-type": "worker"}
    for outsider in ({"ip": "198.51.100.7"}, {"ip": "203.0.113.9"}, {"pod": {"app": "nginx"}, "namespace": "ingress-nginx"},
                     {"pod": OPERATOR, "namespace": "default"}, {"pod": RAY_POD}):
        assert not _admits(job, 8000, **outsider)
    assert _admits(job, 8000, pod=job_pod) and _admits(job, 6379, pod=job_pod)  # Ray's own ports, in the job
    assert not _admits(job, 6379, pod=RAY_POD) and not _admits(cluster, 6379, pod=job_pod)  # not across clusters
    assert not _matches(cluster["spec"]["podSelector"], job_pod) and not _matches(job["spec"]["podSelector"], RAY_POD)
    assert _admits(job, 8265, pod={"raytwin.io/client-of": "twin"})  # its submitter reaches the job API
    assert [r for r in job["spec"]["ingress"] if 8000 in [p["port"] for p in r.get("ports", [])]] == []


def test_the_network_policy_follows_the_specs_peers() -> None:
    policy = render_network_policy(parse_spec(SPECS["locked-down"]))
    assert _admits(policy, 8000, ip="203.0.113.9") and not _admits(policy, 8000, ip="198.51.100.7")
    assert _admits(policy, 8000, pod={"app": "nginx"}, namespace="ingress-nginx")
    assert not _admits(policy, 8000, pod={"app": "x"}, namespace="web")
    assert _admits(policy, 8000, pod=OPERATOR, namespace="ray-system")  # KubeRay's health checks of the proxies
    assert _admits(policy, 8265, ip="10.20.0.5") and not _admits(policy, 8265, ip="10.20.0.6")
    assert _admits(policy, 10001, pod={"app": "x"}, namespace="ops") and _admits(policy, 10001, ip="10.20.0.5")
    assert _admits(policy, 8265, pod=OPERATOR, namespace="ray-system")
    assert not _admits(policy, 10001, pod=OPERATOR, namespace="ray-system")
    assert not _admits(policy, 8265, pod=OPERATOR, namespace="default")
    assert not _admits(policy, 8080, pod={"app": "prometheus"}, namespace="monitoring")  # no Prometheus named
    with pytest.raises(SpecError, match="network_policy.operator_from.cidrs.0: '10.0.0.300/8' is not a CIDR"):
        parse_spec(spec_data(network_policy={"operator_from": {"cidrs": ["10.0.0.300/8"]}}))


def test_the_operator_is_found_by_the_labels_its_helm_release_gives_it() -> None:
    """The chart labels its pods `app.kubernetes.io/name: <nameOverride or kuberay-operator>`."""
    renamed = {"app.kubernetes.io/name": "ray-operator"}
    policy = render_network_policy(parse_spec(spec_data(network_policy={"kuberay_pod_labels": renamed,
                                                                         "api_from": {"cidrs": ["192.0.2.0/24"]}})))
    for port in (8265, 8000):
        assert _admits(policy, port, pod=renamed, namespace="default")
        assert not _admits(policy, port, pod=OPERATOR, namespace="default")
    for labels, message in (({}, "should have at least 1 item"),
                            ({"app kubernetes": "x"}, "String should match pattern"),
                            ({"app.kubernetes.io/name": "-x"}, "String should match pattern")):
        with pytest.raises(SpecError, match=f"network_policy.kuberay_pod_labels.*{message}"):
            parse_spec(spec_data(network_policy={"kuberay_pod_labels": labels}))


BROKEN_POLICIES = {
    "unknown field": (lambda p: p["spec"].update(podSelectors={}), "'podSelectors' was unexpected"),
    "no pod selector": (lambda p: p["spec"].pop("podSelector"), "'podSelector' is a required property"),
    "bad protocol": (lambda p: p["spec"]["ingress"][1]["ports"][0].update(protocol="HTTP"), "'HTTP' is not one of"),
    "ipBlock without cidr": (lambda p: p["spec"]["ingress"][0]["from"].append({"ipBlock": {}}),
                             "'cidr' is a required property"),
    "empty peer": (lambda p: p["spec"]["ingress"][0]["from"].append({}), "should be non-empty"),
    "policy type": (lambda p: p["spec"].update(policyTypes=["ingress"]), "'ingress' is not one of"),
    "apiVersion": (lambda p: p.update(apiVersion="networking.k8s.io/v1beta1"),
                   "is not one of ['networking.k8s.io/v1']"),
}


@pytest.mark.parametrize("case", BROKEN_POLICIES)
def test_a_malformed_network_policy_is_refused(case: str) -> None:
    break_it, message = BROKEN_POLICIES[case]
    policy = render_network_policy(parse_spec(SPECS["default"]))
    break_it(policy)
    with pytest.raises(ManifestInvalid, match="does not match the networking.k8s.io/v1 NetworkPolicy shape") as bad:
        validate_network_policy(policy)
    assert message in str(bad.value)


def test_render_writes_the_policy_as_a_second_document_unless_switched_off(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPECS["default"]))
    result = CliRunner().invoke(cluster_app, ["render", str(spec_file), "--crds", str(CRD_DIR), "--kind", "rayservice"])
    assert result.exit_code == 0, result.output
    assert [doc["kind"] for doc in yaml.safe_load_all(result.output)] == ["RayService", "NetworkPolicy"]
    spec_file.write_text(yaml.safe_dump(spec_data(network_policy={"enabled": False})))
    result = CliRunner().invoke(cluster_app, ["render", str(spec_file), "--crds", str(CRD_DIR)])
    assert [doc["kind"] for doc in yaml.safe_load_all(result.output)] == ["RayCluster"]
