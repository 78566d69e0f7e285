"""The threads behind the reader and the writer: the hash (``storage.hasher``), judged against hashlib over
the file's bytes, and the writes (``storage.behind``), judged against safetensors' own loader."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.errors import FormatError
from merging.storage import behind, buffers, files, hasher
from merging.storage import safetensors_io as sio
from merging.storage.safetensors_io import SafetensorsReader, SafetensorsWriter, header_room


def _file(tmp_path: Path, n: int = 12) -> Path:
    g = torch.Generator().manual_seed(1)
    tensors = {f"m{i:02d}.w": torch.randn(40 + i, 700, generator=g) for i in range(n)}  # ~110 KB each
    tensors["tiny"] = torch.arange(3.0)
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    return tmp_path / "t.safetensors"


def test_the_hash_runs_behind_the_reads_on_one_thread_and_is_the_files(tmp_path, monkeypatch):
    monkeypatch.delenv("MERGING_READAHEAD", raising=False)
    monkeypatch.setattr(hasher, "BEHIND", 200_000)  # about two tensors queued at a time: the reader waits
    monkeypatch.setattr(sio, "SPAN", 0)  # one tensor per read
    path = _file(tmp_path)
    wanted = files.hash_ahead(path)
    reader = SafetensorsReader(path)
    want = load_file(str(path))
    fed_on: dict[int, str] = {}
    feed = wanted.feed

    def spy(offset, data):
        fed_on[offset] = threading.current_thread().name
        feed(offset, data)

    monkeypatch.setattr(wanted, "feed", spy)
    got = {k: reader.get(k) for k in sorted(reader.keys(), key=reader.offset)}
    assert reader._worker is None  # the reader read every tensor itself
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert wanted.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()  # waits for the queue
    assert wanted.read_again == 0  # every byte hashed came from the one read
    assert fed_on.pop(0) == "MainThread"  # the header, read when the file was opened
    assert set(fed_on.values()) == {"hash-behind"} and len(fed_on) == len(want)  # every tensor, behind
    assert hasher._queue.bytes == 0 and not hasher._queue.items


def test_a_tensor_queued_for_the_hash_keeps_its_memory(tmp_path, monkeypatch):
    """A buffer released by the merge while still queued is not handed out again before it is hashed."""
    gate = threading.Event()
    seen: list[bytes] = []

    def slow(offset, data):
        gate.wait()
        seen.append(bytes(data[:8]))

    raw = buffers.take(1 << 20)
    raw.fill_(5)
    ptr = raw.data_ptr()
    hasher.hash_behind(slow, 0, raw)
    del raw  # the merge is done with it; the queue is not
    other = buffers.take(1 << 20)
    assert other.data_ptr() != ptr  # not handed out again while queued
    other.fill_(9)
    gate.set()
    hasher.drain()
    assert seen == [bytes([5] * 8)]


def test_the_writer_thread_puts_every_tensor_at_its_offset(tmp_path, monkeypatch):
    """Written behind, a little at a time (room for one tensor queued): the file safetensors reads back."""
    monkeypatch.setattr(behind, "BEHIND", 1)
    g = torch.Generator().manual_seed(2)
    tensors = {f"t{i}": torch.randn(30 + i, 500, generator=g) for i in range(9)}
    tensors |= {"empty": torch.empty(0, 4), "half": torch.randn(7, 3, generator=g).half()}
    sink = SafetensorsWriter(tmp_path / "w.safetensors", header_room(list(tensors)))
    for name, t in tensors.items():
        sink.add(name, t)
    sink.close({"format": "pt"})
    back = load_file(str(tmp_path / "w.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_a_write_that_fails_on_the_writer_thread_is_raised_by_the_writer(tmp_path):
    sink = SafetensorsWriter(tmp_path / "w.safetensors", 1000)
    read_only = os.open(tmp_path / "w.safetensors", os.O_RDONLY)
    sink._behind.fd = read_only  # every write from here fails (EBADF), as a full disk would (ENOSPC)
    try:
        sink.add("a", torch.ones(1000))
        with pytest.raises(OSError):
            sink.add("b", torch.ones(1000))  # or at close: whichever comes after the failed write
            sink.close()
        sink.abort()  # after a failure: closes, raises nothing more
    finally:
        os.close(read_only)
    assert sink.file.closed


def test_a_reader_reads_tensors_end_to_end_in_spans_each_handed_out_once(tmp_path, monkeypatch):
    """Odd sizes (a tensor not 8-aligned starts a span of its own), a span limit of 3 tensors, a tensor asked
    for twice (read again: the first copy was changed in place), and every byte hashed once."""
    monkeypatch.setattr(sio, "SPAN", 3 * 40 * 700 * 4)
    g = torch.Generator().manual_seed(3)
    tensors = {f"m{i:02d}.w": torch.randn(40, 700, generator=g) for i in range(7)}
    tensors |= {"m03.odd": torch.arange(5, dtype=torch.uint8), "m03.z": torch.arange(6.0)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    path = tmp_path / "t.safetensors"
    wanted = files.hash_ahead(path)
    reader = SafetensorsReader(path)
    reads = []
    real = sio._read_tensor

    def counted(f, raw, offset, key):
        reads.append(key)
        real(f, raw, offset, key)

    monkeypatch.setattr(sio, "_read_tensor", counted)
    order = sorted(reader.keys(), key=reader.offset)
    got = {k: reader.get(k) for k in order}
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert len(reads) < len(order)  # fewer reads than tensors: spans
    got[order[0]].add_(1)
    again = reader.get(order[0])  # asked for again: read again, not the changed bytes
    assert torch.equal(again, tensors[order[0]])
    assert wanted.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert wanted.read_again == 0


def test_a_span_cut_short_names_the_tensor_that_is(tmp_path):
    g = torch.Generator().manual_seed(4)
    save_file({f"m{i}": torch.randn(50, 50, generator=g) for i in range(4)}, str(tmp_path / "t.safetensors"))
    path = tmp_path / "t.safetensors"
    reader = SafetensorsReader(path)
    order = sorted(reader.keys(), key=reader.offset)
    with open(path, "r+b") as f:
        f.truncate(reader.offset(order[2]) + 10)  # inside the third tensor, after the header was read
    reader.get(order[0])  # the span is cut short: the first tensor alone is whole
    reader.get(order[1])
    with pytest.raises(FormatError, match=f"{order[2]}.*cut short"):
        reader.get(order[2])
