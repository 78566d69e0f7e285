"""Whole Stable Diffusion components in the original one-file checkpoint layout (LDM / SGM), as A1111,
ComfyUI and diffusers' ``from_single_file`` read them: the inverse of diffusers 0.42's
``loaders/single_file_utils.py`` converters.

| component (diffusers) | SD1.5 checkpoint | SDXL checkpoint |
|---|---|---|
| unet | ``model.diffusion_model.`` + SGM names | the same |
| vae | ``first_stage_model.`` + LDM VAE names | the same |
| text_encoder (CLIP-L) | ``cond_stage_model.transformer.`` | ``conditioner.embedders.0.transformer.`` |
| text_encoder_2 (CLIP-G) | — | ``conditioner.embedders.1.model.`` + OpenCLIP names |

(CLIP's names keep ``text_model.``, which transformers 5's CLIPTextModel no longer saves.)

VAE: ``down_blocks.i.resnets.j`` → ``down.i.block.j`` (``conv_shortcut`` → ``nin_shortcut``),
``down_blocks.i.downsamplers.0`` → ``down.i.downsample``, ``up_blocks.i`` → ``up.(n−1−i)`` (LDM counts the
decoder from the bottom), ``mid_block.resnets.k`` → ``mid.block_(k+1)``, ``mid_block.attentions.0`` →
``mid.attn_1`` (group_norm → norm, to_q/k/v → q/k/v, to_out.0 → proj_out, as 1×1 convolutions),
``conv_norm_out`` → ``norm_out``.

OpenCLIP: ``encoder.layers.i`` → ``transformer.resblocks.i`` with layer_norm1/2 → ln_1/2, mlp.fc1/fc2 →
mlp.c_fc/c_proj, self_attn.out_proj → attn.out_proj and q/k/v_proj fused (rows q, k, v) into
attn.in_proj_weight / in_proj_bias; embeddings → token_embedding.weight, positional_embedding;
final_layer_norm → ln_final; text_projection.weight → text_projection transposed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from merging.errors import UnsupportedError
from merging.formats.sgm_names import to_sgm

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # what a checkpoint file holds, in order
PREFIX = {
    ("sd", "unet"): "model.diffusion_model.", ("sd", "vae"): "first_stage_model.",
    ("sd", "text_encoder"): "cond_stage_model.transformer.",
    ("sdxl", "unet"): "model.diffusion_model.", ("sdxl", "vae"): "first_stage_model.",
    ("sdxl", "text_encoder"): "conditioner.embedders.0.transformer.",
    ("sdxl", "text_encoder_2"): "conditioner.embedders.1.model.",
}  # fmt: skip
VAE_TOP = {"conv_norm_out": "norm_out"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_PART = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)"
                      r"\.(\d+)\.(.+)$")  # fmt: skip
OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}  # fmt: skip
OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
}  # fmt: skip


def component_tensors(kind: str, comp: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One component's tensors (diffusers / transformers names) under their one-file checkpoint names."""
    if (kind, comp) not in PREFIX:
        raise UnsupportedError(f"{comp}: no place in an {kind.upper()} single-file checkpoint; bake the "
                               "folder")
    prefix = PREFIX[kind, comp]
    if comp == "unet":
        names = to_sgm(sorted({n.rpartition(".")[0] for n in tensors}))
        out = {}
        for name, t in tensors.items():
            mod, _, param = name.rpartition(".")
            if mod not in names:
                raise UnsupportedError(f"unet: {name} has no Stability (SGM) name; bake the folder")
            out[f"{prefix}{names[mod]}.{param}"] = t
        return out
    if comp == "vae":
        return {prefix + k: v for k, v in vae_tensors(tensors).items()}
    # transformers 5 saves CLIPTextModel without text_model. (every checkpoint has it)
    text = {(n if n.startswith(("text_model.", "text_projection")) else f"text_model.{n}"): t
            for n, t in tensors.items()}  # fmt: skip
    if comp == "text_encoder_2":
        return {prefix + k: v for k, v in open_clip_tensors(text).items()}
    return {prefix + k: v for k, v in text.items() if k != "text_model.embeddings.position_ids"}


def vae_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An AutoencoderKL's tensors in LDM names (attention projections as 1×1 convolutions)."""
    ups = 1 + max((int(m[3]) for n in tensors if (m := VAE_PART.match(n)) and m[2] == "up_blocks"),
                  default=-1)
    out = {}
    for name, t in tensors.items():
        new = _vae_name(name, ups)
        if ".mid.attn_1." in new and not new.split(".")[-2] == "norm" and t.ndim == 2:
            t = t[:, :, None, None]  # LDM's AttnBlock: Conv2d(c, c, 1)
        out[new] = t
    return out


def _vae_name(name: str, ups: int) -> str:
    if m := VAE_PART.match(name):
        side, kind, i, part, j, rest = m.groups()
        block = int(i) if kind == "down_blocks" else ups - 1 - int(i)
        head = f"{side}.{'down' if kind == 'down_blocks' else 'up'}.{block}"
        if part == "resnets":
            return f"{head}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{head}.{'downsample' if part == 'downsamplers' else 'upsample'}.{rest}"
    side, _, rest = name.partition(".")
    if side not in ("encoder", "decoder"):
        return name  # quant_conv, post_quant_conv
    if rest.startswith("mid_block.resnets."):
        k, _, tail = rest.removeprefix("mid_block.resnets.").partition(".")
        return f"{side}.mid.block_{int(k) + 1}.{tail}"
    if rest.startswith("mid_block.attentions.0."):
        tail = rest.removeprefix("mid_block.attentions.0.")
        mod, _, param = tail.rpartition(".")
        if mod not in VAE_ATTN:
            raise UnsupportedError(f"vae: {name} has no LDM name; bake the folder")
        return f"{side}.mid.attn_1.{VAE_ATTN[mod]}.{param}"
    mod, _, param = rest.rpartition(".")
    return f"{side}.{VAE_TOP.get(mod, mod)}.{param}"


def open_clip_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's tensors (``text_model.*``) in OpenCLIP's names, q/k/v fused."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name == "text_projection.weight":
            out["text_projection"] = t.T.contiguous()
            continue
        rest = name.removeprefix("text_model.")
        if rest in OPEN_CLIP_TOP:
            out[OPEN_CLIP_TOP[rest]] = t
        elif m := re.match(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", rest):
            qkv.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = t
        elif m := re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", rest):
            if m[2] not in OPEN_CLIP:
                raise UnsupportedError(f"text_encoder_2: {name} has no OpenCLIP name; bake the folder")
            out[f"transformer.resblocks.{m[1]}.{OPEN_CLIP[m[2]]}.{m[3]}"] = t
        elif rest != "embeddings.position_ids":
            raise UnsupportedError(f"text_encoder_2: {name} has no OpenCLIP name; bake the folder")
    for name, parts in qkv.items():
        if set(parts) != set("qkv"):
            raise UnsupportedError(f"text_encoder_2: {name} lacks one of q/k/v; bake the folder")
        out[name] = torch.cat([parts[x] for x in "qkv"])  # (3·d, d) rows q, k, v
    return out
