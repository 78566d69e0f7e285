"""Verification on the real base model: merged adapters against the inputs stacked active at once.

The judge is independent (``judge.py``): PEFT stacks the ORIGINAL input files and loads a merged PEFT
folder as users do; ``merging.runtime`` is the reference only where PEFT cannot stack the inputs, and is
then checked against PEFT on every part PEFT can stack (``Report.reference_checks``).

For each candidate: effect-relative error ‖y_merged − y_stacked‖ / ‖y_stacked − y_base‖ over the
logits (or last hidden states for encoders), max abs difference, mean KL(p_stacked ‖ p_merged), top-1
agreement, greedy continuation agreement, and per-module weight-space error computed from factors.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from merging import formats, strategies
from merging.core import dora
from merging.core.adapter import Adapter, Pair, content_digest, layer_kind, stacks, weighted
from merging.core.deltas import AdditiveDelta, Scale, sum_error, sum_factors
from merging.core.progress import Progress
from merging.errors import UnsupportedError
from merging.eval import judge
from merging.eval.decoding import greedy as _greedy
from merging.eval.decoding import outputs as _outputs
from merging.eval.decoding import outputs_and_greedy
from merging.eval.results import Report, Row
from merging.merge.recipe import Recipe
from merging.runtime.effective import effective_weight
from merging.runtime.fold import evaluated
from merging.runtime.grouped import grouped
from merging.runtime.stacked import stacked

EXACT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Translate to French: I like apples.",
    "What is 17 plus 25?",
    "Once upon a time, in a small village,",
    "List three colours of the rainbow:",
    "The quick brown fox",
]


@dataclass(frozen=True, eq=False)
class Candidate:
    """A merged result to check: its adapters in stacking order, and whether it claims exactness."""

    name: str
    adapters: list[Adapter]
    strategy: str | None = None
    exact: bool = False
    folder: Path | None = None  # where it is on disk: a PEFT folder there is loaded by PEFT itself




@contextmanager
def on_disk(
    candidates: Sequence[Candidate], in_memory: Callable[[Candidate], bool] | None = None
) -> Iterator[list[Candidate]]:
    """Candidates merged in memory, written as PEFT folders in a temporary folder so PEFT loads them as
    users do (one that has no PEFT form, e.g. an IA³ + LoRA pair, stays in memory: our runtime loads it;
    so does one that ``in_memory`` names)."""
    with tempfile.TemporaryDirectory(prefix="merging-verify-") as tmp:
        out = []
        for i, cand in enumerate(candidates):
            if cand.folder is None and len(cand.adapters) == 1 and not (in_memory and in_memory(cand)):
                try:
                    folder = formats.get("peft").write(cand.adapters[0], Path(tmp) / f"candidate{i}")
                    cand = replace(cand, folder=folder)
                except UnsupportedError:
                    pass
            out.append(cand)
        yield out


def batch_inputs(
    tokenizer, prompts: Sequence[str], device: torch.device, vocab: int
) -> dict[str, torch.Tensor]:
    """Tokenised prompts (left-padded), or fixed random ids when the model has no tokenizer."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (len(prompts), 12), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in enc.items()}


def decoder_inputs(config, batch: dict[str, torch.Tensor], length: int = 6) -> dict[str, torch.Tensor]:
    """Fixed decoder ids for an encoder-decoder model (seeded, after its decoder start token)."""
    n, device = batch["input_ids"].shape[0], batch["input_ids"].device
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, config.vocab_size, (n, length), generator=g)
    start = getattr(config, "decoder_start_token_id", None)
    ids[:, 0] = 0 if start is None else start
    return {"decoder_input_ids": ids.to(device), "decoder_attention_mask": torch.ones_like(ids).to(device)}


# ------------------------------------------------------------------------------------------ measuring


def compare_outputs(y_base, y_stack, y_merged, logits: bool) -> dict[str, float | None]:
    """A candidate's outputs against the stack's: error relative to the stack's effect on the base, max |Δ|,
    and with ``logits`` the KL from the stack and the top-1 agreement."""
    effect = float((y_stack - y_base).double().norm())
    diff = float((y_merged - y_stack).double().norm())
    res: dict[str, float | None] = {
        "effect_rel_error": diff / effect if effect > 0 else diff,
        "max_abs_diff": float((y_merged - y_stack).abs().max()),
        "kl": None,
        "top1_agreement": None,
    }
    if logits:
        lp, lq = torch.log_softmax(y_stack.double(), -1), torch.log_softmax(y_merged.double(), -1)
        res["kl"] = float((lp.exp() * (lp - lq)).sum(-1).mean())
        res["top1_agreement"] = float((y_stack.argmax(-1) == y_merged.argmax(-1)).float().mean())
    return res


REFERENCE_FLOATS = 1 << 26  # at most 256 MiB of the stacked inputs' dense weights kept across candidates


def module_errors(
    model, inputs: Sequence[Pair], merged: Sequence[Adapter], reference: dict | None = None
) -> dict[str, float]:
    """Per-module ‖ΔW_merged − ΔW_stack‖_F / ‖ΔW_stack‖_F; from factors when every delta is additive.

    ``reference``: a dict kept across the candidates of one verify run, where the stacked inputs' side
    (their factors, or their dense weight while under REFERENCE_FLOATS in all) is computed once.
    """
    ref, got = stacks(inputs).deltas, stacks(weighted(merged)).deltas
    cache = {} if reference is None else reference
    errors = {}
    for mod in sorted(set(ref) | set(got)):
        r, g = ref.get(mod, []), got.get(mod, [])
        if all(isinstance(d, AdditiveDelta) and not dora.is_dora(d) for d, _ in r + g):
            if r and ("factors", mod) not in cache:
                cache["factors", mod] = sum_factors(r)
            errors[mod] = sum_error(r, g, cache.get(("factors", mod)))
        else:
            m = model.get_submodule(mod)
            kind = layer_kind(m)
            w0 = m.weight.detach().float().cpu()
            w_ref, denom = cache.get(("dense", mod)) or _dense_reference(r, w0, kind)
            kept = cache.get("floats", 0) + w_ref.numel()
            if ("dense", mod) not in cache and kept <= REFERENCE_FLOATS:
                cache["dense", mod], cache["floats"] = (w_ref, denom), kept
            w_got, _ = effective_weight(g, w0, None, kind)
            errors[mod] = float((w_got - w_ref).double().norm()) / denom if denom > 0 else 0.0
    return errors


def _dense_reference(r, w0: torch.Tensor, kind) -> tuple[torch.Tensor, float]:
    """The stacked inputs' effective weight on one module, and ‖W_ref − W0‖_F."""
    w_ref, _ = effective_weight(r, w0, None, kind)
    return w_ref, float((w_ref - w0).double().norm())


def verify(
    model,
    tokenizer,
    inputs: Sequence[Pair],
    candidates: Sequence[Candidate],
    *,
    prompts: Sequence[str] = PROMPTS,
    max_new_tokens: int = 8,
    base_name: str = "",
    progress: Progress | None = None,
    fold_approximate: bool = False,
) -> Report:
    """Run base, stacked inputs and each candidate on the model and compare them.

    Args:
        model: the base model (eval mode); it is left exactly as it was.
        tokenizer: its tokenizer, or None to use fixed random token ids.
        inputs: the source (adapter, weight) pairs in stacking order.
        candidates: the merged results to check.
        prompts: the batch.
        max_new_tokens: length of the greedy continuations compared (0 to skip).
        fold_approximate: run the candidates that claim no exactness through our runtime instead of
            loaded as users load them: stacked, GROUP of them at once, each on its own copy of the batch
            (``grouped``: one pass over the weights serves them all, which is what greedy decoding costs),
            or one at a time folded into the float32 weights where they cannot be grouped
            (``runtime.evaluated``); one whose adapters equal an earlier candidate's (``content_digest``)
            takes that candidate's figures. Exact candidates are always judged as users load them.

    Returns:
        A Report; ``report.failed`` tells whether an exact candidate missed the tolerance.
    """
    pairs = list(inputs)
    device = model.get_input_embeddings().weight.device if hasattr(model, "get_input_embeddings") else None
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tol = EXACT_TOLERANCE[dtype]
    vocab = getattr(model.config, "vocab_size", 100)
    batch = batch_inputs(tokenizer, prompts, device, vocab)
    if getattr(model.config, "is_encoder_decoder", False):
        batch |= decoder_inputs(model.config, batch)
    is_lm = hasattr(model, "generate") and getattr(model, "lm_head", None) is not None
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    steps, done = 2 + len(candidates), 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, steps, what)

    y_base = _outputs(model, batch)
    tick("base")
    with judge.reference(model, pairs) as stacker:
        y_stack = _outputs(model, batch)
        g_stack = _greedy(model, batch, max_new_tokens, pad_id) if is_lm and max_new_tokens else None
    checks = {} if stacker.reference == judge.PEFT else reference_checks(model, batch, pairs, y_base)
    tick("stacked")
    rows, reference = [], {}  # the stacked inputs' side of module_errors, shared by the candidates
    folds = (lambda cand: not cand.exact) if fold_approximate else (lambda cand: False)
    seen: dict[str, Row] = {}  # content digest → the row measured on those very adapters
    digests = [content_digest(c.adapters) if fold_approximate else None for c in candidates]  # hashed once
    fast = {}  # candidate index → its outputs, for the approximate candidates run grouped
    if fold_approximate and (g_stack is None or pad_id is not None):  # (generate pads with pad_id)
        firsts = _first_of_each(candidates, digests)
        n_new = max_new_tokens if g_stack is not None else 0
        cands = [candidates[i].adapters for i in firsts]
        runs = _grouped_outputs(model, batch, cands, n_new, pad_id, y_base)
        fast = {i: run for i, run in zip(firsts, runs, strict=True) if run is not None}
    with on_disk(candidates, folds) as written:
        for i, cand in enumerate(written):
            digest = digests[i]
            if folds(cand) and digest in seen:  # identical adapters act identically: measured once
                same = seen[digest]
                rows.append(replace(same, name=cand.name, strategy=cand.strategy, exact=False, passed=None))
                tick(cand.name)
                continue
            if folds(cand) and i in fast:
                (y_m, g_m), loaded_by = fast[i], GROUPED
            else:
                how = evaluated(model, weighted(cand.adapters)) if folds(cand) else None
                with how or judge.loaded(model, cand.adapters, cand.folder) as loaded_by:
                    y_m = _outputs(model, batch)
                    g_m = _greedy(model, batch, max_new_tokens, pad_id) if g_stack is not None else None
            figures = compare_outputs(y_base, y_stack, y_m, is_lm)
            errs = module_errors(model, pairs, cand.adapters, reference)
            greedy = None if g_m is None else float((g_m == g_stack).float().mean())
            row = Row(
                name=cand.name,
                strategy=cand.strategy,
                exact=cand.exact,
                effect_rel_error=figures["effect_rel_error"],
                max_abs_diff=figures["max_abs_diff"],
                kl=figures["kl"],
                top1_agreement=figures["top1_agreement"],
                greedy_agreement=greedy,
                weight_error_max=max(errs.values(), default=0.0),
                weight_error_mean=sum(errs.values()) / max(len(errs), 1),
                passed=figures["effect_rel_error"] <= tol if cand.exact else None,
                module_errors=errs,
                reference=stacker.reference,
                loaded_by=loaded_by,
            )
            rows.append(row)
            if digest is not None:
                seen.setdefault(digest, row)
            tick(cand.name)
    dt = str(dtype).removeprefix("torch.")
    return Report(base_name, str(device), dt, list(prompts), tol, rows, stacker.reason, checks)


GROUP = 8  # approximate candidates run at once by ``_grouped_outputs``
GROUPED = "merging.runtime stacked, grouped with other candidates"


def _first_of_each(candidates: Sequence[Candidate], digests: Sequence[str | None]) -> list[int]:
    """The approximate candidates' indices, one per distinct content (``content_digest``; None: each)."""
    firsts, seen = [], set()
    for i, (cand, digest) in enumerate(zip(candidates, digests, strict=True)):
        if not cand.exact and (digest is None or digest not in seen):
            firsts.append(i)
            seen.add(digest)
    return firsts


def _grouped_outputs(
    model,
    batch: dict[str, torch.Tensor],
    groups: Sequence[Sequence[Adapter]],
    n_new: int,
    pad_id: int | None,
    y_base: torch.Tensor,
) -> list[tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Each candidate's outputs and greedy continuation (``n_new`` tokens; 0: none), GROUP candidates per
    run, each on its own copy of ``batch``, both from one prefill where ``decoding.outputs_and_greedy``
    can; None for a chunk the grouped runtime cannot run (an aLoRA).

    Each chunk's last candidate is also run alone, stacked, and must agree with its slice (to 1e-4 of its
    effect on the outputs): a model that mixes rows between the batch and its layers (experts that route
    tokens) is not grouped, whatever the shapes say.
    """
    out: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
    for start in range(0, len(groups), GROUP):
        chunk = [weighted(ads) for ads in groups[start : start + GROUP]]
        copies = {k: v.repeat(len(chunk), *([1] * (v.dim() - 1))) for k, v in batch.items()}
        try:
            with grouped(model, chunk):
                y, g = outputs_and_greedy(model, copies, n_new, pad_id)  # one prefill where it can
            ys = y.chunk(len(chunk))  # each copy's rows, in order
            gs = [None] * len(chunk) if g is None else g.chunk(len(chunk))
        except UnsupportedError:
            out += [None] * len(chunk)
            continue
        with stacked(model, chunk[-1]):
            alone = _outputs(model, batch)
        off, effect = float((ys[-1] - alone).norm()), float((alone - y_base).norm())
        if off > 1e-4 * effect + 1e-6 * float(alone.norm()):  # rows crossed between the groups
            out += [None] * len(chunk)
            continue
        out += list(zip(ys, gs, strict=True))
    return out


def reference_checks(model, batch, pairs: Sequence[Pair], y_base: torch.Tensor) -> dict[str, float]:
    """Where our runtime is the reference: its outputs against PEFT's on each part PEFT can stack.

    Returns:
        part name (e.g. "additive inputs") → effect-relative error of our runtime against PEFT.
    """
    out = {}
    for label, part in judge.parts(pairs):
        with stacked(model, part):
            y_ours = _outputs(model, batch)
        with judge.reference(model, part) as stacker:
            y_peft = _outputs(model, batch)
        if stacker.reference == judge.PEFT:  # a part PEFT refused to stack cannot check anything
            out[label] = compare_outputs(y_base, y_peft, y_ours, False)["effect_rel_error"]
    return out


def base_weights(model) -> Callable[[str], torch.Tensor]:
    """A module's base weight from the loaded model (on the CPU): what a DoRA input is resolved against."""
    return lambda mod: model.get_submodule(mod).weight.detach().cpu()


def claims_exact(recipe: Recipe | None, inputs: Sequence[Adapter], merged: Sequence[Adapter]) -> bool:
    """Whether a merged folder promises the stacked outputs, by the exactness rules of the strategies its
    recipe names (``additive_strategy`` for additive deltas, ``ia3_strategy`` for IA³ vectors), module by
    module. A result merged in this session carries it as ``MergeResult.exact``; no recipe, no promise.
    """
    parts = [s for s in (recipe.additive_strategy, recipe.ia3_strategy) if s] if recipe else []
    if not parts or not set(parts) <= set(strategies.names()):
        return False
    for ad in merged:
        for mod, d in ad.deltas.items():
            name = recipe.ia3_strategy if isinstance(d, Scale) else recipe.additive_strategy
            if name is not None and not strategies.get(name).exact_for(
                d, [a.deltas[mod] for a in inputs if mod in a.deltas], recipe.options
            ):
                return False
    return True
