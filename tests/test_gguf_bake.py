"""Baking into a GGUF model at its own quantisation, against the gguf package's own quantisers.

The example base's GGUF (SmolLM2-135M-Instruct, Q4_1) comes prepared in the project cache; the reference
for each adapted tensor is computed here from the PEFT folder's raw tensors: gguf's dequantise → + scale·BA
(rows permuted as llama.cpp's convert_hf_to_gguf permutes Llama's q/k) → gguf's quantise.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from merging.core.adapter import weighted
from merging.errors import UnsupportedError
from merging.formats import sources
from merging.storage.files import cache_dir

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "adapters"


def _base_gguf() -> Path:
    models = cache_dir() / "models"
    found = sorted(models.glob("SmolLM2-135M-Instruct*.gguf")) if models.is_dir() else []
    if not found:
        pytest.skip("the example base's GGUF is not prepared (merging example-base)")
    return found[0]


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes q/k."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def baked(tmp_path_factory) -> tuple[Path, Path]:
    from merging.export.gguf_bake import bake_gguf

    base = _base_gguf()
    out = tmp_path_factory.mktemp("gguf") / "baked.gguf"
    bake_gguf(base, weighted(sources.load(EXAMPLES / "add")), out)
    return base, out


def expected_delta(folder: Path, module: str, n_head: int, n_head_kv: int) -> np.ndarray:
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    t = load_file(str(folder / "adapter_model.safetensors"))
    a = t[f"base_model.model.{module}.lora_A.weight"].astype(np.float32)
    b = t[f"base_model.model.{module}.lora_B.weight"].astype(np.float32)
    d = (cfg["lora_alpha"] / cfg["r"]) * (b @ a)
    if module.endswith("q_proj"):
        d = llama_permute(d, n_head)
    if module.endswith("k_proj"):
        d = llama_permute(d, n_head_kv)
    return d


def test_adapted_tensors_are_gguf_dequantise_plus_delta_quantise(baked):
    base, out = baked
    r0, r1 = gguf.GGUFReader(str(base)), gguf.GGUFReader(str(out))
    heads = int(r0.fields["llama.attention.head_count"].contents())
    kv = int(r0.fields["llama.attention.head_count_kv"].contents())
    t0, t1 = {t.name: t for t in r0.tensors}, {t.name: t for t in r1.tensors}
    assert list(t0) == list(t1)
    adapted = 0
    for i in range(int(r0.fields["llama.block_count"].contents())):
        for hf, name in (("q_proj", "attn_q"), ("v_proj", "attn_v")):
            src, got = t0[f"blk.{i}.{name}.weight"], t1[f"blk.{i}.{name}.weight"]
            assert got.tensor_type == src.tensor_type == gguf.GGMLQuantizationType.Q4_1
            w = gguf.quants.dequantize(src.data, src.tensor_type)
            d = expected_delta(EXAMPLES / "add", f"model.layers.{i}.self_attn.{hf}", heads, kv)
            want = gguf.quants.quantize(w + d, src.tensor_type)
            assert np.array_equal(np.asarray(got.data), want), f"blk.{i}.{name}"
            adapted += 1
    assert adapted == 60
    untouched = [n for n in t0 if not (n.endswith("attn_q.weight") or n.endswith("attn_v.weight"))]
    for n in untouched:
        assert np.asarray(t0[n].data).tobytes() == np.asarray(t1[n].data).tobytes(), n
    for key, f in r0.fields.items():
        if not key.startswith("GGUF."):
            assert r1.fields[key].contents() == f.contents(), key


def test_outtype_f16_and_q8_0(tmp_path):
    from merging.export.gguf_bake import bake_gguf

    base = _base_gguf()
    for outtype, qtype in (("f16", gguf.GGMLQuantizationType.F16), ("q8_0", gguf.GGMLQuantizationType.Q8_0)):
        out = bake_gguf(base, weighted(sources.load(EXAMPLES / "add")), tmp_path / f"{outtype}.gguf",
                        outtype=outtype)  # fmt: skip
        r0, r1 = gguf.GGUFReader(str(base)), gguf.GGUFReader(str(out))
        src = next(t for t in r0.tensors if t.name == "blk.3.attn_v.weight")
        got = next(t for t in r1.tensors if t.name == "blk.3.attn_v.weight")
        assert got.tensor_type == qtype
        w = gguf.quants.dequantize(src.data, src.tensor_type)
        d = expected_delta(EXAMPLES / "add", "model.layers.3.self_attn.v_proj", 9, 3)
        want = gguf.quants.dequantize(gguf.quants.quantize(w + d, qtype), qtype)
        assert np.array_equal(gguf.quants.dequantize(got.data, qtype), want)


def test_a_type_gguf_cannot_quantise_is_refused_in_one_line():
    from merging.export.gguf_bake import _out_type

    with pytest.raises(UnsupportedError) as e:
        _out_type("blk.0.attn_q.weight", gguf.GGMLQuantizationType.Q4_K, "same")
    msg = str(e.value)
    assert "\n" not in msg and "Q4_K" in msg and "--outtype q4_1" in msg and "blk.0.attn_q.weight" in msg


def test_an_outtype_gguf_cannot_write_is_refused_before_writing(tmp_path):
    from merging.export.gguf_bake import bake_gguf

    base = _base_gguf()
    with pytest.raises(UnsupportedError):
        bake_gguf(base, weighted(sources.load(EXAMPLES / "add")), tmp_path / "x.gguf", outtype="q2_k")
    assert list(tmp_path.iterdir()) == []


def test_cli_bakes_a_gguf_base(tmp_path):
    from click.testing import CliRunner
    from merging_cli.main import cli

    base = _base_gguf()
    out = tmp_path / "out.gguf"
    res = CliRunner().invoke(cli, ["bake", str(EXAMPLES / "add"), "--base", str(base), "-o", str(out),
                                   "--outtype", "q8_0", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["files"] == {"out.gguf": out.stat().st_size}
    got = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    assert got["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert got["blk.0.attn_k.weight"] == gguf.GGMLQuantizationType.Q4_1  # untouched: as it was
    res = CliRunner().invoke(cli, ["bake", str(EXAMPLES / "add"), "--base", str(EXAMPLES / "add"), "-o",
                                   str(tmp_path / "x"), "--outtype", "f16"])  # fmt: skip
    assert res.exit_code == 2 and ".gguf" in res.output


def test_a_corrupt_gguf_base_is_one_line_naming_it(tmp_path):
    from click.testing import CliRunner
    from merging_cli.main import cli

    bad = tmp_path / "base.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)  # the magic, then nonsense counts
    out = tmp_path / "out.gguf"
    res = CliRunner().invoke(cli, ["bake", str(EXAMPLES / "add"), "--base", str(bad), "-o", str(out)])
    assert res.exit_code == 2 and str(bad) in res.output and "not a readable GGUF file" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()


def test_a_k_proj_delta_is_permuted_by_the_kv_heads(tmp_path):
    """GQA: llama.cpp stores k permuted over the kv heads (3 here, 9 query heads), so ΔW_k must be too."""
    from safetensors.numpy import save_file

    from merging.export.gguf_bake import bake_gguf

    base = _base_gguf()
    r0 = gguf.GGUFReader(str(base))
    heads = int(r0.fields["llama.attention.head_count"].contents())
    kv = int(r0.fields["llama.attention.head_count_kv"].contents())
    t0 = {t.name: t for t in r0.tensors}
    k_out, hidden = (int(x) for x in reversed(t0["blk.0.attn_k.weight"].shape))
    assert kv < heads  # the case the test is for
    rng = np.random.default_rng(5)
    folder = tmp_path / "k"
    folder.mkdir()
    tensors = {}
    for i in (0, 7):
        mod = f"base_model.model.model.layers.{i}.self_attn.k_proj"
        tensors[f"{mod}.lora_A.weight"] = (rng.standard_normal((4, hidden)) * 0.05).astype(np.float32)
        tensors[f"{mod}.lora_B.weight"] = (rng.standard_normal((k_out, 4)) * 0.05).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["k_proj"],
           "task_type": "CAUSAL_LM"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "baked.gguf"
    bake_gguf(base, weighted(sources.load(folder)), out)
    t1 = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    for i in (0, 7):
        src, got = t0[f"blk.{i}.attn_k.weight"], t1[f"blk.{i}.attn_k.weight"]
        w = gguf.quants.dequantize(src.data, src.tensor_type)
        d = expected_delta(folder, f"model.layers.{i}.self_attn.k_proj", heads, kv)
        assert np.array_equal(np.asarray(got.data), gguf.quants.quantize(w + d, src.tensor_type)), f"blk.{i}"
        mod = f"base_model.model.model.layers.{i}.self_attn.k_proj"
        raw = 2.0 * tensors[f"{mod}.lora_B.weight"] @ tensors[f"{mod}.lora_A.weight"]  # not permuted
        assert not np.array_equal(np.asarray(got.data), gguf.quants.quantize(w + raw, src.tensor_type))
    untouched = t0["blk.1.attn_k.weight"], t1["blk.1.attn_k.weight"]
    assert np.asarray(untouched[0].data).tobytes() == np.asarray(untouched[1].data).tobytes()
