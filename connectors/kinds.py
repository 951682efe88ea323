"""Connector kinds (protocols): what a protocol module provides, and how a spec finds its kind.

A kind is a module-level object with a spec type and an adapter factory. Kinds are imported
lazily by name, so a deployment without a protocol's client library can still run the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

from pydantic import ValidationInfo

from connectors.commands import Command
from connectors.reach import Reach
from connectors.sink import Inbound
from connectors.spec import ConnectorSpec, Credentials
from raytwin import units
from raytwin.contracts import AssetType

AssetTypes = Mapping[str, AssetType | None]
"""A tenant's registered twins, by asset id, with their asset types (None: not known)."""

KINDS: dict[str, str] = {"mqtt": "connectors.mqtt:MQTT", "opcua": "connectors.opcua:OPCUA"}
"""kind name -> `module:attribute` of its `Kind` (OPC UA registers ``"opcua"`` here)."""

AckHandler = Callable[[str, dict[str, Any], str | None, Callable[[], None]], None]
"""Called when an asset answers a command: (correlation id, the answer as JSON, the asset whose topic it came
on, where the protocol says, and what to call once the answer is recorded: the source's acknowledgement of it, so
that an answer not yet recorded is delivered again after a crash)."""


def ignore() -> None:
    """A callback that nobody needs (an adapter made outside a connector's actor, e.g. in a test)."""


class Adapter(Protocol):
    """One connection to a source: receives (`put` each mapped message), sends commands."""

    errors: int
    last_error: str | None
    last_error_at: datetime | None  # when `last_error` happened (UTC); both None again once the source works

    def start(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def stop(self) -> None: ...
    def connected(self) -> bool: ...

    def send(self, command: Command) -> None:
        """Deliver `command` to its asset (raises if it could not be handed to the transport: "not sent"; raises
        `Unconfirmed`, `Refused` or `OutcomeUnknown` (`connectors.commands`) where it may have reached the source)."""


class Kind(Protocol):
    spec_type: type[ConnectorSpec]
    answered_by_send: bool
    """Whether a command's answer is its send's own result (OPC UA: the server's statuses for the writes), which no
    source gives again: a command is recorded sent only once its send returned, accepted, so a restarted connector
    acknowledges one it finds sent (`CommandLedger.recover`), where it waited for an answer that could not come."""

    def problems(self, spec: ConnectorSpec, assets: AssetTypes) -> list[str]:
        """What is wrong with `spec` given the tenant's registered `assets` (empty: fine)."""

    def adapter(self, spec: ConnectorSpec, credentials: Credentials, put: Callable[[Inbound], None],
                on_ack: AckHandler, *, predecessor_seen: datetime | None = None,
                on_connected: Callable[[], None] = ignore, reach: Reach | None = None) -> Adapter:
        """`predecessor_seen`: when an earlier process of this connector that had connected was last alive (None:
        none had), for protocols that lose what the source sends while no connector runs; `on_connected`: called
        (from any thread) at each connection, before the adapter reports it connected; `reach`: the hosts a
        tenant's connector may connect to, enforced at every connection attempt on the address connected to
        (None: any, the operator's)."""

    def command_problem(self, spec: ConnectorSpec, asset_id: str, name: str, value: dict[str, Any]) -> str | None:
        """Why command `name` with `value` cannot go to `asset_id` through this connector, or None (checked
        when it is proposed: an approver must never approve what could not or must not be sent)."""

    def stored_refusal(self, spec: ConnectorSpec) -> str | None:
        """Why a stored declaration may not run: a rule new declarations are refused for, added since it was stored
        (`Connectors.start_declared` lists it as down with this, how to fix it included, instead of running it), or
        None."""

    def end_session(self, spec: ConnectorSpec, credentials: Credentials, reach: Reach | None = None) -> bool:
        """For a deleted connector: discard what the source keeps for it (a broker's session and the messages
        queued there, which whoever opened that session next would receive), connecting only where `reach`
        allows; False if it could not."""


def unmeasured(where: str, measurement: str, unit: str, asset_id: str | None, assets: AssetTypes) -> str | None:
    """Why `asset_id` (None: whichever asset a message names) cannot take `measurement` in `unit`, or None. Such a
    mapping would feed the twins nothing: every reading is dead-lettered by them, message by message, for good
    (a measurement its type lacks, or a unit of another dimension than the type's)."""
    if asset_id is not None:
        asset_type = assets.get(asset_id)
        if asset_type is None:
            return None
        if measurement not in asset_type.measurable():
            return (f"{where}: asset {asset_id!r} (type {asset_type.key}) has no measurement {measurement!r}; its "
                    f"measurements: {', '.join(sorted(asset_type.measurable()))}")
        return _unconvertible(where, measurement, unit, asset_type)
    types = {t.key: t for t in assets.values() if t is not None}
    having = [t for t in types.values() if measurement in t.measurable()]
    if not types:
        return None
    if not having:
        offered = "; ".join(f"{key}: {', '.join(sorted(t.measurable()))}" for key, t in sorted(types.items()))
        return f"{where}: no asset type of the tenant's twins has measurement {measurement!r} ({offered})"
    problems = [_unconvertible(where, measurement, unit, t) for t in having]
    return None if None in problems else problems[0]


def _unconvertible(where: str, measurement: str, unit: str, asset_type: AssetType) -> str | None:
    """Why a reading of `measurement` in `unit` cannot be converted to `asset_type`'s unit for it, or None."""
    target = asset_type.measurable()[measurement].unit
    try:
        units.to_unit(1.0, unit, target)
    except units.UnitError as exc:
        return (f"{where}: unit {unit!r} cannot be converted to {measurement}'s unit {target!r} of "
                f"{asset_type.key} ({exc}); declare the unit the device sends, of the dimension of {target!r}")
    return None


class UnknownKind(ValueError):
    pass


def kind_of(name: str) -> Kind:
    try:
        module, attribute = KINDS[name].split(":")
    except KeyError:
        raise UnknownKind(f"unknown connector kind {name!r}: one of {sorted(KINDS)}") from None
    return getattr(importlib.import_module(module), attribute)


STORED = "stored"
"""Validation context key: the declaration is read back from the store (`parse_spec(..., stored=True)`)."""


def parse_spec(data: dict[str, Any], stored: bool = False) -> ConnectorSpec:
    """A declaration (parsed JSON or YAML) as its kind's typed spec; raises ValidationError/UnknownKind. `stored`: one
    read back from the store, which checks added since it was declared let through (`stored_only`): refused, it could
    be neither read, nor replaced, nor deleted."""
    return kind_of(str(data.get("kind"))).spec_type.model_validate(data, context={STORED: stored})


def stored_only(info: ValidationInfo) -> bool:
    """Whether a field validator runs on a declaration read back from the store (`parse_spec`)."""
    return bool((info.context or {}).get(STORED))
