"""PEFT's generic tuner contract, checked for LiME over LoRA, DoRA, IA3, LoHa and LoKr (issue 13), part 2.

Save / load (inference mode and trainable, several adapters, low_cpu_mem_usage, inject_adapter_in_model),
modules_to_save, dtypes and autocast, and a failed get_peft_model leaving the model untouched. Same
parametrisation as test_peft_contract.py: plain PEFT LoRA runs every assertion as the reference.
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file
from torch import nn

from ._contract import (
    adapter_params,
    assert_exactly_trainable,
    inputs,
    logits,
    make_config,
    method_param,
    spread_experts,
    trainable,
    tuner_layers,
)
from ._models import tiny_llama


def _saved(method, tmp_path, adapter_name="default", **base_kwargs):
    """A model with one adapter saved to tmp_path/"saved", its logits, and the inputs."""
    x = inputs()
    torch.manual_seed(100)
    model = get_peft_model(tiny_llama(seed=1), make_config(method, **base_kwargs), adapter_name=adapter_name)
    spread_experts(model, adapter_name)
    expected = logits(model, x)
    model.save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" if adapter_name == "default" else tmp_path / "saved" / adapter_name
    return model, expected, x, path


@method_param
def test_from_pretrained_inference_mode_and_trainable(method, tmp_path):
    _, expected, x, path = _saved(method, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(seed=1), path)
    assert adapter_params(loaded, "default")
    still_trainable = sorted(trainable(loaded))
    assert not still_trainable, f"inference-mode load left tensors trainable: {still_trainable[:6]}"
    torch.testing.assert_close(logits(loaded, x), expected, rtol=0, atol=1e-6)

    loaded = PeftModel.from_pretrained(tiny_llama(seed=1), path, is_trainable=True)
    loaded.train()
    assert_exactly_trainable(loaded, "default", method)
    torch.testing.assert_close(logits(loaded, x), expected, rtol=0, atol=1e-6)


@method_param
def test_save_load_two_adapters(method, tmp_path):
    x = inputs()
    torch.manual_seed(100)
    model = get_peft_model(tiny_llama(seed=1), make_config(method), adapter_name="a")
    spread_experts(model, "a")
    torch.manual_seed(200)
    model.add_adapter("b", make_config(method))
    spread_experts(model, "b", gate=-0.7)
    out_a = logits(model, x)
    model.set_adapter("b")
    out_b = logits(model, x)
    assert (out_a - out_b).abs().max() > 1e-3
    model.save_pretrained(tmp_path)  # every adapter, each in its own sub-folder
    assert (tmp_path / "a" / "adapter_config.json").exists() and (tmp_path / "b" / "adapter_config.json").exists()
    for name in ("a", "b"):
        keys = load_file(tmp_path / name / "adapter_model.safetensors")
        other = "b" if name == "a" else "a"
        assert not any(other in k.split(".") for k in keys), f"{name}/ holds tensors of adapter {other}"

    loaded = PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / "a", adapter_name="a")
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    torch.testing.assert_close(logits(loaded, x), out_a, rtol=0, atol=1e-6)  # a stays active after load_adapter
    loaded.set_adapter("b")
    torch.testing.assert_close(logits(loaded, x), out_b, rtol=0, atol=1e-6)
    loaded.set_adapter("a")
    torch.testing.assert_close(logits(loaded, x), out_a, rtol=0, atol=1e-6)


@method_param
def test_modules_to_save(method, tmp_path):
    x = inputs()
    torch.manual_seed(100)
    model = get_peft_model(tiny_llama(seed=1), make_config(method, modules_to_save=["lm_head"]))
    spread_experts(model, "default")
    copy = "base_model.model.lm_head.modules_to_save.default.weight"
    params = dict(model.named_parameters())
    assert copy in params
    model.train()
    assert_exactly_trainable(model, "default", method)  # the modules_to_save copy is named for the adapter too
    assert copy in trainable(model)
    before = logits(model, x)
    with torch.no_grad():
        params[copy].add_(0.05 * torch.randn_like(params[copy]))  # a "trained" head: the round trip must carry it
    expected = logits(model, x)
    assert (expected - before).abs().max() > 1e-3

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.split(".")[-2:] == ["lm_head", "weight"] for k in saved), sorted(saved)[:8]
    loaded = PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path, is_trainable=True)
    loaded.train()
    assert copy in trainable(loaded)
    assert_exactly_trainable(loaded, "default", method)
    torch.testing.assert_close(logits(loaded, x), expected, rtol=0, atol=1e-6)


def _float_adapter_dtypes(model):
    return {n: p.dtype for n, p in model.named_parameters() if "default" in n.split(".")}


@method_param
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_adapter_dtype_follows_peft_autocast_rule(method, autocast):
    model = get_peft_model(tiny_llama().to(torch.bfloat16), make_config(method), autocast_adapter_dtype=autocast)
    dtypes = _float_adapter_dtypes(model)
    assert dtypes
    # PEFT: adapter tensors are upcast to float32 by default, and keep the base layer's dtype without autocast.
    want = torch.float32 if autocast else torch.bfloat16
    wrong = {n: d for n, d in dtypes.items() if d != want}
    base_wrong = {n: d for n, d in wrong.items() if "lime_experts" not in n}
    assert not base_wrong, f"base-tuner tensors not {want}: {list(base_wrong.items())[:4]}"
    assert not wrong, f"expert tensors not {want} (PEFT's autocast_adapter_dtype rule): {list(wrong.items())[:4]}"
    out = logits(model, inputs())
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()


@method_param
def test_low_cpu_mem_usage_loading(method, tmp_path):
    model, expected, x, path = _saved(method, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(seed=1), path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded, x), expected, rtol=0, atol=1e-6)

    torch.manual_seed(300)
    host = get_peft_model(tiny_llama(seed=1), make_config(method), adapter_name="other")
    host.load_adapter(path, adapter_name="b", low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in host.parameters())
    host.set_adapter("b")
    torch.testing.assert_close(logits(host, x), expected, rtol=0, atol=1e-6)


@method_param
def test_inject_adapter_in_model_low_cpu_mem_usage(method):
    x = inputs()
    torch.manual_seed(100)
    reference = inject_adapter_in_model(make_config(method), tiny_llama(seed=1))
    spread_experts(reference, "default")
    expected = logits(reference, x)
    state_dict = get_peft_model_state_dict(reference)
    assert state_dict

    injected = inject_adapter_in_model(make_config(method), tiny_llama(seed=1), low_cpu_mem_usage=True)
    result = set_peft_model_state_dict(injected, state_dict, low_cpu_mem_usage=True)
    assert not result.unexpected_keys
    assert not any(p.is_meta for p in injected.parameters())
    torch.testing.assert_close(logits(injected, x), expected, rtol=0, atol=1e-6)


class _LinearThenBad(nn.Module):
    """A good target ("lin", visited first) and targets LiME or LoRA cannot wrap."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.emb = nn.Embedding(10, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        return self.lin(self.norm(h))


# (method, target that cannot be wrapped). "lin" is targeted too and visited first, so a non-atomic injection shows.
_BAD_TARGETS = [
    pytest.param(
        "lora-reference",
        "norm",  # plain LoRA cannot wrap a LayerNorm
        marks=pytest.mark.xfail(
            strict=True,
            reason="PEFT itself does not roll back a failed injection (it leaves 'lin' wrapped): issue 13 asks more "
            "of LiME than PEFT's own contract; kept as the reference so a PEFT change shows",
        ),
        id="lora-reference-norm",
    ),
    pytest.param("lime-lora", "emb", id="lime-lora-emb"),  # LoRA wraps an Embedding, LiME must refuse it
    pytest.param("lime-lora", "mha", id="lime-lora-mha"),  # LoRA wraps nn.MultiheadAttention, LiME must refuse it
    pytest.param("lime-dora", "emb", id="lime-dora-emb"),
    pytest.param("lime-ia3", "emb", id="lime-ia3-emb"),
    pytest.param("lime-loha", "emb", id="lime-loha-emb"),
    pytest.param("lime-lokr", "emb", id="lime-lokr-emb"),
]


@pytest.mark.parametrize("method, bad", _BAD_TARGETS)
def test_failed_get_peft_model_leaves_model_untouched(method, bad):
    model = _LinearThenBad().eval()
    names = [n for n, _ in model.named_modules()]
    keys = list(model.state_dict())
    x = torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        before = model(x)
    config = make_config(method, target_modules=["lin", bad])
    with pytest.raises(Exception) as info:
        get_peft_model(model, config)
    assert not isinstance(info.value, AttributeError), f"unclear error for target {bad!r}: {info.value!r}"
    assert isinstance(info.value, (ValueError, TypeError)), repr(info.value)
    assert re.search(rf"\b{bad}\b|target", str(info.value), re.I), str(info.value)
    left = tuner_layers(model)
    assert not left, f"target {bad!r}: the failed get_peft_model left tuner layers in the model: {left}"
    assert [n for n, _ in model.named_modules()] == names
    assert list(model.state_dict()) == keys
    assert not model._forward_pre_hooks, "the failed get_peft_model left a forward pre-hook on the model"
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
