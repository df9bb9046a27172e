"""The `synthgen` command: parsing and printing only; every command calls the library API.

Each section below belongs to one stage of the pipeline
(taxonomy -> data -> train -> generate -> filter -> compose -> detect -> benchmark).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
console = Console()


def _fail(err: Exception) -> None:
    """Print a library error as one red line and exit 1 (no traceback for user mistakes)."""
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(1)


# --- taxonomy -------------------------------------------------------------------------------
taxonomy_app = typer.Typer(no_args_is_help=True, help="Inspect and query taxonomy files.")
app.add_typer(taxonomy_app, name="taxonomy")


# --- data -----------------------------------------------------------------------------------
data_app = typer.Typer(no_args_is_help=True, help="Read, check and convert detection datasets.")
app.add_typer(data_app, name="data")


# --- train / generate (diffusion) ------------------------------------------------------------


# --- filter / evaluate-samples / train-judge -------------------------------------------------


# --- augment-dataset (compose) --------------------------------------------------------------


# --- train-detector / detect / benchmark ----------------------------------------------------


if __name__ == "__main__":
    app()
