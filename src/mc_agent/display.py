"""The guest's screen size: fitted to the viewer's window.

Xvfb starts at its largest size and ``/usr/lib/mc/display-size`` (in the image) switches it
with RandR; x11vnc (``-xrandr``) sends the new size to every viewer. This module clamps what
a viewer asks for to what the image supports and runs that script as the display's user."""

import subprocess
import threading

from mc_agent.browser import as_browser_user, display_env

DISPLAY_SIZE = "/usr/lib/mc/display-size"
MIN_WIDTH, MIN_HEIGHT = 800, 600
MAX_WIDTH, MAX_HEIGHT = 1920, 1200  # Xvfb's start size: RandR cannot grow past it

_one_at_a_time = threading.Lock()


def clamp(width: object, height: object) -> tuple[int, int]:
    """The size the display takes for a window of ``width`` x ``height``: a window smaller
    than the smallest screen gets that screen in the window's shape (a phone's tall window a
    tall screen, which the viewer scales down to fill it), then everything within the
    limits, the width even (some encoders and scalers dislike odd widths)."""
    if not isinstance(width, int) or not isinstance(height, int):
        raise ValueError("width and height must be integers")
    if isinstance(width, bool) or isinstance(height, bool):
        raise ValueError("width and height must be integers")
    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")
    up = max(1.0, MIN_WIDTH / width, MIN_HEIGHT / height)
    width, height = round(width * up), round(height * up)
    width = min(max(width, MIN_WIDTH), MAX_WIDTH) // 2 * 2
    return width, min(max(height, MIN_HEIGHT), MAX_HEIGHT)


def set_size(width: object, height: object) -> dict[str, int]:
    """Resize the display to fit ``width`` x ``height``; returns the size it has after."""
    width, height = clamp(width, height)
    argv = as_browser_user([DISPLAY_SIZE, str(width), str(height)])
    with _one_at_a_time:
        done = subprocess.run(argv, env=display_env(), capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise OSError(f"display-size failed: {done.stderr.strip()[-300:]}")
    got_width, _, got_height = done.stdout.strip().rpartition("\n")[-1].partition("x")
    return {"width": int(got_width), "height": int(got_height)}
