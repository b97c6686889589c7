"""The command line: ``master-controller image ... | doctor``."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession

from master_controller.auth import create_api_key, revoke_api_key
from master_controller.capacity import HostCapacity
from master_controller.errors import ConfigError, MCError
from master_controller.images.builder import ImageBuilder, prune_layers
from master_controller.images.recipe import Recipe
from master_controller.images.store import ImageStore
from master_controller.instance import ensure_free, running
from master_controller.ops.commands import deploy_app, install
from master_controller.runtimes import (
    RUNTIMES,
    best_runtime,
    get_runtime,
    hostlimits,
    memmerge,
    probe_all,
)
from master_controller.runtimes.base import Runtime
from master_controller.runtimes.kvm import kvm_probe
from master_controller.settings import Settings, get_settings
from master_controller.steps import StepLog
from master_controller.store import repo
from master_controller.store.database import Database
from master_controller.verification import Verifier
from mc_agent import providers

T = TypeVar("T")

app = typer.Typer(help="master-controller: disposable sign-in browsers", no_args_is_help=True)
image_app = typer.Typer(help="Build, verify and promote golden images.", no_args_is_help=True)
app.add_typer(image_app, name="image")
apikey_app = typer.Typer(help="API keys for API callers.", no_args_is_help=True)
app.add_typer(apikey_app, name="apikey")
session_app = typer.Typer(help="Sign-in sessions.", no_args_is_help=True)
app.add_typer(session_app, name="session")
vault_app = typer.Typer(help="The credential vault's keys.", no_args_is_help=True)
app.add_typer(vault_app, name="vault")
app.command("install")(install)
app.add_typer(deploy_app, name="deploy")

console = Console()
err_console = Console(stderr=True)


@contextmanager
def reported() -> Iterator[None]:
    """Turn an MCError into its reason on stderr and exit status 1 (no traceback)."""
    try:
        yield
    except MCError as exc:
        err_console.print(f"[red]error:[/] {exc.reason}")
        raise typer.Exit(code=1) from exc


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


@image_app.command("build")
def image_build(
    recipe: Path | None = typer.Option(None, help="Recipe file (default: the browser image)."),
    refresh: bool = typer.Option(False, help="Rebuild the base layer even if it is cached."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Build an image from a recipe into the content-addressed store."""
    settings = get_settings()
    steps = StepLog(display="plain") if as_json else StepLog.for_stream(sys.stderr)
    with reported():
        result = ImageBuilder(settings, steps).build(
            Recipe.load(recipe or settings.recipe), refresh_base=refresh
        )
    if as_json:
        _print_json(
            {
                "id": result.image_id,
                "path": str(result.path),
                "seconds": round(result.seconds, 1),
                "baseCached": result.base_cached,
                "alreadyBuilt": result.already_built,
                "steps": result.steps,
            }
        )
    else:
        note = " (already in the store)" if result.already_built else ""
        console.print(f"built image [bold]{result.image_id}[/] in {result.seconds:.1f}s{note}")


@image_app.command("verify")
def image_verify(
    image: str = typer.Argument("current", help="Image id (or a unique prefix, or 'current')."),
    vm: bool = typer.Option(False, "--vm", help="Also boot it in the QEMU runtime."),
    static_only: bool = typer.Option(
        False, "--static-only", help="Skip the boot checks (the image then cannot be promoted)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Check an image statically and by booting it; writes verify.json next to it."""
    settings = get_settings()
    steps = StepLog(display="plain") if as_json else StepLog.for_stream(sys.stderr)
    with reported():
        vms = (get_runtime("qemu", settings),) if vm and not static_only else ()
        runtime = None if static_only else get_runtime("container", settings)
        verifier = Verifier(settings, runtime, steps, more_runtimes=vms)
        result = asyncio.run(verifier.verify(image, boot=not static_only))
    if as_json:
        _print_json(result)
    elif result["passed"]:
        console.print(f"[green]image {result['image_id']} passed verification[/]")
    else:
        err_console.print(f"[red]image {result['image_id']} FAILED verification:[/]")
        for failure in result["failures"]:
            err_console.print(f"  - {failure}")
    if not result["passed"]:
        raise typer.Exit(code=1)


@image_app.command("ensure")
def image_ensure(
    recipe: Path | None = typer.Option(None, help="Recipe file (default: the browser image)."),
) -> None:
    """Build the recipe's image (cached by input digest), verify it, and promote it if it
    passed. Leaves the current image alone when the new one fails."""
    settings = get_settings()
    steps = StepLog.for_stream(sys.stderr)
    store = ImageStore(settings.images_dir)
    with reported():
        built = ImageBuilder(settings, steps).build(Recipe.load(recipe or settings.recipe))
        info = store.get(built.image_id)
        if not info.verified:
            runtime = get_runtime("container", settings)
            result = asyncio.run(Verifier(settings, runtime, steps).verify(built.image_id))
            if not result["passed"]:
                err_console.print(f"[red]image {built.image_id} failed verification:[/]")
                for failure in result["failures"]:
                    err_console.print(f"  - {failure}")
                current = store.current()
                err_console.print(f"current image stays {current or 'unset'}")
                raise typer.Exit(code=1)
        if store.current() != built.image_id:
            store.promote(built.image_id)
    console.print(f"current image: [bold]{built.image_id}[/] (built, verified, promoted)")


@image_app.command("promote")
def image_promote(image: str = typer.Argument(..., help="Image id or unique prefix.")) -> None:
    """Make IMAGE current; refused unless that exact image passed verification."""
    with reported():
        image_id = ImageStore(get_settings().images_dir).promote(image)
    console.print(f"image [bold]{image_id}[/] is now current")


@image_app.command("rollback")
def image_rollback() -> None:
    """Return to the image promoted before the current one."""
    with reported():
        image_id = ImageStore(get_settings().images_dir).rollback()
    console.print(f"rolled back: image [bold]{image_id}[/] is current again")


@image_app.command("gc")
def image_gc(
    keep: int | None = typer.Option(None, help="Promoted images to keep besides current."),
) -> None:
    """Delete images that are not current, not among the last KEEP promoted, not in use."""
    settings = get_settings()
    in_use = {g.image_id for rt in _all_runtimes(settings) for g in rt.guests()}
    with reported():
        removed = ImageStore(settings.images_dir).gc(
            settings.images_keep if keep is None else keep, in_use
        )
        layers = prune_layers(settings)
    console.print(f"removed {len(removed)} image(s)" + "".join(f"\n  {i}" for i in removed))
    if layers:
        console.print(f"removed {len(layers)} cached base layer(s) no image uses")


@image_app.command("show")
def image_show(image: str = typer.Argument("current")) -> None:
    """An image's manifest and verification result, as JSON."""
    with reported():
        info = ImageStore(get_settings().images_dir).get(image)
    _print_json({"manifest": info.manifest, "verification": info.verification})


@image_app.command("list")
def image_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Images in the store, with verification status and which is current."""
    store = ImageStore(get_settings().images_dir)
    current = store.current()
    rows: list[dict[str, Any]] = [
        {
            "id": info.id,
            "name": info.manifest.get("name"),
            "created": info.created,
            "sizeBytes": info.size_bytes,
            "verification": info.verification_status,
            "current": info.id == current,
        }
        for info in store.images()
    ]
    if as_json:
        _print_json(rows)
        return
    table = Table()
    for column in ("id", "name", "created", "size", "verification", "current"):
        table.add_column(column, no_wrap=column in ("id", "created"))
    for row in rows:
        table.add_row(
            row["id"],
            str(row["name"]),
            row["created"][:16].replace("T", " "),
            f"{row['sizeBytes'] / 2**30:.1f}G",
            row["verification"],
            "*" if row["current"] else "",
        )
    console.print(table)


@app.command("doctor")
def doctor(as_json: bool = typer.Option(False, "--json")) -> None:
    """What this host can run, which runtime is chosen and why, and the image store."""
    settings = get_settings()
    probes = probe_all(settings)
    try:
        chosen: str | None = best_runtime(settings).name
    except MCError:
        chosen = None
    store = ImageStore(settings.images_dir)
    kvm = kvm_probe(settings)
    holder = None
    try:
        holder = running(settings.data_dir)
        controller: dict[str, Any] | str | None = None if holder is None else asdict(holder)
    except MCError as exc:
        controller = exc.reason
    report = {
        "dataDir": str(settings.data_dir),
        "controller": controller,
        "kvm": {"usable": kvm.usable, "reason": kvm.reason, "seconds": kvm.seconds},
        "runtimes": {n: {"usable": r.usable, "reason": r.reason} for n, r in probes.items()},
        "chosenRuntime": chosen,
        "currentImage": store.current(),
        "images": len(store.ids()),
        "capacity": {
            "maxSessions": settings.max_sessions,
            "maxConcurrentBoots": settings.max_concurrent_boots,
            "defaults": HostCapacity.of_this_host().explain(),
        },
        "memoryMerging": {
            "setting": settings.guest_memory_merging,
            "kernel": memmerge.kernel_state(),
        },
        # container guests count together against host root's inotify limits (issue 18)
        "hostLimits": {
            limit.name: {"current": limit.current, "needed": limit.needed}
            for limit in hostlimits.check(settings.max_sessions)
        },
    }
    if as_json:
        _print_json(report)
        return
    table = Table("runtime", "usable", "why")
    for name, result in probes.items():
        mark = "[green]yes[/]" if result.usable else "[red]no[/]"
        table.add_row(name + (" (chosen)" if name == chosen else ""), mark, result.reason)
    console.print(table)
    console.print(f"KVM: {'usable' if kvm.usable else 'not usable'} ({kvm.reason})")
    console.print(f"data dir: {settings.data_dir}")
    if isinstance(controller, str):
        console.print(f"controller: unknown ({controller})")
    elif holder is None:
        console.print("controller: none running on this data dir")
    else:
        console.print(f"controller: running ({holder.describe() or 'not named yet'})")
    console.print(f"current image: {report['currentImage'] or 'none (run `image build`)'}")
    console.print(
        f"capacity: max_sessions {settings.max_sessions}, "
        f"max_concurrent_boots {settings.max_concurrent_boots}"
    )
    for line in HostCapacity.of_this_host().explain():
        console.print(f"  {line}")
    merge = memmerge.kernel_state()
    if settings.guest_memory_merging:
        effect = "merging" if merge == "merging" else f"no effect: the host's KSM is {merge}"
        console.print(f"guest memory merging: on ({effect})")
    else:
        console.print(f"guest memory merging: off (the host's KSM is {merge})")
    for limit in hostlimits.check(settings.max_sessions):
        mark = "[green]ok[/]" if limit.enough else "[yellow]raised at the first container start[/]"
        console.print(
            f"host limit {limit.name}: {limit.current} "
            f"({limit.needed} needed for {settings.max_sessions} container guests): {mark}"
        )


@app.command("serve")
def serve(
    host: str | None = typer.Option(None, help="Listen address (default: setting `host`)."),
    port: int | None = typer.Option(None, help="Listen port (default: setting `port`)."),
) -> None:
    """Run the controller. Builds, verifies and promotes the image first if none is current.

    The whole process runs with umask 077 and a 0700 data dir (image builds keep their own
    umask, see ImageBuilder.build), and viewer tickets are redacted from every log line.
    Logs are JSON lines unless stderr is a terminal (setting ``log_format``)."""
    import uvicorn

    from master_controller.viewing.relay import MAX_VIEWER_MESSAGE
    from master_controller.web.app import UMASK, create_app, forwarded_options, protect_data_dir
    from master_controller.web.logs import log_config

    os.umask(UMASK)
    # every guest's egress tunnels and viewers hold descriptors; the egress proxy's total
    # cap is a share of this limit, so take what the host allows
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    settings = get_settings().model_copy(update=overrides)
    with reported():
        # before anything touches the data dir; the app's lifespan takes the lock itself
        ensure_free(settings.data_dir)
        protect_data_dir(settings.data_dir)
    if ImageStore(settings.images_dir).current() is None:
        err_console.print("no current image yet: building, verifying and promoting one first")
        image_ensure(recipe=None)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        ws_max_size=MAX_VIEWER_MESSAGE,  # larger viewer frames are closed 1009 by uvicorn
        # no permessage-deflate: what the relay sends is the guest's RFB, compressed already
        # (noVNC asks for Tight/ZRLE); deflating it again cost the controller most of its
        # CPU per MiB relayed and saved the viewer little
        ws_per_message_deflate=False,
        **forwarded_options(settings),
        log_level="info",
        log_config=log_config(settings.log_format),
    )


def _run_db(action: Callable[[AsyncSession], Awaitable[T]]) -> T:
    settings = get_settings()
    database = Database(settings.database)
    database.migrate()

    async def go() -> T:
        try:
            async with database.session() as db:
                return await action(db)
        finally:
            await database.close()

    return asyncio.run(go())


@apikey_app.command("create")
def apikey_create(
    name: str,
    scope: list[str] = typer.Option(
        ["sessions"], help="Scopes: sessions, admin, export (decrypted credentials)."
    ),
) -> None:
    """Create an API key and print it once (only its digest is stored)."""
    with reported():
        key = _run_db(lambda db: create_api_key(db, name, tuple(scope)))
    err_console.print(f"API key [bold]{name}[/] ({', '.join(scope)}); it is shown only now:")
    print(key)


@apikey_app.command("list")
def apikey_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """API keys (names, prefixes, scopes; never the keys)."""
    rows: list[dict[str, Any]] = [
        {
            "name": r.name,
            "prefix": r.prefix,
            "scopes": r.scopes.split(),
            "created": r.created_at.isoformat(timespec="seconds"),
            "revoked": r.revoked_at.isoformat(timespec="seconds") if r.revoked_at else None,
        }
        for r in _run_db(repo.list_api_keys)
    ]
    if as_json:
        _print_json(rows)
        return
    table = Table("name", "prefix", "scopes", "created", "revoked")
    for row in rows:
        table.add_row(
            row["name"],
            row["prefix"] + "…",
            " ".join(row["scopes"]),
            row["created"],
            row["revoked"] or "",
        )
    console.print(table)


@apikey_app.command("revoke")
def apikey_revoke(name: str) -> None:
    """Revoke an API key: it stops working at once."""
    with reported():
        _run_db(lambda db: revoke_api_key(db, name))
    console.print(f"API key {name} revoked")


@session_app.command("list")
def session_list(
    user: str | None = typer.Option(None, "--user", help="Only this user's sessions."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Sessions, newest first (read from the database)."""
    rows: list[dict[str, Any]] = [
        {
            "sessionId": r.id,
            "userId": r.user_id,
            "provider": r.provider,
            "status": r.state,
            "reason": r.reason,
            "browserIP": r.browser_ip,
            "created": r.created_at.isoformat(timespec="seconds"),
        }
        for r in _run_db(lambda db: repo.list_sessions(db, user_id=user))
    ]
    if as_json:
        _print_json(rows)
        return
    table = Table("session", "user", "provider", "status", "reason", "created")
    for row in rows:
        table.add_row(
            row["sessionId"],
            row["userId"],
            row["provider"],
            row["status"],
            row["reason"],
            row["created"],
        )
    console.print(table)


def _api(method: str, path: str, api_key: str | None, body: Any = None) -> Any:
    import httpx

    settings = get_settings()
    key = api_key or os.environ.get("MC_API_KEY")
    if not key:
        raise MCError("an API key is needed: --api-key or MC_API_KEY")
    try:
        response = httpx.request(
            method,
            f"{settings.base_url}{path}",
            json=body,
            trust_env=False,
            timeout=30,
            headers={"Authorization": f"Bearer {key}"},
        )
    except httpx.HTTPError as exc:
        raise MCError(f"the controller at {settings.base_url} is not reachable: {exc}") from exc
    data = response.json()
    if response.status_code >= 400:
        raise MCError(f"{response.status_code}: {data.get('error', data)}")
    return data


@session_app.command("start")
def session_start(
    user: str = typer.Option(..., "--user"),
    provider: str = typer.Option("claude_code", help=f"One of: {', '.join(providers.names())}."),
    api_key: str | None = typer.Option(None, help="Default: MC_API_KEY."),
) -> None:
    """Start a sign-in session through the running controller; prints the viewer link."""
    with reported():
        data = _api("POST", "/api/auth/start", api_key, {"userId": user, "provider": provider})
    _print_json(data)


@session_app.command("cancel")
def session_cancel(
    session_id: str, api_key: str | None = typer.Option(None, help="Default: MC_API_KEY.")
) -> None:
    """Cancel a session through the running controller."""
    with reported():
        data = _api("POST", f"/api/auth/session/{session_id}/cancel", api_key)
    console.print(f"session {session_id}: {data['status']} ({data['reason']})")


def _all_runtimes(settings: Settings) -> list[Runtime]:
    return [cls(settings) for cls in RUNTIMES.values()]


def main() -> None:
    app()


@vault_app.command("rotate")
def vault_rotate() -> None:
    """A new vault key; every stored credential is re-encrypted with it, old keys dropped.
    Safe while the controller runs: it waits for the vault's lock, and the controller picks
    the new key up from the key file."""
    from master_controller.credentials import CredentialStore, Rotation
    from master_controller.vault import Vault

    settings = get_settings()
    database = Database(settings.database)

    async def go() -> Rotation:
        try:
            return await CredentialStore(database, Vault.open(settings)).rotate()
        finally:
            await database.close()

    with reported():
        database.migrate()
        done = asyncio.run(go())
    console.print(
        f"vault key {done.new_key} is current; {done.reencrypted} records re-encrypted; "
        f"retired: {', '.join(done.retired) or 'none'}"
    )
    if done.unreadable:
        err_console.print(
            f"[red]error:[/] {len(done.unreadable)} records do not decrypt and were left as "
            f"they are, with their keys: {', '.join(done.unreadable[:20])}; delete them, "
            "then rotate again to retire their keys"
        )
        raise typer.Exit(code=1)


if __name__ == "__main__":
    main()


egress_app = typer.Typer(help="Upstream proxies: each user's sticky exit.", no_args_is_help=True)
app.add_typer(egress_app, name="egress")


@egress_app.command("credentials")
def egress_credentials(
    upstream: str = typer.Argument(
        help="The upstream's URL as in settings, e.g. http://host:port."
    ),
    username: str = typer.Option(..., help="The upstream's user name."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from standard input (one line)."
    ),
) -> None:
    """Seal an upstream proxy's login in the vault (the password is asked for, or read from
    stdin; never an argument: arguments show in process lists and shell history)."""
    from master_controller.credentials import CredentialStore
    from master_controller.network.upstream import configured, parse
    from master_controller.vault import Vault

    settings = get_settings()
    with reported():
        name = parse(upstream).name
        known = {u.name for u in configured(settings)}
        if name not in known:
            raise ConfigError(f"{name} is not among the configured upstreams")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("password", hide_input=True)
    database = Database(settings.database)

    async def go() -> None:
        try:
            store = CredentialStore(database, Vault.open(settings))
            await store.seal_upstream_login(name, username, password)
        finally:
            await database.close()

    with reported():
        database.migrate()
        asyncio.run(go())
    console.print(f"the login of {name} is sealed in the vault")


def _backup_secret(key_file: Path | None, passphrase_stdin: bool, confirm: bool) -> bytes:
    """The operator's backup secret: a key file (0600), one line on stdin, or asked for;
    never an argument (arguments show in process lists and shell history)."""
    from master_controller.backup import check_secret, read_key_file

    if key_file is not None and passphrase_stdin:
        raise ConfigError("give --key-file or --passphrase-stdin, not both")
    if key_file is not None:
        return read_key_file(key_file)
    if passphrase_stdin:
        line = sys.stdin.readline().rstrip("\n")
    else:
        line = typer.prompt("backup passphrase", hide_input=True, confirmation_prompt=confirm)
    return check_secret(line.encode(), "the passphrase")


KEY_FILE_HELP = "File holding the backup secret (0600; e.g. 32 random bytes, base64)."
STDIN_HELP = "Read a passphrase from standard input (one line) instead of asking."


@app.command("backup")
def backup_command(
    path: Path = typer.Argument(..., help="The archive to write (must not exist)."),
    key_file: Path | None = typer.Option(None, "--key-file", help=KEY_FILE_HELP),
    passphrase_stdin: bool = typer.Option(False, "--passphrase-stdin", help=STDIN_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Write the database, the vault's keys, the signing key and the settings file to one
    encrypted archive (0600). Images are not in it: they rebuild from their recipes. Safe
    while the controller runs."""
    from master_controller.backup import backup
    from master_controller.settings import config_path

    settings = get_settings()
    with reported():
        secret = _backup_secret(key_file, passphrase_stdin, confirm=True)
        summary = asyncio.run(backup(settings, path, secret, config_path()))
    if as_json:
        _print_json(summary.as_dict())
        return
    console.print(
        f"backup written to {path}: {summary.bytes} bytes, {summary.credentials} credentials, "
        f"{sum(summary.rows.values())} rows in {summary.seconds:.2f}s"
    )
    for note in summary.notes:
        console.print(f"  note: {note}")


@app.command("restore")
def restore_command(
    path: Path = typer.Argument(..., help="An archive `master-controller backup` wrote."),
    key_file: Path | None = typer.Option(None, "--key-file", help=KEY_FILE_HELP),
    passphrase_stdin: bool = typer.Option(False, "--passphrase-stdin", help=STDIN_HELP),
    force: bool = typer.Option(
        False, "--force", help="Replace the database and keys of an existing installation."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Put a backup back on this host: settings file (if none is here), database, vault
    keys, signing key. Refuses an existing installation unless --force, and a wrong key or
    an altered archive before changing anything."""
    from master_controller.backup import open_archive, restore, restored_config, target_settings
    from master_controller.settings import config_path

    with reported():
        secret = _backup_secret(key_file, passphrase_stdin, confirm=False)
        contents = open_archive(path, secret)
        settings = target_settings(config_path(), contents)
        summary = restore(settings, contents, force=force)
        note = restored_config(config_path(), contents)
    summary.path = str(path)
    if note:
        summary.notes.insert(0, note)
    if as_json:
        _print_json(summary.as_dict())
        return
    console.print(
        f"restored {summary.credentials} credentials ({summary.opened} decrypt), "
        f"{summary.upstream_logins} upstream logins, {sum(summary.rows.values())} rows "
        f"into {settings.data_dir} in {summary.seconds:.2f}s"
    )
    for line in summary.notes:
        console.print(f"  note: {line}")
