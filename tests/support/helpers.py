"""One tolerance table and one assert_close for the whole suite."""

from __future__ import annotations

import hashlib

import torch

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (absolute when expected is zero)."""
    a, e = actual.double(), expected.double()
    denom = e.norm()
    return float((a - e).norm() / denom) if denom > 0 else float((a - e).norm())


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None, what: str = ""
) -> None:
    """Relative Frobenius error within the dtype's tolerance (or rtol)."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    tol = rtol if rtol is not None else RTOL[expected.dtype]
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def rewrite_tensors(folder, fn):
    """Apply fn to the tensors of a PEFT folder's adapter_model.safetensors (in place); return the file."""
    from safetensors.torch import load_file, save_file

    f = folder / "adapter_model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f))
    return f


def state_hash(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the model's state dict, by name: equal only when bit-identical."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def peft_stacked(base: torch.nn.Module, folders, *, mixed: bool = False) -> torch.nn.Module:
    """The adapter folders loaded by PEFT itself onto ``base`` and active at once, innermost first: the
    independent reference (PeftMixedModel when the folders mix LoRA, LoHa and LoKr)."""
    import peft

    kind = peft.PeftMixedModel if mixed else peft.PeftModel
    model = kind.from_pretrained(base, folders[0], adapter_name="a0")
    for i, f in enumerate(folders[1:], 1):
        model.load_adapter(f, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(folders))]
    (model if mixed else model.base_model).set_adapter(names)
    return model


def forbid_dense(monkeypatch, max_svd: int) -> None:
    """Make any dense ΔW, or any SVD of a matrix larger than ``max_svd``, fail the test."""

    def refuse(self):
        raise AssertionError("dense() called")

    from merging.core.deltas import AdditiveDelta, LowRank

    monkeypatch.setattr(AdditiveDelta, "dense", refuse)
    monkeypatch.setattr(LowRank, "dense", refuse)
    real_svd = torch.linalg.svd

    def small_svd(x, *a, **k):
        assert max(x.shape) <= max_svd, f"SVD of a {tuple(x.shape)} matrix"
        return real_svd(x, *a, **k)

    monkeypatch.setattr(torch.linalg, "svd", small_svd)


def read_adapters(fx, kind: str, names: list[str]) -> list:
    """The fixture adapters ``names`` of base ``kind``, read with the PEFT reader and refined on the base."""
    from merging.core.adapter import base_shapes
    from merging.formats import peft as fp

    shapes = base_shapes(fx.load_base(kind))
    return [fp.read(fx.adapter(kind, n)).refine_targets(shapes) for n in names]


def svd_held_out_case(fx):
    """The fixture llama's lora+ia3+loha stack, their svd r=2 merge, and one seeded batch per skill whose last
    4 tokens are the answer: (pairs, merge result, skill → batch)."""
    from merging.core.adapter import weighted
    from merging.merge.pipeline import merge
    from merging.strategies import Options

    ads = read_adapters(fx, "llama", ["lora", "ia3", "loha"])
    pairs = weighted(ads)
    res = merge(pairs, "svd", Options(rank=2))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (4, 10), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100  # the "answer" is the last 4 tokens
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return pairs, res, {ad.name: batch for ad in ads}
