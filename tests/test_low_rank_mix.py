"""The single-GEMM path for LiME over LoRA (low_rank_mix.py) equals the plain formula and the layer's other paths.

The tiny test models never reach the size at which the layer switches to this path on its own, so the model-level
tests force the switch both ways (threshold 0: always; threshold unreachable: never) and compare logits and every
gradient between the two.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

import peft_lime
from peft_lime import low_rank_mix as lrm

from ._models import VOCAB, lime, lora, scatter_experts, tiny_llama


def _inputs(dtype=torch.float64, N=7, r=3, E=4, d=10):
    torch.manual_seed(0)
    kw = dict(dtype=dtype, requires_grad=True)
    out = torch.randn(2, N, d, **kw)
    a = torch.randn(2 * N, r, **kw)
    mix = torch.softmax(torch.randn(2 * N, E, dtype=dtype), -1).requires_grad_()
    return out, a, mix, torch.randn(d, r, **kw), torch.randn(E, d, **kw), torch.randn(d, **kw)


def _plain(out, a, mix, B, weight, offset, s):
    """LiME's formula as written: out + delta * (offset + mix @ weight)."""
    delta = s * a @ B.t()
    return out + (delta * (offset + mix @ weight)).view(out.shape)


def _on_simplex(out, a, mix, B, weight, offset, s):
    """The function the GEMM computes: delta * (mix @ (weight + offset)); equal to LiME's when rows of mix sum to 1."""
    delta = s * a @ B.t()
    return out + (delta * (mix @ (weight + offset))).view(out.shape)


def test_low_rank_mix_equals_formula_and_passes_gradcheck():
    inputs = _inputs()
    fn = lambda *t: lrm.low_rank_mix(*t, 0.7)  # noqa: E731
    torch.testing.assert_close(fn(*inputs), _plain(*inputs, 0.7))
    assert torch.autograd.gradcheck(fn, inputs)
    # gradcheck checks the backward against the op's own values; these check it against the formula's gradients
    g = torch.randn_like(inputs[0])
    got = torch.autograd.grad(fn(*inputs), inputs, g)
    want = torch.autograd.grad(_on_simplex(*inputs, 0.7), inputs, g)
    for x, w in zip(got, want):
        torch.testing.assert_close(x, w)
    with torch.no_grad():
        torch.testing.assert_close(fn(*inputs), _plain(*inputs, 0.7))


def test_gradient_through_normalised_weights_equals_the_formula():
    """Off the simplex the two forms differ by delta * offset * (sum(mix) - 1), so their gradients with respect to
    mix differ by the same constant for every expert; a softmax (or u / sum(u)), which is how every routing mode
    makes mix, cancels exactly such a constant. The layer's gradients are therefore LiME's formula's."""
    out, a, _, B, weight, offset = _inputs()
    logits = torch.randn(a.shape[0], weight.shape[0], dtype=torch.float64, requires_grad=True)
    for normalise in (lambda x: torch.softmax(x, -1), lambda x: x.exp() / x.exp().sum(-1, keepdim=True)):
        inputs = (out, a, normalise(logits), B, weight, offset)
        g = torch.randn_like(out)
        targets = (out, a, logits, B, weight, offset)
        got = torch.autograd.grad(lrm.low_rank_mix(*inputs, 0.7), targets, g)
        want = torch.autograd.grad(_plain(out, a, normalise(logits), B, weight, offset, 0.7), targets, g)
        for x, w in zip(got, want):
            torch.testing.assert_close(x, w)


def test_low_rank_mix_partial_gradients():
    """Only some inputs need a gradient (frozen experts, frozen B): the others get None, the rest stay exact."""
    out, a, mix, B, weight, offset = _inputs()
    weight, B = weight.detach(), B.detach()
    y = lrm.low_rank_mix(out, a, mix, B, weight, offset, 0.5)
    ref = _on_simplex(out, a, mix, B, weight, offset, 0.5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (out, a, mix, offset), g)
    want = torch.autograd.grad(ref, (out, a, mix, offset), g)
    for x, w in zip(got, want):
        torch.testing.assert_close(x, w)


def test_threshold_is_on_output_elements():
    assert lrm.use_low_rank_mix(lrm.LOW_RANK_MIX_MIN_ELEMENTS, 1)
    assert not lrm.use_low_rank_mix(1, lrm.LOW_RANK_MIX_MIN_ELEMENTS - 1)


def _model(dtype=torch.float32, **kwargs):
    base = tiny_llama(seed=1).to(dtype)
    config = lime(lora(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]), **kwargs)
    model = get_peft_model(base, config, autocast_adapter_dtype=True)
    scatter_experts(model)
    return model


def _run(model, ids, mask, threshold, monkeypatch, train=True):
    monkeypatch.setattr(lrm, "LOW_RANK_MIX_MIN_ELEMENTS", threshold)
    model.zero_grad(set_to_none=True)
    model.train(train)
    with torch.set_grad_enabled(train):
        out = model(input_ids=ids, attention_mask=mask, labels=ids if train else None)
        if train:
            out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.logits.detach(), grads


def _compare_paths(model, ids, mask, monkeypatch):
    fused_logits, fused_grads = _run(model, ids, mask, 0, monkeypatch)
    plain_logits, plain_grads = _run(model, ids, mask, 1 << 62, monkeypatch)
    torch.testing.assert_close(fused_logits, plain_logits, atol=1e-5, rtol=1e-5)
    assert set(fused_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    fused, _ = _run(model, ids, mask, 0, monkeypatch, train=False)
    plain, _ = _run(model, ids, mask, 1 << 62, monkeypatch, train=False)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    return fused_grads


@pytest.mark.parametrize("shared_expert", [True, False])
def test_layer_paths_agree_in_training_and_eval(shared_expert, monkeypatch):
    model = _model(shared_expert=shared_expert, jitter_noise=0.0)
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    grads = _compare_paths(model, ids, mask, monkeypatch)
    assert any("lime_experts" in name for name in grads)


def test_bf16_model_with_fp32_adapter_agrees(monkeypatch):
    """A bf16 backbone with PEFT's float32 adapter weights: the GEMM runs in bf16, within bf16 rounding of the
    plain path (which rounds delta to bf16 before modulating).

    The gradients are measured against the exact ones (the same weights in float32, where both paths agree at 1e-5):
    each tensor's error, max |grad - exact| over its scale, may not exceed the plain path's own by more than 3e-2,
    and the fused path may not be less accurate than the plain one on average. Comparing the two bf16 paths with each
    other instead asks a scalar gradient summed over every token (a gate) to agree within 8% where the plain path
    itself is 15% off the exact value (on an AVX2 CPU; bf16 matmuls round differently per CPU)."""
    model = _model(dtype=torch.bfloat16, jitter_noise=0.0)
    assert next(p for n, p in model.named_parameters() if "lora_B" in n).dtype == torch.float32
    ids = torch.randint(3, VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    fused, fused_grads = _run(model, ids, mask, 0, monkeypatch)
    plain, plain_grads = _run(model, ids, mask, 1 << 62, monkeypatch)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), plain.float(), atol=3e-2, rtol=3e-2)
    _, exact_grads = _run(copy.deepcopy(model).float(), ids, mask, 1 << 62, monkeypatch)
    assert set(fused_grads) == set(plain_grads) == set(exact_grads)
    fused_errors, plain_errors = [], []
    for name, exact in exact_grads.items():
        scale = exact.abs().max().item()
        assert scale > 0, name
        fused_errors.append((fused_grads[name].float() - exact).abs().max().item() / scale)
        plain_errors.append((plain_grads[name].float() - exact).abs().max().item() / scale)
        assert fused_errors[-1] <= plain_errors[-1] + 3e-2, (name, fused_errors[-1], plain_errors[-1])
    assert sum(fused_errors) <= sum(plain_errors), (sum(fused_errors), sum(plain_errors))


def test_layer_takes_the_gemm_path_above_the_threshold(monkeypatch):
    """The switch really happens inside the layer (a spy on the autograd function)."""
    calls = []
    original = lrm._LowRankMix.apply
    monkeypatch.setattr(lrm._LowRankMix, "apply", lambda *a: calls.append(1) or original(*a))
    model = _model(jitter_noise=0.0)
    ids = torch.randint(3, VOCAB, (2, 8))
    _run(model, ids, torch.ones_like(ids), 1 << 62, monkeypatch)
    assert calls == []
    _run(model, ids, torch.ones_like(ids), 0, monkeypatch)
    n_layers = sum(isinstance(m, peft_lime.LimeLayer) for m in model.modules())
    assert len(calls) == n_layers


def test_two_active_adapters_route_on_the_unmodified_base_output(monkeypatch):
    """The GEMM accumulates into the layer output in place; with two adapters active the second one still routes on
    the frozen output h (not on h + the first adapter's update), exactly as the plain path does."""
    from peft import LoraConfig

    model = _model(jitter_noise=0.0)
    other = lime(LoraConfig(r=3, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], init_lora_weights=False),
                 num_experts=3, jitter_noise=0.0)
    model.add_adapter("other", other)
    scatter_experts(model, seed=2)
    model.base_model.set_adapter(["default", "other"])
    layers = [m for m in model.modules() if isinstance(m, peft_lime.LimeLayer)]
    assert layers and all(m.active_adapters == ["default", "other"] for m in layers)
    ids = torch.randint(3, VOCAB, (2, 8))
    grads = _compare_paths(model, ids, torch.ones_like(ids), monkeypatch)
    assert any(".other." in n for n in grads) and any(".default." in n for n in grads)


def test_conv1d_backbone_paths_agree(monkeypatch):
    """GPT-2's Conv1D (fan_in_fan_out) returns a view of its addmm output: the GEMM path must not write into it."""
    from peft import LoraConfig

    from ._models import tiny_gpt2

    model = get_peft_model(
        tiny_gpt2(seed=4),
        lime(LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False, fan_in_fan_out=True),
             jitter_noise=0.0),
    )
    scatter_experts(model)
    for module in model.modules():  # GPT-2 drops out residuals and attention: two training forwards would differ
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids = torch.randint(3, VOCAB, (2, 8))
    _compare_paths(model, ids, torch.ones_like(ids), monkeypatch)


@pytest.mark.slow  # about 15 s: tracing a model through dynamo and AOT autograd
def test_compiled_gemm_path_equals_eager(monkeypatch):
    """The single-GEMM path traced by torch.compile (its autograd.Function included) gives the eager results."""
    import torch._dynamo

    monkeypatch.setattr(lrm, "LOW_RANK_MIX_MIN_ELEMENTS", 0)
    torch._dynamo.reset()
    eager, compiled = _model(jitter_noise=0.0), _model(jitter_noise=0.0)
    run = torch.compile(compiled, backend="aot_eager")
    ids = torch.randint(3, VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    eager.train(), compiled.train()
    eager(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    run(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(input_ids=ids, attention_mask=mask).logits,
                                   eager(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
