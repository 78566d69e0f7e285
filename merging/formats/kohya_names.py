"""kohya lora_names ↔ module paths, derived from the base's real module list.

A kohya lora_name is a prefix joined to a module path with its dots turned into underscores. A diffusers
pipeline base names its modules ``<component>.<path>``; each component has its prefix:

| component | prefix |
|---|---|
| unet | lora_unet |
| transformer (DiT, Flux, SD3) | lora_transformer |
| text_encoder | lora_te (SD1.5), lora_te1 (SDXL: when text_encoder_2 exists) |
| text_encoder_2, text_encoder_3 | lora_te2, lora_te3 (a T5 encoder is lora_te3: Flux's text_encoder_2) |

A base without components (one model: a transformers model or one diffusers component) maps every known
prefix onto its module paths. Two paths that flatten to one lora_name make it ambiguous: refused by name.
SDXL files in Stability's (SGM) UNet names (``lora_unet_input_blocks_4_1_proj_in``: ``sgm_names``) are
read on any UNet base, and written on request. Where SD checkpoints name a module otherwise (transformers
5's CLIPTextModel lost ``text_model.``, which every SD checkpoint and kohya file has), names are written as
the checkpoints name it and read either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from merging.errors import FormatError
from merging.formats.sgm_names import to_sgm

PREFIXES = ("lora_unet", "lora_transformer", "lora_te1", "lora_te2", "lora_te3", "lora_te", "lycoris", "lora")
COMPONENTS = {
    "unet": "lora_unet", "transformer": "lora_transformer", "text_encoder": "lora_te",
    "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3",
}  # fmt: skip
AMBIGUOUS = ""  # the value of a lora_name two module paths flatten to


def is_kohya_name(module: str) -> bool:
    """Whether a module name is a kohya lora_name kept verbatim (read without a base), not a module path."""
    return "." not in module and module.startswith(PREFIXES)


def t5_components(modules: Iterable[str]) -> set[str]:
    """The pipeline components that are T5 encoders (sd-scripts names T5 lora_te3 in Flux and SD3 alike)."""
    return {m.partition(".")[0] for m in modules if ".encoder.block." in m and ".SelfAttention." in m}


def component_prefixes(components: Iterable[str], t5: Iterable[str] = ()) -> dict[str, str]:
    """component → kohya prefix for a pipeline's components (unet, text_encoder, ...)."""
    comps = set(components)
    if unknown := comps - set(COMPONENTS):
        raise FormatError(f"pipeline components {sorted(unknown)} have no kohya prefix")
    prefixes = {c: COMPONENTS[c] for c in comps}
    if "text_encoder" in prefixes and "text_encoder_2" in comps:
        prefixes["text_encoder"] = "lora_te1"  # SDXL, Flux, SD3
    return prefixes | {c: "lora_te3" for c in set(t5) & comps}


def to_kohya(
    modules: Iterable[str], components: Iterable[str], saved: Mapping[str, str], sgm: bool = False
) -> dict[str, str]:
    """module path → lora_name for a pipeline base (modules ``<component>.<path>``); {} without one.

    ``sgm``: the UNet's modules in Stability's names (sd-scripts' SDXL files), where ``sgm_names`` has one.
    """
    modules = list(modules)
    prefixes = component_prefixes(components, t5_components(modules))
    out = {}
    for m in modules if prefixes else ():
        comp, _, rest = saved.get(m, m).partition(".")
        out[m] = f"{prefixes[comp]}_{rest.replace('.', '_')}"
    if sgm and "unet" in prefixes:
        out |= {f"unet.{p}": f"lora_unet_{s.replace('.', '_')}" for p, s in _sgm(modules, "unet.").items()}
    return out


def _sgm(modules: Iterable[str], prefix: str) -> dict[str, str]:
    """UNet module path (without ``prefix``) → its SGM path, for the modules under ``prefix``."""
    paths = [m.removeprefix(prefix) for m in modules if m.startswith(prefix)]
    return to_sgm(paths) if any(p.startswith("down_blocks.") for p in paths) else {}


def from_kohya(
    modules: Iterable[str], components: Iterable[str] = (), saved: Mapping[str, str] | None = None
) -> dict[str, str]:
    """lora_name → module path (AMBIGUOUS where two paths flatten alike), for any base."""
    mods, comps, saved = list(modules), list(components), dict(saved or {})
    live = {m: m for m in mods}
    pairs = [(name, m) for names in (saved, live) for m, name in to_kohya(mods, comps, names).items()]
    if not comps:
        paths = [(m, m) for m in mods] + [(s, m) for m, s in saved.items()]
        pairs = [(f"{p}_{path.replace('.', '_')}", m) for path, m in paths for p in PREFIXES]
    unet = "unet." if "unet" in comps else ""  # SDXL files in Stability's names, read on any UNet
    pairs += [(f"lora_unet_{s.replace('.', '_')}", unet + p) for p, s in _sgm(mods, unet).items()]
    out: dict[str, str] = {}
    for name, m in pairs:
        out[name] = AMBIGUOUS if out.get(name, m) != m else m
    return out


def module_of(name: str, mapping: Mapping[str, str], file: object) -> str:
    """The module path a lora_name names, or a one-line FormatError."""
    mod = mapping.get(name)
    if mod is None:
        hint = ""
        if name.startswith(("lora_te", "lora_unet")):  # an SD name: its component may be missing from --base
            hint = "; a file that adapts the text encoder and the UNet needs the pipeline folder as --base"
        raise FormatError(f"{file}: {name} matches no module of the base model{hint}")
    if mod == AMBIGUOUS:
        paths = ", ".join(sorted(m for m in set(mapping.values()) if m and m.replace(".", "_") in name))
        raise FormatError(f"{file}: {name} names several modules of the base model ({paths})")
    return mod
