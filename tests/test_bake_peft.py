"""bake against PEFT's own merge_and_unload, tensor by tensor, on sharded bases; what it copies, as bytes."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from click.testing import CliRunner
from merging_cli.main import cli
from safetensors.torch import load_file

from tests.support.helpers import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def _bake(base, adapter, out):
    return CliRunner().invoke(cli, ["bake", "--base", str(base), str(adapter), "-o", str(out)])


def _tensors(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _sharded(fx, kind, folder, dtype=torch.float32):
    fx.load_base(kind).to(dtype).save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.mark.parametrize(("kind", "dtype"), [("llama", torch.float32), ("llama", torch.bfloat16),
                                             ("gpt2", torch.float32)])  # fmt: skip
def test_bake_equals_peft_merge_and_unload(fx, tmp_path, kind, dtype):
    import peft

    base = _sharded(fx, kind, tmp_path / "base", dtype)
    r = _bake(base, fx.adapter(kind, "lora"), tmp_path / "baked")
    assert r.exit_code == 0, r.output
    model = peft.PeftModel.from_pretrained(fx.load_base(kind).to(dtype), str(fx.adapter(kind, "lora")))
    model.merge_and_unload().save_pretrained(tmp_path / "peft")
    ours, theirs = _tensors(tmp_path / "baked"), _tensors(tmp_path / "peft")
    assert sorted(ours) == sorted(theirs)
    changed = 0
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype, name
        assert_close(ours[name], t, what=name)
        changed += not torch.equal(ours[name], _tensors(base)[name])
    assert changed > 0


def test_bake_copies_headers_and_untouched_tensors_byte_for_byte(fx, tmp_path):
    base = _sharded(fx, "llama", tmp_path / "base")
    adapter = fx.adapter("llama", "lora")
    assert _bake(base, adapter, tmp_path / "baked").exit_code == 0
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    for shard in sorted(base.glob("*.safetensors")):
        src, dst = shard.read_bytes(), (tmp_path / "baked" / shard.name).read_bytes()
        n = 8 + struct.unpack("<Q", src[:8])[0]
        assert dst[:n] == src[:n] and len(dst) == len(src)
        header = json.loads(src[8:n])
        for name, meta in header.items():
            if name == "__metadata__" or any(f".{t}.weight" in name for t in targets):
                continue
            begin, end = meta["data_offsets"]
            assert dst[n + begin : n + end] == src[n + begin : n + end], name


def test_bake_of_a_truncated_shard_is_one_line_and_writes_nothing(fx, tmp_path):
    base = _sharded(fx, "llama", tmp_path / "base")
    last = sorted(base.glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    r = _bake(base, fx.adapter("llama", "lora"), tmp_path / "baked")
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and last.name in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_stream_shard_refuses_a_tensor_that_would_not_match_its_header(tmp_path):
    """A transform changing a tensor's dtype would leave a shard safetensors cannot read: refused, named."""
    from safetensors.torch import save_file

    from merging.errors import FormatError
    from merging.storage.safetensors_io import stream_shard

    src = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.ones(2, 3, dtype=torch.bfloat16), "b.weight": torch.zeros(4)}, str(src))
    with pytest.raises(FormatError, match=r"'a\.weight' would be written as torch\.float32 \[2, 3\]"):
        stream_shard(src, tmp_path / "out.safetensors", {"a.weight": lambda n, t: t.float() + 1})
    stream_shard(src, tmp_path / "ok.safetensors", {"a.weight": lambda n, t: t + 1})
    got = load_file(str(tmp_path / "ok.safetensors"))  # safetensors itself reads the streamed shard
    assert torch.equal(got["a.weight"], torch.full((2, 3), 2.0, dtype=torch.bfloat16))
    assert torch.equal(got["b.weight"], torch.zeros(4))
