"""The one error tree of master-controller.

Every error the package raises on purpose is a subclass of :class:`MCError`. Third-party and
OS errors are translated at the boundary (``raise X(...) from exc``) so callers only ever
catch these. A refusal a person sees carries a ``reason`` and an HTTP ``status``.

::

    MCError
     ├── ConfigError                 bad settings or recipe (400)
     │    └── DataDirInUse           another controller runs on this data dir; names it (409)
     ├── CommandError                an external command failed (argv, exit code, tail of output)
     ├── ImageError
     │    ├── BuildError             a build step failed; nothing was added to the store
     │    ├── ImageNotFound
     │    ├── VerificationFailed     a check failed; names what is missing
     │    └── PromotionRefused       the image did not pass verification
     ├── RuntimeUnavailable          this host cannot run the requested runtime (and why)
     ├── StorageFull                 a file system we write to is (about to be) full (507)
     ├── GuestError
     │    ├── GuestAgentError        the guest's agent failed, refused or broke a bound (502)
     │    ├── GuestNotFound
     │    ├── GuestStartFailed       a start step failed; its resources were released
     │    ├── HibernateFailed        saving failed; the guest was left running
     │    └── GuestStateError        the operation does not fit the guest's state
     ├── NetworkError
     │    ├── AddressPoolExhausted
     │    ├── UpstreamFailed         an upstream proxy failed (names it, never its secret)
     │    └── NoEgressIdentity       no upstream works for the user: fail closed (503)
     ├── ProbeError                  a readiness check from outside the guest failed
     ├── SessionError
     │    ├── SessionNotFound        (404; also what another key's session looks like)
     │    ├── SessionStateError      the operation does not fit the session's state (409)
     │    ├── TooManySessions        a capacity or quota is full (429, Retry-After)
     │    └── NoImage                no promoted image (503)
     ├── VaultError                  a record does not decrypt (wrong key, or altered)
     │    └── VaultBusy              a key rotation holds the vault (503, Retry-After)
     ├── BackupError                 a backup cannot be written or restored (wrong key, altered,
     │                               an installation in the way); nothing was changed
     ├── CredentialsNotFound         (404)
     ├── AmbiguousCredentials        an admin must say whose record (409)
     └── RateLimited                 (429, Retry-After)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class MCError(Exception):
    """Base of every error master-controller raises on purpose."""

    status: int = 500
    # seconds a client should wait before trying again (sent as Retry-After)
    retry_after: int | None = None

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(MCError):
    """Settings or a recipe are invalid."""

    status = 400


class DataDirInUse(ConfigError):
    """Another controller holds this data dir's lock; ``reason`` names it (pid, address,
    start time). ``holder`` is a :class:`master_controller.instance.Holder`, or None if it
    has not written who it is yet."""

    status = 409

    def __init__(self, reason: str, data_dir: Path, holder: Any = None) -> None:
        super().__init__(reason)
        self.data_dir = data_dir
        self.holder = holder


class CommandError(MCError):
    """An external command exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, output: str = "") -> None:
        tail = "\n".join(output.strip().splitlines()[-15:])
        super().__init__(f"{argv[0]} exited with {returncode}" + (f":\n{tail}" if tail else ""))
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output


class ImageError(MCError):
    """Something about a golden image."""


class BuildError(ImageError):
    """A build step failed. Nothing was added to the image store."""


class ImageNotFound(ImageError):
    status = 404


class VerificationFailed(ImageError):
    """A verification check failed; ``reason`` names what is missing."""

    status = 409


class PromotionRefused(ImageError):
    """Promotion was refused because that exact image did not pass verification."""

    status = 409


class RuntimeUnavailable(MCError):
    """This host cannot run the requested runtime; ``reason`` says why."""

    status = 503


class StorageFull(MCError):
    """A file system master-controller writes to has no room left (or not enough for what
    is about to be written); ``reason`` names it and what is free."""

    status = 507


class GuestError(MCError):
    """Something about a guest."""


class GuestAgentError(GuestError):
    """The guest's agent could not be reached or refused a request."""

    status = 502


class GuestNotFound(GuestError):
    status = 404


class GuestStartFailed(GuestError):
    """A start step failed. Every resource the start created has been released."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"step {step!r} failed: {reason}")
        self.step = step


class HibernateFailed(GuestError):
    """Saving the guest failed part-way; what was written is removed and the guest was left
    running, as it was. ``no_space`` says the cause was a full file system."""

    def __init__(self, reason: str, no_space: bool = False) -> None:
        super().__init__(reason)
        self.no_space = no_space
        self.status = 507 if no_space else 502


class GuestStateError(GuestError):
    """The operation does not fit the guest's current state."""

    status = 409


class NetworkError(MCError):
    """Creating or removing a guest's network failed."""


class AddressPoolExhausted(NetworkError):
    status = 503


class UpstreamFailed(NetworkError):
    """An upstream proxy could not be reached, refused, or failed its check; names the
    upstream by its URL (never its credentials)."""

    status = 502

    def __init__(self, upstream: str, why: str) -> None:
        super().__init__(f"upstream {upstream}: {why}")
        self.upstream = upstream


class NoEgressIdentity(NetworkError):
    """No upstream works for the user: the session fails closed, never going out directly."""

    status = 503


class ProbeError(MCError):
    """A readiness check made from outside the guest failed."""


class SessionError(MCError):
    """Something about a sign-in session."""


class SessionNotFound(SessionError):
    status = 404


class SessionStateError(SessionError):
    status = 409


class TooManySessions(SessionError):
    status = 429
    retry_after = 30


class NoImage(SessionError):
    status = 503


class VaultError(MCError):
    """A stored credential cannot be decrypted (wrong key, or the record was altered)."""

    status = 500


class BackupError(MCError):
    """A backup cannot be written, opened or restored; says why. Nothing was changed."""

    status = 400


class VaultBusy(VaultError):
    """The key file's lock was not free in time (a rotation is running)."""

    status = 503
    retry_after = 5


class CredentialsNotFound(MCError):
    status = 404


class AmbiguousCredentials(MCError):
    """An admin asked for a user's credentials that several API keys hold, without saying
    whose."""

    status = 409


class RateLimited(MCError):
    """An API key sent more requests than its rate allows."""

    status = 429

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
