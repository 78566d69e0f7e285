"""The example base model is the real pretrained SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

import pytest
import torch

from merging.base.example_model import GGUF_SHA256


@pytest.mark.model
def test_example_base_speaks_english(example_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((example_base / "config.json").read_text())
    assert "quantization_config" not in config
    assert GGUF_SHA256 in (example_base / "SOURCE").read_text()
    tok = AutoTokenizer.from_pretrained(example_base)
    model = AutoModelForCausalLM.from_pretrained(example_base, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :])
    assert "Paris" in text, text
