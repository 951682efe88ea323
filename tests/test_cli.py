"""The `raytwin` command: version, mounted sub-commands, and the demo end to end (small sizes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from raytwin.cli import app

ROOT = Path(__file__).resolve().parent.parent


def test_version_lists_the_stack():
    out = CliRunner().invoke(app, ["version"])
    assert out.exit_code == 0
    for name in ("raytwin", "ray", "jax", "pydantic"):
        assert f"\n{name} " in "\n" + out.output


def test_every_bounded_context_is_mounted():
    out = CliRunner().invoke(app, ["--help"])
    for command in ("demo", "twins", "sweep", "calibrate", "rerun", "serve", "keys", "cluster", "job", "status", "bench", "models",
                    "recalibration", "shadow", "audit"):
        assert command in out.output


def test_demo_runs_the_whole_loop(tmp_path):
    """The README's demo command, at small sizes, in its own process (it starts its own Ray)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "raytwin.cli", "demo", "--scenarios", "64", "--twins", "2", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "read back identical: True" in out
    assert "duplicates=0 rejected=0" in out and "accepted=0 duplicates=" in out
    assert "compacted the event log while the twins run" in out and "time travel:" in out
    assert "published zone-000@1.1.0" in out
    assert "outputs identical = True" in out
    # section 6, the closed loop: each line prints a verdict the demo computed
    assert "drift flagged within 6 h: True" in out
    assert "R_io within 3 %: True" in out
    assert "shadow evaluation done: True, candidate preferred: True" in out
    assert "author's own approval refused: True" in out and "promoted by bob (approver, not the author)" in out
    assert "refused=none" in out and "no event lost: True" in out
    assert "innovations back to nominal: True" in out
    assert "audit chain verifies: True" in out
    assert "with discomfort no worse: True" in out
    assert (tmp_path / "runs").is_dir() and any((tmp_path / "runs").glob("calibration-*/output/fit.png"))
