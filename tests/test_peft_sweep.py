"""The PEFT-completeness sweep: per family and configuration, `cat` of PEFT-written inputs, reloaded by PEFT,
against PEFT's own stacked forward (≤ 1e-4 effect-relative), or a one-line refusal naming what is unsupported.
"""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch

from merging.core.adapter import weighted
from merging.errors import MergingError
from merging.formats import peft as peft_format
from merging.merge.pipeline import merge
from merging.merge.result import write_result
from tests.support import tiny_models as tm
from tests.support.helpers import peft_stacked, rel_err

pytestmark = pytest.mark.model

Spec = tuple[str, int, dict[str, Any]]


def _configs(family: str) -> dict[str, tuple[list[Spec], str | None]]:
    """name → (input specs (kind, seed, overrides), None for exact or the refusal's pattern)."""
    fam = tm.FAMILIES[family]
    t = list(fam.targets)
    out: dict[str, tuple[list[Spec], str | None]] = {
        "lora+lora": ([("lora", 1, {}), ("lora", 2, {"target_modules": t[:2], "r": 2})], None),
        "lora+dora": ([("lora", 1, {}), ("dora", 2, {"target_modules": t[:2]})], None),
        "ia3+ia3": ([("ia3", 1, {}), ("ia3", 2, {})], None),
        "embedding": ([("lora", 1, {"target_modules": [fam.embed, t[0]]}), ("lora", 2, {})], None),
        # PEFT stacks one trainable-tokens adapter, loaded last (disjoint rows: tests/test_verify_bake.py)
        "tokens": ([("lora", 2, {}), ("lora", 1, {"trainable_token_indices": {fam.embed: [3, 5]}})], None),
    }
    if family in ("llama", "phi3", "gpt_neox"):  # the rest on a plain, a fused and a NeoX layout
        patterns = {"rank_pattern": {t[0]: 2}, "alpha_pattern": {t[1]: 3}}
        first, second = {"target_modules": t[:2]}, {"target_modules": t[1:3]}
        out["dora+dora"] = ([("dora", 1, first), ("dora", 2, second)], None)
        out["loha+lokr+lora"] = ([("loha", 1, {}), ("lokr", 2, first), ("lora", 3, {})], None)
        out["rslora+patterns"] = ([("lora", 1, {"use_rslora": True}), ("lora", 2, patterns)], None)
    if fam.extra.get("biases") or family in ("opt", "gpt_neox"):
        out["trained bias"] = ([("lora", 1, {"bias": "lora_only"}), ("lora", 2, {})], None)
        out["two trained biases"] = (
            [("lora", 1, {"bias": "all"}), ("lora", 2, {"bias": "all"})], "keeps only the last"
        )
    if "experts" in fam.extra:  # MoE experts as 3-D parameters (PEFT's target_parameters; tests/test_moe.py)
        out["expert parameters"] = (
            [("lora", 1, {"target_modules": [], "target_parameters": ["mlp.experts.down_proj"]})], None
        )
    return out


FAMILIES = ("llama", "phi3", "qwen2", "gemma", "gpt_neox", "opt", "mixtral")
CASES = [(f, c) for f in FAMILIES for c in _configs(f)]


def _peft_stacked(family: str, folders: list, kinds: list[str]) -> torch.Tensor:
    model = peft_stacked(tm.build(family), folders, mixed=len(set(kinds)) > 1)
    return tm.output(model, tm.inputs(family))


@pytest.mark.parametrize(("family", "config"), CASES)
def test_cat_reloads_as_peft_stacks(tmp_path, family, config):
    specs, refusal = _configs(family)[config]
    # PEFT builds every configuration of the sweep: an error here is a PEFT change to look at, not a skip
    folders = [tm.make_adapter(family, tmp_path / f"in{i}", k, s, **o) for i, (k, s, o) in enumerate(specs)]
    base = tm.build(family)
    params = dict(base.named_parameters())
    weights = {n.removesuffix(".weight"): p.detach() for n, p in params.items() if n.endswith(".weight")}
    if refusal is not None:
        with pytest.raises(MergingError, match=refusal) as e:
            ads = [peft_format.read(f) for f in folders]
            merge(weighted(ads), "cat", base_weights=weights.__getitem__)
        assert "\n" not in str(e.value)
        return
    ads = [peft_format.read(f) for f in folders]
    ref = _peft_stacked(family, folders, [k if k != "dora" else "lora" for k, _, _ in specs])
    bare = tm.output(base, tm.inputs(family))
    out = write_result(merge(weighted(ads), "cat", base_weights=weights.__getitem__), tmp_path / "m", {})
    got = tm.output(peft.PeftModel.from_pretrained(tm.build(family), out), tm.inputs(family))
    assert rel_err(ref, bare) > 1e-3  # the inputs change the output
    assert rel_err(got - bare, ref - bare) < 1e-4
