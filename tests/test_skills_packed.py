"""compare's reference rows (base, each input alone, the stack) and exact candidates, measured from packed
texts through the stacked runtime: the model's own loss, and the same bootstrap inputs."""

from __future__ import annotations

import pytest
import torch

from merging.core.adapter import weighted
from merging.eval import data, skills
from merging.eval.verify import Candidate
from merging.merge.pipeline import merge
from merging.runtime.stacked import stacked
from tests.support.helpers import state_hash, svd_held_out_case

OWN = 1e-6  # relative: packed against the model's own (padded) loss, both float32


@pytest.mark.model
@torch.no_grad()
def test_references_and_exact_rows_are_packed_and_the_models_own_loss(fx):
    pairs, _, batches = svd_held_out_case(fx)  # lora + ia3 + loha on the fixture Llama
    cat = merge(pairs, "cat")
    assert cat.exact
    model = fx.load_base("llama")
    before = state_hash(model)
    measured = skills.held_out(model, batches, pairs, [Candidate("cat", cat.adapters, "cat", True)])
    assert state_hash(model) == before
    packed = data.pack(batches)
    assert packed.input_ids.shape[0] < sum(len(b["input_ids"]) for b in batches.values())  # texts share rows
    refs = measured.skills
    # the packed path really ran: bit for bit what the packed forward gives
    assert refs.base == data.answer_losses(model, packed)

    def own(stack, skill: str) -> float:
        with stacked(model, stack):
            return float(model(**batches[skill]).loss)

    for s in batches:
        assert refs.base[s] == pytest.approx(own([], s), rel=OWN)
        assert refs.alone[s] == pytest.approx(own([p for p in pairs if p[0].name == s], s), rel=OWN)
        assert refs.stacked[s].loss == pytest.approx(own(list(pairs), s), rel=OWN)
        assert measured.merged["cat"][s].loss == pytest.approx(own(weighted(cat.adapters), s), rel=OWN)
        assert abs(refs.stacked[s].loss - refs.base[s]) > 1e-3  # the stack moves the loss: a real check
