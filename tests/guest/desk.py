"""A running container guest's display, driven from the host the way its viewer drives it.

Keys and clicks are XTEST input on :1 (what x11vnc turns a VNC viewer's input into),
commands run inside the guest through nsenter (as its root, or as the browser user, the
position a hostile viewer may reach), and what happened is read back from window titles,
processes and frames of the guest's real VNC server.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from master_controller.errors import ProbeError
from master_controller.runtimes.base import GuestSecrets, GuestState
from master_controller.runtimes.container import ContainerRuntime
from master_controller.viewing.guest_socket import rfb_connect
from master_controller.viewing.readiness import agent_health, poll
from master_controller.viewing.rfb import Frame

USER = "browser"
# the toolbar and tab strip of a maximized Chromium at 1280x800 end above this row
CONTENT_TOP = 100


class Desk:
    def __init__(self, runtime: ContainerRuntime, guest: GuestState) -> None:
        self.runtime = runtime
        self.guest = guest
        self.leader = str(guest.resources["leader"]["pid"])
        self.endpoint = runtime.endpoint(guest)
        self.token = guest.secrets.agent_token

    # --- inside the guest -----------------------------------------------------------------

    def root(self, *argv: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", self.leader, "-a", *argv],
            capture_output=True,
            text=True,
            input=input,
            timeout=60,
            check=False,
        )

    def user(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """``argv`` as the browser user, on the display (what a shell of theirs could do)."""
        command = ["env", "DISPLAY=:1", f"HOME=/home/{USER}", *argv]
        return self.root("runuser", "-u", USER, "--", *command)

    def xdotool(self, *args: str) -> str:
        return self.user("xdotool", *args).stdout

    def user_processes(self) -> dict[int, str]:
        """pid -> command name of each process of the browser user."""
        out = self.root("ps", "-u", USER, "-o", "pid=,comm=").stdout
        return {int(pid): name for pid, name in (line.split(None, 1) for line in out.splitlines())}

    def shells(self) -> list[str]:
        names = {"sh", "bash", "dash", "rbash", "lxterm", "uxterm", "x-terminal-emul"}
        return [name for name in self.user_processes().values() if name.strip() in names]

    # --- the display ----------------------------------------------------------------------

    def titles(self, klass: str | None = None) -> list[str]:
        ids = self.xdotool(
            "search", "--onlyvisible", *(["--class", klass] if klass else ["--name", "."])
        )
        return sorted({self.xdotool("getwindowname", wid).strip() for wid in ids.split()})

    def window_classes(self) -> list[str]:
        """The classes of the windows the window manager manages (minimized ones too)."""
        windows = self.call("GET", "/health").json()["windows"]
        return sorted(str(w["class"]) for w in windows)

    def top_level_windows(self) -> set[str]:
        """Ids of the root window's children (menus and dialogs are among them)."""
        out = self.root("xwininfo", "-root", "-children", "-display", ":1").stdout
        return {line.split()[0] for line in out.splitlines() if line.strip().startswith("0x")}

    def activate(self, klass: str, seconds: float = 20) -> str:
        """Focus and raise the first visible window of ``klass`` (waiting for one)."""
        deadline = time.monotonic() + seconds
        while not (found := self.xdotool("search", "--onlyvisible", "--class", klass).split()):
            assert time.monotonic() < deadline, f"no {klass} window"
            time.sleep(0.25)
        self.xdotool("windowactivate", "--sync", found[0])
        return found[0]

    def keys(self, *keys: str) -> None:
        self.xdotool("key", "--clearmodifiers", *keys)

    def type_url(self, url: str) -> None:
        """Type ``url`` into Chromium's address bar and go, as the viewer would."""
        self.activate("Chromium")
        self.keys("ctrl+l")
        time.sleep(0.3)
        self.xdotool("type", "--delay", "15", url)
        time.sleep(0.3)
        self.keys("Delete", "Return")  # Delete: drop an inline autocompletion

    async def frame(self) -> Frame:
        async with rfb_connect(self.endpoint.vnc_url, self.guest.secrets.vnc_password) as client:
            return await client.frame()

    async def wait_for_title(
        self, wanted: Callable[[list[str]], bool], seconds: float
    ) -> list[str]:
        deadline = time.monotonic() + seconds
        while True:
            titles = self.titles("Chromium")
            if wanted(titles) or time.monotonic() > deadline:
                return titles
            await asyncio.sleep(0.25)

    # --- the agent ------------------------------------------------------------------------

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        with httpx.Client(trust_env=False, timeout=60) as client:
            return client.request(
                method,
                self.endpoint.agent_url + path,
                json=body,
                headers={"Authorization": f"Bearer {self.token}"},
            )


# where Chromium draws the icon and the two lines of its "This page is blocked" page
BLOCKED_TEXT_BOX = (330, 180, 880, 385)  # x0, y0, x1, y1


async def until(check: Callable[[], bool], seconds: float, what: str) -> None:
    """Wait until ``check()`` holds (a busy host makes a guest slow, never wrong)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting {seconds:g} s for {what}"
        await asyncio.sleep(0.25)


def box_share(a: Frame, b: Frame, box: tuple[int, int, int, int] = BLOCKED_TEXT_BOX) -> float:
    """Share of the pixels in ``box`` that are equal in both frames (every one compared)."""
    x0, y0, x1, y1 = box
    equal = 0
    for y in range(y0, y1):
        row = y * a.width * 4
        line_a = a.pixels[row + x0 * 4 : row + x1 * 4]
        line_b = b.pixels[row + x0 * 4 : row + x1 * 4]
        equal += sum(line_a[i : i + 3] == line_b[i : i + 3] for i in range(0, len(line_a), 4))
    return equal / ((x1 - x0) * (y1 - y0))


def content_share(a: Frame, b: Frame) -> float:
    """Share of sampled pixels below Chromium's toolbar that are equal in both frames."""
    start = CONTENT_TOP * a.width * 4
    samples = range(start, len(a.pixels), 4 * 61)
    return sum(a.pixels[i : i + 3] == b.pixels[i : i + 3] for i in samples) / len(samples)


@contextlib.contextmanager
def booted_guest(runtime: ContainerRuntime, image: str, name: str) -> Iterator[Desk]:
    """A guest of ``image``, its agent answering and Chromium's window up; destroyed after."""
    guest_secrets = GuestSecrets(
        vnc_password=secrets.token_urlsafe(6)[:8], agent_token=secrets.token_hex(16)
    )
    guest = asyncio.run(runtime.create(f"{name}-{secrets.token_hex(3)}", image, guest_secrets))
    try:
        asyncio.run(runtime.start(guest))
        desk = Desk(runtime, guest)

        async def chromium_up() -> None:
            health = await agent_health(desk.endpoint.agent_url, desk.token)
            if not any(w["class"] == "Chromium" for w in health["windows"]):
                raise ProbeError(f"no Chromium window yet: {health['windows']}")

        asyncio.run(poll(chromium_up, time.monotonic() + 90, interval=0.5))
        yield desk
    finally:
        asyncio.run(runtime.destroy(guest))
