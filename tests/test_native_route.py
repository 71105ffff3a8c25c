"""The native decoding kernel (native_route.py, csrc/lime_route.c) equals the eager routing and modulation.

Three levels: the kernel's weights and output against routing.py + modulation.py on random tokens (ties included);
a tiny Llama with LiME, kernel on vs off, over the selection settings (logits at 1e-5, and the kernel really ran);
and cached generation. Then where it must not run (grad, training, statistics, windows, other routing modes), its
switch, and a failed build falling back to the eager path.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from peft import get_peft_model

import peft_lime
from peft_lime import native_route, routing
from peft_lime.modulation import modulate
from peft_lime.settings import LimeRoutingSettings

from ._models import VOCAB, lime, lora, scatter_experts, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
TOL = dict(atol=1e-5, rtol=1e-5)
SETTINGS = {
    "auto soft (default)": {},
    "auto hard": {"selection": "hard"},
    "auto capped soft": {"max_active_experts": 2},
    "auto capped hard": {"max_active_experts": 2, "selection": "hard"},
    "top-2 soft": {"auto_topk": False, "top_k": 2},
    "top-1 hard": {"auto_topk": False, "top_k": 1, "selection": "hard"},
    "top-E hard": {"auto_topk": False, "top_k": 4, "selection": "hard"},
    "frozen only (gamma 0)": {"routing_gamma": 0.0},
    "adapter only (gamma 1)": {"routing_gamma": 1.0},
    "no shared expert, 8 experts": {"shared_expert": False, "num_experts": 8},
}


@pytest.fixture(autouse=True)
def _native_state():
    previous = native_route._enabled
    native_route.set_native(True)
    yield
    native_route.set_native(previous)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the kernels' calls (building them first): ("modulate", tokens) or ("weights", tokens)."""
    assert native_route.available()
    calls = []
    kernel, weights_kernel = native_route._kernel, native_route._weights_kernel

    def counting(*args):
        calls.append(("modulate", args[8]))
        return kernel(*args)

    def counting_weights(*args):
        calls.append(("weights", args[4]))
        return weights_kernel(*args)

    monkeypatch.setattr(native_route, "_kernel", counting)
    monkeypatch.setattr(native_route, "_weights_kernel", counting_weights)
    return calls


def _settings(**kwargs) -> LimeRoutingSettings:
    return LimeRoutingSettings.from_config(peft_lime.LimeConfig(base=lora(), **kwargs))


def _eager(h, delta, out, weight, offset, s):
    E = s.num_experts
    logits = routing.routing_logits(h[:, :E], delta[:, :E], gamma=s.routing_gamma, temperature=s.temperature,
                                    norm="token")
    probs = routing.softmax_over_experts(logits)
    sel = routing.select_experts(probs, top_k=s.top_k, auto_topk=s.auto_topk, threshold=s.auto_topk_threshold,
                                 max_active=s.max_active_experts, mode=s.selection,
                                 selection_temperature=s.selection_temperature, need_selected=False, logits=logits)
    return sel.weights, modulate(out, sel.weights, weight, offset, delta=delta)


def _kernel(h, delta, out, weight, shared, gate, s, delta_scale=1.0):
    E, c_h, c_d, floor2, eps, k, auto, threshold, hard, inv_t = native_route._plan(s)
    y, w = torch.empty_like(out), torch.empty(out.shape[0], E)
    status = native_route._kernel(h.data_ptr(), delta.data_ptr(), delta_scale, out.data_ptr(), y.data_ptr(),
                                  weight.data_ptr(),
                                  shared.data_ptr(), gate.data_ptr(), out.shape[0], out.shape[1], E, c_h, c_d, floor2,
                                  eps, k, auto, threshold, hard, inv_t, w.data_ptr())
    return status, w, y


@pytest.mark.parametrize("name", ["auto soft (default)", "top-1 hard"])
def test_kernel_scales_delta_as_torch_would(name: str) -> None:
    """delta_scale (LoRA's scaling, passed by decoding layers) gives bit for bit what the kernel gives for torch's
    delta * scaling: routing reads the scaled routed slice, and the modulation the scaled delta."""
    assert native_route.available()
    s = _settings(num_experts=4, **SETTINGS[name])
    gen = torch.Generator().manual_seed(3)
    h, delta, out = (torch.randn(40, 24, generator=gen) for _ in range(3))
    weight, shared, gate = torch.randn(4, 24, generator=gen), torch.randn(24, generator=gen), torch.tensor([0.7])
    scaling = 0.37  # far from 1: an unscaled routed slice or modulation shows
    status, w, y = _kernel(h, delta, out, weight, shared, gate, s, delta_scale=scaling)
    ref_status, ref_w, ref_y = _kernel(h, delta * scaling, out, weight, shared, gate, s)
    assert status == ref_status == 0
    assert torch.equal(w, ref_w) and torch.equal(y, ref_y)
    w_eager, y_eager = _eager(h, delta * scaling, out, weight, 1.0 + gate * shared, s)
    torch.testing.assert_close(y, y_eager, **TOL)
    assert not torch.allclose(y, _kernel(h, delta, out, weight, shared, gate, s)[2], atol=1e-3)


def test_the_kernel_builds_where_a_compiler_is() -> None:
    assert shutil.which("cc") is not None, "this suite expects a C compiler (the CI machines have gcc)"
    assert native_route.available()
    assert native_route.build().exists()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_kernel_weights_and_output_equal_the_eager_math(name: str) -> None:
    assert native_route.available()
    kwargs = {"num_experts": 4, **SETTINGS[name]}
    s = _settings(**kwargs)
    gen = torch.Generator().manual_seed(0)
    N, d = 300, 24
    h, delta, out = (torch.randn(N, d, generator=gen) for _ in range(3))
    weight, shared, gate = torch.randn(s.num_experts, d, generator=gen), torch.randn(d, generator=gen), torch.tensor([0.7])
    offset = 1.0 + gate * shared
    status, w, y = _kernel(h, delta, out, weight, shared, gate, s)
    assert status == 0
    w_ref, y_ref = _eager(h, delta, out, weight, offset, s)
    torch.testing.assert_close(w, w_ref, **TOL)
    torch.testing.assert_close(y, y_ref, **TOL)
    # The weights-only entry (large calls): h read with its row stride d, the slice of delta packed (N, E).
    E, c_h, c_d, floor2, eps, k, auto, threshold, hard, inv_t = native_route._plan(s)
    # One thread, then two sharing the tokens (OpenMP builds): the same weights, bit for bit.
    slice_, w_only, w_two = delta[:, :E].contiguous(), torch.empty(N, E), torch.empty(N, E)
    for threads, dest in ((1, w_only), (2, w_two)):
        assert native_route._weights_kernel(h.data_ptr(), d, slice_.data_ptr(), E, N, E, c_h, c_d, floor2, eps, k,
                                            auto, threshold, hard, inv_t, dest.data_ptr(), threads) == 0
    torch.testing.assert_close(w_only, w_ref, **TOL)
    assert torch.equal(w_two, w_only)
    assert (w == 0).any() == (s.selection == "hard" and (s.auto_topk or s.top_k < s.num_experts))


def test_a_hard_tie_at_the_top_k_cut_is_left_to_the_eager_path() -> None:
    assert native_route.available()
    s = _settings(num_experts=4, auto_topk=False, top_k=2, selection="hard")
    h = delta = torch.zeros(1, 8)  # every logit 0: four experts tie for two places
    out, weight = torch.randn(1, 8), torch.randn(4, 8)
    status, _, _ = _kernel(h, delta, out, weight, torch.zeros(8), torch.zeros(1), s)
    assert status == 1
    soft = _settings(num_experts=4, auto_topk=False, top_k=2)  # soft selection has no mask: nothing to decide
    assert _kernel(h, delta, out, weight, torch.zeros(8), torch.zeros(1), soft)[0] == 0


def _model(**kwargs):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(seed=3), lime(lora(target_modules=TARGETS), **kwargs)).eval()
    scatter_experts(model)
    return model


def _logits(model, native: bool, x, mask):
    native_route.set_native(native)
    with torch.no_grad():
        return model(input_ids=x, attention_mask=mask).logits


@pytest.mark.parametrize("name", list(SETTINGS))
def test_model_logits_equal_the_eager_path(name: str, kernel_calls) -> None:
    model = _model(**SETTINGS[name])
    x = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    eager = _logits(model, False, x, mask)
    assert not kernel_calls
    native = _logits(model, True, x, mask)
    assert kernel_calls == [("modulate", 14)] * (2 * len(TARGETS)), "every wrapped layer runs the kernel once"
    torch.testing.assert_close(native, eager, **TOL)


@pytest.mark.parametrize("name", ["auto soft (default)", "auto capped hard", "top-2 soft"])
def test_large_calls_route_natively_and_equal_the_eager_path(name: str, kernel_calls, monkeypatch) -> None:
    """Calls past the single-GEMM threshold (lowered here, so a tiny batch is "large") take the weights-only entry."""
    from peft_lime import low_rank_mix

    monkeypatch.setattr(low_rank_mix, "LOW_RANK_MIX_MIN_ELEMENTS", 1)
    model = _model(**SETTINGS[name])
    x = torch.randint(3, VOCAB, (3, 9))
    mask = torch.ones_like(x)
    mask[2, :3] = 0
    eager = _logits(model, False, x, mask)
    native = _logits(model, True, x, mask)
    assert kernel_calls == [("weights", 27)] * (2 * len(TARGETS))
    torch.testing.assert_close(native, eager, **TOL)


def test_cached_generation_equals_the_eager_path(kernel_calls) -> None:
    model = _model()
    x = torch.randint(3, VOCAB, (2, 5))
    runs = {}
    for native in (False, True):
        native_route.set_native(native)
        with torch.no_grad():
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        runs[native] = gen
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    torch.testing.assert_close(torch.stack(runs[True].logits), torch.stack(runs[False].logits), **TOL)
    assert kernel_calls.count(("modulate", 2)) >= 5 * 2 * len(TARGETS), "the one-token steps (2 rows) ran the kernel"


@pytest.mark.parametrize(
    "case",
    ["grad", "training", "statistics", "n_gram 3", "prefix", "uniform routing", "switched off", "float64",
     "tensor subclass"],
)
def test_where_the_kernel_must_not_run(case: str, kernel_calls) -> None:
    kwargs = {"n_gram 3": {"n_gram": 3}, "prefix": {"ngram_mode": "prefix", "n_gram": 2},
              "uniform routing": {"routing_mode": "uniform"}}.get(case, {})
    model = _model(**kwargs)
    if case == "float64":
        model = model.double()
    if case == "tensor subclass":  # e.g. a DTensor shard: its data_ptr() need not hold the whole tensor
        for module in model.modules():
            if isinstance(module, peft_lime.LimeExperts):
                module.weight = torch.nn.Parameter(module.weight.detach().as_subclass(_Subclass))
    x = torch.randint(3, VOCAB, (2, 6))
    if case == "switched off":
        native_route.set_native(False)
    model.train(case == "training")
    with torch.set_grad_enabled(case in ("grad", "training")):
        if case == "statistics":
            with peft_lime.recording_routing_stats(model):
                model(input_ids=x)
            assert peft_lime.get_routing_stats(model)["layers"], "statistics were recorded"
        else:
            model(input_ids=x)
    assert kernel_calls == []


class _Subclass(torch.Tensor):
    pass


def test_environment_switch() -> None:
    assert native_route.env_switch(None) and native_route.env_switch("1")
    assert not any(native_route.env_switch(v) for v in ("0", "false", "OFF", " no "))


def test_a_failed_build_falls_back_to_the_eager_path(monkeypatch, tmp_path, caplog) -> None:
    model = _model()
    x = torch.randint(3, VOCAB, (2, 6))
    eager = _logits(model, False, x, None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PEFT_LIME_CACHE", str(tmp_path / "cache"))
    native_route.reset()
    try:
        with caplog.at_level(logging.DEBUG, logger="peft_lime.native_route"):
            fallback = _logits(model, True, x, None)
        assert not native_route.available()
        assert "native routing kernel unavailable" in caplog.text
        torch.testing.assert_close(fallback, eager, atol=0, rtol=0)
    finally:
        native_route.reset()


def test_the_library_is_built_once_per_source(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PEFT_LIME_CACHE", str(tmp_path))
    first = native_route.build()
    stamp = first.stat().st_mtime_ns
    assert native_route.build() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name], "no temporary file is left behind"
