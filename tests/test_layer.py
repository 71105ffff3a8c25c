"""LiME layers inside real models: parameter counts, gradients, selection modes, lifecycle, merge refusal."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import peft_lime
from peft_lime import LimeLayer

from ._models import VOCAB, lime, lora, tiny_llama


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("E", [2, 4, 8])
def test_trainable_parameters_equal_formula(E, shared):
    base_only = get_peft_model(tiny_llama(), lora(target_modules=["q_proj", "v_proj", "down_proj"]))
    n_lora = count_trainable(base_only)
    model = get_peft_model(
        tiny_llama(), lime(lora(target_modules=["q_proj", "v_proj", "down_proj"]), num_experts=E, shared_expert=shared)
    )
    widths = [m.out_features for m in model.modules() if isinstance(m, LimeLayer)]
    assert len(widths) == 6  # 3 targets x 2 layers
    per_layer = [E * d + ((d + 1) if shared else 0) for d in widths]
    # the router has no parameters: everything beyond the base adapter is expert vectors (+ shared vector + gate)
    assert count_trainable(model) == n_lora + sum(per_layer)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == n_lora + sum(per_layer)


def test_every_trainable_tensor_gets_a_finite_gradient():
    model = get_peft_model(tiny_llama(), lime(lora(target_modules=["q_proj", "v_proj", "up_proj"]), n_gram=2))
    model.train()
    x = torch.randint(3, VOCAB, (2, 9))
    model(input_ids=x, labels=x).loss.backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name.endswith("lime_experts.default.weight"):
            assert p.grad.abs().sum() > 0, name


def test_frozen_base_untouched_and_router_parameter_free():
    model = get_peft_model(tiny_llama(), lime())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n) or ("lime_experts" in n) for n in trainable)
    assert not any("router" in n for n, _ in model.named_parameters())


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_auto_topk_threshold_one_hard_equals_hard_top1_and_top1_differs_from_topE():
    x = torch.randint(3, VOCAB, (2, 8))

    def build(**kw):
        torch.manual_seed(7)
        base = tiny_llama()
        torch.manual_seed(8)
        return get_peft_model(base, lime(num_experts=4, selection="hard", **kw)).eval()

    auto1 = _logits(build(auto_topk=True, auto_topk_threshold=1.0), x)
    top1 = _logits(build(auto_topk=False, top_k=1), x)
    topE = _logits(build(auto_topk=False, top_k=4), x)
    torch.testing.assert_close(auto1, top1, rtol=0, atol=1e-6)
    assert (top1 - topE).abs().max() > 1e-4


def test_disable_adapter_and_unload_give_base_logits_exactly():
    x = torch.randint(3, VOCAB, (2, 8))
    base = tiny_llama()
    expected = _logits(base, x)
    model = get_peft_model(base, lime(n_gram=3)).eval()
    assert (_logits(model, x) - expected).abs().max() > 1e-4  # the adapter does something
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, x), expected, rtol=0, atol=0)
    unloaded = model.unload()
    assert not any(isinstance(m, LimeLayer) for m in unloaded.modules())
    torch.testing.assert_close(_logits(unloaded, x), expected, rtol=0, atol=0)


def test_merge_is_refused_with_an_explanation():
    model = get_peft_model(tiny_llama(), lime())
    with pytest.raises(ValueError, match="input-dependent"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="input-dependent"):
        model.merge_adapter()


def test_jitter_only_in_training():
    model = get_peft_model(tiny_llama(), lime(jitter_noise=0.5)).eval()
    x = torch.randint(3, VOCAB, (1, 6))
    torch.testing.assert_close(_logits(model, x), _logits(model, x), rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        a, b = model(input_ids=x).logits, model(input_ids=x).logits
    assert (a - b).abs().max() > 0


def test_routing_stats_exclude_padding_and_are_in_range():
    model = get_peft_model(tiny_llama(), lime(num_experts=4)).eval()
    x = torch.randint(3, VOCAB, (2, 6))
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    peft_lime.reset_routing_stats(model)
    with torch.no_grad(), peft_lime.recording_routing_stats(model):  # eval mode records only when asked
        model(input_ids=x, attention_mask=mask)
    stats = peft_lime.get_routing_stats(model, reset=True)
    layer = next(iter(stats["layers"].values()))
    assert layer["tokens"] == 9.0  # 6 + 3 valid tokens
    agg = stats["aggregate"]
    assert 0.0 <= agg["routing_entropy"] <= 1.0
    assert 1.0 <= agg["active_experts"] <= 4.0
    assert agg["load_imbalance"] >= 1.0
    assert peft_lime.get_routing_stats(model)["layers"] == {}  # reset worked


def test_gpt2_conv1d_and_qwen2_are_wrapped():
    from ._models import tiny_gpt2, tiny_qwen2

    gpt2 = get_peft_model(tiny_gpt2(), lime(LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)))
    assert sum(isinstance(m, LimeLayer) for m in gpt2.modules()) == 4
    qwen = get_peft_model(tiny_qwen2(), lime())
    for model in (gpt2, qwen):
        x = torch.randint(3, VOCAB, (2, 5))
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        assert torch.isfinite(out.loss)


def test_task_ids_belong_to_their_own_call_only():
    """Per-task telemetry: a call without task_ids must not inherit the previous call's ids."""
    model = get_peft_model(tiny_llama(), lime())
    peft_lime.set_routing_stats_mode(model, "always")
    handle = peft_lime.enable_task_ids(model)
    assert peft_lime.enable_task_ids(model) is handle  # idempotent: no second hook
    x = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        model(input_ids=x, task_ids=torch.tensor([5, 5]))
        assert set(peft_lime.get_routing_stats(model, reset=True)["aggregate"]["task_usage"]) == {5}
        model(input_ids=x)
        assert peft_lime.get_routing_stats(model, reset=True)["aggregate"]["task_usage"] == {}
        model.base_model.model(input_ids=x, task_ids=torch.tensor([3, 4]))  # the base model's own call also works
        assert set(peft_lime.get_routing_stats(model, reset=True)["aggregate"]["task_usage"]) == {3, 4}
        model.base_model.model(input_ids=x)
        assert peft_lime.get_routing_stats(model, reset=True)["aggregate"]["task_usage"] == {}
