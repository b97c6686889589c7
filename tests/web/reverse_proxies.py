"""Debian's nginx and Caddy running the examples in docs/reverse-proxy/, as operators copy
them: ports, name and certificate swapped for a test's own, on loopback, in a folder of its
own, in the foreground; and a certificate authority (trustme) whose certificate they serve."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import trustme

from master_controller.settings import REPO_ROOT
from master_controller.web.paths import VIEWER_COOKIE
from tests.servers import Controller, controller, free_port

EXAMPLES = REPO_ROOT / "docs" / "reverse-proxy"
SERVER_NAME = "viewer.test"  # browsers reach it through --host-resolver-rules, not DNS


@dataclass
class Tls:
    """A test CA and the server certificate it issued for SERVER_NAME."""

    ca: trustme.CA
    cert: Path  # the chain nginx serves
    key: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def make_tls(folder: Path) -> Tls:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = trustme.CA()
    issued = ca.issue_cert(SERVER_NAME)
    cert, key = folder / "fullchain.pem", folder / "privkey.pem"
    issued.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return Tls(ca, cert, key)


def nginx_site(https_port: int, http_port: int, upstream: str, tls: Tls) -> str:
    """The example site with this test's ports, name, certificate and controller. Every
    swapped text must be in the example: a test of a changed example fails, not drifts."""
    text = (EXAMPLES / "nginx.conf").read_text()
    swaps = [
        ("listen [::]:80;\n", ""),
        ("listen [::]:443 ssl default_server;\n", ""),
        ("listen [::]:443 ssl;\n", ""),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen 443 ssl", f"listen 127.0.0.1:{https_port} ssl"),
        ("/etc/letsencrypt/live/viewer.example.com/fullchain.pem", str(tls.cert)),
        ("/etc/letsencrypt/live/viewer.example.com/privkey.pem", str(tls.key)),
        ("viewer.example.com", SERVER_NAME),
        ("proxy_pass http://127.0.0.1:4000;", f"proxy_pass {upstream};"),
    ]
    for old, new in swaps:
        assert old in text, f"docs/reverse-proxy/nginx.conf no longer has {old!r}"
        text = text.replace(old, new)
    return text


def nginx_conf(work: Path, site: Path) -> str:
    """nginx's main file around a site: its pid, logs and temporary files in ``work``."""
    temp = "\n".join(
        f"    {kind}_temp_path {work / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""user nobody nogroup;
daemon off;
worker_processes 1;
pid {work / "nginx.pid"};
error_log {work / "error.log"} notice;
events {{ worker_connections 256; }}
http {{
    access_log {work / "access.log"};
{temp}
    include {site};
}}
"""


@dataclass
class Proxy:
    """A reverse proxy serving SERVER_NAME over TLS on ``https_port``."""

    https_port: int
    http_port: int
    work: Path

    @property
    def origin(self) -> str:
        return f"https://{SERVER_NAME}:{self.https_port}"


def write_config(work: Path, https_port: int, http_port: int, upstream: str, tls: Tls) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site.conf"
    site.write_text(nginx_site(https_port, http_port, upstream, tls))
    conf = work / "nginx.conf"
    conf.write_text(nginx_conf(work, site))
    return conf


def check_config(conf: Path) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on a configuration (it binds nothing)."""
    work = conf.parent
    return subprocess.run(
        ["nginx", "-t", "-e", str(work / "error.log"), "-p", str(work), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@contextmanager
def _running(
    argv: list[str], log: Path, port: int, env: dict[str, str] | None = None
) -> Iterator[None]:
    """``argv`` in the foreground until it accepts on ``port``; SIGTERM after (then SIGKILL,
    its children too)."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{argv[0]} did not start:\n{log.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        # nginx's master stops its workers and waits for them; Caddy shuts down
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
            workers = [int(pid) for pid in children.read_text().split()]
            process.kill()
            process.wait()
            for pid in workers:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@contextmanager
def nginx(work: Path, upstream: str, tls: Tls, https_port: int, http_port: int) -> Iterator[Proxy]:
    """nginx running the example in front of ``upstream``."""
    conf = write_config(work, https_port, http_port, upstream, tls)
    errors = work / "error.log"
    argv = ["nginx", "-e", str(errors), "-p", str(work), "-c", str(conf)]
    with _running(argv, work / "nginx.out", https_port):
        yield Proxy(https_port, http_port, work)


def caddy_env(home: Path) -> dict[str, str]:
    """Caddy's environment: its data and config (certificates, autosave) under ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
    }


def caddy_site(https_port: int, http_port: int, upstream: str, tls: Tls) -> str:
    """The example Caddyfile with this test's port, name, certificate (instead of one from
    an ACME CA) and controller; no admin endpoint."""
    text = (EXAMPLES / "Caddyfile").read_text()
    swaps = [
        ("viewer.example.com {", f"{SERVER_NAME}:{https_port} {{\n\ttls {tls.cert} {tls.key}"),
        ("reverse_proxy 127.0.0.1:4000 {", f"reverse_proxy {upstream.removeprefix('http://')} {{"),
    ]
    for old, new in swaps:
        assert old in text, f"docs/reverse-proxy/Caddyfile no longer has {old!r}"
        text = text.replace(old, new)
    options = f"{{\n\tadmin off\n\thttp_port {http_port}\n\thttps_port {https_port}\n}}\n\n"
    return options + text


@contextmanager
def caddy(work: Path, upstream: str, tls: Tls, https_port: int, http_port: int) -> Iterator[Proxy]:
    """Caddy running the example in front of ``upstream``."""
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "Caddyfile"
    conf.write_text(caddy_site(https_port, http_port, upstream, tls))
    argv = ["caddy", "run", "--adapter", "caddyfile", "--config", str(conf)]
    with _running(argv, work / "caddy.out", https_port, env=caddy_env(work / "home")):
        yield Proxy(https_port, http_port, work)


@dataclass
class Proxied:
    """A controller (public_url: nginx's origin; forwarded_allow_ips: loopback) with nginx
    in front and Caddy beside it, both serving the test CA's certificate for SERVER_NAME."""

    ctl: Controller
    nginx: Proxy
    caddy: Proxy
    tls: Tls
    session_id: str = ""  # the session the test or bench started

    def front(self, name: str) -> Proxy:
        return {"nginx": self.nginx, "caddy": self.caddy}[name]

    def client(self, source: str = "127.0.0.1") -> httpx.Client:
        """An HTTPS client of the proxy, from ``source``, that trusts only the test CA."""
        transport = httpx.HTTPTransport(verify=self.tls.client_context(), local_address=source)
        return httpx.Client(transport=transport, trust_env=False, timeout=15)

    def get(
        self,
        path: str,
        source: str = "127.0.0.1",
        headers: dict[str, str] | None = None,
        via: str = "nginx",
    ) -> httpx.Response:
        """GET through a proxy under its name (SNI and Host), from ``source``."""
        port = self.front(via).https_port
        with self.client(source) as client:
            return client.get(
                f"https://127.0.0.1:{port}{path}",
                headers={"Host": f"{SERVER_NAME}:{port}", **(headers or {})},
                extensions={"sni_hostname": SERVER_NAME},
            )

    def viewer_cookie(self) -> str:
        """A fresh ticket traded for the viewer cookie through the proxy."""
        novnc = self.ctl.request("GET", f"/api/auth/session/{self.session_id}").json()["novncURL"]
        assert novnc.startswith(self.nginx.origin + "/")
        answer = self.get(novnc.removeprefix(self.nginx.origin))
        assert answer.status_code == 303, answer.text
        assert "secure" in answer.headers["set-cookie"].lower()
        return str(answer.cookies[VIEWER_COOKIE])


@contextmanager
def behind_proxies(data_dir: Path, work: Path, guest_network: str) -> Iterator[Proxied]:
    """A controller on ``data_dir`` behind both examples, everything under ``work``."""
    tls = make_tls(work / "tls")
    https_port, http_port = free_port(), free_port()
    with (
        controller(
            data_dir,
            f"sqlite:///{work / 'mc.db'}",
            work,
            guest_network=guest_network,
            public_url=f"https://{SERVER_NAME}:{https_port}",
            forwarded_allow_ips='["127.0.0.1"]',
        ) as ctl,
        nginx(work / "nginx", ctl.url, tls, https_port, http_port) as in_front,
        caddy(work / "caddy", ctl.url, tls, free_port(), free_port()) as beside,
    ):
        yield Proxied(ctl, in_front, beside, tls)
