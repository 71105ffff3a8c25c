"""The native kernels as custom ops (native_ops.py): what a torch.compile'd model runs.

Each op against its reference (the written formula or routing.py's ops) and through torch.library.opcheck (schema,
fake implementation, autograd registration); compiled models (aot_eager: dynamo + AOT autograd as inductor sees
them, without its C++ code generation; one inductor run is marked slow) against the eager model with the native
library off: loss and every gradient of a training step, eval logits, static-cache decoding logits; the ops present
in the graphs where they apply and absent where they must not be (native switch off, torch.export).
"""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import peft_lime
from peft_lime import native_route

from ._models import VOCAB
from .test_compile import _model as _compile_test_model
from .test_native_train_route import _settings, _torch_ops

pytestmark = pytest.mark.usefixtures("one_thread", "native_on")
TOL = dict(atol=1e-5, rtol=1e-5)
OPS = torch.ops.peft_lime
STATS_KEYS = ("tokens", "routing_entropy", "active_experts", "mean_probs", "load", "importance_loss", "kl_loss",
              "active_histogram")


def _low_rank_args(N=37, r=8, E=8, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    out, a, mix = torch.randn(N, d, generator=g), torch.randn(N, r, generator=g), torch.rand(N, E, generator=g)
    B, experts = torch.randn(d, r, generator=g), torch.randn(E, d, generator=g) + 3.0
    return out, a, mix / mix.sum(-1, keepdim=True), B, experts


def test_low_rank_mix_op_equals_the_formula_forward_and_backward():
    args = [t.requires_grad_() for t in _low_rank_args()]
    out, a, mix, B, experts = args
    y = OPS.low_rank_mix(out, a, mix, B, experts, 0.5)
    ref = out + 0.5 * (a @ B.t()) * (mix @ experts)
    torch.testing.assert_close(y, ref, **TOL)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, args, g)
    want = torch.autograd.grad(ref, args, g)
    for name, x, w in zip(("out", "a", "mix", "B", "experts"), got, want):
        torch.testing.assert_close(x, w, **TOL, msg=name)


def test_route_train_op_equals_the_torch_ops_forward_and_backward():
    s = _settings(num_experts=8)
    g = torch.Generator().manual_seed(1)
    h, d = torch.randn(29, 8, generator=g, requires_grad=True), torch.randn(29, 8, generator=g, requires_grad=True)
    noise = torch.empty(29, 8).uniform_(0.9, 1.1, generator=g)
    c_h, c_d = (1 - s.routing_gamma) / s.temperature, s.routing_gamma / s.temperature
    probs, weights, _ = OPS.route_train(h, d, noise, c_h, c_d, native_route.ADAPTER_SCALE_FLOOR**2,
                                        s.auto_topk_threshold, 1.0 / s.selection_temperature)
    ref_probs, ref_weights, _ = _torch_ops(s, h, d, noise)
    torch.testing.assert_close(probs, ref_probs, **TOL)
    torch.testing.assert_close(weights, ref_weights, **TOL)
    gw, gp = torch.randn(29, 8, generator=g), torch.randn(29, 8, generator=g)
    got = torch.autograd.grad((weights * gw).sum() + (probs * gp).sum(), (h, d))
    want = torch.autograd.grad((ref_weights * gw).sum() + (ref_probs * gp).sum(), (h, d))
    for x, w in zip(got, want):
        torch.testing.assert_close(x, w, **TOL)


def _plan():
    return native_route._plan(_settings(num_experts=8))


def test_no_grad_ops_equal_their_kernels():
    g = torch.Generator().manual_seed(2)
    h, out, delta = (torch.randn(5, 24, generator=g) for _ in range(3))
    weight, shared, gate = torch.randn(8, 24, generator=g), torch.randn(24, generator=g), torch.tensor([0.5])
    plan = _plan()
    y = OPS.route_modulate(h, out, delta, weight, shared, gate, *plan)
    torch.testing.assert_close(y, native_route.modulate_kernel(h, out, delta, weight, shared, gate, plan), **TOL)
    mix = OPS.route_weights(h, delta[:, :8].contiguous(), *plan)
    torch.testing.assert_close(mix, native_route.weights_kernel(h, delta[:, :8].contiguous(), plan), **TOL)
    # and the modulation is the written one: out + delta * (1 + g p_s + mix @ W), mix from the same routing
    torch.testing.assert_close(y, out + delta * (1 + 0.5 * shared + mix @ weight), **TOL)
    # delta_scale (LoRA's scaling from decoding layers): the op on the unscaled delta equals the kernel on the scaled
    scaled = OPS.route_modulate(h, out, delta, weight, shared, gate, *plan, 0.37)
    assert torch.equal(scaled, native_route.modulate_kernel(h, out, delta * 0.37, weight, shared, gate, plan))


@pytest.mark.parametrize("op", ["low_rank_mix", "route_train", "route_weights", "route_modulate"])
def test_opcheck(op):
    """Schema, fake implementation (shapes, strides, dtypes) and autograd registration agree with the real op."""
    if op == "low_rank_mix":
        args = tuple(t.requires_grad_() for t in _low_rank_args(N=9)) + (0.5,)
    elif op == "route_train":
        h, d = torch.randn(7, 8, requires_grad=True), torch.randn(7, 8, requires_grad=True)
        args = (h, d, torch.empty(7, 8).uniform_(0.9, 1.1), 0.9, 0.1, 1e-6, 0.5, 10.0)
    elif op == "route_weights":
        args = (torch.randn(3, 16), torch.randn(3, 8), *_plan())
    else:
        args = (torch.randn(3, 16), torch.randn(3, 16), torch.randn(3, 16), torch.randn(8, 16), torch.randn(16),
                torch.tensor([0.5]), *_plan(), 0.37)
    torch.library.opcheck(getattr(OPS, op).default, args)


# --- compiled models ---------------------------------------------------------------------------------------------
def _model(**lime_kwargs):
    return _compile_test_model(1, **lime_kwargs)  # one decoder layer, experts far from 1


class _Recorder:
    """An aot_eager backend that records the call targets of every forward and backward graph it is given."""

    def __init__(self):
        self.targets: set[str] = set()
        aot = aot_autograd(fw_compiler=self._compile, bw_compiler=self._compile)

        # A function, not a bound method: transformers deep-copies its CompileConfig (and a method's object with it).
        def backend(gm, example_inputs, **kwargs):  # kwargs: transformers passes a mode
            self.targets |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}  # dynamo's graph
            return aot(gm, example_inputs)

        self.backend = backend

    def _compile(self, gm, example_inputs):
        self.targets |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        return make_boxed_func(gm.forward)

    def lime_ops(self) -> set[str]:
        return {t.removeprefix("peft_lime.").removesuffix(".default") for t in self.targets if "peft_lime" in t}


def _eager_reference(model, fn):
    native_route.set_native(False)  # routing.py's torch ops: the reference
    try:
        return fn(model)
    finally:
        native_route.set_native(True)


@pytest.mark.parametrize("jitter", [0.0, 0.1])
def test_compiled_training_step_equals_eager_torch_ops(jitter):
    # 8 x 600 tokens: the layers' modulation takes the single-GEMM path (low_rank_mix.use_low_rank_mix)
    x = torch.randint(3, VOCAB, (8, 600))
    eager, compiled = _model(jitter_noise=jitter).train(), _model(jitter_noise=jitter).train()

    def step(m, fn):
        torch.manual_seed(5)  # the same jitter draws (dynamo keeps torch's RNG with aot_eager)
        loss = fn(input_ids=x, labels=x).loss
        loss.backward()
        return loss.detach()

    ref = _eager_reference(eager, lambda m: step(m, m))
    recorder = _Recorder()
    torch._dynamo.reset()
    got = step(compiled, torch.compile(compiled, backend=recorder.backend))
    assert recorder.lime_ops() == {
        "low_rank_mix", "low_rank_mix_backward", "route_train", "route_train_backward", "balance_aux",
        "balance_aux_backward", "record_routing_stats",
    }
    torch.testing.assert_close(got, ref, **TOL)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    assert len(grads) == 4 * 5 and all(g is not None for g in grads.values())  # lora_A, lora_B, weight, shared, gate
    for name, param in compiled.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], **TOL, msg=name)
    # The statistics the op added in the graph are those routing.py's ops and stats.py's sums give eagerly.
    want, have = peft_lime.get_routing_stats(eager)["layers"], peft_lime.get_routing_stats(compiled)["layers"]
    assert set(have) == set(want) and len(want) == 4
    for layer, ref_stats in want.items():
        assert ref_stats["tokens"] == x.numel()
        for key in STATS_KEYS:
            torch.testing.assert_close(torch.as_tensor(have[layer][key]), torch.as_tensor(ref_stats[key]), **TOL,
                                       msg=f"{layer} {key}")


def test_compiled_eval_forward_equals_eager_torch_ops():
    x = torch.randint(3, VOCAB, (8, 600))  # a large no-grad call: mixing weights op + single-GEMM modulation
    model = _model().eval()
    with torch.no_grad():
        ref = _eager_reference(model, lambda m: m(input_ids=x).logits)
        recorder = _Recorder()
        torch._dynamo.reset()
        got = torch.compile(model, backend=recorder.backend)(input_ids=x).logits
    # the wide layers' call is large (weights op + single GEMM); v_proj's narrower output (grouped KV heads) is not
    assert recorder.lime_ops() == {"route_weights", "low_rank_mix", "route_modulate"}
    torch.testing.assert_close(got, ref, **TOL)


def _generate(model, config=None):
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                  return_dict_in_generate=True)
    if config is not None:
        kwargs.update(cache_implementation="static", compile_config=config)
    torch.manual_seed(7)
    prompt = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        return torch.stack(model.generate(input_ids=prompt, **kwargs).logits, 1)


def test_compiled_static_cache_decoding_equals_eager_torch_ops():
    from transformers import CompileConfig

    model = _model().eval()
    ref = _eager_reference(model, _generate)
    recorder = _Recorder()
    config = CompileConfig(backend=recorder.backend, fullgraph=True)  # one graph per step: the op breaks nothing
    config._compile_all_devices = True
    torch._dynamo.reset()
    got = _generate(model, config)
    assert recorder.lime_ops() == {"route_modulate"}
    torch.testing.assert_close(got, ref, **TOL)


def test_no_op_in_the_graph_with_the_switch_off_or_hard_selection():
    x = torch.randint(3, VOCAB, (2, 9))
    for switch, kwargs in ((False, {}), (True, {"selection": "hard", "auto_topk": False, "top_k": 2})):
        model = _model(**kwargs).eval()
        native_route.set_native(switch)
        recorder = _Recorder()
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend=recorder.backend)(input_ids=x)
        native_route.set_native(True)
        assert recorder.targets and recorder.lime_ops() == set(), (switch, kwargs)


def test_exported_program_holds_no_peft_lime_op():
    """An exported program must not depend on this process's native library."""
    model = _model().eval()
    x = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        program = torch.export.export(model, (), {"input_ids": x, "use_cache": False})
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert targets and not any("peft_lime" in t for t in targets)


@pytest.mark.slow  # inductor's C++ code generation: about a minute on 2 cores
def test_inductor_compiled_training_step_equals_eager_torch_ops():
    x = torch.randint(3, VOCAB, (8, 600))
    eager, compiled = _model(jitter_noise=0.0).train(), _model(jitter_noise=0.0).train()
    ref = _eager_reference(eager, lambda m: m(input_ids=x, labels=x).loss)
    ref.backward()
    torch._dynamo.reset()
    got = torch.compile(compiled)(input_ids=x, labels=x).loss
    got.backward()
    torch.testing.assert_close(got, ref, **TOL)
    grads = dict(eager.named_parameters())
    for name, param in compiled.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name].grad, atol=1e-4, rtol=1e-4, msg=name)
