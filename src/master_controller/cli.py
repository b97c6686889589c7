"""The command line: ``master-controller image ... | doctor``."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from master_controller.errors import MCError
from master_controller.images.builder import ImageBuilder, prune_layers
from master_controller.images.recipe import Recipe
from master_controller.images.store import ImageStore
from master_controller.images.verify import Verifier
from master_controller.runtimes import RUNTIMES, get_runtime, probe_all
from master_controller.runtimes.base import Runtime
from master_controller.settings import Settings, get_settings
from master_controller.steps import StepLog

app = typer.Typer(help="master-controller: disposable sign-in browsers", no_args_is_help=True)
image_app = typer.Typer(help="Build, verify and promote golden images.", no_args_is_help=True)
app.add_typer(image_app, name="image")

console = Console()
err_console = Console(stderr=True)


def _fail(exc: MCError) -> None:
    err_console.print(f"[red]error:[/] {exc.reason}")
    raise typer.Exit(code=1)


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
    try:
        result = ImageBuilder(settings, steps).build(
            Recipe.load(recipe or settings.recipe), refresh_base=refresh
        )
    except MCError as exc:
        _fail(exc)
        return
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
    try:
        if vm:
            get_runtime("qemu", settings)
        runtime = None if static_only else get_runtime("container", settings)
        result = asyncio.run(Verifier(settings, runtime, steps).verify(image, boot=not static_only))
    except MCError as exc:
        _fail(exc)
        return
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
    try:
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
    except MCError as exc:
        _fail(exc)
        return
    console.print(f"current image: [bold]{built.image_id}[/] (built, verified, promoted)")


@image_app.command("promote")
def image_promote(image: str = typer.Argument(..., help="Image id or unique prefix.")) -> None:
    """Make IMAGE current; refused unless that exact image passed verification."""
    try:
        image_id = ImageStore(get_settings().images_dir).promote(image)
    except MCError as exc:
        _fail(exc)
        return
    console.print(f"image [bold]{image_id}[/] is now current")


@image_app.command("rollback")
def image_rollback() -> None:
    """Return to the image promoted before the current one."""
    try:
        image_id = ImageStore(get_settings().images_dir).rollback()
    except MCError as exc:
        _fail(exc)
        return
    console.print(f"rolled back: image [bold]{image_id}[/] is current again")


@image_app.command("gc")
def image_gc(
    keep: int | None = typer.Option(None, help="Promoted images to keep besides current."),
) -> None:
    """Delete images that are not current, not among the last KEEP promoted, not in use."""
    settings = get_settings()
    in_use = {g.image_id for rt in _all_runtimes(settings) for g in rt.guests()}
    try:
        removed = ImageStore(settings.images_dir).gc(
            settings.images_keep if keep is None else keep, in_use
        )
        layers = prune_layers(settings)
    except MCError as exc:
        _fail(exc)
        return
    console.print(f"removed {len(removed)} image(s)" + "".join(f"\n  {i}" for i in removed))
    if layers:
        console.print(f"removed {len(layers)} cached base layer(s) no image uses")


@image_app.command("show")
def image_show(image: str = typer.Argument("current")) -> None:
    """An image's manifest and verification result, as JSON."""
    try:
        info = ImageStore(get_settings().images_dir).get(image)
    except MCError as exc:
        _fail(exc)
        return
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
    chosen = next((name for name, r in probes.items() if r.usable), None)
    store = ImageStore(settings.images_dir)
    report = {
        "dataDir": str(settings.data_dir),
        "runtimes": {n: {"usable": r.usable, "reason": r.reason} for n, r in probes.items()},
        "chosenRuntime": chosen,
        "currentImage": store.current(),
        "images": len(store.ids()),
    }
    if as_json:
        _print_json(report)
        return
    table = Table("runtime", "usable", "why")
    for name, result in probes.items():
        mark = "[green]yes[/]" if result.usable else "[red]no[/]"
        table.add_row(name + (" (chosen)" if name == chosen else ""), mark, result.reason)
    console.print(table)
    console.print(f"data dir: {settings.data_dir}")
    console.print(f"current image: {report['currentImage'] or 'none (run `image build`)'}")


def _all_runtimes(settings: Settings) -> list[Runtime]:
    return [cls(settings) for cls in RUNTIMES.values()]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
