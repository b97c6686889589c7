"""The credential vault: AES-256-GCM with a fresh 96-bit nonce per record, and associated
data binding each ciphertext to its record id, user and provider, so a ciphertext copied to
another row (or user, or provider) does not decrypt.

Keys have ids. The key file (``vault_key_file``, default ``<data_dir>/vault.keys``, created
0600 on first use) holds every key still needed and which one is current; ``rotate`` adds a
new current key, re-encrypts every record with it, then drops the old keys. A key can also
come from the ``vault_key`` setting (base64 of 32 bytes), for operators who keep it in a
secret store; then the file is not used.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from master_controller.errors import ConfigError, VaultError
from master_controller.settings import Settings

NONCE_BYTES = 12


@dataclass(frozen=True)
class Sealed:
    key_id: str
    nonce: bytes
    ciphertext: bytes


def associated_data(record_id: str, user_id: str, provider: str) -> bytes:
    return json.dumps(["mc-credential-v1", record_id, user_id, provider]).encode()


class Vault:
    def __init__(self, keys: dict[str, bytes], current: str, path: Path | None) -> None:
        if current not in keys:
            raise ConfigError(f"vault: the current key {current!r} is not among the keys")
        self.keys = keys
        self.current = current
        self.path = path

    @classmethod
    def open(cls, settings: Settings) -> Vault:
        if settings.vault_key:
            key = _decode_key(settings.vault_key.get_secret_value(), "the vault_key setting")
            key_id = "s-" + hashlib.sha256(key).hexdigest()[:8]
            return cls({key_id: key}, key_id, None)
        path = settings.vault_key_path
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            key_id = _new_key_id()
            _write_keys(path, {key_id: AESGCM.generate_key(256)}, key_id)
        try:
            data = json.loads(path.read_text())
            keys = {k: _decode_key(v, f"{path} key {k}") for k, v in data["keys"].items()}
            return cls(keys, str(data["current"]), path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"vault key file {path} is unreadable: {exc}") from exc

    def seal(self, record_id: str, user_id: str, provider: str, plaintext: bytes) -> Sealed:
        nonce = secrets.token_bytes(NONCE_BYTES)
        aad = associated_data(record_id, user_id, provider)
        ciphertext = AESGCM(self.keys[self.current]).encrypt(nonce, plaintext, aad)
        return Sealed(self.current, nonce, ciphertext)

    def open_sealed(self, record_id: str, user_id: str, provider: str, sealed: Sealed) -> bytes:
        key = self.keys.get(sealed.key_id)
        if key is None:
            raise VaultError(f"the key {sealed.key_id} of this record is not in the vault")
        try:
            return AESGCM(key).decrypt(
                sealed.nonce, sealed.ciphertext, associated_data(record_id, user_id, provider)
            )
        except InvalidTag as exc:
            raise VaultError(
                "the record does not decrypt: it was altered or does not belong to this "
                "user, provider and id"
            ) from exc

    # --- rotation ---------------------------------------------------------------------------

    def add_key(self) -> str:
        """A new current key (old keys stay until :meth:`retire_others`)."""
        if self.path is None:
            raise ConfigError("the vault key comes from the vault_key setting; rotate it there")
        key_id = _new_key_id()
        self.keys[key_id] = AESGCM.generate_key(256)
        self.current = key_id
        _write_keys(self.path, self.keys, key_id)
        return key_id

    def retire_others(self) -> list[str]:
        """Drop every key but the current one (after all records use it)."""
        assert self.path is not None
        old = [k for k in self.keys if k != self.current]
        self.keys = {self.current: self.keys[self.current]}
        _write_keys(self.path, self.keys, self.current)
        return old


def _new_key_id() -> str:
    return "k-" + secrets.token_hex(4)


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{where} is not base64") from exc
    if len(key) != 32:
        raise ConfigError(f"{where} must be 32 bytes (AES-256), not {len(key)}")
    return key


def _write_keys(path: Path, keys: dict[str, bytes], current: str) -> None:
    """Atomically replace the key file, 0600 from the first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(
            {
                "current": current,
                "keys": {k: base64.b64encode(v).decode() for k, v in keys.items()},
            },
            fh,
            indent=2,
        )
        fh.flush()
        os.fsync(fh.fileno())
    with contextlib.suppress(OSError):
        tmp.chmod(0o600)
    tmp.replace(path)
