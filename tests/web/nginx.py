"""Debian's nginx running docs/reverse-proxy/nginx.conf, the example operators copy: ports,
name and certificate swapped for a test's own, on loopback, in a folder of its own, in the
foreground; and a certificate authority (trustme) whose certificate it serves."""

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

import trustme

from master_controller.settings import REPO_ROOT

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
class Nginx:
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
def nginx(work: Path, upstream: str, tls: Tls, https_port: int, http_port: int) -> Iterator[Nginx]:
    """nginx in the foreground in front of ``upstream``; stopped (and waited for) after."""
    conf = write_config(work, https_port, http_port, upstream, tls)
    errors = work / "error.log"
    process = subprocess.Popen(
        ["nginx", "-e", str(errors), "-p", str(work), "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = errors.read_text() if errors.exists() else ""
                    raise RuntimeError(f"nginx did not start:\n{log[-3000:]}") from None
                time.sleep(0.05)
        yield Nginx(https_port, http_port, work)
    finally:
        # SIGTERM: the master stops its workers and waits for them
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
