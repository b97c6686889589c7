"""Every code the viewer's WebSocket is closed with, named once. The viewer page maps each
to words (``web/static/viewer.js``); 1xxx are RFC 6455's, 44xx ours (HTTP's status plus
4000, so 4404 reads as "not found")."""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    VIEWER_PROTOCOL = 1008  # the viewer broke the RFB protocol or did not finish it in time
    MESSAGE_TOO_BIG = 1009  # a message over the bound, from either side
    GUEST_FAILED = 1011  # the guest's VNC unreachable, closed, silent, oversized or lying
    NO_TICKET = 4401  # no or invalid viewer ticket / cookie
    ORIGIN_REFUSED = 4403
    NOT_FOUND = 4404  # no such session
    NOT_READY = 4409  # the session is not ready yet (booting, resuming)
    ENDED = 4410  # the session ended (cancelled, failed, expired, credentials captured)
    HIBERNATED = 4412  # the session was put to sleep
    TOO_MANY_VIEWERS = 4429  # the session has max_viewers viewers already
