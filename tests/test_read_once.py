"""Every input byte read once: the recipe's sha256 comes from the bytes the merge's reader reads; cat's A
blocks go from the inputs to the output in the kernel."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from merging_cli.main import cli
from safetensors.torch import load_file, save_file

from merging.formats import peft as fp
from merging.storage import files, origins
from merging.storage.files import StreamHash
from merging.storage.safetensors_io import SafetensorsReader


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


def test_cat_copies_the_a_blocks_in_the_kernel(fx, tmp_path, monkeypatch):
    inputs = [fx.adapter("llama", n) for n in ("lora", "lora_b")]
    calls = []
    real = os.copy_file_range

    def counting(*args):
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", counting)
    r = CliRunner().invoke(cli, ["merge", *map(str, inputs), "-s", "cat", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    got = load_file(str(tmp_path / "out" / fp.WEIGHTS))
    ins = [load_file(str(p / fp.WEIGHTS)) for p in inputs]
    a_keys = [k for k in got if k.endswith("lora_A.weight")]
    assert a_keys and calls  # the A blocks went through copy_file_range
    for k in a_keys:
        assert torch.equal(got[k], torch.cat([t[k] for t in ins if k in t]))  # the inputs' A, end to end
    assert sum(calls) >= sum(got[k].nbytes for k in a_keys)


def test_a_record_changed_in_place_or_on_disk_is_not_used(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2, 4)}, str(path))
    reader = SafetensorsReader(path)
    a, b = reader.get("a"), reader.get("b")
    assert origins.origin(a) is not None and origins.origin(a.reshape(4, 3)) is not None
    both = origins.concatenated(torch.cat([a, b]), [a, b])
    assert [r.size for r in origins.origin(both)] == [48, 32]
    a.add_(1)  # changed in memory: its bytes are no longer the file's
    assert origins.origin(a) is None and origins.origin(both) is not None  # cat made its own copy
    c = reader.get("b")
    os.utime(path, ns=(1, 1))  # the file changed since it was read
    assert origins.origin(c) is None and origins.origin(both) is None


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
