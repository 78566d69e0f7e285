"""A ~1B-parameter llama-shaped GGUF, random weights, a rank-16 LoRA on every linear: memory at scale.

The model: TinyLlama's shape (22 blocks, hidden 2048, FFN 5632, 32 heads, 4 kv heads) in Q4_1 with random
quantised blocks (fixed scale/min, random 4-bit values), the SmolLM2 GGUF's metadata and tokenizer with the
shape keys changed, written by gguf's own writer one tensor at a time. The LoRA: a PEFT folder
(safetensors + adapter_config.json) on q/k/v/o/gate/up/down, and the same factors as a llama.cpp GGUF
LoRA for ``llama-export-lora`` (B's q/k rows permuted as llama.cpp's converter permutes them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHAPE = {"block_count": 22, "embedding_length": 2048, "feed_forward_length": 5632, "attention.head_count": 32,
         "attention.head_count_kv": 4, "rope.dimension_count": 64}  # fmt: skip
RANK = 16
HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
      "ffn_down": "mlp.down_proj"}  # fmt: skip


def _dims() -> tuple[int, int, int, int, int]:
    h, f = SHAPE["embedding_length"], SHAPE["feed_forward_length"]
    heads, kv = SHAPE["attention.head_count"], SHAPE["attention.head_count_kv"]
    return h, f, heads, kv, h // heads * kv


def linears() -> dict[str, tuple[int, int]]:
    """GGUF stem of each adapted tensor in a block → its (out, in)."""
    h, f, _, _, kv = _dims()
    return {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
            "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}  # fmt: skip


def _q4_1(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_1 blocks (d = 0.002, m = -0.015: weights in ±0.015), as stored bytes (rows, row bytes)."""
    blocks = rng.integers(0, 256, size=(rows * cols // 32, 20), dtype=np.uint8)
    blocks[:, 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    blocks[:, 2:4] = np.frombuffer(np.float16(-0.015).tobytes(), np.uint8)
    return blocks.reshape(rows, cols // 32 * 20)


def make_model(template: Path, out: Path, seed: int = 0) -> int:
    """Write the synthetic model; its parameter count."""
    import gguf

    reader = gguf.GGUFReader(str(template))
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        key = field.name.removeprefix(f"{arch}.")
        value = SHAPE.get(key, field.contents()) if field.name.startswith(f"{arch}.") else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    h, vocab = SHAPE["embedding_length"], int(reader.fields[f"{arch}.vocab_size"].contents())
    tensors: list[tuple[str, tuple[int, ...], bool]] = [("token_embd.weight", (vocab, h), True)]
    for i in range(SHAPE["block_count"]):
        tensors += [(f"blk.{i}.attn_norm.weight", (h,), False), (f"blk.{i}.ffn_norm.weight", (h,), False)]
        tensors += [(f"blk.{i}.{stem}.weight", shape, True) for stem, shape in linears().items()]
    tensors.append(("output_norm.weight", (h,), False))
    q = gguf.GGMLQuantizationType.Q4_1
    for name, shape, quant in tensors:
        if quant:
            byte_shape = (shape[0], shape[1] // 32 * 20)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1], q)
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _, shape, quant in tensors:
        writer.write_tensor_data(_q4_1(*shape, rng) if quant else np.ones(shape, np.float32))
    writer.close()
    return sum(int(np.prod(s)) for _, s, _ in tensors)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's q/k row permutation (per head, the rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_lora(folder: Path, gguf_out: Path, seed: int = 1) -> None:
    """The rank-16 LoRA as a PEFT folder and as a llama.cpp GGUF LoRA (α = r: scale 1 in both)."""
    import gguf
    from safetensors.numpy import save_file

    _, _, heads, kv, _ = _dims()
    rng = np.random.default_rng(seed)
    peft, writer = {}, gguf.GGUFWriter(str(gguf_out), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(RANK))
    for i in range(SHAPE["block_count"]):
        for stem, (out, inp) in linears().items():
            a = (rng.standard_normal((RANK, inp)) / np.sqrt(inp)).astype(np.float32)
            b = (rng.standard_normal((out, RANK)) * 0.01).astype(np.float32)
            mod = f"base_model.model.model.layers.{i}.{HF[stem]}"
            peft[f"{mod}.lora_A.weight"], peft[f"{mod}.lora_B.weight"] = a, b
            perm = {"attn_q": heads, "attn_k": kv}.get(stem)
            writer.add_tensor(f"blk.{i}.{stem}.weight.lora_a", a)
            writer.add_tensor(f"blk.{i}.{stem}.weight.lora_b", b if perm is None else _permute(b, perm))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(peft, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": RANK, "task_type": "CAUSAL_LM",
           "target_modules": sorted({m.rsplit(".", 1)[1] for m in HF.values()})}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
