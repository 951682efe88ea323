"""What a job uploads: its working dir and local `py_modules`, measured as Ray packages them, refused up front
when over Ray's limit.

Ray zips each directory (entries stored, not compressed: ``ZipFile(path, "w")``) walking it with its own
excludes: the runtime env's ``excludes`` (gitignore-style patterns relative to the directory), and every
``.gitignore`` and ``.rayignore`` on the way (``.gitignore`` not when ``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``).
The zip goes to the dashboard in one HTTP PUT whose body aiohttp refuses over 100 MiB with a bare 413 "Maximum
request body size exceeded"; this says which paths made it that big and how to leave them out instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray._private import ray_constants
from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, _dir_travel, _get_excludes

UPLOAD_LIMIT_BYTES = min(ray_constants.DASHBOARD_CLIENT_MAX_SIZE, GCS_STORAGE_MAX_SIZE)
"""The biggest package the job API takes: the dashboard's request body limit (100 MiB in Ray 2.60), under the
GCS's 512 MiB. A cluster of another Ray version may differ; this is the submitting Ray's."""
ZIP_ENTRY_OVERHEAD = 76
"""Bytes a stored zip entry adds besides its name (twice) and content: local header 30, central directory 46."""
LARGEST_SHOWN = 5
_WALK_LOG = logging.getLogger("raytwin.upload")
_WALK_LOG.setLevel(logging.WARNING)  # Ray's walk logs each ignore file it honours; the upload itself says so again


class UploadTooLarge(ValueError):
    """A job's working dir or model code packs bigger than the job API accepts."""


def package_sizes(root: Path, excludes: Sequence[str] = ()) -> dict[str, int]:
    """Bytes of `root`'s zip as Ray builds it, by top-level entry (``name/`` for a directory), through Ray's own
    walk: `excludes`, ``.gitignore`` and ``.rayignore`` files apply exactly as when it uploads."""
    root = root.resolve()
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    sizes: dict[str, int] = {}

    def add(path: Path) -> None:
        if path == root or not (path.is_file() or path.is_dir() and next(path.iterdir(), None) is None):
            return  # Ray packs files and empty directories only
        relative = path.relative_to(root)
        top = relative.parts[0] + ("/" if len(relative.parts) > 1 or path.is_dir() else "")
        size = path.stat().st_size if path.is_file() else 0
        sizes[top] = sizes.get(top, 0) + size + ZIP_ENTRY_OVERHEAD + 2 * len(str(relative).encode())

    _dir_travel(root, [_get_excludes(root, list(excludes))], add, include_gitignore=include_gitignore,
                logger=_WALK_LOG)
    return sizes


def check_uploads(runtime_env: Mapping[str, Any], limit: int | None = None) -> None:
    """Raise `UploadTooLarge` naming the largest paths when the runtime env's working dir or a local
    `py_modules` directory packs to `limit` bytes (default `UPLOAD_LIMIT_BYTES`) or more."""
    limit = UPLOAD_LIMIT_BYTES if limit is None else limit
    excludes = runtime_env.get("excludes", [])
    local = [runtime_env["working_dir"]] if "working_dir" in runtime_env else []
    local += [m for m in runtime_env.get("py_modules", []) if "://" not in m and Path(m).is_dir()]
    for directory in map(Path, local):
        sizes = package_sizes(directory, excludes)
        if (total := sum(sizes.values())) < limit:
            continue
        largest = sorted(sizes.items(), key=lambda item: -item[1])[:LARGEST_SHOWN]
        raise UploadTooLarge(
            f"{directory} packs to {_mib(total)} as Ray uploads it, over the job API's {_mib(limit)} limit (the "
            f"dashboard would answer 413). Largest: {', '.join(f'{name} {_mib(size)}' for name, size in largest)}. "
            f"Leave them out with --exclude PATTERN (gitignore-style, relative to the directory; "
            f"JobClient.submit(excludes=[...])), or list them in a .gitignore or .rayignore there")


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"
