"""Everything between the controller and a guest's screen: the RFB protocol, the streams it
travels on (TCP to a guest's VNC server, WebSocket to websockify or the viewer route), the
readiness checks of the viewer path, and the relay between a viewer and a guest (with the
registry of connected viewers and their close codes)."""
