"""Apply/status/delete through the official kubernetes client, against a fake API server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from typer.testing import CliRunner

from cluster.cli import cluster_app
from cluster.kube import KubeRayClient, KubeRayNotFound
from cluster.manifests import Kind, render, render_raycluster, render_rayservice
from cluster.network_policy import render_network_policy
from cluster.spec import parse_spec
from tests.fixtures_cluster import CRD_DIR, spec_data
from tests.fixtures_cluster_kube import FakeKubeApi

CLUSTERS = "/apis/ray.io/v1/namespaces/sim/rayclusters"
POLICIES = "/apis/networking.k8s.io/v1/namespaces/sim/networkpolicies"
OWNED_POLICY_DELETED = ("NetworkPolicy sim/twin-raytwin deleted with it by Kubernetes' garbage collector "
                        "(owned by RayCluster sim/twin)")
LEFT_POLICY_DELETED = "NetworkPolicy sim/twin-raytwin deleted (it had no owner reference: applied by an older raytwin)"


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
    assert kuberay.delete(Kind.RAYCLUSTER, "twin") == ["RayCluster sim/twin deleted"]
    assert kuberay.delete(Kind.RAYCLUSTER, "twin") == ["RayCluster sim/twin not found"]
    assert _calls(fake_api)[1:] == [("GET", f"{CLUSTERS}/twin"), ("GET", POLICIES), ("DELETE", f"{CLUSTERS}/twin"),
                                    ("GET", f"{CLUSTERS}/twin"), ("GET", POLICIES)]
    assert not fake_api.objects


def _apply_with_policy(kuberay: KubeRayClient, kind: Kind = Kind.RAYCLUSTER, owned: bool = True,
                       job_name: str | None = None) -> dict[str, Any]:
    """Apply `kind` of the test spec and its NetworkPolicy, owned by it (as `cluster apply` does) or not (as
    RayTwin did before owner references); returns the stored KubeRay object."""
    spec = parse_spec(spec_data())
    entrypoint = ["raytwin", "sweep", "run", "s.json"] if kind is Kind.RAYJOB else []
    _, stored = kuberay.apply(render(spec, kind, entrypoint, job_name))
    kuberay.apply(render_network_policy(spec, kind), stored if owned else None)
    return stored


def _owners(fake: FakeKubeApi, policy: str = "twin-raytwin") -> list[tuple[str, str, str]]:
    references = fake.objects[("sim", "networkpolicies", policy)]["metadata"].get("ownerReferences", [])
    return [(reference["kind"], reference["name"], reference["uid"]) for reference in references]


def _uid(fake: FakeKubeApi, plural: str, name: str = "twin") -> str:
    return fake.objects[("sim", plural, name)]["metadata"]["uid"]


def _assert_gone_and_a_second_delete_says_not_found(fake: FakeKubeApi, kuberay: KubeRayClient, kind: Kind) -> None:
    assert not fake.objects
    assert kuberay.delete(kind, "twin") == [f"{kind.kind} sim/twin not found"]


def test_delete_leaves_no_policy_and_a_second_delete_says_not_found(
    fake_api: FakeKubeApi, kuberay: KubeRayClient
) -> None:
    _apply_with_policy(kuberay)
    assert kuberay.delete(Kind.RAYCLUSTER, "twin") == ["RayCluster sim/twin deleted", OWNED_POLICY_DELETED]
    assert ("DELETE", f"{POLICIES}/twin-raytwin") not in _calls(fake_api)  # the policy went with its owner
    _assert_gone_and_a_second_delete_says_not_found(fake_api, kuberay, Kind.RAYCLUSTER)


def test_delete_removes_a_policy_applied_without_owner_unless_other_pods_use_it(
    fake_api: FakeKubeApi, kuberay: KubeRayClient
) -> None:
    _apply_with_policy(kuberay, owned=False)  # as applied by an older raytwin
    _apply_with_policy(kuberay, Kind.RAYSERVICE, owned=False)  # the same policy selects its pods
    assert kuberay.delete(Kind.RAYCLUSTER, "twin")[1:] == [
        "NetworkPolicy sim/twin-raytwin kept: the pods of RayService sim/twin use it too (it has no owner reference)"]
    assert ("sim", "networkpolicies", "twin-raytwin") in fake_api.objects
    assert kuberay.delete(Kind.RAYSERVICE, "twin") == ["RayService sim/twin deleted", LEFT_POLICY_DELETED]
    _assert_gone_and_a_second_delete_says_not_found(fake_api, kuberay, Kind.RAYSERVICE)


def test_reapplying_one_of_two_resources_an_older_raytwin_applied_makes_both_own_the_policy(
    fake_api: FakeKubeApi, kuberay: KubeRayClient
) -> None:
    _apply_with_policy(kuberay, owned=False)
    service = _apply_with_policy(kuberay, Kind.RAYSERVICE, owned=False)
    _apply_with_policy(kuberay)  # after the upgrade, the RayCluster only: the RayService's pods use the policy too
    assert _owners(fake_api) == [("RayService", "twin", service["metadata"]["uid"]),
                                 ("RayCluster", "twin", _uid(fake_api, "rayclusters"))]
    assert kuberay.delete(Kind.RAYCLUSTER, "twin")[1:] == [
        "NetworkPolicy sim/twin-raytwin kept: also owned by RayService sim/twin"]
    assert ("sim", "networkpolicies", "twin-raytwin") in fake_api.objects


def test_delete_of_a_gone_cluster_removes_the_policy_an_older_raytwin_left(
    fake_api: FakeKubeApi, kuberay: KubeRayClient
) -> None:
    _apply_with_policy(kuberay, owned=False)
    kuberay.api.delete_namespaced_custom_object("ray.io", "v1", "sim", "rayclusters", "twin")  # the old `delete`
    assert kuberay.delete(Kind.RAYCLUSTER, "twin") == ["RayCluster sim/twin not found", LEFT_POLICY_DELETED]
    _assert_gone_and_a_second_delete_says_not_found(fake_api, kuberay, Kind.RAYCLUSTER)


def test_a_shared_policy_is_owned_by_each_applier_and_deleted_with_the_last(
    fake_api: FakeKubeApi, kuberay: KubeRayClient
) -> None:
    _apply_with_policy(kuberay)
    _apply_with_policy(kuberay, Kind.RAYSERVICE)  # replaces the policy: the RayCluster's reference stays
    assert _owners(fake_api) == [("RayCluster", "twin", _uid(fake_api, "rayclusters")),
                                 ("RayService", "twin", _uid(fake_api, "rayservices"))]
    assert kuberay.delete(Kind.RAYCLUSTER, "twin")[1:] == [
        "NetworkPolicy sim/twin-raytwin kept: also owned by RayService sim/twin"]
    assert _owners(fake_api) == [("RayService", "twin", _uid(fake_api, "rayservices"))]
    kuberay.delete(Kind.RAYSERVICE, "twin")
    assert not fake_api.objects
    # a spec's RayJobs share theirs the same way
    _apply_with_policy(kuberay, Kind.RAYJOB, job_name="sweep-1")
    _apply_with_policy(kuberay, Kind.RAYJOB, job_name="sweep-2")
    assert [name for _, name, _ in _owners(fake_api, "twin-rayjob-raytwin")] == ["sweep-1", "sweep-2"]
    assert kuberay.delete(Kind.RAYJOB, "sweep-1")[1:] == [
        "NetworkPolicy sim/twin-rayjob-raytwin kept: also owned by RayJob sim/sweep-2"]
    kuberay.delete(Kind.RAYJOB, "sweep-2")
    assert not fake_api.objects


def test_reapplying_before_the_garbage_collector_ran_creates_the_policy_anew() -> None:
    """The collector, about to delete the gone RayCluster's policy, deletes by uid: a replaced policy would go too."""
    with FakeKubeApi(garbage_collector=False) as fake:
        kuberay = KubeRayClient(client.ApiClient(client.Configuration(host=fake.url)), namespace="sim")
        _apply_with_policy(kuberay)
        kuberay.delete(Kind.RAYCLUSTER, "twin")
        left = _uid(fake, "networkpolicies", "twin-raytwin")  # owned by a gone RayCluster, not yet collected
        _apply_with_policy(kuberay)
        assert _calls(fake)[-4:] == [("POST", POLICIES), ("GET", f"{POLICIES}/twin-raytwin"),
                                     ("DELETE", f"{POLICIES}/twin-raytwin"), ("POST", POLICIES)]
        assert _uid(fake, "networkpolicies", "twin-raytwin") != left
        assert _owners(fake) == [("RayCluster", "twin", _uid(fake, "rayclusters"))]
        fake.collect_garbage()
        assert ("sim", "networkpolicies", "twin-raytwin") in fake.objects


def test_a_replaced_policy_keeps_live_owners_and_drops_a_predecessors_uid(
    fake_api: FakeKubeApi, kuberay: KubeRayClient
) -> None:
    service = _apply_with_policy(kuberay, Kind.RAYSERVICE)
    _apply_with_policy(kuberay)
    fake_api.garbage_collector = False  # the RayCluster deleted, the collector has not run yet
    kuberay.delete(Kind.RAYCLUSTER, "twin")
    left = _uid(fake_api, "networkpolicies", "twin-raytwin")
    _apply_with_policy(kuberay)  # replaced in place: the RayService's pods are never without their policy
    assert _uid(fake_api, "networkpolicies", "twin-raytwin") == left
    assert _owners(fake_api) == [("RayService", "twin", service["metadata"]["uid"]),
                                 ("RayCluster", "twin", _uid(fake_api, "rayclusters"))]


def test_a_concurrent_change_makes_replace_fail_instead_of_overwriting(
    fake_api: FakeKubeApi, kuberay: KubeRayClient
) -> None:
    manifest = render_raycluster(parse_spec(spec_data()))
    kuberay.apply(manifest)
    stale = {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": "0"}}
    with pytest.raises(ApiException) as conflict:
        kuberay.api.replace_namespaced_custom_object("ray.io", "v1", "sim", "rayclusters", "twin", stale)
    assert conflict.value.status == 409


@pytest.fixture
def kubeconfig(fake_api: FakeKubeApi, tmp_path: Path) -> Path:
    """A kubeconfig whose only context is the fake API server."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake_api.url}}],
        "users": [{"name": "me", "user": {"token": "test-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
    }))
    return path


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_data()))
    return path


def test_cli_apply_creates_the_kuberay_object_first_and_the_policy_owned_by_its_uid(
    fake_api: FakeKubeApi, kubeconfig: Path, spec_file: Path
) -> None:
    common = ["--crds", str(CRD_DIR), "--kubeconfig", str(kubeconfig)]
    runner = CliRunner()
    first = runner.invoke(cluster_app, ["apply", str(spec_file), *common])
    assert first.exit_code == 0, first.output
    assert "NetworkPolicy sim/twin-raytwin created (owned by RayCluster sim/twin)" in first.output
    assert _calls(fake_api) == [("POST", CLUSTERS), ("POST", POLICIES)]
    [reference] = fake_api.objects[("sim", "networkpolicies", "twin-raytwin")]["metadata"]["ownerReferences"]
    assert reference == {"apiVersion": "ray.io/v1", "kind": "RayCluster", "name": "twin",
                         "uid": _uid(fake_api, "rayclusters"), "controller": False, "blockOwnerDeletion": False}
    again = runner.invoke(cluster_app, ["apply", str(spec_file), *common])
    assert "NetworkPolicy sim/twin-raytwin replaced (owned by RayCluster sim/twin)" in again.output
    assert fake_api.requests[-1].body["metadata"]["ownerReferences"] == [reference]

    deleted = runner.invoke(cluster_app, ["delete", "twin", "-n", "sim", "--kubeconfig", str(kubeconfig)])
    assert deleted.exit_code == 0, deleted.output
    assert deleted.output.splitlines() == [
        "RayCluster sim/twin deleted",
        OWNED_POLICY_DELETED]
    assert not fake_api.objects
    twice = runner.invoke(cluster_app, ["delete", "twin", "-n", "sim", "--kubeconfig", str(kubeconfig)])
    assert (twice.exit_code, twice.output) == (0, "RayCluster sim/twin not found\n")


def test_cli_delete_without_leave_to_list_policies_says_so_and_deletes_nothing(
    fake_api: FakeKubeApi, kuberay: KubeRayClient, kubeconfig: Path
) -> None:
    _apply_with_policy(kuberay, owned=False)
    fake_api.forbidden.add(("GET", "networkpolicies"))
    result = CliRunner().invoke(cluster_app, ["delete", "twin", "-n", "sim", "--kubeconfig", str(kubeconfig)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "needs `list` and `delete` on networkpolicies" in result.output and "nothing was deleted" in result.output
    assert len(fake_api.objects) == 2


def test_cli_apply_status_delete_through_a_kubeconfig(fake_api: FakeKubeApi, kubeconfig: Path,
                                                      spec_file: Path) -> None:
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
    assert "(~/.kube/config: no such file: ~/.kube/config)" in result.output  # not "Invalid kube-config file"
    result = CliRunner().invoke(cluster_app, [*args, "--kubeconfig", str(tmp_path / "typo")])
    assert result.exit_code == 2 and f"no such file: {tmp_path / 'typo'}" in result.output, result.output
    broken = tmp_path / "broken"
    broken.write_text("clusters: [")
    result = CliRunner().invoke(cluster_app, [*args, "--kubeconfig", str(broken)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert str(broken) in result.output
