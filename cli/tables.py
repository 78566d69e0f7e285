"""Tables every command prints: compact numbers, no cut cells at any width, plain text in pipes.

    grid = Grid("verify on base", (Col("candidate"), Col("KL", right=True)), [("m1", sci(6.7e-4))])
    show(grid)   # a terminal: aligned columns, split into parts or one block per row when too narrow
                 # a pipe or a file: the same columns, one line per row, every value whole
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import click
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from .common import console

STYLES = {"PASS": "bold green", "FAIL": "bold red"}  # cells shown in colour on a terminal
SEP = "  "  # between plain columns


# ------------------------------------------------------------------------------------------ numbers


def sci(v: float | None) -> str:
    """An error or a distance in two significant digits: ``6.7e-04``; ``0`` for zero."""
    if v is None:
        return ""
    return "0" if v == 0 else format(v, ".1e")


def pct(v: float | None) -> str:
    """A share: ``100%`` only when whole (``99.9%`` when nearly), ``87.5%``, ``0%`` only when none."""
    if v is None:
        return ""
    if v >= 1:
        return f"{v * 100:.0f}%"
    if v <= 0:
        return "0%"
    return f"{min(max(round(v * 100, 1), 0.1), 99.9):.1f}%"


def signed_pct(v: float | None) -> str:
    """A share that may be negative or above one (skill retention): ``-198%``, ``26%``, ``5.5%``, ``0%``."""
    if v is None:
        return ""
    return f"{v * 100:.0f}%" if abs(v) >= 0.1 or v == 0 else f"{v * 100:.1f}%"


def count(n: int | None) -> str:
    """A parameter or byte count in three digits: ``912``, ``4.6k``, ``276k``, ``1.5M``, ``7.2G``."""
    if n is None:
        return ""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.1f}{unit}" if abs(v) < 9.95 else f"{v:.0f}{unit}"
    return str(n)


def num(v: float | None) -> str:
    """A plain value (a scale, a norm) in two significant digits: ``2``, ``0.67``, ``3.1``, ``1.2e+03``."""
    if v is None:
        return ""
    return format(v, ".2g") if math.isfinite(v) else str(v)


def span(values: Iterable[Any], fmt=num) -> str:
    """``lo–hi`` of the values, or the one value when they agree; empty for none."""
    vs = sorted(v for v in values if v is not None)
    if not vs:
        return ""
    lo, hi = fmt(vs[0]), fmt(vs[-1])
    return lo if lo == hi else f"{lo}–{hi}"


def ranges(ints: Iterable[int]) -> str:
    """Sorted integers as ranges: ``0–29``, ``0–5, 7, 9–11``."""
    out: list[str] = []
    vs = sorted(set(ints))
    i = 0
    while i < len(vs):
        j = i
        while j + 1 < len(vs) and vs[j + 1] == vs[j] + 1:
            j += 1
        out.append(str(vs[i]) if i == j else f"{vs[i]}–{vs[j]}")
        i = j + 1
    return ", ".join(out)


def natural(name: str) -> tuple:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


# ------------------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class Col:
    """A column: its header and whether its values align right (numbers)."""

    name: str
    right: bool = False


@dataclass(frozen=True)
class Grid:
    """A table to show: a title, columns, rows of already formatted cells (the first column names a row)."""

    title: str
    cols: tuple[Col, ...]
    rows: Sequence[Sequence[str]]


def show(grid: Grid, out: Console | None = None) -> None:
    """Print a grid whole: aligned columns, split into parts (or one block per row) when a terminal is too
    narrow for all of them; in a pipe or a file, one line per row however long."""
    out = out or console
    widths = _widths(grid)
    if not out.is_terminal:
        say(plain(grid), out)
        return
    say(Text(grid.title, style="bold"), out)
    parts = fit(widths, out.width)
    if parts is None:
        _blocks(grid, out)
        return
    for n, part in enumerate(parts):
        if n:
            out.print()
        for line in _lines(grid, part, widths, "─"):
            out.print(line, soft_wrap=True, crop=False, highlight=False)


def fit(widths: Sequence[int], width: int) -> list[list[int]] | None:
    """Column indices per part so each line fits ``width`` (the first column in every part); None if not."""
    parts = [[0]]
    for i in range(1, len(widths)):
        if _width([widths[j] for j in [*parts[-1], i]]) <= width:
            parts[-1].append(i)
        elif _width([widths[0], widths[i]]) <= width:
            parts.append([0, i])
        else:
            return None
    return parts if _width([widths[0]]) <= width else None


def _widths(grid: Grid) -> list[int]:
    return [max([cell_len(c.name), *(cell_len(r[i]) for r in grid.rows)]) for i, c in enumerate(grid.cols)]


def _width(widths: Sequence[int]) -> int:
    return sum(widths) + len(SEP) * (len(widths) - 1)


def _cell(value: str) -> Text:
    return Text(value, style=STYLES.get(value, ""))


def _lines(grid: Grid, cols: Sequence[int], widths: Sequence[int], rule: str) -> list[Text]:
    """Header, rule and rows of the chosen columns, padded to the column widths (right for numbers)."""

    def line(cells: Sequence[Text]) -> Text:
        out = Text()
        for n, i in enumerate(cols):
            pad = " " * (widths[i] - cell_len(cells[n].plain))
            out.append(SEP if n else "")
            out.append_text(Text(pad) + cells[n] if grid.cols[i].right else cells[n] + Text(pad))
        out.rstrip()
        return out

    head = line([Text(grid.cols[i].name, style="bold") for i in cols])
    ruled = Text(SEP.join(rule * widths[i] for i in cols), style="dim")
    return [head, ruled, *(line([_cell(row[i]) for i in cols]) for row in grid.rows)]


def _blocks(grid: Grid, out: Console) -> None:
    """One block per row: its name, then ``header: value`` lines (long values fold, never cut)."""
    for row in grid.rows:
        out.print(Text(row[0], style="bold"), overflow="fold")
        for c, v in zip(grid.cols[1:], row[1:], strict=True):
            if v:
                out.print(Text.assemble(f"  {c.name}: ", _cell(v)), overflow="fold")


def plain(grid: Grid) -> str:
    """The grid as plain aligned text (title, header, rule, rows), as a pipe receives it."""
    lines = _lines(grid, range(len(grid.cols)), _widths(grid), "-")
    return "\n".join([grid.title, *(t.plain for t in lines)])


def say(text: str | Text, out: Console | None = None) -> None:
    """Prose: wrapped at words on a terminal, one unbroken line in a pipe (grep finds it whole)."""
    out = out or console
    if out.is_terminal:
        out.print(text, markup=False, highlight=False, overflow="fold")
    else:
        out.print(text, markup=False, highlight=False, soft_wrap=True, crop=False)


def emit_json(schema: str, data: dict[str, Any]) -> None:
    """The one JSON document of a ``--json`` run on stdout: ``{"schema": "merging.<command>/1", ...}``."""
    click.echo(json.dumps({"schema": schema, **data}, indent=2, default=str))
