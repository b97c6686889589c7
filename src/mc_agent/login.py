"""Running a provider's login where the user sees it, and watching it to the end.

The CLI runs as the browser user in a tmux session (so the agent can read its screen and
answer its known prompts), shown in an xterm on display :1 beside Chromium. ``BROWSER`` is
``mc-browser``, which records each URL the CLI opens and hands it to the running Chromium.
The agent watches the terminal for prompts and URLs, and the credential files for valid
credentials; everything it sees goes to the event log.

The terminal is a door the person viewing the guest may try to open: tmux runs with
``login-tmux.conf`` from the image (no prefix, no bindings, no shell), xterm without menus,
printing, logging or the escape sequences that act on its window, fonts or colours. Files
in the browser user's home and in ``/run/mc/login`` are that user's, so the agent (root)
touches them only through :class:`~mc_agent.userdir.UserDir` (no link is ever followed).
What the agent reports is bounded: at most ``MAX_URLS`` URLs of at most ``MAX_URL_LENGTH``
characters each, reasons of at most ``MAX_REASON`` characters.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mc_agent import browser, providers
from mc_agent.events import EventLog
from mc_agent.providers import CredentialStatus, Provider
from mc_agent.userdir import UnsafePath, UserDir

LOGIN_DIR = Path("/run/mc/login")
URLS_NAME = "urls.jsonl"  # in LOGIN_DIR, appended by mc-browser (as the browser user)
URLS_FILE = LOGIN_DIR / URLS_NAME
URLS_LIMIT = 256 * 1024
TMUX_SOCKET = LOGIN_DIR / "tmux.sock"
# root's, from the image (read when the server starts, before the login command runs)
TMUX_CONF = Path("/usr/lib/mc/login-tmux.conf")
SESSION = "login"
MAX_URLS = 16  # per list (opened in Chromium, seen in the terminal); later ones are dropped
MAX_URL_LENGTH = 4096  # longer URLs are dropped, not cut (a cut URL is a wrong one)
MAX_ORIGIN = 256
MAX_REASON = 300
# X resources of the login's xterm: no popup menus (they offer logging, printing, signals
# and toggles that re-allow the operations below), no printing, no logging, none of the
# escape sequences that act on the window, fonts, colours or title or query termcap, no
# control characters in pastes, no synthetic key events: what the CLI prints (or the echo
# of what the viewer types) stays text on the screen.
XTERM_RESOURCES = (
    "XTerm*omitTranslation: popup-menu,fullscreen,shift-fonts,reset,scroll-lock",
    "XTerm*allowWindowOps: false",
    "XTerm*allowFontOps: false",
    "XTerm*allowColorOps: false",
    "XTerm*allowTcapOps: false",
    "XTerm*allowTitleOps: false",
    "XTerm*allowSendEvents: false",
    "XTerm*allowPasteControls: false",
    "XTerm*printerCommand: ",
    "XTerm*logInhibit: true",
    "XTerm*logging: false",
    "XTerm*loginShell: false",
)
BROWSER_HELPER = "/usr/lib/mc/mc-browser"
TOOLS_BIN = "/opt/mc-tools/node_modules/.bin"
LOGIN_BIN = "/usr/lib/mc/login-bin"  # xdg-open and x-www-browser: mc-browser too
PROXY_ENV = Path("/run/mc/proxy.env")
URL_IN_TEXT = re.compile(r"https?://[^\s\"'<>]+")
USER = "browser"
# the terminal sits in the bottom-right corner, over Chromium's page but clear of a centred
# sign-in form
COLUMNS, ROWS = "90", "14"
PROMPT_TRIES, PROMPT_RETRY = 3, 3.0
RAISE_AFTER = (1.5, 4.0)  # seconds after Chromium opened a URL (it raises its own window)
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Account:
    """The unprivileged user a login runs as, and the directories of theirs root touches."""

    name: str
    uid: int
    gid: int
    home: Path
    login_dir: Path = LOGIN_DIR

    @classmethod
    def of(cls, name: str = "browser") -> Account:
        entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))

    def home_files(self) -> UserDir:
        return UserDir(self.home, self.uid, self.gid)

    def login_files(self) -> UserDir:
        return UserDir(self.login_dir, self.uid, self.gid)

    def prepare_login_dir(self) -> None:
        """``login_dir``, the user's (the tmux socket and mc-browser's URL record live
        there), emptied. Its parent is root's, so no one else can swap it for a link; it is
        checked all the same, and changed through a descriptor."""
        self.login_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.login_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchown(fd, self.uid, self.gid)
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        files = self.login_files()
        for name in files.names():
            files.remove(name)


def _as_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", USER, "--", *argv]


def _tmux(*args: str) -> list[str]:
    return _as_user(["tmux", "-S", str(TMUX_SOCKET), "-f", str(TMUX_CONF), *args])


def proxy_environment() -> dict[str, str]:
    """The egress proxy settings mc-config wrote for this guest, if any."""
    env = {}
    if PROXY_ENV.is_file():
        for line in PROXY_ENV.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip():
                env[key.strip()] = value.strip()
    return env


class Login:
    """One login at a time per guest (a new one replaces the old)."""

    def __init__(
        self,
        provider: Provider,
        options: dict[str, str],
        events: EventLog,
        account: Account | None = None,
    ) -> None:
        self.provider = provider
        self.options = provider.check_options(options)
        self.events = events
        self.account = account or Account.of(USER)
        self.home = self.account.home
        self.home_files = self.account.home_files()
        self.refused: dict[str, str] = {}  # credential file -> why it was not read
        self.started_at = time.time()
        self.answered: list[str] = []
        self._answers: dict[str, tuple[int, float]] = {}
        self.urls: list[str] = []
        self.opened: list[str] = []
        self.status = CredentialStatus(False, "the login has not finished")
        self.fetched = False
        self.state = "starting"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._xterm: subprocess.Popen[bytes] | None = None
        self._watcher: threading.Thread | None = None

    # --- starting -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the CLI in tmux and show it in an xterm. ProviderError if a file the login
        needs cannot be written safely (a link where its folder should be, say)."""
        subprocess.run(_tmux("kill-server"), capture_output=True, check=False)
        self.account.prepare_login_dir()
        for relative, content in self.provider.home_files(self.options).items():
            self.write_home_file(relative, content)
        env = {
            "HOME": str(self.home),
            "USER": USER,
            "DISPLAY": ":1",
            "TERM": "xterm-256color",
            "BROWSER": BROWSER_HELPER,
            "PATH": f"{LOGIN_BIN}:{TOOLS_BIN}:/usr/local/bin:/usr/bin:/bin",
            "PYTHONPATH": "/usr/lib/mc",
            "MC_LOGIN_URLS": str(URLS_FILE),
            **proxy_environment(),
            **self.provider.environment,
        }
        # env -i: the CLI sees exactly this environment, not the tmux server's
        argv = self.provider.login_argv(self.options)
        command = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]
        subprocess.run(
            _tmux(
                "new-session", "-d", "-s", SESSION, "-x", COLUMNS, "-y", ROWS,
                "-c", str(self.home), "--", *command,
            ),
            check=True,
            capture_output=True,
            timeout=10,
        )  # fmt: skip
        resources = [arg for line in XTERM_RESOURCES for arg in ("-xrm", line)]
        xterm = _as_user(
            [
                "xterm", "-title", f"{self.provider.title} sign-in",
                "-geometry", f"{COLUMNS}x{ROWS}-0-0",
                "-fa", "DejaVu Sans Mono", "-fs", "10", "+ls", "+l", *resources,
                "-e", "tmux", "-S", str(TMUX_SOCKET), "-f", str(TMUX_CONF), "attach", "-t", SESSION,
            ]
        )  # fmt: skip
        self._xterm = subprocess.Popen(
            xterm,
            env={"DISPLAY": ":1", "HOME": str(self.home), "PATH": SYSTEM_PATH},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.state = "running"
        self.events.add("login started", {"provider": self.provider.name, "argv": argv[:2]})
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def write_home_file(self, relative: str, content: str) -> None:
        """A settings file in the user's home (0600, the user's; missing folders made 0700),
        unless something already has its name: what the user or CLI has is never
        overwritten. A link on the way is refused (ProviderError), never followed."""
        try:
            self.home_files.create(relative, content.encode())
        except UnsafePath as exc:
            raise providers.ProviderError(f"cannot write ~/{relative}: {exc}") from exc

    # --- watching -------------------------------------------------------------------------

    def screen(self) -> str:
        done = subprocess.run(
            _tmux("capture-pane", "-p", "-J", "-t", SESSION),
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        )
        return done.stdout if done.returncode == 0 else ""

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self._look()
            except (OSError, subprocess.SubprocessError) as exc:
                self.events.add("watch error", {"error": str(exc)[:200]})
            self._stop.wait(0.5)

    def _look(self) -> None:
        text = self.screen()
        now = time.monotonic()
        for prompt in self.provider.prompts:
            tries, last = self._answers.get(prompt.name, (0, 0.0))
            # a TUI may drop keys sent while it draws: answer again if the question stays
            if tries >= PROMPT_TRIES or now - last < PROMPT_RETRY:
                continue
            lines = [line for line in text.splitlines() if line.strip()]
            recent = "\n".join(lines[-6:]) if tries else text
            if re.search(prompt.pattern, recent):
                subprocess.run(
                    _tmux("send-keys", "-t", SESSION, *prompt.keys),
                    check=False,
                    capture_output=True,
                )
                self._answers[prompt.name] = (tries + 1, now)
                if prompt.name not in self.answered:
                    self.answered.append(prompt.name)
                    self.events.add("prompt answered", {"prompt": prompt.name})
        for url in URL_IN_TEXT.findall(text):
            if not any(url.startswith(i) for i in self.provider.ignored_urls):
                self._url(url, "terminal")
        for url in self.recorded_urls():
            self._url(url, "browser")
        status = self.check_credentials()
        if status.valid and not self.status.valid:
            self.state = "captured"
            self.events.add("credentials valid", {"expires_at": status.expires_at})
        self.status = status

    def recorded_urls(self) -> list[str]:
        """The URLs mc-browser recorded (the file is the user's: read without following a
        link, at most URLS_LIMIT bytes; a larger one is ignored)."""
        try:
            data = self.account.login_files().read(URLS_NAME, URLS_LIMIT)
        except UnsafePath:
            return []
        urls = []
        for line in (data or b"").decode(errors="replace").splitlines():
            try:
                url = json.loads(line)["url"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(url, str):
                urls.append(url)
        return urls

    def _url(self, url: str, via: str) -> None:
        if len(url) > MAX_URL_LENGTH:
            return
        with self._lock:
            seen = self.opened if via == "browser" else self.urls
            if url in seen or len(seen) >= MAX_URLS:
                return
            seen.append(url)
        self.events.add("auth url", {"via": via, "origin": _origin(url)})
        if via == "terminal" and self.provider.open_terminal_urls and not self.opened:
            try:
                browser.open_url(url)
            except ValueError:
                return
            self._url(url, "browser")
        elif via == "browser":
            for delay in RAISE_AFTER:
                threading.Timer(delay, self.raise_terminal).start()

    def raise_terminal(self) -> None:
        """Put the terminal back on top of Chromium, without taking the keyboard focus."""
        subprocess.run(
            _as_user(["xdotool", "search", "--class", "XTerm", "windowraise"]),
            env={"DISPLAY": ":1", "PATH": SYSTEM_PATH},
            capture_output=True,
            check=False,
            timeout=5,
        )

    # --- credentials ----------------------------------------------------------------------

    def read_files(self) -> dict[str, str]:
        """The provider's credential files that exist, by their names in its own list (never
        any other name): regular files the user owns, UTF-8, at most MAX_CREDENTIAL_BYTES.
        Files refused for any of these reasons are left out and noted in ``refused``."""
        files, refused = {}, {}
        for relative in self.provider.credential_files:
            try:
                data = self.home_files.read(relative, providers.MAX_CREDENTIAL_BYTES)
                if data is not None:
                    files[relative] = data.decode("utf-8")
            except UnsafePath as exc:
                refused[relative] = str(exc)
            except UnicodeDecodeError:
                refused[relative] = f"{relative} is not UTF-8 text"
        self.refused = refused
        return files

    def check_credentials(self) -> CredentialStatus:
        files = self.read_files()
        if not files:
            if self.refused:
                reason = "; ".join(self.refused.values())
                return CredentialStatus(False, f"credential file refused: {reason}"[:MAX_REASON])
            return CredentialStatus(False, "no credential file yet")
        status = self.provider.validate(files, time.time())
        argv = self.provider.status_argv()
        if status.valid and argv is not None:
            done = subprocess.run(
                _as_user(argv),
                capture_output=True,
                text=True,
                check=False,
                timeout=20,
                env={"HOME": str(self.home), "PATH": f"{TOOLS_BIN}:{SYSTEM_PATH}"},
            )
            if done.returncode != 0:
                reason = (done.stdout + done.stderr).strip()[-200:]
                return CredentialStatus(False, f"{argv[0]} says not logged in: {reason}")
        return status

    def fetch(self) -> dict[str, Any] | None:
        """The credential files, once; None if they were fetched already."""
        with self._lock:
            if self.fetched:
                return None
            status = self.check_credentials()
            if not status.valid:
                raise providers.ProviderError(f"no valid credentials: {status.reason}")
            self.fetched = True
        self.events.add("credentials fetched", {"files": list(self.provider.credential_files)})
        return {
            "provider": self.provider.name,
            "files": self.read_files(),
            "status": status.as_dict(),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "provider": self.provider.name,
            "state": self.state,
            "started_at": self.started_at,
            "auth_url": next(iter(self.opened or self.urls), None),
            "opened_urls": list(self.opened),
            "terminal_urls": list(self.urls),
            "prompts_answered": list(self.answered),
            "credentials": self.status.as_dict(),
            "fetched": self.fetched,
        }

    def stop(self, wait: float = 0.0) -> None:
        """Stop watching, waiting up to ``wait`` seconds for a look in progress to end (it
        may still open a URL in Chromium); the processes are ended by :mod:`mc_agent.wipe`."""
        self._stop.set()
        if wait and self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(wait)

    def reap(self, timeout: float = 5.0) -> None:
        """Collect the xterm's runuser once it has ended (no zombie left behind)."""
        if self._xterm is not None:
            try:
                self._xterm.wait(timeout)
            except subprocess.TimeoutExpired:
                return
            self._xterm = None


def _origin(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "?"
    return f"{parts.scheme}://{parts.netloc}"[:MAX_ORIGIN]
