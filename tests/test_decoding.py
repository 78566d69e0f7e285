"""One prefill for a batch's outputs and its greedy continuation: the outputs are ``outputs``' own and the
tokens are ``model.generate``'s, token for token (left-padded prompts, rows that end early, fallbacks)."""

from __future__ import annotations

import pytest
import torch

from merging.core.adapter import weighted
from merging.eval.decoding import continues_from_prefill, greedy, outputs, outputs_and_greedy
from merging.eval.verify import _grouped_outputs
from merging.merge.pipeline import merge
from merging.runtime.stacked import stacked
from merging.strategies import Options
from tests.support.helpers import read_adapters


def _batch(pads: list[int], length: int = 9) -> dict[str, torch.Tensor]:
    """Random prompts of 3..119, left-padded with 0 by the given counts."""
    ids = torch.randint(3, 120, (len(pads), length), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):
        ids[row, :p], mask[row, :p] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("pads", [[0, 0, 0], [0, 3, 5]])
def test_one_prefill_gives_outputs_and_generates_tokens(fx, pads):
    model = fx.load_base("llama")
    batch = _batch(pads)
    assert continues_from_prefill(model, batch, 0)
    y, g = outputs_and_greedy(model, batch, 7, 0)
    assert torch.equal(y, outputs(model, batch))
    want = greedy(model, batch, 7, 0)
    assert torch.equal(g, want)
    assert len({tuple(row.tolist()) for row in want}) == len(pads)  # each row its own continuation


@pytest.mark.parametrize("everyone", [False, True])
def test_rows_that_end_are_padded_as_generate_pads_them(fx, everyone):
    model = fx.load_base("llama")
    batch = _batch([0, 2, 4])
    free = greedy(model, batch, 6, 0)
    ends = sorted({int(free[r, 1]) for r in (range(3) if everyone else [0])})
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = ends if len(ends) > 1 else ends[0]
    try:
        want = greedy(model, batch, 6, 0)
        _, g = outputs_and_greedy(model, batch, 6, 0)
    finally:
        model.generation_config.eos_token_id = old
    assert torch.equal(g, want)
    assert (want[0, 2:] == 0).all() and not torch.equal(want, free)  # row 0 ended after its 2nd token
    if everyone:
        assert (want[:, -1] == 0).all()


def test_what_one_prefill_cannot_match_goes_to_generate(fx):
    gpt2, llama, batch = fx.load_base("gpt2"), fx.load_base("llama"), _batch([0, 3])
    assert not continues_from_prefill(gpt2, batch, 0)  # absolute positions: a padded row is shifted
    assert continues_from_prefill(gpt2, _batch([0, 0]), 0)
    y, g = outputs_and_greedy(gpt2, batch, 5, 0)
    assert torch.equal(y, outputs(gpt2, batch)) and torch.equal(g, greedy(gpt2, batch, 5, 0))
    llama.generation_config.repetition_penalty = 1.3  # not plain greedy: generate's own
    try:
        assert not continues_from_prefill(llama, batch, 0)
        assert torch.equal(outputs_and_greedy(llama, batch, 5, 0)[1], greedy(llama, batch, 5, 0))
    finally:
        llama.generation_config.repetition_penalty = 1.0


def test_grouped_candidates_greedy_equals_generate_alone_on_padded_prompts(fx):
    model = fx.load_base("llama")
    pairs = weighted(read_adapters(fx, "llama", ["lora", "loha", "lokr"]))
    cands = [merge(pairs, "svd", Options(rank=r)).adapters for r in (1, 2, 4)]
    batch = _batch([0, 4])
    runs = _grouped_outputs(model, batch, cands, 6, 0, outputs(model, batch))
    for ads, (y, g) in zip(cands, runs, strict=True):
        with stacked(model, weighted(ads)):
            assert torch.equal(g, greedy(model, batch, 6, 0))
            assert float((y - outputs(model, batch)).norm()) <= 1e-5 * float(y.norm())
