"""The OPC UA connector kind: an adapter that runs an `OpcUaSession` on its own event-loop thread.

The connector runtime (`connectors.runtime`) calls the adapter from its actor's thread; asyncua is
asyncio-only, so every call is handed to the adapter's loop and waited for.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from connectors.commands import Command, OutcomeUnknown
from connectors.kinds import AckHandler, AssetTypes, ignore, unmeasured
from connectors.opcua.config import OpcUaSpec
from connectors.opcua.session import OpcUaSession
from connectors.reach import Reach
from connectors.sink import Inbound
from connectors.spec import Credentials
from raytwin import units

STOP_TIMEOUT_S = 30.0


class OpcUaAdapter:
    """One OPC UA session in a daemon thread: monitored items into the pump, commands written to nodes."""

    def __init__(self, spec: OpcUaSpec, credentials: Credentials, put: Callable[[Inbound], None], on_ack: AckHandler,
                 predecessor_seen: datetime | None = None, on_connected: Callable[[], None] = ignore,
                 reach: Reach | None = None):
        self.spec, self.credentials, self.put, self.on_ack = spec, credentials, put, on_ack
        self.reach = reach
        self.on_connected = on_connected
        self.predecessor_seen = predecessor_seen
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"opcua-{spec.name}", daemon=True)
        self._thread.start()
        self._session: OpcUaSession | None = None
        self._run: asyncio.Future | None = None

    @property
    def errors(self) -> int:
        return self._session.errors if self._session else 0

    @property
    def last_error(self) -> str | None:
        return self._session.last_error if self._session else None

    @property
    def last_error_at(self) -> datetime | None:
        return self._session.last_error_at if self._session else None

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        async def begin() -> None:
            self._session = OpcUaSession(self.spec, self.credentials, self.put, gap_since=self.predecessor_seen,
                                         on_connected=self.on_connected, reach=self.reach)
            self._run = asyncio.ensure_future(self._session.run())
        if self._session is None:
            self._call(begin())

    def pause(self) -> None:
        """Switch publishing off: the server keeps new values in each item's queue until `resume`."""
        if self._session is not None:
            self._call(self._session.set_paused(True))

    def resume(self) -> None:
        if self._session is None:
            self.start()  # declared paused when the connector (re)started: nothing was connected yet
        self._call(self._session.set_paused(False))

    def stop(self) -> None:
        """Close the session; the thread ends. Value changes not yet durable are not re-sent by the server
        (only each item's current value is, on the next connect)."""
        async def end() -> None:
            if self._session is not None:
                self._session.stop()
                await self._run
        if self._thread.is_alive():
            self._call(end(), STOP_TIMEOUT_S)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(STOP_TIMEOUT_S)

    def connected(self) -> bool:
        return self._session is not None and self._session.connected()

    def send(self, command: Command) -> None:
        """Write the command's `value` (in its `unit`, default the node's) and correlation id to the declared
        nodes; returns once the server accepted both, handing that over as the answer (the runtime records it once
        the command is recorded sent: `ConnectorRuntime._sent`). `OutcomeUnknown` where a write was requested and not
        answered within twice `request_timeout_s` (`OpcUaSession.write_command`)."""
        target = self.spec.command(command.asset_id, command.name)
        if problem := target.value_problem(command.value):  # checked at proposal; the declaration may have changed
            raise ValueError(problem)
        raw, unit = command.value["value"], str(command.value.get("unit", target.unit))
        value = raw if isinstance(raw, bool) else units.to_unit(float(raw), unit, target.unit)  # a Boolean's as is
        if self._session is None:
            raise ConnectionError(f"connector {self.spec.name!r} is paused; resume it to send commands")
        within_s = self.spec.request_timeout_s * 2
        future = asyncio.run_coroutine_threadsafe(
            self._session.write_command(target, command.correlation_id, value, within_s), self._loop)
        try:
            detail = future.result(within_s + self.spec.request_timeout_s)
        except TimeoutError:
            if future.done():  # the write's own timeout, before anything was requested: not sent
                raise
            future.cancel()  # this loop did not even end the wait: whether a write was requested is unknown
            raise OutcomeUnknown(f"the connector's OPC UA thread did not end the write within {within_s:g} s") from None
        answer = {"status": "ok", "detail": detail}  # no acknowledgement back to the server (`ignore`)
        self.on_ack(command.correlation_id, answer, None, ignore)


class OpcUaKind:
    spec_type = OpcUaSpec
    answered_by_send = True  # the server's statuses for the writes, recorded after `send` returns (`OpcUaAdapter.send`)

    def problems(self, spec: OpcUaSpec, assets: AssetTypes) -> list[str]:  # type: ignore[override]
        used = sorted({n.asset_id for n in spec.nodes} | {c.asset_id for c in spec.commands})
        unmapped = [problem for n in spec.nodes
                    if (problem := unmeasured(f"node {n.node_id!r}", n.measurement, n.unit, n.asset_id, assets))]
        return [f"asset {a!r} is not a registered twin of tenant {spec.tenant!r}" for a in used if a not in assets] \
            + unmapped + spec.security_problems()

    def adapter(self, spec: OpcUaSpec, credentials: Credentials,  # type: ignore[override]
                put: Callable[[Inbound], None], on_ack: AckHandler, *,
                predecessor_seen: datetime | None = None, on_connected: Callable[[], None] = ignore,
                reach: Reach | None = None) -> OpcUaAdapter:
        return OpcUaAdapter(spec, credentials, put, on_ack, predecessor_seen, on_connected, reach)

    def command_problem(self, spec: OpcUaSpec, asset_id: str, name: str,  # type: ignore[override]
                        value: dict[str, Any]) -> str | None:
        try:
            return spec.command(asset_id, name).value_problem(value)
        except LookupError as exc:
            return str(exc)

    def stored_refusal(self, spec: OpcUaSpec) -> str | None:  # type: ignore[override]
        return None  # every rule an OPC UA declaration is checked against held when it was stored

    def end_session(self, spec: OpcUaSpec, credentials: Credentials,  # type: ignore[override]
                    reach: Reach | None = None) -> bool:
        return True  # a server keeps nothing for a client that is gone


OPCUA = OpcUaKind()
