"""The model registry stores content-hashed artifacts locally and on S3 and refuses overwrites."""

from __future__ import annotations

import pickle

import pytest

from raytwin.contracts import AssetType
from raytwin.registry import ModelRegistry, RegistryError, VersionConflict
from raytwin.sim import BATTERY_ECM, THERMAL_RC

THERMAL = AssetType.from_model(THERMAL_RC)


@pytest.fixture(params=["local", "s3"])
def registry(request, tmp_path):
    if request.param == "local":
        return ModelRegistry(str(tmp_path / "models"))
    return ModelRegistry(request.getfixturevalue("s3_url") + "/registry")


def test_register_and_get_returns_the_identical_artifact(registry):
    art = registry.register("office-zone", "1.0.0", THERMAL, {"C_in": 2.4e6}, {"site": "berlin"})
    again = registry.get("office-zone@1.0.0")
    assert again == art and again.content_hash == art.content_hash
    assert again.parameters["C_in"] == 2.4e6 and again.parameters["R_im"] == THERMAL_RC.default_params()["R_im"]
    assert again.model() is THERMAL_RC
    # same content again is accepted and idempotent
    assert registry.register("office-zone", "1.0.0", THERMAL, {"C_in": 2.4e6}, {"site": "berlin"}) == art


def test_of_two_registrations_of_one_version_racing_the_second_is_refused(registry, monkeypatch):
    """A drift recalibration registering the next free patch version in its own process, and a tenant registering
    the same version: both found it free, and the second pointer written replaced the first, both answered as
    registered (a registered version's content changed under its first registrant's run record). The pointer is
    created exclusively: the one that comes second is refused as if the version had been there before."""
    rival = ModelRegistry(registry.url)  # another process's registry (the filesystem object is shared: once)
    exists, raced = registry.fs.exists, []

    def other_registers_after_the_check(path: str) -> bool:
        found = exists(path)
        if not raced and path.endswith("office-zone/2.0.1.json"):
            raced.append(None)
            raced[0] = rival.register("office-zone", "2.0.1", THERMAL, {"C_in": 2.4e6})
        return found

    monkeypatch.setattr(registry.fs, "exists", other_registers_after_the_check)
    with pytest.raises(VersionConflict, match="already registered with different content"):
        registry.register("office-zone", "2.0.1", THERMAL, {"C_in": 2.5e6})
    assert registry.get("office-zone@2.0.1") == raced[0]
    assert registry.register("office-zone", "2.0.1", THERMAL, {"C_in": 2.4e6}) == raced[0]  # the same: no conflict


def test_parameters_not_given_are_the_asset_types_declared_defaults(registry):
    """A published type's defaults are what its version runs (not the simulator's typical values)."""
    declared = THERMAL.model_copy(update={"parameters": {**THERMAL.parameters, "R_io": THERMAL.parameters[
        "R_io"].model_copy(update={"default": 0.02})}})
    art = registry.register("office-zone", "1.2.0", declared, {"C_in": 2.4e6})
    assert THERMAL_RC.default_params()["R_io"] != 0.02
    assert (art.parameters["R_io"], art.parameters["C_in"]) == (0.02, 2.4e6)


def test_different_content_under_an_existing_version_is_refused(registry):
    registry.register("office-zone", "1.0.0", THERMAL, {"C_in": 2.4e6})
    with pytest.raises(VersionConflict, match="already registered with different content") as conflict:
        registry.register("office-zone", "1.0.0", THERMAL, {"C_in": 2.5e6})
    assert conflict.value.differences == ("parameter C_in: registered 2400000.0, new 2500000.0",)
    assert "parameter C_in: registered 2400000.0, new 2500000.0; register a new version" in str(conflict.value)
    wider = THERMAL.model_copy(update={"parameters": {**THERMAL.parameters, "C_in": THERMAL.parameters[
        "C_in"].model_copy(update={"upper": 9e9, "default": 2.4e6})}})
    with pytest.raises(VersionConflict) as conflict:
        registry.register("office-zone", "1.0.0", wider)
    assert conflict.value.differences == ("the asset type differs at parameters.C_in.upper",)  # not its default
    with pytest.raises(VersionConflict, match="its metadata differs") as conflict:  # the same model
        registry.register("office-zone", "1.0.0", THERMAL, {"C_in": 2.4e6}, {"published_by": "key-2"})
    assert conflict.value.differences == () and conflict.value.existing == registry.get("office-zone@1.0.0")
    registry.register("office-zone", "1.1.0", THERMAL, {"C_in": 2.5e6})
    registry.register("office-zone", "1.10.0", THERMAL, {"C_in": 2.6e6})
    assert registry.versions("office-zone") == ["1.0.0", "1.1.0", "1.10.0"]
    assert registry.get("office-zone@1.0.0").parameters["C_in"] == 2.4e6


def test_errors_are_clear(registry):
    registry.register("cell", "0.1.0", AssetType.from_model(BATTERY_ECM))
    versions = "; versions: \\['0.1.0'\\]"
    with pytest.raises(RegistryError, match=f"^no model cell@0.2.0 in this registry{versions}$") as unknown:
        registry.get("cell@0.2.0")
    with pytest.raises(RegistryError, match="^no model cell@0.2.0 in this registry$") as unremovable:
        registry.remove("cell@0.2.0")
    for refused in (unknown.value, unremovable.value, pickle.loads(pickle.dumps(unknown.value))):  # Ray pickles it
        assert refused.registry_url == registry.url  # where it looked: for operators, not in the HTTP answer
    with pytest.raises(RegistryError, match="must look like name@1.2.3"):
        registry.get("cell")
    with pytest.raises(RegistryError, match="outside"):
        registry.register("cell", "0.3.0", AssetType.from_model(BATTERY_ECM), {"q": -1.0})
    with pytest.raises(RegistryError, match=r"^cell@0.3.0: model battery_ecm has no parameter\(s\) \['capacity'\]; "
                       r"known: \[.*'r0'.*\]$"):  # a KeyError before, which callers catching RegistryError missed
        registry.register("cell", "0.3.0", AssetType.from_model(BATTERY_ECM), {"capacity": 2.0})
    assert registry.names() == ["cell"]


def test_tampered_store_is_detected(tmp_path):
    registry = ModelRegistry(str(tmp_path))
    art = registry.register("zone", "1.0.0", THERMAL)
    blob = tmp_path / "blobs" / "sha256" / f"{art.content_hash}.json"
    blob.write_text(blob.read_text().replace('"C_in":2000000.0', '"C_in":2100000.0'))
    with pytest.raises(RegistryError, match="does not match its hash"):
        registry.get("zone@1.0.0")


def test_an_fmu_of_another_registry_is_refused_also_through_dot_dot(tmp_path):
    """Tenant registries are siblings (`{store}/registry/{tenant}`): `acme/fmus/../../globex/fmus/<sha256>.fmu`
    starts with acme's `fmus/` yet names globex's stored FMU, and acme's asset type ran globex's native code."""
    acme = ModelRegistry(str(tmp_path / "registry" / "acme"))
    digest = "a" * 64
    acme.check_fmu_store("vdp@1.0.0", f"{acme.root}/fmus/{digest}.fmu")  # its own: taken
    for climbing in (f"{acme.root}/fmus/../../globex/fmus/{digest}.fmu", f"{acme.root}/fmus/x/../{digest}.fmu",
                     f"file://{acme.root}/fmus/../../globex/fmus/{digest}.fmu"):
        with pytest.raises(RegistryError, match="is not stored in this registry"):
            acme.check_fmu_store("vdp@1.0.0", climbing)
