"""Fuzzing the readers (random corruptions raise nothing but MergingError) and atomic output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merging.base.layout import BaseLayout
from merging.errors import MergingError
from merging.formats import gguf as fg
from merging.formats import peft as fp
from merging.formats import sources

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _corrupt(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf[: cut % (len(buf) + 1)] if cut is not None else buf)


edits_st = st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=8)
cut_st = st.one_of(st.none(), st.integers(0, 2**20))


@pytest.fixture(scope="module")
def samples(fx, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-src")
    layout = BaseLayout.from_folder(fx.base("llama"))
    fg.write(fp.read(fx.adapter("llama", "lora_b")), root / "a.gguf", base=layout)
    return {
        "safetensors": (fx.adapter("llama", "lora_patterns") / "adapter_model.safetensors").read_bytes(),
        "config": (fx.adapter("llama", "lora_patterns") / "adapter_config.json").read_text(),
        "gguf": (root / "a.gguf").read_bytes(),
        "layout": layout,
    }


@FUZZ
@given(edits=edits_st, cut=cut_st)
def test_fuzz_safetensors_reader(fx, tmp_path_factory, samples, edits, cut):
    d = tmp_path_factory.mktemp("f")
    shutil.copy(fx.adapter("llama", "lora_patterns") / "adapter_config.json", d)
    (d / "adapter_model.safetensors").write_bytes(_corrupt(samples["safetensors"], edits, cut))
    try:
        fp.read(d)
    except MergingError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "peft_type"]
KEYS += ["target_modules", "modules_to_save", "trainable_token_indices", "use_dora"]


@FUZZ
@given(key=st.sampled_from(KEYS), value=json_values)
def test_fuzz_config_reader(fx, tmp_path_factory, samples, key, value):
    d = tmp_path_factory.mktemp("c")
    shutil.copy(fx.adapter("llama", "lora_patterns") / "adapter_model.safetensors", d)
    cfg = json.loads(samples["config"])
    cfg[key] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    try:
        fp.read(d)
    except MergingError:
        pass


@FUZZ
@given(edits=edits_st, cut=cut_st)
def test_fuzz_gguf_reader(tmp_path_factory, samples, edits, cut):
    f = tmp_path_factory.mktemp("g") / "a.gguf"
    f.write_bytes(_corrupt(samples["gguf"], edits, cut))
    try:
        fg.read(f, base=samples["layout"])
    except MergingError:
        pass


# ------------------------------------------------------------------------------ atomic output


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_writer_failing_after_the_first_tensor_leaves_nothing(fx, tmp_path, monkeypatch):
    from merging.storage.safetensors_io import SafetensorsWriter

    ad = fp.read(fx.adapter("llama", "lora"))
    fp.write(ad, tmp_path / "existing")
    before = (tmp_path / "existing" / "adapter_model.safetensors").read_bytes()
    real = SafetensorsWriter.add

    def one_then_fail(self, name, tensor):
        if self.entries:
            raise RuntimeError("disk went away after the first tensor")
        real(self, name, tensor)

    monkeypatch.setattr(SafetensorsWriter, "add", one_then_fail)
    with pytest.raises(RuntimeError):
        fp.write(ad, tmp_path / "new")
    with pytest.raises(RuntimeError):
        fp.write(ad, tmp_path / "existing", force=True)
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "existing" / "adapter_model.safetensors").read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_interrupted_write_leaves_no_temp_files(fx, tmp_path, monkeypatch):
    from merging.storage.safetensors_io import SafetensorsWriter

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(SafetensorsWriter, "add", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fp.write(fp.read(fx.adapter("llama", "lora")), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


FULL_DISK = r"""
import resource, signal, sys
from click.testing import CliRunner
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
from merging_cli.main import main
sys.argv = ["merging", *sys.argv[1:]]
main()
"""


@pytest.mark.system
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_full_disk_leaves_no_output_and_keeps_the_existing_one(fx, tmp_path, fmt):
    """A file-size limit (RLIMIT_FSIZE) makes the write fail midway: one line, exit 2, nothing half-done."""
    a, b = fx.adapter("llama", "lora"), fx.adapter("llama", "lora_r8")
    out = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    small = tmp_path / ("small" if fmt == "peft" else "small.safetensors")
    args = ["merge", str(a), str(b), "-s", "cat", "--format", fmt]
    env = dict(os.environ, COLUMNS="200")

    def run(*extra):
        cmd = [sys.executable, "-c", FULL_DISK, *args, *extra]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    r = run("-o", str(out))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cannot write" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    lora = str(fx.adapter("llama", "lora_bin"))
    cmd = [sys.executable, "-m", "merging_cli.main", "merge", lora, "-s", "cat"]
    cmd += ["--format", fmt, "-o", str(small)]
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    snapshot = {p.name: p.read_bytes() for p in ([small] if small.is_file() else small.iterdir())}
    r = run("-o", str(small), "--force")
    assert r.returncode == 2
    assert {p.name: p.read_bytes() for p in ([small] if small.is_file() else small.iterdir())} == snapshot
    assert _leftovers(tmp_path) == []


def test_same_inputs_give_byte_identical_files(fx, tmp_path):
    """Determinism: every format, and DARE with its seed."""
    from click.testing import CliRunner
    from merging_cli.main import cli

    a, b = fx.adapter("llama", "lora"), fx.adapter("llama", "lora_b")
    outs = []
    for i in range(2):
        for fmt, name in (("peft", f"p{i}"), ("kohya", f"k{i}.safetensors"), ("gguf", f"g{i}.gguf")):
            args = [
                "merge",
                str(a),
                str(b),
                "-s",
                "dare_linear",
                "--seed",
                "5",
                "--format",
                fmt,
                "-o",
                str(tmp_path / name),
            ]
            if fmt == "gguf":
                args += ["--base", str(fx.base("llama"))]
            assert CliRunner().invoke(cli, args).exit_code == 0
        names = [f"p{i}/adapter_model.safetensors", f"k{i}.safetensors", f"g{i}.gguf"]
        outs.append([(tmp_path / n).read_bytes() for n in names])
    assert outs[0] == outs[1]
    assert sources.load(tmp_path / "p0")[0].deltas
