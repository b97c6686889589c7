"""What the person viewing a guest can reach, tried in a real guest (container runtime,
golden image): each test performs an attack the way a viewer (keys and clicks on :1) or the
browser user (commands as ``browser``) would, and checks it fails.

- Chromium's managed policy: no file://, chrome://, view-source: or extension pages, no
  DevTools, no downloads, no file dialogs; http(s) and data: still load.
- The login terminal: the old tmux prefix (C-b c, C-b :, C-b %) makes no window and no
  shell, not even after the CLI has exited; xterm opens no menus.
- The agent, as root, follows none of the browser user's links.
- The window manager: its root menu (which opened a terminal) is gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from master_controller.images.contract import hardening_problems
from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import Settings
from mc_agent.health import SERVICES
from tests.guest.desk import Desk, booted_guest, box_share, content_share, until

pytestmark = pytest.mark.integration

SECRET_PAGE = "/etc/mc-secret.html"  # world-readable, planted by the guest's root
SECRET_TITLE = "SECRET-LOADED"
NOVNC = "http://127.0.0.1:6080/vnc.html"  # websockify's web root, inside the guest
OAUTH2 = {
    "provider": "oauth2",
    "options": {
        "authorize_url": "http://idp.invalid:9/authorize",
        "token_url": "http://idp.invalid:9/token",
        "client_id": "mc-test",
    },
}


@pytest.fixture(scope="module")
def desk(golden_image: str, integration_settings: Settings) -> Iterator[Desk]:
    with booted_guest(ContainerRuntime(integration_settings), golden_image, "harden") as desk:
        yield desk


def test_the_running_image_meets_the_hardening_contract(desk: Desk) -> None:
    rootfs = desk.runtime.guest_dir(desk.guest.guest_id) / "rootfs"
    assert hardening_problems(rootfs) == []


def test_health_names_each_service_with_its_version_from_few_processes(desk: Desk) -> None:
    """The health check runs often (readiness, the reaper, tests): it starts one systemctl
    and, once per boot, one dpkg-query, so it answers fast even on an emulated CPU."""
    health = desk.call("GET", "/health").json()
    assert health["status"] == "ok", health["problems"]
    units = {unit.rpartition(".")[0]: unit for unit in SERVICES}
    for name, service in health["services"].items():
        # websockify is watched by its socket (socket-activated: runs only while used)
        state = "listening" if units[name].endswith(".socket") else "running"
        assert service["active"] == "active" and service["summary"] == f"{units[name]} {state}"
        assert service["version"] and service["version"][0].isdigit(), (name, service)
    installed = desk.root("dpkg-query", "-W", "-f=${Version}", "chromium").stdout
    assert health["services"]["chromium"]["version"] == installed
    desk.root("systemctl", "stop", "openbox.service")
    try:
        degraded = desk.call("GET", "/health").json()
        assert degraded["status"] == "degraded"
        assert degraded["problems"] == ["openbox.service inactive (dead)"], degraded["problems"]
    finally:
        desk.root("systemctl", "start", "openbox.service")
    started = time.monotonic()
    for _ in range(5):
        desk.call("GET", "/health")
    assert (time.monotonic() - started) / 5 < 0.5


async def _show_plain_page(desk: Desk, marker: str) -> None:
    """A typed data: page titled ``marker`` (typing into the address bar is retried: a key
    can get lost while Chromium is busy; the attacks themselves are typed once)."""
    for _ in range(3):
        desk.type_url(f"data:text/html,<title>{marker}</title><body bgcolor=teal>")
        titles = await desk.wait_for_title(lambda t: f"{marker} - Chromium" in t, 5)
        if f"{marker} - Chromium" in titles:
            return
    raise AssertionError(f"typed data: page not shown: {titles}")


async def test_chromium_refuses_local_files_and_internal_pages(desk: Desk) -> None:
    desk.root("sh", "-c", f"echo '<title>{SECRET_TITLE}</title>secret' > {SECRET_PAGE}")
    await _show_plain_page(desk, "TYPED-OK")  # typed data: URLs load (the start page is one)
    desk.type_url(NOVNC)  # and http
    titles = await desk.wait_for_title(lambda t: any("noVNC" in x for x in t), 15)
    assert any("noVNC" in x for x in titles), titles
    loaded = await desk.frame()

    # a local file the browser user may read: Chromium's "blocked" page instead
    await _show_plain_page(desk, "BEFORE-FILE")
    desk.type_url(f"file://{SECRET_PAGE}")
    titles = await desk.wait_for_title(lambda t: "BEFORE-FILE - Chromium" not in t, 10)
    await asyncio.sleep(1.0)
    titles = desk.titles("Chromium")
    assert not any(SECRET_TITLE in x for x in titles), titles
    blocked = await desk.frame()  # Chromium's "This page is blocked": the oracle
    assert box_share(blocked, loaded) < 0.9

    attacks = [
        "file:///etc/passwd",
        "file:///home/browser/",  # a listing of the browser user's home
        "chrome://version",
        "chrome://settings",
        f"view-source:{NOVNC}",
        "chrome-extension://mhjfbmdgcfjbbpaeojofohoefgiehjai/index.html",  # the PDF viewer
    ]
    for index, url in enumerate(attacks):
        await _show_plain_page(desk, f"BEFORE-{index}")
        desk.type_url(url)
        deadline = time.monotonic() + 10
        while (share := box_share(await desk.frame(), blocked)) < 0.999:
            assert time.monotonic() < deadline, f"{url} was not blocked ({share:.1%} alike)"
            await asyncio.sleep(0.5)


async def test_devtools_do_not_open(desk: Desk) -> None:
    await _show_plain_page(desk, "DEVTOOLS")
    before = await desk.frame()
    for keys in (["F12"], ["ctrl+shift+i"], ["ctrl+shift+j"], ["ctrl+shift+c"], ["ctrl+u"]):
        desk.activate("Chromium")
        desk.keys(*keys)
        await asyncio.sleep(1.5)
        # with the policy Chromium says "DevTools not allowed on this page" in a dialog:
        # Escape dismisses it, while docked DevTools would stay open
        desk.keys("Escape")
        await asyncio.sleep(1.0)
        after = await desk.frame()
        assert content_share(after, before) > 0.99, f"{keys} changed the page"
        assert not any("DevTools" in t or "view-source" in t for t in desk.titles()), keys


async def test_no_downloads_printing_or_file_dialogs(desk: Desk) -> None:
    await _show_plain_page(desk, "DIALOGS")
    windows = desk.titles()
    desk.type_url("data:application/octet-stream;base64,aGVsbG8K")
    await asyncio.sleep(3)
    listing = desk.root("find", "/home/browser", "-path", "*/Downloads/*").stdout
    assert listing == ""
    await _show_plain_page(desk, "DIALOGS")
    for keys in ("ctrl+o", "ctrl+s"):  # GTK's "Open File" and "Save File" dialogs
        desk.activate("Chromium")
        desk.keys(keys)
        await asyncio.sleep(1.5)
        assert desk.titles() == windows, f"{keys} opened a window"
    before = await desk.frame()
    desk.keys("ctrl+p")  # print preview, drawn over the page
    await asyncio.sleep(2)
    assert content_share(await desk.frame(), before) > 0.99
    desk.keys("Escape")


def _tmux(desk: Desk, *args: str) -> str:
    return desk.user("tmux", "-S", "/run/mc/login/tmux.sock", *args).stdout


def _pane(desk: Desk) -> str:
    return _tmux(desk, "capture-pane", "-p", "-t", "login")


async def test_the_login_terminal_gives_no_shell(desk: Desk) -> None:
    assert desk.call("POST", "/login", OAUTH2).status_code == 202
    deadline = time.monotonic() + 30
    while not desk.call("GET", "/login").json()["opened_urls"]:
        assert time.monotonic() < deadline, "the login opened no URL"
        await asyncio.sleep(0.5)
    await asyncio.sleep(5)  # the agent raises the terminal twice after Chromium took focus

    def attack() -> None:
        desk.activate("XTerm")
        desk.keys("ctrl+b", "c")
        desk.keys("ctrl+b", "colon")
        desk.xdotool("type", "new-window")
        desk.keys("Return", "ctrl+b", "percent", "ctrl+b", "quotedbl", "ctrl+b", "d")
        desk.xdotool("type", "sh")
        desk.keys("Return")

    def no_shell() -> None:
        assert _tmux(desk, "list-windows", "-a").count("\n") == 1
        assert _tmux(desk, "list-panes", "-a").count("\n") == 1
        assert desk.shells() == []
        assert desk.titles("XTerm")  # still attached: C-b d did not detach

    desk.activate("XTerm")
    desk.xdotool("type", "marker-typed")
    await until(lambda: "marker-typed" in _pane(desk), 10, "typed keys in the pane")
    attack()
    # the prefix reached the program in the pane as a plain key (its echo), up to the last
    await until(lambda: "^Bd" in _pane(desk), 10, "the prefix keys echoed")
    await asyncio.sleep(1.0)
    no_shell()

    # xterm's ctrl+click menus (logging, printing, signals, "allow window ops")
    wid = desk.activate("XTerm")
    geometry = dict(
        line.split("=", 1) for line in desk.xdotool("getwindowgeometry", "--shell", wid).split()
    )
    x, y = int(geometry["X"]) + 60, int(geometry["Y"]) + 40
    windows = desk.top_level_windows()
    for button in ("1", "2", "3"):
        desk.xdotool("mousemove", str(x), str(y), "keydown", "ctrl", "mousedown", button)
        await asyncio.sleep(0.5)
        opened = desk.top_level_windows() - windows
        desk.xdotool("mouseup", button, "keyup", "ctrl")
        assert not opened, f"ctrl+button {button} opened {opened}"

    # the CLI exits: the pane stays dead, and the prefix still opens nothing
    cli = _tmux(desk, "list-panes", "-t", "login", "-F", "#{pane_pid}").strip()
    desk.root("kill", "-9", cli)
    dead = "#{pane_dead}"
    await until(lambda: _tmux(desk, "list-panes", "-F", dead).strip() == "1", 10, "a dead pane")
    attack()
    await asyncio.sleep(1.5)
    no_shell()


def test_the_agent_follows_none_of_the_users_links(desk: Desk) -> None:
    # ~/.gemini -> /etc once made /etc the browser user's (the agent chowned the folders)
    desk.user("ln", "-sfn", "/etc", "/home/browser/.gemini")
    answer = desk.call("POST", "/login", {"provider": "gemini_cli", "options": {}})
    assert answer.status_code == 400 and "symbolic link" in answer.json()["error"]
    assert desk.root("stat", "-c", "%U:%G %a", "/etc").stdout.strip() == "root:root 755"
    assert desk.root("test", "-e", "/etc/settings.json").returncode != 0
    desk.user("rm", "/home/browser/.gemini")

    # a credential file that is a link to a root-only file is neither read nor handed out
    desk.user("mkdir", "-p", "/home/browser/.config/mc-oauth2")
    desk.user("ln", "-sf", "/etc/shadow", "/home/browser/.config/mc-oauth2/token.json")
    assert desk.call("POST", "/login", OAUTH2).status_code == 202
    status = desk.call("GET", "/credentials/status").json()
    assert status["valid"] is False and "symbolic link" in status["reason"]
    fetched = desk.call("POST", "/credentials/fetch")
    assert fetched.status_code == 409 and "root:" not in fetched.text


def test_the_window_manager_starts_nothing(desk: Desk) -> None:
    """The stock Openbox root menu's first item is "Terminal emulator" (a shell)."""
    before = desk.window_classes()
    minimized = desk.xdotool("search", "--onlyvisible", "--name", ".").split()
    try:
        for wid in minimized:
            desk.xdotool("windowminimize", wid)  # bare desktop under the pointer
        time.sleep(0.5)
        for button in ("3", "2", "1"):
            desk.xdotool("mousemove", "600", "400", "click", button)
            time.sleep(0.5)
            desk.keys("Down", "Return")
        desk.keys("alt+space")
        time.sleep(0.5)
        desk.keys("Down", "Return")
        time.sleep(2)
        assert desk.shells() == []
        assert desk.window_classes() == before
    finally:  # the desk as the next test expects it: Chromium's window shown
        for wid in minimized:
            desk.xdotool("windowactivate", wid)


def test_the_clipboard_goes_in_and_comes_out_only_through_the_agent(desk: Desk) -> None:
    """A viewer's paste lands on the display's clipboard, and what Chromium copies can be read
    back (the controller hands it out only where viewer_copy_out allows). Nothing else: the
    VNC server has no clipboard (-nosel)."""
    text = "pässwörd 1 €"
    assert desk.call("POST", "/clipboard", {"text": text}).json() == {"characters": len(text)}
    assert desk.call("GET", "/clipboard").json() == {"text": text}
    # Chromium copies: paste into its address bar, select it all, copy
    desk.activate("Chromium")
    desk.keys("ctrl+l")
    time.sleep(0.3)
    desk.keys("ctrl+a", "BackSpace")
    desk.xdotool("type", "--delay", "15", "copied in chromium")
    desk.keys("ctrl+a", "ctrl+c")
    time.sleep(0.5)
    assert desk.call("GET", "/clipboard").json() == {"text": "copied in chromium"}
    desk.keys("Escape", "Escape")
    # and a paste bigger than a viewer may send is refused, the clipboard unchanged
    assert desk.call("POST", "/clipboard", {"text": "x" * 1025}).status_code == 400
    assert desk.call("GET", "/clipboard").json() == {"text": "copied in chromium"}


def _chromium_processes(desk: Desk) -> list[dict[str, str]]:
    """Each Chromium process of the browser user: its type, namespaces and seccomp state."""
    found = []
    for line in desk.root("ps", "-u", "browser", "-o", "pid=,args=").stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        if not args.startswith("/usr/lib/chromium/chromium"):
            continue
        kind = next((a.split("=", 1)[1] for a in args.split() if a.startswith("--type=")), "")
        sub = next((a.split("=", 1)[1] for a in args.split() if a.startswith("--utility-sub")), "")
        status = desk.root("cat", f"/proc/{pid}/status").stdout
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        found.append(
            {
                "type": kind or "browser",
                "sub": sub,
                "pidns": desk.root("readlink", f"/proc/{pid}/ns/pid").stdout.strip(),
                "netns": desk.root("readlink", f"/proc/{pid}/ns/net").stdout.strip(),
                "filters": fields.get("Seccomp_filters", "").strip(),
                "nonewprivs": fields.get("NoNewPrivs", "").strip(),
            }
        )
    return found


def test_chromium_keeps_its_sandbox_with_the_memory_settings(desk: Desk) -> None:
    """The memory flags (no spare renderer, the network service in the browser process) take
    nothing from the sandbox: each renderer is still in its own PID and network namespace
    under Chromium's own seccomp filter, as is the GPU process; the network service, which
    this Chromium never sandboxed, is no longer a process of its own."""
    processes = _chromium_processes(desk)
    browser = next(p for p in processes if p["type"] == "browser")
    renderers = [p for p in processes if p["type"] == "renderer"]
    assert renderers, processes
    for process in renderers:
        assert process["pidns"] != browser["pidns"] and process["netns"] != browser["netns"]
        assert int(process["filters"]) > int(browser["filters"]), (process, browser)
        assert process["nonewprivs"] == "1"
    gpu = next(p for p in processes if p["type"] == "gpu-process")
    assert int(gpu["filters"]) > int(browser["filters"]) and gpu["nonewprivs"] == "1"
    assert not [p for p in processes if "NetworkService" in p["sub"]], processes
