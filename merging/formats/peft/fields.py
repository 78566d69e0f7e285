"""Every field of PEFT's LoRA, LoHa, LoKr and IA³ configs, accounted for: modelled, inert or refused.

A field is *modelled* when the reader turns it into deltas (ranks, alphas, DoRA, biases...), *inert* when it
cannot change the outputs of the saved tensors (dropout, init, bookkeeping), and anything else is refused in
one line when it holds a non-default value, so that a checkpoint is read completely or not at all. A field
this table does not know (a newer PEFT) is refused unless it is empty. ``tests/test_peft_fields.py`` walks
PEFT's own config dataclasses so that a field added to PEFT fails the suite until it is placed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from merging.errors import UnsupportedError

# Bookkeeping shared by every type: names, versions, and which modules were targeted (the tensors say).
_COMMON_INERT = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules",
}  # fmt: skip
_LAYERS = {"layers_to_transform", "layers_pattern"}
_LYCORIS = {"rank_dropout", "module_dropout", "init_weights"}

MODELLED = {
    "LORA": {
        "r", "lora_alpha", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save", "rank_pattern",
        "alpha_pattern", "trainable_token_indices", "use_dora", "lora_bias", "ensure_weight_tying",
        "alora_invocation_tokens", "init_lora_weights", "target_parameters",
    },
    "LOHA": {"r", "alpha", "rank_pattern", "alpha_pattern", "modules_to_save", "use_effective_conv2d"},
    "LOKR": {
        "r", "alpha", "rank_pattern", "alpha_pattern", "modules_to_save", "use_effective_conv2d",
        "decompose_both", "decompose_factor",
    },
    "IA3": {"feedforward_modules", "fan_in_fan_out", "modules_to_save"},
    # AdaLoRA: ΔW = B·diag(E)·A · lora_alpha / init_r (its ranknum); rank_pattern's masks pruned the tensors
    "ADALORA": {"lora_alpha", "init_r", "rank_pattern", "fan_in_fan_out", "modules_to_save"},
}  # fmt: skip

# LoRA variants whose inference forward is a plain LoRA: their config and extra tensors only steer training.
# VeLoRA compresses lora_A's input in the backward pass (lora_velora_embed); MonteCLoRA perturbs lora_A while
# training (lora_monteclora_sampler.*); PEFT's eval forward and merge of both are B·A·scaling.
TRAINING_ONLY = {"velora_config": "lora_velora_embed", "monteclora_config": "lora_monteclora_sampler."}

INERT = {
    "LORA": _COMMON_INERT | _LAYERS | {
        "lora_dropout", "runtime_config", "megatron_core", "loftq_config", "eva_config", "corda_config",
        "lora_ga_config", "qalora_group_size",
    },
    "LOHA": _COMMON_INERT | _LAYERS | _LYCORIS,
    "LOKR": _COMMON_INERT | _LAYERS | _LYCORIS | {"rank_dropout_scale"},
    "IA3": _COMMON_INERT | {"init_ia3_weights"},
}  # fmt: skip
INERT["LORA"] |= set(TRAINING_ONLY)
# AdaLoRA's rank allocation steers training only; r is unused (init_r is its rank) and alpha_pattern ignored
INERT["ADALORA"] = INERT["LORA"] | {
    "r", "init_lora_weights", "alpha_pattern", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
    "orth_reg_weight", "total_step",
}  # fmt: skip

# Fields that change what the tensors mean in ways we do not model: refused unless at their default.
REFUSED = {
    "LORA": {
        "megatron_config": (None, "Megatron parallel layers"),
        "use_qalora": (False, "QA-LoRA pools the input before lora_A"),
        "layer_replication": (None, "layer replication changes the model's layers"),
        "arrow_config": (None, "Arrow routes between adapters"),
        "kasa_config": (None, "KaSA cuts the base weight's r smallest singular values: it changes the base"),
    },
    "LOHA": {},
    "LOKR": {},
    "IA3": {},
}
MODELLED["LORA"] |= {"use_bdlora"}  # block-diagonal factors, read as the full matrices PEFT's forward uses
# AdaLoRA is a LoraConfig: the LoRA fields its layers do not read are refused unless at their defaults
REFUSED["ADALORA"] = {
    **REFUSED["LORA"],
    "target_parameters": (None, "AdaLoRA on parameters is not supported"),
    **{f: (d, "not an AdaLoRA setting") for f, d in (
        ("use_dora", False), ("use_rslora", False), ("lora_bias", False), ("bias", "none"),
        ("trainable_token_indices", None), ("ensure_weight_tying", False), ("alora_invocation_tokens", None),
        ("use_bdlora", None),
    )},
}  # fmt: skip

# init_lora_weights that rewrite the base weights: such an adapter needs that modified base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "orthogonal")


def _empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == "none"


def check_fields(config: Mapping[str, Any], path: Path) -> None:
    """Refuse, in one line naming the field, any config value whose effect the reader does not model.

    Args:
        config: the parsed adapter_config.json (its peft_type already checked).
        path: the config file, for the message.
    """
    kind = config["peft_type"]
    known = MODELLED[kind] | INERT[kind]
    for field, value in config.items():
        if field in known:
            continue
        if field in REFUSED[kind]:
            default, why = REFUSED[kind][field]
            if value != default and not _empty(value):
                raise UnsupportedError(f"{path}: {field}={_short(value)} is not supported ({why})")
        elif not _empty(value):
            raise UnsupportedError(
                f"{path}: unknown config field {field}={_short(value)} (written by a newer PEFT?); "
                "merging does not model it"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        raise UnsupportedError(
            f"{path}: init_lora_weights={init!r} changes the base weights; convert it to a plain LoRA first "
            "(PEFT's save_pretrained(path_initial_model_for_weight_conversion=...))"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
