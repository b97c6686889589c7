"""The container runtime with the real golden image (root, systemd-nspawn)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Network, ip_address, ip_network
from pathlib import Path

import pytest

from master_controller.errors import GuestStartFailed, GuestStateError, ProbeError
from master_controller.runtimes import cgroups, disklayer, idmap
from master_controller.runtimes.base import GuestSecrets, GuestState, GuestStatus
from master_controller.runtimes.container import ContainerRuntime, image_view
from master_controller.viewing.guest_socket import rfb_connect
from master_controller.viewing.readiness import (
    non_blank_frame,
    poll,
    rfb_handshake,
    websocket_upgrade,
)
from mc_agent import VNC_PORT
from tests.runtimes.leaks import HostSnapshot, wait_until_back

pytestmark = pytest.mark.integration


def processes_in(pid_namespaces: set[str], guest_ids: set[str] | None = None) -> list[int]:
    """Processes in those PID namespaces. The kernel reuses a namespace's number once it is
    gone (another guest's Chromium sandbox may get it), so with ``guest_ids`` only those also
    in one of these guests' cgroups count."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns/pid") not in pid_namespaces:
                    continue
                cgroup = (entry / "cgroup").read_text()
            except OSError:
                continue
            if guest_ids is None or any(f"/{cgroups.PARENT}/{g}/" in cgroup for g in guest_ids):
                found.append(int(entry.name))
    return found


def _secrets() -> GuestSecrets:
    return GuestSecrets(
        vnc_password=secrets.token_urlsafe(6)[:8], agent_token=secrets.token_hex(16)
    )


async def _up(runtime: ContainerRuntime, image: str, name: str):  # type: ignore[no-untyped-def]
    guest = await runtime.create(f"{name}-{secrets.token_hex(3)}", image, _secrets())
    await runtime.start(guest)
    endpoint = runtime.endpoint(guest)
    await poll(lambda: websocket_upgrade(endpoint.address, 6080), time.monotonic() + 60)
    return guest


async def test_boot_view_and_destroy_leaves_nothing(
    golden_image: str, container_runtime: ContainerRuntime
) -> None:
    runtime = container_runtime
    before = HostSnapshot.take(runtime.settings)
    guest = await _up(runtime, golden_image, "view")
    assert runtime.status(guest) == GuestStatus.RUNNING
    leader = guest.resources["leader"]["pid"]
    nspid = next(
        line
        for line in Path(f"/proc/{leader}/status").read_text().splitlines()
        if line.startswith("NSpid:")
    )
    assert nspid.split()[-1] == "1"  # the recorded leader is the container's PID 1
    url = runtime.endpoint(guest).vnc_url
    frame = await poll(
        lambda: non_blank_frame(url, guest.secrets.vnc_password, time.monotonic() + 30),
        time.monotonic() + 60,
    )
    assert not frame.is_blank() and (frame.width, frame.height) == (1280, 800)
    # x11vnc listens on the guest's address now: straight or through websockify, a wrong
    # password gets nothing, and no password is not on offer
    for guest_url in (url, runtime.endpoint(guest).websocket_url):
        with pytest.raises(ProbeError, match="authentication failed"):
            async with rfb_connect(guest_url, "wrongpw1"):
                pass
        with pytest.raises(ProbeError, match="requires authentication"):
            async with rfb_connect(guest_url, None):
                pass
    with pytest.raises(GuestStateError):
        await runtime.start(guest)  # already running
    await runtime.destroy(guest)
    await runtime.destroy(guest)  # idempotent
    assert HostSnapshot.take(runtime.settings) == before


def _merge_any(pid: int) -> str | None:
    """Whether the kernel may merge ``pid``'s memory with other processes' (KSM)."""
    try:
        stat = Path(f"/proc/{pid}/ksm_stat").read_text()
    except OSError:
        return None  # exited meanwhile
    return dict(line.split(": ") for line in stat.splitlines() if ": " in line)["ksm_merge_any"]


async def test_memory_merging_is_off_unless_the_operator_turns_it_on(
    golden_image: str, container_runtime: ContainerRuntime
) -> None:
    if not Path("/proc/self/ksm_stat").exists():
        pytest.skip("this kernel has no per-process KSM (Linux 6.4+)")
    settings = container_runtime.settings.model_copy(update={"guest_memory_merging": True})
    plain = await _up(container_runtime, golden_image, "plain")
    merged = await _up(ContainerRuntime(settings), golden_image, "merged")
    try:
        for guest, expected in ((plain, "no"), (merged, "yes")):
            pids = cgroups.processes(guest.resources["cgroups"])
            assert len(pids) > 10  # the guest's systemd, X, VNC, Chromium and the rest
            assert {_merge_any(pid) for pid in pids} - {None} == {expected}, guest.guest_id
    finally:
        await container_runtime.destroy(plain)
        await container_runtime.destroy(merged)


async def test_hibernate_keeps_disk_and_address(
    golden_image: str, container_runtime: ContainerRuntime
) -> None:
    runtime = container_runtime
    guest = await _up(runtime, golden_image, "hib")
    address = guest.address
    marker = runtime.guest_dir(guest.guest_id) / "rootfs/home/browser/marker"
    marker.write_text("kept")
    await runtime.hibernate(guest)
    assert runtime.status(guest) == GuestStatus.HIBERNATED
    assert not marker.exists()  # disk layer unmounted, kept in its image (disk.ext4)
    await runtime.resume(guest)
    await poll(lambda: websocket_upgrade(address or "", 6080), time.monotonic() + 60)
    assert guest.address == address and marker.read_text() == "kept"
    await runtime.destroy(guest)


@pytest.fixture
def ip_forwarding_on() -> Iterator[None]:
    """Hosts that run other containers forward IP; isolation must not depend on it."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    before = path.read_text()
    path.write_text("1\n")
    yield
    path.write_text(before)


async def _connects_from(namespace: str, address: str, port: int) -> bool:
    probe = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(2)\n"
        "sys.exit(s.connect_ex((sys.argv[1], int(sys.argv[2]))))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", namespace, "python3", "-c", probe, address, str(port)
    )
    return await proc.wait() == 0


async def test_guests_cannot_reach_each_other_or_the_host(
    golden_image: str, container_runtime: ContainerRuntime, ip_forwarding_on: None
) -> None:
    runtime = container_runtime
    a, b = await asyncio.gather(
        _up(runtime, golden_image, "iso-a"), _up(runtime, golden_image, "iso-b")
    )
    host_service = await asyncio.start_server(lambda r, w: w.close(), "0.0.0.0", 0)
    host_port = host_service.sockets[0].getsockname()[1]
    egress_port = runtime.settings.egress_port  # the one host port guests may reach
    egress = await asyncio.start_server(lambda r, w: w.close(), "0.0.0.0", egress_port)
    try:
        ns_a = a.resources["namespace"]
        assert await _connects_from(ns_a, a.address or "", 6080)  # its own service: yes
        assert await _connects_from(ns_a, a.address or "", VNC_PORT)
        # the other guest: no, neither its VNC (on its address, for the relay), nor
        # websockify, nor its agent
        for port in (VNC_PORT, 6080, 8080):
            assert not await _connects_from(ns_a, b.address or "", port), port
        host_end = str(ip_address(a.address or "") - 1)
        assert not await _connects_from(ns_a, host_end, host_port)  # the host's services: no
        assert await _connects_from(ns_a, host_end, egress_port)  # its egress proxy: yes
        # a neighbour of the host (another container, a machine on its network) routed
        # through it: reaches the host, never a guest
        with _neighbour() as (neighbour, host_side):
            assert await _connects_from(neighbour, host_side, host_port)  # its link works
            for port in (VNC_PORT, 6080, 8080):
                assert not await _connects_from(neighbour, b.address or "", port), port
        await websocket_upgrade(b.address or "", 6080)  # while the host reaches both
        await websocket_upgrade(a.address or "", 6080)
        for guest in (a, b):  # and the relay's path: the VNC handshake, straight over TCP
            endpoint = runtime.endpoint(guest)
            await rfb_handshake(endpoint.vnc_url, guest.secrets.vnc_password)
        assert _allowances() >= {f"{link} . {egress_port}" for link in _links(a, b)}
    finally:
        host_service.close()
        egress.close()
        await asyncio.gather(runtime.destroy(a), runtime.destroy(b))
    # the allowance goes with the guest: no port stays open to guests that come later
    assert not {entry.split(" . ")[0] for entry in _allowances()} & _links(a, b)


def _unused_link_network() -> IPv4Network:
    """A /30 of the benchmarking range (198.18.0.0/15) that no address or route of this host
    touches (the host's own network could be anything, even a documentation range)."""
    listing = " ".join(
        subprocess.run(["ip", "-4", *what], capture_output=True, text=True).stdout
        for what in (("addr",), ("route",))
    )
    used = [ip_network(n, strict=False) for n in re.findall(r"\d+\.\d+\.\d+\.\d+/\d+", listing)]
    for candidate in ip_network("198.18.250.0/24").subnets(new_prefix=30):
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise AssertionError("no free /30 in 198.18.250.0/24 on this host")


@contextlib.contextmanager
def _neighbour() -> Iterator[tuple[str, str]]:
    """A network namespace behind a veth to the host (not a guest link), routed through the
    host: (its name, the host's address on its link)."""
    name, link = f"mc-test-nb-{os.getpid()}", f"mctnb{os.getpid() % 100000}"
    host_end, far_end = (str(a) for a in list(_unused_link_network().hosts())[:2])

    def ip(*argv: str) -> None:
        subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)

    ip("netns", "add", name)
    try:
        ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("addr", "add", f"{host_end}/30", "dev", link)
        ip("link", "set", link, "up")
        ip("-n", name, "addr", "add", f"{far_end}/30", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "route", "add", "default", "via", host_end)
        yield name, host_end
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=10)
        ip("netns", "del", name)


def _links(*guests: GuestState) -> set[str]:
    return {guest.resources["host_ifname"] for guest in guests}


def _allowances() -> set[str]:
    """The firewall's (guest link . port) pairs that may reach the host."""
    listing = subprocess.run(
        ["nft", "list", "set", "inet", "master_controller", "guest_egress"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {m.replace('"', "") for m in re.findall(r'"mcv\w+" \. \d+', listing)}


def _host_uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def _unified_cgroup(pid: int) -> str | None:
    """The process's cgroup2 path with a trailing slash (None if it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    return next(line for line in lines if line.startswith("0::"))[3:] + "/"


def _as_guest_root(leader: int, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", "-t", str(leader), "-a", *argv], capture_output=True, text=True, timeout=30
    )


async def test_guest_root_is_an_unprivileged_user_on_the_host(
    golden_image: str, container_runtime: ContainerRuntime
) -> None:
    """Each guest runs in a user namespace of its own, on a UID range no other guest has: its
    root is nobody special on the host and cannot touch its own network set-up."""
    runtime = container_runtime
    a, b = await asyncio.gather(
        _up(runtime, golden_image, "uid-a"), _up(runtime, golden_image, "uid-b")
    )
    made = {path for guest in (a, b) for path in guest.resources["cgroups"]}
    try:
        ranges = []
        for guest in (a, b):
            base = guest.resources["uid_base"]
            ranges.append(range(base, base + 65536))
            leader = guest.resources["leader"]["pid"]
            assert _host_uid(leader) == base  # the guest's PID 1 (root inside)
            inside = processes_in({guest.resources["pid_namespace"]})
            assert len(inside) > 10  # systemd, Xvfb, x11vnc, websockify, Chromium, ...
            assert all(_host_uid(pid) in ranges[-1] for pid in inside)
            # every process of the guest is in its own cgroup (or has exited meanwhile)
            own = f"/{cgroups.PARENT}/{guest.guest_id}/"
            paths = [p for p in map(_unified_cgroup, inside) if p is not None]
            assert len(paths) > 10 and all(own in p for p in paths), (own, paths)
            assert _as_guest_root(leader, "id", "-u").stdout.strip() == "0"
            link = _as_guest_root(leader, "ip", "-o", "link", "show").stdout
            ifname = next(
                line.split(":")[1].strip().split("@")[0]
                for line in link.splitlines()
                if "LOOPBACK" not in line
            )
            spoof = _as_guest_root(leader, "ip", "addr", "add", "10.213.200.9/32", "dev", ifname)
            assert spoof.returncode != 0 and "Operation not permitted" in spoof.stderr
            down = _as_guest_root(leader, "ip", "link", "set", ifname, "down")
            assert down.returncode != 0 and "Operation not permitted" in down.stderr
        assert not set(ranges[0]) & set(ranges[1])
    finally:
        await asyncio.gather(runtime.destroy(a), runtime.destroy(b))
    assert made and not made & HostSnapshot.take(runtime.settings).cgroups
    assert not any(Path(path).exists() for path in made)


async def test_a_killed_guest_is_seen_dead_and_cleaned_up(
    golden_image: str, container_runtime: ContainerRuntime
) -> None:
    runtime = container_runtime
    before = HostSnapshot.take(runtime.settings)
    guest = await _up(runtime, golden_image, "kill")
    import signal

    from master_controller.process import ProcessRef

    ProcessRef.model_validate(guest.resources["leader"]).signal(signal.SIGKILL)
    for _ in range(100):
        if runtime.status(guest) == GuestStatus.DEAD:
            break
        await asyncio.sleep(0.05)
    assert runtime.status(guest) == GuestStatus.DEAD
    await runtime.destroy(guest)
    assert HostSnapshot.take(runtime.settings) == before


async def test_failed_start_releases_what_it_made(
    golden_image: str, container_runtime: ContainerRuntime
) -> None:
    runtime = container_runtime
    before = HostSnapshot.take(runtime.settings)
    guest = await runtime.create(f"fail-{secrets.token_hex(3)}", golden_image, _secrets())
    guest.resources["lower"] = "/nonexistent/lower"  # the disk layer step will fail
    with pytest.raises(GuestStartFailed, match="disk layer"):
        await runtime.start(guest)
    after_failure = HostSnapshot.take(runtime.settings)
    assert after_failure.namespaces == before.namespaces and after_failure.links == before.links
    assert after_failure.mounts == before.mounts
    image = runtime.guest_dir(guest.guest_id) / disklayer.IMAGE
    assert image.exists() and not disklayer.loop_devices(image)  # made, mounted, let go
    await runtime.destroy(guest)
    assert HostSnapshot.take(runtime.settings) == before


async def test_churn_leaves_nothing(golden_image: str, container_runtime: ContainerRuntime) -> None:
    runtime = container_runtime
    before = HostSnapshot.take(runtime.settings)
    namespaces, guest_ids = set(), set()
    for round_ in range(20):
        guest = await runtime.create(
            f"churn{round_}-{secrets.token_hex(3)}", golden_image, _secrets()
        )
        await runtime.start(guest)
        namespaces.add(guest.resources["pid_namespace"])
        guest_ids.add(guest.guest_id)
        if round_ % 2:  # half of them get as far as a working viewer path
            address = runtime.endpoint(guest).address
            await poll(lambda a=address: websocket_upgrade(a, 6080), time.monotonic() + 60)
        await runtime.destroy(guest)
    assert HostSnapshot.take(runtime.settings) == before
    assert not processes_in(namespaces, guest_ids)  # not a single guest process survived


async def test_a_start_cancelled_part_way_leaves_nothing(
    golden_image: str, container_runtime: ContainerRuntime
) -> None:
    """A session cancelled while its guest boots: the start task is cancelled at some point
    of its steps (network, disk layer, cgroups, nspawn), then the guest is destroyed from
    what its state file recorded. Whatever point it was, nothing is left."""
    runtime = container_runtime
    before = HostSnapshot.take(runtime.settings)
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8):
        guest = await runtime.create(f"cut-{secrets.token_hex(3)}", golden_image, _secrets())
        start = asyncio.create_task(runtime.start(guest))
        await asyncio.sleep(delay)
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError, GuestStartFailed):
            await start
        await runtime.destroy(runtime.load(guest.guest_id))
        assert not disklayer.loop_devices(runtime.guest_dir(guest.guest_id) / disklayer.IMAGE)
        # (a killed process may take a moment to be reaped by the host's init)
        wait_until_back(runtime.settings, before, seconds=5)


def test_the_image_cannot_be_changed_through_a_guest_folder(tmp_path: Path) -> None:
    """While a start mounts the image's ID-mapped view in the guest's folder (the overlay's
    lower layer), that view is read-only: a destroy racing the start once removed the guest's
    folder through it and emptied the shared image. After, the view is gone from the tree at
    once, even while something still holds it."""
    image, lower = tmp_path / "image", tmp_path / "lower"
    (image / "etc").mkdir(parents=True)
    (image / "etc" / "os-release").write_text("ID=debian\n")
    lower.mkdir()
    base = idmap.base_for(4002)
    with image_view(image, lower, base):
        assert (lower / "etc" / "os-release").stat().st_uid == base  # ID-mapped
        with pytest.raises(OSError) as refused:
            (lower / "etc" / "written-through-the-view").write_text("x")
        assert refused.value.errno == errno.EROFS
        with pytest.raises(OSError) as refused:
            (lower / "etc" / "os-release").unlink()
        assert refused.value.errno == errno.EROFS
        holder = os.open(lower / "etc", os.O_RDONLY)
    try:
        mounts = Path("/proc/self/mounts").read_text().split()
        assert str(lower) not in mounts and not (lower / "etc").exists()
    finally:
        os.close(holder)
    assert sorted(p.name for p in (image / "etc").iterdir()) == ["os-release"]
