"""The house's shape, read from the source: imports point one way, no circle, files short enough to read.

Layers, lowest first: errors; core, storage; base, formats, strategies; merge, runtime; eval, export; the
public API (merging/__init__.py); cli. Every import counts, the ones inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"errors": 0, "version": 0, "core": 1, "storage": 1, "base": 2, "formats": 2, "strategies": 2,
          "merge": 3, "runtime": 3, "eval": 4, "export": 4, "api": 5}  # fmt: skip
API, CLI = 5, 6  # merging/__init__.py and merging/api/ (its implementation) are one layer
MAX_LINES = 400
# Files other helpers are splitting on their branches (issue 31 item 3); remove each as its split lands.
KNOWN_LONG: set[str] = set()


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for merging/ and cli/ (cli installs as merging_cli)."""
    out = {}
    for top, name in (("merging", "merging"), ("cli", "merging_cli")):
        for f in sorted((ROOT / top).rglob("*.py")):
            parts = list(f.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([name, *parts])] = f
    return out


def _imports(mod: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ours that ``mod`` imports (relative imports resolved; a name imported from a package
    that is a submodule counts as that submodule)."""
    package = mod if file.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    tree = ast.parse(file.read_text(), str(file))
    guarded = [b for b in ast.walk(tree) if isinstance(b, ast.If) and _type_checking(b.test)]
    typing_only = {id(n) for b in guarded for stmt in b.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
            found |= subs or {base}
    return {m for m in found if m in known and m != mod}


def _type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _layer(mod: str) -> int:
    parts = mod.split(".")
    if parts[0] == "merging_cli":
        return CLI
    if len(parts) == 1:
        return API
    return LAYERS[parts[1]]


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imports(m, f, known) for m, f in known.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as a path that returns to its start, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_every_package_has_a_layer():
    unknown = {p.name for p in (ROOT / "merging").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert unknown - set(LAYERS) == set()


def test_no_import_runs_back_up_a_layer():
    upward = sorted(f"{m} (layer {_layer(m)}) imports {n} (layer {_layer(n)})"
                    for m, deps in _graph().items() for n in deps if _layer(n) > _layer(m))  # fmt: skip
    assert upward == []


def test_no_import_circle():
    assert _cycle(_graph()) is None


def test_the_checks_see_a_circle_and_an_upward_import():
    """The checks themselves: a made-up graph with a circle, and the layer of an API and a CLI module."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert _layer("merging.core.deltas") < _layer("merging.base.layout") < _layer("merging.runtime.fold")
    assert _layer("merging.eval.verify") < _layer("merging") < _layer("merging_cli.main")
    graph = _graph()
    assert "merging.runtime.stacked" in graph["merging.eval.judge"]  # an import inside a function is seen too
    assert "merging.storage.atomic" in graph["merging.storage.files"]


def test_no_file_over_400_lines():
    lengths = {str(f.relative_to(ROOT)): len(f.read_text().splitlines()) for f in _modules().values()}
    long = sorted(f"{f}: {n} lines" for f, n in lengths.items() if n > MAX_LINES and f not in KNOWN_LONG)
    stale = sorted(f for f in KNOWN_LONG if lengths.get(f, 0) <= MAX_LINES)
    assert long == [], "split these files"
    assert stale == [], "these are short now (or gone): remove them from KNOWN_LONG"


def test_one_progress_type():
    """The progress callback is declared once (core/progress.py) and imported everywhere else."""
    starts = ("Progress =", "Progress: TypeAlias", "class Progress")
    files = (ROOT / "merging").rglob("*.py")
    declared = sorted(str(f.relative_to(ROOT)) for f in files if any(
        line.startswith(starts) for line in f.read_text().splitlines()))  # fmt: skip
    assert declared == ["merging/core/progress.py"]
