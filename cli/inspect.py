"""`merging inspect PATH`: what a checkpoint folder or file holds, summarised by module kind."""

from __future__ import annotations

from typing import Any

import click

import merging

from .common import complete_path
from .tables import Col, Grid, count, emit_json, num, ranges, say, show, span


def config_text(value: Any, full: bool = False, width: int = 120) -> str:
    """A config value on one line; a long list or pattern dict (a merged folder names every module) as its
    count, kinds (the modules' last names) and value range, unless ``full`` (--modules; --json has it all)."""
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    if full or len(text) <= width or not isinstance(value, list | dict):
        return text
    names = sorted({str(k).rsplit(".", 1)[-1] for k in value})
    kinds = ", ".join(names[:6]) + (f", +{len(names) - 6} more" if len(names) > 6 else "")
    nums = [v for v in value.values() if isinstance(v, int | float)] if isinstance(value, dict) else []
    span = f", values {min(nums):g}–{max(nums):g}" if nums and len(nums) == len(value) else ""
    return f"{len(value)} {'modules' if isinstance(value, dict) else 'entries'} ({kinds}){span}"


def stem(patterns: list[str]) -> str:
    """The start the layered kinds share up to their index (``model.layers.*.``), said once in the title."""
    layered = [p.split(".") for p in patterns if "*" in p.split(".")]
    heads = {tuple(parts[: parts.index("*") + 1]) for parts in layered}
    if len(heads) != 1:
        return ""
    head = heads.pop()
    return ".".join(head) + "." if all(len(parts) > len(head) for parts in layered) else ""


def kind_rows(ks: list[dict[str, Any]], prefix: str = "") -> list[list[str]]:
    """The summary table's cells: the kind without ``prefix``, layers as ranges, spans, compact counts."""
    rows = []
    for k in ks:
        experts = k.get("experts") or []
        layers = _layers(k["layers"], k["modules"] // max(1, len(experts)))
        if experts:
            layers += f" × experts {ranges(experts)}"
        spans = [span(k["rank"], str), span(k["scale"]), span(k["norm"])]
        rows.append([k["kind"].removeprefix(prefix), layers, k["delta"], *spans, count(k["params"])])
    return rows


def _layers(layers: list[int], modules: int) -> str:
    """Layer indices as ranges when each module has one, else how many modules."""
    return ranges(layers) if len(layers) == modules else f"{modules} module" + "s" * (modules > 1)


def module_rows(mods: list[dict[str, Any]]) -> list[list[str]]:
    """The per-module table's cells."""
    return [[m["module"], m["delta"], m["shape"], "" if m["rank"] is None else str(m["rank"]),
             num(m["scale"]), "needs base" if m["norm"] is None and m["delta"] == "dora" else num(m["norm"]),
             count(m["params"])] for m in mods]  # fmt: skip


@click.command("inspect")
@click.argument("spec", shell_complete=complete_path)
@click.option("--modules", "glob", is_flag=False, flag_value="*", default=None, metavar="[GLOB]",
              help="Per-module rows (all, or those matching GLOB, e.g. '*.q_proj', 'model.layers.1?.*').")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (schema merging.inspect/1).")
def inspect_cmd(spec: str, glob: str | None, as_json: bool) -> None:
    """Summarise a checkpoint: an adapter's module kinds, totals and config, or a tensor file's modules.

    Example: merging inspect examples/adapters/add --modules '*.q_proj'
    """
    doc = merging.inspect(spec, modules=glob)
    if as_json:
        return emit_json("merging.inspect/1", doc)
    if doc["kind"] == "tensors":
        return _show_tensors(doc, glob)
    for ad in doc["adapters"]:
        _show_adapter(spec, ad, glob)


def _show_adapter(spec: str, doc: dict[str, Any], glob: str | None) -> None:
    config = doc["config"]
    rev = f" @ {config['base_revision']}" if config["base_revision"] else ""
    ks = doc["kinds"]
    cols = (Col("module kind"), Col("layers"), Col("delta"), Col("rank", True), Col("scale", True),
            Col("‖ΔW‖", True), Col("params", True))  # fmt: skip
    prefix = stem([k["kind"] for k in ks])
    title = f"{spec}{rev}: {', '.join(doc['delta_kinds'])} on {config['base_model'] or 'an unknown base'}"
    title += f"; layer modules are {prefix}KIND" if prefix else ""
    show(Grid(title, cols, kind_rows(ks, prefix)))
    params = doc["params"]
    say(f"{doc['modules']} modules in {len(ks)} kinds, {params:,} parameters ({count(params)}), "
        f"{doc['bytes'] / 2**20:.2f} MiB on disk")  # fmt: skip
    for key, value in config.items():
        if value is not None:
            say(f"{key}: {config_text(value, full=glob is not None)}")
    for line in doc["serving"]:
        say(line)
    if glob is None:
        say("per module: --modules (all) or --modules GLOB, e.g. --modules '*.q_proj'")
        return
    rows = doc["module_rows"]
    mcols = (Col("module"), Col("delta"), Col("shape", True), Col("rank", True), Col("scale", True),
             Col("‖ΔW‖", True), Col("params", True))  # fmt: skip
    show(Grid(f"{len(rows)} modules matching {glob!r}", mcols, module_rows(rows)))


def _show_tensors(doc: dict[str, Any], glob: str | None) -> None:
    """A tensor file's modules by kind (tensors, shapes, dtypes); with --modules, per module."""
    kinds_ = doc["kinds"]
    prefix = stem([k["kind"] for k in kinds_])
    title = doc["path"] + (f"; layer modules are {prefix}KIND" if prefix else "")
    cells = [[k["kind"].removeprefix(prefix), _layers(k["layers"], k["modules"]), ", ".join(k["tensors"]),
              ", ".join(k["shapes"]), ", ".join(k["dtypes"]), count(k["params"])]
             for k in kinds_]  # fmt: skip
    cols = (Col("module kind"), Col("layers"), Col("tensors"), Col("shapes"), Col("dtype"),
            Col("params", True))  # fmt: skip
    show(Grid(title, cols, cells))
    say(f"{doc['modules']} modules in {len(kinds_)} kinds, {doc['tensors']} tensors, {doc['params']:,} "
        f"parameters, {doc['bytes'] / 2**20:.1f} MiB in {doc['files']} file(s)")  # fmt: skip
    if doc["adapter_without_config"]:
        say("these look like adapter tensors, but there is no adapter_config.json: the adapter type, its "
            "scale (alpha / r) and its targets are unknown without it")  # fmt: skip
    if glob is None:
        say("per module: --modules (all) or --modules GLOB, e.g. --modules '*.q_proj'")
        return
    cells = [[r["module"], ", ".join(r["tensors"]), ", ".join("×".join(map(str, s)) for s in r["shapes"]),
              ", ".join(r["dtypes"]), count(r["params"])] for r in doc["module_rows"]]  # fmt: skip
    cols = (Col("module"), Col("tensors"), Col("shapes"), Col("dtype"), Col("params", True))
    show(Grid(f"{len(cells)} modules matching {glob!r}", cols, cells))
