"""Apply/status/delete through the official kubernetes client, against a fake API server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from typer.testing import CliRunner

from cluster.cli import cluster_app
from cluster.kube import KubeRayClient, KubeRayNotFound
from cluster.manifests import Kind, render_raycluster, render_rayservice
from cluster.spec import parse_spec
from tests.fixtures_cluster import CRD_DIR, spec_data
from tests.fixtures_cluster_kube import FakeKubeApi

CLUSTERS = "/apis/ray.io/v1/namespaces/sim/rayclusters"
POLICIES = "/apis/networking.k8s.io/v1/namespaces/sim/networkpolicies"


@pytest.fixture
def fake_api() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as fake:
        yield fake


@pytest.fixture
def kuberay(fake_api: FakeKubeApi) -> KubeRayClient:
    configuration = client.Configuration(host=fake_api.url)
    return KubeRayClient(client.ApiClient(configuration), namespace="sim")


def _calls(fake: FakeKubeApi) -> list[tuple[str, str]]:
    return [(request.method, request.path.split("?")[0]) for request in fake.requests]


def test_apply_creates_a_missing_object(fake_api: FakeKubeApi, kuberay: KubeRayClient) -> None:
    manifest = render_raycluster(parse_spec(spec_data()))
    action, stored = kuberay.apply(manifest)
    assert action == "created" and stored["metadata"]["resourceVersion"] == "1"
    assert _calls(fake_api) == [("POST", CLUSTERS)]
    assert fake_api.requests[0].body == manifest


def test_apply_replaces_an_existing_object_with_its_resource_version(
    fake_api: FakeKubeApi, kuberay: KubeRayClient
) -> None:
    kuberay.apply(render_raycluster(parse_spec(spec_data())))
    bigger = render_raycluster(parse_spec(spec_data(head={"cpu": 4, "memory": "8Gi"})))
    action, stored = kuberay.apply(bigger)
    assert action == "replaced"
    assert _calls(fake_api) == [
        ("POST", CLUSTERS), ("POST", CLUSTERS), ("GET", f"{CLUSTERS}/twin"), ("PUT", f"{CLUSTERS}/twin")
    ]
    put = fake_api.requests[-1].body
    assert put["metadata"]["resourceVersion"] == "1"
    assert put["spec"] == bigger["spec"]
    assert stored["metadata"]["resourceVersion"] == "2"
    assert fake_api.objects[("sim", "rayclusters", "twin")]["spec"] == bigger["spec"]


def test_apply_other_kinds_uses_their_plural_path(fake_api: FakeKubeApi, kuberay: KubeRayClient) -> None:
    kuberay.apply(render_rayservice(parse_spec(spec_data())))
    assert _calls(fake_api) == [("POST", "/apis/ray.io/v1/namespaces/sim/rayservices")]


def test_status_reads_the_operator_status_and_reports_missing_objects(
    fake_api: FakeKubeApi, kuberay: KubeRayClient
) -> None:
    kuberay.apply(render_raycluster(parse_spec(spec_data())))
    assert kuberay.status(Kind.RAYCLUSTER, "twin") == {}
    fake_api.objects[("sim", "rayclusters", "twin")]["status"] = {"state": "ready", "availableWorkerReplicas": 1}
    assert kuberay.status(Kind.RAYCLUSTER, "twin") == {"state": "ready", "availableWorkerReplicas": 1}
    with pytest.raises(KubeRayNotFound, match="RayCluster sim/ghost not found"):
        kuberay.status(Kind.RAYCLUSTER, "ghost")


def test_delete_is_idempotent(fake_api: FakeKubeApi, kuberay: KubeRayClient) -> None:
    kuberay.apply(render_raycluster(parse_spec(spec_data())))
    assert kuberay.delete(Kind.RAYCLUSTER, "twin") is True
    assert kuberay.delete(Kind.RAYCLUSTER, "twin") is False
    assert _calls(fake_api)[1:] == [("DELETE", f"{CLUSTERS}/twin")] * 2
    assert not fake_api.objects


def test_a_concurrent_change_makes_replace_fail_instead_of_overwriting(
    fake_api: FakeKubeApi, kuberay: KubeRayClient
) -> None:
    manifest = render_raycluster(parse_spec(spec_data()))
    kuberay.apply(manifest)
    stale = {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": "0"}}
    with pytest.raises(ApiException) as conflict:
        kuberay.api.replace_namespaced_custom_object("ray.io", "v1", "sim", "rayclusters", "twin", stale)
    assert conflict.value.status == 409


def test_cli_apply_status_delete_through_a_kubeconfig(fake_api: FakeKubeApi, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake_api.url}}],
        "users": [{"name": "me", "user": {"token": "test-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
    }))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_data()))
    common = ["--kubeconfig", str(kubeconfig)]
    runner = CliRunner()

    first = runner.invoke(cluster_app, ["apply", str(spec_file), "--crds", str(CRD_DIR), *common])
    again = runner.invoke(cluster_app, ["apply", str(spec_file), "--crds", str(CRD_DIR), *common])
    assert (first.exit_code, again.exit_code) == (0, 0), first.output + again.output
    assert "RayCluster sim/twin created" in first.output and "RayCluster sim/twin replaced" in again.output
    # the spec's NetworkPolicy goes with it, created then replaced with its resourceVersion
    assert "NetworkPolicy sim/twin-raytwin created" in first.output
    assert "NetworkPolicy sim/twin-raytwin replaced" in again.output
    assert fake_api.requests[0].body["kind"] == "RayCluster"
    assert _calls(fake_api)[-3:] == [("POST", POLICIES), ("GET", f"{POLICIES}/twin-raytwin"),
                                     ("PUT", f"{POLICIES}/twin-raytwin")]
    assert fake_api.requests[-1].body["metadata"]["resourceVersion"] == "2"
    assert fake_api.objects[("sim", "networkpolicies", "twin-raytwin")]["spec"]["podSelector"] == {
        "matchLabels": {"raytwin.io/cluster": "twin"}}

    fake_api.objects[("sim", "rayclusters", "twin")]["status"] = {"state": "ready"}
    status = runner.invoke(cluster_app, ["status", "twin", "-n", "sim", *common])
    assert status.exit_code == 0 and yaml.safe_load(status.output) == {"state": "ready"}

    deleted = runner.invoke(cluster_app, ["delete", "twin", "-n", "sim", *common])
    missing = runner.invoke(cluster_app, ["status", "twin", "-n", "sim", *common])
    assert "RayCluster sim/twin deleted" in deleted.output
    assert missing.exit_code == 1 and "not found" in missing.output

    job = runner.invoke(cluster_app, ["apply", str(spec_file), "--crds", str(CRD_DIR), "--kind", "rayjob", *common,
                                      "--", "raytwin", "sweep", "run", "spec.json"])
    assert job.exit_code == 0, job.output
    [submitted] = [r for r in fake_api.requests if r.path.startswith("/apis/ray.io/v1/namespaces/sim/rayjobs")]
    assert submitted.body["spec"]["entrypoint"] == "raytwin sweep run spec.json"


def test_cli_apply_refuses_an_invalid_spec_without_calling_the_api(fake_api: FakeKubeApi, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_data(worker_groups=[{"name": "gpu", "cpu": 1, "memory": "1Gi",
                                                                  "gpus": 1, "max_replicas": 1}])))
    result = CliRunner().invoke(cluster_app, ["apply", str(spec_file), "--crds", str(CRD_DIR)],
                                env={"KUBECONFIG": str(tmp_path / "none")})
    assert result.exit_code == 1 and "needs its own CUDA-enabled image" in result.output
    assert fake_api.requests == []


@pytest.mark.parametrize("command", ["apply", "status", "delete"])
def test_cli_without_a_kubeconfig_says_what_to_set_in_one_line(tmp_path: Path, command: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    monkeypatch.delenv("KUBECONFIG", raising=False)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_data()))
    args = {"apply": ["apply", str(spec_file), "--crds", str(CRD_DIR)], "status": ["status", "twin"],
            "delete": ["delete", "twin"]}[command]
    result = CliRunner().invoke(cluster_app, args)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "set KUBECONFIG or pass --kubeconfig" in result.output
    broken = tmp_path / "broken"
    broken.write_text("clusters: [")
    result = CliRunner().invoke(cluster_app, [*args, "--kubeconfig", str(broken)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert str(broken) in result.output
