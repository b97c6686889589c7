"""The egress proxy on loopback (the guest network is 127.0.0.0/8, so loopback peers count as
guests): an allowed host on an allowed port passes for plain HTTP and CONNECT when an
operator mapped that exact host and port; other hosts, other ports, guests without a grant
and bad requests are refused with a reason; non-guests get nothing; metric labels stay fixed
words whatever the guest sends."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client import REGISTRY

from master_controller.errors import ConfigError
from master_controller.network.egress import Allowance, EgressProxy
from master_controller.network.egress_http import MAX_HEAD
from master_controller.settings import Settings
from tests.network.egress_helpers import (
    GUEST_A,
    allowance,
    ask,
    closed,
    connect,
    echo,
    origin,
    running_proxy,
    tunnel,
)
from tests.servers import free_port


async def test_plain_http_to_an_exactly_mapped_host_is_forwarded() -> None:
    async with origin() as up:
        mapped = {f"allowed.test:{up.port}": "127.0.0.1"}
        async with running_proxy(egress_hosts=mapped) as (egress, port):
            # httpx connects to a proxy from 127.0.0.1 whatever its local_address says
            egress.grant("127.0.0.1", allowance("allowed.test", ports={up.port}))
            proxy = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(proxy=proxy, trust_env=False, timeout=5) as client:
                answer = await client.get(
                    f"http://allowed.test:{up.port}/token?x=1",
                    headers={"Proxy-Authorization": "x"},
                )
    assert answer.status_code == 200 and answer.text == "hello"
    head = up.seen[0].decode()
    assert head.startswith("GET /token?x=1 HTTP/1.1\r\n")  # origin-form upstream
    assert f"host: allowed.test:{up.port}" in head.lower()
    assert "proxy-authorization" not in head.lower() and "connection: close" in head.lower()


async def test_connect_tunnels_to_an_exactly_mapped_host() -> None:
    async with origin() as up:
        mapped = {f"Allowed.Test.:{up.port}": "127.0.0.1"}  # keys are spelled loosely
        async with running_proxy(egress_hosts=mapped) as (egress, port):
            egress.grant(GUEST_A, allowance("allowed.test", ports={up.port}))
            reader, writer = await tunnel(port, f"ALLOWED.test:{up.port}")
            await echo(reader, writer, b"tls bytes")
            writer.close()


@pytest.mark.parametrize(
    ("granted", "request_line", "status", "reason"),
    [
        (True, "GET http://denied.test/ HTTP/1.1", 403, "egress to denied.test is not allowed"),
        (True, "CONNECT notallowed.test:443 HTTP/1.1", 403, "notallowed.test"),
        (True, "CONNECT evil-allowed.test:443 HTTP/1.1", 403, "evil-allowed.test"),
        (False, "GET http://allowed.test/ HTTP/1.1", 403, "no sign-in that allows egress"),
        (True, "GET /relative HTTP/1.1", 400, "only absolute http://"),
        (True, "BROKEN", 400, "malformed"),
        (True, "CONNECT allowed.test HTTP/1.1", 400, "host:port"),
        (True, "CONNECT allowed.test:99999 HTTP/1.1", 400, "port out of range"),
        (True, "CONNECT allowed.test\x00.x:443 HTTP/1.1", 400, "malformed host name"),
        (True, "GET http://allowed.test:x/ HTTP/1.1", 400, "malformed URL"),
        (True, "GET http://allowed.test/ SPDY/3", 400, "unsupported protocol"),
    ],
)
async def test_refusals_say_why(granted: bool, request_line: str, status: int, reason: str) -> None:
    async with running_proxy() as (egress, port):
        if granted:
            egress.grant(GUEST_A, allowance("allowed.test"))
        answer = await ask(port, request_line + "\r\nHost: x\r\n\r\n")
    assert answer.startswith(f"HTTP/1.1 {status} ") and reason in answer


@pytest.mark.parametrize(
    "request_line",
    [
        "CONNECT claude.ai:22 HTTP/1.1",  # ssh on an allowed host
        "CONNECT claude.ai:80 HTTP/1.1",  # CONNECT is for 443 unless the sign-in names more
        "CONNECT sub.claude.ai:5432 HTTP/1.1",
        "GET http://claude.ai:8080/ HTTP/1.1",  # plain HTTP is for 80 unless named
        "GET http://claude.ai:22/ HTTP/1.1",
    ],
)
async def test_ports_other_than_443_and_80_are_refused(request_line: str) -> None:
    async with origin() as up, running_proxy() as (egress, port):
        egress.grant(GUEST_A, allowance("claude.ai"))
        answer = await ask(port, request_line + "\r\n\r\n")
        assert answer.startswith("HTTP/1.1 403 ") and "is not allowed for this sign-in" in answer
        assert "port" in answer
        assert up.accepted == 0


async def test_ports_the_sign_in_names_are_allowed_and_no_others() -> None:
    async with origin() as up:
        mapped = {f"idp.test:{up.port}": "127.0.0.1"}
        async with running_proxy(egress_hosts=mapped) as (egress, port):
            egress.grant(GUEST_A, allowance("idp.test", ports={443, up.port}))
            _, writer = await tunnel(port, f"idp.test:{up.port}")
            writer.close()
            answer = await ask(port, f"GET http://idp.test:{up.port}/x HTTP/1.1\r\n\r\n")
            assert answer.startswith("HTTP/1.1 200 ")
            other = await ask(port, f"CONNECT idp.test:{up.port + 1} HTTP/1.1\r\n\r\n")
            assert other.startswith("HTTP/1.1 403 ") and f"port {up.port + 1}" in other


async def test_a_mapping_is_exact_to_host_and_port() -> None:
    """The documented local-IdP setup: one name mapped to 127.0.0.1. The mapping lets the
    guest reach that one port; the same name on another port of the host's loopback (the
    controller's API, PostgreSQL, ...) is refused, and a key without a port covers 443 only."""
    async with origin() as idp, origin() as controller_api:
        mapped = {f"idp.test:{idp.port}": "127.0.0.1", "bare.test": "127.0.0.1"}
        async with running_proxy(egress_hosts=mapped) as (egress, port):
            ports = {idp.port, controller_api.port}
            egress.grant(GUEST_A, allowance("idp.test", "bare.test", ports=ports))
            _, writer = await tunnel(port, f"idp.test:{idp.port}")
            writer.close()
            for host in ("idp.test", "bare.test"):
                answer = await ask(port, f"CONNECT {host}:{controller_api.port} HTTP/1.1\r\n\r\n")
                assert answer.startswith("HTTP/1.1 403 ") and "a loopback address" in answer
            assert controller_api.accepted == 0 and idp.accepted == 1


async def test_peers_outside_the_guest_network_get_nothing() -> None:
    port = free_port()
    egress = EgressProxy(Settings(guest_network="10.213.0.0/16", egress_port=port))
    egress.grant("127.0.0.1", allowance("allowed.test"))  # even with a grant
    await egress.start()
    try:
        reader, writer = await connect(port, "127.0.0.1")
        writer.write(b"GET http://allowed.test/ HTTP/1.1\r\n\r\n")
        await writer.drain()
        try:
            answer = await reader.read(100)
        except ConnectionResetError:  # closed before it read the request
            answer = b""
        assert answer == b""  # closed without a word
        writer.close()
    finally:
        await egress.stop()


async def test_a_slow_or_huge_request_head_is_cut_off() -> None:
    async with running_proxy() as (egress, port):
        egress.grant(GUEST_A, allowance("allowed.test"))
        egress.head_timeout = 0.3
        reader, writer = await connect(port)
        writer.write(b"CONNECT allowed.test:443 HTTP/1.1\r\n")  # and never the blank line
        await writer.drain()
        assert await closed(reader, 3)
        writer.close()
        huge = "GET http://allowed.test/ HTTP/1.1\r\n" + "X: y\r\n" * (MAX_HEAD // 6) + "\r\n"
        answer = await ask(port, huge)
        assert answer.startswith("HTTP/1.1 431 ")
        assert egress.open_connections() == 0


async def test_metric_labels_are_fixed_words() -> None:
    """Whatever host, port or junk a guest sends, the outcome labels come from a fixed set."""
    fixed = {
        "allowed",
        "refused",
        "forbidden_port",
        "forbidden_address",
        "unreachable",
        "idle_closed",
        "not_a_guest",
        "over_guest_cap",
        "over_total_cap",
    }
    async with running_proxy(egress_hosts={"x.evil.test": "127.0.0.1"}) as (egress, port):
        egress.grant(GUEST_A, allowance("evil.test", ports={443, 4444}))
        for line in (
            "CONNECT {{label}}.evil.test:443 HTTP/1.1",
            "CONNECT x.evil.test:4444 HTTP/1.1",
            "CONNECT x.evil.test:4445 HTTP/1.1",
            "GET http://a\u00e9b/ HTTP/1.1",
            "\u00ff\u00fe",
        ):
            await ask(port, line + "\r\n\r\n")
    labels = {
        sample.labels["outcome"]
        for metric in REGISTRY.collect()
        if metric.name == "mc_egress_requests"
        for sample in metric.samples
    }
    assert labels and labels <= fixed


@pytest.mark.parametrize(
    "hosts",
    [{"idp.test:http": "127.0.0.1"}, {"idp.test:0": "127.0.0.1"}, {"idp.test": "localhost"}],
)
def test_bad_egress_hosts_are_refused_at_start(hosts: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="egress_hosts"):
        EgressProxy(Settings(egress_hosts=hosts))


def test_allowance_covers_subdomains_only() -> None:
    granted = Allowance(session_id="s", domains=("claude.com",))
    assert granted.allows("claude.com") and granted.allows("platform.claude.com")
    assert granted.allows("CLAUDE.COM.")
    assert not granted.allows("evilclaude.com") and not granted.allows("claude.com.evil")
    assert granted.ports == {443}
    assert granted.allows_port(443, tunnel=True) and not granted.allows_port(80, tunnel=True)
    assert granted.allows_port(80, tunnel=False) and not granted.allows_port(8080, tunnel=False)


async def test_nothing_is_left_running_after_stop() -> None:
    async with origin() as up:
        mapped = {f"allowed.test:{up.port}": "127.0.0.1"}
        async with running_proxy(egress_hosts=mapped) as (egress, port):
            egress.grant(GUEST_A, allowance("allowed.test", ports={up.port}))
            reader, writer = await tunnel(port, f"allowed.test:{up.port}")
            before = len(asyncio.all_tasks())
        # stop() returned: the connection's task and its two pipes are gone
        assert len(asyncio.all_tasks()) <= before - 3 and await closed(reader)
        assert egress.open_connections() == 0
        writer.close()
