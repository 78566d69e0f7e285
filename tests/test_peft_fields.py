"""Every PEFT config field is modelled, inert or refused: checked against PEFT's own dataclasses."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest

from merging.errors import UnsupportedError
from merging.formats import peft as peft_format
from merging.formats.peft.fields import INERT, MODELLED, REFUSED

CONFIGS = {
    "LORA": "LoraConfig", "LOHA": "LoHaConfig", "LOKR": "LoKrConfig", "IA3": "IA3Config",
    "ADALORA": "AdaLoraConfig",
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_every_field_of_peft_is_accounted_for(kind):
    fields = {f.name for f in dataclasses.fields(getattr(peft, CONFIGS[kind]))}
    placed = MODELLED[kind] | INERT[kind] | set(REFUSED[kind])
    assert fields - placed == set(), f"new {CONFIGS[kind]} fields: model them or refuse them"
    assert placed - fields == set(), "fields listed that PEFT no longer has"


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_refused_defaults_are_peft_defaults(kind):
    defaults = {
        f.name: f.default for f in dataclasses.fields(getattr(peft, CONFIGS[kind]))
        if f.default is not dataclasses.MISSING
    }  # fmt: skip
    for name, (default, _) in REFUSED[kind].items():
        assert defaults[name] == default, name


def _rewrite(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_qalora", True),
        ("layer_replication", [[0, 2]]),
        ("init_lora_weights", "pissa_niter_4"),
        ("init_lora_weights", "olora"),
        ("a_field_from_the_future", 3),
    ],
)
def test_unmodelled_values_are_refused_in_one_line(fx, tmp_path, field, value):
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(fx.adapter("llama", "lora"), folder)
    _rewrite(folder, **{field: value})
    with pytest.raises(UnsupportedError, match=field) as e:
        peft_format.read(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)


def test_inert_fields_do_not_change_what_is_read(fx, tmp_path):
    import shutil

    import torch

    folder = tmp_path / "a"
    shutil.copytree(fx.adapter("llama", "lora"), folder)
    _rewrite(folder, lora_dropout=0.3, init_lora_weights="gaussian", layers_to_transform=[0, 1], later=None)
    a, b = peft_format.read(fx.adapter("llama", "lora")), peft_format.read(folder)
    assert set(a.deltas) == set(b.deltas)
    assert all(torch.equal(a.deltas[m].dense(), b.deltas[m].dense()) for m in a.deltas)
