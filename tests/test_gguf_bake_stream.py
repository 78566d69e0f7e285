"""The GGUF bake's own header and row-chunk streaming, judged by the gguf package's reader and quantisers.

A small llama-shaped base is written here with gguf's own GGUFWriter (mixed types Q4_1, Q8_0, Q5_0, F16,
F32; a string array like a tokenizer's; alignment 64, not the default 32) and a PEFT LoRA on q/k/v/up is
baked into it. The reference for each adapted tensor is gguf's quantise(dequantise(W) + scale·BA) of the
whole tensor (q/k rows permuted as llama.cpp's converter does); the bake works in chunks of 5 rows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest

from merging.core.adapter import weighted
from merging.errors import FormatError
from merging.formats import sources

Q = gguf.GGMLQuantizationType
HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 64, 128, 4, 2, 33  # 33 rows of Q8_0: not a multiple of 64 bytes
KV = HIDDEN // HEADS * KV_HEADS
TYPES = {"attn_q": (Q.Q4_1, HIDDEN), "attn_k": (Q.Q8_0, KV), "attn_v": (Q.F16, KV), "ffn_up": (Q.Q5_0, FFN)}
MODULES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "ffn_up": "mlp.up_proj"}  # fmt: skip


def _stored(w: np.ndarray, qtype) -> np.ndarray:
    return gguf.quants.quantize(w, qtype)


def make_base(path: Path, rng: np.random.Generator) -> Path:
    """A 2-block llama GGUF written by gguf's own writer."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_block_count(2)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_token_list([f"tok{i}" for i in range(VOCAB)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(VOCAB)])
    w.add_string("general.name", "tiny")

    def add(name: str, shape: tuple[int, ...], qtype) -> None:
        data = rng.standard_normal(shape).astype(np.float32)
        w.add_tensor(name, _stored(data, qtype), raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)

    add("token_embd.weight", (VOCAB, HIDDEN), Q.Q8_0)
    for i in range(2):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,), Q.F32)
        for name, (qtype, out) in TYPES.items():
            add(f"blk.{i}.{name}.weight", (out, HIDDEN), qtype)
        add(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN), Q.Q4_0)
    add("output_norm.weight", (HIDDEN,), Q.F32)
    add("output.weight", (VOCAB, HIDDEN), Q.Q8_0)  # last, its size not a multiple of 64: padded at the end
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_lora(folder: Path, rng: np.random.Generator, r: int = 4, alpha: int = 8) -> dict[str, np.ndarray]:
    """A PEFT LoRA folder on q/k/v/up of both blocks; its tensors."""
    from safetensors.numpy import save_file

    folder.mkdir()
    tensors = {}
    for i in range(2):
        for name, (_, out) in TYPES.items():
            mod = f"base_model.model.model.layers.{i}.{MODULES[name]}"
            tensors[f"{mod}.lora_A.weight"] = (rng.standard_normal((r, HIDDEN)) * 0.1).astype(np.float32)
            tensors[f"{mod}.lora_B.weight"] = (rng.standard_normal((out, r)) * 0.1).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "k_proj", "v_proj",
           "up_proj"], "task_type": "CAUSAL_LM"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return tensors


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes q/k."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture
def baked(tmp_path, monkeypatch):
    from merging.export import gguf_bake

    rng = np.random.default_rng(0)
    base = make_base(tmp_path / "base.gguf", rng)
    lora = make_lora(tmp_path / "lora", rng)
    monkeypatch.setattr(gguf_bake, "CHUNK_FLOATS", 5 * HIDDEN)  # chunks of 5 rows, the last one short
    out = gguf_bake.bake_gguf(base, weighted(sources.load(tmp_path / "lora")), tmp_path / "out.gguf")
    return base, out, lora


def test_every_field_and_untouched_tensor_is_the_bases(baked):
    base, out, _ = baked
    r0, r1 = gguf.GGUFReader(str(base)), gguf.GGUFReader(str(out))
    assert r1.alignment == r0.alignment == 64
    assert list(r1.fields) == list(r0.fields)
    for key, f in r0.fields.items():
        assert r1.fields[key].types == f.types and r1.fields[key].contents() == f.contents(), key
    t0, t1 = {t.name: t for t in r0.tensors}, {t.name: t for t in r1.tensors}
    assert list(t1) == list(t0)
    untouched = [n for n in t0 if n.split(".")[-2] not in TYPES]
    assert len(untouched) == 7
    for n in t0:
        assert int(t1[n].data_offset) % 64 == 0, n
        assert t1[n].tensor_type == t0[n].tensor_type and list(t1[n].shape) == list(t0[n].shape), n
    for n in untouched:
        assert np.asarray(t1[n].data).tobytes() == np.asarray(t0[n].data).tobytes(), n
    assert out.stat().st_size == base.stat().st_size  # same types: the same layout, padding included


def test_chunked_tensors_equal_gguf_quantise_of_the_whole_tensor(baked):
    base, out, lora = baked
    t0 = {t.name: t for t in gguf.GGUFReader(str(base)).tensors}
    t1 = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    for i in range(2):
        for name, (qtype, _) in TYPES.items():
            mod = f"base_model.model.model.layers.{i}.{MODULES[name]}"
            d = 2.0 * (lora[f"{mod}.lora_B.weight"] @ lora[f"{mod}.lora_A.weight"])  # α/r = 8/4
            if name == "attn_q":
                d = llama_permute(d, HEADS)
            if name == "attn_k":
                d = llama_permute(d, KV_HEADS)
            src = t0[f"blk.{i}.{name}.weight"]
            want = gguf.quants.quantize(gguf.quants.dequantize(src.data, qtype) + d, qtype)
            got = np.asarray(t1[f"blk.{i}.{name}.weight"].data)
            assert got.tobytes() == want.tobytes(), f"blk.{i}.{name}"


def test_a_truncated_base_is_refused_in_one_line_with_nothing_written(tmp_path):
    from merging.export.gguf_bake import bake_gguf

    rng = np.random.default_rng(1)
    whole = make_base(tmp_path / "whole.gguf", rng).read_bytes()
    make_lora(tmp_path / "lora", rng)
    pairs = weighted(sources.load(tmp_path / "lora"))
    for cut, says in ((len(whole) - 100, "truncated: tensor"), (200, "header truncated")):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(whole[:cut])
        with pytest.raises(FormatError) as e:
            bake_gguf(bad, pairs, tmp_path / "out.gguf")
        msg = str(e.value)
        assert "\n" not in msg and str(bad) in msg and says in msg, msg
        assert not (tmp_path / "out.gguf").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["whole.gguf", "lora", bad.name])
        bad.unlink()


def test_a_low_bit_same_type_bake_warns_once_naming_q8_0(tmp_path, caplog):
    from merging.export.gguf_bake import bake_gguf

    rng = np.random.default_rng(2)
    base = make_base(tmp_path / "base.gguf", rng)
    make_lora(tmp_path / "lora", rng)
    pairs = weighted(sources.load(tmp_path / "lora"))
    with caplog.at_level(logging.WARNING, logger="merging.export.gguf_bake"):
        bake_gguf(base, pairs, tmp_path / "same.gguf")
    lines = [r.getMessage() for r in caplog.records if r.name == "merging.export.gguf_bake"]
    assert len(lines) == 1 and "Q4_1/Q5_0" in lines[0] and "--outtype q8_0" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="merging.export.gguf_bake"):
        bake_gguf(base, pairs, tmp_path / "q8.gguf", outtype="q8_0")
    assert not [r for r in caplog.records if r.name == "merging.export.gguf_bake"]


def test_corrupted_headers_are_read_or_refused_as_format_errors(tmp_path):
    """Random byte edits and cuts: read_header reads the file or raises a one-line FormatError, no other."""
    from merging.storage.gguf_header import read_header

    rng = np.random.default_rng(3)
    whole = bytearray(make_base(tmp_path / "base.gguf", rng).read_bytes())
    end = read_header(tmp_path / "base.gguf").data_offset
    refused = 0
    for i in range(200):
        data = bytearray(whole)
        for at in rng.integers(4, end, size=int(rng.integers(1, 4))):
            data[at] = int(rng.integers(0, 256))
        f = tmp_path / f"{i}.gguf"
        f.write_bytes(bytes(data[: int(rng.integers(end // 2, len(data) + 1))]))
        try:
            read_header(f)
        except FormatError as e:
            assert "\n" not in str(e) and str(f) in str(e)
            refused += 1
        f.unlink()
    assert refused > 50
