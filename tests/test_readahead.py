"""The read-ahead worker (tensors read and hashed on another thread) and the reused byte buffers behind it,
judged against safetensors' own loader and hashlib over the file's bytes."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.errors import FormatError
from merging.storage import buffers, files, readahead
from merging.storage.safetensors_io import SafetensorsReader


@pytest.fixture(autouse=True)
def _a_free_cpu(monkeypatch):
    """The read-ahead workers, asked for (the default is ``storage.hasher``'s one hashing thread)."""
    monkeypatch.setenv("MERGING_READAHEAD", "1")


def _file(tmp_path: Path, n: int = 6, name: str = "t.safetensors") -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {f"m{i}.w": torch.randn(64 + i, 300, generator=g) for i in range(n)}  # ~77 KB each
    tensors["tiny"] = torch.arange(3.0)
    save_file(tensors, str(tmp_path / name), metadata={"format": "pt"})
    return tmp_path / name


def _hashed_reader(path: Path) -> tuple[SafetensorsReader, files.StreamHash]:
    wanted = files.hash_ahead(path)
    return SafetensorsReader(path), wanted


def test_tensors_come_from_the_worker_hashed_before_they_are_taken(tmp_path):
    path = _file(tmp_path)
    reader, wanted = _hashed_reader(path)
    want = load_file(str(path))
    order = sorted(reader.keys(), key=reader.offset)
    got = {k: reader.get(k) for k in order}
    assert reader._worker is not None  # the hash was wanted: a worker read the file
    assert all(torch.equal(got[k], want[k]) for k in want)
    for t in got.values():
        t.add_(1)  # changed in place after it was taken: the hash is of the file's bytes regardless
    assert wanted.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert wanted.read_again == 0  # every byte came from the one read


def test_a_tensor_asked_for_behind_the_worker_is_read_by_the_caller(tmp_path):
    path = _file(tmp_path)
    reader, wanted = _hashed_reader(path)
    want = load_file(str(path))
    order = sorted(reader.keys(), key=reader.offset)
    last, first = reader.get(order[-1]), reader.get(order[0])  # the worker passed the first already
    assert torch.equal(last, want[order[-1]]) and torch.equal(first, want[order[0]])
    assert wanted.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("room", [1, 1 << 30])
def test_the_workers_hold_a_bounded_number_of_bytes(tmp_path, monkeypatch, room):
    """With room for one tensor, a worker waits for each to be taken (never two ahead); with room for all,
    it reads on."""
    monkeypatch.setattr(readahead, "AHEAD", room)
    path = _file(tmp_path, n=8)
    reader, _ = _hashed_reader(path)
    order = sorted(reader.keys(), key=reader.offset)
    reader.get(order[0])
    time.sleep(0.3)  # time for the worker to read on as far as it may
    with readahead._COND:
        ahead = len(reader._worker._state.ready)
    assert ahead == (1 if room == 1 else len(order) - 1)


def test_a_file_cut_short_is_one_line_from_the_caller(tmp_path):
    path = _file(tmp_path)
    reader, _ = _hashed_reader(path)
    order = sorted(reader.keys(), key=reader.offset)
    with open(path, "r+b") as f:  # cut inside the last tensor, after the header was read
        f.truncate(reader.offset(order[-1]) + 10)
    for k in order[:-1]:
        reader.get(k)
    with pytest.raises(FormatError, match="cut short"):
        reader.get(order[-1])


def test_a_buffer_is_reused_only_once_every_view_of_it_is_gone():
    n = (1 << 20) + 12345  # a size no other test's reads leave in the pool (it hands out the smallest fit)
    t = buffers.take(n)
    t.fill_(7)
    view = t[10:].view(torch.int8)
    ptr = t.data_ptr()
    del t
    other = buffers.take(n)  # the first is still seen through ``view``: not handed out again
    assert other.data_ptr() != ptr
    other.fill_(1)
    assert int(view[0]) == 7
    del view
    again = buffers.take(n - 100)  # released: the same memory, no fresh pages
    assert again.data_ptr() == ptr


def test_buffers_from_many_threads_are_never_shared():
    seen: list[int] = []
    kept = []
    lock = threading.Lock()

    def grab():
        for _ in range(20):
            t = buffers.take(1 << 17)
            with lock:
                seen.append(t.data_ptr())
                kept.append(t)

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(set(seen)) == len(seen) == 80  # all alive at once: 80 distinct blocks
