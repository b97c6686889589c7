"""The credential vault: AES-256-GCM with a fresh 96-bit nonce per record, and associated
data binding each ciphertext to what it belongs to (:class:`Binding`), so a ciphertext
copied to another row, user, provider or API key does not decrypt.

Keys have ids. The key file (``vault_key_file``, default ``<data_dir>/vault.keys``, created
0600 on first use) holds every key still needed and which one is current. A key can also
come from the ``vault_key`` setting (base64 of 32 bytes), for operators who keep it in a
secret store; then the file is not used and there is nothing to rotate here.

The key file is shared by the running controller and ``master-controller vault rotate``:

- a lock file next to it (``vault.keys.lock``, ``flock``) is held *shared* by whoever seals
  or opens records, and *exclusive* by a rotation for its whole run, so no record is sealed
  or read while the set of keys changes;
- a process re-reads the key file when it changed (inode, mtime_ns, size) before sealing,
  and when a record names a key it does not hold; every write moves mtime_ns forward, so a
  change is never missed;
- a rotation writes the new key (the old ones kept) before re-encrypting anything, and a
  key is dropped only once no record uses it (see ``CredentialStore.rotate``), so a crash at
  any point loses nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from master_controller.errors import ConfigError, VaultBusy, VaultError
from master_controller.metrics import VAULT_ERRORS
from master_controller.settings import Settings

NONCE_BYTES = 12
# Records sealed from migration 0003 on also bind the API key that captured them; version 1
# records (sealed before) stay readable and become version 2 at the next rotation.
BINDING_VERSION = 2
# How long sealing, opening or rotating waits for the key file's lock before giving up (a
# rotation of many thousands of records takes seconds, not minutes).
LOCK_WAIT = 120.0


@dataclass(frozen=True)
class Sealed:
    key_id: str
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class Binding:
    """What a ciphertext is bound to: its AEAD associated data. ``version`` 1 is record id,
    user and provider; version 2 adds the id of the API key that owns the record (None for
    a record without one)."""

    record_id: str
    user_id: str
    provider: str
    api_key_id: str | None
    version: int = BINDING_VERSION

    def associated_data(self) -> bytes:
        if self.version == 1:
            fields: list[str | None] = [
                "mc-credential-v1",
                self.record_id,
                self.user_id,
                self.provider,
            ]
        elif self.version == 2:
            fields = [
                "mc-credential-v2",
                self.record_id,
                self.user_id,
                self.provider,
                self.api_key_id,
            ]
        else:
            raise VaultError(f"unknown record binding version {self.version}")
        return json.dumps(fields).encode()


Stamp = tuple[int, int, int]  # (st_ino, st_mtime_ns, st_size) of the key file read last


class Vault:
    """The keys one process holds. ``path`` is the key file they came from (None: from the
    ``vault_key`` setting)."""

    def __init__(
        self,
        keys: dict[str, bytes],
        current: str,
        path: Path | None,
        stamp: Stamp | None = None,
        lock_wait: float = LOCK_WAIT,
    ) -> None:
        if current not in keys:
            raise ConfigError(f"vault: the current key {current!r} is not among the keys")
        self.keys = keys
        self.current = current
        self.path = path
        self.stamp = stamp
        self.lock_wait = lock_wait

    @classmethod
    def open(cls, settings: Settings) -> Vault:
        if settings.vault_key:
            key = _decode_key(settings.vault_key.get_secret_value(), "the vault_key setting")
            key_id = "s-" + hashlib.sha256(key).hexdigest()[:8]
            return cls({key_id: key}, key_id, None)
        path = settings.vault_key_path
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _create_keys(path)
        keys, current, stamp = _read_keys(path)
        return cls(keys, current, path, stamp)

    # --- records ----------------------------------------------------------------------------

    def seal(self, binding: Binding, plaintext: bytes) -> Sealed:
        """Encrypt with the current key (call :meth:`reload_if_changed` first, under the
        shared lock, so the current key is the key file's)."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        aad = binding.associated_data()
        ciphertext = AESGCM(self.keys[self.current]).encrypt(nonce, plaintext, aad)
        return Sealed(self.current, nonce, ciphertext)

    def open_sealed(self, binding: Binding, sealed: Sealed) -> bytes:
        key = self.keys.get(sealed.key_id)
        if key is None and self.reload_if_changed():  # another process rotated
            key = self.keys.get(sealed.key_id)
        if key is None:
            VAULT_ERRORS.labels("missing key").inc()
            raise VaultError(f"the key {sealed.key_id} of this record is not in the vault")
        try:
            return AESGCM(key).decrypt(sealed.nonce, sealed.ciphertext, binding.associated_data())
        except InvalidTag as exc:
            VAULT_ERRORS.labels("undecryptable").inc()
            raise VaultError(
                "the record does not decrypt: it was altered or does not belong to this "
                "user, provider, API key and id"
            ) from exc

    # --- the key file, shared between processes ------------------------------------------

    def reload_if_changed(self) -> bool:
        """Re-read the key file if it is not the one read last; whether it was re-read."""
        if self.path is None:
            return False
        try:
            now = _stamp(os.stat(self.path))
        except OSError as exc:
            VAULT_ERRORS.labels("key file").inc()
            raise VaultError(f"the vault key file {self.path} is gone: {exc}") from exc
        if now == self.stamp:
            return False
        try:
            self.keys, self.current, self.stamp = _read_keys(self.path)
        except ConfigError as exc:
            VAULT_ERRORS.labels("key file").inc()
            raise VaultError(exc.reason) from exc
        return True

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        """Hold the key file's lock shared: keys do not change until the block ends."""
        async with self._locked(fcntl.LOCK_SH):
            yield

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the key file's lock alone (rotation): nobody seals or opens meanwhile."""
        async with self._locked(fcntl.LOCK_EX):
            yield

    @contextlib.asynccontextmanager
    async def _locked(self, mode: int) -> AsyncIterator[None]:
        if self.path is None:  # a key from the settings never changes
            yield
            return
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            # Non-blocking attempts with short sleeps: the event loop keeps serving, and a
            # cancelled waiter leaves no thread behind that takes the lock later.
            deadline = time.monotonic() + self.lock_wait
            delay = 0.002
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        VAULT_ERRORS.labels("busy").inc()
                        raise VaultBusy(
                            f"the vault's keys are being rotated (waited {self.lock_wait:.0f} s "
                            f"for {lock}); try again"
                        ) from None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def key_file_content(self) -> bytes:
        """The keys as a key file holds them (for a backup)."""
        return _serialize(self.keys, self.current)

    # --- rotation (with the exclusive lock held) -------------------------------------------

    def add_key(self) -> str:
        """A new current key, written to the key file (durably) with every old key kept."""
        if self.path is None:
            raise ConfigError("the vault key comes from the vault_key setting; rotate it there")
        key_id = _new_key_id()
        keys = {**self.keys, key_id: AESGCM.generate_key(256)}
        self.stamp = _write_keys(self.path, keys, key_id)
        self.keys, self.current = keys, key_id
        return key_id

    def retire(self, in_use: Iterable[str]) -> list[str]:
        """Drop every key but the current one and those in ``in_use`` (the key ids some
        record still names); returns the dropped ids."""
        if self.path is None:
            return []
        keep = {*in_use, self.current}
        old = sorted(k for k in self.keys if k not in keep)
        if old:
            keys = {k: v for k, v in self.keys.items() if k in keep}
            self.stamp = _write_keys(self.path, keys, self.current)
            self.keys = keys
        return old


def _new_key_id() -> str:
    return "k-" + secrets.token_hex(4)


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{where} is not base64") from exc
    if len(key) != 32:
        raise ConfigError(f"{where} must be 32 bytes (AES-256), not {len(key)}")
    return key


def _read_keys(path: Path) -> tuple[dict[str, bytes], str, Stamp]:
    """The keys, the current key id, and the stamp of the very file they were read from."""
    try:
        with path.open("rb") as fh:
            stamp = _stamp(os.fstat(fh.fileno()))
            data = json.loads(fh.read())
        keys = {k: _decode_key(v, f"{path} key {k}") for k, v in data["keys"].items()}
        current = str(data["current"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"vault key file {path} is unreadable: {exc}") from exc
    if current not in keys:
        raise ConfigError(f"vault key file {path}: the current key {current!r} is missing")
    return keys, current, stamp


def _serialize(keys: dict[str, bytes], current: str) -> bytes:
    return json.dumps(
        {"current": current, "keys": {k: base64.b64encode(v).decode() for k, v in keys.items()}},
        indent=2,
    ).encode()


def _private_tmp(path: Path, content: bytes) -> Path:
    """A new file beside ``path`` holding ``content``, 0600 from the first byte, on disk."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(content)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_keys(path: Path) -> None:
    """A first key file, unless another process made one first (then that one counts: two
    processes starting at once must not each keep a key of their own)."""
    key_id = _new_key_id()
    tmp = _private_tmp(path, _serialize({key_id: AESGCM.generate_key(256)}, key_id))
    try:
        os.link(tmp, path)  # fails if the file exists, unlike a rename
        _fsync_dir(path.parent)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def write_key_file(path: Path, keys: dict[str, bytes], current: str) -> None:
    """Atomically and durably make ``path`` hold these keys (a restore; nobody else holds
    the data dir then)."""
    _write_keys(path, keys, current)


def _write_keys(path: Path, keys: dict[str, bytes], current: str) -> Stamp:
    """Atomically and durably replace the key file; returns the new file's stamp. Callers
    hold the exclusive lock."""
    tmp = _private_tmp(path, _serialize(keys, current))
    try:
        # mtime_ns strictly grows from one version to the next, so a reader's (inode,
        # mtime_ns, size) never matches a newer file, even when an inode number comes back
        # and the clock's granularity is coarser than two writes.
        previous = os.stat(path).st_mtime_ns
        now = max(time.time_ns(), previous + 1)
        os.utime(tmp, ns=(now, now))
    except FileNotFoundError:
        pass
    stamp = _stamp(os.stat(tmp))
    tmp.replace(path)
    # the rename itself must be on disk before any record is re-encrypted with the new key
    _fsync_dir(path.parent)
    return stamp
