"""The registry pins each model's code: who ships it, which version, a hash of its source; a changed
model is refused at resolve with what changed and how to proceed; the code reaches Ray workers."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

import raytwin.sim
from raytwin.contracts import AssetType
from raytwin.modelcode import ModelCodeError, code_digest, code_identity, describe_change, file_code, model_runtime_env
from raytwin.registry import ALLOW_CODE_CHANGE_ENV, ModelCodeChanged, ModelRegistry
from raytwin.sim import THERMAL_RC
from raytwin.storage import canonical_json
from serve_apps.errors import Conflict
from serve_apps.type_models import registered as registered_model

PHYSICS = "def leak(t, t_out, r):\n    return (t_out - t) / r\n"
MODEL = textwrap.dedent('''
    from raytwin.sim.model import Input, Model, Output, Param, State
    from pumpkit.physics import leak

    def _coefficients(p):
        return p

    def _derivative(x, u, c):
        return ((leak(x[0], u[0], c[1]) + u[1]) / c[0],)

    def _output(x, u, c):
        return (x[0],)

    MODEL = Model(
        name="pump_casing", version="1.0.0", description="a pump casing's temperature",
        states=(State("T", "K", "casing temperature", 200.0, 500.0, nominal=300.0, prior_std=1.0, process_std=1e-2),),
        inputs=(Input("T_out", "K", "ambient", 200.0, 400.0, nominal=290.0), Input("P", "W", "losses", 0.0, 1e5,
                nominal=100.0)),
        params=(Param("C", "J/K", 1e4, 1e3, 1e6), Param("R", "K/W", 0.1, 1e-3, 10.0)),
        outputs=(Output("T", "K", "casing temperature", 200.0, 500.0, measurement_std=0.1),),
        coefficients=_coefficients, derivative=_derivative, output=_output, default_dt=1.0,
    )
''')


@pytest.fixture
def pumpkit(tmp_path, monkeypatch):
    """A user's model package, not installed (importable from a directory), found by its import path."""
    package = tmp_path / "pumpkit"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "physics.py").write_text(PHYSICS)
    (package / "model.py").write_text(MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = importlib.import_module("pumpkit.model").MODEL
    yield package, model
    for name in [m for m in sys.modules if m.split(".")[0] == "pumpkit"]:
        del sys.modules[name]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_builtin_model_is_pinned_to_the_raytwin_distribution_and_its_module(tmp_path):
    artifact = ModelRegistry(str(tmp_path)).register("zone", "1.0.0", AssetType.from_model(THERMAL_RC))
    thermal = Path(raytwin.sim.thermal.__file__)
    assert artifact.code.kind == "python" and artifact.code.distribution == "raytwin"
    assert artifact.code.version == raytwin.__version__
    assert artifact.code.parts == {"raytwin.sim.thermal": _sha(thermal)}
    assert model_runtime_env([THERMAL_RC]) == {}  # RayTwin itself is on every worker


def test_a_user_model_pins_its_modules_and_the_helpers_it_calls(tmp_path, pumpkit):
    package, model = pumpkit
    artifact = ModelRegistry(str(tmp_path / "models")).register("pump", "1.0.0", AssetType.from_model(model))
    assert artifact.code.distribution is None and artifact.code.version is None  # not installed
    assert artifact.code.parts == {"pumpkit.model": _sha(package / "model.py"),
                                   "pumpkit.physics": _sha(package / "physics.py")}
    assert model_runtime_env([model, THERMAL_RC]) == {"py_modules": [str(package)]}



def test_a_flat_model_module_pins_the_helper_module_beside_it_and_ships_it(tmp_path, monkeypatch):
    """`my_models.py` calling `helpers.py` (the README's flat layout): a changed helper changed the physics
    under the same registered version, silently, and workers were not given it."""
    (tmp_path / "casing_helpers.py").write_text(PHYSICS)
    (tmp_path / "casing_model.py").write_text(MODEL.replace("from pumpkit.physics import leak",
                                                            "from casing_helpers import leak"))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        model = importlib.import_module("casing_model").MODEL
        registry = ModelRegistry(str(tmp_path / "models"))
        registry.register("casing", "1.0.0", AssetType.from_model(model))
        assert set(registry.get("casing@1.0.0").code.parts) == {"casing_model", "casing_helpers"}
        assert model_runtime_env([model]) == {"py_modules": [str(tmp_path / "casing_model.py"),
                                                             str(tmp_path / "casing_helpers.py")]}
        (tmp_path / "casing_helpers.py").write_text(PHYSICS.replace("/ r", "/ (5 * r)"))
        with pytest.raises(ModelCodeChanged, match="module casing_helpers changed"):
            registry.get("casing@1.0.0")
    finally:
        for name in ("casing_model", "casing_helpers"):
            sys.modules.pop(name, None)



def test_a_constant_from_a_helper_module_is_pinned_and_an_older_narrower_pin_still_resolves(tmp_path, monkeypatch):
    """`from casing_constants import FACTOR` is code as much as a function (a changed number ran silently under
    the same version); an artifact pinned before this rule (fewer parts, all unchanged) still resolves."""
    (tmp_path / "casing_constants.py").write_text("FACTOR = 1.0\n")
    (tmp_path / "casing_const_model.py").write_text(MODEL.replace(
        "from pumpkit.physics import leak", "from casing_constants import FACTOR\n" + PHYSICS).replace(
        "+ u[1]) / c[0]", "+ u[1]) * FACTOR / c[0]"))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        model = importlib.import_module("casing_const_model").MODEL
        registry = ModelRegistry(str(tmp_path / "models"))
        registered = registry.register("casing", "1.0.0", AssetType.from_model(model))
        assert set(registered.code.parts) == {"casing_const_model", "casing_constants"}
        older = registered.model_copy(update={"code": registered.code.model_copy(update={
            "parts": {"casing_const_model": registered.code.parts["casing_const_model"]}, "sha256": "0" * 64})})
        assert older.code_change() is None  # its one part is unchanged
        (tmp_path / "casing_constants.py").write_text("FACTOR = 5.0\n")
        with pytest.raises(ModelCodeChanged, match="module casing_constants changed"):
            registry.get("casing@1.0.0")
    finally:
        for name in ("casing_const_model", "casing_constants"):
            sys.modules.pop(name, None)

def test_the_core_packages_are_those_the_distribution_ships():
    import tomllib

    from raytwin.modelcode import CORE_PACKAGES

    found = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert {p.rstrip("*") for p in found["tool"]["setuptools"]["packages"]["find"]["include"]} == CORE_PACKAGES

def test_a_changed_model_is_refused_at_resolve_with_what_changed_and_how_to_proceed(tmp_path, pumpkit, monkeypatch):
    package, model = pumpkit
    registry = ModelRegistry(str(tmp_path / "models"))
    registered = registry.register("pump", "1.0.0", AssetType.from_model(model))
    (package / "physics.py").write_text(PHYSICS.replace("/ r", "/ (2 * r)"))
    with pytest.raises(ModelCodeChanged) as refused:
        registry.get("pump@1.0.0")
    message = str(refused.value)
    assert "pump@1.0.0: the code of simulator 'pumpkit.model:MODEL' changed since it was registered" in message
    assert "module pumpkit.physics changed" in message and "module pumpkit.model changed" not in message
    assert "Register the model again under a new version" in message and "allow_code_change=True" in message
    with pytest.raises(Conflict) as answered:  # the HTTP API's sweeps and new twins answered 500 `internal`
        registered_model(registry, "pump@1.0.0")
    assert answered.value.message.startswith(
        "pump@1.0.0: the code of simulator 'pumpkit.model:MODEL' changed since it was registered: module pumpkit.physics")
    assert answered.value.message.endswith(
        "this service runs the code it imports: publish the asset type under a new version (POST /v1/asset-types) to "
        "pin the current code and move the assets to it, or have the operator restore the registered code (or accept "
        f"the change: {ALLOW_CODE_CHANGE_ENV}=1 in the service's environment)")
    assert registry.get("pump@1.0.0", allow_code_change=True) == registered
    monkeypatch.setenv(ALLOW_CODE_CHANGE_ENV, "1")
    assert registry.get("pump@1.0.0") == registered
    # the way forward: a new version pins the current code
    renewed = registry.register("pump", "1.1.0", AssetType.from_model(model))
    monkeypatch.delenv(ALLOW_CODE_CHANGE_ENV)
    assert registry.get("pump@1.1.0").code == renewed.code != registered.code
    with pytest.raises(ValueError, match="already registered with different content.*module pumpkit.physics changed"):
        registry.register("pump", "1.0.0", AssetType.from_model(model))


def test_artifacts_from_before_code_pinning_keep_their_hash_and_resolve(tmp_path):
    registry = ModelRegistry(str(tmp_path))
    legacy = json.loads(registry.register("zone", "1.0.0", AssetType.from_model(THERMAL_RC)).body())
    legacy.pop("code")
    blob = canonical_json(legacy)
    digest = hashlib.sha256(blob).hexdigest()
    (tmp_path / "blobs" / "sha256" / f"{digest}.json").write_bytes(blob)
    (tmp_path / "models" / "zone" / "0.9.0.json").write_bytes(
        canonical_json({"name": "zone", "version": "0.9.0", "sha256": digest}))
    artifact = registry.get("zone@0.9.0")
    assert artifact.code is None and artifact.content_hash == digest
    assert "code" not in json.loads(artifact.body())


def test_an_fmu_is_identified_by_its_file(tmp_path):
    fmu = tmp_path / "VanDerPol.fmu"
    fmu.write_bytes(b"an FMU archive")
    code = file_code(fmu)
    assert (code.kind, code.parts) == ("file", {"VanDerPol.fmu": _sha(fmu)})
    assert code_identity(SimpleNamespace(code_identity=lambda: code)) == code  # a model naming its own code
    fmu.write_bytes(b"another FMU archive")
    assert describe_change(code, file_code(fmu)).startswith("file VanDerPol.fmu changed (registered: code not")


def test_a_model_without_source_code_is_refused_with_the_function_named():
    scratch: dict = {"__name__": "scratch"}
    exec("def derivative(x, u, c):\n    return x\n", scratch)  # typed at a prompt: no file, no source
    model = SimpleNamespace(name="scratch_model", derivative=scratch["derivative"])
    with pytest.raises(ModelCodeError, match="model 'scratch_model': function scratch.derivative has no source"):
        code_identity(model)


def test_code_digest_is_the_identitys_hash_without_the_distribution_lookup(monkeypatch):
    from raytwin import modelcode
    from raytwin.models import get_model

    models = [get_model(name) for name in ("thermal_rc", "battery_ecm", "two_tank", "dc_motor")]
    want = [code_identity(m).sha256 for m in models]
    monkeypatch.setattr(modelcode, "_distribution", lambda top_level: pytest.fail("looked up the distribution"))
    assert [code_digest(m) for m in models] == want


def test_a_data_file_of_the_model_package_is_pinned(tmp_path, pumpkit):
    """A model reading its coefficients from a file in its package ran changed numbers under the same version:
    the package's data files are part of its code; caches, docs, notebooks, backups and hidden files are not."""
    package, model = pumpkit
    (package / "tables").mkdir()
    (package / "tables" / "losses.csv").write_text("T,P\n300,100\n")
    (package / "__pycache__").mkdir(exist_ok=True)
    (package / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0")
    (package / ".notes").write_text("scratch")
    for doc in ("README.md", "README.txt", "LICENSE", "notes.ipynb", "losses.csv.orig"):  # no model's numbers:
        (package / doc).write_text("# pumpkit")  # a change to them must not stop its twins
    registry = ModelRegistry(str(tmp_path / "models"))
    registered = registry.register("pump", "1.0.0", AssetType.from_model(model))
    assert registered.code.parts["pumpkit/tables/losses.csv"] == _sha(package / "tables" / "losses.csv")
    assert set(registered.code.parts) == {"pumpkit.model", "pumpkit.physics", "pumpkit/tables/losses.csv"}
    assert registry.get("pump@1.0.0") == registered
    (package / "tables" / "losses.csv").write_text("T,P\n300,150\n")
    with pytest.raises(ModelCodeChanged, match="file pumpkit/tables/losses.csv changed"):
        registry.get("pump@1.0.0")
