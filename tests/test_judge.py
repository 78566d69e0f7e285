"""The independent judge: PEFT stacks the original files; our runtime only where PEFT cannot."""

from __future__ import annotations

from dataclasses import replace

import pytest

from merging.core.adapter import weighted
from merging.eval import judge
from merging.eval.verify import Candidate, verify
from merging.formats import peft as fp
from merging.merge.pipeline import merge
from merging.runtime.stacked import stacked
from tests.support.fixtures import example_input, run
from tests.support.helpers import assert_close, read_adapters, state_hash


def test_plan_names_who_stacks(fx):
    lora, loha, lokr, ia3, ia3_b = read_adapters(fx, "llama", ["lora", "loha", "lokr", "ia3", "ia3_b"])
    mixed = judge.who_stacks(weighted([lora, loha, lokr]))
    assert (mixed.reference, mixed.mode) == (judge.PEFT, "mixed")
    assert mixed.folders == tuple(fx.adapter("llama", n) for n in ("lora", "loha", "lokr"))
    assert judge.who_stacks(weighted([ia3, ia3_b])).mode == "multi"
    both = judge.who_stacks(weighted([ia3, lora]))
    assert both.reference == judge.RUNTIME and "IA³" in both.reason
    assert judge.who_stacks([(lora, 0.5)]).reference == judge.RUNTIME
    assert "not a PEFT folder" in judge.who_stacks(weighted([replace(lora, source=None)])).reason
    labels = [label for label, _ in judge.parts(weighted([ia3, lora, loha]))]
    assert labels == ["ia3 inputs", "additive inputs"]


@pytest.mark.parametrize("names", [["lora", "loha", "lokr"], ["ia3", "ia3_b"]])
def test_peft_reference_equals_runtime_and_leaves_the_model(fx, names):
    model, x = fx.load_base("llama"), example_input("llama")
    before = state_hash(model)
    pairs = weighted(read_adapters(fx, "llama", names))
    with judge.reference(model, pairs) as stacker:
        y_peft = run(model, "llama", x)
    assert stacker.reference == judge.PEFT
    assert state_hash(model) == before
    with stacked(model, pairs):
        y_ours = run(model, "llama", x)
    assert_close(y_ours, y_peft, rtol=1e-5)
    assert not (y_peft == run(model, "llama", x)).all()  # the adapters did something


def test_verify_stacks_the_inputs_and_loads_the_merge_with_peft(fx):
    model = fx.load_base("llama")
    pairs = weighted(read_adapters(fx, "llama", ["lora", "loha", "lokr"]))
    result = merge(pairs, "cat")
    report = verify(model, None, pairs, [Candidate("cat", result.adapters, "cat", result.exact)])
    (row,) = report.rows
    assert (row.reference, row.loaded_by, report.reference_reason) == (judge.PEFT, judge.PEFT, None)
    assert row.verdict == "PASS" and row.effect_rel_error < 1e-5


def test_a_reader_bug_cannot_certify_itself(fx, monkeypatch):
    """A reader that halves every LoRA makes merge and our runtime wrong together; PEFT, reading the
    original files, still sees the truth and verify fails."""
    model = fx.load_base("llama")
    true_read = fp.read
    monkeypatch.setattr(fp, "read", lambda *a, **k: _halved(true_read(*a, **k)))
    pairs = weighted(read_adapters(fx, "llama", ["lora", "lora_b"]))
    result = merge(pairs, "cat")
    cand = Candidate("cat", result.adapters, "cat", result.exact)
    with stacked(model, pairs):  # the old reference, fed by the same reader, agrees with the wrong merge
        y_ours = run(model, "llama", example_input("llama"))
    with stacked(model, weighted(result.adapters)):
        assert_close(run(model, "llama", example_input("llama")), y_ours, rtol=1e-5)
    report = verify(model, None, pairs, [cand])
    assert report.rows[0].reference == judge.PEFT
    assert report.failed and report.rows[0].verdict == "FAIL" and report.rows[0].effect_rel_error > 0.1


def _halved(adapter):
    return adapter.with_deltas({m: replace(d, scale=d.scale / 2) for m, d in adapter.deltas.items()})


def test_runtime_reference_is_checked_against_peft(fx):
    model = fx.load_base("llama")
    pairs = weighted(read_adapters(fx, "llama", ["ia3", "lora", "loha"]))
    result = merge(pairs, "cat")
    report = verify(model, None, pairs, [Candidate("cat", result.adapters, "cat", result.exact)])
    assert "IA³" in report.reference_reason
    assert set(report.reference_checks) == {"ia3 inputs", "additive inputs"}
    assert max(report.reference_checks.values()) < 1e-5
    (row,) = report.rows
    assert (row.reference, row.loaded_by) == (judge.RUNTIME, judge.RUNTIME)  # an IA³ + LoRA pair
    assert row.verdict == "PASS" and not report.failed
