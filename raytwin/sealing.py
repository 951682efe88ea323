"""Secrets sealed at rest: what RayTwin stores for later use (a connector's broker password) is
encrypted with a key that is not in the store, so a copy of the bucket or a backup leaks nothing.

Keys come from the environment, as a Kubernetes Secret provides them:

- `RAYTWIN_SECRETS_KEY`: one or more Fernet keys (AES-128-CBC + HMAC-SHA256), comma-separated; the
  first seals, every one opens, so a key is rotated by prepending the new one and re-saving.
- `RAYTWIN_SECRETS_KEY_FILE`: a file holding the same.
- Neither: a key file in the user's config directory (`$XDG_CONFIG_HOME/raytwin/secrets.key`, mode 0600),
  created on first use. That suits one machine (the embedded local Ray); a cluster whose nodes do not share
  that file must set one of the above, and a sealed value that no configured key opens says so.

Each sealed value names the key that sealed it (a short hash, not the key) so that errors can say which key
is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

__all__ = ["KEY_ENV", "KEY_FILE_ENV", "SealingError", "Sealer", "new_key"]

KEY_ENV = "RAYTWIN_SECRETS_KEY"
KEY_FILE_ENV = "RAYTWIN_SECRETS_KEY_FILE"
SCHEME = "fernet-v1"


class SealingError(RuntimeError):
    """A sealed value cannot be opened (wrong or missing key, damaged value) or no key can be found."""


def new_key() -> str:
    """A fresh key for `RAYTWIN_SECRETS_KEY` (`python -c "from raytwin.sealing import new_key; print(new_key())"`)."""
    return Fernet.generate_key().decode()


def _key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:12]


def _default_key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "raytwin" / "secrets.key"


def _created_key_file(path: Path) -> str:
    """The key in `path`, created first if absent: written to a private temporary file and linked into
    place, which fails if another process got there first, so every process reads one complete key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_key() + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text()


def _configured_keys() -> tuple[list[bytes], str]:
    if text := os.environ.get(KEY_ENV):
        source = KEY_ENV
    elif file := os.environ.get(KEY_FILE_ENV):
        try:
            text, source = Path(file).read_text(), f"{KEY_FILE_ENV}={file}"
        except OSError as exc:
            raise SealingError(f"{KEY_FILE_ENV}={file} cannot be read: {exc.strerror}") from None
    else:
        path = _default_key_file()
        try:
            text, source = _created_key_file(path), str(path)
        except OSError as exc:  # e.g. a read-only home directory (a hardened container)
            raise SealingError(f"{KEY_ENV} is not set and the key file made without it, {path}, cannot be written "
                               f"({exc.strerror}): set {KEY_ENV} (or {KEY_FILE_ENV}) to a key from "
                               "raytwin.sealing.new_key()") from None
    keys = [k.strip().encode() for k in text.split(",") if k.strip()]
    if not keys:
        raise SealingError(f"{source} holds no key; make one with `python -c \"from raytwin.sealing import "
                           f"new_key; print(new_key())\"`")
    for key in keys:
        try:
            Fernet(key)
        except ValueError:
            raise SealingError(f"{source}: {key[:4].decode(errors='replace')}... is not a Fernet key "
                               "(32 url-safe base64-encoded bytes); make one with raytwin.sealing.new_key()") from None
    return keys, source


@dataclass(frozen=True)
class Sealer:
    """Seals and opens bytes with the configured keys (`Sealer.from_environment()`)."""

    keys: tuple[bytes, ...]
    source: str

    @classmethod
    def from_environment(cls) -> Sealer:
        keys, source = _configured_keys()
        return cls(tuple(keys), source)

    def seal(self, plaintext: bytes) -> bytes:
        token = Fernet(self.keys[0]).encrypt(plaintext)
        return json.dumps({"scheme": SCHEME, "key_id": _key_id(self.keys[0]), "token": token.decode()}).encode()

    def open(self, sealed: bytes) -> bytes:
        try:
            envelope = json.loads(sealed)
            scheme, key_id, token = envelope["scheme"], envelope["key_id"], envelope["token"].encode()
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SealingError("not a sealed value (damaged, or written by something else)") from None
        if scheme != SCHEME:
            raise SealingError(f"sealed with {scheme!r}, which this version cannot open (it knows {SCHEME!r})")
        try:
            return MultiFernet([Fernet(k) for k in self.keys]).decrypt(token)
        except InvalidToken:
            known = ", ".join(_key_id(k) for k in self.keys)
            raise SealingError(f"sealed with key {key_id}, which none of the keys from {self.source} ({known}) "
                               f"opens: configure that key in {KEY_ENV} (comma-separated, newest first)") from None

    def is_current(self, sealed: bytes) -> bool:
        """Whether `sealed` was sealed with the newest key (else re-seal it after a rotation)."""
        try:
            return json.loads(sealed).get("key_id") == _key_id(self.keys[0])
        except (ValueError, AttributeError):
            return False

