"""Routing statistics cost nothing when nobody reads them: recorded in training forwards only, unless asked."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import peft_lime

from ._models import VOCAB, lime, tiny_llama


def _tokens(model) -> float:
    layers = peft_lime.get_routing_stats(model, reset=True)["layers"]
    return sum(v["tokens"] for v in layers.values())


@pytest.fixture
def model():
    return get_peft_model(tiny_llama(), lime(n_gram=2))


def test_eval_forward_and_generate_record_nothing_by_default(model):
    x = torch.randint(3, VOCAB, (2, 5))
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
        model.generate(input_ids=x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert _tokens(model) == 0.0
    assert all(s._pending == [] for m in model.modules() if isinstance(m, peft_lime.LimeLayer) for s in m.lime_stats.values())


def test_training_forward_records_by_default(model):
    x = torch.randint(3, VOCAB, (2, 5))
    model.train()
    model(input_ids=x)
    n_layers = sum(isinstance(m, peft_lime.LimeLayer) for m in model.modules())
    assert _tokens(model) == 10.0 * n_layers


def test_always_mode_and_context_manager_record_eval_then_restore(model):
    x = torch.randint(3, VOCAB, (2, 5))
    model.eval()
    with torch.no_grad(), peft_lime.recording_routing_stats(model):
        model(input_ids=x)
    assert _tokens(model) > 0
    with torch.no_grad():
        model(input_ids=x)
    assert _tokens(model) == 0.0  # mode restored to "training"
    peft_lime.set_routing_stats_mode(model, "always")
    with torch.no_grad():
        model(input_ids=x)
    assert _tokens(model) > 0


def test_off_mode_records_nothing_in_training_but_keeps_the_aux_loss(model):
    x = torch.randint(3, VOCAB, (2, 5))
    peft_lime.set_routing_stats_mode(model, "off")
    model.train()
    model(input_ids=x)
    assert _tokens(model) == 0.0
    assert peft_lime.get_aux_loss(model) is not None


def test_unknown_mode_is_refused_naming_the_argument(model):
    with pytest.raises(ValueError, match="mode: must be one of"):
        peft_lime.set_routing_stats_mode(model, "sometimes")
