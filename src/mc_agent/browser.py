"""Opening a URL in the guest's running Chromium (a new tab of the same profile), and
putting the viewer's pasted text on the guest's clipboard."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

BROWSER_USER = "browser"
PROFILE = "/home/browser/.config/chromium"
SCHEMES = ("http", "https", "data")
MAX_URL = 8192
MAX_CLIPBOARD = 1024  # characters: a password, a code, an address; not a document


def as_browser_user(argv: list[str]) -> list[str]:
    """``argv`` run as the display's user: as it is when the agent already is that user,
    through ``runuser`` otherwise."""
    if os.geteuid() == pwd.getpwnam(BROWSER_USER).pw_uid:
        return argv
    return ["runuser", "-u", BROWSER_USER, "--", *argv]


def display_env() -> dict[str, str]:
    """The environment of a program on the display :1 (and nothing of the agent's own)."""
    path = os.environ.get("PATH", "/usr/bin:/bin")
    return {"DISPLAY": ":1", "HOME": f"/home/{BROWSER_USER}", "PATH": path}


def check_url(url: str) -> str:
    """``url`` if it may be opened; ValueError says what is wrong."""
    if not url or len(url) > MAX_URL:
        raise ValueError(f"url must be 1 to {MAX_URL} characters")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"url scheme must be one of {', '.join(SCHEMES)}")
    if parts.scheme != "data" and not parts.netloc:
        raise ValueError("url has no host")
    if any(ord(c) < 32 for c in url):
        raise ValueError("url contains control characters")
    return url


def open_url(url: str) -> str:
    """Validate ``url`` and hand it to the running Chromium (a new tab of its profile)."""
    check_url(url)
    # argument list, no shell; "--" ends the options, so a URL can never become a flag
    chromium = ["/usr/bin/chromium", f"--user-data-dir={PROFILE}", "--", url]
    proc = subprocess.Popen(
        as_browser_user(chromium),
        env=display_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it when it is done
    return url


def browser_command(argv: list[str]) -> int:
    """``$BROWSER`` for login CLIs (``mc-browser URL``): record the URL for the agent, then
    open it in the running Chromium."""
    if len(argv) != 1:
        print("usage: mc-browser URL", file=sys.stderr)
        return 2
    try:
        url = check_url(argv[0])
    except ValueError as exc:
        print(f"mc-browser: {exc}", file=sys.stderr)
        return 2
    record = os.environ.get("MC_LOGIN_URLS")
    if record:
        with open(record, "a") as fh:
            fh.write(json.dumps({"url": url, "at": time.time()}) + "\n")
    open_url(url)
    return 0


def get_clipboard() -> str:
    """The display's CLIPBOARD text (what was copied in Chromium), at most MAX_CLIPBOARD
    characters; empty when nothing is. Read by ``xclip`` as the browser user; never logged."""
    xclip = ["xclip", "-selection", "clipboard", "-out", "-target", "UTF8_STRING"]
    done = subprocess.run(
        as_browser_user(xclip),
        env=display_env(),
        capture_output=True,
        timeout=10,
    )
    if done.returncode != 0:  # no owner, or no text in it
        return ""
    return done.stdout[: MAX_CLIPBOARD * 4].decode("utf-8", "replace")[:MAX_CLIPBOARD]


def set_clipboard(text: str) -> int:
    """Make ``text`` the display's CLIPBOARD (what Ctrl+V pastes in Chromium), owned by an
    ``xclip`` of the browser user that serves it until something else is copied. Returns
    how many characters. The text is never written anywhere, nor logged."""
    if not text or len(text) > MAX_CLIPBOARD:
        raise ValueError(f"the text must be 1 to {MAX_CLIPBOARD} characters")
    xclip = ["xclip", "-selection", "clipboard", "-in"]
    # xclip reads the text, then forks to serve it: the command returns once it is owned
    subprocess.run(
        as_browser_user(xclip),
        input=text.encode(),
        env=display_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=10,
        check=True,
    )
    return len(text)
