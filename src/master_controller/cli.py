"""The command line: ``master-controller image ... | doctor``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from master_controller.errors import MCError
from master_controller.images.builder import ImageBuilder
from master_controller.images.recipe import Recipe
from master_controller.images.store import ImageStore
from master_controller.settings import get_settings
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


@image_app.command("list")
def image_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Images in the store, with verification status and which is current."""
    store = ImageStore(get_settings().images_dir)
    current = store.current()
    rows = [
        {
            "id": info.id,
            "name": info.manifest.get("name"),
            "created": info.created,
            "sizeBytes": info.size_bytes,
            "verification": info.verification_status,
            "current": info.id == current,
        }
        for info in store.list()
    ]
    if as_json:
        _print_json(rows)
        return
    table = Table("id", "name", "created", "size", "verification", "current")
    for row in rows:
        table.add_row(
            row["id"],
            str(row["name"]),
            row["created"],
            f"{row['sizeBytes'] / 2**30:.2f} GiB",
            row["verification"],
            "*" if row["current"] else "",
        )
    console.print(table)


def main() -> None:
    app()
