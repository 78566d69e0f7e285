"""Publishing a merged adapter to the Hub: a model card that records the recipe and the verification.

The card's front matter carries ``base_model``, ``library_name: peft``, ``tags`` (the adapter types and
``merging``) and the inputs' ``license`` where known; its body lists the inputs with their resolved
revisions, the weights, the strategy and its options, and the verification table when one is present.
Uploads go through huggingface_hub: ``create_repo(exist_ok=True)`` then one ``create_commit``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from merging.errors import MergingError, SourceError
from merging.eval.results import Report
from merging.formats import peft, sources, stack_folder
from merging.merge import serving
from merging.merge.recipe import HubSource, Input, Recipe

VERIFY_FILE = "verify_report.json"


@dataclass(frozen=True)
class Plan:
    """What a publish sends: the card and the files with their sizes."""

    repo: str
    card: str
    files: list[tuple[str, int]]


def _verification(path: Path | None) -> Report | None:
    if path is None or not Path(path).is_file():
        return None
    try:
        return Report.from_json(Path(path).read_text())
    except MergingError as e:
        raise MergingError(f"{path}: {e}") from None


def hub_id(name: str | None) -> str | None:
    """The name when it is a Hub repo id (user/name, not a local path), else None."""
    if not name or Path(name).expanduser().exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return None
    return name


def _front_matter(
    adapters, inputs: Sequence[Input], base_model: str | None = None
) -> tuple[str, str | None]:  # fmt: skip
    from huggingface_hub import ModelCardData

    names = [base_model, *(a.base_model for a in adapters), *(i.base_model for i in inputs)]
    base = next((b for b in map(hub_id, names) if b), None)  # the Hub links a card to a repo id only
    kinds = sorted({k for a in adapters for k in a.kinds} | {k for i in inputs for k in i.kinds})
    licenses = {i.hub.license for i in inputs if i.hub} - {None}
    data = ModelCardData(
        base_model=base, library_name="peft", tags=sorted({"merging", "peft", *kinds}),
        license=licenses.pop() if len(licenses) == 1 else None,
    )  # fmt: skip
    return data.to_yaml(), base


def _recipe_lines(recipe: Recipe) -> list[str]:
    lines = ["## Recipe", "", "| input | source | revision | kinds | weight |", "|---|---|---|---|---|"]
    for i in recipe.inputs:
        hub = i.hub or HubSource("")
        src = (hub.repo or i.path or "") + (f":{hub.subfolder}" if hub.subfolder else "")
        rev = hub.revision or i.revision
        rev = f"`{rev}`" if rev else "—"
        lines.append(f"| {i.name} | `{src}` | {rev} | {', '.join(i.kinds)} | {i.weight:g} |")
    opts = {k: v for k, v in asdict(recipe.options).items() if v is not None and k in _options_read(recipe)}
    used = f", options `{json.dumps(opts, sort_keys=True)}`" if opts else " (no options)"
    lines += ["", f"Strategy: `{recipe.strategy}`{used}.", ""]
    if recipe.additive_strategy and recipe.ia3_strategy:
        lines += [
            f"Additive deltas: `{recipe.additive_strategy}`; IA³ vectors: `{recipe.ia3_strategy}`.",
            "Load the `ia3` adapter first and the `lora` adapter on top of it "
            f"(see `{stack_folder.STACK_FILE}`).",
            "",
        ]
    return lines


def _options_read(recipe: Recipe) -> set[str]:
    """The options the recipe's strategies read (all of them for a strategy that does not say)."""
    from merging import strategies

    read: set[str] = set()
    for name in {recipe.strategy, recipe.additive_strategy, recipe.ia3_strategy} - {None}:
        declared = strategies.get(name).options_read if name in strategies.names() else None
        read |= set(declared) if declared is not None else set(asdict(recipe.options))
    return read


def _verification_lines(report: Report) -> list[str]:
    lines = [
        "## Verification",
        "",
        f"On `{report.base}` ({report.device}, {report.dtype}): merged outputs against the inputs stacked "
        "active at once.",
        "",
    ]
    lines += [
        "| candidate | effect-relative error | KL | top-1 agreement | result |",
        "|---|---|---|---|---|",
    ]
    for r in report.rows:
        kl = "" if r.kl is None else f"{r.kl:.2e}"
        top1 = "" if r.top1_agreement is None else f"{r.top1_agreement:.1%}"
        lines.append(f"| {r.strategy or r.name} | {r.effect_rel_error:.2e} | {kl} | {top1} | {r.verdict} |")
    return [*lines, ""]


def model_card(folder: Path, verification: Path | None = None, base_model: str | None = None) -> str:
    """The README.md model card for a merged adapter folder (refused when it is not a loadable adapter).

    ``base_model`` names the base's Hub id when the inputs name only a local folder.
    """
    if base_model is not None and hub_id(base_model) is None:
        raise SourceError(f"`base_model` {base_model!r}: give the base's Hub id, user/name")
    adapters = sources.load(folder)
    recipe = Recipe.read(folder)
    inputs = recipe.inputs if recipe else ()
    yaml, base = _front_matter(adapters, inputs, base_model)
    on = f" on `{base}`" if base else " (base model: a local folder; publish with --base-model to link it)"
    lines = [
        "---",
        yaml.strip(),
        "---",
        "",
        f"# Merged adapter ({recipe.strategy if recipe else 'unknown strategy'})",
        "",
    ]
    lines += [f"Made with [merging](https://pypi.org/project/merging/) from {len(inputs)} adapters{on}.", ""]
    if recipe and inputs:
        lines += _recipe_lines(recipe)
    report = _verification(verification or folder / VERIFY_FILE)
    if report:
        lines += _verification_lines(report)
    lines += ["## Serving", "", *(f"- {line}" for line in serving.of(adapters).lines()), ""]
    return "\n".join(lines)


def _check_repo(repo: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise SourceError(f"`repo` {repo!r}: {e}") from None
    if "/" not in repo:
        raise SourceError(f"`repo` {repo!r}: give it as user/name")


def plan(folder: Path, repo: str, verification: Path | None = None, base_model: str | None = None) -> Plan:
    """The card and the file list a publish would send (nothing is sent)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"{folder}: not a folder")
    _check_repo(repo)
    card = model_card(folder, verification, base_model)
    files = sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    files = [f for f in files if f[0] != "README.md"] + [("README.md", len(card.encode()))]
    return Plan(repo, card, files)


def _remote_files(api, repo: str, revision: str | None) -> tuple[list[str], set[str]]:
    """The files at the revision being published over, and the top-level names a merged adapter owns there
    (its files, recipe, verify report, a stack manifest and the adapters it names)."""
    from huggingface_hub import errors as hf_errors

    try:
        files = api.list_repo_files(repo, revision=revision)
    except hf_errors.RevisionNotFoundError:
        return [], set()
    owned = set(peft.OWNED)
    if stack_folder.STACK_FILE in files:
        try:
            path = api.hf_hub_download(repo, stack_folder.STACK_FILE, revision=revision)
        except (OSError, ValueError, hf_errors.HfHubHTTPError):
            return files, owned
        owned |= set(stack_folder.members(Path(path)))
    return files, owned


def _operations(folder: Path, card: str, remote: list[str], owned: set[str]) -> list:
    """One commit: every file of the folder, the card as README.md, and deletions of the files a previous
    publish wrote there that this one does not send; the repo's other files stay."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops = [
        CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (rel := p.relative_to(folder).as_posix()) != "README.md"
    ]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    sent = {op.path_in_repo for op in ops}
    stale = [f for f in remote if f.split("/")[0] in owned and f not in sent]
    return ops + [CommitOperationDelete(path_in_repo=f) for f in stale]


def publish(
    folder: Path,
    repo: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    verification: Path | None = None,
    token: str | None = None,
    base_model: str | None = None,
) -> str:
    """Create the repo if needed and send the folder with its model card as one commit; return its URL.

    Nothing is staged on disk: the card goes from memory. Files the repo holds besides the adapter's own are
    kept; one commit means an interrupted upload leaves the previous revision whole.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    the_plan = plan(folder, repo, verification, base_model)
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        remote, owned = _remote_files(api, repo, revision)
        ops = _operations(Path(folder), the_plan.card, remote, owned)
        info = api.create_commit(
            repo_id=repo, revision=revision, operations=ops,
            commit_message=message or f"Upload merged adapter ({len(the_plan.files)} files)",
        )  # fmt: skip
    except hf_errors.HfHubHTTPError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"publishing to {repo} failed: {first}") from None
    return str(info.commit_url) if hasattr(info, "commit_url") else str(info)
