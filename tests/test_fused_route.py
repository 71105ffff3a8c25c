"""The fused routing region (fused_route.py) equals the eager routing path, and compiles once per setting.

Equality: outputs, every gradient, the aux loss and the routing statistics of a tiny Llama with LiME, fused vs eager,
to 1e-5 (fp32; the same ops, some folded in another order). Jitter stays on: the fused path draws the noise exactly
as the eager one does. The settings matrix runs on the ``aot_eager`` backend, which traces through dynamo and AOT
autograd exactly as inductor does (guards, graph, custom backward) without inductor's C++ code generation, which costs
seconds per graph on a CPU; the default setting also runs on inductor itself (the default backend), with the
recompilation check.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch._dynamo.utils import counters
from transformers import DynamicCache

import peft_lime
from peft_lime import fused_route

from ._models import VOCAB, lime, lora, scatter_experts, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _fused_state():
    """Every test starts with the fused region on and a fresh compiled region; the state is restored after."""
    previous = fused_route._enabled
    fused_route.set_fused(True)
    fused_route.reset()
    yield
    fused_route.set_fused(previous)
    fused_route.reset()


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(fused_route, "BACKEND", "aot_eager")
    fused_route.reset()


def _model(**kwargs):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(seed=3), lime(lora(target_modules=TARGETS), **kwargs))
    scatter_experts(model)
    return model


def _inputs(batch: int = 2, length: int = 7):
    x = torch.randint(3, VOCAB, (batch, length))
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding: windows, balance terms and statistics skip it
    return x, mask


def _run(model, fused: bool, x, mask, train: bool) -> dict:
    """Logits, gradients, aux loss and per-layer routing statistics of one forward (+ backward when training)."""
    fused_route.set_fused(fused)
    peft_lime.reset_routing_stats(model)
    model.zero_grad(set_to_none=True)
    model.train(train)
    torch.manual_seed(7)  # the same jitter draws on both paths
    with torch.set_grad_enabled(train), peft_lime.recording_routing_stats(model):
        out = model(input_ids=x, attention_mask=mask, labels=x if train else None)
        if train:
            out.loss.backward()
    return {
        "logits": out.logits.detach(),
        "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        "aux": peft_lime.get_aux_loss(model) if train else None,
        "stats": peft_lime.get_routing_stats(model)["layers"],
    }


def _assert_equal(fused: dict, eager: dict) -> None:
    torch.testing.assert_close(fused["logits"], eager["logits"], **TOL)
    assert eager["grads"].keys() == fused["grads"].keys()
    for name, grad in eager["grads"].items():
        torch.testing.assert_close(fused["grads"][name], grad, **TOL, msg=name)
    if eager["aux"] is not None:
        torch.testing.assert_close(fused["aux"], eager["aux"], **TOL)
    assert fused["stats"].keys() == eager["stats"].keys() and eager["stats"]
    for layer, ref in eager["stats"].items():
        got = fused["stats"][layer]
        for key in ("tokens", "routing_entropy", "active_experts", "importance_loss", "kl_loss", "load_imbalance"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (layer, key)
        for key in ("mean_probs", "load", "active_histogram"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (layer, key)


def _compare(model, train: bool, batch: int = 2, length: int = 7) -> None:
    x, mask = _inputs(batch, length)
    eager = _run(model, False, x, mask, train)
    fused = _run(model, True, x, mask, train)
    assert fused_route.fused_enabled(), "the compiled region failed and fell back"
    if train:
        assert eager["grads"] and eager["aux"] is not None
    _assert_equal(fused, eager)


def _decode_logits(model, fused: bool, prompt, steps: int) -> torch.Tensor:
    """Greedy decoding with a KV cache, one token per call; the logits of every step."""
    fused_route.set_fused(fused)
    model.eval()
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        cache = DynamicCache()
        out = model(input_ids=prompt, attention_mask=mask, past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        for _ in range(steps):
            token = logits[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def test_env_switch_and_setter():
    assert fused_route.env_switch("1") and fused_route.env_switch(" On ")
    assert not any(fused_route.env_switch(v) for v in (None, "", "0", "false", "OFF", " no "))
    fused_route.set_fused(False)
    assert not fused_route.fused_enabled()
    fused_route.set_fused(True)
    assert fused_route.fused_enabled()


@pytest.mark.parametrize("n_gram", [1, 3])
@pytest.mark.parametrize("auto_topk", [True, False])
@pytest.mark.parametrize("selection", ["soft", "hard"])
def test_fused_equals_eager(aot_eager, selection, auto_topk, n_gram):
    model = _model(selection=selection, auto_topk=auto_topk, top_k=2, n_gram=n_gram)
    _compare(model, train=True)
    _compare(model, train=False)


def test_fused_equals_eager_with_capped_auto_topk(aot_eager):
    _compare(_model(max_active_experts=2, n_gram=3), train=True)


def test_cached_decoding_equals_eager_and_nothing_recompiles(aot_eager):
    """Greedy decoding logits step by step (n_gram 3) equal the eager path's; after a warm-up, other batch sizes,
    lengths, a second adapter with other sizes and float settings, and train / eval switches add no graph."""
    model = _model(n_gram=3)
    counters.clear()
    prompt = torch.randint(3, VOCAB, (2, 5))
    torch.testing.assert_close(_decode_logits(model, True, prompt, 4), _decode_logits(model, False, prompt, 4), **TOL)
    _run(model, True, *_inputs(), train=True)
    graphs = counters["stats"]["unique_graphs"]
    _assert_no_recompile(model, graphs)


def _assert_no_recompile(model, graphs: int) -> None:
    # Warm-up graphs: eval / prefill, the first decoding step and the later ones (the kept tail's storage offset is
    # 1 from the second step on: dynamo specialises offsets 0 and 1), training.
    assert 1 <= graphs <= 4, graphs
    other = lime(
        lora(target_modules=TARGETS),
        n_gram=3,
        num_experts=6,
        temperature=0.7,
        routing_gamma=0.5,
        auto_topk_threshold=0.3,
        importance_loss_coef=0.05,
    )
    model.add_adapter("other", other)
    for adapter in ("default", "other", "default"):
        model.set_adapter(adapter)
        _run(model, True, *_inputs(3, 9), train=True)
        _run(model, True, *_inputs(4, 6), train=False)
        _run(model, True, *_inputs(2, 12), train=True)
        _decode_logits(model, True, torch.randint(3, VOCAB, (3, 8)), 2)
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled (run with TORCH_LOGS=recompiles)"
    assert fused_route.fused_enabled()


@pytest.mark.parametrize("settings", [dict(routing_norm="batch"), dict(n_gram=3, ngram_mode="block")])
def test_unsupported_settings_take_the_eager_path(settings):
    model = _model(**settings)
    layer = next(m for m in model.modules() if isinstance(m, peft_lime.LimeLayer))
    assert not fused_route.supports(layer.lime_routing["default"])
    _run(model, True, *_inputs(), train=True)
    assert fused_route._compiled is None


def test_compiler_failure_falls_back_to_the_eager_path(monkeypatch):
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fused_route, "BACKEND", failing_backend)
    fused_route.reset()
    model = _model(n_gram=3)
    x, mask = _inputs()
    eager = _run(model, False, x, mask, True)
    fused = _run(model, True, x, mask, True)  # the failing call runs the same math uncompiled
    assert not fused_route.fused_enabled()  # and the eager path from then on
    _assert_equal(fused, eager)


@pytest.mark.slow  # inductor's C++ code generation: about 30 s of CPU for the four graphs on a cold cache
def test_inductor_equals_eager_and_compiles_once_per_setting():
    """The default backend: equality (training, eval, cached decoding) and no recompilation, as above."""
    model = _model(n_gram=3)
    counters.clear()
    _compare(model, train=True)
    _compare(model, train=False)
    prompt = torch.randint(3, VOCAB, (2, 5))
    torch.testing.assert_close(_decode_logits(model, True, prompt, 4), _decode_logits(model, False, prompt, 4), **TOL)
    _assert_no_recompile(model, counters["stats"]["unique_graphs"])
