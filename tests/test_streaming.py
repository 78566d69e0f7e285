"""Module-streaming merge: the incremental safetensors writer, lazy reading, and bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from merging_cli.main import cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merging.base.layout import BaseLayout
from merging.core.lazy import LazyDeltas
from merging.formats import peft as fp
from merging.formats import sources
from merging.formats.base import ReadOptions
from merging.merge import pipeline as merge_lib
from merging.storage.safetensors_io import SafetensorsReader, SafetensorsWriter, finite, header_room

TENSORS = {
    "a.f32": torch.randn(7, 5),
    "b.bf16": torch.randn(3, 9).bfloat16(),
    "c.f16": torch.randn(11).half(),
    "d.i64": torch.arange(6).reshape(2, 3),
    "e.bool": torch.tensor([True, False, True]),
    "f.empty": torch.zeros(0, 4),
    "g.scalar": torch.tensor(3.5),
}


@pytest.mark.parametrize("room", [header_room(list(TENSORS)), 64])  # 64: the header outgrows its room
def test_writer_output_is_read_by_safetensors(tmp_path, room):
    w = SafetensorsWriter(tmp_path / "x.safetensors", room)
    for k, v in TENSORS.items():
        w.add(k, v)
    w.close({"format": "pt"})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert set(loaded) == set(TENSORS)
    for k, v in TENSORS.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_reader_matches_safetensors(tmp_path):
    save_file(TENSORS, str(tmp_path / "y.safetensors"))
    r = SafetensorsReader(tmp_path / "y.safetensors")
    assert sorted(r.keys()) == sorted(TENSORS)
    for k, v in TENSORS.items():
        got = r.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k


def test_finite_is_exact():
    assert finite(torch.randn(100))
    big = torch.full((10,), 60000.0, dtype=torch.float16)  # finite, but its sum overflows float16
    assert finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            t = torch.randn(50).to(dtype)
            t[17] = bad
            assert not finite(t), (bad, dtype)
    assert finite(torch.tensor([1, 2, 3]))


def test_lazy_read_equals_eager_and_reads_nothing_up_front(fx):
    folder = fx.adapter("llama", "lora")
    eager = fp.read(folder)
    lazy = fp.read(folder, options=ReadOptions(lazy=True))
    assert isinstance(lazy.deltas, LazyDeltas) and lazy.kinds == {"lora"}
    assert list(lazy.deltas) == sorted(eager.deltas)
    for mod, d in eager.deltas.items():
        e = lazy.deltas[mod]
        assert torch.equal(e.a, d.a) and torch.equal(e.b, d.b) and e.scale == d.scale and e.target == d.target


def test_lazy_read_refuses_nan_when_the_module_is_read(fx, tmp_path):
    import shutil

    folder = tmp_path / "nan"
    shutil.copytree(fx.adapter("llama", "lora"), folder)
    tensors = load_file(str(folder / fp.WEIGHTS))
    key = sorted(k for k in tensors if "lora_B" in k)[3]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(folder / fp.WEIGHTS))
    r = CliRunner().invoke(cli, ["merge", str(folder), str(fx.adapter("llama", "lora_b")), "-s", "cat",
                                 "-o", str(tmp_path / "out")])  # fmt: skip
    assert r.exit_code == 2 and key in r.output and "NaN" in r.output, r.output
    assert not (tmp_path / "out").exists() and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("strategy", ["cat", "svd", "ties"])
def test_streamed_cli_merge_writes_what_the_eager_merge_writes(fx, tmp_path, strategy):
    inputs = [fx.adapter("llama", n) for n in ("lora", "lora_b", "loha", "lokr")]
    base = fx.base("llama")  # LoHa/LoKr factors do not say the layer kind; the adapters name no base
    r = CliRunner().invoke(cli, ["merge", *map(str, inputs), "-s", strategy, "--rank", "6", "--base",
                                 str(base), "-o", str(tmp_path / "streamed")])  # fmt: skip
    assert r.exit_code == 0, r.output
    pairs = sources.load_inputs([str(p) for p in inputs])
    result = merge_lib.merge(pairs, strategy, merge_lib.Options(rank=6))
    assert not isinstance(result.adapters[0].deltas, LazyDeltas)
    fp.write(result.adapters[0], tmp_path / "eager", base=BaseLayout.from_folder(base))
    got, want = (load_file(str(tmp_path / f / fp.WEIGHTS)) for f in ("streamed", "eager"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    cfg = [json.loads((tmp_path / f / "adapter_config.json").read_text()) for f in ("streamed", "eager")]
    assert cfg[0] == cfg[1]
    recipe = json.loads((tmp_path / "streamed" / fp.RECIPE_FILE).read_text())
    assert all(len(i["sha256"]["adapter_model.safetensors"]) == 64 for i in recipe["inputs"])


MERGE_MEMORY = r"""
import sys
from click.testing import CliRunner
from merging_cli.main import cli
import transformers, merging.merge  # noqa: F401  (imports are a fixed cost, not the merge's working memory)
def hwm():  # this process image's peak RSS (ru_maxrss would carry the parent's across fork/exec)
    return [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
before = hwm()
r = CliRunner().invoke(cli, ["merge", *sys.argv[2:], "-s", "cat", "-o", sys.argv[1]])
assert r.exit_code == 0, r.output
print(hwm() - before)
"""


def _adapter(folder: Path, seed: int, modules: int, width: int, r: int) -> int:
    """A PEFT LoRA folder with ``modules`` width×width modules; returns its weights' bytes."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    tensors = {}
    for i in range(modules):
        p = f"base_model.model.layers.{i}.proj"
        tensors[f"{p}.lora_A.weight"] = 0.01 * torch.randn(r, width, generator=g)
        tensors[f"{p}.lora_B.weight"] = 0.01 * torch.randn(width, r, generator=g)
    save_file(tensors, str(folder / fp.WEIGHTS), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["proj"], "task_type": None}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return (folder / fp.WEIGHTS).stat().st_size


def test_merge_peak_memory_is_one_module_not_the_inputs(tmp_path):
    """8 inputs of 32 MiB each (16 modules): the cat merge's peak grows by about one module's working set."""
    paths, size = [], 0
    for i in range(8):
        size += _adapter(tmp_path / f"a{i}", i, modules=16, width=2048, r=128)
        paths.append(str(tmp_path / f"a{i}"))
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "-c", MERGE_MEMORY, str(tmp_path / "out"), *paths],
                         capture_output=True, text=True, check=True, cwd=root)  # fmt: skip
    grew = int(out.stdout.strip().splitlines()[-1])
    module = 8 * 2 * 2048 * 128 * 4  # one module's inputs (8 × A and B, float32); the merged module is as big
    msg = f"peak grew by {grew / 2**20:.0f} MiB; one module {module / 2**20:.0f} MiB"
    assert grew < 3 * module + 48 * 2**20, msg
    assert grew < size / 3, f"peak grew by {grew / 2**20:.0f} MiB for {size / 2**20:.0f} MiB of inputs"
    merged = load_file(str(tmp_path / "out" / fp.WEIGHTS))
    a0 = load_file(str(tmp_path / "a0" / fp.WEIGHTS))
    key = "base_model.model.layers.3.proj.lora_A.weight"
    assert torch.equal(merged[key][:128], a0[key])
