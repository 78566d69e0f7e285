"""Bake adapters into a GGUF model at its own quantisation, tensor by tensor, in row chunks.

llama.cpp's ``export-lora`` dequantises the base to F32 and writes F16. Here every adapted tensor is
dequantised a chunk of rows at a time, given Σ w·ΔW of those rows in float32 (rows permuted as llama.cpp's
converter permutes Llama's q/k: the delta's rows are gathered through the same permutation) and quantised
back to its own type (``outtype="same"``) or to ``outtype`` with the gguf package's own quantisers; a row is
whole blocks, so chunked and whole-tensor quantisation give the same bytes. The header is the base's (its
key/value section copied as bytes, ``merging.storage.gguf_header``) with the adapted tensors' types and the
offsets changed; every other tensor is copied byte for byte in the kernel (``copy_file_range``). Peak
memory ≈ a chunk plus the adapters' factors, written to a temporary file renamed into place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from merging.core import dora
from merging.core.adapter import Pair, Stack, stacks
from merging.core.alora import refuse_gated
from merging.core.deltas import AdditiveDelta, Dense, Hadamard
from merging.core.progress import Progress
from merging.errors import FormatError, UnsupportedError
from merging.formats.gguf import BaseInfo, _heads, _name_map, permute_rows
from merging.storage.atomic import atomic_file, checkpoint
from merging.storage.files import refuse_overlap
from merging.storage.gguf_header import (
    GGUFHeader,
    GgufTensor,
    copy_range,
    header_bytes,
    kv_bytes,
    layout,
    pad,
    read_header,
    write_all,
)

log = logging.getLogger(__name__)
OUTTYPES = ("same", "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# types the gguf package dequantises but cannot quantise → the nearest it can, by bits per weight
NEAREST = {"Q2_K": "q4_0", "Q3_K": "q4_0", "Q4_K": "q4_1", "Q5_K": "q5_1", "Q6_K": "q8_0", "Q8_K": "q8_0",
           "Q8_1": "q8_0", "IQ4_NL": "q4_0", "IQ4_XS": "q4_0", "IQ3_S": "q4_0", "IQ3_XXS": "q4_0",
           "IQ2_XXS": "q4_0", "IQ2_XS": "q4_0", "IQ2_S": "q4_0", "IQ1_S": "q4_0",
           "IQ1_M": "q4_0"}  # fmt: skip
CHUNK_FLOATS = 1 << 18  # rows per chunk: about 1 MiB of float32 (gguf's quantisers take ~10× that)
LOW_BITS = 6.5  # a quantised type under this many bits per weight rounds most of a LoRA's ΔW away
RowsFn = Callable[[np.ndarray], np.ndarray]


def _qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


def base_info(header: GGUFHeader) -> BaseInfo:
    """The architecture, block and head counts of a GGUF model, from its own metadata."""

    def field(key: str):
        if (v := header.get(key)) is None:
            raise FormatError(f"{header.path}: no scalar {key} in its metadata (not a llama.cpp model?)")
        return v

    arch = str(field("general.architecture"))
    heads = int(field(f"{arch}.attention.head_count"))
    kv = header.get(f"{arch}.attention.head_count_kv")
    return BaseInfo(arch, int(field(f"{arch}.block_count")), heads, heads if kv is None else int(kv))


def _source(d: AdditiveDelta, w: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows ``idx`` of w·ΔW (out, in), float32, from the delta's factors (no (out, in) matrix)."""
    if isinstance(d, Dense):
        c, m = w * d.scale, d.d
        return lambda idx: c * m[idx].float()
    if isinstance(d, Hadamard):
        (b1, a1), (b2, a2) = d.factors()
        c = w * d.scale
        return lambda idx: c * ((b1[idx] @ a1) * (b2[idx] @ a2))
    lr = d.low_rank()
    c, b, a = w * lr.scale, lr.b.float(), lr.a.float()
    return (lambda idx: b[idx] @ a) if c == 1.0 else (lambda idx: (c * b[idx]) @ a)


def _check(mod: str, stack: Stack, t: GgufTensor) -> None:
    """Refuse, before anything is written, a delta that cannot bake into tensor ``t``."""
    for d, _ in stack:
        if not isinstance(d, AdditiveDelta) or dora.is_dora(d) or getattr(d, "bias", None) is not None:
            raise UnsupportedError(f"module {mod}: only additive deltas (no IA³, DoRA, bias) bake into GGUF")
        if d.target.layer not in ("linear", "embedding", "unknown") or d.target.site is not None:
            raise UnsupportedError(f"module {mod}: a {d.target.layer} delta has no GGUF tensor to bake into")
        if (shape := tuple(d.target.matrix_shape)) != t.shape:
            raise FormatError(f"module {mod}: delta {shape}, tensor {t.name} is {t.shape}")


def _rows(mod: str, stack: Stack, info: BaseInfo, t: GgufTensor) -> RowsFn:
    """Σ w·ΔW of a module as a function of GGUF row indices, in GGUF's row order (q/k permuted)."""
    sources = [_source(d, w) for d, w in stack]
    order = torch.arange(t.shape[0])
    if (heads := _heads(mod, info)) is not None:
        order = permute_rows(order[:, None], heads)[:, 0]  # GGUF row j holds the model's row order[j]

    def rows(idx: np.ndarray) -> np.ndarray:
        sel = order[torch.from_numpy(idx)]
        total = sources[0](sel)
        for s in sources[1:]:
            total = total + s(sel)
        return total.numpy()

    return rows


def _out_type(name: str, qtype: int, outtype: str):
    """The type an adapted tensor is written in; a type gguf cannot quantise is refused in one line."""
    import gguf

    qtype = gguf.GGMLQuantizationType(qtype)
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


def bits_per_weight(qtype: int) -> float:
    """Bits a type stores per weight (Q4_1: 5.0, Q8_0: 8.5, F16: 16)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    return 8 * size / block


def warn_low_bits(base: Path, types: dict[str, object]) -> None:
    """One warning when adapted tensors keep a type under ``LOW_BITS`` bits per weight."""
    low = sorted({q.name for q in types.values() if bits_per_weight(q) < LOW_BITS})  # type: ignore[attr-defined]
    if low:
        log.warning(
            "%s: adapted tensors stay %s: most of a LoRA's changes are smaller than one quantisation step "
            "and round away (4 adapters on SmolLM2-135M Q4_1: KL vs llama.cpp stacking them 1.99 at Q4_1, "
            "0.022 at q8_0); pass --outtype q8_0 to keep them", base, "/".join(low)
        )  # fmt: skip


def _dequantized(raw: np.ndarray, qtype) -> np.ndarray:
    """Rows of stored bytes (rows, row bytes) → float32 (rows, row length), a writable copy."""
    import gguf

    return np.array(gguf.quants.dequantize(raw, qtype), dtype=np.float32)


def _quantized(data: np.ndarray, qtype) -> np.ndarray:
    import gguf

    return np.ascontiguousarray(gguf.quants.quantize(data, qtype))


def _bake_tensor(src: int, dst: int, at: int, t: GgufTensor, qtype, rows: RowsFn) -> None:
    """Write tensor ``t`` (stored at byte ``at`` of ``src``) + ΔW at type ``qtype`` to ``dst``, by chunks."""
    n, width = t.shape[0], int(np.prod(t.shape[1:]))
    row_bytes = t.nbytes // n
    step = max(1, CHUNK_FLOATS // width)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        raw = os.pread(src, (hi - lo) * row_bytes, at + lo * row_bytes)
        if len(raw) != (hi - lo) * row_bytes:
            raise FormatError(f"tensor {t.name}: the base ended early (changed while baking?)")
        w = _dequantized(np.frombuffer(raw, np.uint8).reshape(hi - lo, row_bytes), t.qtype)
        w += rows(np.arange(lo, hi))
        write_all(dst, _quantized(w, qtype))


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
        force: replace an existing ``out``.
        progress: called with (done, total, tensor name) after each tensor.

    Returns:
        ``out``.
    """
    base = Path(base)
    if outtype not in OUTTYPES:
        raise UnsupportedError(f"`outtype` must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    refuse_overlap(out, [base, *(ad.source for ad, _ in pairs)])
    refuse_gated(pairs)
    plan = stacks(pairs)
    if plan.aux:
        mod = next(iter(plan.aux))
        raise UnsupportedError(f"module {mod}: saved modules / token rows do not bake into GGUF")
    header = read_header(base)  # a corrupt or truncated file: one line naming it
    info = base_info(header)
    tmap = _name_map(info)
    tensors = {t.name: t for t in header.tensors}
    jobs: dict[str, str] = {}  # GGUF tensor → module
    for mod in plan.deltas:
        stem = tmap.get_name(mod)
        if stem is None or f"{stem}.weight" not in tensors:
            raise UnsupportedError(
                f"module {mod}: {base} has no tensor for it ({stem or 'no GGUF name'}; a tied output head?)"
            )
        name = f"{stem}.weight"
        _check(mod, plan.deltas[mod], tensors[name])
        jobs[name] = mod
    types = {name: _out_type(name, tensors[name].qtype, outtype) for name in jobs}
    if outtype == "same":
        warn_low_bits(base, types)
    outs = layout([GgufTensor(t.name, t.ne, int(types.get(t.name, t.qtype)), 0) for t in header.tensors],
                  header.alignment)  # fmt: skip
    head = header_bytes(header, kv_bytes(header), outs)
    with atomic_file(Path(out), force=force) as tmp, open(base, "rb") as f:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            write_all(dst, head)
            checkpoint("gguf header")
            pos = len(head)
            for i, (t, o) in enumerate(zip(header.tensors, outs, strict=True)):
                write_all(dst, bytes(len(head) + o.offset - pos))  # alignment padding
                at = header.data_offset + t.offset
                if t.name in jobs:
                    rows = _rows(jobs[t.name], plan.deltas[jobs[t.name]], info, t)
                    _bake_tensor(f.fileno(), dst, at, t, types[t.name], rows)
                else:
                    copy_range(f.fileno(), dst, at, t.nbytes)
                pos = len(head) + o.offset + o.nbytes
                checkpoint(f"tensor {t.name}")
                if progress:
                    progress(i + 1, len(outs), t.name)
            end = len(head) + (outs[-1].offset + pad(outs[-1].nbytes, header.alignment) if outs else 0)
            write_all(dst, bytes(end - pos))  # the last tensor padded too, as gguf's writer does
        finally:
            os.close(dst)
    return Path(out)
