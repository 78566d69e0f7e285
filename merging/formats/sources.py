"""Where adapters come from: a PEFT folder, or a merged stack folder (IA³ + LoRA written together)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from merging import formats
from merging.base.layout import TASK_CLASSES, BaseLayout
from merging.core.adapter import Adapter, Pair, weighted
from merging.errors import FormatError, IncompatibleAdapters, SourceError, UnsupportedError
from merging.formats import stack_folder
from merging.formats.base import ReadOptions
from merging.storage.files import sha256_file
from merging.storage.tensorfiles import tensor_files


def load(path: str | Path, *, allow_nonfinite: bool = False, base=None, lazy: bool = False) -> list[Adapter]:
    """The adapters a path holds, in stacking order: one for a PEFT folder or a kohya/GGUF file, several
    for a merged stack.

    Args:
        path: a PEFT adapter folder, a folder with merging_stack.json, a kohya/LyCORIS .safetensors file,
            or a llama.cpp .gguf LoRA file.
        allow_nonfinite: accept NaN/Inf values.
        base: the base model (a BaseLayout, a folder or a loaded model): maps kohya names to module paths
            and undoes GGUF's q/k permutation.
        lazy: read PEFT folders' tensors module by module when the deltas are used (a streaming merge).
    """
    p = Path(path)
    how = ReadOptions(lazy=lazy)
    if not p.exists():
        if isinstance(path, str) and not path.startswith((".", "/", "~")) and "/" in path:
            folder, sha = resolve_hub(path)  # HubRef.parse refuses anything that is not user/repo[@rev][:sub]
            ref = HubRef.parse(path)
            found = load(folder, allow_nonfinite=allow_nonfinite, base=base, lazy=lazy)
            root = folder
            for _ in (ref.subfolder or "").split("/") if ref.subfolder else []:
                root = root.parent
            lic = hub_license(root)
            hub = {"repo": ref.repo, "revision": sha, "subfolder": ref.subfolder, "license": lic}
            return [replace(a, revision=sha, config=dict(a.config) | {"hub": hub}) for a in found]
        raise SourceError(f"{p}: no such file or folder")
    if stack_folder.is_stack(p):
        names = stack_folder.read(p)
        return [formats.get("peft").read(p / n, allow_nonfinite=allow_nonfinite, options=how) for n in names]
    fmt = formats.detect(p)
    if fmt is not None:
        layout = BaseLayout.of(base) if base is not None and fmt.uses_base else None
        return [fmt.read(p, base=layout, allow_nonfinite=allow_nonfinite, options=how)]
    if p.is_dir() and any((p / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise SourceError(f"{p}: not an adapter: its weights but no adapter_config.json (PEFT needs both)")
    manifest = stack_folder.STACK_FILE
    raise SourceError(f"{p}: not an adapter (no adapter_config.json, {manifest}, .safetensors or .gguf)")


def describe(adapter: Adapter) -> dict[str, Any]:
    """Name, source, base model and sha256 of each weight file: what a recipe records about an input."""
    files = {}
    if adapter.source is not None and adapter.source.exists():
        files = {f.name: sha256_file(f) for f in tensor_files(adapter.source)}
    hub = adapter.config.get("hub") if isinstance(adapter.config, dict) else None
    return {
        "name": adapter.name,
        "path": str(adapter.source) if adapter.source else None,
        "hub": hub,
        "base_model": adapter.base_model,
        "revision": adapter.revision,
        "kinds": sorted(adapter.kinds),
        "sha256": files,
    }


def load_spec(spec: str, *, allow_nonfinite: bool = False, base=None, lazy: bool = False) -> list[Adapter]:
    """Load ``path`` or ``name=path``; with a name, the adapter (or each of a stack) is renamed."""
    name, path = None, spec
    if "=" in spec and not Path(spec).exists():
        name, _, path = spec.partition("=")
    adapters = load(path, allow_nonfinite=allow_nonfinite, base=base, lazy=lazy)
    if name is None:
        return adapters
    if len(adapters) == 1:
        return [replace(adapters[0], name=name)]
    return [replace(a, name=f"{name}/{a.name}") for a in adapters]


# ------------------------------------------------------------------------------------------ the Hub

HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<rev>[^:@\s]+))?(?::(?P<sub>[\w.\-/]+))?$"
)
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.gguf",
                    "*.safetensors", stack_folder.STACK_FILE, "merge_recipe.json", "README.md"]  # fmt: skip


@dataclass(frozen=True)
class HubRef:
    """A Hub adapter: ``user/repo``, ``user/repo@revision``, ``user/repo:subfolder``."""

    repo: str
    revision: str | None = None
    subfolder: str | None = None

    @classmethod
    def parse(cls, spec: str) -> HubRef:
        m = HUB_ID.match(spec)
        if not m or ".." in spec or spec.startswith(("/", ".")):
            raise SourceError(f"{spec!r}: not a local path nor a Hub id (user/repo[@revision][:subfolder])")
        sub = m["sub"]
        if sub is not None and (sub.startswith("/") or ".." in sub.split("/")):
            raise SourceError(f"{spec!r}: invalid subfolder {sub!r}")
        return cls(m["repo"], m["rev"], sub)


def resolve_hub(spec: str) -> tuple[Path, str]:
    """Download (or find in the cache) a Hub adapter's files; return (local folder, resolved commit sha).

    Honours HF_HUB_OFFLINE and HF_ENDPOINT as huggingface_hub does; every failure is one SourceError.
    """
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    ref = HubRef.parse(spec)
    patterns = (
        ADAPTER_PATTERNS if ref.subfolder is None else [f"{ref.subfolder}/{p}" for p in ADAPTER_PATTERNS]
    )
    try:
        folder = Path(snapshot_download(ref.repo, revision=ref.revision, allow_patterns=patterns))
    except hf_errors.GatedRepoError:
        raise SourceError(
            f"{spec}: the repository is gated; accept its terms on the Hub and log in"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise SourceError(
            f"{spec}: no such repository (or it is private and you are not logged in)"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise SourceError(f"{spec}: no revision {ref.revision!r} in {ref.repo}") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise SourceError(
            f"{spec}: not in the local Hub cache and the Hub cannot be reached (offline?)"
        ) from None
    except hf_errors.HFValidationError as e:
        raise SourceError(f"{spec}: invalid Hub id or revision ({e})") from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"{spec}: cannot download from the Hub ({first})") from None
    sha = folder.name  # snapshots/<commit sha>
    target = folder / ref.subfolder if ref.subfolder else folder
    if not target.exists():
        raise SourceError(f"{spec}: no adapter files under {ref.subfolder or 'the repository root'}")
    return target, sha


def hub_license(folder: Path) -> str | None:
    """The license in a downloaded model card's front matter, if any."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(card).data.to_dict().get("license")
    except Exception:  # a malformed card is not our input's fault; the license is just unknown
        return None


# ------------------------------------------------------------------------------------------ inputs


def load_inputs(
    specs: Sequence[str], *, base=None, weights: Sequence[float] | None = None, allow_nonfinite: bool = False,
    lazy: bool = False,
) -> list[Pair]:  # fmt: skip
    """The adapters named by specs (each ``path``, ``name=path`` or a Hub id) with their weights.

    Args:
        specs: the inputs in stacking order; a merged stack folder gives several adapters.
        base: the base model (a BaseLayout, a folder or a loaded model): names kohya/GGUF modules and
            refines every delta's layer kind and shape against the base's modules.
        weights: one per adapter (default 1 each).
        allow_nonfinite: accept NaN/Inf values.
        lazy: read PEFT folders module by module when the deltas are used (a streaming merge).

    Returns:
        (adapter, weight) pairs in stacking order.
    """
    layout = None if base is None else BaseLayout.of(base, task_type(specs))
    how = {"allow_nonfinite": allow_nonfinite, "base": layout, "lazy": lazy}
    adapters = [ad for spec in specs for ad in load_spec(spec, **how)]
    if layout is not None:
        adapters = [ad.refine_targets(layout.modules) for ad in adapters]
    return weighted(adapters, weights)


def task_type(specs: Sequence[str]) -> str | None:
    """The PEFT ``task_type`` the inputs name in their adapter_config.json (the head a base is loaded with).

    Inputs that name none (kohya, GGUF, no task) agree with any; two different ones are an error.
    """
    found: dict[str, str] = {}
    for spec in specs:
        path = spec.partition("=")[2] if "=" in spec and not Path(spec).exists() else spec
        folder = Path(path)
        if not folder.exists() and "/" in path and not path.startswith((".", "/", "~")):
            folder = resolve_hub(path)[0]
        for cfg in _configs(folder):
            try:
                kind = json.loads(cfg.read_text()).get("task_type")
            except (ValueError, AttributeError) as e:
                raise FormatError(f"{cfg}: not a valid adapter config ({e})") from None
            if kind and kind not in TASK_CLASSES:
                known = ", ".join(TASK_CLASSES)
                raise UnsupportedError(f"{cfg}: task_type {kind!r} is not one of PEFT's ({known})")
            if kind:
                found[str(cfg.parent)] = kind
    if len(set(found.values())) > 1:
        named = ", ".join(f"{where} ({kind})" for where, kind in found.items())
        raise IncompatibleAdapters(f"the inputs are for different task types: {named}")
    return next(iter(found.values()), None)


def _configs(folder: Path) -> list[Path]:
    """The adapter_config.json files of a PEFT folder or of a merged stack's members (a bad manifest is
    left for ``load`` to report)."""
    names = stack_folder.members(folder / stack_folder.STACK_FILE)
    return [f / "adapter_config.json" for f in [folder / n for n in names] or [folder]
            if (f / "adapter_config.json").is_file()]  # fmt: skip
