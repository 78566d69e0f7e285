"""`merging publish`: upload a merged adapter to the Hub with a model card."""

from __future__ import annotations

import sys
from pathlib import Path

import click

import merging

from .common import console
from .tables import Col, Grid, show


def run_publish(folder: Path, repo: str, *, private=False, revision=None, message=None, verification=None,
                dry_run=False, base_model=None, out=console) -> None:  # fmt: skip
    """Shared by `publish` and `merge --push-to-hub`."""
    if dry_run:
        plan = merging.publish_plan(folder, repo, verification=verification, base_model=base_model)
        click.echo(f"--- README.md ({len(plan.card.encode()):,} bytes) ---")
        click.echo(plan.card, nl=not plan.card.endswith("\n"))  # the exact bytes that would be uploaded
        click.echo("--- end of README.md ---")
        title = f"would upload to {repo}" + (f"@{revision}" if revision else "")
        rows = [[name, f"{size:,}"] for name, size in plan.files]
        show(Grid(title, (Col("file"), Col("bytes", True)), rows))
        console.print("dry run: nothing was sent")
        return
    if sys.stderr.isatty():  # large files take a while: huggingface_hub's upload bars, on a terminal only
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
    url = merging.publish(folder, repo, private=private, revision=revision, message=message,
                          verification=verification, base_model=base_model)  # fmt: skip
    out.print(f"published {folder} to {repo}: {url}", highlight=False, soft_wrap=True)


@click.command("publish")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--repo", required=True, help="The Hub repo id, user/name.")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", help="Upload to this branch (created if missing).")
@click.option("--message", help="The commit message.")
@click.option("--verification", type=click.Path(exists=True, path_type=Path),
              help="A `verify --save` report for the card (default: FOLDER/verify_report.json).")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Print the card and the file list; send nothing.")
@click.option("--base-model", help="The base's Hub id for the card (when the inputs name a local folder).")
def publish_cmd(folder, repo, private, revision, message, verification, dry_run, base_model) -> None:
    """Upload a merged adapter folder to the Hub with a model card recording its recipe.

    Example: merging publish merged/ --repo you/merged-adapter --dry-run
    """
    run_publish(folder, repo, private=private, revision=revision, message=message, verification=verification,
                dry_run=dry_run, base_model=base_model)  # fmt: skip
