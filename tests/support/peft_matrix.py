"""PEFT's custom-model test matrix, rebuilt here: small seeded models with every layer kind PEFT adapts
(Linear, Embedding, transformers' Conv1D, Conv1d/2d/3d with and without groups, 1×1 kernels, multi-head
attention) and the LoRA / LoHa / LoKr / IA³ / AdaLoRA configurations PEFT's own tests run on them; and a
LoRA with a LoHa/LoKr on one conv (kind ``lora+loha``: PEFT's PeftMixedModel is the reference for the pair).

Each row is taken through what a user does: ``inspect``, ``cat`` of one adapter (must equal the adapter),
``cat`` of two (must equal PEFT's stacked forward of both) and ``linear``; every output is reloaded by
PEFT. ``outcome`` classifies a row as exact / refused / unloadable / wrong / crash.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merging.base.layout import BaseLayout
from merging.core.adapter import weighted
from merging.errors import MergingError
from merging.formats import peft as peft_format
from merging.merge.pipeline import merge
from merging.merge.result import write_result
from tests.support.helpers import peft_stacked, rel_err
from tests.support.tiny_models import randomise

# ---------------------------------------------------------------- the models (one adapted part each)


class Net(nn.Module):
    """``pre`` → optional ``body`` (the layer kind under test) → flatten → ``lin0`` head."""

    def __init__(self, body: nn.Module | None, shape: tuple[int, ...], feat: int, emb: int = 0) -> None:
        super().__init__()
        self.shape = shape  # what the (N, 10) input is reshaped to before the body
        self.emb = nn.Embedding(emb, 6) if emb else None
        self.body = body
        self.attention = isinstance(body, nn.MultiheadAttention)  # PEFT wraps it: remember the kind
        self.lin0 = nn.Linear(feat, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) if self.emb is not None else x.to(self.lin0.weight.dtype).reshape(-1, *self.shape)
        if self.attention:
            h = self.body(h, h, h)[0]
        elif self.body is not None:
            h = torch.relu(self.body(h))
        return torch.log_softmax(self.lin0(h.flatten(1)), dim=-1)


class Mlp(nn.Module):
    """lin0 (10 → 24) → relu → lin1 (24 → 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 24), nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(x.to(self.lin0.weight.dtype)))), dim=-1)


def _gpt2_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(4, 6)  # weight (6, 4): in 6, out 4


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": Mlp,
    "emb_conv1d": lambda: Net(_gpt2_conv1d(), (), 5 * 4, emb=50),  # tokens (N, 5)
    "conv1d": lambda: Net(nn.Conv1d(2, 6, 2), (2, 5), 6 * 4),
    "conv1d_groups": lambda: Net(nn.Conv1d(4, 8, 3, groups=2), (4, 5), 8 * 3),
    "conv1d_k1": lambda: Net(nn.Conv1d(2, 8, 1), (2, 5), 8 * 5),
    "conv2d": lambda: Net(nn.Conv2d(5, 10, 3, padding=1), (5, 2, 2), 10 * 4),
    "conv2d_1x1": lambda: Net(nn.Conv2d(2, 10, 1), (2, 5, 1), 10 * 5),
    "conv2d_groups": lambda: Net(nn.Conv2d(8, 8, 3, groups=4, padding=1), (8, 5, 1), 8 * 5),
    "conv2d_groups2": lambda: Net(nn.Conv2d(4, 8, 3, groups=2, padding=1), (4, 5, 1), 8 * 5),
    "conv3d": lambda: Net(nn.Conv3d(5, 10, 3, padding=1), (5, 2, 1, 1), 10 * 2),
    "mha": lambda: Net(nn.MultiheadAttention(10, 2), (1, 10), 10),
}


def build(model: str) -> nn.Module:
    """The model, seeded: the same weights every time; in float64, so that an effect of 1e-4 of the output
    (a Tucker LoHa's three small factors) is still measured to 1e-4."""
    torch.manual_seed(0)
    return MODELS[model]().double().eval()


def inputs(model: str) -> torch.Tensor:
    """A fixed input batch: token ids for the embedding model, (4, 10) floats (conv2d: (4, 20)) otherwise."""
    g = torch.Generator().manual_seed(1)
    if model == "emb_conv1d":
        return torch.randint(0, 50, (4, 5), generator=g)
    return torch.randn(4, 20 if model == "conv2d" else 10, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- the rows

Row = tuple[str, str, str, dict[str, Any]]  # (name, model, kind, config overrides)

_CONVS = ("conv1d", "conv1d_k1", "conv2d", "conv2d_1x1", "conv3d")
_GROUPED = ("conv1d_groups", "conv2d_groups", "conv2d_groups2")
_EFFECTIVE = ("conv1d", "conv2d")  # LoHa/LoKr's Tucker form (use_effective_conv2d)


def _rows() -> list[Row]:
    rows: list[Row] = [
        ("mlp lora", "mlp", "lora", {"target_modules": ["lin0", "lin1"]}),
        ("mlp lora alpha", "mlp", "lora", {"target_modules": ["lin0"], "lora_alpha": 4}),
        ("mlp lora save", "mlp", "lora", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
        ("mlp lora bias", "mlp", "lora", {"target_modules": ["lin0", "lin1"], "lora_bias": True}),
        ("mlp dora", "mlp", "lora", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
        ("mlp rslora", "mlp", "lora", {"target_modules": ["lin0"], "use_rslora": True}),
        ("emb+conv1D lora", "emb_conv1d", "lora", {"target_modules": ["emb", "body"]}),
        ("emb lora", "emb_conv1d", "lora", {"target_modules": ["emb"]}),
        ("conv1D dora", "emb_conv1d", "lora", {"target_modules": ["body"], "use_dora": True}),
        ("emb dora", "emb_conv1d", "lora", {"target_modules": ["emb"], "use_dora": True}),
        ("mha lora", "mha", "lora", {"target_modules": ["body"]}),
        ("mha+lin lora", "mha", "lora", {"target_modules": ["body", "lin0"]}),
        ("mlp adalora", "mlp", "adalora", {"target_modules": ["lin0", "lin1"]}),
        ("conv2d adalora", "conv2d", "adalora", {"target_modules": ["body", "lin0"]}),
        ("mlp kasa", "mlp", "lora", {"target_modules": ["lin0"], "r": 4, "kasa": True}),
        ("mlp monteclora", "mlp", "lora", {"target_modules": ["lin0"], "monteclora": True}),
        ("mlp velora", "mlp", "lora", {"target_modules": ["lin0"], "velora": True}),
        ("mlp bdlora", "mlp", "lora", {"target_modules": ["lin0"], "bdlora": True}),
        ("mlp ia3", "mlp", "ia3", {"target_modules": ["lin0", "lin1"], "feedforward_modules": []}),
        ("mlp ia3 ff", "mlp", "ia3", {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin0"]}),
        ("conv1D ia3", "emb_conv1d", "ia3", {"target_modules": ["body"], "feedforward_modules": ["body"]}),
        ("mlp loha", "mlp", "loha", {"target_modules": ["lin0", "lin1"]}),
        ("mlp lokr", "mlp", "lokr", {"target_modules": ["lin0", "lin1"]}),
        ("mlp lokr both", "mlp", "lokr", {"target_modules": ["lin0"], "decompose_both": True, "r": 1}),
    ]  # fmt: skip
    for m in _CONVS:
        rows += [
            (f"{m} lora", m, "lora", {"target_modules": ["body", "lin0"]}),
            (f"{m} lora bias", m, "lora", {"target_modules": ["body"], "lora_bias": True, "lora_alpha": 32}),
            (f"{m} dora", m, "lora", {"target_modules": ["body", "lin0"], "use_dora": True}),
            (f"{m} ia3", m, "ia3", {"target_modules": ["body", "lin0"], "feedforward_modules": []}),
            (f"{m} ia3 ff", m, "ia3", {"target_modules": ["body", "lin0"], "feedforward_modules": ["body"]}),
            (f"{m} loha", m, "loha", {"target_modules": ["body", "lin0"]}),
            (f"{m} lokr", m, "lokr", {"target_modules": ["body", "lin0"]}),
        ]
    for m in _EFFECTIVE:
        eff = {"target_modules": ["body"], "use_effective_conv2d": True, "r": 2}
        rows += [(f"{m} loha effective", m, "loha", eff), (f"{m} lokr effective", m, "lokr", eff)]
        rows += [(f"{m} lokr effective both", m, "lokr", eff | {"decompose_both": True})]
    for m in _GROUPED:
        rows += [
            (f"{m} lora", m, "lora", {"target_modules": ["body"], "r": 4}),
            (f"{m} dora", m, "lora", {"target_modules": ["body"], "r": 4, "use_dora": True}),
            (f"{m} ia3", m, "ia3", {"target_modules": ["body"], "feedforward_modules": []}),
            (f"{m} loha", m, "loha", {"target_modules": ["body"], "r": 4}),
            (f"{m} lokr", m, "lokr", {"target_modules": ["body"], "r": 4}),
        ]
    for m in ("conv2d", *_GROUPED):  # a LoRA then a LoHa/LoKr on one layer: PEFT's mixed model stacks them
        mixed = {"target_modules": ["body"], "r": 4}
        rows += [(f"{m} lora+{k}", m, f"lora+{k}", mixed) for k in ("loha", "lokr")]
    return rows


ROWS = _rows()
ROW_NAMES = [r[0] for r in ROWS]


def _config(kind: str, overrides: dict[str, Any]):
    import peft

    o = dict(overrides)
    if o.pop("kasa", False):
        o["kasa_config"] = peft.KasaConfig()
    if o.pop("monteclora", False):
        o["monteclora_config"] = peft.MontecloraConfig(num_samples=2)
    if o.pop("velora", False):
        o["velora_config"] = peft.VeloraConfig(num_groups=2, init_type="random")
    if o.pop("bdlora", False):
        from peft.tuners.lora.config import BdLoraConfig

        o["use_bdlora"] = BdLoraConfig(target_modules_bd_a=["lin0"], nblocks=2)
    if kind == "lora":
        return peft.LoraConfig(init_lora_weights=False, **o)
    if kind == "adalora":
        return peft.AdaLoraConfig(init_lora_weights=False, total_step=1, **o)
    if kind == "ia3":
        return peft.IA3Config(init_ia3_weights=False, **o)
    return {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[kind](init_weights=False, **o)


def make_adapter(row: Row, folder: Path, seed: int) -> Path:
    """The row's adapter, made and saved by PEFT, its weights seeded random (AdaLoRA: E and ranknum too); a
    mixed row's (kind ``lora+loha``) is the first kind for seed 1, the second for any other."""
    import peft

    name, model, kind, overrides = row
    kinds = kind.split("+")
    kind = kinds[0] if seed == 1 else kinds[-1]
    pm = peft.get_peft_model(build(model), _config(kind, overrides))
    randomise(pm, zlib.crc32(f"{name}/{seed}".encode()))
    pm.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- one row through the tool


@dataclass
class Outcome:
    """Each step's result: 'exact', 'refused: ...', 'unloadable: ...', 'wrong: ...' or 'crash: ...'."""

    steps: dict[str, str] = field(default_factory=dict)

    @property
    def worst(self) -> str:
        order = ("crash", "wrong", "unloadable", "refused", "exact")
        kinds = [s.split(":")[0] for s in self.steps.values()]
        return next(k for k in order if k in kinds)


def runtime_and_peft(model: str, pairs: list, folders: list[Path]) -> tuple[torch.Tensor, ...]:
    """The matrix model ``model`` on its inputs: bare, PEFT stacking ``folders``, and our runtime stacking
    ``pairs`` (the same adapters as read by us), each on a fresh build of the seeded model."""
    from merging.runtime.stacked import stacked

    x = inputs(model)
    with torch.no_grad():
        bare = build(model)(x)
        ref = peft_stacked(build(model), folders)(x)
        with stacked(build(model), pairs) as ours:
            got = ours(x)
    return bare, ref, got


def _out(model: str, module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module(inputs(model))


def _merged(row: Row, folders: list[Path], strategy: str, out: Path) -> Path:
    model = row[1]
    base = build(model)
    layout = BaseLayout.from_model(base)
    weights = {
        n.removesuffix(".weight"): p.detach() for n, p in base.named_parameters() if n.endswith(".weight")
    }
    ads = [peft_format.read(f).refine_targets(layout.modules) for f in folders]
    result = merge(weighted(ads), strategy, base_weights=weights.__getitem__)
    return write_result(result, out, {}, base=layout)


def _step(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except MergingError as e:
        assert "\n" not in str(e), f"a refusal of more than one line: {e}"
        return f"refused: {e}"
    except Exception as e:  # noqa: BLE001 - classified, reported by the caller
        return f"crash: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _reload(row: Row, out: Path) -> torch.Tensor | str:
    import peft

    try:
        return _out(row[1], peft.PeftModel.from_pretrained(build(row[1]), out))
    except Exception as e:  # noqa: BLE001
        return f"unloadable: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _judge(row: Row, out: Path, ref: torch.Tensor) -> str:
    got = _reload(row, out)
    if isinstance(got, str):
        return got
    bare = _out(row[1], build(row[1]))
    err = rel_err(got - bare, ref - bare)
    return "exact" if err < 1e-4 else f"wrong: effect error {err:.2e}"


def outcome(row: Row, tmp: Path) -> Outcome:
    """Run one row: inspect, identity cat, pair cat and linear, each reloaded by PEFT."""
    import peft
    from click.testing import CliRunner
    from merging_cli.main import cli

    res = Outcome()
    try:
        a, b = make_adapter(row, tmp / "a", 1), make_adapter(row, tmp / "b", 2)
    except (ValueError, TypeError, NotImplementedError) as e:
        res.steps["make"] = f"peft refuses: {str(e).splitlines()[0][:160]}"
        return res
    model = row[1]

    def inspect() -> str:
        r = CliRunner().invoke(cli, ["inspect", str(a)])
        if r.exit_code == 0:
            return "exact"
        if isinstance(r.exception, SystemExit) or r.exception is None:
            return f"refused: {r.output.strip()}"
        return f"crash: {type(r.exception).__name__}: {r.exception}"

    res.steps["inspect"] = _step(inspect)
    one = _out(model, peft.PeftModel.from_pretrained(build(model), a))
    res.steps["cat 1"] = _step(lambda: _judge(row, _merged(row, [a], "cat", tmp / "one"), one))
    try:
        pair = _out(model, peft_stacked(build(model), [a, b], mixed="+" in row[2]))
    except Exception as e:  # noqa: BLE001 - PEFT itself cannot stack the pair
        res.steps["cat 2"] = f"peft refuses: {str(e).splitlines()[0][:160]}"
    else:
        res.steps["cat 2"] = _step(lambda: _judge(row, _merged(row, [a, b], "cat", tmp / "two"), pair))

    def linear() -> str:
        got = _reload(row, _merged(row, [a, b], "linear", tmp / "lin"))
        return got if isinstance(got, str) else "exact"  # linear is approximate: it must load

    res.steps["linear"] = _step(linear)
    return res


def main() -> None:
    """Print each row's outcome and the totals (python -m tests.support.peft_matrix)."""
    import tempfile
    from collections import Counter

    totals: Counter[str] = Counter()
    for row in ROWS:
        with tempfile.TemporaryDirectory() as tmp:
            res = outcome(row, Path(tmp))
        worst = "peft refuses" if "make" in res.steps else res.worst
        totals[worst] += 1
        detail = "; ".join(f"{k}: {v}" for k, v in res.steps.items() if not v.startswith("exact"))
        print(f"{row[0]:32} {worst:10} {detail[:300]}", flush=True)
    print(dict(totals))


if __name__ == "__main__":
    main()
