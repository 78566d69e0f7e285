"""The PEFT-made fixture adapters exist for every type and layer kind, and each changes the output."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.fixtures import ADAPTERS, example_input, run


@pytest.mark.parametrize(("kind", "name"), ADAPTERS, ids=[f"{k}-{n}" for k, n in ADAPTERS])
def test_fixture_adapter_changes_output(fx, kind, name):
    from peft import PeftModel

    folder = fx.adapter(kind, name)
    assert (folder / "adapter_config.json").exists()
    x = example_input(kind)
    base_out = run(fx.load_base(kind), kind, x)
    model = PeftModel.from_pretrained(fx.load_base(kind), str(folder)).eval()
    out = run(model, kind, x)
    rel = (out - base_out).norm() / base_out.norm()
    assert torch.isfinite(out).all()
    assert 1e-3 < rel < 1.0, f"{kind}/{name}: relative output change {rel:.2e}"


def test_fixture_types_cover_the_design(fx):
    types = {
        json.loads((fx.adapter(k, n) / "adapter_config.json").read_text())["peft_type"] for k, n in ADAPTERS
    }
    assert types == {"LORA", "LOHA", "LOKR", "IA3"}
    kinds = {k for k, _ in ADAPTERS}
    assert kinds == {"llama", "llama_tied", "gpt2", "conv"}
