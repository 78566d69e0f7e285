"""Bake adapters into a GGUF model at its own quantisation, tensor by tensor.

llama.cpp's ``export-lora`` dequantises the base to F32 and writes F16. Here every adapted tensor is
dequantised, given Σ w·ΔW in float32 (rows permuted as llama.cpp's converter permutes Llama's q/k), and
quantised back to its own type (``outtype="same"``) or to ``outtype`` with the gguf package's own
quantisers; every other tensor and every metadata field is copied as it is, the tensor bytes unchanged.
The output is written tensor by tensor from the memory-mapped base (peak ≈ one float32 tensor) to a
temporary file renamed into place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from merging.core import dora
from merging.core.adapter import Pair, Stack, stacks
from merging.core.alora import refuse_gated
from merging.core.deltas import AdditiveDelta
from merging.core.progress import Progress
from merging.errors import FormatError, UnsupportedError
from merging.formats.gguf import BaseInfo, _heads, _name_map, permute_rows
from merging.storage.atomic import atomic_file, checkpoint
from merging.storage.files import refuse_overlap
from merging.storage.tensorfiles import gguf_reader

FLOATS = {"F32": np.float32, "F16": np.float16}  # written as numpy floats; the rest as bytes
OUTTYPES = ("same", "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# types the gguf package dequantises but cannot quantise → the nearest it can, by bits per weight
NEAREST = {"Q2_K": "q4_0", "Q3_K": "q4_0", "Q4_K": "q4_1", "Q5_K": "q5_1", "Q6_K": "q8_0", "Q8_K": "q8_0",
           "Q8_1": "q8_0", "IQ4_NL": "q4_0", "IQ4_XS": "q4_0", "IQ3_S": "q4_0", "IQ3_XXS": "q4_0",
           "IQ2_XXS": "q4_0", "IQ2_XS": "q4_0", "IQ2_S": "q4_0", "IQ1_S": "q4_0",
           "IQ1_M": "q4_0"}  # fmt: skip


def _qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


def base_info(reader, where: Path) -> BaseInfo:
    """The architecture, block and head counts of a GGUF model, from its own metadata."""

    def field(key: str):
        if (f := reader.fields.get(key)) is None:
            raise FormatError(f"{where}: no {key} in its metadata (not a llama.cpp model?)")
        return f.contents()

    arch = field("general.architecture")
    heads = int(field(f"{arch}.attention.head_count"))
    kv = reader.fields.get(f"{arch}.attention.head_count_kv")
    return BaseInfo(arch, int(field(f"{arch}.block_count")), heads, int(kv.contents()) if kv else heads)


def _delta(mod: str, stack: Stack, info: BaseInfo) -> np.ndarray:
    """Σ w·ΔW of a module in GGUF's layout (out, in), float32."""
    total = None
    for d, w in stack:
        if not isinstance(d, AdditiveDelta) or dora.is_dora(d) or getattr(d, "bias", None) is not None:
            raise UnsupportedError(f"module {mod}: only additive deltas (no IA³, DoRA, bias) bake into GGUF")
        if d.target.layer not in ("linear", "embedding", "unknown") or d.target.site is not None:
            raise UnsupportedError(f"module {mod}: a {d.target.layer} delta has no GGUF tensor to bake into")
        m = w * d.dense()  # (out, in)
        total = m if total is None else total + m
    if (heads := _heads(mod, info)) is not None:
        total = permute_rows(total, heads)  # as llama.cpp's converter stored W
    return total.numpy()


def _out_type(name: str, qtype, outtype: str):
    """The type an adapted tensor is written in; a type gguf cannot quantise is refused in one line."""
    import gguf

    if outtype != "same":
        return _qtype(outtype)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return qtype
    probe = np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][0]), dtype=np.float32)
    try:
        gguf.quants.quantize(probe, qtype)
    except NotImplementedError:
        near = NEAREST.get(qtype.name, "q8_0")
        raise UnsupportedError(
            f"tensor {name} is {qtype.name}, which the gguf package cannot quantise; pass --outtype {near} "
            f"(the nearest it can) or f16"
        ) from None
    return qtype


def _quantized(data: np.ndarray, qtype) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def bake_gguf(
    base: Path, pairs: Sequence[Pair], out: Path, *, outtype: str = "same", force: bool = False,
    progress: Progress | None = None,
) -> Path:  # fmt: skip
    """Write the GGUF model ``base`` with the adapters folded into its tensors, each at its own type.

    Args:
        base: a llama.cpp model file (.gguf).
        pairs: (Adapter, weight) in stacking order; additive deltas on modules gguf's name map knows.
        out: the output .gguf (atomic; an existing one needs ``force``).
        outtype: "same" (each adapted tensor keeps its type) or one of OUTTYPES for the adapted tensors.

    Returns:
        ``out``.
    """
    import gguf

    base = Path(base)
    if outtype not in OUTTYPES:
        raise UnsupportedError(f"`outtype` must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    refuse_overlap(out, [base, *(ad.source for ad, _ in pairs)])
    refuse_gated(pairs)
    plan = stacks(pairs)
    if plan.aux:
        mod = next(iter(plan.aux))
        raise UnsupportedError(f"module {mod}: saved modules / token rows do not bake into GGUF")
    reader = gguf_reader(base)  # a corrupt file: one line naming it
    info = base_info(reader, base)
    tmap = _name_map(info)
    tensors = {t.name: t for t in reader.tensors}
    jobs: dict[str, str] = {}  # GGUF tensor → module
    for mod in plan.deltas:
        stem = tmap.get_name(mod)
        if stem is None or f"{stem}.weight" not in tensors:
            raise UnsupportedError(
                f"module {mod}: {base} has no tensor for it ({stem or 'no GGUF name'}; a tied output head?)"
            )
        jobs[f"{stem}.weight"] = mod
    types = {name: _out_type(name, tensors[name].tensor_type, outtype) for name in jobs}
    with atomic_file(Path(out), force=force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), info.arch, endianess=reader.endianess)
        _copy_metadata(reader, writer)
        for t in reader.tensors:
            if t.name in types:
                shape = tuple(int(n) for n in reversed(t.shape))  # (out, in) as numpy holds it
                q = types[t.name]
                dt = FLOATS.get(q.name, np.uint8)
                byte_shape = gguf.quant_shape_to_byte_shape(shape, q) if dt is np.uint8 else shape
                nbytes = int(np.prod(byte_shape)) * np.dtype(dt).itemsize
                raw = q if dt is np.uint8 else None
                writer.add_tensor_info(t.name, byte_shape, np.dtype(dt), nbytes, raw)
            else:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(reader.tensors):
            if t.name in jobs:
                mod = jobs[t.name]
                w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)  # (out, in)
                delta = _delta(mod, plan.deltas[mod], info)
                if delta.shape != w.shape:
                    raise FormatError(f"module {mod}: delta {delta.shape}, tensor {t.name} is {w.shape}")
                writer.write_tensor_data(_quantized(w + delta, types[t.name]))
            else:
                writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
            checkpoint(f"tensor {t.name}")
            if progress:
                progress(i + 1, len(reader.tensors), t.name)
        writer.close()
    return Path(out)


def _copy_metadata(reader, writer) -> None:
    """Every key/value field of the base (the writer adds general.architecture and GGUF.* itself)."""
    import gguf

    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


