"""Upstream proxies: the exits guests' traffic leaves through, one sticky exit per user.

An upstream is an HTTP CONNECT or SOCKS5 proxy, named by its URL without credentials
(``http://host:port``, ``socks5://host:port``): that name is what settings, the database, logs
and metric labels hold. Its credentials, if any, are sealed in the vault and joined to it
only here, in memory, to dial.

Every connection through an upstream names its destination by host name (SOCKS5 with remote
resolution, CONNECT host:port), so the upstream resolves it: no DNS query for a guest's
destination leaves this host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
from dataclasses import dataclass, field, replace
from urllib.parse import SplitResult, urlsplit

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from master_controller.errors import ConfigError, UpstreamFailed
from master_controller.settings import Settings

SCHEMES = {"http": ProxyType.HTTP, "socks5": ProxyType.SOCKS5}
CHECK_TIMEOUT = 10.0
MAX_CHECK_ANSWER = 64 * 1024
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True)
class Upstream:
    name: str  # scheme://host:port, never with credentials
    scheme: str
    host: str
    port: int
    username: str | None = field(default=None, repr=False, compare=False)
    password: str | None = field(default=None, repr=False, compare=False)

    def with_credentials(self, username: str, password: str) -> Upstream:
        return replace(self, username=username, password=password)

    async def open(
        self, host: str, port: int, timeout: float, tls: ssl.SSLContext | None = None
    ) -> Streams:
        """A stream to ``host:port`` through this upstream (which resolves ``host``); with
        ``tls``, TLS to ``host`` inside it. Raises UpstreamFailed, naming the upstream (never
        its credentials)."""
        proxy = Proxy(
            SCHEMES[self.scheme],
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            rdns=True,
        )
        try:
            sock = await proxy.connect(host, port, timeout=timeout)
        except ProxyTimeoutError as exc:
            raise UpstreamFailed(self.name, f"no answer within {timeout:g} s") from exc
        except (ProxyError, ProxyConnectionError, OSError) as exc:
            raise UpstreamFailed(self.name, _say(exc)) from exc
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(
                    sock=sock, ssl=tls, server_hostname=host if tls is not None else None
                ),
                timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            sock.close()
            raise UpstreamFailed(self.name, f"TLS to {host}: {_say(exc)}") from exc


def _say(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def parse(url: str) -> Upstream:
    """An upstream from its URL; refuses credentials in it (they belong in the vault)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in SCHEMES:
        raise ConfigError(f"upstream {url!r}: the scheme must be http or socks5")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"upstream {parts.scheme}://{parts.hostname}:{parts.port}: credentials do not go "
            "in settings; seal them with `master-controller egress credentials URL`"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"upstream {url!r}: {exc}") from exc
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ConfigError(f"upstream {url!r}: say scheme://host:port and nothing else")
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    return Upstream(f"{parts.scheme}://{shown}:{port}", parts.scheme, host, port)


def configured(settings: Settings) -> list[Upstream]:
    """The operator's upstreams, in order: the list, then the template over its ports."""
    found = [parse(url) for url in settings.egress_upstreams]
    template = settings.egress_upstream_template
    if bool(template) != bool(settings.egress_upstream_ports):
        raise ConfigError("egress_upstream_template and egress_upstream_ports go together")
    if template:
        if "{port}" not in template:
            raise ConfigError("egress_upstream_template must contain {port}")
        first, _, last = settings.egress_upstream_ports.partition("-")
        try:
            ports = range(int(first), int(last or first) + 1)
        except ValueError as exc:
            raise ConfigError('egress_upstream_ports is "first-last", e.g. "10001-19999"') from exc
        if not ports or ports[0] < 1 or ports[-1] > 65535:
            raise ConfigError("egress_upstream_ports must lie within 1-65535")
        found += [parse(template.replace("{port}", str(port))) for port in ports]
    names = [u.name for u in found]
    if len(set(names)) != len(names):
        raise ConfigError("an upstream is listed twice")
    return found


async def exit_address(upstream: Upstream, url: str, timeout: float = CHECK_TIMEOUT) -> str:
    """Fetch ``url`` through ``upstream``; the exit address it answers (text, or JSON with
    ``ip``). Raises UpstreamFailed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"egress_check_url {url!r} must be an http(s) URL")
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    port = parts.port or (443 if tls else 80)
    try:
        async with asyncio.timeout(timeout):  # the whole check: connect, TLS, the answer
            answer = await _fetch(upstream, parts.hostname, port, tls, parts, timeout)
    except TimeoutError as exc:
        raise UpstreamFailed(upstream.name, f"the check took over {timeout:g} s") from exc
    return _address_in(upstream, answer)


async def _fetch(
    upstream: Upstream,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    parts: SplitResult,
    timeout: float,
) -> bytes:
    reader, writer = await upstream.open(host, port, timeout, tls)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: */*\r\n"
            "User-Agent: master-controller egress check\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := await reader.read(MAX_CHECK_ANSWER):
            answer += chunk
            if len(answer) > MAX_CHECK_ANSWER:
                raise UpstreamFailed(upstream.name, "the check URL answered too much")
        return answer
    except OSError as exc:
        raise UpstreamFailed(upstream.name, f"fetching the check URL: {_say(exc)}") from exc
    finally:
        writer.close()


def _dechunk(body: bytes) -> bytes:
    """A chunked transfer-coded body, decoded (what is malformed ends it)."""
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
        except ValueError:
            break
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return out


def _address_in(upstream: Upstream, answer: bytes) -> str:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 200 " not in f"{status} ":
        raise UpstreamFailed(upstream.name, f"the check URL answered {status[:80]!r}")
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    text = body.decode(errors="replace").strip()
    try:
        data = json.loads(text)
        text = str(data.get("ip", "")) if isinstance(data, dict) else str(data)
    except ValueError:
        pass
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError as exc:
        raise UpstreamFailed(upstream.name, "the check URL did not answer an address") from exc
