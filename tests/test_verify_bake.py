"""verify and bake on the tiny fixture models (the SmolLM2 checks live in test_model_smollm2.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from merging_cli.main import cli

from merging.base.load import resolve_device
from merging.core.adapter import base_shapes, weighted
from merging.errors import DeviceError
from merging.eval.results import Report
from merging.export.bake import bake
from merging.formats import sources
from merging.runtime.stacked import stacked
from tests.support.fixtures import example_input, run
from tests.support.helpers import assert_close


def _invoke(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(cli, [str(a) for a in args])


def test_verify_cli_exact_pass_and_approximate(fx):
    ads = [fx.adapter("llama", n) for n in ("lora", "loha", "lokr", "ia3")]
    r = _invoke("verify", "--base", fx.base("llama"), *ads, "-s", "cat", "-s", "svd", "--rank", "2", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report.pop("schema") == "merging.verify/1"
    assert Report.from_dict(report).to_dict() == report  # typed, and the same JSON as --save writes
    rows = {row["strategy"]: row for row in report["rows"]}
    assert rows["cat"]["passed"] is True and rows["cat"]["effect_rel_error"] < 1e-5
    assert rows["cat"]["weight_error_max"] < 1e-5
    assert rows["svd"]["passed"] is None and rows["svd"]["effect_rel_error"] > 1e-2
    assert rows["svd"]["weight_error_max"] > 1e-2


def test_verify_svd_error_shrinks_with_rank_and_full_rank_passes(fx):
    ads = [fx.adapter("llama", n) for n in ("lora", "lora_b", "loha")]
    errors = []
    for rank in (1, 4, 8, 64):
        r = _invoke("verify", "--base", fx.base("llama"), *ads, "-s", "svd", "--rank", rank, "--json")
        assert r.exit_code == 0, r.output
        row = json.loads(r.output)["rows"][0]
        errors.append(row["effect_rel_error"])
    assert errors[0] > errors[1] > errors[2] > 0.0
    assert errors[3] < 1e-4 and row["passed"] is True


def test_verify_fails_an_exact_merge_that_is_wrong(fx, tmp_path):
    a, b = fx.adapter("llama", "lora"), fx.adapter("llama", "lora_b")
    assert _invoke("merge", a, "-o", tmp_path / "only_a", "-s", "cat").exit_code == 0
    r = _invoke("verify", "--base", fx.base("llama"), a, b, "--merged", tmp_path / "only_a")
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output


def test_verify_merged_folder_uses_recipe_weights(fx, tmp_path):
    a, b = fx.adapter("llama", "lora"), fx.adapter("llama", "ia3")
    assert _invoke("merge", a, b, "-o", tmp_path / "m", "-s", "cat", "-w", "0.5,2").exit_code == 0
    r = _invoke("verify", "--base", fx.base("llama"), a, b, "--merged", tmp_path / "m", "--json")
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["rows"][0]
    assert row["passed"] is True and row["effect_rel_error"] < 1e-5


def test_verify_with_device_map_auto(fx):
    """accelerate's device_map (here all on the CPU) and the deltas following each module's device."""
    ads = [fx.adapter("llama", n) for n in ("lora", "ia3")]
    r = _invoke("verify", "--base", fx.base("llama"), *ads, "-s", "cat", "--device-map", "auto", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["rows"][0]["passed"] is True


def test_device_choice():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda")


def test_verify_cuda_without_gpu_is_one_line(fx):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = _invoke(
        "verify", "--base", fx.base("llama"), fx.adapter("llama", "lora"), "-s", "cat", "--device", "cuda"
    )
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "no CUDA device" in r.output


@pytest.fixture(scope="module")
def sharded_llama(fx, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    fx.load_base("llama").save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) > 3
    return folder


def test_bake_matches_stacked_and_loads_in_transformers(fx, sharded_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    names = ("lora", "ia3", "loha", "lora_mts")
    r = _invoke(
        "bake", "--base", sharded_llama, *(fx.adapter("llama", n) for n in names), "-o", tmp_path / "baked"
    )
    assert r.exit_code == 0, r.output
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "baked").eval()
    x = example_input("llama")
    base = fx.load_base("llama")
    ads = [ad.refine_targets(base_shapes(base)) for n in names for ad in sources.load(fx.adapter("llama", n))]
    y_base = run(base, "llama", x)
    with stacked(base, weighted(ads)):
        y_stack = run(base, "llama", x)
    err = float((run(baked, "llama", x) - y_stack).norm() / (y_stack - y_base).norm())
    assert err <= 1e-4
    assert sorted(p.name for p in (tmp_path / "baked").iterdir()) == sorted(
        p.name for p in sharded_llama.iterdir()
    )


def test_bake_tied_embedding_lora(fx, tmp_path):
    from transformers import AutoModelForCausalLM

    ad = sources.load(fx.adapter("llama_tied", "lora_tied"))[0]
    base_dir = fx.base("llama_tied")
    bake(base_dir, [(ad.refine_targets(base_shapes(fx.load_base("llama_tied"))), 1.0)], tmp_path / "b")
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    model = fx.load_base("llama_tied")
    x = example_input("llama_tied")
    with stacked(model, [(ad.refine_targets(base_shapes(model)), 1.0)]):
        expected = run(model, "llama_tied", x)
    assert_close(run(baked, "llama_tied", x), expected, rtol=1e-5)


BAKE_MEMORY = r"""
import sys, torch
from pathlib import Path
from merging.export.bake import bake
from merging.formats import peft
from merging.core.deltas import LowRank, Target
from merging.core.adapter import Adapter
base, out = Path(sys.argv[1]), Path(sys.argv[2])
g = torch.Generator().manual_seed(0)
t = Target("linear", (2048, 1024))
def lr():
    return LowRank(torch.randn(2048, 4, generator=g), torch.randn(4, 1024, generator=g), 0.01, t)
deltas = {f"model.layers.{i}.mlp.up_proj": lr() for i in range(8)}
def hwm():  # this process image's peak RSS (ru_maxrss would carry the parent's across fork/exec)
    return [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
from merging.base.layout import module_shapes
module_shapes(base)  # imports transformers: a fixed cost, not the bake's working memory
before = hwm()
bake(base, [(Adapter("a", deltas), 1.0)], out)
print(hwm() - before)
"""


def test_bake_peak_memory_stays_near_one_shard(tmp_path):
    """A 330 MB model in ~40 MB shards: baking streams tensor by tensor, holding about one shard at most."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base", max_shard_size="40MB")
    shards = sorted((tmp_path / "base").glob("*.safetensors"))
    total = sum(f.stat().st_size for f in shards)
    largest = max(f.stat().st_size for f in shards)
    assert len(shards) >= 6
    out = subprocess.run([sys.executable, "-c", BAKE_MEMORY, str(tmp_path / "base"), str(tmp_path / "out")],
                         capture_output=True, text=True, check=True)  # fmt: skip
    grew = int(out.stdout.strip().splitlines()[-1])
    assert grew < 1.5 * largest, (
        f"peak grew by {grew / 2**20:.0f} MiB; largest shard {largest / 2**20:.0f} MiB"
    )
    assert grew < total / 2


@pytest.mark.parametrize("case", ["missing", "empty", "unknown_type", "no_weights"])
def test_bad_base_is_one_line(fx, tmp_path, case):
    import shutil

    base = tmp_path / "base"
    if case != "missing":
        base.mkdir()
    if case in ("unknown_type", "no_weights"):
        shutil.copy(fx.base("llama") / "config.json", base / "config.json")
    if case == "unknown_type":
        cfg = json.loads((base / "config.json").read_text()) | {"model_type": "no_such_model"}
        (base / "config.json").write_text(json.dumps(cfg))
    r = _invoke("verify", "--base", base, fx.adapter("llama", "lora"), "-s", "cat")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and str(base) in r.output, r.output
