"""Build the Modelica Association's Reference FMUs from their C sources (tests and benchmarks).

The sources live beside a clone at ``../shared/reference-fmus`` (`default_source`; set
``RAYTWIN_REFERENCE_FMUS`` to use another copy). A build needs CMake (fmpy installs the ``cmake``
package, so the venv has one) and a C compiler, and takes a few seconds per FMI version.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from raytwin.fmu.describe import FmuError

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_source() -> Path:
    return Path(os.environ.get("RAYTWIN_REFERENCE_FMUS", REPO_ROOT.parent / "shared" / "reference-fmus"))


def cmake_binary() -> str:
    """CMake on PATH, else the one the venv's ``cmake`` package installed next to Python."""
    found = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if found is None:
        raise FmuError("cannot build the reference FMUs: no cmake on PATH nor in the Python environment")
    return found


def build_reference_fmus(out: Path, fmi_version: int, models: tuple[str, ...],
                         source: Path | None = None) -> dict[str, Path]:
    """Build `models` for FMI `fmi_version` (2 or 3) under `out`; returns name -> ``.fmu`` path."""
    source = source or default_source()
    if not (source / "CMakeLists.txt").is_file():
        raise FmuError(f"cannot build the reference FMUs: no sources at {source} (set RAYTWIN_REFERENCE_FMUS)")
    cmake = cmake_binary()
    build = out / f"fmi{fmi_version}"
    for cmd in ([cmake, "-S", str(source), "-B", str(build), f"-DFMI_VERSION={fmi_version}"],
                [cmake, "--build", str(build), "-j2", "--target", *models]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            raise FmuError(f"reference FMU build failed ({' '.join(cmd[:2])} ...): {' | '.join(tail)}")
    return {m: build / "fmus" / f"{m}.fmu" for m in models}
