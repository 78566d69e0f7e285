"""Tiny base models and adapters written by PEFT itself, for tests.

Every adapter here is made by ``get_peft_model`` + ``save_pretrained``; its weights are then set to
small random values (PEFT's default init makes LoRA a no-op, its non-default inits are large).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# ---------------------------------------------------------------- base models


class TinyConv(nn.Module):
    """Conv2d (3×3 and 1×1), Conv1d and a Linear head: the layer kinds LyCORIS users adapt."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 3, 6, 6)
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))  # (N, 16, 6, 6)
        h = torch.relu(self.conv3(h))  # (N, 8, 6, 6)
        h = self.conv1d(h.flatten(2))  # (N, 8, 36)
        return self.head(h.mean(-1))  # (N, 4)


def build_base(kind: str) -> nn.Module:
    """A freshly initialised tiny base model (seeded, so the same every time)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind in ("llama", "llama_tied"):
        cfg = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=kind == "llama_tied",
        )
        return LlamaForCausalLM(cfg).eval()
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        return GPT2LMHeadModel(cfg).eval()
    if kind == "conv":
        return TinyConv().eval()
    raise KeyError(kind)


def example_input(kind: str, batch: int = 2) -> torch.Tensor:
    """A fixed input batch for a base kind."""
    g = torch.Generator().manual_seed(1)
    if kind == "conv":
        return torch.randn(batch, 3, 6, 6, generator=g)
    return torch.randint(0, 128, (batch, 12), generator=g)


def run(model: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    """Model output: logits for language models, the head output for the conv model."""
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


# ---------------------------------------------------------------- adapter specs

LLAMA_ATTN = ["q_proj", "v_proj"]
LLAMA_MLP = ["up_proj", "down_proj"]


def _specs() -> dict[tuple[str, str], Callable[[], object]]:
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig

    def lora(**kw):
        return LoraConfig(init_lora_weights=False, **kw)

    return {
        ("llama", "lora"): lambda: lora(r=4, lora_alpha=8, target_modules=LLAMA_ATTN + LLAMA_MLP),
        ("llama", "lora_b"): lambda: lora(r=4, lora_alpha=4, target_modules=LLAMA_ATTN + ["o_proj"]),
        ("llama", "lora_r8"): lambda: lora(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"]
        ),
        ("llama", "lora_rslora"): lambda: lora(
            r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "o_proj"]
        ),
        ("llama", "lora_patterns"): lambda: lora(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "gate_proj"],
            rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6},
            alpha_pattern={"v_proj": 3, "gate_proj": 16},
        ),
        ("llama", "lora_dora"): lambda: lora(
            r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]
        ),
        ("llama", "lora_embed"): lambda: lora(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]),
        ("llama", "lora_bin"): lambda: lora(r=2, lora_alpha=2, target_modules=["q_proj"]),
        ("llama", "lora_mts"): lambda: lora(
            r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]
        ),
        ("llama", "lora_tokens"): lambda: lora(
            r=4,
            lora_alpha=8,
            target_modules=["v_proj"],
            trainable_token_indices={"embed_tokens": [3, 5, 7]},
        ),
        ("llama", "loha"): lambda: LoHaConfig(
            r=4, alpha=8, target_modules=LLAMA_ATTN + ["gate_proj"], init_weights=False
        ),
        ("llama", "lokr"): lambda: LoKrConfig(
            r=2, alpha=4, target_modules=LLAMA_ATTN + LLAMA_MLP, init_weights=False
        ),
        ("llama", "lokr_full"): lambda: LoKrConfig(
            r=8, alpha=4, target_modules=["q_proj", "up_proj"], init_weights=False
        ),
        ("llama", "lokr_both"): lambda: LoKrConfig(
            r=2,
            alpha=2,
            decompose_both=True,
            target_modules=["k_proj", "down_proj"],
            init_weights=False,
        ),
        ("llama", "lokr_factor"): lambda: LoKrConfig(
            r=2,
            alpha=4,
            decompose_factor=4,
            target_modules=["o_proj", "up_proj"],
            init_weights=False,
        ),
        ("llama", "ia3"): lambda: IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            init_ia3_weights=False,
        ),
        ("llama", "ia3_b"): lambda: IA3Config(
            target_modules=["v_proj", "up_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            init_ia3_weights=False,
        ),
        ("llama_tied", "lora_tied"): lambda: lora(
            r=4,
            lora_alpha=8,
            target_modules=["embed_tokens", "q_proj"],
            ensure_weight_tying=True,
        ),
        ("gpt2", "lora"): lambda: lora(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
        ),
        ("gpt2", "ia3"): lambda: IA3Config(
            target_modules=["c_attn", "mlp.c_proj"],
            feedforward_modules=["mlp.c_proj"],
            fan_in_fan_out=True,
            init_ia3_weights=False,
        ),
        ("conv", "lora"): lambda: lora(
            r=2, lora_alpha=4, target_modules=["conv1", "conv2", "conv3", "conv1d", "head"]
        ),
        ("conv", "lora_bias"): lambda: lora(
            r=2, lora_alpha=4, lora_bias=True, target_modules=["conv3", "head"]
        ),
        ("conv", "loha"): lambda: LoHaConfig(
            r=2,
            alpha=4,
            target_modules=["conv1", "conv2", "conv3", "conv1d", "head"],
            init_weights=False,
        ),
        ("conv", "loha_tucker"): lambda: LoHaConfig(
            r=2,
            alpha=4,
            target_modules=["conv2"],
            use_effective_conv2d=True,
            init_weights=False,
        ),
        ("conv", "lokr"): lambda: LoKrConfig(
            r=2,
            alpha=4,
            target_modules=["conv1", "conv2", "conv3", "conv1d", "head"],
            init_weights=False,
        ),
        ("conv", "lokr_tucker"): lambda: LoKrConfig(
            r=1,
            alpha=2,
            target_modules=["conv2"],
            use_effective_conv2d=True,
            init_weights=False,
        ),
        ("conv", "ia3"): lambda: IA3Config(
            target_modules=["conv1", "conv3", "head"],
            feedforward_modules=["conv3"],
            init_ia3_weights=False,
        ),
    }


ADAPTERS: list[tuple[str, str]] = [
    ("llama", "lora"),
    ("llama", "lora_b"),
    ("llama", "lora_r8"),
    ("llama", "lora_rslora"),
    ("llama", "lora_patterns"),
    ("llama", "lora_dora"),
    ("llama", "lora_embed"),
    ("llama", "lora_bin"),
    ("llama", "lora_mts"),
    ("llama", "lora_tokens"),
    ("llama", "loha"),
    ("llama", "lokr"),
    ("llama", "lokr_full"),
    ("llama", "lokr_both"),
    ("llama", "lokr_factor"),
    ("llama", "ia3"),
    ("llama", "ia3_b"),
    ("llama_tied", "lora_tied"),
    ("gpt2", "lora"),
    ("gpt2", "ia3"),
    ("conv", "lora"),
    ("conv", "lora_bias"),
    ("conv", "loha"),
    ("conv", "loha_tucker"),
    ("conv", "lokr"),
    ("conv", "lokr_tucker"),
    ("conv", "ia3"),
]


def _randomise(model: nn.Module, seed: int) -> None:
    """Give every adapter parameter small random values that change the output visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "ia3_l" in name:
                p.copy_(1 + 0.2 * noise)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * noise)
            elif "modules_to_save" in name:
                p.add_(0.01 * noise)
            elif "trainable_tokens" in name:
                p.add_(0.2 * noise)
            elif "hada_t" in name or "lokr_t" in name:  # Tucker cores
                p.copy_(noise)
            elif name.endswith("bias"):
                p.copy_(0.01 * noise)
            elif "hada_" in name or "lokr_" in name:
                p.copy_(0.15 * noise)
            else:  # lora_A / lora_B / lora_embedding_* / lora bias
                p.copy_(0.05 * noise)


# ---------------------------------------------------------------- building on disk


@dataclass(frozen=True)
class Fixtures:
    """Where the fixture models and adapters live on disk."""

    root: Path

    def base(self, kind: str) -> Path:
        return self.root / "bases" / kind

    def adapter(self, kind: str, name: str) -> Path:
        return self.root / "adapters" / kind / name

    def load_base(self, kind: str) -> nn.Module:
        """A fresh copy of the base model with the saved weights."""
        return build_base(kind)


def build_fixtures(root: Path) -> Fixtures:
    """Write every base model and every PEFT adapter under root."""
    import copy

    from peft import get_peft_model
    from safetensors.torch import save_file

    fx = Fixtures(root)
    specs = _specs()
    for kind in ("llama", "llama_tied", "gpt2", "conv"):
        base = build_base(kind)
        out = fx.base(kind)
        out.mkdir(parents=True, exist_ok=True)
        if kind == "conv":
            save_file(
                {k: v.contiguous() for k, v in base.state_dict().items()}, str(out / "model.safetensors")
            )
        else:
            base.save_pretrained(out)
    for kind, name in ADAPTERS:
        model = copy.deepcopy(build_base(kind))
        peft_model = get_peft_model(model, specs[(kind, name)]())
        _randomise(peft_model, zlib.crc32(f"{kind}/{name}".encode()))
        peft_model.save_pretrained(fx.adapter(kind, name), safe_serialization=name != "lora_bin")
    return fx
