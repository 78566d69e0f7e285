"""Seeded tiny transformers models of every family PEFT serves, and PEFT adapters made on them.

Each family is built from a config in well under a second (vocab 128, hidden 32, 2 layers), saved as a
base folder (config.json + model.safetensors, no tokenizer), and given adapters by PEFT itself
(``get_peft_model`` + ``save_pretrained``, then small seeded random weights so every adapter visibly
changes the output).

    FAMILIES["gemma"].task_type           # "CAUSAL_LM"
    model = build("t5")                   # the same weights every time
    base = save_base("bert", tmp / "base")
    ad = make_adapter("qwen2", tmp / "a", "lora", seed=1, target_modules=["embed_tokens"])
    y = output(model, inputs("t5"))       # logits / head output / last hidden state
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

VOCAB = 128
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64}  # fmt: skip


@dataclass(frozen=True)
class Family:
    """One model family: how to build it, and the module names its adapters target (PEFT suffixes)."""

    config_class: str  # transformers config class name
    model_class: str  # transformers model class name (the head the task type loads)
    config: dict[str, Any]
    task_type: str | None  # PEFT task_type of its adapters ("CAUSAL_LM", "SEQ_CLS", ...)
    targets: tuple[str, ...]  # linear layers a LoRA targets
    ffn: str  # the feed-forward layer (IA³ feedforward_modules)
    embed: str  # the input embedding
    tied: bool = False  # output embedding tied to the input embedding
    scaled: bool = False  # the input embedding scales its output (Gemma's embed_scale)
    heads: tuple[str, ...] = ()  # head modules PEFT adds to modules_to_save for this task type
    extra: dict[str, Any] = field(default_factory=dict)  # notes for sweeps (fused layers, experts, ...)


LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", "LlamaForCausalLM", SMALL | {"num_key_value_heads": 2},
                    "CAUSAL_LM", LLAMA_LIKE, "down_proj", "embed_tokens"),
    "gemma": Family("GemmaConfig", "GemmaForCausalLM",
                    SMALL | {"num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": True},
                    "CAUSAL_LM", LLAMA_LIKE, "down_proj", "embed_tokens", tied=True, scaled=True),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", SMALL | {"num_key_value_heads": 2,
                    "tie_word_embeddings": True}, "CAUSAL_LM", LLAMA_LIKE, "down_proj", "embed_tokens",
                    tied=True, extra={"biases": "q_proj, k_proj, v_proj"}),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM", SMALL | {"num_key_value_heads": 4, "pad_token_id": 0,
                   "bos_token_id": 1, "eos_token_id": 2}, "CAUSAL_LM", ("qkv_proj", "o_proj", "gate_up_proj",
                   "down_proj"), "down_proj", "embed_tokens", extra={"fused": "qkv_proj, gate_up_proj"}),
    "gpt_neox": Family("GPTNeoXConfig", "GPTNeoXForCausalLM", SMALL | {"bos_token_id": 0, "eos_token_id": 2},
                       "CAUSAL_LM", ("query_key_value", "dense", "dense_4h_to_h"), "dense_4h_to_h",
                       "embed_in", extra={"fused": "query_key_value"}),
    "opt": Family("OPTConfig", "OPTForCausalLM", {"vocab_size": VOCAB, "hidden_size": 32, "ffn_dim": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
                  "word_embed_proj_dim": 32}, "CAUSAL_LM", ("q_proj", "v_proj", "out_proj", "fc2"), "fc2",
                  "embed_tokens", tied=True),
    "mixtral": Family("MixtralConfig", "MixtralForCausalLM", SMALL | {"num_key_value_heads": 2,
                      "num_local_experts": 4, "num_experts_per_tok": 2}, "CAUSAL_LM",
                      ("q_proj", "k_proj", "v_proj", "o_proj"), "o_proj", "embed_tokens",
                      extra={"experts": "mlp.experts.gate_up_proj / down_proj are 3-D parameters"}),
    "bert": Family("BertConfig", "BertForSequenceClassification", SMALL | {"num_labels": 3}, "SEQ_CLS",
                   ("query", "key", "value", "attention.output.dense", "intermediate.dense"),
                   "intermediate.dense", "word_embeddings", heads=("classifier",)),
    "bert_token": Family("BertConfig", "BertForTokenClassification", SMALL | {"num_labels": 5}, "TOKEN_CLS",
                         ("query", "value", "intermediate.dense"), "intermediate.dense", "word_embeddings",
                         heads=("classifier",)),
    "bert_qa": Family("BertConfig", "BertForQuestionAnswering", SMALL, "QUESTION_ANS",
                      ("query", "value", "intermediate.dense"), "intermediate.dense", "word_embeddings",
                      heads=("qa_outputs",)),
    "bert_features": Family("BertConfig", "BertModel", SMALL, "FEATURE_EXTRACTION",
                            ("query", "value", "intermediate.dense"), "intermediate.dense",
                            "word_embeddings"),
    "modernbert": Family("ModernBertConfig", "ModernBertForSequenceClassification",
                         SMALL | {"num_labels": 3, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                  "cls_token_id": 1, "sep_token_id": 2, "global_attn_every_n_layers": 2,
                                  "local_attention": 16}, "SEQ_CLS", ("Wqkv", "Wo", "Wi"), "Wi",
                         "tok_embeddings", heads=("classifier",), extra={"fused": "Wqkv, Wi"}),
    "t5": Family("T5Config", "T5ForConditionalGeneration", {"vocab_size": VOCAB, "d_model": 32, "d_kv": 8,
                 "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
                 "decoder_start_token_id": 0}, "SEQ_2_SEQ_LM", ("q", "k", "v", "o", "wi", "wo"), "wo",
                 "shared", tied=True, extra={"parent_reads_weight": "T5DenseActDense reads wo.weight.dtype"}),
}  # fmt: skip


def config(family: str):
    """The family's transformers config (seed-independent)."""
    import transformers

    fam = FAMILIES[family]
    return getattr(transformers, fam.config_class)(**fam.config)


def build(family: str) -> nn.Module:
    """A freshly initialised tiny model of the family, in eval mode; the same weights every time."""
    import transformers

    torch.manual_seed(zlib.crc32(family.encode()))
    model = getattr(transformers, FAMILIES[family].model_class)(config(family))
    return model.eval()


def save_base(family: str, folder: Path) -> Path:
    """Write the family's base model folder (config.json + model.safetensors, no tokenizer); return it."""
    folder = Path(folder)
    build(family).save_pretrained(folder)
    return folder


def inputs(family: str, batch: int = 2, length: int = 10) -> dict[str, torch.Tensor]:
    """Seeded model kwargs: input ids (no special tokens), attention mask, decoder ids for seq2seq."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if FAMILIES[family].task_type == "SEQ_2_SEQ_LM":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, length // 2), generator=g)
    return out


@torch.no_grad()
def output(model: nn.Module, kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's output for these kwargs: logits (LM, classification), QA start logits + end logits
    stacked, or the last hidden state."""
    out = model(**kwargs)
    if getattr(out, "logits", None) is not None:
        return out.logits.float()
    if getattr(out, "start_logits", None) is not None:
        return torch.stack([out.start_logits, out.end_logits]).float()
    return out.last_hidden_state.float()


# ---------------------------------------------------------------- adapters

KINDS = ("lora", "loha", "lokr", "ia3", "dora")


def peft_config(family: str, kind: str = "lora", **overrides: Any):
    """A PEFT config of ``kind`` for the family (its targets and task type); ``overrides`` win."""
    import peft

    fam = FAMILIES[family]
    common: dict[str, Any] = {"target_modules": list(fam.targets), "task_type": fam.task_type}
    if kind in ("lora", "dora"):
        cfg = dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=kind == "dora") | common
        return peft.LoraConfig(**(cfg | overrides))
    if kind == "loha":
        return peft.LoHaConfig(**(dict(r=4, alpha=8, init_weights=False) | common | overrides))
    if kind == "lokr":
        return peft.LoKrConfig(**(dict(r=2, alpha=4, init_weights=False) | common | overrides))
    if kind == "ia3":
        cfg = dict(feedforward_modules=[fam.ffn], init_ia3_weights=False) | common
        return peft.IA3Config(**(cfg | overrides))
    raise KeyError(f"adapter kind {kind!r}; one of {', '.join(KINDS)}")


def make_adapter(family: str, folder: Path, kind: str = "lora", seed: int = 0, **overrides: Any) -> Path:
    """Write a PEFT adapter of ``kind`` made by PEFT on the family's base model; return its folder.

    Args:
        overrides: PEFT config fields (e.g. ``target_modules=["embed_tokens"]``,
            ``trainable_token_indices={"embed_tokens": [3, 5]}``, ``modules_to_save=[...]``).
    """
    from peft import get_peft_model

    model = get_peft_model(build(family), peft_config(family, kind, **overrides))
    randomise(model, zlib.crc32(f"{family}/{kind}/{seed}".encode()))
    model.save_pretrained(Path(folder))
    return Path(folder)


def randomise(model: nn.Module, seed: int) -> None:
    """Give every trainable (adapter) parameter small seeded random values that change the output."""
    rules: list[tuple[Callable[[str], bool], Callable[[torch.Tensor, torch.Tensor], None]]] = [
        (lambda n: "ia3_l" in n, lambda p, z: p.copy_(1 + 0.2 * z)),
        (lambda n: "lora_magnitude_vector" in n, lambda p, z: p.mul_(1 + 0.1 * z)),
        (lambda n: "modules_to_save" in n, lambda p, z: p.add_(0.05 * z)),
        (lambda n: "trainable_tokens" in n, lambda p, z: p.add_(0.2 * z)),
        (lambda n: "hada_" in n or "lokr_" in n, lambda p, z: p.copy_(0.15 * z)),
        (lambda n: True, lambda p, z: p.copy_(0.05 * z)),  # lora_A / lora_B / lora_embedding_* / biases
    ]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                z = torch.randn(p.shape, generator=g)
                next(fn for match, fn in rules if match(name))(p, z)
