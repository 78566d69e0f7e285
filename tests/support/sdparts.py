"""Tiny seeded Stable Diffusion parts (SD1.5- and SDXL-shaped) and the runtimes that judge them.

The references are LyCORIS (``lycoris.kohya``, what sd-scripts runs with ``--network_module lycoris.kohya``)
and diffusers (``load_lora_into_unet`` / ``load_lora_into_text_encoder`` + ``set_adapters``), never our code.
"""

from __future__ import annotations

from pathlib import Path

import torch

UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32, "norm_num_groups": 32,
    "attention_head_dim": 8,
}  # fmt: skip
SDXL_UNET = UNET | {  # SDXL: both text encoders' states (32 + 16), pooled text and size ids added to time
    "cross_attention_dim": 48, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 16 + 6 * 8,
}  # fmt: skip


def unet(seed: int = 0, config: dict | None = None) -> torch.nn.Module:
    """A tiny UNet2DConditionModel with seeded weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**(config or UNET)).eval()


def vae(seed: int = 4) -> torch.nn.Module:
    """A tiny AutoencoderKL (two blocks of 32 channels, latent 4) with seeded weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=16,
    ).eval()  # fmt: skip


def text_encoder(seed: int = 1, hidden: int = 32, projection: bool = False) -> torch.nn.Module:
    """A tiny CLIPTextModel (SDXL's second: CLIPTextModelWithProjection) with seeded weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _inputs(cross: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    states = torch.randn(2, 5, cross, generator=g)
    return latents, torch.tensor([10, 500]), states


@torch.no_grad()
def noise(model: torch.nn.Module) -> torch.Tensor:
    """The UNet's noise prediction on seeded latents, timesteps and encoder states."""
    latents, t, states = _inputs(model.config.cross_attention_dim)
    return model(latents, t, encoder_hidden_states=states).sample


@torch.no_grad()
def hidden(model: torch.nn.Module) -> torch.Tensor:
    """The text encoder's last hidden state on seeded token ids."""
    ids = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    return model(ids).last_hidden_state


def effect_error(got: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref − base‖."""
    return float((got - ref).norm() / (ref - base).norm())


def lycoris_file(path: Path, models: dict, algo: str, seed: int, scale: float = 0.1, **kw) -> Path:
    """A file written by LyCORIS itself (its kohya entry point) with seeded non-zero weights.

    ``models``: ``unet`` and optionally ``text_encoder`` (a list of two for SDXL); ``kw``: LyCORIS options.
    """
    net = lycoris_network(models, algo, Path(path).parent, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4"})
    return Path(path)


PRESET = """# LyCORIS's "full" preset for SD UNets and CLIP. Its 4.1.3 default also targets TimestepEmbedding
# (for Anima), which names time_embedding.linear_1 twice on a diffusers UNet: an AssertionError.
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
"""


def lycoris_network(models: dict, algo: str, folder: Path, **kw):
    """A LyCORIS network applied to the models (dim 4, alpha 2; conv dim 4, conv alpha 6 unless given)."""
    import lycoris.kohya as lk

    te = models.get("text_encoder")
    preset = Path(folder) / "sd_preset.toml"
    preset.write_text(PRESET)
    kw = {"conv_dim": 4, "conv_alpha": 6, "algo": algo, "preset": str(preset)} | kw
    dim, alpha = kw.pop("dim", 4), kw.pop("alpha", 2)
    net = lk.create_network(1.0, dim, alpha, None, te, models["unet"], warn_on_unmatched=False, **kw)
    net.apply_to(te, models["unet"], apply_text_encoder=te is not None, apply_unet=True)
    return net


def lycoris_load(models: dict, file: Path, algo: str, **kw) -> None:
    """Stack a LyCORIS file onto the models as LyCORIS runs it: the network rebuilt with its arguments.

    (LyCORIS 4.1.3 cannot rebuild some of its own files from the weights alone: LoKr with a decomposed conv
    w2, IA³; so the network is made with the same arguments and ``load_weights`` fills it.)
    """
    net = lycoris_network(models, algo, Path(file).parent, **kw)
    info = net.load_weights(str(file))
    if info:
        raise AssertionError(f"LyCORIS loaded {file} with {info}")


def legacy_te_names(file: Path, out: Path, prefix: str = "lora_te_", undo: bool = False) -> Path:
    """A LyCORIS file with its CLIPTextModel names as sd-scripts writes them (``text_model_`` kept).

    Under transformers 5 CLIPTextModel has no ``text_model`` level, so LyCORIS names lora_te_encoder_...;
    sd-scripts (transformers 4), A1111, ComfyUI and diffusers' converter use lora_te_text_model_encoder_...
    """
    from safetensors.torch import load_file, save_file

    old, new = prefix, f"{prefix}text_model_"
    old, new = (new, old) if undo else (old, new)
    tensors = load_file(str(file))
    save_file({k.replace(old, new, 1): v for k, v in tensors.items()}, str(out))
    return out


def lycoris_load_kohya_lora(models: dict, file: Path) -> None:
    """Stack a kohya LoRA/LoCon file onto the models through LyCORIS's from-weights path.

    (LyCORIS matches names against the live modules: under transformers 5 it skips, silently, the
    lora_te_text_model_* names every SD1.5 file carries; the unmatched count is checked here.)
    """
    import lycoris.kohya as lk
    from safetensors.torch import load_file

    te = models.get("text_encoder")
    prefixes = ("lora_unet_", "lora_te") if te is not None else ("lora_unet_",)
    sd = {k: v for k, v in load_file(str(file)).items() if k.startswith(prefixes)}
    net, sd = lk.create_network_from_weights(1.0, str(file), None, te, models["unet"], sd, for_inference=True)
    names = {k.split(".")[0] for k in sd}
    matched = len(net.unet_loras) + len(net.text_encoder_loras)
    if matched != len(names):
        raise AssertionError(f"LyCORIS matched {matched} of the {len(names)} modules of {file}")
    net.apply_to(te, models["unet"], apply_text_encoder=te is not None, apply_unet=True)
    info = net.load_state_dict(sd, strict=False)
    if info.missing_keys or info.unexpected_keys:
        raise AssertionError(f"LyCORIS loaded {file} with {info}")


def diffusers_load(models: dict, files: dict[str, Path]) -> None:
    """Load kohya LoRA files into the models with diffusers and activate them all (``set_adapters``)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    for name, file in files.items():
        sd, alphas = Loader.lora_state_dict(str(file))
        Loader.load_lora_into_unet(sd, alphas, models["unet"], adapter_name=name)
        if "text_encoder" in models and any(k.startswith("text_encoder.") for k in sd):
            Loader.load_lora_into_text_encoder(
                sd, alphas, models["text_encoder"], prefix="text_encoder", adapter_name=name
            )
    models["unet"].set_adapters(list(files), [1.0] * len(files))


def transformer(seed: int = 0) -> torch.nn.Module:
    """A tiny SD3-style DiT (SD3Transformer2DModel) with seeded weights."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
    ).eval()  # fmt: skip


@torch.no_grad()
def dit_noise(model: torch.nn.Module) -> torch.Tensor:
    """The DiT's prediction on seeded latents, text states, pooled projections and timesteps."""
    g = torch.Generator().manual_seed(0)
    x, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    pooled = torch.randn(2, 16, generator=g)
    return model(hidden_states=x, encoder_hidden_states=states, pooled_projections=pooled,
                 timestep=torch.tensor([10, 500])).sample  # fmt: skip


def pipeline_folder(folder, models, cls: str = "StableDiffusionPipeline"):
    """A diffusers pipeline folder holding the given components (as save_pretrained writes them)."""
    import json

    index = {"_class_name": cls, "_diffusers_version": "0.42.1"}
    for name, model in models.items():
        model.save_pretrained(str(folder / name))
        lib = "diffusers" if "diffusers" in type(model).__module__ else "transformers"
        index[name] = [lib, type(model).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


# ------------------------------------------------------------------------------------------ Flux

FLUX = {  # two heads of 8: width 16; one joint (double) and one single block; MLP 4×: proj_mlp (64, 16)
    "patch_size": 1, "in_channels": 8, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
    "num_attention_heads": 2, "joint_attention_dim": 16, "pooled_projection_dim": 32, "guidance_embeds": True,
    "axes_dims_rope": (2, 2, 4),
}  # fmt: skip


def flux(seed: int = 0) -> torch.nn.Module:
    """A tiny FluxTransformer2DModel (T5 states of 16, CLIP pooled 32) with seeded weights."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**FLUX).eval()


def t5(seed: int = 3, d_model: int = 16) -> torch.nn.Module:
    """A tiny T5EncoderModel (Flux's and SD3's text_encoder_2/3) with seeded weights."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=1000, d_model=d_model, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    return T5EncoderModel(cfg).eval()


def flux_parts() -> dict[str, torch.nn.Module]:
    """A tiny Flux pipeline's adaptable parts: transformer, CLIP-L (text_encoder), T5 (text_encoder_2)."""
    return {"transformer": flux(), "text_encoder": text_encoder(1), "text_encoder_2": t5()}


@torch.no_grad()
def flux_noise(parts: dict) -> torch.Tensor:
    """Flux's prediction on seeded packed latents, with the states of the (adapted) text encoders.

    T5's last hidden state is the text stream, CLIP's pooled output the pooled projection (as FluxPipeline).
    """
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (2, 5), generator=g)
    states = parts["text_encoder_2"](ids).last_hidden_state  # (2, 5, 16)
    pooled = parts["text_encoder"](ids).pooler_output  # (2, 32)
    x = torch.randn(2, 16, 8, generator=g)  # (batch, 4×4 patches, in_channels)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(16, 3)  # fmt: skip
    return parts["transformer"](hidden_states=x, encoder_hidden_states=states, pooled_projections=pooled,
                                timestep=torch.tensor([0.1, 0.7]), img_ids=img_ids, txt_ids=torch.zeros(5, 3),
                                guidance=torch.tensor([3.5, 3.5])).sample  # fmt: skip


def diffusers_flux_load(parts: dict, files: dict[str, Path], weights: list[float] | None = None) -> None:
    """Load LoRA files into Flux parts as FluxPipeline.load_lora_weights does; activate them all."""
    from diffusers.loaders import FluxLoraLoaderMixin as Loader

    names: dict[str, list[str]] = {}
    for name, file in files.items():
        sd, alphas = Loader.lora_state_dict(str(file), return_alphas=True)
        if any(k.startswith("transformer.") for k in sd):
            Loader.load_lora_into_transformer(sd, alphas, parts["transformer"], adapter_name=name)
            names.setdefault("transformer", []).append(name)
        if any(k.startswith("text_encoder.") for k in sd):
            Loader.load_lora_into_text_encoder(sd, alphas, parts["text_encoder"], prefix="text_encoder",
                                               adapter_name=name)  # fmt: skip
            names.setdefault("text_encoder", []).append(name)
    by_name = dict(zip(files, weights or [1.0] * len(files), strict=True))
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    for comp, ns in names.items():
        set_weights_and_activate_adapters(parts[comp], ns, [by_name[n] for n in ns])


# ------------------------------------------------------------------------------------------ SD3

SD3 = {  # two joint blocks (the last context_pre_only), SD3.5's dual attention in the first
    "sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
    "num_attention_heads": 2, "joint_attention_dim": 16, "caption_projection_dim": 16,
    "pooled_projection_dim": 16, "out_channels": 4, "dual_attention_layers": (0,),
}  # fmt: skip


def sd3(seed: int = 0) -> torch.nn.Module:
    """A tiny SD3Transformer2DModel with seeded weights."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**SD3).eval()


def clip_projected(seed: int, hidden: int = 8) -> torch.nn.Module:
    """A tiny CLIPTextModelWithProjection (SD3's CLIP-L and CLIP-G) projecting to its own width."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=20, num_attention_heads=2, num_hidden_layers=2, vocab_size=1000,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=hidden,
    )  # fmt: skip
    return CLIPTextModelWithProjection(cfg).eval()


def sd3_parts() -> dict[str, torch.nn.Module]:
    """A tiny SD3 pipeline's parts: transformer, CLIP-L, CLIP-G (8 wide each: pooled 16), T5 (16 wide)."""
    return {"transformer": sd3(), "text_encoder": clip_projected(1), "text_encoder_2": clip_projected(2),
            "text_encoder_3": t5()}  # fmt: skip


# ------------------------------------------------------------------------- DiT files made by hand

Table = dict[str, list[str]]  # sd-scripts lora_name → the diffusers modules fused in it (rows in order)


def weights(parts: dict) -> dict[str, torch.Tensor]:
    """The parts' tensors as ``<component>.<name>``."""
    return {f"{c}.{k}": v for c, m in parts.items() for k, v in m.state_dict().items()}


def weight_key(w: dict, module: str) -> str:
    """A module's weight in ``weights``: transformers 5's CLIPTextModel lost ``text_model.`` (not
    CLIPTextModelWithProjection, nor the checkpoints)."""
    key = f"{module}.weight"
    return key if key in w else key.replace("text_encoder.text_model.", "text_encoder.")


def fused_file(path, parts: dict, table: Table, seed: int, network: str, rank=4, alpha=2.0, scale=0.3):
    """A kohya DiT LoRA by hand in sd-scripts' layout: one LoRA per lora_name over its modules' fused rows,
    alpha ≠ rank; ``network``: the ss_network_module recorded."""
    from safetensors.torch import save_file

    w = weights(parts)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mods in table.items():
        out, inp = sum(w[weight_key(w, m)].shape[0] for m in mods), w[weight_key(w, mods[0])].shape[1]
        tensors[f"{name}.lora_down.weight"] = scale * torch.randn(rank, inp, generator=g)
        tensors[f"{name}.lora_up.weight"] = scale * torch.randn(out, rank, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": network})
    return path


def diffusers_named_file(path, parts: dict, modules, seed: int, rank=3, scale=0.3):
    """A LoRA in diffusers' names (as save_lora_weights / ai-toolkit write it), no alpha (scale 1)."""
    from safetensors.torch import save_file

    w = weights(parts)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        out, inp = w[weight_key(w, m)].shape
        tensors[f"{m}.lora_A.weight"] = scale * torch.randn(rank, inp, generator=g)
        tensors[f"{m}.lora_B.weight"] = scale * torch.randn(out, rank, generator=g)
    save_file(tensors, str(path))
    return path


def kohya_dw(t: dict, name: str) -> torch.Tensor:
    """ΔW = α/r·up·down of a kohya lora_name in a file's tensors."""
    down = t[f"{name}.lora_down.weight"]
    return float(t[f"{name}.alpha"]) / down.shape[0] * t[f"{name}.lora_up.weight"] @ down


def added_by_hand(parts: dict, files_tables, swapped: tuple[str, ...]) -> dict:
    """The parts with each kohya file's ΔW = α/r·up·down added to its fused weights (the weight-space truth);
    lora_names ending in ``swapped`` hold (shift, scale), diffusers (scale, shift): their halves swap."""
    from safetensors.torch import load_file

    w = weights(parts)
    with torch.no_grad():
        for file, table in files_tables:
            t = load_file(str(file))
            for name, mods in table.items():
                delta = kohya_dw(t, name)  # (fused out, in)
                if name.endswith(swapped):
                    delta = torch.cat(delta.chunk(2)[::-1])
                keys = [weight_key(w, m) for m in mods]
                for k, d in zip(keys, delta.split([w[k].shape[0] for k in keys]), strict=True):
                    w[k] += d
        for c, m in parts.items():
            m.load_state_dict({k.partition(".")[2]: v for k, v in w.items() if k.startswith(f"{c}.")})
    return parts
