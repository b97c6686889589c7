"""Real upstream proxies for the egress identity tests, each in a network namespace of its
own: tinyproxy (HTTP CONNECT, with a login) and Dante (SOCKS5), both from Debian's packages.

Behind both sits an "internet" namespace holding an origin server that answers every
request with the address it came from, so each upstream's exit is identifiable. The names
``check.mc-test`` and ``origin.mc-test`` resolve only inside the upstreams' namespaces
(``/etc/netns/<ns>/hosts``): this host cannot resolve them, so a request that works was
resolved by the upstream.

    this host 10.254.N.1 --veth-- 10.254.N.2 upstream N 10.253.N.2 --veth-- 10.253.N.1 internet
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ORIGIN_PORT = 80
CHECK_URL = "http://check.mc-test/ip"
ORIGIN = "origin.mc-test"
USERNAME = "mc-user"

# answers every GET with the peer's address (JSON for /ip, text otherwise)
ORIGIN_SERVER = """
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        peer = self.client_address[0]
        body = (json.dumps({"ip": peer}) if self.path == "/ip" else peer).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""


@dataclass
class UpstreamProxy:
    url: str  # as an operator lists it
    exit_address: str  # what the origin sees
    namespace: str
    process: subprocess.Popen[bytes] | None = None
    start: list[str] | None = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        assert self.start is not None
        self.process = subprocess.Popen(
            self.start, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        host, port = self.url.rsplit("/", 1)[1].rsplit(":", 1)
        _wait_listening(self.namespace, host, int(port))


@dataclass
class Upstreams:
    http: UpstreamProxy  # tinyproxy, needs USERNAME and ``password``
    socks: UpstreamProxy  # dante, no login
    password: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _wait_listening(namespace: str, host: str, port: int) -> None:
    probe = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(1)\n"
        "sys.exit(s.connect_ex((sys.argv[1], int(sys.argv[2]))))\n"
    )
    deadline = time.monotonic() + 15
    while True:
        done = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", probe, host, str(port)],
            check=False,
        )
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, f"nothing listens on {host}:{port} in {namespace}"
        time.sleep(0.1)


@contextlib.contextmanager
def real_upstreams(tmp: Path) -> Iterator[Upstreams]:
    for tool in ("tinyproxy", "danted"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed (run scripts/setup.sh)")
    tag = secrets.token_hex(3)
    inet = f"mct-inet-{tag}"
    made: list[str] = []
    links: list[str] = []
    processes: list[subprocess.Popen[bytes]] = []
    proxies: list[UpstreamProxy] = []
    password = secrets.token_urlsafe(12)
    try:
        _ip("netns", "add", inet)
        made.append(inet)
        _ip("-n", inet, "link", "set", "lo", "up")
        for n, kind in ((1, "http"), (2, "socks")):
            ns = f"mct-up{n}-{tag}"
            _ip("netns", "add", ns)
            made.append(ns)
            host_if = f"mctu{n}{tag}"
            links.append(host_if)
            _ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("addr", "add", f"10.254.{n}.1/30", "dev", host_if)
            _ip("link", "set", host_if, "up")
            _ip("-n", ns, "addr", "add", f"10.254.{n}.2/30", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip(
                "-n",
                ns,
                "link",
                "add",
                "eth1",
                "type",
                "veth",
                "peer",
                "name",
                f"up{n}",
                "netns",
                inet,
            )
            _ip("-n", ns, "addr", "add", f"10.253.{n}.2/30", "dev", "eth1")
            _ip("-n", ns, "link", "set", "eth1", "up")
            _ip("-n", inet, "addr", "add", f"10.253.{n}.1/30", "dev", f"up{n}")
            _ip("-n", inet, "link", "set", f"up{n}", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(
                f"127.0.0.1 localhost\n10.253.{n}.1 check.mc-test {ORIGIN}\n"
            )
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
            conf = tmp / f"upstream-{n}.conf"
            if kind == "http":
                conf.write_text(
                    f"User nobody\nGroup nogroup\nPort 8888\nListen 10.254.{n}.2\nTimeout 30\n"
                    f"MaxClients 50\nLogLevel Critical\nBasicAuth {USERNAME} {password}\n"
                )
                start = ["ip", "netns", "exec", ns, "tinyproxy", "-d", "-c", str(conf)]
                url = f"http://10.254.{n}.2:8888"
            else:
                conf.write_text(
                    "logoutput: stderr\n"
                    f"internal: 10.254.{n}.2 port = 1080\n"
                    "external: eth1\n"
                    "clientmethod: none\nsocksmethod: none\n"
                    "user.privileged: root\nuser.unprivileged: nobody\n"
                    "client pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }\n"
                    "socks pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }\n"
                )
                pid = tmp / f"danted-{n}.pid"
                danted = shutil.which("danted") or "/usr/sbin/danted"
                start = ["ip", "netns", "exec", ns, danted, "-f", str(conf), "-p", str(pid)]
                url = f"socks5://10.254.{n}.2:1080"
            proxy = UpstreamProxy(url, f"10.253.{n}.2", ns, start=start)
            proxy.restart()
            proxies.append(proxy)
        origin = subprocess.Popen(
            ["ip", "netns", "exec", inet, sys.executable, "-c", ORIGIN_SERVER, str(ORIGIN_PORT)]
        )
        processes.append(origin)
        for n in (1, 2):
            _wait_listening(inet, f"10.253.{n}.1", ORIGIN_PORT)
        yield Upstreams(http=proxies[0], socks=proxies[1], password=password)
    finally:
        for proxy in proxies:
            proxy.stop()
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
        for link in links:
            subprocess.run(["ip", "link", "del", link], check=False, capture_output=True)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
