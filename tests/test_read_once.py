"""Every input byte read once: the recipe's sha256 comes from the bytes the merge's reader reads, and cat
writes its A blocks from those same bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from merging_cli.main import cli
from safetensors.torch import load_file, save_file

from merging.formats import peft as fp
from merging.storage import files
from merging.storage.files import StreamHash


def _file(tmp_path: Path, size: int = 100_003) -> tuple[Path, bytes]:
    data = hashlib.sha256(b"seed").digest() * (size // 32 + 1)
    path = tmp_path / "f.bin"
    path.write_bytes(data[:size])
    return path, data[:size]


def _chunks(n: int, step: int) -> list[tuple[int, int]]:
    return [(o, min(o + step, n)) for o in range(0, n, step)]


@pytest.mark.parametrize("order", ["forward", "reversed", "shuffled"])
def test_stream_hash_of_bytes_fed_in_any_order(tmp_path, order):
    path, data = _file(tmp_path)
    chunks = _chunks(len(data), 7_001)
    if order == "reversed":
        chunks.reverse()
    elif order == "shuffled":
        chunks = chunks[1::2] + chunks[::2]
    h = StreamHash(path, len(data))
    for begin, end in chunks:
        h.feed(begin, data[begin:end])
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert h.read_again == 0  # every byte came from the feeds


def test_stream_hash_reads_what_it_could_not_keep_or_was_never_fed(tmp_path):
    path, data = _file(tmp_path)
    h = StreamHash(path, len(data))
    h.AHEAD = 10_000  # keeps one chunk ahead of the next offset, not two
    for begin, end in reversed(_chunks(len(data) - 5_000, 7_001)):  # the last 5000 bytes never read
        h.feed(begin, data[begin:end])
    h.feed(3, data[3:20])  # behind nothing yet, ahead of offset 0: kept or dropped, never wrong
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert 5_000 < h.read_again < len(data)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()  # asked twice: the same, nothing read again


def test_merge_hashes_its_inputs_from_the_bytes_it_reads(fx, tmp_path):
    inputs = []
    for name in ("lora", "lora_b"):  # fresh copies: no earlier test has hashed these inodes
        shutil.copytree(fx.adapter("llama", name), tmp_path / name)
        inputs.append(tmp_path / name)
    r = CliRunner().invoke(cli, ["merge", *map(str, inputs), "-s", "cat", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    recipe = json.loads((tmp_path / "out" / fp.RECIPE_FILE).read_text())
    for folder, entry in zip(inputs, recipe["inputs"], strict=True):
        weights = folder / fp.WEIGHTS
        assert entry["sha256"][fp.WEIGHTS] == hashlib.sha256(weights.read_bytes()).hexdigest()
        fed = files.hashing(weights)
        assert fed is not None and fed.read_again == 0  # the merge's reads fed the hash: one pass


def _rchar() -> int:
    """Bytes this process has read through system calls (all its threads), from /proc."""
    lines = Path("/proc/self/io").read_text().splitlines()
    return next(int(line.split()[1]) for line in lines if line.startswith("rchar"))


def _lora(folder: Path, seed: int, modules: int = 4, width: int = 1024, r: int = 64) -> Path:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir()
    tensors = {}
    for i in range(modules):
        tensors[f"base_model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(r, width, generator=g)
        tensors[f"base_model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(width, r, generator=g)
    save_file(tensors, str(folder / fp.WEIGHTS), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["proj"], "task_type": None}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts reads through /proc (Linux)")
def test_cat_reads_every_input_byte_once_and_writes_the_a_blocks_as_read(tmp_path):
    """Two 2 MiB inputs: the merge reads about their size (hash included; a second pass, or A moved again by
    copy_file_range, would read half as much again), and the output's A is the inputs' A end to end."""
    inputs = [_lora(tmp_path / f"a{i}", i) for i in range(2)]
    warm = ["merge", *map(str, inputs), "-s", "cat", "-o", str(tmp_path / "warm")]
    assert CliRunner().invoke(cli, warm).exit_code == 0  # imports and caches: not the merge's reads
    for folder in inputs:  # fresh inodes: nothing hashed yet
        (folder / fp.WEIGHTS).rename(folder / "x")
        shutil.copyfile(folder / "x", folder / fp.WEIGHTS)
    size = sum((p / fp.WEIGHTS).stat().st_size for p in inputs)
    before = _rchar()
    r = CliRunner().invoke(cli, ["merge", *map(str, inputs), "-s", "cat", "-o", str(tmp_path / "out")])
    read = _rchar() - before
    assert r.exit_code == 0, r.output
    assert size <= read < size * 1.1, f"read {read} bytes for {size} bytes of inputs"
    got = load_file(str(tmp_path / "out" / fp.WEIGHTS))
    ins = [load_file(str(p / fp.WEIGHTS)) for p in inputs]
    a_keys = [k for k in got if k.endswith("lora_A.weight")]
    assert len(a_keys) == 4
    for k in a_keys:
        assert torch.equal(got[k], torch.cat([t[k] for t in ins]))
        b = k.replace("lora_A", "lora_B")
        assert torch.equal(got[b], torch.cat([2 * t[b] for t in ins], dim=1))  # alpha / r = 2 folded into B


def test_a_file_in_any_tensor_order_is_read_front_to_back(fx, tmp_path, monkeypatch):
    """Tensors stored in reverse name order (as writers that do not sort leave them): the merge still reads
    each file front to back, so the hash keeps nothing ahead and reads nothing again."""
    from merging.storage.safetensors_io import SafetensorsWriter, header_room

    monkeypatch.setattr(StreamHash, "AHEAD", 1)  # nothing may be kept ahead of the hash
    inputs = []
    for name in ("lora", "lora_b"):
        src = fx.adapter("llama", name)
        shutil.copytree(src, tmp_path / name)
        tensors = load_file(src / fp.WEIGHTS)
        names = sorted(tensors, reverse=True)
        sink = SafetensorsWriter(tmp_path / name / fp.WEIGHTS, header_room(names))
        for key in names:
            sink.add(key, tensors[key])
        sink.close({"format": "pt"})
        inputs.append(tmp_path / name)
    args = ["merge", *map(str, inputs), "-s", "svd", "--rank", "4", "-o", str(tmp_path / "o")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    for folder in inputs:
        weights = folder / fp.WEIGHTS
        fed = files.hashing(weights)
        assert fed is not None and fed.read_again == 0
        assert fed.hexdigest() == hashlib.sha256(weights.read_bytes()).hexdigest()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")
def test_reader_keeps_one_file_open_for_its_reads_and_closes_it_when_gone(tmp_path):
    import gc
    import os

    from merging.storage.safetensors_io import SafetensorsReader

    path = tmp_path / "t.safetensors"
    tensors = {f"t{i}": torch.randn(300 + i, 7) for i in range(5)}
    save_file(tensors, str(path))
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = fds()
    reader = SafetensorsReader(path)
    for name, t in tensors.items():
        assert torch.equal(reader.get(name), t)
    assert fds() == before + 1  # one descriptor for every read, not one per read
    del reader
    gc.collect()
    assert fds() == before
