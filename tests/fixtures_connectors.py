"""Twins for the connector tests: two-tank twins of several tenants in one small `TwinService`."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from actors import TwinService
from raytwin.contracts import Asset, AssetType
from raytwin.registry import ModelRegistry
from raytwin.sim import TWO_TANK

WAIT_S = 120.0
"""How long a connector test waits for something a broker or server round trip should bring about."""


def wait_for(condition, what: str):
    """`condition()`'s first truthy value, polled until `WAIT_S` has passed (then an AssertionError naming `what`)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {WAIT_S:g} s: {what}")


def retrying_at_once(adapter):
    """`adapter` (an MQTT one, run in the test's process) with its paho client trying again 0.1 s after a failed
    attempt, not after the spec's `reconnect_min_s` (1 s at least, then doubling): a test that waits for the next
    attempt waits for nothing else."""
    adapter.client.reconnect_delay_set(0.1, 0.1)
    return adapter


@contextmanager
def tank_twins(tmp_path_factory, assets: dict[str, list[str]]) -> Iterator[TwinService]:
    """A one-shard service with a two-tank twin per asset id, by tenant (needs a running Ray)."""
    artifact = ModelRegistry(str(tmp_path_factory.mktemp("reg"))).register("tank", "1.0.0",
                                                                           AssetType.from_model(TWO_TANK))
    svc = TwinService(str(tmp_path_factory.mktemp("store")), shards=1, batch_size=1000)
    for tenant, ids in assets.items():
        for a in ids:
            svc.register(Asset(id=a, tenant=tenant, type_name="two_tank", type_version="1.0.0"), artifact)
    try:
        yield svc
    finally:
        svc.close()


def certificate_for(name: str, directory: Path) -> ssl.SSLContext:
    """A TLS server context whose self-signed certificate is for `name` (written to `directory`/cert.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


CONSTRUCTED_NODE = "198.51.100.9"
"""The address `own_address` makes this machine's own where it has none but loopback (TEST-NET-2: no real host)."""


def own_address(monkeypatch: pytest.MonkeyPatch) -> str:
    """A non-loopback address of this machine: the one its traffic leaves from (a connected UDP socket, which sends
    nothing), else its host name's. With loopback only (no network), `CONSTRUCTED_NODE`, which the test of this
    machine's addresses (`connectors.ray_nodes`) is made to take for one."""
    from connectors import ray_nodes

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("203.0.113.1", 9))  # (TEST-NET-3: a route's source, never a packet)
            found = probe.getsockname()[0]
    except OSError:
        try:
            found = socket.gethostbyname(socket.gethostname())
        except OSError:
            found = "127.0.0.1"
    if not ipaddress.ip_address(found).is_loopback:
        return found
    for test in ("_binds", "_routed_here"):  # (its two tests of an address: a socket binds to it, routed here)
        real = getattr(ray_nodes, test)
        monkeypatch.setattr(ray_nodes, test,
                            lambda address, real=real: str(address) == CONSTRUCTED_NODE or real(address))
    return CONSTRUCTED_NODE
