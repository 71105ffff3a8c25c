"""Routing statistics and the balance loss on degenerate calls: all padding, non-finite rows."""

from __future__ import annotations

import math

import torch
from peft import get_peft_model

import peft_lime
from peft_lime import routing
from peft_lime.stats import RoutingStats

from ._models import VOCAB, lime, tiny_llama


def test_balance_terms_of_an_all_padding_call_are_zero_not_minus_one():
    probs = torch.softmax(torch.randn(5, 4), -1)
    importance, kl, _ = routing.balance_terms(probs, torch.zeros(5, dtype=torch.bool))
    assert float(importance) == 0.0 and float(kl) == 0.0


def test_fully_padded_training_batch_logs_no_negative_aux_loss():
    model = get_peft_model(tiny_llama(), lime(importance_loss_coef=0.1, kl_loss_coef=0.01))
    model.train()
    x = torch.randint(3, VOCAB, (2, 6))
    model(input_ids=x, attention_mask=torch.zeros_like(x))
    assert float(peft_lime.get_aux_loss(model)) == 0.0
    # no valid token: nothing is recorded, so nothing (in particular no aux_loss of -0.1) is logged
    assert peft_lime.get_routing_stats(model, reset=True) == {"layers": {}, "aggregate": {}}
    # a real batch afterwards is counted alone: its importance is that of its own tokens, not diluted by the empty call
    model(input_ids=x)
    agg = peft_lime.get_routing_stats(model)["aggregate"]
    assert agg["importance_loss"] > 0.0


def test_a_non_finite_row_is_counted_and_left_out_of_every_statistic():
    E = 4
    stats = RoutingStats(E)
    probs = torch.softmax(torch.randn(6, E), -1)
    selected = probs >= 0.5 * probs.amax(-1, keepdim=True)
    clean = RoutingStats(E)
    clean.record(probs[1:], selected[1:], None)
    probs[0, 2] = float("nan")
    stats.record(probs, selected, None)
    out, ref = stats.summary(), clean.summary()
    assert out["nonfinite_tokens"] == 1.0 and ref["nonfinite_tokens"] == 0.0
    for key in ("tokens", "routing_entropy", "active_experts", "importance_loss", "kl_loss", "load_imbalance"):
        assert math.isfinite(out[key]), key
        assert math.isclose(out[key], ref[key], rel_tol=1e-6, abs_tol=1e-7), key
    # and the statistics stay finite for the next calls, not only until a reset
    stats.record(probs[1:], selected[1:], None)
    assert math.isfinite(stats.summary()["routing_entropy"])
