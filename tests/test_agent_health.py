"""The agent's health report: a unit that runs but does not accept yet is not "running"."""

from __future__ import annotations

import socket

from mc_agent.health import LISTENS, SERVICES, _check_listening, _summarise, listening_ports


def test_a_listening_socket_is_seen_and_a_closed_one_is_not() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        assert port not in listening_ports()  # bound, not yet listening
        server.listen()
        assert port in listening_ports()
    assert port not in listening_ports()


def test_an_active_unit_without_its_port_is_reported_as_starting() -> None:
    running = {"ActiveState": "active", "LoadState": "loaded", "SubState": "running"}
    listening = {"ActiveState": "active", "LoadState": "loaded", "SubState": "listening"}
    states = {
        "x11vnc.service": _summarise("x11vnc.service", running),
        "websockify.socket": _summarise("websockify.socket", listening),
    }
    _check_listening(states, ports={6080})
    assert states["websockify.socket"]["active"] == "active"
    assert states["websockify.socket"]["summary"] == "websockify.socket listening"
    assert states["x11vnc.service"]["active"] == "activating"
    assert "not yet listening on port 5900" in states["x11vnc.service"]["summary"]


def test_socket_activated_websockify_is_watched_by_its_socket() -> None:
    """websockify runs only while used (its socket starts it): the health watches the
    socket, so an idle guest, websockify not running, is "ok"."""
    assert "websockify.socket" in SERVICES and "websockify.service" not in SERVICES
    assert LISTENS["websockify.socket"] == 6080
