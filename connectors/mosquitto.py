"""A local Mosquitto broker process for development, the tests and the benchmark.

Mosquitto comes from the Debian package (`apt-get install mosquitto`); on a fresh machine without
it `mosquitto_binary(install=True)` installs it with apt-get when run as root (CI runs `./dev
test` as root). The broker keeps its sessions and queued messages on disk (`persistence true`), which
Mosquitto writes only when it is stopped (SIGTERM) or by `autosave_interval`: by default every 1800 s, so a
broker that crashes (SIGKILL, the machine lost) loses every message it acknowledged to its publishers since,
and nobody is told. This one saves after each change (`autosave_on_changes true`, `autosave_interval 1`: the
interval counts changes, each a write of the whole database), as connectors/README.md asks of a production
broker: a stop and restart, or a crash, then loses nothing, so the tests can show that RayTwin loses nothing
either.
"""

from __future__ import annotations

import getpass
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT_S = 20.0


def mosquitto_binary(install: bool = False) -> str:
    """The `mosquitto` executable; `install`: apt-get it when missing (as root, on Debian/Ubuntu)."""
    found = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)
    if found:
        return found
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "-q", "mosquitto"], env=env, capture_output=True).returncode:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "mosquitto"], env=env, capture_output=True, check=True)
        found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if os.path.exists(found):
            return found
    raise RuntimeError("no mosquitto broker found: `apt-get install mosquitto` (Debian/Ubuntu) or "
                       "`brew install mosquitto`, then rerun")


def dynsec_plugin() -> str:
    """The Dynamic Security plugin that comes with Mosquitto 2 (Debian: in the `mosquitto` package)."""
    for pattern in ("/usr/lib/*/mosquitto_dynamic_security.so", "/usr/lib/mosquitto_dynamic_security.so",
                    "/usr/local/lib/mosquitto_dynamic_security.so", "/opt/homebrew/lib/mosquitto_dynamic_security.so"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise RuntimeError("no mosquitto_dynamic_security.so found: it comes with Mosquitto 2 (`apt-get install "
                       "mosquitto`)")


def _dynsec(subscribable: list[str] | None, publishable: list[str] | None) -> dict:
    """A Dynamic Security configuration: every client receives anything, and subscribes to `subscribable` and
    publishes to `publishable` only (None: any topic)."""
    acls = [{"acltype": kind, "topic": f, "priority": 0, "allow": True}
            for kind, filters in (("subscribePattern", subscribable), ("publishClientSend", publishable))
            for f in filters or ()]
    role = {"rolename": "subscribers", "acls": acls}
    return {"defaultACLAccess": {"publishClientSend": publishable is None, "publishClientReceive": True,
                                 "subscribe": subscribable is None, "unsubscribe": True},
            "clients": [], "roles": [role],
            "groups": [{"groupname": "anonymous", "roles": [{"rolename": "subscribers"}], "clients": []}],
            "anonymousGroup": "anonymous"}


def _password_file(path: Path, users: dict[str, str]) -> str:
    """Mosquitto's settings for a broker that lets only `users` connect, their passwords hashed into `path` by
    `mosquitto_passwd` (in the `mosquitto` package, beside the broker)."""
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    path.write_text("")
    for user, password in users.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
    return f"allow_anonymous false\npassword_file {path}\n"


class Mosquitto:
    """One broker process on a loopback port, with persistence in `directory`."""

    def __init__(self, directory: Path, port: int, install: bool = False, max_inflight: int = 20, max_qos: int = 2,
                 subscribable: list[str] | None = None, publishable: list[str] | None = None,
                 autosave_changes: int | None = 1, users: dict[str, str] | None = None):
        """`max_inflight`: unacknowledged QoS 1 messages per MQTT 3.1.1 client (Mosquitto's default 20);
        `max_qos`: the highest QoS the broker grants; `subscribable` / `publishable`: the topic filters clients
        may subscribe / publish to (Mosquitto's Dynamic Security plugin refuses others; None: any topic);
        `autosave_changes`: save to disk once this many changes (messages queued, subscriptions, retained messages)
        are unsaved (None: Mosquitto's default, every 1800 s and when stopped; a crash loses what was unsaved);
        `users`: username -> password, the only clients it lets connect (None: anyone, without credentials)."""
        self.directory, self.port = directory, port
        self.config = directory / "mosquitto.conf"
        self.binary = mosquitto_binary(install)  # (first: `users` needs its mosquitto_passwd)
        access = "allow_anonymous true\n" if users is None else _password_file(directory / "passwords", users)
        if subscribable is not None or publishable is not None:
            (directory / "dynsec.json").write_text(json.dumps(_dynsec(subscribable, publishable)))
            access += f"plugin {dynsec_plugin()}\nplugin_opt_config_file {directory}/dynsec.json\n"
        self.config.write_text(
            f"listener {port} 127.0.0.1\npersistence true\nmax_qos {max_qos}\n"
            f"persistence_location {directory}/\nmax_queued_messages 0\nmax_inflight_messages {max_inflight}\n"
            + (f"autosave_on_changes true\nautosave_interval {autosave_changes}\n" if autosave_changes else "") +
            f"log_dest file {directory}/mosquitto.log\n{access}"
            f"user {getpass.getuser()}\n")  # started as root it would switch to `mosquitto`, who cannot write here
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}; "
                                   f"see {self.directory}/mosquitto.log")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {START_TIMEOUT_S:g} s")

    def stop(self, crash: bool = False) -> None:
        """SIGTERM: the broker writes its sessions and queued messages to disk and exits. `crash`: SIGKILL, as a
        crash or a lost machine, which keeps only what it had saved."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if crash else signal.SIGTERM)
            self.process.wait(timeout=30)
        self.process = None
