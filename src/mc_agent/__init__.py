"""The guest agent of master-controller.

It runs inside every guest (container or VM), uses only the Python standard library of the
guest's Debian, and is copied into the image by the image builder. ``python3 -m mc_agent
apply-config`` renders the per-guest configuration at boot; ``python3 -m mc_agent serve``
serves the agent's HTTP API.
"""

# The guest's ports, declared once: the image's units listen on them (checked by the image
# contract) and the controller reaches the guest on them.
VNC_PORT = 5900  # x11vnc, on the guest's address: what the relay connects to (host only)
WEBSOCKIFY_PORT = 6080  # websockify -> VNC_PORT, socket-activated (noVNC in the guest)
AGENT_PORT = 8080
