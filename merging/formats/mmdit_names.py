"""SD3 / SD3.5 in Stability's MMDiT names (sd-scripts': ``lora_unet_joint_blocks_0_x_block_attn_qkv``) ↔
diffusers' SD3Transformer2DModel, built from the base's real modules like ``bfl_names`` (same pieces).

| after ``lora_unet_joint_blocks_i_`` | diffusers module(s) under ``transformer_blocks.i.`` | rows |
|---|---|---|
| x_block_attn_qkv | attn.to_q / to_k / to_v | fused |
| context_block_attn_qkv | attn.add_q_proj / add_k_proj / add_v_proj | fused |
| x_block_attn2_qkv (SD3.5) | attn2.to_q / to_k / to_v | fused |
| {x,context}_block_attn_proj, x_block_attn2_proj | attn.to_out.0 / attn.to_add_out, attn2.to_out.0 | |
| {x,context}_block_mlp_fc{1,2} | ff.net.{0.proj,2} / ff_context.net.{0.proj,2} | |
| {x,context}_block_adaLN_modulation_1 | norm1.linear / norm1_context.linear | swapped: last block's |

| MMDiT lora_name (after ``lora_unet_``) | diffusers module under ``transformer.`` | rows |
|---|---|---|
| x_embedder_proj, context_embedder | pos_embed.proj, context_embedder | |
| {t,y}_embedder_mlp_{0,2} | time_text_embed.{timestep,text}_embedder.linear_{1,2} | |
| final_layer_linear, final_layer_adaLN_modulation_1 | proj_out, norm_out.linear | swapped halves |

The last joint block's context stream only conditions (``context_pre_only``): its adaLN gives (shift, scale),
which diffusers' norm1_context stores as (scale, shift), as diffusers' single-file converter swaps them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from merging.errors import UnsupportedError
from merging.formats.bfl_names import Piece, fused_rows, row_index, stacked_pieces

BLOCK = {
    "x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block_attn_proj": ("attn.to_out.0",), "context_block_attn_proj": ("attn.to_add_out",),
    "x_block_attn2_proj": ("attn2.to_out.0",),
    "x_block_mlp_fc1": ("ff.net.0.proj",), "x_block_mlp_fc2": ("ff.net.2",),
    "context_block_mlp_fc1": ("ff_context.net.0.proj",), "context_block_mlp_fc2": ("ff_context.net.2",),
    "x_block_adaLN_modulation_1": ("norm1.linear",),
    "context_block_adaLN_modulation_1": ("norm1_context.linear",),
}  # fmt: skip
TOP = {
    "x_embedder_proj": "pos_embed.proj", "context_embedder": "context_embedder",
    "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
    "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
    "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear",
}  # fmt: skip
JOINT = re.compile(r"^transformer\.transformer_blocks\.(\d+)\.")


def is_sd3(modules: Mapping[str, object]) -> bool:
    """Whether a layout's modules hold an SD3 MMDiT (a patch-embedding conv, no single blocks)."""
    single = any(".single_transformer_blocks." in m for m in modules)
    return "transformer.pos_embed.proj" in modules and not single


def _swap(rows: int) -> tuple[tuple[int, int], ...]:
    return ((rows // 2, rows), (0, rows // 2))


def table(modules: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, tuple[Piece, ...]]:
    """MMDiT lora_name → the base's modules and the fused rows each takes, for an SD3 pipeline's modules."""
    if not is_sd3(modules):
        return {}
    out: dict[str, tuple[Piece, ...]] = {}
    for i in sorted({int(m[1]) for mod in modules if (m := JOINT.match(mod))}):
        path = f"transformer.transformer_blocks.{i}"
        for name, parts in BLOCK.items():
            mods = [f"{path}.{p}" for p in parts]
            if all(m in modules for m in mods):
                out[f"lora_unet_joint_blocks_{i}_{name}"] = stacked_pieces(mods, modules)
        ctx, dim = f"{path}.norm1_context.linear", modules.get(f"{path}.attn.to_q", ("", (0,)))[1][0]
        if ctx in modules and modules[ctx][1][0] == 2 * dim:  # context_pre_only: AdaLayerNormContinuous
            name = f"lora_unet_joint_blocks_{i}_context_block_adaLN_modulation_1"
            out[name] = (Piece(ctx, _swap(2 * dim)),)
    for name, part in TOP.items():
        mod = f"transformer.{part}"
        if mod in modules:
            n = modules[mod][1][0]
            rows = _swap(n) if name.endswith("adaLN_modulation_1") else ((0, n),)
            out[f"lora_unet_{name}"] = (Piece(mod, rows),)
    return out


TOP_DOTTED = {
    "x_embedder_proj": "x_embedder.proj", "context_embedder": "context_embedder",
    "t_embedder_mlp_0": "t_embedder.mlp.0", "t_embedder_mlp_2": "t_embedder.mlp.2",
    "y_embedder_mlp_0": "y_embedder.mlp.0", "y_embedder_mlp_2": "y_embedder.mlp.2",
    "final_layer_linear": "final_layer.linear",
    "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
}  # fmt: skip
QK_NORMS = {
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
}  # fmt: skip
CHECKPOINT = "model.diffusion_model."


def _dotted(lora_name: str) -> str:
    """An MMDiT lora_name as its checkpoint module path (``joint_blocks.0.x_block.attn.qkv``)."""
    rest = lora_name.removeprefix("lora_unet_")
    if rest in TOP_DOTTED:
        return TOP_DOTTED[rest]
    i, _, part = rest.removeprefix("joint_blocks_").partition("_")
    part = part.replace("_block_", "_block.", 1).replace("attn_", "attn.").replace("attn2_", "attn2.")
    return f"joint_blocks.{i}." + part.replace("mlp_", "mlp.").replace("modulation_1", "modulation.1")


def checkpoint_tensors(
    tensors: Mapping[str, torch.Tensor], modules: Mapping[str, tuple[str, tuple[int, ...]]]
) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel's tensors (its own names) in the original MMDiT checkpoint's names
    (``model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight``), the inverse of diffusers 0.42's
    ``convert_sd3_transformer_checkpoint_to_diffusers``: fused modules stacked (rows in ``table``'s
    order, swapped halves swapped back), qk norms as ln_q / ln_k, pos_embed.pos_embed as pos_embed.

    Args:
        tensors: the transformer's state dict, without a ``transformer.`` prefix.
        modules: the pipeline layout's modules (``transformer.<path>``), which ``table`` reads.
    """
    out, used = {}, set()
    for name, pieces in table(modules).items():
        for param in ("weight", "bias"):
            parts = [(p, f"{p.module.removeprefix('transformer.')}.{param}") for p in pieces]
            if not all(n in tensors for _, n in parts):
                continue
            first = tensors[parts[0][1]]
            fused = first.new_zeros((fused_rows(pieces), *first.shape[1:]))
            for p, n in parts:
                fused[row_index(p.rows)] = tensors[n]
                used.add(n)
            out[f"{CHECKPOINT}{_dotted(name)}.{param}"] = fused
    for n, t in tensors.items():
        m = re.match(r"^transformer_blocks\.(\d+)\.(attn2?\.norm_\w+)\.weight$", n)
        if n in used:
            continue
        if n == "pos_embed.pos_embed":
            out[f"{CHECKPOINT}pos_embed"] = t
        elif m and m[2] in QK_NORMS:
            out[f"{CHECKPOINT}joint_blocks.{m[1]}.{QK_NORMS[m[2]]}.weight"] = t
        else:
            raise UnsupportedError(f"transformer: {n} has no MMDiT checkpoint name; bake the folder")
    return out
