"""The native low-rank modulation and its backward (native_low_rank.py, csrc/lime_low_rank.c) equal the torch ops.

Three levels: the kernel's output and gradients against LiME's formula in float64 over shapes that exercise every
tail (tokens past the last tile, columns past the last vector), on one and two threads; a tiny Llama training step
and eval forward with the native calls on vs off (logits, loss and every gradient at 1e-5; the kernels really ran);
and where it must not run, and how the library is built.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import peft_lime
from peft_lime import low_rank_mix as lrm
from peft_lime import native_build, native_low_rank, native_route

from ._models import VOCAB, lime, lora, scatter_experts, tiny_llama

TOL = dict(atol=1e-5, rtol=1e-5)
# (N tokens, rank r, experts E, width d): a single token, tails of tokens (not a multiple of the kernel's tile of 4
# or 6) and of columns (not a multiple of its vector width of 4, 8 or 16), r != E, and a real layer's width.
SHAPES = [(1, 1, 1, 1), (3, 2, 5, 15), (13, 8, 8, 33), (29, 8, 8, 37), (64, 16, 4, 100), (258, 8, 8, 1536)]


@pytest.fixture(autouse=True)
def _native_on():
    previous, threads = native_route._enabled, torch.get_num_threads()
    native_route.set_native(True)
    assert native_route.available()
    yield
    native_route.set_native(previous)
    torch.set_num_threads(threads)


def _factors(N, r, E, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out, a = torch.randn(N, d, generator=gen), torch.randn(N, r, generator=gen)
    mix = torch.softmax(torch.randn(N, E, generator=gen) * 2, -1)
    B, experts = torch.randn(d, r, generator=gen), torch.randn(E, d, generator=gen) + 1.5  # experts far from 1
    return out, a, mix, B, experts


def _formula(out, a, mix, B, experts, s):
    """y = out + s (a @ B.T) * (mix @ experts), written plainly (float64 reference)."""
    return out + s * (a @ B.t()) * (mix @ experts)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-r{}-E{}-d{}".format(*s))
def test_forward_and_backward_equal_the_formula(shape, threads) -> None:
    torch.set_num_threads(threads)
    out, a, mix, B, experts = _factors(*shape)
    y = native_low_rank.forward(out, a, mix, B, experts, 0.7, inplace=False)
    grad_y = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = native_low_rank.backward(grad_y, a, mix, B, experts, 0.7)
    assert y is not None and grads is not None
    wide = [t.double().requires_grad_() for t in (out, a, mix, B, experts)]
    want = _formula(*wide, 0.7)
    want_grads = torch.autograd.grad(want, wide[1:], grad_y.double())
    torch.testing.assert_close(y, want.float(), **TOL)
    for name, got, ref in zip(("a", "mix", "B", "experts"), grads, want_grads):
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got, ref.float(), atol=1e-4 * max(1.0, ref.abs().max().item()), rtol=1e-5,
                                   msg=name)


def test_in_place_writes_into_out() -> None:
    out, a, mix, B, experts = _factors(9, 4, 3, 40)
    want = _formula(out, a, mix, B, experts, 1.3)
    y = native_low_rank.forward(out, a, mix, B, experts, 1.3, inplace=True)
    assert y is out
    torch.testing.assert_close(out, want, **TOL)


def test_non_contiguous_small_operands_are_packed() -> None:
    """mix comes from the routing as a strided view in training; a and the experts may too: the call packs them."""
    out, a, mix, B, experts = _factors(10, 4, 6, 20)
    a_t, mix_t, experts_t = (t.t().contiguous().t() for t in (a, mix, experts))  # same values, column-major
    assert not (a_t.is_contiguous() or mix_t.is_contiguous() or experts_t.is_contiguous())
    y = native_low_rank.forward(out, a_t, mix_t, B, experts_t, 1.0, inplace=False)
    torch.testing.assert_close(y, _formula(out, a, mix, B, experts, 1.0), **TOL)
    grads = native_low_rank.backward(torch.ones(10, 20), a_t, mix_t, B, experts_t, 1.0)
    want = native_low_rank.backward(torch.ones(10, 20), a, mix, B, experts, 1.0)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)


@pytest.mark.parametrize(
    "case",
    ["switch off", "bfloat16", "strided out", "rank over 64", "experts over 64", "compiling", "a subclass",
     "distributed"],
)
def test_where_the_native_call_must_not_run(case, monkeypatch) -> None:
    N, r, E, d = 8, 4, 3, 16
    if case == "rank over 64":
        r = 65
    if case == "experts over 64":
        E = 65
    out, a, mix, B, experts = _factors(N, r, E, d)
    if case == "switch off":
        native_route.set_native(False)
    if case == "bfloat16":
        out, a, mix, B, experts = (t.bfloat16() for t in (out, a, mix, B, experts))
    if case == "strided out":
        out = torch.randn(d, N).t()
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    if case == "distributed":
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    if case == "a subclass":

        class Sub(torch.Tensor):
            pass

        out = out.as_subclass(Sub)
    assert native_low_rank.forward(out, a, mix, B, experts, 1.0, inplace=False) is None
    grad_y = torch.ones_like(out)
    if case == "strided out":  # out is written in place, so it must be contiguous; a strided grad_y is just packed
        assert native_low_rank.backward(grad_y, a, mix, B, experts, 1.0) is not None
    else:
        assert native_low_rank.backward(grad_y, a, mix, B, experts, 1.0) is None


def _model():
    base = tiny_llama(seed=1)
    model = get_peft_model(base, lime(lora(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
                                      jitter_noise=0.0))
    scatter_experts(model)
    return model


def _step(model, ids, native: bool):
    native_route.set_native(native)
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return out.loss.detach(), grads, logits


@pytest.mark.parametrize("threads", [1, 2])
def test_a_training_step_and_eval_equal_the_torch_ops(threads, monkeypatch) -> None:
    torch.set_num_threads(threads)
    monkeypatch.setattr(lrm, "LOW_RANK_MIX_MIN_ELEMENTS", 0)  # the tiny model's calls take the low-rank path
    calls = []
    for name in ("forward", "backward"):
        original = getattr(native_low_rank, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            result = _original(*args, **kwargs)
            calls.append((_name, result is not None))
            return result

        monkeypatch.setattr(native_low_rank, name, spy)
    model = _model()
    ids = torch.randint(3, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    loss_off, grads_off, logits_off = _step(model, ids, native=False)
    assert not any(ran for _, ran in calls)
    calls.clear()
    loss_on, grads_on, logits_on = _step(model, ids, native=True)
    layers = sum(isinstance(m, peft_lime.LimeLayer) for m in model.modules())
    # Training forward + backward, then the eval forward: every layer call went native.
    assert calls == [("forward", True)] * layers + [("backward", True)] * layers + [("forward", True)] * layers
    torch.testing.assert_close(loss_on, loss_off, **TOL)
    torch.testing.assert_close(logits_on, logits_off, **TOL)
    assert set(grads_on) == set(grads_off) and any("lime_experts" in n for n in grads_on)
    for name, grad in grads_off.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_on[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_build_that_fails_falls_through_to_the_next_flags(monkeypatch, tmp_path) -> None:
    """The first flag set that builds and loads is used: a compiler that rejects a flag costs only that build."""
    monkeypatch.setenv("PEFT_LIME_CACHE", str(tmp_path))
    monkeypatch.setattr(native_build, "FLAG_SETS", (native_build.BASE_FLAGS + ("-fno-such-flag-x",),
                                                    native_build.BASE_FLAGS))
    monkeypatch.setattr(native_route, "FLAG_SETS", native_build.FLAG_SETS)
    native_route.reset()
    try:
        assert native_route.available()
        assert [p.name for p in tmp_path.iterdir()] == [native_build.library_path(native_build.compiler_command(),
                                                                                  native_build.BASE_FLAGS).name]
        out, a, mix, B, experts = _factors(6, 3, 4, 20)  # the single-threaded build computes the same
        torch.testing.assert_close(native_low_rank.forward(out, a, mix, B, experts, 1.0, inplace=False),
                                   _formula(out, a, mix, B, experts, 1.0), **TOL)
    finally:
        native_route.reset()


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's dladdr; the CI machines run Linux")
def test_the_openmp_build_runs_on_torchs_own_runtime() -> None:
    """With gcc the OpenMP build is the one loaded, and its OpenMP entry point resolves into the libgomp torch
    loaded (same soname): the kernel shares torch's intra-op threads instead of starting a second pool."""
    compiler = native_build.compiler_command()
    assert native_route.library._name == str(native_build.library_path(compiler, native_build.FLAG_SETS[0]))
    entry = ctypes.cast(native_route.library.GOMP_parallel, ctypes.c_void_p).value
    info = _DlInfo()
    assert ctypes.CDLL(None).dladdr(ctypes.c_void_p(entry), ctypes.byref(info)) != 0
    torch_lib = Path(torch.__file__).parent / "lib"
    if (torch_lib / "libgomp.so.1").exists():  # pip's torch wheels bundle it
        assert Path(info.dli_fname.decode()).resolve() == (torch_lib / "libgomp.so.1").resolve()
