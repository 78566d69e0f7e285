"""`merging example-base`: prepare the bundled example's base model and print its folder."""

from __future__ import annotations

import click
from rich.console import Console

import merging


@click.command("example-base")
def example_base_cmd() -> None:
    """Download and convert SmolLM2-135M-Instruct once; print the folder.

    Example: merging example-base
    """
    err = Console(stderr=True)
    folder = merging.example_base(progress=lambda msg: err.print(f"[dim]{msg}[/dim]"))
    click.echo(str(folder))
