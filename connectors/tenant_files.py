"""The files a tenant's connector names (MQTT TLS files, an OPC UA security string's certificate and key): plain
file names of the tenant's directory, `{connector_tls_dir}/{tenant}/` (`ServeConfig.connector_tls_dir`).

The declaration keeps the names, as the tenant gave them; they become paths only where a file is opened (the
check at the declaration, the connector's process, the session's end at a deletion). A stored path would show
the operator's layout to the tenant, fail as a declaration when sent back, and go stale when the directory moves.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath
from typing import TypeVar

from connectors.spec import ConnectorSpec

FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
Spec = TypeVar("Spec", bound=ConnectorSpec)


class TenantFiles:
    """Where the connectors of tenants (created through the API) find the files they name: `tls_dir` (None: the
    service takes no files for them). The operator's connectors (the service config) name paths and have none."""

    def __init__(self, tls_dir: str | None):
        self.tls_dir = tls_dir

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TenantFiles) and self.tls_dir == other.tls_dir

    def problems(self, spec: ConnectorSpec) -> list[str]:
        """Why `spec` names files its tenant may not open: a path or a link out of the tenant's directory (another
        tenant's key, the server's own files), or any file where the service takes none."""
        files = spec.files()
        if files and self.tls_dir is None:
            return [f"{', '.join(files)}: this server takes no certificate or key files for connectors created "
                    "through the API (its operator sets ServeConfig.connector_tls_dir and places them in its "
                    "directory for your tenant); leave them out or ask them to declare the connector"]
        own = self._own(spec.tenant)
        return [f"{field} {value!r}: name a file of your tenant's TLS directory (letters, digits, '.', '_', '-'; no "
                "path, no link out of it)" for field, value in files.items()
                if not FILE_NAME.fullmatch(value) or not (own / value).resolve().is_relative_to(own.resolve())]

    def opened(self, spec: Spec) -> Spec:
        """`spec` naming the paths of its files, to open them (ValueError: `problems`)."""
        if not (files := spec.files()):
            return spec
        if problems := self.problems(spec):
            raise ValueError("; ".join(problems))
        return spec.with_files({field: str(self._own(spec.tenant) / name) for field, name in files.items()})

    def shown(self, text: str, spec: ConnectorSpec) -> str:
        """`text` (about `opened(spec)`'s files) with each path replaced by the name the tenant gave."""
        for name in spec.files().values():
            text = text.replace(str(self._own(spec.tenant) / name), name)
        return text

    @staticmethod
    def named(spec: Spec) -> Spec:
        """`spec` as declared: earlier versions stored `{dir}/{tenant}/{name}` paths for the names a tenant gave
        (under any directory, so also one the operator moved since); each such path is its name again."""
        legacy = {field: path.name for field, value in spec.files().items()
                  if len((path := PurePath(value)).parts) > 1 and path.parent.name == spec.tenant
                  and FILE_NAME.fullmatch(path.name)}
        return spec.with_files(legacy) if legacy else spec

    def _own(self, tenant: str) -> Path:
        return Path(self.tls_dir or "", tenant)
