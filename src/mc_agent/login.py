"""Running a provider's login where the user sees it, and watching it to the end.

The CLI runs as the browser user in a tmux session (so the agent can read its screen and
answer its known prompts), shown in an xterm on display :1 beside Chromium. ``BROWSER`` is
``mc-browser``, which records each URL the CLI opens and hands it to the running Chromium.
The agent watches the terminal for prompts and URLs, and the credential files for valid
credentials; everything it sees goes to the event log.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from mc_agent import browser, providers
from mc_agent.events import EventLog
from mc_agent.providers import CredentialStatus, Provider

LOGIN_DIR = Path("/run/mc/login")
URLS_FILE = LOGIN_DIR / "urls.jsonl"
TMUX_SOCKET = LOGIN_DIR / "tmux.sock"
TMUX_CONF = LOGIN_DIR / "tmux.conf"
# read when the server starts, so it holds before the login command runs: a CLI that exits
# leaves its last screen for the user (and the agent) to read
TMUX_SETTINGS = "set -g remain-on-exit on\nset -g status off\nset -g history-limit 5000\n"
SESSION = "login"
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

    def __init__(self, provider: Provider, options: dict[str, str], events: EventLog) -> None:
        self.provider = provider
        self.options = provider.check_options(options)
        self.events = events
        self.user = pwd.getpwnam(USER)
        self.home = Path(self.user.pw_dir)
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

    # --- starting -------------------------------------------------------------------------

    def start(self) -> None:
        LOGIN_DIR.mkdir(parents=True, exist_ok=True)
        os.chown(LOGIN_DIR, self.user.pw_uid, self.user.pw_gid)
        URLS_FILE.unlink(missing_ok=True)
        TMUX_CONF.write_text(TMUX_SETTINGS)
        for relative, content in self.provider.home_files(self.options).items():
            self._write_home_file(relative, content)
        subprocess.run(_tmux("kill-server"), capture_output=True, check=False)
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
        xterm = _as_user(
            [
                "xterm", "-title", f"{self.provider.title} sign-in",
                "-geometry", f"{COLUMNS}x{ROWS}-0-0",
                "-fa", "DejaVu Sans Mono", "-fs", "10",
                "-e", "tmux", "-S", str(TMUX_SOCKET), "-f", str(TMUX_CONF), "attach", "-t", SESSION,
            ]
        )  # fmt: skip
        subprocess.Popen(
            xterm,
            env={"DISPLAY": ":1", "HOME": str(self.home), "PATH": SYSTEM_PATH},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.state = "running"
        self.events.add("login started", {"provider": self.provider.name, "argv": argv[:2]})
        threading.Thread(target=self._watch, daemon=True).start()

    def _write_home_file(self, relative: str, content: str) -> None:
        path = self.home / relative
        if path.exists():
            return  # never overwrite what the user or CLI already has
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in [path.parent, *path.parent.parents]:
            if parent == self.home or self.home not in parent.parents:
                break
            os.chown(parent, self.user.pw_uid, self.user.pw_gid)
        path.write_text(content)
        os.chown(path, self.user.pw_uid, self.user.pw_gid)
        path.chmod(0o600)

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
        if URLS_FILE.is_file():
            for line in URLS_FILE.read_text().splitlines():
                try:
                    url = str(json.loads(line)["url"])
                except (ValueError, KeyError, TypeError):
                    continue
                self._url(url, "browser")
        status = self.check_credentials()
        if status.valid and not self.status.valid:
            self.state = "captured"
            self.events.add("credentials valid", {"expires_at": status.expires_at})
        self.status = status

    def _url(self, url: str, via: str) -> None:
        with self._lock:
            seen = self.opened if via == "browser" else self.urls
            if url in seen:
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
        files = {}
        for relative in self.provider.credential_files:
            path = self.home / relative
            try:
                if path.stat().st_size <= providers.MAX_CREDENTIAL_BYTES:
                    files[relative] = path.read_text()
            except OSError:
                continue
        return files

    def check_credentials(self) -> CredentialStatus:
        files = self.read_files()
        if not files:
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

    def stop(self) -> None:
        self._stop.set()


def _origin(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
