"""Grouped convolutions (nn.Conv1d/2d with groups > 1) of PEFT's test matrix, with a base known by its weights
alone (``--base model.safetensors``), and PEFT's LoRA mixed with a LoHa/LoKr on one grouped conv; judged by
PEFT loading what ``merge`` writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support import peft_matrix as pm

pytestmark = pytest.mark.model  # PEFT builds and saves a small model per adapter


def _adapters(tmp_path: Path, model: str, kinds: tuple[str, ...]) -> dict[str, Path]:
    """PEFT-made adapters of the matrix rows ``<model> <kind>``; the model's weights as model.safetensors."""
    from safetensors.torch import save_file

    rows = {k: next(r for r in pm.ROWS if r[0] == f"{model} {k}") for k in kinds}
    folders = {k: pm.make_adapter(row, tmp_path / k, i) for i, (k, row) in enumerate(rows.items(), 1)}
    weights = {k: v.contiguous() for k, v in pm.build(model).state_dict().items()}
    save_file(weights, str(tmp_path / "model.safetensors"))
    return folders


def _merge(tmp_path: Path, folders: list[Path], out: str, base: bool):
    from click.testing import CliRunner
    from merging_cli.main import cli

    args = ["merge", *map(str, folders), "-s", "cat", "-o", str(tmp_path / out)]
    return CliRunner().invoke(cli, args + (["--base", str(tmp_path / "model.safetensors")] if base else []))


@pytest.mark.parametrize(("model", "kind"), [("conv1d_groups", "loha"), ("conv2d_groups2", "lokr")])
def test_loha_lokr_on_a_grouped_conv_with_a_weights_only_base_is_refused(tmp_path, model, kind):
    """A state dict does not record a conv's groups, and PEFT sizes LoHa/LoKr factors by in_channels //
    groups, so nothing says them: the cat is refused in one line naming the module and what works, nothing
    written (as an ungrouped conv's LoRA PEFT could not load it)."""
    folders = _adapters(tmp_path, model, (kind,))
    r = _merge(tmp_path, [folders[kind], folders[kind]], "out", base=True)
    assert r.exit_code == 2 and "module body: " in r.output, r.output
    assert "groups a state dict does not record" in r.output and "config.json as --base" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("model", "kind"), [("conv1d_groups", "loha"), ("conv2d_groups", "lokr")])
def test_lora_and_loha_lokr_on_one_grouped_conv_cat_as_peft_mixed_model_stacks_them(tmp_path, model, kind):
    """PEFT's LoRA on a grouped conv reads all input channels beside the layer, a LoHa/LoKr changes the
    grouped weight itself: PeftMixedModel stacks them (LoRA first: a LoRA on top of a LoHa/LoKr layer
    fails in PEFT 0.21.2, which reads ``groups`` off that layer). cat writes their sum as one full conv's
    LoRA beside the layer, in either order, with the base's weights or without any base (the LoRA says
    the groups): PEFT loads it and gives the mixed model's forward; verify's runtime stacks them the same."""
    import peft

    from merging.core.adapter import weighted
    from merging.formats import peft as peft_format
    from merging.runtime.stacked import stacked
    from tests.support.helpers import peft_stacked, rel_err

    folders = _adapters(tmp_path, model, ("lora", kind))
    x = pm.inputs(model)
    with torch.no_grad():
        bare = pm.build(model)(x)
        ref = peft_stacked(pm.build(model), [folders["lora"], folders[kind]], mixed=True)(x)
    assert rel_err(ref, bare) > 1e-4
    for i, (order, base) in enumerate(((("lora", kind), True), ((kind, "lora"), False))):
        r = _merge(tmp_path, [folders[k] for k in order], f"out{i}", base)
        assert r.exit_code == 0, r.output
        with torch.no_grad():
            got = peft.PeftModel.from_pretrained(pm.build(model), tmp_path / f"out{i}")(x)
        assert rel_err(got - bare, ref - bare) < 1e-6, order
    pairs = weighted([peft_format.read(folders[k]) for k in (kind, "lora")])
    with torch.no_grad(), stacked(pm.build(model), pairs) as ours:
        assert rel_err(ours(x) - bare, ref - bare) < 1e-6


@pytest.mark.parametrize("dims", [(2, 3), (2, 3, 3)])
def test_full_conv_factors_compute_the_grouped_conv_delta(dims):
    """B'·A' run as a full conv equals B·A run as the grouped conv (torch's conv, both layouts), and a LoRA
    that says an ungrouped conv is refused beside a grouped one in one line."""
    import torch.nn.functional as F

    from merging.core.adapter import Adapter, weighted
    from merging.core.deltas import LowRank, Target
    from merging.errors import ShapeMismatch
    from merging.merge.pipeline import merge
    from merging.merge.stack import full_conv_factors

    g, out, per, r, k = 4, 8, dims[0], 3, dims[1:]
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(out, r, generator=gen), torch.randn(r, per, *k, generator=gen)
    bf, af = full_conv_factors(b, a, g)  # (out, g·r), (g·r, g·per, k...)
    conv = F.conv1d if len(k) == 1 else F.conv2d
    x = torch.randn(2, g * per, *(5,) * len(k), generator=gen)
    grouped = conv(x, (b @ a.reshape(r, -1)).reshape(out, per, *k), groups=g)
    full = conv(x, (bf @ af.reshape(g * r, -1)).reshape(out, g * per, *k))
    assert torch.allclose(full, grouped, atol=1e-5) and grouped.norm() > 1
    layer = "conv1d" if len(k) == 1 else "conv2d"
    beside = LowRank(bf, af.reshape(g * r, -1), 1.0, Target(layer, (out, g * per, *k), beside=g))
    plain = LowRank(b, a.reshape(r, -1), 1.0, Target(layer, (out, per, *k)))  # says an ungrouped conv
    with pytest.raises(ShapeMismatch, match=r"^module body: a LoRA on a conv.* not the same layer$"):
        merge(weighted([Adapter("x", {"body": beside}), Adapter("y", {"body": plain})]), "cat")
