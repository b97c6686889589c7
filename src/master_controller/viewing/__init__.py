"""Everything between the controller and a guest's screen: the RFB protocol, the WebSocket
to a guest's websockify, the readiness checks of the viewer path, and the relay between a
viewer and a guest (with the registry of connected viewers and their close codes)."""
