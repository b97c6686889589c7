"""Route paths built in more than one place, and the viewer's cookie name."""

from __future__ import annotations

VIEWER_COOKIE = "mc_viewer"


def viewer_path(session_id: str) -> str:
    """The viewer page of a session (its WebSocket is ``.../websock`` below it)."""
    return f"/api/auth/session/{session_id}/novnc"
