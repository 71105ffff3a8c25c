"""PEFT's generic tuner contract, checked for LiME over LoRA, DoRA, IA3, LoHa and LoKr (issue 13), part 1.

Adapter lifecycle in memory: add / set / delete / disable adapters, which tensors require grad, parameter counts,
mixed-adapter batches. Every test runs the same assertions on plain PEFT LoRA ("lora-reference"): what PEFT's own
generic tests require of every tuner. Save / load, modules_to_save, dtypes, low_cpu_mem_usage and failed injection
are in test_peft_contract_io.py. Logits are compared exactly (atol 0) where the computation is the same, 1e-6 where
the same adapter is rebuilt elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from ._contract import (
    METHODS,
    NUM_EXPERTS,
    TARGETS,
    adapter_keyed_leftovers,
    adapter_params,
    assert_exactly_trainable,
    base_config,
    expert_params,
    inputs,
    is_lime,
    logits,
    make_config,
    method_param,
    spread_experts,
    trainable,
    tuner_layers,
)
from ._models import tiny_llama


def _two_adapters(method, seed=0):
    """A model with adapter "a" (active) and "b" (added, not active), plus the base model's logits."""
    base = tiny_llama(seed=seed)
    x = inputs()
    base_out = logits(base, x)
    torch.manual_seed(100)
    model = get_peft_model(base, make_config(method), adapter_name="a")
    spread_experts(model, "a")
    torch.manual_seed(200)
    model.add_adapter("b", make_config(method))
    spread_experts(model, "b", gate=-0.7)
    return model, x, base_out


@method_param
def test_add_and_set_adapter(method):
    model, x, base_out = _two_adapters(method)
    out_a = logits(model, x)
    assert (out_a - base_out).abs().max() > 1e-3, "adapter a has no effect"
    model.train()
    assert_exactly_trainable(model, "a", method)  # add_adapter does not activate (or unfreeze) the new adapter

    model.set_adapter("b")
    assert model.active_adapters == ["b"]
    out_b = logits(model, x)
    assert (out_b - out_a).abs().max() > 1e-3, "set_adapter('b') did not change the logits"
    # b alone, rebuilt in a fresh model from b's state dict: set_adapter must route to exactly b's tensors
    alone = get_peft_model(tiny_llama(seed=0), make_config(method), adapter_name="b")
    load = set_peft_model_state_dict(alone, get_peft_model_state_dict(model, adapter_name="b"), adapter_name="b")
    assert not load.unexpected_keys
    torch.testing.assert_close(logits(alone, x), out_b, rtol=0, atol=1e-6)
    model.train()
    assert_exactly_trainable(model, "b", method)

    model.set_adapter("a")
    torch.testing.assert_close(logits(model, x), out_a, rtol=0, atol=0)
    model.train()
    assert_exactly_trainable(model, "a", method)


@method_param
def test_delete_adapter_removes_every_trace(method):
    model, x, _ = _two_adapters(method)
    out_a = logits(model, x)
    model.set_adapter("b")  # delete the ACTIVE adapter: PEFT falls back to the remaining one
    assert adapter_params(model, "b")
    model.delete_adapter("b")

    assert "b" not in model.peft_config
    assert model.active_adapters == ["a"]
    left_params = sorted(adapter_params(model, "b"))
    assert not left_params, f"parameters of adapter b survive delete_adapter: {left_params[:6]}"
    left_keys = sorted(k for k in model.state_dict() if "b" in k.split("."))
    assert not left_keys, f"state_dict keys of adapter b survive delete_adapter: {left_keys[:6]}"
    leftovers = adapter_keyed_leftovers(model, "b")
    assert not leftovers, f"adapter b still referenced by: {leftovers[:8]}"
    model.train()
    assert_exactly_trainable(model, "a", method)
    torch.testing.assert_close(logits(model, x), out_a, rtol=0, atol=0)
    with pytest.raises(ValueError):
        model.delete_adapter("b")


@method_param
def test_disable_adapter_context_gives_base_logits(method):
    model, x, base_out = _two_adapters(method)
    out_a = logits(model, x)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, x), base_out, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, x), out_a, rtol=0, atol=0)
    model.train()
    assert_exactly_trainable(model, "a", method)


@method_param
def test_disable_and_enable_adapter_layers(method):
    model, x, base_out = _two_adapters(method)
    out_a = logits(model, x)
    model.base_model.disable_adapter_layers()
    torch.testing.assert_close(logits(model, x), base_out, rtol=0, atol=0)
    assert not trainable(model), sorted(trainable(model))[:6]  # PEFT freezes disabled adapter layers
    model.base_model.enable_adapter_layers()
    torch.testing.assert_close(logits(model, x), out_a, rtol=0, atol=0)
    model.train()
    assert_exactly_trainable(model, "a", method)


@method_param
def test_set_requires_grad(method):
    model, _, _ = _two_adapters(method)
    a, b = adapter_params(model, "a"), adapter_params(model, "b")
    model.set_requires_grad("b", requires_grad=True)
    assert trainable(model) == a | b
    model.set_requires_grad(["a", "b"], requires_grad=False)
    assert not trainable(model)
    model.set_requires_grad("a")
    assert trainable(model) == a
    if is_lime(method):
        assert expert_params(a) and a - expert_params(a)


@method_param
def test_inference_mode_config_freezes_everything(method):
    x = inputs()
    torch.manual_seed(100)
    trained = get_peft_model(tiny_llama(), make_config(method))
    torch.manual_seed(100)
    if is_lime(method):
        config = make_config(method, lime_kwargs={"inference_mode": True})  # the LiME config's own flag
    else:
        config = make_config(method, inference_mode=True)
    frozen = get_peft_model(tiny_llama(), config)
    assert adapter_params(frozen, "default")
    still = sorted(trainable(frozen))
    assert not still, f"inference_mode=True left tensors trainable: {still[:6]}"
    torch.testing.assert_close(logits(frozen, x), logits(trained, x), rtol=0, atol=0)


def _targeted_linears(model):
    return [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS]


def _closed_form_base_count(method, model):
    kind = METHODS[method][1]
    layers = _targeted_linears(model)
    if kind == "lora":
        return sum(4 * (m.in_features + m.out_features) for m in layers)
    if kind == "dora":
        return sum(4 * (m.in_features + m.out_features) + m.out_features for m in layers)
    if kind == "ia3":
        return sum(m.out_features for m in layers)
    if kind == "loha":
        return sum(2 * 4 * (m.in_features + m.out_features) for m in layers)
    return None  # LoKr's factorisation: compared with plain PEFT's count only


@method_param
def test_nb_trainable_parameters(method):
    plain_base = tiny_llama()
    plain = get_peft_model(tiny_llama(), base_config(method))
    plain_trainable, plain_all = plain.get_nb_trainable_parameters()
    closed = _closed_form_base_count(method, plain_base)
    if closed is not None:
        assert plain_trainable == closed

    model = get_peft_model(tiny_llama(), make_config(method))
    got_trainable, got_all = model.get_nb_trainable_parameters()
    assert got_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = (
        sum(NUM_EXPERTS * m.out_features + m.out_features + 1 for m in _targeted_linears(plain_base))
        if is_lime(method)
        else 0
    )
    assert got_trainable == plain_trainable + extra
    assert got_all == plain_all + extra


@method_param
def test_mixed_adapter_batch(method):
    model, x, _ = _two_adapters(method)
    model.set_adapter("a")
    out_a = logits(model, x)
    model.set_adapter("b")
    out_b = logits(model, x)
    model.set_adapter("a")
    if not is_lime(method):  # plain LoRA supports mixed batches
        mixed = logits(model, x, adapter_names=["a", "b"])
        torch.testing.assert_close(mixed[0], out_a[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(mixed[1], out_b[1], rtol=0, atol=1e-6)
        return
    # LiME does not (README, known limits): it must say so, not silently run the active adapter on every row
    with pytest.raises(ValueError, match="adapter_names"):
        logits(model, x, adapter_names=["a", "b"])
    with pytest.raises(ValueError, match="adapter_names"):
        model.generate(input_ids=x, adapter_names=["a", "b"], max_new_tokens=2, do_sample=False)


@method_param
def test_merge_refused_and_unload(method):
    model, x, base_out = _two_adapters(method)
    out_a = logits(model, x)
    if is_lime(method):
        # routing depends on the input: no weight matrix reproduces LiME, so merging must refuse clearly (README)
        for merge in (model.merge_adapter, model.base_model.merge_and_unload):
            with pytest.raises(ValueError, match="(?i)merge"):
                merge()
        torch.testing.assert_close(logits(model, x), out_a, rtol=0, atol=0)  # a refused merge changes nothing
        unloaded = model.unload()
        torch.testing.assert_close(logits(unloaded, x), base_out, rtol=0, atol=0)
    else:
        unloaded = model.merge_and_unload()
        torch.testing.assert_close(logits(unloaded, x), out_a, rtol=1e-4, atol=1e-5)
    assert not tuner_layers(unloaded)
    assert not unloaded._forward_pre_hooks, "unload left LiME's forward pre-hook on the base model"
