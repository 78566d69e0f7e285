"""Every input byte read once: the recipe's sha256 comes from the bytes the merge's reader reads."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from merging_cli.main import cli

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
