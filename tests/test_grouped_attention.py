"""Grouped candidates (``runtime.grouped``) through an nn.MultiheadAttention: each group's slice of query,
key, value and their masks, on the batch dim the attention has (0 if batch_first, else 1), equals stacking
that candidate alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merging.errors import UnsupportedError

pytestmark = pytest.mark.model  # PEFT builds and saves the adapters


class AttentionNet(nn.Module):
    """lin_in (6 → 8) → nn.MultiheadAttention (8, 2 heads; padded keys masked) → lin_out (8 → 3)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.lin_in, self.lin_out = nn.Linear(6, 8), nn.Linear(8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin_in(x)  # (N, L, 8)
        h = h if self.attn.batch_first else h.transpose(0, 1)  # (L, N, 8)
        a, w = self.attn(h, h, h, key_padding_mask=pad)  # w: (N, L, L), averaged over heads
        a = a if self.attn.batch_first else a.transpose(0, 1)
        return self.lin_out(a), w


def _build(batch_first: bool) -> nn.Module:
    torch.manual_seed(0)
    return AttentionNet(batch_first).double().eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_grouped_candidates_through_multihead_attention_equal_each_alone(tmp_path, batch_first):
    import peft

    from merging.base.layout import BaseLayout
    from merging.core.adapter import weighted
    from merging.formats import peft as peft_format
    from merging.runtime.grouped import grouped
    from merging.runtime.stacked import stacked
    from tests.support.tiny_models import randomise

    ads, layout = [], BaseLayout.from_model(_build(batch_first))
    for seed in (1, 2):
        config = peft.LoraConfig(target_modules=["attn", "lin_in"], r=2, init_lora_weights=False)
        pm = peft.get_peft_model(_build(batch_first), config)
        randomise(pm, seed)
        pm.save_pretrained(tmp_path / str(seed))
        ads.append(peft_format.read(tmp_path / str(seed)).refine_targets(layout.modules))
    candidates = [weighted(ads[:1]), weighted(ads[1:]), weighted(ads)]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)  # (N, L, in)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])  # (N, S): the second row's last two keys
    model = _build(batch_first)
    with torch.no_grad():
        bare = model(x, pad)[0]
        alone = []
        for pairs in candidates:
            with stacked(model, pairs):
                alone.append(model(x, pad))
        with grouped(model, candidates):
            out, weights = model(torch.cat([x] * 3), torch.cat([pad] * 3))
    for c, (y, w) in enumerate(alone):
        assert float((y - bare).norm()) > 1e-3 * float(bare.norm())  # each candidate moves the output
        assert torch.allclose(out.chunk(3)[c], y, atol=1e-12), c
        assert torch.allclose(weights.chunk(3)[c], w, atol=1e-12), c
    assert not torch.allclose(alone[0][0], alone[1][0], atol=1e-3)
    with grouped(model, candidates), pytest.raises(UnsupportedError, match="unbatched .* one at a time$"):
        model.attn(x[0], x[0], x[0])  # (L, E): no batch to split
