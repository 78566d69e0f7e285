"""The format registry: one detect/read/write signature, detection, the shared LyCORIS names, BaseLayout."""

from __future__ import annotations

import inspect

import pytest
import torch
from click.testing import CliRunner
from merging_cli.main import cli

from merging import formats
from merging.base.layout import BaseLayout
from merging.core.adapter import base_shapes
from merging.core.deltas import Hadamard, Kronecker
from merging.errors import MergingError, NotAnAdapter, UnsupportedError
from merging.formats import lycoris
from merging.formats import peft as fp


def test_registry_names_and_a_miss_lists_them():
    assert formats.names() == ["peft", "kohya", "gguf"]
    with pytest.raises(UnsupportedError, match="unknown format 'onnx'; choose one of: peft, kohya, gguf"):
        formats.get("onnx")
    with pytest.raises(MergingError, match="already registered"):
        formats.register(formats.get("peft"))


@pytest.mark.parametrize("name", formats.names())
def test_every_format_has_the_same_signatures(name):
    fmt, peft = formats.get(name), formats.get("peft")
    assert inspect.signature(fmt.read) == inspect.signature(peft.read)
    assert inspect.signature(fmt.write) == inspect.signature(peft.write)


def test_detect_by_container(fx, tmp_path):
    assert formats.detect(fx.adapter("llama", "lora")).name == "peft"
    ad, layout = fp.read(fx.adapter("llama", "lora")), BaseLayout.from_folder(fx.base("llama"))
    fp.write(ad, tmp_path / "p", provenance={"strategy": "cat"})
    formats.get("kohya").write(ad, tmp_path / "k.safetensors")
    formats.get("gguf").write(ad, tmp_path / "g.gguf", base=layout)
    assert formats.detect(tmp_path / "k.safetensors").name == "kohya"
    assert formats.detect(tmp_path / "g.gguf").name == "gguf"
    assert formats.detect(fx.base("llama")) is None
    assert (tmp_path / "p" / fp.RECIPE_FILE).read_text() == '{\n  "strategy": "cat"\n}\n'


def test_a_model_file_is_not_an_adapter_and_inspect_lists_it(fx):
    model_file = next(fx.base("llama").glob("*.safetensors"))
    fmt = formats.detect(model_file)
    assert fmt is not None and fmt.name == "kohya"
    with pytest.raises(NotAnAdapter, match="unknown or mixed key families"):
        fmt.read(model_file)
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["inspect", str(model_file)])
    assert result.exit_code == 0, result.output
    assert "21 tensors" in result.output


def test_gguf_write_needs_the_base(fx, tmp_path):
    with pytest.raises(MergingError, match="`base`"):
        formats.get("gguf").write(fp.read(fx.adapter("llama", "lora")), tmp_path / "g.gguf")


@pytest.mark.parametrize(
    ("kind", "name"), [("llama", "loha"), ("llama", "lokr"), ("conv", "loha_tucker"), ("conv", "lokr_tucker")]
)
def test_lycoris_names_round_trip(fx, kind, name):
    for d in fp.read(fx.adapter(kind, name)).deltas.values():
        to_parts, to_delta = (
            (lycoris.loha_parts, lycoris.loha_delta)
            if isinstance(d, Hadamard)
            else (lycoris.lokr_parts, lycoris.lokr_delta)
        )
        parts = to_parts(d)
        assert set(parts) <= set(lycoris.LOHA if isinstance(d, Hadamard) else lycoris.LOKR)
        again = to_delta(parts, d.scale)
        assert isinstance(again, Hadamard | Kronecker) and again.target == d.target
        assert torch.equal(again.dense(), d.dense())


def test_base_layout_from_folder_matches_the_loaded_model(fx):
    from_folder = BaseLayout.from_folder(fx.base("llama"))
    model = fx.load_base("llama")
    from_model = BaseLayout.from_model(model)
    assert dict(from_folder.modules) == dict(from_model.modules) == base_shapes(model)
    assert from_folder.config["model_type"] == from_model.config["model_type"] == "llama"
    assert BaseLayout.of(from_folder) is from_folder
