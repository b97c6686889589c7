"""The ``install`` and ``deploy`` commands (registered on the main CLI by cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from typer import _click as click  # the click typer's groups are typed with
from typer.core import TyperGroup

from master_controller.errors import MCError
from master_controller.ops import install as installing
from master_controller.ops.deploy import Deployer, default_repo
from master_controller.ops.health import GATES
from master_controller.ops.releases import Releases
from master_controller.settings import get_settings
from master_controller.steps import StepLog


class _RefOrCommand(TyperGroup):
    """``deploy REF`` besides ``deploy list`` and ``deploy rollback``: a first word that is
    no sub-command is the ref."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            return "ref", self.commands["ref"], args
        return super().resolve_command(ctx, args)


deploy_app = typer.Typer(
    cls=_RefOrCommand,
    no_args_is_help=True,
    help="Deploy a release from git: `deploy REF [--repo URL-or-path]`, `deploy list`, "
    "`deploy rollback`.",
)


def _fail(exc: MCError) -> None:
    typer.echo(f"error: {exc.reason}", err=True)
    raise typer.Exit(code=1) from exc


def install(
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Show what would change; change nothing."
    ),
    root: Path = typer.Option(
        Path("/"), help="Write into this directory instead of the host (for packaging)."
    ),
) -> None:
    """Put the systemd unit and an example config in place (idempotent; an existing config
    is never overwritten), and enable the unit where systemd runs."""
    settings = get_settings()
    try:
        changes = installing.plan(settings, root) if dry_run else installing.apply(settings, root)
    except MCError as exc:
        _fail(exc)
        return
    prefix = "would " if dry_run else ""
    for change in changes:
        if change.writes or dry_run:
            typer.echo(prefix + change.describe())
    if not any(c.writes for c in changes):
        typer.echo("nothing to change")
    elif installing.systemd_running(root):
        typer.echo(prefix + "run systemctl daemon-reload; systemctl enable master-controller")


@deploy_app.command("ref", hidden=True)
def deploy_ref(
    ref: str = typer.Argument(..., help="A branch, tag or commit."),
    repo: str | None = typer.Option(
        None, help="Repository URL or path (default: the last deploy's, else this checkout)."
    ),
    gate: str = typer.Option(
        "session", help=f"Health gate: {' or '.join(GATES)} (liveness: /health only)."
    ),
    wheels: Path | None = typer.Option(
        None, help="Install the release's Python packages from this wheelhouse only."
    ),
) -> None:
    """Deploy REF: check out, build, migrate, verify, switch, restart, gate; roll back on
    failure."""
    if gate not in GATES:
        typer.echo(f"error: --gate is one of {', '.join(GATES)}", err=True)
        raise typer.Exit(code=2)
    settings = get_settings()
    deployer = Deployer(settings, StepLog.for_stream(sys.stderr), gate_kind=gate, wheels=wheels)
    try:
        done: dict[str, Any] = deployer.deploy(ref, repo or default_repo(settings))
    except MCError as exc:
        _fail(exc)
        return
    typer.echo(f"release {done['commit']} is current (was {done['previous']})")


@deploy_app.command("list")
def deploy_list() -> None:
    """Releases on this host, the most recently deployed last; * marks the current one."""
    for release in Releases(get_settings().deploy_dir).releases():
        mark = "*" if release.current else " "
        state = "" if release.complete else " (unfinished)"
        when = release.deployed[-1] if release.deployed else "never current"
        typer.echo(f"{mark} {release.commit} {release.ref or '-'} {when}{state}")


@deploy_app.command("rollback")
def deploy_rollback(
    gate: str = typer.Option("session", help=f"Health gate: {' or '.join(GATES)}."),
) -> None:
    """Go back to the release that was current before this one (health-gated)."""
    settings = get_settings()
    deployer = Deployer(settings, StepLog.for_stream(sys.stderr), gate_kind=gate)
    try:
        commit = deployer.rollback()
    except MCError as exc:
        _fail(exc)
        return
    typer.echo(f"release {commit} is current again")
