"""Hostile inputs: a generated corpus of bad files, each refused with one MergingError naming the file and the
key or module, one line on stderr and exit code 2 from the CLI; fuzzing of the readers; atomic output."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from merging_cli.main import cli

from merging.errors import (
    FormatError,
    IncompatibleAdapters,
    MergingError,
    NonFiniteError,
    ShapeMismatch,
    SourceError,
)
from merging.formats import sources
from tests.support.helpers import rewrite_tensors

QKEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable  # (fx, tmp) -> list of CLI args after the command
    command: str  # "inspect", "merge" or "verify"
    error: type[MergingError]
    says: tuple[str, ...]  # substrings of the message (the file, the key or module, the problem)


def _peft(fx, tmp, name="lora"):
    dst = tmp / f"adapter-{name}"
    shutil.copytree(fx.adapter("llama", name), dst)
    return dst


def _tensors(folder, fn):
    rewrite_tensors(folder, fn)
    return folder


def _raw(folder, data: bytes):
    (folder / "adapter_model.safetensors").write_bytes(data)
    return folder


def _header(tensors: dict, data_len: int) -> bytes:
    h = json.dumps(tensors).encode()
    return struct.pack("<Q", len(h)) + h + b"\0" * data_len


def _config(folder, fn):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    fn(cfg)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def _set(d, k, v):
    d[k] = v


class Evil:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {EVIL_MARKER}",))


EVIL_MARKER = Path("/tmp/merging-evil-payload-ran")


def _pickle_bin(fx, tmp):
    d = _peft(fx, tmp)
    (d / "adapter_model.safetensors").unlink()
    torch.save({"x": Evil()}, d / "adapter_model.bin", _use_new_zipfile_serialization=True)
    return [d]


def _gguf(fx, tmp, general_type="adapter", arch="llama"):
    import gguf

    f = tmp / f"{general_type}-{arch}.gguf"
    w = gguf.GGUFWriter(str(f), arch)
    w.add_string("general.type", general_type)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 0.0)
    import numpy as np

    w.add_tensor("blk.0.attn_v.weight.lora_a", np.zeros((4, 64), dtype=np.float32))
    w.add_tensor("blk.0.attn_v.weight.lora_b", np.zeros((32, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return f


def _kohya(tmp, tensors, name="k.safetensors"):
    from safetensors.torch import save_file

    save_file(tensors, str(tmp / name))
    return tmp / name


def _two_bases(fx, tmp):
    a = _config(_peft(fx, tmp, "lora"), lambda c: _set(c, "base_model_name_or_path", "org/model-a"))
    b = _config(_peft(fx, tmp, "lora_b"), lambda c: _set(c, "base_model_name_or_path", "org/model-b"))
    return [a, b, "-o", tmp / "out", "-s", "cat"]


CASES = [
    Case("truncated safetensors", lambda fx, t: [_raw(d := _peft(fx, t), (d / "adapter_model.safetensors").read_bytes()[:300])],
         "inspect", FormatError, ("adapter_model.safetensors",)),
    Case("header longer than the file", lambda fx, t: [_raw(_peft(fx, t), struct.pack("<Q", 10_000) + b"{}")],
         "inspect", FormatError, ("adapter_model.safetensors", "header claims")),
    Case("header not JSON", lambda fx, t: [_raw(_peft(fx, t), struct.pack("<Q", 5) + b"{oops")],
         "inspect", FormatError, ("adapter_model.safetensors", "not valid JSON")),
    Case("offsets outside the file", lambda fx, t: [_raw(_peft(fx, t), _header(
        {QKEY: {"dtype": "F32", "shape": [64, 4], "data_offsets": [0, 1024]}}, 16))],
         "inspect", FormatError, ("adapter_model.safetensors", "points outside the file")),
    Case("dtype lies", lambda fx, t: [_raw(_peft(fx, t), _header(
        {QKEY: {"dtype": "Q9", "shape": [2, 2], "data_offsets": [0, 16]}}, 16))],
         "inspect", FormatError, ("adapter_model.safetensors",)),
    Case("size lies", lambda fx, t: [_raw(_peft(fx, t), _header(
        {QKEY: {"dtype": "F32", "shape": [64, 400], "data_offsets": [0, 16]}}, 16))],
         "inspect", FormatError, ("adapter_model.safetensors",)),
    Case("enormous header length", lambda fx, t: [_raw(_peft(fx, t), struct.pack("<Q", 2**60) + b"{}")],
         "inspect", FormatError, ("adapter_model.safetensors", "header claims")),
    Case("empty weights file", lambda fx, t: [_raw(_peft(fx, t), b"")],
         "inspect", FormatError, ("adapter_model.safetensors", "truncated")),
    Case("NaN values", lambda fx, t: [_tensors(_peft(fx, t), lambda d: d[QKEY].__setitem__((0, 0), float("nan")))],
         "inspect", NonFiniteError, ("adapter_model.safetensors", "q_proj.lora_B", "NaN")),
    Case("Inf values", lambda fx, t: [_tensors(_peft(fx, t), lambda d: d[QKEY].__setitem__((1, 1), float("inf")))],
         "inspect", NonFiniteError, ("q_proj.lora_B",)),
    Case("A/B rank mismatch", lambda fx, t: [_tensors(_peft(fx, t), lambda d: d.__setitem__(QKEY, torch.zeros(64, 3)))],
         "inspect", ShapeMismatch, ("adapter_model.safetensors", "model.layers.0.self_attn.q_proj", "do not chain")),
    Case("does not fit the base", lambda fx, t: [_tensors(_peft(fx, t), lambda d: d.__setitem__(QKEY, torch.zeros(60, 4))),
                                                  "-o", t / "o", "-s", "cat", "--base", fx.base("llama")],
         "merge", ShapeMismatch, ("model.layers.0.self_attn.q_proj", "(60, 64)", "(64, 64)")),
    Case("two base models", _two_bases, "merge", IncompatibleAdapters, ("org/model-a", "org/model-b")),
    Case("config not JSON", lambda fx, t: [(d := _peft(fx, t), (d / "adapter_config.json").write_text("{r: 4"))[0]],
         "inspect", FormatError, ("adapter_config.json", "invalid JSON")),
    Case("config is a list", lambda fx, t: [(d := _peft(fx, t), (d / "adapter_config.json").write_text("[1]"))[0]],
         "inspect", FormatError, ("adapter_config.json", "JSON object")),
    Case("missing config", lambda fx, t: [(d := _peft(fx, t), (d / "adapter_config.json").unlink())[0], "-o", t / "o", "-s", "cat"],
         "merge", SourceError, ("not an adapter",)),
    Case("unknown peft_type", lambda fx, t: [_config(_peft(fx, t), lambda c: _set(c, "peft_type", "VERA"))],
         "inspect", FormatError, ("adapter_config.json", "unknown peft_type 'VERA'")),
    Case("config value of the wrong type", lambda fx, t: [_config(_peft(fx, t), lambda c: _set(c, "r", "four"))],
         "inspect", FormatError, ("adapter-lora", "malformed")),
    Case("invalid rank_pattern regex", lambda fx, t: [_config(_peft(fx, t), lambda c: _set(c, "rank_pattern", {"(": 2}))],
         "inspect", FormatError, ("adapter-lora", "malformed")),
    Case("unknown key", lambda fx, t: [_tensors(_peft(fx, t), lambda d: d.__setitem__("base_model.model.x.lora_Q", torch.ones(1)))],
         "inspect", FormatError, ("unknown key 'base_model.model.x.lora_Q'",)),
    Case("weights missing", lambda fx, t: [(d := _peft(fx, t), (d / "adapter_model.safetensors").unlink())[0]],
         "inspect", FormatError, ("adapter-lora", "no adapter_model.safetensors")),
    Case("pickle payload", _pickle_bin, "inspect", FormatError, ("adapter_model.bin", "pickled objects")),
    Case("bin of random bytes", lambda fx, t: [(d := _peft(fx, t), (d / "adapter_model.safetensors").unlink(),
                                               (d / "adapter_model.bin").write_bytes(b"\x80\x04junk" * 9))[0]],
         "inspect", FormatError, ("adapter_model.bin",)),
    Case("GGUF that is a model", lambda fx, t: [_gguf(fx, t, "model"), "-o", t / "o", "-s", "cat", "--base", fx.base("llama")],
         "merge", FormatError, ("model-llama.gguf", "not a GGUF LoRA adapter")),
    Case("GGUF for another architecture", lambda fx, t: [_gguf(fx, t, "adapter", "qwen2"), "-o", t / "o", "-s", "cat",
                                                          "--base", fx.base("llama")],
         "merge", FormatError, ("adapter-qwen2.gguf", "'qwen2'", "'llama'")),
    Case("truncated GGUF", lambda fx, t: [(f := _gguf(fx, t), f.write_bytes(f.read_bytes()[:200]))[0], "-o", t / "o", "-s", "cat"],
         "merge", FormatError, ("adapter-llama.gguf",)),
    Case("kohya mixed families", lambda fx, t: [_kohya(t, {"lora_unet_a.lora_down.weight": torch.zeros(2, 3),
                                                            "lora_unet_a.hada_w1_a": torch.zeros(3, 2)})],
         "inspect", FormatError, ("k.safetensors", "lora_unet_a", "mixed key families")),
    Case("kohya unknown family", lambda fx, t: [_kohya(t, {"lora_unet_a.oft_blocks": torch.zeros(2, 3)}), "-o", t / "o", "-s", "cat"],
         "merge", FormatError, ("k.safetensors", "lora_unet_a", "unknown")),
    Case("kohya module not in the base", lambda fx, t: [_kohya(t, {"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 3),
                                                                    "lora_unet_nowhere.lora_up.weight": torch.zeros(3, 2)}),
                                                         "-o", t / "o", "-s", "cat", "--base", fx.base("llama")],
         "merge", FormatError, ("k.safetensors", "lora_unet_nowhere", "matches no module")),
    Case("Hub id with ../", lambda fx, t: ["alice/../../etc"], "inspect", SourceError, ("not a local path nor a Hub id",)),
    Case("Hub id with an invalid revision", lambda fx, t: ["alice/model@bad rev"], "inspect", SourceError, ("not a local path",)),
    Case("Hub subfolder escaping the repo", lambda fx, t: ["alice/model:../../x"], "inspect", SourceError, ("Hub id",)),
]  # fmt: skip


def _library_call(case: Case, args: list, fx):
    paths = [a for a in args if not str(a).startswith("-")]
    if case.command == "merge":
        i = args.index("-o") if "-o" in args else len(args)
        paths = args[:i]
        base = args[args.index("--base") + 1] if "--base" in args else None
        from merging.base.layout import module_shapes
        from merging.core.adapter import align

        ads = [ad for p in paths for ad in sources.load(str(p), base=base)]
        if base is not None:
            ads = [ad.refine_targets(module_shapes(Path(base))) for ad in ads]
        align(ads)
        return
    sources.load(str(paths[0]))


def test_corpus_is_large_enough():
    assert len({c.name for c in CASES}) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_raises_one_error_naming_the_file(fx, tmp_path, case):
    args = case.build(fx, tmp_path)
    with pytest.raises(case.error) as e:
        _library_call(case, args, fx)
    for s in case.says:
        assert s in str(e.value), f"{s!r} not in {e.value}"
    assert "\n" not in str(e.value)
    assert not EVIL_MARKER.exists(), "the pickle payload ran"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli_prints_one_line_and_exits_2(fx, tmp_path, case):
    args = [str(a) for a in case.build(fx, tmp_path)]
    result = CliRunner(env={"COLUMNS": "300"}).invoke(cli, [case.command, *args])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
    debug = CliRunner().invoke(cli, ["--debug", case.command, *args])
    assert isinstance(debug.exception, MergingError)  # --debug lets the traceback through


ONE_PROCESS = r"""
import json, os, sys, tempfile
from merging_cli.main import cli
results = []
for argv in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile() as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            cli.main(argv, prog_name="merging", standalone_mode=True)
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        results.append([code, err.read().decode(errors="replace")])
print(json.dumps(results))
"""


@pytest.mark.system
def test_every_case_prints_one_stderr_line_in_a_real_process(fx, tmp_path):
    """As a user runs it, stderr as the terminal gets it: nothing from torch, transformers or PEFT leaks, and
    no message advises unpickling."""
    import json
    import os
    import subprocess
    import sys

    argvs = []
    for i, case in enumerate(CASES):
        folder = tmp_path / str(i)
        folder.mkdir()
        argvs.append([case.command, *(str(a) for a in case.build(fx, folder))])
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), COLUMNS="300")
    run = subprocess.run([sys.executable, "-c", ONE_PROCESS, json.dumps(argvs)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for case, (code, err) in zip(CASES, results, strict=True):
        assert code == 2 and len(err.strip().splitlines()) == 1, (case.name, err)
        assert "weights_only" not in err and "Traceback" not in err, (case.name, err)
