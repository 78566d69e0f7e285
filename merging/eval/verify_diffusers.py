"""verify on a diffusers pipeline: merged adapters against the inputs stacked, on denoiser and text encoders.

Outputs: the UNet's noise prediction on seeded latents, timesteps and encoder states (SDXL's added time and
text embeddings seeded too) or a DiT's (Flux, SD3: ``verify_dit``, fed by the adapted text encoders), and each
text encoder's last hidden state on seeded token ids. The reference is diffusers itself stacking the input
files (``load_lora_into_*`` + ``set_adapters``) when every input is a LoRA file diffusers loads whole;
otherwise ``merging.runtime`` (ΔW added; LyCORIS's semantics, tested against LyCORIS in tests/test_sd.py),
and the row says why (diffusers 0.42 drops parts of kohya Flux files: tests/test_flux.py). A merged LoRA is
loaded by diffusers from the file written for it (kohya names on a UNet, diffusers names on a DiT); other
merged kinds run in ``merging.runtime``. Every row names its reference and loader.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from merging.base import pipelines as sdbase
from merging.core.adapter import Adapter, Pair, weighted
from merging.core.deltas import LowRank
from merging.errors import SourceError
from merging.eval import verify_dit
from merging.runtime.stacked import stacked

TEXT = ("text_encoder", "text_encoder_2", "text_encoder_3")


def load_parts(folder: Path) -> nn.ModuleDict:
    """The pipeline's denoiser and text encoders with their weights, in eval mode, float32 on CPU."""
    folder = Path(folder)
    if not sdbase.is_pipeline(folder):
        raise SourceError(f"{folder}: verify on diffusers needs a pipeline folder (with model_index.json)")
    parts = nn.ModuleDict()
    for c in sdbase.components(folder):
        parts[c] = _load(folder / c)
        if c == "transformer":
            verify_dit.kind(parts[c])
    return parts.eval()


def _load(folder: Path) -> nn.Module:
    cfg = sdbase._json(folder / "config.json")
    if "_class_name" in cfg:
        import diffusers

        return getattr(diffusers, cfg["_class_name"]).from_pretrained(str(folder), torch_dtype=torch.float32)
    import transformers

    return getattr(transformers, cfg["architectures"][0]).from_pretrained(str(folder), dtype=torch.float32)


@torch.no_grad()
def outputs(parts: nn.ModuleDict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Each component's output on seeded inputs (noise prediction; text encoders' hidden states)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in parts.items():
        if name in TEXT:
            ids = torch.randint(3, m.config.vocab_size, (2, 7), generator=g)
            out[name] = m(ids).last_hidden_state
            continue
        if name == "transformer":
            out[name] = verify_dit.noise(parts, g)
            continue
        c = m.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        latents = torch.randn(2, c.in_channels, min(size, 16), min(size, 16), generator=g)
        states = torch.randn(2, 7, c.cross_attention_dim, generator=g)
        extra = {}
        if c.addition_embed_type == "text_time":  # SDXL: pooled text embeddings and the size/crop ids
            text = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            extra = {"text_embeds": torch.randn(2, text, generator=g)}
            extra["time_ids"] = torch.randn(2, 6, generator=g)
        out[name] = m(latents, torch.tensor([10, 500]), encoder_hidden_states=states,
                      added_cond_kwargs=extra or None).sample  # fmt: skip
    return out


@dataclass(frozen=True)
class Row:
    """One candidate's figures: the largest effect-relative error over the components, per component."""

    name: str
    errors: Mapping[str, float]
    reference: str
    loader: str
    exact: bool
    cosines: Mapping[str, float] = field(default_factory=dict)  # component: cos(y − y_base, y_ref − y_base)

    @property
    def error(self) -> float:
        return max(self.errors.values())

    def verdict(self, tol: float) -> str:
        return ("PASS" if self.error <= tol else "FAIL") if self.exact else "info"


def lora_only(adapters: Sequence[Adapter]) -> bool:
    """Whether diffusers loads these as kohya files: LoRA deltas only, no DoRA, no bias."""
    return all(
        isinstance(d, LowRank) and d.magnitude is None and d.bias is None
        for ad in adapters for d in ad.deltas.values()
    )  # fmt: skip


def _diffusers(parts: nn.ModuleDict, files: Mapping[str, Path], weights: Sequence[float]) -> None:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    loader = StableDiffusionXLLoraLoaderMixin if "text_encoder_2" in parts else StableDiffusionLoraLoaderMixin
    loaded: dict[str, list[str]] = {}
    for name, file in files.items():
        sd, alphas = loader.lora_state_dict(str(file), unet_config=parts["unet"].config)  # SGM names mapped
        loader.load_lora_into_unet(sd, alphas, parts["unet"], adapter_name=name)
        loaded.setdefault("unet", []).append(name)
        for te in TEXT:
            if te in parts and any(k.startswith(f"{te}.") for k in sd):
                loader.load_lora_into_text_encoder(sd, alphas, parts[te], prefix=te, adapter_name=name)
                loaded.setdefault(te, []).append(name)
    by_name = dict(zip(files, weights, strict=True))
    for comp, names in loaded.items():
        set_weights_and_activate_adapters(parts[comp], names, [by_name[n] for n in names])


def _errors(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], base) -> dict[str, float]:
    out = {}
    for k in ref:
        denom = float((ref[k] - base[k]).double().norm())
        diff = float((got[k] - ref[k]).double().norm())
        out[k] = diff / denom if denom > 0 else diff
    return out


def _cosines(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], base) -> dict[str, float]:
    out = {}
    for k in ref:
        a, b = (got[k] - base[k]).double().flatten(), (ref[k] - base[k]).double().flatten()
        out[k] = float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else float("nan")
    return out


def verify_sd(
    folder: Path, inputs: Sequence[Pair], candidates: Sequence[tuple[str, list[Adapter], bool]],
    input_files: Sequence[Path] | None = None,
) -> tuple[list[Row], str]:  # fmt: skip
    """Merged candidates against the inputs stacked, on a pipeline folder.

    Args:
        folder: the diffusers pipeline folder.
        inputs: (adapter, weight) in stacking order, read with the pipeline as base.
        candidates: (name, merged adapters, whether the strategy claims exactness).
        input_files: the inputs' kohya files, for diffusers to stack them itself.

    Returns:
        The rows and the reference's name.
    """
    from merging.base.layout import BaseLayout

    parts = load_parts(folder)
    layout = BaseLayout.from_components(dict(parts))
    base = outputs(parts)
    adapters, weights = [a for a, _ in inputs], [w for _, w in inputs]
    ref, why = None, "not every input is a LoRA file"
    if input_files is not None and lora_only(adapters):
        files = {f"in{i}": Path(f) for i, f in enumerate(input_files)}
        ref, why = _by_diffusers(folder, files, weights, adapters)
    if ref is not None:
        reference = "diffusers (set_adapters)"
    else:
        with stacked(parts, inputs):
            reference, ref = f"merging.runtime (ΔW added; {why})", outputs(parts)
    rows = []
    for name, merged, exact in candidates:
        if len(merged) == 1 and lora_only(merged):
            got, loader = _merged_by_diffusers(folder, merged[0], layout)
        else:
            with stacked(parts, weighted(merged)):
                got, loader = outputs(parts), "merging.runtime"
        rows.append(Row(name, _errors(got, ref, base), reference, loader, exact, _cosines(got, ref, base)))
    return rows, reference


def _by_diffusers(folder: Path, files: Mapping[str, Path], weights, adapters) -> tuple[dict | None, str]:
    """diffusers stacking the files, or None and why not (it failed, or it left out modules we read)."""
    ref_parts = load_parts(folder)
    if "transformer" not in ref_parts:
        _diffusers(ref_parts, files, weights)
        return outputs(ref_parts), ""
    try:
        verify_dit.load(ref_parts, files, weights)
    except (ValueError, AssertionError, KeyError, IndexError, RuntimeError) as e:
        said = f" ({str(e).strip().splitlines()[0][:80]})" if str(e).strip() else ""
        return None, f"diffusers cannot load these files: {type(e).__name__}{said}"
    for (name, file), ad in zip(files.items(), adapters, strict=True):
        if missing := sorted(set(ad.deltas) - verify_dit.injected(ref_parts, name)):
            return None, f"diffusers drops {len(missing)} modules of {file.name}, e.g. {missing[0]}"
    return outputs(ref_parts), ""


def _merged_by_diffusers(folder: Path, merged: Adapter, layout) -> tuple[dict, str]:
    """A merged LoRA loaded by diffusers: kohya names on a UNet pipeline, diffusers names on a DiT."""
    from merging.formats import diffusers_lora, kohya

    with tempfile.TemporaryDirectory() as tmp:
        got_parts = load_parts(folder)
        if "transformer" in got_parts:
            file = diffusers_lora.write(merged.deltas, Path(tmp) / "merged.safetensors", layout)
            verify_dit.load(got_parts, {"merged": file}, [1.0])
            return outputs(got_parts), "diffusers (diffusers-named file)"
        file = kohya.write(merged, Path(tmp) / "merged.safetensors", base=layout)
        _diffusers(got_parts, {"merged": file}, [1.0])
        return outputs(got_parts), "diffusers (kohya file)"
