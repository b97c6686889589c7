"""The words of the system we replace, for its clients (see MIGRATING.md).

Its web app and dashboard read a ``session`` object and act on its ``status``; our own
states are finer (queued, hibernated, captured...) and stay in our fields. This module says
how one maps onto the other, once (the object itself is ``schemas.OriginalSession``).
"""

from __future__ import annotations

from enum import StrEnum

from master_controller.sessions.states import TIMED_OUT, State


class OriginalStatus(StrEnum):
    VM_CREATED = "vm_created"  # the guest is being made or started
    READY = "ready"  # the guest is up; the CLI's login has not started
    AWAITING_USER_AUTH = "awaiting_user_auth"  # the person signs in (the viewer is shown)
    AUTHENTICATING = "authenticating"  # credentials detected: being fetched and sealed
    COMPLETED = "completed"  # the credentials are in the vault
    HIBERNATED = "hibernated"  # ours only: the guest is saved (clients keep polling)
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


_BY_STATE = {
    State.PROVISIONING: OriginalStatus.VM_CREATED,
    State.QUEUED: OriginalStatus.VM_CREATED,
    State.BOOTING: OriginalStatus.VM_CREATED,
    State.RESUMING: OriginalStatus.VM_CREATED,
    State.READY: OriginalStatus.READY,
    State.AUTHENTICATING: OriginalStatus.AWAITING_USER_AUTH,
    State.CAPTURED: OriginalStatus.COMPLETED,
    State.HIBERNATING: OriginalStatus.HIBERNATED,
    State.HIBERNATED: OriginalStatus.HIBERNATED,
    State.FAILED: OriginalStatus.FAILED,
}


def original_status(state: str, reason: str, capturing: bool) -> OriginalStatus:
    """The status the original clients act on, for a session in ``state`` that ended with
    (or last noted) ``reason``; ``capturing``: its credentials are being fetched now."""
    current = State(state)
    if current == State.AUTHENTICATING and capturing:
        return OriginalStatus.AUTHENTICATING
    if current == State.TERMINATED:
        timed_out = reason.startswith(TIMED_OUT)
        return OriginalStatus.TIMEOUT if timed_out else OriginalStatus.CANCELLED
    return _BY_STATE[current]
