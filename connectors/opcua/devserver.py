"""A local asyncua OPC UA server for development, the connector tests and the `opcua` benchmark, run as a
subprocess (`OpcUaServer`) so a test can kill it mid-stream and start it again on the same port.

    python -m connectors.opcua.devserver --port 4840 --node zone-1.T_in --node zone-1.T_out --readonly plant.locked \
        [--typed q_real=Float] [--unit q_real=m³/s] [--user operator:secret] [--history] [--max-queue 3]

Every `--node NAME` is a writable variable `ns=<ns>;s=NAME` (namespace `urn:raytwin:test`, any data type) that
starts without a value (status BadWaitingForInitialData), like a controller that has not sampled yet; a restarted
server starts that way again. `--typed NAME=TYPE` is a writable variable of one built-in data type (Float, Int16,
Boolean, ...: a PLC's REAL, INT or BOOL; `Enum:Off,Auto` an enumeration of those names), which the server refuses
to be written with any other type (BadTypeMismatch). `--unit NAME=UNIT` gives a variable an EngineeringUnits
property.
`--readonly NAME` is a variable clients may not write. With `--user`, only that username and password may open a
session. With `--history`, every variable's changes are historized in memory
(HistoryRead serves them until the process ends). `--max-queue N` grants every monitored item at most N queued
values, whatever the client asks (as servers with small limits do: RevisedQueueSize). Prints
`READY <namespace index>` once it listens, then serves until killed. It is a development server, not a plant:
NoSecurity on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
from datetime import UTC, datetime

from asyncua import Server, ua
from asyncua.common.structures104 import new_enum
from asyncua.crypto.permission_rules import SimpleRoleRuleset, User, UserRole
from asyncua.server.user_managers import UserManager

NAMESPACE = "urn:raytwin:test"
MODULE = "connectors.opcua.devserver"


class OneUser(UserManager):
    """Accepts exactly one username and password."""

    def __init__(self, username: str, password: str):
        self.username, self.password = username, password

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username == self.username and password == self.password:
            return User(role=UserRole.User)
        return None


async def _typed(server: Server, idx: int, name: str, type_name: str) -> tuple[ua.Variant, ua.NodeId]:
    """A typed variable's first value and DataType: a built-in type's (Float, Int16, Boolean, ...), or for
    `Enum:Off,Manual,Auto` an enumeration of those names (0, 1, 2), declared by its DataTypeDefinition."""
    if type_name.startswith("Enum:"):
        dtype = await new_enum(server, idx, f"{name}.Type", type_name.removeprefix("Enum:").split(","))
        return ua.Variant(0, ua.VariantType.Int32), dtype.nodeid
    vtype = ua.VariantType[type_name]
    first = {ua.VariantType.Float: 0.0, ua.VariantType.Double: 0.0, ua.VariantType.Boolean: False}.get(vtype, 0)
    return ua.Variant(first, vtype), ua.NodeId(vtype.value)


async def serve(port: int, nodes: list[str], readonly: list[str], user: str | None, history: bool,
                typed: dict[str, str] | None = None, max_queue: int | None = None,
                units: dict[str, str] | None = None) -> None:
    server = Server(user_manager=OneUser(*user.split(":", 1)) if user else None)
    await server.init()
    if max_queue is not None:
        server.iserver.max_monitored_item_queue_size = max_queue
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/raytwin/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity], permission_ruleset=SimpleRoleRuleset())
    if user:
        server.set_security_IDs(["Username"])
    idx = await server.register_namespace(NAMESPACE)
    plant = await server.nodes.objects.add_object(idx, "Plant")
    waiting = ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadWaitingForInitialData),
                           SourceTimestamp=datetime.now(UTC))  # asyncua's history needs every value stamped
    variables = []
    for name, writable in [(n, True) for n in nodes] + [(n, False) for n in readonly]:
        var = await plant.add_variable(ua.NodeId(name, idx), name, 0.0, datatype=ua.NodeId(ua.ObjectIds.Number))
        await var.write_value(waiting)
        await var.set_writable(writable)
        variables.append(var)
    for name, type_name in (typed or {}).items():
        first, dtype = await _typed(server, idx, name, type_name)
        var = await plant.add_variable(ua.NodeId(name, idx), name, first, datatype=dtype)
        await var.set_writable(True)
        variables.append(var)
    for name, unit in (units or {}).items():  # as a PLC's EngineeringUnits property shows it (m³/s, °C)
        eu = ua.EUInformation(DisplayName=ua.LocalizedText(unit), Description=ua.LocalizedText(unit))
        await server.get_node(ua.NodeId(name, idx)).add_property(
            ua.NodeId(f"{name}.EngineeringUnits", idx), ua.QualifiedName("EngineeringUnits", 0), eu)
    async with server:
        if history:
            await server.historize_node_data_change(variables, period=None)  # in memory, kept until killed
        print(f"READY {idx}", flush=True)
        await asyncio.Event().wait()


class OpcUaServer:
    """One dev server process on a loopback port with the given writable and read-only variables (historized
    in memory with `history`: a restart forgets the history, as it forgets the values). `kill` is SIGKILL:
    no goodbye to the clients, as a crashed controller."""

    def __init__(self, port: int, nodes: list[str], readonly: list[str], user: str, history: bool = False,
                 typed: dict[str, str] | None = None, max_queue: int | None = None,
                 units: dict[str, str] | None = None):
        """`user`: "username:password", the only credentials the server accepts; `typed`: name -> data type
        (`Enum:A,B` an enumeration); `max_queue`: the most queued values granted a monitored item (None:
        asyncua's 10,000); `units`: name -> the unit its EngineeringUnits property displays."""
        self.port, self.nodes, self.readonly, self.user, self.history = port, nodes, readonly, user, history
        self.typed, self.max_queue, self.units = typed or {}, max_queue, units or {}
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/raytwin/"
        self.namespace_index: int | None = None  # of NAMESPACE, known once started
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        args = [sys.executable, "-m", MODULE, "--port", str(self.port), "--user", self.user]
        args += [a for n in self.nodes for a in ("--node", n)] + [a for n in self.readonly for a in ("--readonly", n)]
        args += [a for n, t in self.typed.items() for a in ("--typed", f"{n}={t}")]
        args += [a for n, u in self.units.items() for a in ("--unit", f"{n}={u}")]
        args += ["--history"] if self.history else []
        args += ["--max-queue", str(self.max_queue)] if self.max_queue is not None else []
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()  # READY once it listens; empty if it died
        if not line.startswith("READY"):
            self.kill()
            raise RuntimeError(f"the OPC UA dev server did not start on port {self.port} (got {line!r}); run "
                               f"`python -m {MODULE} --port {self.port} --node x` to see why")
        self.namespace_index = int(line.split()[1])

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.process = None


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                     description="A local asyncua OPC UA server for development, tests and benchmarks.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--node", action="append", default=[])
    parser.add_argument("--readonly", action="append", default=[])
    parser.add_argument("--user", help="username:password")
    parser.add_argument("--typed", action="append", default=[], help="NAME=TYPE, e.g. q_real=Float")
    parser.add_argument("--history", action="store_true", help="historize every variable (HistoryRead)")
    parser.add_argument("--max-queue", type=int, help="the most queued values granted a monitored item")
    parser.add_argument("--unit", action="append", default=[], help="NAME=UNIT: its EngineeringUnits, e.g. q=m³/s")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    typed = dict(t.split("=", 1) for t in args.typed)
    units = dict(u.split("=", 1) for u in args.unit)
    asyncio.run(serve(args.port, args.node, args.readonly, args.user, args.history, typed, args.max_queue, units))


if __name__ == "__main__":
    main()
