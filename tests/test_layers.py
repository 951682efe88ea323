"""Layering: the core package `raytwin` imports no upper layer; contexts mount their own commands."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

from raytwin.commands import GROUP, CommandRegistrationError, command_entry_points, mount_commands, source_entry_points

ROOT = Path(__file__).resolve().parent.parent
UPPER_LAYERS = {"actors", "connectors", "sweeps", "serve_apps", "cluster", "benchmarks", "demo", "client"}


def _imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports anywhere (module level, functions, conditionals)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_core_imports_no_upper_layer():
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & UPPER_LAYERS)
        for path in sorted((ROOT / "raytwin").rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_import_scan_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from sweeps.runs import rerun\n    import actors.twin\n")
    assert _imported_packages(module) == {"sweeps", "actors"}


def test_every_context_declares_its_commands_in_pyproject():
    declared = {ep.name: ep.value for ep in source_entry_points(ROOT / "pyproject.toml")}
    assert {value.partition(".")[0] for value in declared.values()} == UPPER_LAYERS
    for ep in source_entry_points(ROOT / "pyproject.toml"):
        assert ep.load() is not None  # every entry resolves


def _installed(name: str, value: str, dist: str) -> SimpleNamespace:
    """An entry point as the metadata gives it: with the distribution that declares it."""
    return SimpleNamespace(name=name, value=value, group=GROUP, dist=SimpleNamespace(name=dist))


def test_checkout_entries_replace_raytwins_stale_metadata_and_keep_other_distributions():
    installed = [_installed("gone", "actors.cli:twins_app", "raytwin"), _installed("pump", "pump.cli:app", "pump")]
    source = [EntryPoint("twins", "actors.cli:twins_app", GROUP)]
    eps = command_entry_points(installed, source)
    assert [(ep.name, ep.value) for ep in eps] == [("pump", "pump.cli:app"), ("twins", "actors.cli:twins_app")]


def test_a_command_claimed_twice_is_refused_with_both_targets():
    installed = [_installed("sweep", "pump.cli:app", "pump")]
    with pytest.raises(CommandRegistrationError, match="'sweep' is registered twice.*pump.cli:app.*sweeps.cli"):
        command_entry_points(installed, [EntryPoint("sweep", "sweeps.cli:sweep_app", GROUP)])


def test_mounts_groups_and_functions_and_refuses_anything_else():
    app = typer.Typer(no_args_is_help=True)
    mount_commands(app, [EntryPoint("twins", "actors.cli:twins_app", GROUP),
                         EntryPoint("rerun", "sweeps.cli:rerun", GROUP)])
    out = CliRunner().invoke(app, ["--help"]).output
    assert "twins" in out and "rerun" in out
    with pytest.raises(CommandRegistrationError, match="bad = raytwin.commands:GROUP in raytwin.commands is neither"):
        mount_commands(app, [EntryPoint("bad", "raytwin.commands:GROUP", GROUP)])


@pytest.mark.parametrize("package", ["raytwin.sim", "sweeps", "actors", "connectors.opcua"])
def test_lazy_exports_resolve_every_name_they_list(package):
    import importlib

    module = importlib.import_module(package)
    assert dir(module) == module.__all__ == sorted(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nope'"):
        module.nope  # noqa: B018


def test_lazy_exports_refuse_a_name_from_two_modules():
    from raytwin.lazy import lazy_exports

    with pytest.raises(ValueError, match="pkg: Kit is exported by both a.kits and b.kits"):
        lazy_exports("pkg", {"a.kits": ("Kit",), "b.kits": ("Kit",)})


def test_the_api_shard_and_connector_processes_start_without_scipy_or_ray_tune():
    """Every Serve replica, twin shard and connector process imports these modules at its start: scipy (~0.8 s) and
    Ray Tune (~0.5 s) are imported where a fit or a search runs, not by them (a Serve replica imported both)."""
    probe = ("import sys, serve_apps.app, actors.service, connectors.runtime; "
             "print(sorted(m for m in ('scipy', 'ray.tune') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
