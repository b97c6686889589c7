"""The guest agent of master-controller.

It runs inside every guest (container or VM), uses only the Python standard library of the
guest's Debian, and is copied into the image by the image builder. ``python3 -m mc_agent
apply-config`` renders the per-guest configuration at boot; ``python3 -m mc_agent serve``
serves the agent's HTTP API.
"""

AGENT_PORT = 8080
