"""A real asyncua OPC UA server for the tests (`tests/opcua_server.py`) in a subprocess, so a test can
kill it mid-stream (SIGKILL: no goodbye to the client) and start it again on the same port."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime

from asyncua import ua
from asyncua.sync import Client


class OpcUaServer:
    """One server process on a loopback port with the given writable and read-only variables (historized
    in memory with `history`: a restart forgets the history, as it forgets the values)."""

    def __init__(self, port: int, nodes: list[str], readonly: list[str], user: str, history: bool = False):
        self.port, self.nodes, self.readonly, self.user, self.history = port, nodes, readonly, user, history
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/raytwin/"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        args = [sys.executable, "-m", "tests.opcua_server", "--port", str(self.port), "--user", self.user]
        args += [a for n in self.nodes for a in ("--node", n)] + [a for n in self.readonly for a in ("--readonly", n)]
        args += ["--history"] if self.history else []
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()  # READY once it listens; empty if it died
        if not line.startswith("READY"):
            self.kill()
            raise RuntimeError(f"the OPC UA test server did not start on port {self.port} (got {line!r})")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.process = None


class Device:
    """The plant side: writes value changes with explicit source timestamps, reads what commands wrote."""

    def __init__(self, server: OpcUaServer):
        username, password = server.user.split(":", 1)
        self.client = Client(server.endpoint)
        self.client.set_user(username)
        self.client.set_password(password)
        self.client.connect()

    def write(self, name: str, value, at: datetime) -> None:
        variant = ua.Variant(value, ua.VariantType.Double if isinstance(value, float) else ua.VariantType.String)
        self.client.get_node(f"ns=2;s={name}").write_value(ua.DataValue(variant, SourceTimestamp=at))

    def read(self, name: str):
        """The node's value, or None while it has none (a bad status)."""
        dv = self.client.get_node(f"ns=2;s={name}").read_data_value(raise_on_bad_status=False)
        return dv.Value.Value if dv.StatusCode.is_good() else None

    def close(self) -> None:
        self.client.disconnect()
