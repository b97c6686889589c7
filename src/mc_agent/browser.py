"""Opening a URL in the guest's running Chromium (a new tab of the same profile)."""

from __future__ import annotations

import os
import subprocess
import threading
from urllib.parse import urlsplit

BROWSER_USER = "browser"
PROFILE = "/home/browser/.config/chromium"
SCHEMES = ("http", "https", "data")
MAX_URL = 8192


def open_url(url: str) -> str:
    """Validate ``url`` and hand it to the running Chromium; ValueError says what is wrong."""
    if not url or len(url) > MAX_URL:
        raise ValueError(f"url must be 1 to {MAX_URL} characters")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"url scheme must be one of {', '.join(SCHEMES)}")
    if parts.scheme != "data" and not parts.netloc:
        raise ValueError("url has no host")
    if any(ord(c) < 32 for c in url):
        raise ValueError("url contains control characters")
    env = {"DISPLAY": ":1", "HOME": f"/home/{BROWSER_USER}", "PATH": os.environ.get("PATH", "")}
    # argument list, no shell; "--" ends the options, so a URL can never become a flag
    proc = subprocess.Popen(
        [
            "runuser",
            "-u",
            BROWSER_USER,
            "--",
            "/usr/bin/chromium",
            f"--user-data-dir={PROFILE}",
            "--",
            url,
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it when it is done
    return url
