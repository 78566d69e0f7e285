"""Flux in BFL's names (what sd-scripts and most Flux trainers write) ↔ diffusers' FluxTransformer2DModel.

BFL fuses what diffusers splits, so one BFL lora_name can cover several of the base's modules, each a block
of the fused weight's rows; ``final_layer.adaLN_modulation.1`` stores (shift, scale), diffusers'
``norm_out.linear`` (scale, shift): a swap of halves. The table is built from the base's real modules
(block counts and widths come from the base; diffusers' converter hard-codes the full Flux widths):

| BFL lora_name (after ``lora_unet_``) | diffusers module(s) under ``transformer.`` | rows |
|---|---|---|
| double_blocks_i_img_attn_qkv | transformer_blocks.i.attn.to_q / to_k / to_v | fused |
| double_blocks_i_txt_attn_qkv | transformer_blocks.i.attn.add_q_proj / add_k_proj / add_v_proj | fused |
| double_blocks_i_{img,txt}_attn_proj | attn.to_out.0 / attn.to_add_out | |
| double_blocks_i_{img,txt}_mlp_{0,2} | ff.net.0.proj, ff.net.2 / ff_context.* | |
| double_blocks_i_{img,txt}_mod_lin | norm1.linear / norm1_context.linear | |
| single_blocks_i_linear1 | single_transformer_blocks.i.attn.to_q / to_k / to_v, proj_mlp | fused |
| single_blocks_i_linear2, _modulation_lin | proj_out, norm.linear | |
| img_in, txt_in | x_embedder, context_embedder | |
| {time,vector,guidance}_in_{in,out}_layer | time_text_embed.{timestep,text,guidance}_embedder.linear_{1,2} |
| final_layer_linear, final_layer_adaLN_modulation_1 | proj_out, norm_out.linear | swapped halves |

Splitting a delta by rows is exact for LoRA (B's row blocks, A shared), LoHa (both B factors' rows) and a
full diff; for LoKr only when every block is a whole number of W2's rows. Fusing back stacks the parts'
exact low-rank forms: A's rows stacked once each (the A a split fused LoRA shares is written once: rank r
again), B block-diagonal over the rows the parts do not share (rank adds).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from merging.core.deltas import Delta, Dense, Hadamard, Kronecker, LowRank, Target
from merging.errors import UnsupportedError

Rows = tuple[tuple[int, int], ...]  # row ranges of the fused weight, in the module's row order


@dataclass(frozen=True)
class Piece:
    """One base module inside a BFL lora_name: its path and the fused weight's rows it takes."""

    module: str
    rows: Rows


DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",),
}  # fmt: skip
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",), "modulation_lin": ("norm.linear",),
}  # fmt: skip
TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear",
}  # fmt: skip
SWAPPED = "final_layer_adaLN_modulation_1"
BLOCK = re.compile(r"^transformer\.(single_)?transformer_blocks\.(\d+)\.")


def is_flux(modules: Mapping[str, object]) -> bool:
    """Whether a layout's modules hold a Flux transformer (single blocks with proj_mlp, joint blocks)."""
    return any(re.match(r"transformer\.single_transformer_blocks\.\d+\.proj_mlp$", m) for m in modules)


def table(modules: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, tuple[Piece, ...]]:
    """BFL lora_name → the base's modules and the fused rows each takes, for a Flux pipeline's modules."""
    if not is_flux(modules):
        return {}
    blocks = {(bool(m[1]), int(m[2])) for mod in modules if (m := BLOCK.match(mod))}
    out: dict[str, tuple[Piece, ...]] = {}
    for single, i in sorted(blocks):
        kind, names = ("single_blocks", SINGLE) if single else ("double_blocks", DOUBLE)
        path = f"transformer.{'single_' if single else ''}transformer_blocks.{i}"
        for bfl, parts in names.items():
            mods = [f"{path}.{p}" for p in parts]
            if all(m in modules for m in mods):
                out[f"lora_unet_{kind}_{i}_{bfl}"] = stacked_pieces(mods, modules)
    for bfl, part in TOP.items():
        mod = f"transformer.{part}"
        if mod in modules:
            n = modules[mod][1][0]
            rows = ((n // 2, n), (0, n // 2)) if bfl == SWAPPED else ((0, n),)
            out[f"lora_unet_{bfl}"] = (Piece(mod, rows),)
    return out


def stacked_pieces(mods: list[str], modules: Mapping[str, tuple[str, tuple[int, ...]]]) -> tuple[Piece, ...]:
    """Modules fused in this order: each takes the next block of the fused weight's rows."""
    pieces, start = [], 0
    for m in mods:
        n = modules[m][1][0]
        pieces.append(Piece(m, ((start, start + n),)))
        start += n
    return tuple(pieces)


def fused_rows(pieces: tuple[Piece, ...]) -> int:
    """The fused weight's row count."""
    return sum(e - s for p in pieces for s, e in p.rows)


def row_index(rows: Rows) -> torch.Tensor:
    """The fused weight's row numbers of row ranges, in order."""
    return torch.cat([torch.arange(s, e) for s, e in rows])


def take_rows(d: Delta, rows: Rows, name: str) -> Delta:
    """The delta of the fused weight's ``rows`` (in order): exact, or a one-line refusal naming ``name``."""
    idx = row_index(rows)
    target = Target("linear", (len(idx), d.target.matrix_shape[1]))
    if isinstance(d, LowRank):
        pick = {f: getattr(d, f)[idx] for f in ("bias", "magnitude") if getattr(d, f) is not None}
        return replace(d, b=d.b[idx], target=target, **pick)
    if isinstance(d, Hadamard) and d.t1 is None and d.t2 is None:
        return replace(d, w1a=d.w1a[idx], w2a=d.w2a[idx], target=target)
    if isinstance(d, Dense):
        bias = None if d.bias is None else d.bias[idx]
        return replace(d, d=d.d[idx], target=target, bias=bias)
    if isinstance(d, Kronecker):
        return _kron_rows(d, rows, target, name)
    raise UnsupportedError(f"a {type(d).__name__} on a fused BFL module cannot be split by rows")


def _kron_rows(d: Kronecker, rows: Rows, target: Target, name: str) -> Kronecker:
    b = d.raw2().shape[0]  # W2's rows: a row block splits exactly when it is whole W2 blocks
    if any(s % b or e % b for s, e in rows):
        raise UnsupportedError(
            f"a LoKr whose W2 has {b} rows does not split at the fused rows {list(rows)}; "
            "merge it into a LoRA first (merging convert, or merge -s cat) or keep it on the fused module"
        )
    idx = row_index(tuple((s // b, e // b) for s, e in rows))
    if d.w1 is not None:
        return replace(d, w1=d.w1[idx], target=target)
    return replace(d, w1a=d.w1a[idx], target=target)


def split(d: Delta, pieces: tuple[Piece, ...], name: str) -> dict[str, Delta]:
    """A delta read on a BFL lora_name as the deltas of the base's modules it covers."""
    out = d.target.matrix_shape[0]
    if out != fused_rows(pieces):
        mods = ", ".join(p.module for p in pieces)
        raise UnsupportedError(f"{out} output rows, the base's {mods} have {fused_rows(pieces)}")
    if len(pieces) == 1 and pieces[0].rows == ((0, out),):
        return {pieces[0].module: d}
    return {p.module: take_rows(d, p.rows, name) for p in pieces}


def fuse(deltas: Mapping[str, Delta], pieces: tuple[Piece, ...], inputs: int, name: str) -> Delta:
    """The deltas of a BFL lora_name's modules as one delta on the fused weight (absent modules: zero).

    One module taking all rows in order keeps its delta as is; otherwise each part's exact low-rank form,
    with each part's scale folded into its B: A's rows stacked once each (a row the parts share, as the
    split of one fused LoRA shares its whole A, is written once and its B columns add: rank r stays r) and
    B block-diagonal over the rows the parts do not share (rank adds).
    """
    if len(pieces) == 1 and pieces[0].rows == ((0, fused_rows(pieces)),):
        return deltas[pieces[0].module]
    lows = [(p, deltas[p.module].low_rank()) for p in pieces if p.module in deltas]
    if any(lr.magnitude is not None or lr.bias is not None for _, lr in lows):
        raise UnsupportedError(f"{name}: DoRA or a bias delta on a fused BFL module has no kohya form")
    a, where = _distinct_rows([lr.a.float() for _, lr in lows])  # (r', in), each part's row → a's row
    dtype = lows[0][1].b.dtype
    b = torch.zeros(fused_rows(pieces), a.shape[0], dtype=torch.float32)  # (out_fused, r')
    for (p, lr), cols in zip(lows, where, strict=True):
        part = torch.zeros(lr.b.shape[0], a.shape[0]).index_add_(1, cols, lr.scale * lr.b.float())
        b[row_index(p.rows)] += part
    return LowRank(b.to(dtype), a.to(dtype), 1.0, Target("linear", (b.shape[0], inputs)))


def _distinct_rows(mats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The distinct rows of the matrices stacked once (in first-seen order), and each row's index there."""
    seen: dict[bytes, int] = {}
    rows: list[torch.Tensor] = []
    where = []
    for m in mats:
        idx = []
        for row in m:
            key = row.numpy().tobytes()  # equal values ⇔ equal bytes (float32; a −0 kept apart: still exact)
            if key not in seen:
                seen[key] = len(rows)
                rows.append(row)
            idx.append(seen[key])
        where.append(torch.tensor(idx, dtype=torch.long))
    return torch.stack(rows), where
