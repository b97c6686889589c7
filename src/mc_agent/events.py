"""The agent's event log: what happened in the guest, numbered, for the event stream."""

from __future__ import annotations

import threading
import time
from typing import Any

MAX_EVENTS = 1000


class EventLog:
    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []
        self._seq = 0
        self._changed = threading.Condition()

    def add(self, kind: str, detail: dict[str, Any] | None = None) -> None:
        with self._changed:
            self._seq += 1
            self._events.append(
                {"seq": self._seq, "at": time.time(), "kind": kind, **(detail or {})}
            )
            del self._events[:-MAX_EVENTS]
            self._changed.notify_all()

    def since(self, seq: int, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Events after ``seq``, waiting up to ``timeout`` seconds for one to arrive."""
        with self._changed:
            self._changed.wait_for(lambda: self._seq > seq, timeout)
            return [e for e in self._events if e["seq"] > seq]
