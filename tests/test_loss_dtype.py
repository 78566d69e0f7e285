"""Held-out losses in bfloat16 (autocast, float32 accumulation) against transformers' own float32 loss, and
the choice of the loss dtype from the CPU's flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merging.errors import MergingError
from merging.eval import data, skills
from merging.eval.verify import Candidate
from tests.support.helpers import state_hash, svd_held_out_case

BF16_RTOL = 1e-2  # bf16 keeps 8 significant bits (0.4% per rounding); here the losses move ≤ 1e-3 relative,
# SmolLM2's base on the bundled example's texts ≤ 0.9% (every row ≤ 2.6%: benchmarks/bf16_losses.py)


def _tiny_llama():
    """A small Llama whose weights are large enough for peaked predictions (losses far from log(vocab),
    where rounding the logits matters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.25,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _batches(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Two skills of right-padded rows whose labels cover the last tokens ("answers") only."""
    out = {}
    for skill, rows in (("s", 6), ("t", 5)):
        g = torch.Generator().manual_seed(seed + rows)
        ids = torch.randint(0, 256, (rows, 40), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 30:] = 0  # a padded row
        labels = ids.clone()
        labels[:, :24] = -100
        labels[mask == 0] = -100
        out[skill] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return out


@pytest.mark.model
@torch.no_grad()
def test_bf16_losses_are_within_tolerance_of_transformers_float32_loss():
    model = _tiny_llama()
    batches = _batches(7)
    own = {s: float(model(**b).loss) for s, b in batches.items()}  # transformers' own float32 loss
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    packed = data.pack(batches, row=64)
    got = data.answer_losses(model, packed, torch.bfloat16)
    padded, _ = data.losses_by_example(model, batches, torch.bfloat16)
    for s in batches:
        assert got[s] == pytest.approx(own[s], rel=BF16_RTOL), s
        assert padded[s] == pytest.approx(own[s], rel=BF16_RTOL), s
        assert abs(got[s] - own[s]) > 1e-6 * own[s], s  # really computed in bfloat16, not float32
    assert abs(own["s"] - own["t"]) > 0.05 and min(own.values()) > float(torch.log(torch.tensor(256.0))) + 1
    assert data.answer_losses(model, packed, torch.float32) == pytest.approx(own, rel=1e-5)  # unchanged
    for n, p in model.named_parameters():  # autocast casts copies: the weights keep every bit
        assert torch.equal(p, before[n]), n
        assert p.dtype == torch.float32


def test_loss_dtype_follows_the_cpu_flags(tmp_path: Path):
    with_bf16, without = tmp_path / "bf16", tmp_path / "plain"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert data.native_bf16("cpu", with_bf16) and not data.native_bf16("cpu", without)
    assert not data.native_bf16("cpu", tmp_path / "missing")
    auto = torch.bfloat16 if data.native_bf16("cpu") else torch.float32
    assert data.loss_dtype("auto", "cpu") == auto
    assert data.loss_dtype("float32", "cpu") == torch.float32
    assert data.loss_dtype("bfloat16", "cpu") == torch.bfloat16
    assert data.loss_dtype("float32", "cpu", torch.float16) == torch.float16  # no float32 arithmetic to lower
    with pytest.raises(MergingError, match="loss_dtype"):
        data.loss_dtype("fp8", "cpu")


@torch.no_grad()
def test_held_out_in_bf16_is_near_transformers_loss_and_leaves_the_weights(fx):
    pairs, res, batches = svd_held_out_case(fx)
    model = fx.load_base("llama")
    before = state_hash(model)
    own = {s: float(model(**b).loss) for s, b in batches.items()}  # transformers' own float32 loss
    measured = skills.held_out(model, batches, pairs, [Candidate("svd", res.adapters)], dtype=torch.bfloat16)
    assert state_hash(model) == before
    for s in batches:
        assert measured.skills.base[s] == pytest.approx(own[s], rel=BF16_RTOL)
        assert measured.skills.base[s] != own[s]  # computed in bfloat16
        assert abs(measured.merged["svd"][s].loss - own[s]) > 1e-3  # the merge is on: a real loss to move
    exact = skills.held_out(model, batches, pairs, [Candidate("svd", res.adapters)], dtype=torch.float32)
    for s in batches:  # the merge's own loss moves by bf16 rounding only
        assert measured.merged["svd"][s].loss == pytest.approx(exact.merged["svd"][s].loss, rel=BF16_RTOL)
        assert measured.merged["svd"][s].loss != exact.merged["svd"][s].loss
