"""The controller behind a reverse proxy with TLS: the examples in docs/reverse-proxy/ are
valid for nginx and Caddy; Debian's nginx running its example in front of a real controller
and a real guest shows the viewer's frame over https; through nginx and Caddy a WebSocket
from another Origin is refused and no forwarded header a client made up is believed; and
the controller believes forwarded headers only from forwarded_allow_ips."""

from __future__ import annotations

import io
import shutil
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from pydantic import ValidationError
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.typing import Origin, Subprotocol

from master_controller.settings import Settings
from master_controller.viewing.close_codes import CloseCode
from master_controller.web.paths import VIEWER_COOKIE, viewer_path
from tests.conftest import require_tools
from tests.servers import free_port
from tests.web.inprocess import NoGuestRuntime, app_settings, serving
from tests.web.reverse_proxies import (
    EXAMPLES,
    SERVER_NAME,
    Proxied,
    Proxy,
    behind_proxies,
    caddy_env,
    check_config,
    make_tls,
    write_config,
)
from tests.web.test_tickets import _link, _session
from tests.web.test_viewer_browser import CANVAS_COLOURS, CHROMIUM, QUIET, wait_for_state

SPOOFED = "203.0.113.9"  # an address a client claims (TEST-NET-3)
SPOOFING = {"X-Forwarded-For": SPOOFED, "X-Forwarded-Proto": "https", "Forwarded": f"for={SPOOFED}"}


def test_the_nginx_example_is_valid(tmp_path: Path) -> None:
    require_tools("nginx")
    conf = write_config(
        tmp_path, free_port(), free_port(), "http://127.0.0.1:4000", make_tls(tmp_path)
    )
    checked = check_config(conf)
    assert checked.returncode == 0, checked.stderr + (tmp_path / "error.log").read_text()
    # the parts that keep the viewer working are in what nginx accepted
    site = (tmp_path / "site.conf").read_text()
    for needed in (
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_set_header Host $host;",
        "proxy_set_header X-Forwarded-For $remote_addr;",
        "proxy_read_timeout 1h;",
        "proxy_buffering off;",
        'add_header Strict-Transport-Security "max-age=63072000" always;',
        "ssl_reject_handshake on;",
    ):
        assert needed in site, needed


def test_a_broken_nginx_example_is_refused(tmp_path: Path) -> None:
    """`nginx -t` does fail on a broken file, so the test above can fail."""
    require_tools("nginx")
    conf = write_config(
        tmp_path, free_port(), free_port(), "http://127.0.0.1:4000", make_tls(tmp_path)
    )
    site = tmp_path / "site.conf"
    site.write_text(site.read_text().replace("proxy_http_version 1.1;", "proxy_http_version;"))
    checked = check_config(conf)
    assert checked.returncode != 0
    assert "proxy_http_version" in (tmp_path / "error.log").read_text() + checked.stderr


def _caddy(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["caddy", *args],
        capture_output=True,
        text=True,
        env=caddy_env(tmp_path / "caddy-home"),
        timeout=60,
        cwd=tmp_path,
    )


def test_the_caddy_example_is_valid(tmp_path: Path) -> None:
    require_tools("caddy")
    example = EXAMPLES / "Caddyfile"
    checked = _caddy(tmp_path, "validate", "--adapter", "caddyfile", "--config", str(example))
    assert checked.returncode == 0, checked.stderr
    assert "Valid configuration" in checked.stdout + checked.stderr
    # formatted as `caddy fmt` writes it (caddy warns about anything else)
    assert _caddy(tmp_path, "fmt", str(example)).stdout == example.read_text()
    adapted = _caddy(tmp_path, "adapt", "--adapter", "caddyfile", "--config", str(example))
    assert adapted.returncode == 0, adapted.stderr
    for needed in ('"flush_interval":-1', "Strict-Transport-Security", '"max_size":1000000'):
        assert needed in adapted.stdout, needed
    broken = tmp_path / "Caddyfile"
    broken.write_text(example.read_text().replace("flush_interval -1", "flush_interval soon"))
    assert (
        _caddy(tmp_path, "validate", "--adapter", "caddyfile", "--config", str(broken)).returncode
        != 0
    )


# --- through a real nginx, in front of a real controller and guest ---------------------


@pytest.fixture(scope="module")
def proxied(
    golden_image: str, integration_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxied]:
    require_tools("nginx", "caddy")
    work = tmp_path_factory.mktemp("proxied")
    with behind_proxies(integration_settings.data_dir, work, "10.213.240.0/22") as running:
        running.session_id = running.ctl.ready_session("proxied")
        yield running


@pytest.fixture
def browser() -> Iterator[Browser]:
    """For one test (Playwright's loop would otherwise outlive it in this thread, where the
    async tests run theirs)."""
    if shutil.which(CHROMIUM) is None:
        pytest.skip("Debian's chromium is not installed (run scripts/setup.sh)")
    with sync_playwright() as p:
        # the proxy's name leads to loopback in this browser alone
        rules = f"--host-resolver-rules=MAP {SERVER_NAME} 127.0.0.1"
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[*QUIET, rules])
        yield browser
        browser.close()


@pytest.mark.integration
@pytest.mark.browser
def test_the_viewer_through_nginx_shows_the_guest(
    proxied: Proxied, browser: Browser, tmp_path: Path
) -> None:
    # the test CA is not in Chromium's store: its errors are ignored here, and checked
    # against the CA by the other tests' clients
    context = browser.new_context(viewport={"width": 1100, "height": 760}, ignore_https_errors=True)
    page: Page = context.new_page()
    problems: list[str] = []  # wait_for_state shows them when the viewer never connects
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}"))
    page.problems = problems  # type: ignore[attr-defined]
    try:
        novnc = proxied.ctl.request("GET", f"/api/auth/session/{proxied.session_id}").json()[
            "novncURL"
        ]
        response = page.goto(novnc)
        assert response is not None and response.status == 200
        assert page.url == proxied.nginx.origin + viewer_path(proxied.session_id)
        assert response.headers["strict-transport-security"] == "max-age=63072000"
        wait_for_state(page, proxied.ctl, "connected", 60)
        page.wait_for_function(f"({CANVAS_COLOURS})() > 50", timeout=30_000)
        page.screenshot(path=str(tmp_path / "through-nginx.png"))
        cookie = next(c for c in context.cookies() if c["name"] == VIEWER_COOKIE)
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        # the socket is still up through the proxy after the frame
        assert page.evaluate("document.body.dataset.state") == "connected"
    finally:
        context.close()


def _first_message(
    proxied: Proxied, front: Proxy, cookie: str, origin: str
) -> tuple[bytes | str | None, int | None]:
    """Through ``front``: the viewer socket's first message, or its close code. (The sync
    client: Playwright's loop may still run in this thread.)"""
    url = f"wss://{SERVER_NAME}:{front.https_port}{viewer_path(proxied.session_id)}/websock"
    with connect(
        url,
        sock=socket_to(front.https_port),
        ssl=proxied.tls.client_context(),
        origin=Origin(origin),
        additional_headers={"Cookie": f"{VIEWER_COOKIE}={cookie}"},
        subprotocols=[Subprotocol("binary")],
        proxy=None,
        open_timeout=15,
    ) as viewer:
        try:
            return viewer.recv(timeout=15), None
        except ConnectionClosed as closed:
            return None, closed.rcvd.code if closed.rcvd else None


@pytest.mark.integration
@pytest.mark.parametrize("via", ["nginx", "caddy"])
def test_a_websocket_from_another_origin_is_refused_through_the_proxy(
    proxied: Proxied, via: str
) -> None:
    """public_url names nginx: through nginx the Origin matches it; through Caddy (which
    passes the Host with its port) the Origin matches the Host, over https because Caddy,
    a trusted proxy, says so."""
    front = proxied.front(via)
    cookie = proxied.viewer_cookie()
    # the public origin gets the guest's screen (the RFB greeting the proxy offers)
    greeting, code = _first_message(proxied, front, cookie, front.origin)
    assert isinstance(greeting, bytes) and greeting.startswith(b"RFB 003.008"), (greeting, code)
    for origin in (
        "https://evil.example",
        f"http://{SERVER_NAME}:{front.https_port}",  # the same name without TLS
        f"https://{SERVER_NAME}.evil.example:{front.https_port}",
        "null",
    ):
        greeting, code = _first_message(proxied, front, cookie, origin)
        assert (greeting, code) == (None, CloseCode.ORIGIN_REFUSED), origin
    hsts = proxied.get("/health", via=via).headers.get("strict-transport-security")
    assert hsts == "max-age=63072000"


@pytest.mark.integration
def test_nginx_answers_only_for_its_name_and_over_tls(proxied: Proxied) -> None:
    # another name (or none) in the TLS handshake: refused before any request
    context = proxied.tls.client_context()
    for name in ("other.test", None):
        context.check_hostname = name is not None
        with socket_to(proxied.nginx.https_port) as raw, pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname=name)
    # plain HTTP is only a redirect to HTTPS
    answer = httpx.get(
        f"http://127.0.0.1:{proxied.nginx.http_port}/api/auth/sessions?x=1",
        headers={"Host": SERVER_NAME},
        trust_env=False,
    )
    assert answer.status_code == 301
    assert answer.headers["location"] == f"https://{SERVER_NAME}/api/auth/sessions?x=1"


def socket_to(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


@pytest.mark.integration
@pytest.mark.parametrize("via", ["nginx", "caddy"])
def test_forwarded_headers_are_believed_from_the_proxy_alone(proxied: Proxied, via: str) -> None:
    # through the proxy, from 127.0.0.2: it replaces the client's X-Forwarded-For with the
    # address it saw, and the controller believes it (forwarded_allow_ips)
    marker = uuid.uuid4().hex
    answer = proxied.get(f"/health?probe={marker}", "127.0.0.2", SPOOFING, via)
    assert answer.status_code == 200
    line = _logged_client(proxied.ctl.log.read_text() if proxied.ctl.log else "", marker)
    assert "127.0.0.2:" in line and SPOOFED not in line, line
    # straight to the controller from 127.0.0.2, which is no trusted proxy: not believed
    marker = uuid.uuid4().hex
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport, trust_env=False, timeout=15) as client:
        answer = client.get(f"{proxied.ctl.url}/health?probe={marker}", headers=SPOOFING)
    assert answer.status_code == 200
    line = _logged_client(proxied.ctl.log.read_text() if proxied.ctl.log else "", marker)
    assert "127.0.0.2:" in line and SPOOFED not in line, line


@pytest.mark.parametrize(
    ("allowed", "believed"),
    [([], False), (["10.9.8.7"], False), (["127.0.0.1"], True), (["127.0.0.0/8"], True)],
)
async def test_forwarded_headers_only_from_the_configured_proxies(
    tmp_path: Path, allowed: list[str], believed: bool
) -> None:
    """The app as `serve` runs it, asked from loopback with a made-up X-Forwarded-For:
    believed only when loopback is one of forwarded_allow_ips (uvicorn alone would believe
    any loopback client)."""
    settings = app_settings(
        tmp_path, f"sqlite:///{tmp_path / 'mc.db'}", forwarded_allow_ips=allowed
    )
    out = io.StringIO()
    marker = uuid.uuid4().hex
    async with (
        serving(settings, NoGuestRuntime(settings), log_stream=out) as (base, _app),
        httpx.AsyncClient(trust_env=False) as client,
    ):
        answer = await client.get(f"{base}/health?probe={marker}", headers=SPOOFING)
        assert answer.status_code == 200
    line = _logged_client(out.getvalue(), marker)
    assert (f"{SPOOFED}:" in line) is believed, line
    assert ("127.0.0.1:" in line) is not believed, line


@pytest.mark.parametrize(
    ("allowed", "origin", "proto", "passes"),
    [
        ([], "http://viewer.test", None, True),  # the page's own origin
        ([], "https://viewer.test", "https", False),  # a claim of TLS from anyone
        (["127.0.0.1"], "https://viewer.test", "https", True),  # the proxy's word
        (["127.0.0.1"], "http://viewer.test", "https", False),  # plain http, same name
        (["127.0.0.1"], "https://other.test", "https", False),
    ],
)
async def test_the_origin_check_takes_the_scheme_from_trusted_proxies_only(
    tmp_path: Path, allowed: list[str], origin: str, proto: str | None, passes: bool
) -> None:
    """The viewer's Origin check by the request's Host (public_url is elsewhere here):
    the Origin's scheme must be the request's, which X-Forwarded-Proto sets only from
    forwarded_allow_ips."""
    settings = app_settings(
        tmp_path, f"sqlite:///{tmp_path / 'mc.db'}", forwarded_allow_ips=allowed
    )
    async with (
        serving(settings, NoGuestRuntime(settings)) as (base, app),
        httpx.AsyncClient(trust_env=False) as client,
    ):
        sid = await _session(app)
        cookie = app.state.services.tickets.cookie(sid)
        headers = {"Host": "viewer.test", "Origin": origin, "Cookie": f"{VIEWER_COOKIE}={cookie}"}
        if proto is not None:
            headers["X-Forwarded-Proto"] = proto
        answer = await client.post(f"{base}{viewer_path(sid)}/heartbeat", headers=headers)
    assert (answer.status_code == 200) is passes, answer.text
    if not passes:
        assert answer.status_code == 403 and "only the viewer page" in answer.text


@pytest.mark.parametrize(
    ("allowed", "secure"), [([], False), (["10.9.8.7"], False), (["127.0.0.1"], True)]
)
async def test_the_viewer_cookie_is_secure_when_a_trusted_proxy_speaks_tls(
    tmp_path: Path, allowed: list[str], secure: bool
) -> None:
    """public_url is plain http here: the cookie is Secure only when a trusted proxy says
    the request came over https."""
    settings = app_settings(
        tmp_path, f"sqlite:///{tmp_path / 'mc.db'}", forwarded_allow_ips=allowed
    )
    async with (
        serving(settings, NoGuestRuntime(settings)) as (base, app),
        httpx.AsyncClient(trust_env=False) as client,
    ):
        link = _link(app, base, await _session(app))
        answer = await client.get(link, headers={"X-Forwarded-Proto": "https"})
    assert answer.status_code == 303
    attributes = [part.strip().lower() for part in answer.headers["set-cookie"].split(";")]
    assert ("secure" in attributes) is secure, attributes


def test_forwarded_allow_ips_are_addresses_or_networks() -> None:
    settings = Settings(forwarded_allow_ips=["127.0.0.1", "10.0.0.0/8", "::1"])
    assert settings.forwarded_allow_ips == ["127.0.0.1", "10.0.0.0/8", "::1"]
    for wrong in ("*", "proxy.internal", "127.0.0.l", ""):
        with pytest.raises(ValidationError, match="not an address or network"):
            Settings(forwarded_allow_ips=[wrong])


def _logged_client(log: str, marker: str) -> str:
    """The access log line of the one request whose query carries ``marker``."""
    lines = [line for line in log.splitlines() if marker in line]
    assert len(lines) == 1, lines
    return lines[0]
