"""A diffusers UNet's modules in Stability's (SGM / LDM) names, as sd-scripts writes SDXL LoRAs.

Derived from the base's real modules (block and layer counts from its ``down_blocks`` / ``up_blocks``):

| diffusers (under ``unet.``) | SGM |
|---|---|
| conv_in, conv_norm_out, conv_out | input_blocks.0.0, out.0, out.2 |
| time_embedding.linear_{1,2}, add_embedding.linear_{1,2} | time_embed.{0,2}, label_emb.0.{0,2} |
| down_blocks.b.resnets.j / attentions.j | input_blocks.n.0 / input_blocks.n.1 (n counts layers from 1) |
| down_blocks.b.downsamplers.0.conv | input_blocks.n.0.op (the block's last n) |
| mid_block.resnets.0, attentions.0, resnets.1 | middle_block.0, .1, .2 |
| up_blocks.b.resnets.j / attentions.j | output_blocks.n.0 / output_blocks.n.1 (n counts from 0) |
| up_blocks.b.upsamplers.0.conv | output_blocks.n.1.conv, or .2.conv after an attention (the block's last n) |

(diffusers' own SGM mapping puts slot 1 on ``attentions`` always: right for SDXL, whose upsampling blocks
all have attention, wrong for an up block without one, where LDM's ``Upsample`` is at slot 1.)

Inside a resnet: norm1 in_layers.0, conv1 in_layers.2, time_emb_proj emb_layers.1, norm2 out_layers.0,
conv2 out_layers.3, conv_shortcut skip_connection; inside an attention the names are the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}  # fmt: skip
TOP = {
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}  # fmt: skip
MID = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}
PART = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$"
)
SGM_NAME = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_\d")


def _counts(paths: list[str], kind: str, part: str) -> dict[int, int]:
    """block → how many ``part`` layers it has (resnets), from the module paths."""
    out: dict[int, set[int]] = {}
    for p in paths:
        if (m := PART.match(p)) and m[1] == kind and m[3] == part:
            out.setdefault(int(m[2]), set()).add(int(m[4]))
    return {b: len(s) for b, s in out.items()}


def _inner(kind: str, rest: str | None) -> str:
    if rest is None:
        return ""
    if kind == "resnets":
        head, _, tail = rest.partition(".")
        return "." + RESNET.get(head, head) + (f".{tail}" if tail else "")
    return f".{rest}"


def is_sgm_name(lora_name: str) -> bool:
    """Whether a kohya lora_name names a UNet module in Stability's names."""
    return bool(SGM_NAME.match(lora_name))


def to_sgm(unet_paths: Iterable[str]) -> dict[str, str]:
    """diffusers UNet module path → SGM path, for every path the mapping covers."""
    paths = list(unet_paths)
    downs, ups = _counts(paths, "down_blocks", "resnets"), _counts(paths, "up_blocks", "resnets")
    has_down = {int(m[2]) for p in paths if (m := PART.match(p)) and m[3] == "downsamplers"}
    up_attn = ("up_blocks", "attentions")
    has_attn = {int(m[2]) for p in paths if (m := PART.match(p)) and m.group(1, 3) == up_attn}
    start_in, n = {}, 1
    for b in sorted(downs):
        start_in[b], n = n, n + downs[b] + (b in has_down)
    start_out, n = {}, 0
    for b in sorted(ups):
        start_out[b], n = n, n + ups[b]
    out = {}
    for p in paths:
        if p in TOP:
            out[p] = TOP[p]
        elif p.startswith("mid_block."):
            head = ".".join(p.split(".")[1:3])
            if head in MID:
                rest = ".".join(p.split(".")[3:]) or None
                out[p] = MID[head] + _inner(p.split(".")[1], rest)
        elif m := PART.match(p):
            out[p] = _block(m, start_in, start_out, downs, ups, has_attn)
    return {p: s for p, s in out.items() if s}


def _block(m: re.Match, start_in, start_out, downs, ups, has_attn) -> str:
    kind, b, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    if kind == "down_blocks":
        if part == "downsamplers":
            return f"input_blocks.{start_in[b] + downs[b]}.0.op" if rest == "conv" else ""
        return f"input_blocks.{start_in[b] + j}.{0 if part == 'resnets' else 1}{_inner(part, rest)}"
    if part == "upsamplers":
        slot = 2 if b in has_attn else 1
        return f"output_blocks.{start_out[b] + ups[b] - 1}.{slot}.conv" if rest == "conv" else ""
    return f"output_blocks.{start_out[b] + j}.{0 if part == 'resnets' else 1}{_inner(part, rest)}"
