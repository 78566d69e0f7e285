"""The literature's LoRA merges (knots, core, tsv, iso_c, iso_cts) against dense float64 implementations
written here from the papers' math (issue 24), plus their properties and their plumbing.

The references follow the authors' repositories step by step on dense matrices: concatenate the task
updates and take one SVD (KnOTS), SVD the stacked B's and A's (Core Space), per-task SVDs and polar
factors (TSV-M, Iso-CTS). Only the rank rules differ from the authors' full-space code, as the issue says.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from merging_cli.main import cli

from merging import strategies
from merging.core.adapter import base_shapes, weighted
from merging.core.deltas import Hadamard, Kronecker, LowRank, Scale, Target
from merging.errors import MergingError, UnsupportedError
from merging.formats import peft as fp
from merging.formats import sources
from merging.merge.pipeline import merge
from merging.merge.result import read_recipe
from merging.strategies import Options
from tests.support.helpers import assert_close, forbid_dense

NAMES = ["knots", "core", "tsv", "iso_c", "iso_cts"]
TOL = 1e-6  # the bound: float32 output of a float64 computation
WEIGHTS = [1.0, -0.5, 2.0, 0.7, 1.3]


# ---------------------------------------------------------------- dense float64 references


def dense64(d) -> torch.Tensor:
    """ΔW in float64 straight from the stored tensors (LoHa and LoKr by their definitions)."""
    if isinstance(d, Hadamard):
        return d.scale * ((d.w1a.double() @ d.w1b.double()) * (d.w2a.double() @ d.w2b.double()))
    if isinstance(d, Kronecker):
        w1 = d.w1.double() if d.w1 is not None else d.w1a.double() @ d.w1b.double()
        w2 = d.w2.double() if d.w2 is not None else d.w2a.double() @ d.w2b.double()
        return d.scale * torch.kron(w1, w2)
    return d.scale * (d.b.double() @ d.a.double())


def rank_of(s: torch.Tensor, ref: float) -> int:
    return int((s > 1e-9 * ref).sum())


def polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def ref_inner(t: torch.Tensor, opts: Options, module: str) -> torch.Tensor:
    """TIES as the TIES/KnOTS repositories write it (topk_values_mask, resolve_sign, disjoint_merge)."""
    if opts.inner == "linear":
        return t.sum(0)
    flat = t.reshape(t.shape[0], -1)
    if opts.inner == "dare_ties":
        keep = torch.rand(t.shape, generator=opts.generator(module)) < opts.density
        flat = (t * keep / opts.density).reshape(t.shape[0], -1)
    elif opts.density < 1:
        n = flat.shape[1]
        kth = flat.abs().kthvalue(n - int(n * opts.density), dim=1, keepdim=True).values
        flat = flat * (flat.abs() >= kth)
    sign = torch.sign(flat.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    chosen = flat * torch.where(sign > 0, flat > 0, flat < 0)
    merged = chosen.sum(0) / (chosen != 0).sum(0).clamp(min=1)
    return merged.reshape(t.shape[1:])


def ref_knots(tasks, opts, module):
    u, s, vh = torch.linalg.svd(torch.cat(tasks, dim=1), full_matrices=False)
    keep = s > 1e-5
    u, s, vh = u[:, keep], s[keep], vh[keep]
    blocks = torch.stack([torch.diag(s) @ v for v in vh.split(tasks[0].shape[1], dim=1)])
    return opts.alpha * u @ ref_inner(blocks, opts, module)


def ref_core(bs, as_, opts, module):
    ub = torch.linalg.svd(torch.cat(bs, dim=1), full_matrices=False)[0]
    vha = torch.linalg.svd(torch.cat(as_, dim=0), full_matrices=False)[2]
    cores = torch.stack([ub.T @ b @ a @ vha.T for b, a in zip(bs, as_, strict=True)])
    return opts.alpha * ub @ ref_inner(cores, opts, module) @ vha


def ref_tsv(tasks, opts):
    k = min(tasks[0].shape) // len(tasks)
    us, ss, vs = [], [], []
    for t in tasks:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        n = min(k, rank_of(s, s[0]))
        us, ss, vs = us + [u[:, :n]], ss + [s[:n]], vs + [vh[:n]]
    u, s, v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0).T
    return opts.alpha * polar(u) @ torch.diag(s) @ polar(v).T


def ref_iso_c(tasks, opts):
    u, s, vh = torch.linalg.svd(sum(tasks), full_matrices=False)
    rho = rank_of(s, s[0])
    return opts.alpha * s[:rho].mean() * u[:, :rho] @ vh[:rho]


def ref_iso_cts(tasks, opts):
    u, s, vh = torch.linalg.svd(sum(tasks), full_matrices=False)
    p, n_tasks = rank_of(s, s[0]), len(tasks)
    c0 = int(p * opts.common_fraction)
    ts = round((p - c0) / n_tasks) * n_tasks
    c = p - ts
    d = (p - c) // n_tasks
    assert c >= 0 and d > 0, "the test cases stay where the authors' formula needs no guard"
    us, ss, vs = [u[:, :c]], [s[:c]], [vh[:c]]
    for t in tasks:
        w = t - u[:, :c] @ u[:, :c].T @ t
        ui, si, vhi = torch.linalg.svd(w, full_matrices=False)
        n = min(d, rank_of(si, s[0]))
        us, ss, vs = us + [ui[:, :n]], ss + [si[:n]], vs + [vhi[:n]]
    uc, sc, vc = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0).T
    return opts.alpha * sc.mean() * polar(uc) @ polar(vc).T


def reference(name, deltas, weights, opts, module):
    tasks = [w * dense64(d) for d, w in zip(deltas, weights, strict=True)]
    if name == "knots":
        return ref_knots(tasks, opts, module)
    if name == "core":  # the core needs the factors: c_i folded into B as the issue says
        lrs = [d.low_rank() for d in deltas]
        bs = [w * lr.scale * lr.b.double() for lr, w in zip(lrs, weights, strict=True)]
        return ref_core(bs, [lr.a.double() for lr in lrs], opts, module)
    return {"tsv": ref_tsv, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts}[name](tasks, opts)


def ours(name, deltas, weights, opts, module="m") -> torch.Tensor:
    out = strategies.get(name).fn(deltas, weights, opts, module)
    assert isinstance(out, LowRank) and out.scale == 1.0
    return out.b.double() @ out.a.double()


# ---------------------------------------------------------------- inputs


_READ: dict[tuple[str, ...], list] = {}


def _read(fx, names):
    """The fixture adapters, read once per session (they are never modified)."""
    key = tuple(names)
    if key not in _READ:
        shapes = base_shapes(fx.load_base("llama"))
        _READ[key] = [fp.read(fx.adapter("llama", n)).refine_targets(shapes) for n in names]
    return _READ[key]


def _random(ranks, shape=(48, 40), seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    t = Target("linear", shape)
    return [
        LowRank(torch.randn(shape[0], r, generator=g), torch.randn(r, shape[1], generator=g), scale, t)
        for r in ranks
    ]


COMBOS = {  # PEFT-written: mixed ranks, rslora, rank/alpha patterns, LoHa, LoKr
    "mixed": ["lora", "lora_r8", "lora_rslora", "lora_patterns"],
    "lycoris": ["lora", "loha", "lokr"],
}
OPTS = {
    "knots": [Options(inner="ties", density=0.3), Options(inner="dare_ties", density=0.6, seed=3),
              Options(inner="linear", alpha=0.5)],
    "core": [Options(inner="ties", density=0.4, alpha=1.5), Options(inner="dare_ties", density=0.5)],
    "tsv": [Options(alpha=0.8)],
    "iso_c": [Options(alpha=1.2)],
    "iso_cts": [Options(common_fraction=0.8), Options(common_fraction=0.5, alpha=0.7)],
}  # fmt: skip
CASES = [(n, i) for n, opts in OPTS.items() for i in range(len(opts))]


@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize(("name", "i"), CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_matches_dense_reference_on_peft_adapters(fx, combo, name, i):
    ads = _read(fx, COMBOS[combo])
    opts = OPTS[name][i]
    modules = {m for ad in ads for m in ad.deltas}
    checked = 0
    for mod in sorted(modules):
        pairs = [(ad.deltas[mod], w) for ad, w in zip(ads, WEIGHTS, strict=False) if mod in ad.deltas]
        if len(pairs) < 2 or (name == "iso_cts" and opts.common_fraction == 0.5 and len(pairs) > 3):
            continue
        ds, ws = [d for d, _ in pairs], [w for _, w in pairs]
        assert_close(ours(name, ds, ws, opts, mod), reference(name, ds, ws, opts, mod), rtol=TOL, what=mod)
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize(
    ("ranks", "fraction"), [((7, 8), 0.8), ((2, 3, 4, 5), 0.8), ((3, 5, 4), 0.5), ((6, 6, 6, 6), 0.9)]
)
def test_iso_cts_rank_split_follows_the_authors_rounding(ranks, fraction):
    """p = 15, T = 2: (15 − 12)/2 = 1.5 rounds to 2 (half to even), so c = 11 and d = 2; and others."""
    ds = _random(ranks, seed=len(ranks))
    ws = WEIGHTS[: len(ds)]
    opts = Options(common_fraction=fraction)
    expected = reference("iso_cts", ds, ws, opts, "m")
    assert_close(ours("iso_cts", ds, ws, opts), expected, rtol=TOL)
    assert strategies.get("iso_cts").fn(ds, ws, opts, "m").rank == torch.linalg.matrix_rank(expected)


@pytest.mark.parametrize("name", NAMES)
def test_random_factors_and_alpha_and_weights_scale(name):
    ds = _random((3, 5, 2, 6), seed=7)
    ws = [1.0, -0.8, 1.5, 0.6]
    for opts in OPTS[name]:
        base = ours(name, ds, ws, opts)
        assert_close(base, reference(name, ds, ws, opts, "m"), rtol=TOL, what=name)
        twice = replace(opts, alpha=2 * opts.alpha)
        assert_close(ours(name, ds, ws, twice), 2 * base, rtol=TOL, what="α")
        assert_close(ours(name, ds, [3 * w for w in ws], opts), 3 * base, rtol=TOL, what="weights")
        out = strategies.get(name).fn(ds, ws, opts, "m")
        assert out.rank <= sum(d.rank for d in ds)


def test_inner_ties_by_hand():
    """Zero sums take the majority sign (here −), and the trim keeps ⌊n·density⌋ + 1 entries per task."""
    from merging.strategies.inner import merge_inner

    t = torch.tensor([[[1.0, -1.0, -2.0, 3.0]], [[-1.0, 1.0, -3.0, -4.0]]])  # sums 0, 0, −5, −1
    assert merge_inner(t, Options(inner="ties", density=1.0), "m").tolist() == [[-1.0, -1.0, -2.5, -4.0]]
    x = torch.arange(1.0, 11.0).reshape(1, 1, 10)
    assert merge_inner(x, Options(inner="ties", density=0.3), "m").tolist() == [[0.0] * 6 + [7.0, 8, 9, 10]]
    assert merge_inner(t, Options(inner="linear"), "m").tolist() == [[0.0, 0.0, -5.0, -1.0]]


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("name", ["core", "knots"])
def test_linear_inner_is_the_exact_sum(fx, name):
    ads = _read(fx, ["lora", "lora_r8", "loha", "lokr"])
    ws = WEIGHTS[:4]
    result = merge(weighted(ads, ws), name, Options(inner="linear"))
    for mod, d in result.adapters[0].deltas.items():
        exact = sum(w * dense64(ad.deltas[mod]) for ad, w in zip(ads, ws, strict=True) if mod in ad.deltas)
        assert_close(d.b.double() @ d.a.double(), exact, rtol=TOL, what=mod)
    assert result.exact is (name == "core")
    assert not merge(weighted(ads, ws), "core", Options(inner="linear", alpha=0.5)).exact
    assert not merge(weighted(ads, ws), "core", Options(inner="ties")).exact


@pytest.mark.parametrize("name", NAMES)
def test_input_order_does_not_matter(name):
    """Every method is symmetric in its inputs (DARE's mask aside, which is drawn in input order)."""
    ds, ws = _random((3, 5, 2), seed=11), [1.0, -0.7, 1.4]
    order = [2, 0, 1]
    assert_close(ours(name, [ds[i] for i in order], [ws[i] for i in order], Options()),
                 ours(name, ds, ws, Options()), rtol=TOL)  # fmt: skip


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_iso_output_has_one_singular_value(name):
    ds = _random((4, 4, 4), seed=2)
    out = strategies.get(name).fn(ds, [1.0, 1.0, 1.0], Options(), "m")
    s = torch.linalg.svdvals(out.b.double() @ out.a.double())[: out.rank]
    assert out.rank == 12 and float(s.max() - s.min()) <= 1e-6 * float(s.max())


def test_null_space_noise_does_not_move_tsv_or_iso():
    """On the numerical rank, 1e-13 noise on the factors moves the result by ~1e-13, not by ~1."""
    ds = _random((3, 4), seed=5)
    g = torch.Generator().manual_seed(9)
    noisy = [LowRank(d.b.double() + 1e-13 * torch.randn(d.b.shape, generator=g, dtype=torch.float64),
                     d.a.double(), d.scale, d.target) for d in ds]  # fmt: skip
    for name in ("tsv", "iso_c", "iso_cts"):
        assert_close(ours(name, noisy, [1.0, 1.0], Options()), ours(name, ds, [1.0, 1.0], Options()), 1e-6)


def test_zero_inputs_give_a_zero_lora():
    """PEFT's default init (B = 0) on every input: each method returns a zero LoRA, no NaN."""
    zero = [LowRank(torch.zeros(48, r), torch.randn(r, 40), 1.0, Target("linear", (48, 40))) for r in (2, 3)]
    for name in NAMES:
        for inner in ("linear", "ties", "dare_ties"):
            out = strategies.get(name).fn(zero, [1.0, 1.0], Options(inner=inner), "m")
            assert out.rank >= 1 and float((out.b @ out.a).abs().max()) == 0.0, (name, inner)


def test_factored_never_builds_a_dense_matrix(monkeypatch):
    """Four rank-8 inputs on a 1024 × 1536 module: no dense ΔW, no SVD bigger than the stacked rank."""
    ds = _random((8, 8, 8, 8), shape=(1024, 1536), seed=4, scale=0.05)

    forbid_dense(monkeypatch, max_svd=32)
    for name in NAMES:
        out = strategies.get(name).fn(ds, [1.0, 0.5, -1.0, 0.8], Options(), "m")
        assert out.b.shape[0] == 1024 and out.rank <= 32


# ---------------------------------------------------------------- inputs refused, outputs PEFT loads


def test_ia3_and_bias_are_refused_in_one_line(fx):
    t = Target("linear", (4, 4))
    lr = LowRank(torch.ones(4, 1), torch.ones(1, 4), 1.0, t)
    biased = LowRank(torch.ones(4, 1), torch.ones(1, 4), 1.0, t, bias=torch.ones(4))
    for name in NAMES:
        with pytest.raises(UnsupportedError, match=f"{name} merges additive deltas; module m has an IA³"):
            strategies.get(name).fn([lr, Scale(torch.ones(4), "out")], [1.0, 1.0], Options(), "m")
        with pytest.raises(UnsupportedError, match=f"{name}: module m has a LoRA bias.*use cat or svd"):
            strategies.get(name).fn([lr, biased], [1.0, 1.0], Options(), "m")
    ads = _read(fx, ["lora", "ia3", "loha"])  # IA³ beside additive inputs: folded, as for svd
    assert [a.kinds for a in merge(weighted(ads), "iso_cts").adapters] == [{"ia3"}, {"lora"}]


def test_options_are_validated():
    with pytest.raises(MergingError, match="`inner`"):
        Options(inner="mean")
    with pytest.raises(MergingError, match="`common_fraction`"):
        Options(common_fraction=0.0)
    with pytest.raises(MergingError, match="`alpha`"):
        Options(alpha=float("inf"))


def test_cli_and_recipe_write_a_lora_peft_loads(fx, tmp_path, name="iso_cts"):
    from peft import PeftModel

    a, b, c = (str(fx.adapter("llama", n)) for n in ("lora", "lora_r8", "lora_patterns"))
    args = ["merge", a, b, c, "-s", name, "--inner", "dare_ties", "--alpha", "0.7", "--density", "0.6",
            "--common-fraction", "0.6", "-o", str(tmp_path / "cli")]  # fmt: skip
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, args)
    assert result.exit_code == 0, result.output
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'inputs = ["{a}", "{b}", "{c}"]\nstrategy = "{name}"\ninner = "dare_ties"\n'
                      'alpha = 0.7\ndensity = 0.6\ncommon_fraction = 0.6\n')  # fmt: skip
    result = CliRunner().invoke(cli, ["merge", "--recipe", str(recipe), "-o", str(tmp_path / "rec")])
    assert result.exit_code == 0, result.output
    (first,), (second,) = sources.load(tmp_path / "cli"), sources.load(tmp_path / "rec")
    opts = read_recipe(tmp_path / "cli").options
    assert (opts.inner, opts.alpha, opts.common_fraction) == ("dare_ties", 0.7, 0.6)
    inputs = _read(fx, ["lora", "lora_r8", "lora_patterns"])
    expected = merge(weighted(inputs), name, Options(inner="dare_ties", alpha=0.7, density=0.6,
                                                     common_fraction=0.6)).adapters[0]  # fmt: skip
    base = fx.load_base("llama")
    peft_model = PeftModel.from_pretrained(fx.load_base("llama"), str(tmp_path / "cli")).merge_and_unload()
    for mod, d in expected.deltas.items():
        assert_close(first.deltas[mod].dense(), d.dense(), rtol=1e-6, what=mod)
        assert_close(second.deltas[mod].dense(), d.dense(), rtol=1e-6, what=mod)
        w = peft_model.get_submodule(mod).weight.detach() - base.get_submodule(mod).weight.detach()
        assert_close(w, d.dense(), rtol=1e-4, what=f"PEFT {mod}")


def test_a_written_core_linear_folder_is_judged_exact(fx, tmp_path):
    """verify reads the recipe's options: `core --inner linear --alpha 1` is exact, `--inner ties` is not."""
    from merging.eval.verify import claims_exact
    from merging.merge.result import recipe, write_result

    ads = _read(fx, ["lora", "lora_b"])
    for inner, exact in (("linear", True), ("ties", False)):
        result = merge(weighted(ads), "core", Options(inner=inner))
        folder = write_result(result, tmp_path / inner, recipe(result, ads).to_dict())
        assert claims_exact(read_recipe(folder), ads, sources.load(folder)) is exact
