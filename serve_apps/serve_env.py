"""The environment RayTwin's Serve processes start with: the proxy gate, and Serve switches that won.

Serve reads these variables when its processes (proxies, replicas) import it, so they must be in
the environment of every Ray node before Ray starts: ``raytwin serve`` sets them for the local Ray
it starts (`apply`), and the KubeRay manifests put them in every Ray container's ``env``
(`cluster.manifests`). An operator's own value of any of them wins over these.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"

SERVE_ENV: dict[str, str] = {
    # the proxy refuses the excess before it routes it (serve_apps/proxy_gate.py)
    PROXY_CALLBACK_ENV: "serve_apps.proxy_gate:proxy_middlewares",
}


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
    """Add `SERVE_ENV` to `environ`, keeping any value already set there."""
    for name, value in SERVE_ENV.items():
        environ.setdefault(name, value)
