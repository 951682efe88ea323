"""What every connector declares, whatever its protocol, and where declarations are kept.

A protocol adds its settings by subclassing `ConnectorSpec` with its own `kind` (see
`connectors.kinds`). Credentials are not part of a spec: they travel as `Credentials`, whose values
are `SecretStr` (masked in every repr, log line and API answer), and are stored apart from the spec,
sealed with a key that is not in the store (`raytwin.sealing`), so that reading a connector's declaration
never reads its secrets and a copy of the store reveals none.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from raytwin.contracts import Identifier
from raytwin.storage import replace_file, write_once
from raytwin.sealing import Sealer
from raytwin.storage import filesystem
from raytwin.store_failures import store_io

log = logging.getLogger("raytwin.connectors")


class ConnectorSpec(BaseModel):
    """The protocol-independent part of a connector's declaration."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
    """Inputs are left out of validation errors (their text, logged where a stored declaration fails to load): a
    URL given as an MQTT broker's host or an OPC UA endpoint may carry a password, which the checks refuse."""

    name: Identifier
    tenant: Identifier
    kind: str
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 1000
    linger_s: Annotated[float, Field(ge=0, le=5)] = 0.02
    ack_timeout_s: Annotated[float, Field(gt=0, le=7 * 86_400)] = Field(
        300.0, description="how long a sent command waits for its asset's acknowledgement before it is `expired`")

    def describe(self) -> str:
        """One line for people: kind, name and what it maps (`raytwin connectors check`)."""
        return f"{self.kind} connector {self.name!r}"

    def source(self) -> tuple[str, int] | None:
        """The host and port this connector connects to (a broker, a server), for the service's reach policy."""
        return None

    def files(self) -> dict[str, str]:
        """The files it reads (certificates, keys), by the field that names them: opened on the nodes that
        run connectors, so a tenant names files of its own directory (`serve_apps.connector_ops`)."""
        return {}

    def with_files(self, files: dict[str, str]) -> ConnectorSpec:
        """A copy naming `files` (by the fields of `files()`) instead."""
        if files:
            raise ValueError(f"{self.kind} connectors name no files")
        return self

    def session_key(self) -> str | None:
        """The identity a server keys this connector's session by (None: sessions are per connection).
        Two connectors with one key would take over each other's session and its queued messages, so the
        store lets one connector, of one tenant, hold each key (`ConnectorStore.claim`)."""
        return None


class Credentials(BaseModel):
    """Secrets of a connector (e.g. `password`): write-only, never logged, never returned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    username: str | None = None
    password: SecretStr | None = None

    def revealed(self) -> dict[str, str | None]:
        return {"username": self.username,
                "password": self.password.get_secret_value() if self.password else None}


class Desired(StrEnum):
    running = "running"
    paused = "paused"


class ConnectorStore:
    """Declarations under `{store}/connectors/declared/tenant=T/<name>/`: spec.json (public),
    credentials.sealed (secret, kept apart, encrypted), desired.json (running or paused, kept across
    restarts), alive.json (when a process of the connector last ran: a restart's gap starts there). A
    `credentials.json` in plain text, as earlier versions wrote, is sealed when first read."""

    def __init__(self, store_url: str, storage_options: dict[str, Any] | None = None):
        self.fs, root = filesystem(store_url, storage_options)
        self.root = f"{root}/connectors/declared"
        self.claims = f"{root}/connectors/claims"
        self._sealer: Sealer | None = None

    @property
    def sealer(self) -> Sealer:
        """Read from the environment when first needed: a store that only lists declarations needs no key."""
        if self._sealer is None:
            self._sealer = Sealer.from_environment()
        return self._sealer

    def _dir(self, tenant: str, name: str) -> str:
        return f"{self.root}/tenant={tenant}/{name}"

    @store_io("read")
    def _read(self, path: str) -> bytes:
        """The file at `path`, for the methods whose other work is no store I/O (the sealing key, a claim)."""
        return self.fs.cat_file(path)

    def save(self, spec: ConnectorSpec, credentials: Credentials) -> None:
        d = self._dir(spec.tenant, spec.name)
        self._save_credentials(d, credentials)
        replace_file(self.fs, f"{d}/spec.json", spec.model_dump_json().encode())
        self.set_desired(spec.tenant, spec.name, Desired.running)
        self._remove(f"{d}/alive.json")  # a new declaration: no earlier process's gap to report

    def _save_credentials(self, d: str, credentials: Credentials) -> None:
        sealed = self.sealer.seal(json.dumps(credentials.revealed()).encode())
        replace_file(self.fs, f"{d}/credentials.sealed", sealed)
        self._remove(f"{d}/credentials.json")

    @store_io("write")
    def _remove(self, path: str) -> None:
        """Remove the file at `path`, if there is one."""
        if self.fs.exists(path):
            self.fs.rm(path)

    @store_io("read")
    def spec_json(self, tenant: str, name: str) -> dict[str, Any]:
        """The stored spec as JSON (`connectors.kinds.parse_spec` makes it a typed spec)."""
        try:
            return json.loads(self.fs.cat_file(f"{self._dir(tenant, name)}/spec.json"))
        except FileNotFoundError:
            raise UnknownConnector(f"no connector {name!r} for tenant {tenant!r}") from None

    def credentials(self, tenant: str, name: str) -> Credentials:
        """The connector's secrets; `raytwin.sealing.SealingError` says which key is missing if none opens them.
        Plain-text credentials of earlier versions, and values sealed with an older key, are sealed anew."""
        d = self._dir(tenant, name)
        try:
            sealed = self._read(f"{d}/credentials.sealed")
        except FileNotFoundError:
            try:
                legacy = Credentials.model_validate_json(self._read(f"{d}/credentials.json"))
            except FileNotFoundError:
                return Credentials()
            self._save_credentials(d, legacy)
            return legacy
        credentials = Credentials.model_validate_json(self.sealer.open(sealed))
        if not self.sealer.is_current(sealed):
            self._save_credentials(d, credentials)
        return credentials

    @store_io("read")
    def desired(self, tenant: str, name: str) -> Desired:
        try:
            return Desired(json.loads(self.fs.cat_file(f"{self._dir(tenant, name)}/desired.json"))["state"])
        except FileNotFoundError:
            return Desired.running

    def set_desired(self, tenant: str, name: str, desired: Desired) -> None:
        replace_file(self.fs, f"{self._dir(tenant, name)}/desired.json",
                     json.dumps({"state": desired.value}).encode())

    @store_io("read")
    def _alive(self, tenant: str, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(f"{self._dir(tenant, name)}/alive.json"))
        except FileNotFoundError:
            return None

    def last_alive(self, tenant: str, name: str) -> datetime | None:
        """When a process of this connector last said it was running (None: none has run since it was declared)."""
        alive = self._alive(tenant, name)
        return None if alive is None else datetime.fromisoformat(alive["at"])

    def had_connected(self, tenant: str, name: str) -> bool:
        """Whether a process of this declaration connected to its source (so the source has a session or a
        subscription of it to lose); a record of an earlier version does not say: True, as that version assumed."""
        alive = self._alive(tenant, name)
        return alive is not None and alive.get("connected", True)

    def mark_alive(self, tenant: str, name: str, at: datetime, connected: bool) -> None:
        """Record that a process of this connector runs at `at`, and whether one has `connected` to its source."""
        replace_file(self.fs, f"{self._dir(tenant, name)}/alive.json",
                     json.dumps({"at": at.isoformat(), "connected": connected}).encode())

    @store_io("read")
    def declared_at(self, tenant: str, name: str) -> datetime | None:
        """When the connector was last declared (its spec written); None if it no longer is."""
        try:
            return self.fs.modified(f"{self._dir(tenant, name)}/spec.json")
        except FileNotFoundError:
            return None

    @store_io("read")
    def names(self, tenant: str) -> list[str]:
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.root}/tenant={tenant}",
                                                                               detail=False))
        except FileNotFoundError:
            return []

    @store_io("read")
    def tenants(self) -> list[str]:
        try:
            found = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1].removeprefix("tenant=") for p in found)

    def delete(self, tenant: str, name: str) -> None:
        self.spec_json(tenant, name)  # UnknownConnector if missing
        with store_io("write"):
            self.fs.rm(self._dir(tenant, name), recursive=True)

    def _claim_path(self, key: str) -> str:
        return f"{self.claims}/{hashlib.sha256(key.encode()).hexdigest()}.json"

    def claim(self, key: str, tenant: str, name: str) -> None:
        """Hold session `key` for (tenant, name), atomically; `SessionTaken` if another connector holds it, saying
        the same whether it is one of the caller's or another tenant's: the answer must not tell a tenant that
        another tenant uses that broker and client id."""
        holder = json.dumps({"tenant": tenant, "name": name}).encode()
        try:
            write_once(self.fs, self._claim_path(key), holder)
        except FileExistsError:
            held = json.loads(self._read(self._claim_path(key)))
            if held != {"tenant": tenant, "name": name}:  # whose is the operator's to read (the log), not the caller's
                log.info("event=session_taken session=%r tenant=%s name=%s holder_tenant=%s holder=%s", key, tenant,
                         name, held["tenant"], held["name"])
                raise SessionTaken(f"{key} is in use by another connector: two connectors with one session would "
                                   "take it over from each other; choose another broker.client_id, or leave it out "
                                   "to get RayTwin's own (raytwin-<tenant>@<name>, which no other connector has)"
                                   ) from None

    def holder(self, key: str) -> tuple[str, str] | None:
        """The (tenant, name) holding session `key`, or None: read without claiming it (nor logging a refusal)."""
        try:
            held = json.loads(self._read(self._claim_path(key)))
        except FileNotFoundError:
            return None
        return held["tenant"], held["name"]

    @store_io("write")
    def release(self, key: str, tenant: str, name: str, to: tuple[str, str] | None = None) -> None:
        """Give up session `key` if (tenant, name) holds it: to the connector `to` (tenant, name), which holds it
        then as if it had claimed it (no declaration racing in between takes it: the claim is never free), or to
        none."""
        try:
            held = json.loads(self.fs.cat_file(self._claim_path(key)))
        except FileNotFoundError:
            return
        if held != {"tenant": tenant, "name": name}:
            return
        if to is None:
            self.fs.rm(self._claim_path(key))
        else:
            replace_file(self.fs, self._claim_path(key), json.dumps({"tenant": to[0], "name": to[1]}).encode())


class SessionTaken(ValueError):
    """Another connector holds the session a declaration would open (an MQTT client id on its broker)."""


class UnknownConnector(KeyError):
    """No such connector for this tenant (another tenant's looks the same)."""

    def __str__(self) -> str:
        return str(self.args[0])
