"""Each user's own egress identity, against real upstream proxies (tinyproxy with a login,
Dante's SOCKS5) in namespaces of their own: stickiness across a restart, failover with the
reason recorded, fail closed, a guest's traffic leaving through its user's exit with the
name resolved by the upstream (never here), and upstream logins kept out of every log."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from master_controller.credentials import CredentialStore
from master_controller.errors import ConfigError, NoEgressIdentity, UpstreamFailed
from master_controller.network.egress import Allowance
from master_controller.network.identities import UPSTREAM_BYTES, EgressIdentities
from master_controller.network.upstream import configured, exit_address, parse
from master_controller.settings import Settings
from master_controller.store.database import Database
from master_controller.vault import Vault
from tests.network.egress_helpers import GUEST_A, running_proxy
from tests.network.upstreams import CHECK_URL, ORIGIN, USERNAME, Upstreams, real_upstreams

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")


@pytest.fixture
def upstreams(tmp_path: Path) -> Iterator[Upstreams]:
    with real_upstreams(tmp_path) as made:
        yield made


def _settings(tmp_path: Path, ups: Upstreams, **overrides: object) -> Settings:
    chosen: dict[str, object] = {
        "egress_upstreams": [ups.http.url, ups.socks.url],
        "egress_check_url": CHECK_URL,
        "egress_check_interval": 300.0,
        **overrides,
    }
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'mc.db'}",
        vault_key_file=tmp_path / "vault.keys",
        **chosen,  # type: ignore[arg-type]
    )


async def _identities(settings: Settings, ups: Upstreams) -> tuple[EgressIdentities, Database]:
    db = Database(settings.database)
    await asyncio.to_thread(db.migrate)
    store = CredentialStore(db, Vault.open(settings))
    await store.seal_upstream_login(parse(ups.http.url).name, USERNAME, ups.password)
    return EgressIdentities(settings, db, store), db


def test_the_host_cannot_resolve_the_test_names() -> None:
    """What makes the DNS checks below mean something."""
    for name in (ORIGIN, "check.mc-test"):
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo(name, 80)


async def test_each_user_keeps_one_checked_exit_across_a_restart(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    settings = _settings(tmp_path, upstreams)
    identities, db = await _identities(settings, upstreams)
    alice = await identities.ensure("alice")
    bob = await identities.ensure("bob")  # the least used upstream: the other one
    assert {alice.exit_address, bob.exit_address} == {
        upstreams.http.exit_address,
        upstreams.socks.exit_address,
    }
    assert alice.upstream.name == upstreams.http.url and alice.exit_address == "10.253.1.2"
    await db.close()

    again, db = await _identities(settings, upstreams)  # a new controller, same database
    for _ in range(3):
        assert (await again.ensure("alice")).exit_address == alice.exit_address
        assert (await again.ensure("bob")).exit_address == bob.exit_address
    row = await again.assignment("alice")
    assert row is not None and row.check_ok and row.exit_address == "10.253.1.2"
    await db.close()


async def test_a_failing_upstream_moves_its_user_and_says_why(
    tmp_path: Path, upstreams: Upstreams, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = _settings(tmp_path, upstreams, egress_check_interval=0.0)
    identities, db = await _identities(settings, upstreams)
    assert (await identities.ensure("carol")).upstream.name == upstreams.http.url
    upstreams.http.stop()
    moved = await identities.ensure("carol")
    assert moved.exit_address == upstreams.socks.exit_address
    row = await identities.assignment("carol")
    assert row is not None and row.upstream == upstreams.socks.url
    assert upstreams.http.url in row.last_error

    # fail closed: no upstream works, the user gets none (and never a direct exit)
    upstreams.socks.stop()
    with pytest.raises(NoEgressIdentity) as refused:
        await identities.ensure("carol")
    assert upstreams.http.url in refused.value.reason
    assert upstreams.socks.url in refused.value.reason
    row = await identities.assignment("carol")
    assert row is not None and not row.check_ok and row.last_error

    upstreams.http.restart()
    assert (await identities.reassign("carol")).upstream.name == upstreams.http.url
    assert upstreams.password not in caplog.text
    await db.close()


async def test_a_wrong_login_is_refused_and_never_shown(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    http = parse(upstreams.http.url)
    with pytest.raises(UpstreamFailed) as refused:
        await exit_address(http.with_credentials(USERNAME, "not-the-password"), CHECK_URL)
    assert "not-the-password" not in refused.value.reason
    assert refused.value.upstream == upstreams.http.url
    assert "not-the-password" not in repr(http.with_credentials(USERNAME, "not-the-password"))
    with pytest.raises(UpstreamFailed):
        await exit_address(http, CHECK_URL)  # no login at all
    right = http.with_credentials(USERNAME, upstreams.password)
    assert await exit_address(right, CHECK_URL) == upstreams.http.exit_address


async def test_a_guests_traffic_leaves_through_its_users_exit(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    settings = _settings(tmp_path, upstreams)
    identities, db = await _identities(settings, upstreams)
    for user in ("dave", "erin"):
        identity = await identities.ensure(user)
        before = UPSTREAM_BYTES.labels(identity.upstream.name)._value.get()
        async with running_proxy() as (egress, port):
            egress.grant(
                GUEST_A,
                Allowance("s-" + user, (ORIGIN,), frozenset({80}), upstream=identity.upstream),
            )
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(GUEST_A, 0)
            )
            writer.write(f"GET http://{ORIGIN}/ HTTP/1.1\r\nHost: {ORIGIN}\r\n\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
        assert body.decode() == identity.exit_address  # the origin saw the user's exit
        assert UPSTREAM_BYTES.labels(identity.upstream.name)._value.get() > before
    await db.close()


def test_upstream_settings_are_checked(tmp_path: Path) -> None:
    def settings(**chosen: object) -> Settings:
        return Settings(data_dir=tmp_path, **chosen)  # type: ignore[arg-type]

    with pytest.raises(ConfigError, match="credentials do not go in settings"):
        configured(settings(egress_upstreams=["http://u:secret@10.0.0.1:8080"]))
    with pytest.raises(ConfigError, match="http or socks5"):
        configured(settings(egress_upstreams=["ftp://10.0.0.1:21"]))
    with pytest.raises(ConfigError, match="listed twice"):
        configured(settings(egress_upstreams=["http://a:1", "http://a:1/"]))
    expanded = configured(
        settings(
            egress_upstream_template="http://gate.example.net:{port}",
            egress_upstream_ports="10001-10003",
        )
    )
    assert [u.name for u in expanded] == [
        "http://gate.example.net:10001",
        "http://gate.example.net:10002",
        "http://gate.example.net:10003",
    ]
    with pytest.raises(ConfigError):
        configured(settings(egress_upstream_template="http://gate:{port}"))
