"""LoRA on MoE experts (PEFT ``target_parameters``): read, stacked, merged and written, against PEFT itself.

Tiny seeded Mixtral-, Qwen3-MoE- and gpt-oss-shaped models (transformers 5 stores their experts as 3-D
parameters; gpt-oss transposed), adapters made by PEFT's ``get_peft_model`` + ``save_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from merging.core.adapter import weighted
from merging.errors import IncompatibleAdapters, UnsupportedError
from merging.formats import peft as fp
from merging.formats import sources
from merging.merge.pipeline import merge
from merging.runtime.fold import merge_into
from merging.runtime.stacked import stacked
from merging.strategies import Options
from tests.support.helpers import peft_stacked, rel_err, rewrite_tensors
from tests.support.tiny_models import randomise

SMALL = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64, "num_key_value_heads": 2}  # fmt: skip
MOE = {
    "mixtral": ("MixtralConfig", SMALL | {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", SMALL | {"num_experts": 4, "num_experts_per_tok": 2,
                                            "moe_intermediate_size": 48, "head_dim": 8}),
    "gpt_oss": ("GptOssConfig", SMALL | {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8}),
}  # fmt: skip
BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TOL = 1e-4  # of the adapters' effect on the logits, float32


def save_moe_base(family: str, folder: Path) -> Path:
    """A seeded tiny MoE model of the family saved as a transformers folder."""
    import transformers

    cls, cfg = MOE[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**cfg))
    model.eval().save_pretrained(folder)
    return folder


def load_base(folder: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def make_moe_adapter(base: Path, out: Path, seed: int, params: list[str], modules=("q_proj",), r=2) -> Path:
    """A LoRA made by PEFT on ``base``: ``modules`` by target_modules, ``params`` by target_parameters."""
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=4, init_lora_weights=False, target_modules=list(modules) or None,
                          target_parameters=params)  # fmt: skip
    model = peft.get_peft_model(load_base(base), cfg)
    randomise(model, seed)
    model.save_pretrained(out)
    return out


IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


@pytest.fixture(scope="module", params=sorted(MOE))
def moe(request, tmp_path_factory):
    """(family, base folder, two adapters on attention + both expert parameters, of ranks 2 and 3)."""
    root = tmp_path_factory.mktemp(request.param)
    base = save_moe_base(request.param, root / "base")
    a = make_moe_adapter(base, root / "a", 1, BOTH)
    b = make_moe_adapter(base, root / "b", 2, BOTH[::-1], modules=("q_proj", "v_proj"), r=3)
    return request.param, base, a, b


def peft_reference(base: Path, folders: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """(base logits, PEFT's logits with the folders stacked active)."""
    model = load_base(base)
    y0 = logits(model)
    return y0, logits(peft_stacked(model, [str(f) for f in folders]))


def test_experts_read_one_delta_each_with_the_nesting_of_the_base(moe):
    family, base, a, _ = moe
    ad = sources.load(a)[0]
    experts = sorted(k for k in ad.deltas if ":" in k)
    assert len(experts) == 2 * 2 * 4  # layers × parameters × experts
    d = ad.deltas["model.layers.1.mlp.experts:down_proj.3"]
    # transformers defines gate_up_proj first: PEFT nests it innermost (its tensors under base_layer)
    assert d.target.site.nesting == ("gate_up_proj", "down_proj")
    assert (d.target.site.expert, d.target.site.experts) == (3, 4)
    p = load_base(base).model.layers[1].mlp.experts.down_proj  # (E, out, in), gpt-oss (E, in, out)
    out_in = p.shape[1:] if family != "gpt_oss" else p.shape[1:][::-1]
    assert d.target.matrix_shape == tuple(out_in)


def test_stacked_runtime_matches_peft_on_every_family(moe):
    _, base, a, b = moe
    y0, y_peft = peft_reference(base, [a, b])
    model = load_base(base)
    ads = [sources.load(f)[0] for f in (a, b)]
    with stacked(model, weighted(ads)):
        y = logits(model)
    assert torch.equal(logits(model), y0)  # the parametrizations are gone again
    assert rel_err(y - y0, y_peft - y0) <= TOL
    assert float((y_peft - y0).norm() / y0.norm()) > 1e-3  # the adapters visibly change the output


def test_experts_alone_matter_and_fold_as_peft_merges(moe, tmp_path):
    _, base, *_ = moe
    only = make_moe_adapter(base, tmp_path / "experts", 7, BOTH, modules=())
    y0, y_peft = peft_reference(base, [only])
    assert float((y_peft - y0).norm() / y0.norm()) > 1e-3
    model = load_base(base)
    undo = merge_into(model, weighted(sources.load(only)))
    y = logits(model)
    undo()
    assert torch.equal(logits(model), y0)
    assert rel_err(y - y0, y_peft - y0) <= TOL


@pytest.mark.parametrize("strategy", ["cat", "svd"])
def test_merged_experts_load_in_peft_with_the_stacked_outputs(moe, strategy, tmp_path):
    _, base, a, b = moe
    y0, y_peft = peft_reference(base, [a, b])
    ads = [sources.load(f)[0] for f in (a, b)]
    result = merge(weighted(ads), strategy, Options(rank=5) if strategy == "svd" else None)
    out = fp.write(result.adapters[0], tmp_path / strategy)
    cfg = json.loads((out / "adapter_config.json").read_text())
    names = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    assert sorted(cfg["target_parameters"]) == sorted(names)
    assert "mlp.experts" not in " ".join(cfg["target_modules"])
    import peft

    y = logits(peft.PeftModel.from_pretrained(load_base(base), str(out)))  # as users load it
    assert rel_err(y - y0, y_peft - y0) <= TOL


def test_svd_by_energy_pads_expert_ranks_exactly(moe, tmp_path):
    _, base, a0, b = moe
    a = Path(shutil.copytree(a0, tmp_path / "a"))
    # input a is zero on expert 0 (A.reshape(E, r, in)[0] = 0): the sum has b's rank 3 there, 5 elsewhere
    rewrite_tensors(a, lambda t: [t[k][:2].zero_() for k in t if "experts" in k and "lora_A" in k])
    y0, y_peft = peft_reference(base, [a, b])
    ads = [sources.load(f)[0] for f in (a, b)]
    result = merge(weighted(ads), "svd", Options(energy=0.999999))
    ranks = {r.module.rpartition(".")[2]: r.rank for r in result.modules if ":" in r.module}
    assert ranks["0"] == 3 and ranks["1"] == 5  # experts of one parameter at different ranks: padded
    out = fp.write(result.adapters[0], tmp_path / "svd")
    import peft

    y = logits(peft.PeftModel.from_pretrained(load_base(base), str(out)))
    assert rel_err(y - y0, y_peft - y0) <= 1e-3  # energy 1 − 1e-6 drops at most that share of ‖ΔW‖


def test_one_expert_parameter_needs_no_base_order(moe, tmp_path):
    _, base, *_ = moe
    one = make_moe_adapter(base, tmp_path / "down", 3, ["mlp.experts.down_proj"])
    cfg_file = one / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(cfg | {"base_model_name_or_path": "nowhere/at-all"}))
    ad = sources.load(one)[0]
    assert {k.split(":")[1].split(".")[0] for k in ad.deltas if ":" in k} == {"down_proj"}
    y0, y_peft = peft_reference(base, [one])
    model = load_base(base)
    with stacked(model, weighted([ad])):
        y = logits(model)
    assert rel_err(y - y0, y_peft - y0) <= TOL


def test_several_parameters_without_the_base_are_refused_in_one_line(moe, tmp_path):
    _, _, a, _ = moe
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in a.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "nowhere/at-all"}))
    with pytest.raises(UnsupportedError) as e:
        sources.load(copy)
    msg = str(e.value)
    assert "\n" not in msg and "parameter order" in msg and "nowhere/at-all" in msg


def test_differing_target_parameters_are_refused_as_peft_refuses(moe, tmp_path):
    _, base, a, _ = moe
    other = make_moe_adapter(base, tmp_path / "down", 4, ["mlp.experts.down_proj"])
    with pytest.raises(ValueError, match="must target the same set"):  # PEFT itself will not stack them
        peft_stacked(load_base(base), [str(a), str(other)])
    ads = [sources.load(f)[0] for f in (a, other)]
    model = load_base(base)
    for run in (lambda: merge(weighted(ads), "cat"), lambda: stacked(model, weighted(ads)).__enter__()):
        with pytest.raises(IncompatibleAdapters) as e:
            run()
        msg = str(e.value)
        assert "\n" not in msg and str(a) in msg and str(other) in msg


def test_bake_folds_experts_as_peft_stacks_them(moe, tmp_path):
    """Mixtral and Qwen3-MoE checkpoints store one tensor per expert (transformers converts them): the
    baked folder loads in transformers with PEFT's stacked outputs, and untouched tensors stay equal."""
    from safetensors.torch import load_file

    from merging.export.bake import bake

    _, base, a, b = moe
    y0, y_peft = peft_reference(base, [a, b])
    out = bake(base, weighted([sources.load(f)[0] for f in (a, b)]), tmp_path / "baked")
    assert rel_err(logits(load_base(out)) - y0, y_peft - y0) <= TOL
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    k, q = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(before[k], after[k]) and not torch.equal(before[q], after[q])


def test_verify_judges_a_moe_merge_with_peft(moe, tmp_path):
    from click.testing import CliRunner
    from merging_cli.main import cli

    _, base, a, b = moe
    args = ["verify", str(a), str(b), "--base", str(base), "-s", "cat", "-s", "svd", "--rank", "5",
            "--device", "cpu", "--json"]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert len(doc["rows"]) == 2
    for row in doc["rows"]:
        assert row["passed"] and row["reference"] == "peft" and row["loaded_by"] == "peft", row
        assert row["effect_rel_error"] <= TOL


def test_inspect_shows_experts_as_a_range(moe):
    from click.testing import CliRunner
    from merging_cli.main import cli

    _, _, a, _ = moe
    res = CliRunner().invoke(cli, ["inspect", str(a)])
    assert res.exit_code == 0, res.output
    assert "0–1 × experts 0–3" in res.output


ADDITIVE = ["cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "knots", "core",
            "tsv", "iso_c", "iso_cts"]  # fmt: skip


@pytest.mark.parametrize("strategy", ADDITIVE)
def test_every_additive_strategy_merges_expert_by_expert(strategy, tmp_path_factory):
    """Each strategy runs per expert and its output loads in PEFT on the experts it names; the exact ones
    (cat, core with its linear inner merge) give PEFT's stacked outputs."""
    import peft

    root = tmp_path_factory.mktemp("strategies")
    base = save_moe_base("mixtral", root / "base")
    a = make_moe_adapter(base, root / "a", 1, BOTH, r=2)
    b = make_moe_adapter(base, root / "b", 2, BOTH, r=2)  # equal ranks: linear needs them
    ads = [sources.load(f)[0] for f in (a, b)]
    result = merge(weighted(ads), strategy, Options(rank=4, inner="linear"))
    merged = result.adapters[0]
    assert sum(":" in k for k in merged.deltas) == 16  # every expert of both parameters in both layers
    out = fp.write(merged, root / "out")
    y = logits(peft.PeftModel.from_pretrained(load_base(base), str(out)))
    model = load_base(base)
    with stacked(model, weighted([merged])):
        assert rel_err(logits(model), y) <= 1e-5  # what we merged is what PEFT loads
    if strategy in ("cat", "core"):
        y0, y_peft = peft_reference(base, [a, b])
        assert rel_err(y - y0, y_peft - y0) <= TOL


def test_other_formats_refuse_expert_deltas_in_one_line(moe, tmp_path):
    from merging.formats import kohya

    _, _, a, _ = moe
    with pytest.raises(UnsupportedError) as e:
        kohya.write(sources.load(a)[0], tmp_path / "x.safetensors")
    assert "\n" not in str(e.value) and "target_parameters" in str(e.value) and "peft" in str(e.value)


def test_bake_equals_peft_merge_and_unload(moe, tmp_path):
    """The baked folder holds what PEFT's own ``merge_and_unload`` gives, tensor for tensor (the experts
    now folded one at a time)."""
    from merging.export.bake import bake

    _, base, a, b = moe
    peft_model = peft_stacked(load_base(base), [str(a), str(b)])
    want = peft_model.merge_and_unload().state_dict()
    out = bake(base, weighted([sources.load(f)[0] for f in (a, b)]), tmp_path / "baked")
    got = load_base(out).state_dict()
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert rel_err(got[k], w) <= 1e-6, k


FOLD_PEAK = """
import sys
from pathlib import Path

import transformers

from merging.core.adapter import weighted
from merging.formats import sources
from merging.runtime.fold import fold_into


def status(key):
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key))
    return int(line.split()[1]) * 1024


base, adapter, out = sys.argv[1:]
model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
pairs = weighted(sources.load(adapter))
Path("/proc/self/clear_refs").write_text("5")  # VmHWM reset to the current RSS (Linux >= 4.0)
start = status("VmRSS:")
fold_into(model, pairs)
print(status("VmHWM:") - start)
model.save_pretrained(out)
"""


def _folded_apart(base: Path, adapter: Path, out: Path) -> int:
    """Bytes a fresh process's peak RSS rose by while the bake's fold (``fold_into``) ran, nothing else in
    it; the folded model is saved to ``out``."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", FOLD_PEAK, str(base), str(adapter), str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_experts_fold_one_at_a_time(tmp_path):
    """The bake's fold holds one expert's ΔW, not a whole parameter's: 64 experts of (512, 128) float32
    (16 MiB per parameter, 0.25 MiB per expert) fold with a peak well under one parameter's ΔW, measured in
    a process that does nothing else; what it folded is PEFT's merge_and_unload."""
    import transformers

    cfg = SMALL | {"hidden_size": 128, "intermediate_size": 256, "num_local_experts": 64,
                   "num_hidden_layers": 1}  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg))
    model.eval().save_pretrained(tmp_path / "base")
    a = make_moe_adapter(tmp_path / "base", tmp_path / "a", 1, ["mlp.experts.gate_up_proj"], modules=(), r=8)
    growth = _folded_apart(tmp_path / "base", a, tmp_path / "folded")
    p = load_base(tmp_path / "folded").model.layers[0].mlp.experts.gate_up_proj
    assert tuple(p.shape) == (64, 512, 128)
    whole = p.numel() * 4  # one parameter's ΔW in float32
    assert growth < whole / 4, f"{growth / 2**20:.1f} MiB for a parameter of {whole / 2**20:.0f} MiB"
    peft_model = peft_stacked(load_base(tmp_path / "base"), [str(a)]).merge_and_unload()
    assert rel_err(p, peft_model.model.layers[0].mlp.experts.gate_up_proj) <= 1e-6
