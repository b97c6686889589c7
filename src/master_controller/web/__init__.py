"""The controller's web side: JSON API, viewer page, WebSocket proxy, operator page."""
