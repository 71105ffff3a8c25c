"""The native training routing (native_train_route.py, csrc/lime_route.c) equals routing.py's torch ops.

The function against the torch ops on random tokens (probs, weights, and the gradients of both routed slices for
gradients arriving at the weights and at the probs, ties of the maximum included); a tiny Llama's training step with
it on vs off (loss, every gradient, the routing statistics and the RNG stream after the step); and the settings it
must leave to the torch ops.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import peft_lime
from peft_lime import native_balance, native_route, native_train_route, routing
from peft_lime.settings import LimeRoutingSettings

from ._models import VOCAB, lime, lora, scatter_experts, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread", "native_on")
TOL = dict(atol=1e-5, rtol=1e-5)
SETTINGS = {
    "default (E=8)": {"num_experts": 8},
    "E=4, gamma 0 (frozen output only)": {"num_experts": 4, "routing_gamma": 0.0},
    "gamma 1 (adapter only)": {"num_experts": 8, "routing_gamma": 1.0},
    "sharp: temperature 0.1, selection temperature 0.05": {"num_experts": 8, "temperature": 0.1,
                                                           "selection_temperature": 0.05},
    "threshold 0.9, E=16": {"num_experts": 16, "auto_topk_threshold": 0.9},
    "one expert": {"num_experts": 1, "top_k": 1},
}


def _settings(**kwargs) -> LimeRoutingSettings:
    return LimeRoutingSettings.from_config(peft_lime.LimeConfig(base=lora(), **kwargs))


def _torch_ops(s, h, d, noise):
    """routing.py's ops, as LimeLayer._routing_ops runs them for these settings."""
    logits = routing.routing_logits(h, d, gamma=s.routing_gamma, temperature=s.temperature, norm="token")
    if noise is not None:
        logits = logits * noise
    logits = logits.reshape(-1, s.num_experts)
    probs = routing.softmax_over_experts(logits)
    selection = routing.select_experts(probs, top_k=s.top_k, auto_topk=True, threshold=s.auto_topk_threshold,
                                       max_active=None, mode="soft", selection_temperature=s.selection_temperature,
                                       need_selected=True, logits=logits)
    return probs, selection.weights, selection.selected


@pytest.mark.parametrize("jitter", [False, True])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_probs_weights_and_gradients_equal_the_torch_ops(name, jitter) -> None:
    s = _settings(**SETTINGS[name], jitter_noise=0.1 if jitter else 0.0)
    E, N, width = s.num_experts, 37, s.num_experts + 5
    gen = torch.Generator().manual_seed(0)
    # The routed slices as the layer has them: the first E columns of wider rows (strided), 3 sequences.
    h_full, d_full = torch.randn(3, N, width, generator=gen) * 3, torch.randn(3, N, width, generator=gen)
    h_full[0, 0] = 0.0  # a token whose logits tie: every expert shares the maximum
    d_full[0, 0] = 0.0
    h_full[0, 1], d_full[0, 1] = 0.0, 0.0
    h_full[0, 1, : min(2, E)] = 2.0  # two experts share the maximum: amax's gradient is split between them
    g_w, g_p = torch.randn(3 * N, E, generator=gen), torch.randn(3 * N, E, generator=gen)
    torch.manual_seed(7)
    native = native_train_route.route(s, h_full.narrow(-1, 0, E), d_full.narrow(-1, 0, E), training=jitter)
    after_native = torch.rand(4)
    assert native is not None
    for with_probs_grad in (True, False):
        leaves = [h_full.clone().requires_grad_(), d_full.clone().requires_grad_()]
        torch.manual_seed(7)
        noise = torch.empty(3 * N, E).uniform_(0.9, 1.1).view(3, N, E) if jitter else None
        assert torch.equal(torch.rand(4), after_native), "the same draw as routing.apply_jitter"
        probs, weights, selected = _torch_ops(s, *(t.narrow(-1, 0, E) for t in leaves), noise)
        torch.testing.assert_close(native[0], probs, **TOL)
        torch.testing.assert_close(native[1], weights, **TOL)
        assert torch.equal(native_train_route.selected(native[0], s), selected)
        outputs, grads = ((probs, weights), (g_p, g_w)) if with_probs_grad else ((weights,), (g_w,))
        want = torch.autograd.grad(outputs, leaves, grads)
        native_leaves = [h_full.clone().requires_grad_(), d_full.clone().requires_grad_()]
        torch.manual_seed(7)
        got_probs, got_weights = native_train_route.route(s, *(t.narrow(-1, 0, E) for t in native_leaves), jitter)
        got_outputs = (got_probs, got_weights) if with_probs_grad else (got_weights,)
        got = torch.autograd.grad(got_outputs, native_leaves, grads)
        for g, w_ in zip(got, want):
            torch.testing.assert_close(g, w_, atol=1e-5, rtol=1e-4)


def test_two_threads_give_the_one_thread_results() -> None:
    # From PARALLEL_TOKENS tokens on the kernels share the tokens among torch's threads: same values, bit for bit.
    s = _settings(num_experts=8, jitter_noise=0.1)
    N = 3 * native_route.PARALLEL_TOKENS + 5
    gen = torch.Generator().manual_seed(2)
    h, d = torch.randn(N, 8, generator=gen) * 3, torch.randn(N, 8, generator=gen)
    g_w, g_p = torch.randn(N, 8, generator=gen), torch.randn(N, 8, generator=gen)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        leaves = [h.clone().requires_grad_(), d.clone().requires_grad_()]
        torch.manual_seed(3)
        probs, weights = native_train_route.route(s, *leaves, training=True)
        results.append((probs, weights, *torch.autograd.grad((probs, weights), leaves, (g_p, g_w))))
    torch.set_num_threads(1)
    for one, two in zip(*results):
        assert torch.equal(one, two)
    torch.manual_seed(3)
    noise = torch.empty(N, 8).uniform_(0.9, 1.1)
    ref_probs, ref_weights, _ = _torch_ops(s, h, d, noise)
    torch.testing.assert_close(results[1][0], ref_probs, **TOL)
    torch.testing.assert_close(results[1][1], ref_weights, **TOL)


@pytest.mark.parametrize(
    "kwargs",
    [{"auto_topk": False, "top_k": 2}, {"selection": "hard"}, {"max_active_experts": 2}, {"n_gram": 3},
     {"routing_norm": "batch"}, {"routing_mode": "uniform"}],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()),
)
def test_settings_it_leaves_to_the_torch_ops(kwargs) -> None:
    s = _settings(num_experts=4, **kwargs)
    h = torch.randn(5, 4)
    assert not native_train_route.covers(s)
    assert native_train_route.route(s, h, h, training=True) is None


def test_where_the_call_must_not_run(monkeypatch) -> None:
    s = _settings(num_experts=4)
    h = torch.randn(5, 4)
    assert native_train_route.route(s, h.bfloat16(), h.bfloat16(), training=True) is None
    native_route.set_native(False)
    assert native_train_route.route(s, h, h, training=True) is None
    native_route.set_native(True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert native_train_route.route(s, h, h, training=True) is None
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    eager = native_train_route.route(s, h, h, training=False)
    # While a model is compiled the call is the custom op (native_ops.py), the same values; never in torch.export,
    # nor with a process group up.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = native_train_route.route(s, h, h, training=False)
    assert traced is not None and all(torch.equal(x, y) for x, y in zip(traced, eager))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert native_train_route.route(s, h, h, training=True) is None
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert native_train_route.route(s, h, h, training=True) is None


def _train_step(native: bool, **kwargs):
    native_route.set_native(native)
    model = get_peft_model(tiny_llama(seed=1), lime(lora(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
                                                     **kwargs))
    scatter_experts(model)
    model.train()
    ids = torch.randint(3, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the balance terms read the valid tokens only
    torch.manual_seed(5)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = peft_lime.get_routing_stats(model)
    return out.loss.detach(), grads, stats, torch.rand(3)


@pytest.mark.parametrize("kwargs", [{}, {"jitter_noise": 0.0, "shared_expert": False}], ids=["default", "no jitter"])
def test_a_training_step_equals_the_torch_ops(kwargs, monkeypatch) -> None:
    calls, balance_calls, stats_calls = [], [], []
    original = native_train_route._NativeRoute.apply
    monkeypatch.setattr(native_train_route._NativeRoute, "apply", lambda *a: calls.append(1) or original(*a))
    # The balance loss and the statistics' sums take their kernels too (native_balance.py, native_stats.py).
    balance = native_balance._NativeBalance.apply
    monkeypatch.setattr(native_balance._NativeBalance, "apply", lambda *a: balance_calls.append(1) or balance(*a))
    stats_kernel = native_route.stats_kernel
    monkeypatch.setattr(native_route, "stats_kernel", lambda *a: stats_calls.append(1) or stats_kernel(*a))
    loss_off, grads_off, stats_off, rng_off = _train_step(False, **kwargs)
    assert calls == balance_calls == stats_calls == []
    loss_on, grads_on, stats_on, rng_on = _train_step(True, **kwargs)
    assert len(calls) == len(balance_calls) == len(stats_calls) == 4 * 2  # every wrapped layer, once (a fold each)
    assert torch.equal(rng_on, rng_off), "the jitter draw left the RNG stream where the torch ops leave it"
    torch.testing.assert_close(loss_on, loss_off, **TOL)
    assert set(grads_on) == set(grads_off)
    for name, grad in grads_off.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_on[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert set(stats_on["layers"]) == set(stats_off["layers"]) and len(stats_off["layers"]) == 8
    for layer, off in stats_off["layers"].items():
        for key in ("tokens", "routing_entropy", "active_experts", "mean_probs", "load", "importance_loss", "kl_loss",
                    "active_histogram"):
            torch.testing.assert_close(torch.as_tensor(stats_on["layers"][layer][key]), torch.as_tensor(off[key]),
                                       atol=1e-5, rtol=1e-4, msg=f"{layer} {key}")
