"""Small pieces the commands share: parameter types, console, progress."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from click.shell_completion import CompletionItem
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import merging

console = Console()
err_console = Console(stderr=True)


def complete_path(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Let the shell complete a file or folder (inputs also take ``name=path`` and Hub ids)."""
    return [CompletionItem(incomplete, type="file")]


def complete_strategy(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Strategy names; after a comma, the next one of a comma-separated list (``cat,sv`` → ``cat,svd``)."""
    done, _, last = incomplete.rpartition(",")
    head = f"{done}," if done else ""
    names = merging.strategy_names()
    names = [*names, "all"] if param.name == "names" and not done else names
    return [CompletionItem(head + n) for n in names if n.startswith(last)]


class FloatList(click.ParamType):
    """A comma-separated list of floats, e.g. ``1,0.5,-0.25``."""

    name = "floats"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)


@contextmanager
def telling_replaced(out: Console = console) -> Iterator[None]:
    """Run writes; then say, for each existing output they replaced, which old files went and which stayed."""
    with merging.replaced_outputs() as changes:
        yield
    for c in changes:
        if Path(c.out).is_file():
            out.print(f"replaced the previous {c.out}", highlight=False, soft_wrap=True)
            continue
        what = [f"replaced {', '.join(c.replaced) or 'nothing'}"]
        what += [f"removed {', '.join(c.removed)} (written by an earlier run)"] if c.removed else []
        what += [f"kept {', '.join(c.kept)}"] if c.kept else []
        out.print(f"{c.out}: " + "; ".join(what), highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(description: str) -> Iterator:
    """A rich progress bar on stderr (elapsed, and the time left once steps are done); yields a
    library-style callback progress(done, total, item). Off a terminal there is nothing to redraw (a transient
    bar would leave only an empty line), so stderr keeps only the command's own lines."""
    if not err_console.is_terminal:
        yield lambda done, total, item: None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), TextColumn("[dim]{task.fields[item]}"),
        console=err_console, transient=True,
    )  # fmt: skip
    task = bar.add_task(description, total=None, item="")

    def update(done: int, total: int, item: str) -> None:
        bar.update(task, completed=done, total=total, item=item)

    bar.start()
    try:
        yield update
    finally:
        bar.stop()
