"""PEFT LoRA on parameters (``target_parameters``, ``ParamWrapper``): read into one delta per expert, and
written back as PEFT lays it out.

| PEFT tensor (module ``X``, parameter ``p``) | shape | ours, expert e |
|---|---|---|
| X[.base_layer × depth].lora_A.weight | (E·r, in) | A_e = A.reshape(E, r, in)[e] |
| X[.base_layer × depth].lora_B.weight | (out, r·E) | B_e = B.reshape(out, r, E)[:, :, e] |

(out, in) is the expert's matrix form whatever the storage: PEFT swaps its in/out for an (E, out, in)
parameter and not for a transposed (E, in, out) one, so the factors always give W_e (out, in). Several
parameters of one module nest, the first defined innermost: ``depth`` = how many are defined after it.
That order is the base's; it is read from the base model's config (``base_model_name_or_path``) when a
module has more than one, never guessed from names.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from merging.core import experts
from merging.core.deltas import LowRank, Target
from merging.core.experts import ParamSite
from merging.errors import FormatError, UnsupportedError
from merging.formats.peft import config as pc

NEST = ".base_layer"


def _unnest(file_module: str) -> tuple[str, int]:
    """'x.base_layer.base_layer' → ('x', 2)."""
    depth = 0
    while file_module.endswith(NEST):
        file_module, depth = file_module[: -len(NEST)], depth + 1
    return file_module, depth


def _matches(module: str, param: str, targets: list[str]) -> bool:
    """PEFT's match of ``module.param`` against target_parameters: equal, or ending in ``.target``."""
    name = f"{module}.{param}"
    return any(name == t or name.endswith("." + t) for t in targets)


def parameter_order(module: str, config: Mapping[str, Any], where: Path) -> list[str]:
    """The direct parameters of ``module`` in the base's definition order, from the base model's config."""
    from merging.base.layout import skeleton  # the base's module tree, on the meta device

    name = config.get("base_model_name_or_path")
    folder = Path(name) if name else None
    if folder is None or not (folder / "config.json").is_file():
        raise UnsupportedError(
            f"{where}: module {module} nests several target_parameters in the base's parameter order, "
            f"and base_model_name_or_path ({name!r}) is not a local model folder to read it from"
        )
    try:
        mod = skeleton(folder, config.get("task_type")).get_submodule(module)
    except AttributeError:
        raise FormatError(f"{where}: module {module} is not in the base model {folder}") from None
    return [n for n, _ in mod.named_parameters(recurse=False)]


def read_params(
    groups: Mapping[str, Mapping[str, str]],
    config: Mapping[str, Any],
    where: Path,
    tensors: Callable[[str], dict[str, torch.Tensor]],
) -> tuple[set[str], dict[str, LowRank]]:
    """The parameter LoRAs among a PEFT file's module groups, one delta per expert.

    Args:
        groups: file module name (``x.base_layer`` for a nested wrapper) → tensor part → key.
        config: the adapter_config.json.
        where: the file, for messages.
        tensors: a file module's tensors by part (checked finite).

    Returns:
        (the file modules consumed, ``module:param.e`` → LowRank).
    """
    targets = list(config.get("target_parameters") or [])
    if not targets:
        return set(), {}
    params = sorted({t.rpartition(".")[2] for t in targets})
    wrapped: dict[str, dict[int, str]] = defaultdict(dict)  # module → depth → file module
    for file_module in groups:
        module, depth = _unnest(file_module)
        if any(_matches(module, p, targets) for p in params):
            wrapped[module][depth] = file_module
    deltas: dict[str, LowRank] = {}
    for module, by_depth in sorted(wrapped.items()):
        nesting = _nesting(module, len(by_depth), targets, config, where)
        if sorted(by_depth) != list(range(len(nesting))):
            raise FormatError(
                f"{where}: module {module} has parameter LoRAs at nesting depths {sorted(by_depth)}, "
                f"expected 0..{len(nesting) - 1} for its target_parameters {list(nesting)}"
            )
        for depth, file_module in by_depth.items():
            param = nesting[len(nesting) - 1 - depth]
            deltas |= _experts(module, param, nesting, tensors(file_module), config, where)
    return {f for by_depth in wrapped.values() for f in by_depth.values()}, deltas


def _nesting(module: str, count: int, targets: list[str], config, where: Path) -> tuple[str, ...]:
    """The module's targeted parameters, innermost first (the base's definition order)."""
    named = sorted({t.rpartition(".")[2] for t in targets if _matches(module, t.rpartition(".")[2], targets)})
    if count == 1 and len(named) == 1:
        return (named[0],)
    order = [p for p in parameter_order(module, config, where) if _matches(module, p, targets)]
    if len(order) != count:
        raise FormatError(
            f"{where}: module {module} has {count} parameter LoRAs, the base has {len(order)} parameters "
            f"matching target_parameters ({', '.join(order) or 'none'})"
        )
    return tuple(order)


def _experts(
    module: str, param: str, nesting: tuple[str, ...], parts: dict[str, torch.Tensor], config, where: Path
) -> dict[str, LowRank]:
    """One wrapper's lora_A (E·r, in) and lora_B (out, r·E) as one LowRank per expert."""
    if set(parts) != {"lora_A.weight", "lora_B.weight"}:
        got = sorted(parts)
        raise FormatError(f"{where}: parameter {module}.{param}: tensors {got}, expected lora_A/lora_B")
    a, b = parts["lora_A.weight"], parts["lora_B.weight"]  # (E·r, in), (out, r·E)
    name = f"{module}.{param}"
    r = int(pc.pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8)))
    alpha = float(pc.pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] % r or b.shape[1] != a.shape[0]:
        raise FormatError(
            f"{where}: parameter {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
            f"(E·r, in) and (out, r·E) for r = {r}"
        )
    n = a.shape[0] // r
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    a3 = a.reshape(n, r, a.shape[1])  # (E, r, in)
    b3 = b.reshape(b.shape[0], r, n)  # (out, r, E)
    out = {}
    for e in range(n):
        expert = None if n == 1 else e
        site = ParamSite(param, expert, n, nesting)
        target = Target("unknown", (b.shape[0], a.shape[1]), site)
        out[experts.key(module, param, expert)] = LowRank(
            b3[:, :, e].contiguous(), a3[e].contiguous(), scale, target
        )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------ writing


class ParamWriter:
    """Collects the per-expert deltas of each parameter, then gives PEFT's tensors and config for them.

    Experts of one parameter may differ in rank and scale (an svd merge by energy): each scale is folded
    into B and the factors are zero-padded to the largest rank, which changes no product.
    """

    def __init__(self) -> None:
        self.params: dict[tuple[str, str], dict[int | None, LowRank]] = defaultdict(dict)

    def add(self, key: str, d: LowRank) -> None:
        if d.bias is not None or d.magnitude is not None:
            raise UnsupportedError(f"parameter {key}: PEFT's ParamWrapper has no LoRA bias or DoRA")
        module, param, expert = experts.split(key)
        self.params[module, param][expert] = d

    def tensors(self, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(tensor name, tensor) of every parameter, nested as PEFT nests them."""
        for (module, param), by_expert in sorted(self.params.items()):
            a, b = self._factors(by_expert)
            nest = [p for p in self._site(by_expert).nesting if (module, p) in self.params]
            name = prefix + module + NEST * (len(nest) - 1 - nest.index(param))
            yield f"{name}.lora_A.weight", a
            yield f"{name}.lora_B.weight", b

    def infos(self) -> dict[str, pc.LoraInfo]:
        """``module.param`` → its rank (scale 1: folded into B), as lora_config wants them."""
        out = {}
        for (module, param), by_expert in self.params.items():
            rank = max(1, max(d.b.shape[1] for d in by_expert.values()))
            out[f"{module}.{param}"] = pc.LoraInfo(rank, 1.0, "linear", False, False)
        return out

    def config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """lora_config's output with the parameters moved from target_modules to target_parameters."""
        if not self.params:
            return cfg
        names = {f"{m}.{p}" for m, p in self.params}
        modules = [m for m in cfg["target_modules"] if m not in names]
        return cfg | {"target_modules": modules or None, "target_parameters": sorted(names)}

    @staticmethod
    def _site(by_expert: Mapping[int | None, LowRank]) -> ParamSite:
        return next(iter(by_expert.values())).target.site

    def _factors(self, by_expert: Mapping[int | None, LowRank]) -> tuple[torch.Tensor, torch.Tensor]:
        """lora_A (E·R, in) and lora_B (out, R·E), every expert's scale folded into B."""
        site = self._site(by_expert)
        first = next(iter(by_expert.values()))
        (out_f, in_f), dtype = first.target.matrix_shape, first.b.dtype
        rank = max(1, max(d.b.shape[1] for d in by_expert.values()))
        n = site.experts
        a = torch.zeros(n, rank, in_f, dtype=dtype)  # (E, R, in)
        b = torch.zeros(out_f, rank, n, dtype=dtype)  # (out, R, E)
        for expert, d in by_expert.items():
            e, r = expert or 0, d.b.shape[1]
            a[e, :r] = d.a.to(dtype)
            b[:, :r, e] = (d.scale * d.b.float()).to(dtype)
        return a.reshape(n * rank, in_f), b.reshape(out_f, rank * n)
