"""DiT pipelines (Flux, SD3) for verify: the transformer's noise prediction fed by the adapted text encoders,
and diffusers' own loaders stacking LoRA files on them.

| pipeline | text stream (encoder_hidden_states) | pooled projection |
|---|---|---|
| Flux | T5 (text_encoder_2) last hidden state | CLIP-L (text_encoder) pooled output |
| SD3 | CLIP-L ‖ CLIP-G penultimate states padded to T5's width, then T5's | CLIP-L ‖ CLIP-G text_embeds |

as FluxPipeline and StableDiffusion3Pipeline build them; a component absent from the folder is replaced by
seeded states of the transformer's widths. Latents, timesteps, guidance (Flux) and token ids are seeded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from merging.errors import UnsupportedError

TOKENS = 7
CLIPS = ("text_encoder", "text_encoder_2")  # SD3's CLIP-L and CLIP-G
RUN = ("FluxTransformer2DModel", "SD3Transformer2DModel")


def kind(transformer: nn.Module) -> str:
    """``flux`` or ``sd3`` for a transformer verify runs; a one-line refusal otherwise."""
    name = type(transformer).__name__
    if name not in RUN:
        raise UnsupportedError(f"verify runs Flux and SD3 transformers; {name} is not run yet")
    return "flux" if name == RUN[0] else "sd3"


def _states(enc: nn.Module | None, ids: torch.Tensor, width: int, g: torch.Generator) -> torch.Tensor:
    """A T5's last hidden state (2, tokens, width), or seeded states when the pipeline has none."""
    return enc(ids).last_hidden_state if enc is not None else torch.randn(2, TOKENS, width, generator=g)


def _part(parts: Mapping[str, nn.Module], name: str) -> nn.Module | None:
    return parts[name] if name in parts else None


def _ids(parts: Mapping[str, nn.Module], g: torch.Generator) -> torch.Tensor:
    vocab = min((m.config.vocab_size for n, m in parts.items() if n.startswith("text_encoder")), default=1000)
    return torch.randint(3, vocab, (2, TOKENS), generator=g)


@torch.no_grad()
def noise(parts: Mapping[str, nn.Module], g: torch.Generator) -> torch.Tensor:
    """The transformer's prediction on seeded inputs, with states from the pipeline's text encoders."""
    m = parts["transformer"]
    ids = _ids(parts, g)
    return (_flux if kind(m) == "flux" else _sd3)(m, parts, ids, g)


def _flux(m: nn.Module, parts: Mapping[str, nn.Module], ids: torch.Tensor, g: torch.Generator):
    c, te = m.config, _part(parts, "text_encoder")
    states = _states(_part(parts, "text_encoder_2"), ids, c.joint_attention_dim, g)
    pooled = te(ids).pooler_output if te is not None else torch.randn(2, c.pooled_projection_dim, generator=g)
    x = torch.randn(2, 16, c.in_channels, generator=g)  # (batch, 4×4 packed latents, channels)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
    img_ids = torch.stack(grid, -1).reshape(16, 3)
    guidance = torch.tensor([3.5, 3.5]) if c.guidance_embeds else None
    t = torch.tensor([0.1, 0.7])
    return m(hidden_states=x, encoder_hidden_states=states, pooled_projections=pooled, timestep=t,
             img_ids=img_ids, txt_ids=torch.zeros(TOKENS, 3), guidance=guidance).sample  # fmt: skip


def _sd3(m: nn.Module, parts: Mapping[str, nn.Module], ids: torch.Tensor, g: torch.Generator):
    c = m.config
    clips = [parts[n](ids, output_hidden_states=True) for n in CLIPS if n in parts]
    if clips:
        prompt = torch.cat([o.hidden_states[-2] for o in clips], -1)  # (2, tokens, Σ clip widths)
        prompt = nn.functional.pad(prompt, (0, c.joint_attention_dim - prompt.shape[-1]))
        pooled = torch.cat([o.text_embeds for o in clips], -1)
    else:
        prompt = torch.randn(2, TOKENS, c.joint_attention_dim, generator=g)
        pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
    states = torch.cat([prompt, _states(_part(parts, "text_encoder_3"), ids, c.joint_attention_dim, g)], 1)
    size = min(c.sample_size, 8)
    x = torch.randn(2, c.in_channels, size, size, generator=g)
    return m(hidden_states=x, encoder_hidden_states=states, pooled_projections=pooled,
             timestep=torch.tensor([10.0, 500.0])).sample  # fmt: skip


def loader(transformer: nn.Module):
    """diffusers' LoRA loader mixin for this transformer's pipeline."""
    from diffusers.loaders import FluxLoraLoaderMixin, SD3LoraLoaderMixin

    return FluxLoraLoaderMixin if kind(transformer) == "flux" else SD3LoraLoaderMixin


def load(parts: nn.ModuleDict, files: Mapping[str, Path], weights: Sequence[float]) -> dict[str, list[str]]:
    """Stack LoRA files on DiT parts as the pipeline's ``load_lora_weights`` + ``set_adapters`` do.

    CLIP text encoders are loaded through ``load_lora_into_text_encoder`` under their own prefix; T5, which
    the pipelines skip and that function cannot size (it looks for CLIP's module names), through PEFT as
    diffusers does under it. Returns component → the adapter names loaded into it.
    """
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    mixin = loader(parts["transformer"])
    flux = mixin.__name__.startswith("Flux")
    loaded: dict[str, list[str]] = {}
    for name, file in files.items():
        sd, alphas = mixin.lora_state_dict(str(file), return_alphas=True) if flux else (_sd3_dict(file), None)
        if any(k.startswith("transformer.") for k in sd):
            kw = {"network_alphas": alphas} if flux else {}
            mixin.load_lora_into_transformer(sd, transformer=parts["transformer"], adapter_name=name, **kw)
            loaded.setdefault("transformer", []).append(name)
        for te in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if te in parts and any(k.startswith(f"{te}.") for k in sd):
                if type(parts[te]).__name__.startswith("T5"):
                    _peft_load(parts[te], sd, te, name)
                else:
                    mixin.load_lora_into_text_encoder(sd, alphas, parts[te], prefix=te, adapter_name=name)
                loaded.setdefault(te, []).append(name)
    by_name = dict(zip(files, weights, strict=True))
    for comp, names in loaded.items():
        set_weights_and_activate_adapters(parts[comp], names, [by_name[n] for n in names])
    return loaded


def _peft_load(model: nn.Module, sd: Mapping[str, torch.Tensor], prefix: str, name: str) -> None:
    """A diffusers-named LoRA (scale in B, no alphas) injected into a transformers model by PEFT."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    mine = {k.removeprefix(f"{prefix}."): v for k, v in sd.items() if k.startswith(f"{prefix}.")}
    up = ".lora_B.weight"
    ranks = {k.removesuffix(up): v.shape[1] for k, v in mine.items() if k.endswith(up)}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {m: rk for m, rk in ranks.items() if rk != r}
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern,
                     alpha_pattern=pattern)  # fmt: skip
    inject_adapter_in_model(cfg, model, adapter_name=name)
    info = set_peft_model_state_dict(model, mine, adapter_name=name)
    if info.unexpected_keys:
        raise ValueError(f"{prefix}: PEFT did not load {info.unexpected_keys[0]}")


def _sd3_dict(file: Path) -> dict:
    """SD3's loader ignores alphas (diffusers-named SD3 files carry none): its state dict alone."""
    from diffusers.loaders import SD3LoraLoaderMixin

    return SD3LoraLoaderMixin.lora_state_dict(str(file))


def injected(parts: nn.ModuleDict, adapter: str) -> set[str]:
    """``<component>.<module>`` paths where diffusers put a LoRA layer of this adapter name."""
    out = set()
    for comp, m in parts.items():
        for path, mod in m.named_modules():
            if adapter in getattr(mod, "lora_A", {}):
                out.add(f"{comp}.{path}")
    return out
