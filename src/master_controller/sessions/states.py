"""The session states and the only transitions allowed between them."""

from __future__ import annotations

from enum import StrEnum

from master_controller.errors import SessionStateError


class State(StrEnum):
    PROVISIONING = "provisioning"
    QUEUED = "queued"  # waiting for a boot slot (admission)
    BOOTING = "booting"
    READY = "ready"
    AUTHENTICATING = "authenticating"
    CAPTURED = "captured"
    HIBERNATING = "hibernating"
    HIBERNATED = "hibernated"
    RESUMING = "resuming"
    TERMINATED = "terminated"
    FAILED = "failed"


# How a session's reason starts when the controller ended it for the caller or for time (the
# API's callers tell these endings apart by them: ``cancelled``, ``timeout``).
CANCELLED = "cancelled"
TIMED_OUT = "timed out"

TERMINAL = frozenset({State.TERMINATED, State.FAILED})
# States whose guest is up and may be viewed.
VIEWABLE = frozenset({State.READY, State.AUTHENTICATING})
# States that hold host capacity (count against max_sessions). A captured session's guest
# is hibernated or destroyed.
ACTIVE = frozenset(State) - TERMINAL - {State.HIBERNATED, State.CAPTURED}
# States that hold a guest, running or saved (count against the per-key and per-user caps;
# a captured session counts too while its wiped guest is kept).
HOLDING = ACTIVE | {State.HIBERNATED, State.CAPTURED}

_NEXT: dict[State, frozenset[State]] = {
    State.PROVISIONING: frozenset({State.QUEUED, State.BOOTING}),
    State.QUEUED: frozenset({State.BOOTING}),
    State.BOOTING: frozenset({State.READY}),
    State.READY: frozenset({State.AUTHENTICATING, State.HIBERNATING}),
    State.AUTHENTICATING: frozenset({State.CAPTURED, State.READY, State.HIBERNATING}),
    State.CAPTURED: frozenset({State.RESUMING}),
    # a failed save leaves the guest running: back to where it was
    State.HIBERNATING: frozenset({State.HIBERNATED, State.READY, State.AUTHENTICATING}),
    State.HIBERNATED: frozenset({State.RESUMING}),
    State.RESUMING: frozenset({State.READY}),
    State.TERMINATED: frozenset(),
    State.FAILED: frozenset(),
}


def check_transition(current: State, new: State) -> None:
    """Raise SessionStateError unless ``current -> new`` is allowed. Any live state may end
    (terminated or failed); an ended session stays ended."""
    if current in TERMINAL:
        raise SessionStateError(f"the session has ended ({current})")
    if new in TERMINAL or new in _NEXT[current]:
        return
    raise SessionStateError(f"a {current} session cannot become {new}")
