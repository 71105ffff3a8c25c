"""torch.compile: no graph break inside peft_lime code, and compiled results equal eager ones.

Graph breaks are found with ``torch._dynamo.explain`` (tracing only, no code generation): a break counts against
peft_lime when a frame of its user stack lies in the peft_lime package. Equality runs use the ``aot_eager`` backend:
it traces through dynamo and AOT autograd exactly as inductor does (custom autograd functions, side effects on the
routing statistics) without the minutes of C++ code generation inductor needs on a CPU; tolerance 1e-5 (fp32,
the same ops in another order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
from peft import get_peft_model
from transformers import DynamicCache

import peft_lime

from ._models import VOCAB, lime, lora, tiny_llama

PACKAGE = str(Path(peft_lime.__file__).parent)
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
# Soft and hard selection, Auto Top-K with and without a cap, fixed top-k; n_gram 1 and 3 between them.
SETTINGS = {
    "soft-auto-ngram3": dict(n_gram=3),
    "hard-auto-capped-ngram1": dict(selection="hard", max_active_experts=2),
    "soft-topk-ngram3": dict(auto_topk=False, top_k=2, n_gram=3),
}


def _model(n_gram: int = 1, **kwargs):
    torch.manual_seed(0)
    base = tiny_llama(seed=3, num_hidden_layers=1)  # one decoder layer: tracing time, not coverage, scales with depth
    model = get_peft_model(base, lime(lora(target_modules=TARGETS), n_gram=n_gram, **kwargs))
    with torch.no_grad():  # experts far from 1: a wrong route shows in the logits
        for module in model.modules():
            if isinstance(module, peft_lime.LimeLayer):
                for experts in module.lime_experts.values():
                    experts.weight.normal_()
                    experts.shared.normal_()
                    experts.gate.fill_(0.5)
    return model


def _lime_breaks(fn, *args) -> list[str]:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    return [
        f"{r.reason.splitlines()[0]} at {frame.filename}:{frame.lineno}"
        for r in explanation.break_reasons
        for frame in r.user_stack
        if frame.filename.startswith(PACKAGE)
    ]


@pytest.mark.slow  # about 10 s each: tracing a whole model
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_training_forward_has_no_graph_break_in_peft_lime(setting):
    model = _model(**SETTINGS[setting]).train()
    x = torch.randint(3, VOCAB, (2, 7))
    assert _lime_breaks(lambda ids: model(input_ids=ids, labels=ids).loss, x) == []


@pytest.mark.parametrize("n_gram", [1, 3])
def test_decode_step_with_dynamic_cache_has_no_graph_break_in_peft_lime(n_gram):
    model = _model(n_gram).eval()
    x = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=x[:, :6], cache=cache, use_cache=True)
        step = lambda ids: model(input_ids=ids, cache=cache, use_cache=True).logits  # noqa: E731
        assert _lime_breaks(step, x[:, 6:7]) == []


@pytest.mark.slow
@pytest.mark.parametrize("n_gram", [3])  # windows, padding mask, statistics and aux term inside one graph
def test_compiled_training_step_equals_eager(n_gram):
    eager, compiled = _model(n_gram, jitter_noise=0.0), _model(n_gram, jitter_noise=0.0)
    eager.train(), compiled.train()
    run = torch.compile(compiled, backend="aot_eager")
    torch._dynamo.reset()
    x = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding: the mask reaches the layers inside the compiled graph too
    from torch._dynamo.utils import counters

    graphs = []
    for _ in range(2):  # the second step runs the cached graph: nothing LiME created while tracing may re-trace it
        eager(input_ids=x, attention_mask=mask, labels=x).loss.backward()
        run(input_ids=x, attention_mask=mask, labels=x).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1] == graphs[0], f"recompiled on the second step: {graphs}"
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for name, param in compiled.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(peft_lime.get_aux_loss(compiled), peft_lime.get_aux_loss(eager), atol=1e-6, rtol=0)
    # the statistics recorded inside the compiled graph equal the eager ones
    got = peft_lime.get_routing_stats(compiled)["aggregate"]
    ref = peft_lime.get_routing_stats(eager)["aggregate"]
    for key in ("routing_entropy", "active_experts", "importance_loss", "kl_loss"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_compiled_steps_after_an_eager_step_do_not_recompile():
    """An eager step leaves routing statistics pending (folded in batches); the compiled step must not fold them
    while tracing, or its graph would be traced again on the next call."""
    from torch._dynamo.utils import counters

    model = _model(1, jitter_noise=0.0).train()
    torch._dynamo.reset()
    run = torch.compile(model, backend="aot_eager")
    x = torch.randint(3, VOCAB, (2, 7))
    model(input_ids=x, labels=x).loss.backward()
    assert any(len(m.lime_stats["default"]._pending) for m in model.modules() if isinstance(m, peft_lime.LimeLayer))
    graphs = []
    for _ in range(2):
        run(input_ids=x, labels=x).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1] == graphs[0], f"recompiled on the second compiled step: {graphs}"
    layers = peft_lime.get_routing_stats(model)["layers"]
    assert layers and all(stats["tokens"] == 3 * x.numel() for stats in layers.values())  # 1 eager + 2 compiled


@pytest.mark.slow
@pytest.mark.parametrize("n_gram, ngram_mode", [(1, "causal"), (3, "causal"), (3, "prefix")])
def test_static_cache_compiled_generate_equals_eager_logits(n_gram, ngram_mode):
    from transformers import CompileConfig

    model = _model(n_gram, ngram_mode=ngram_mode).eval()
    prompt = torch.randint(3, VOCAB, (2, 6))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    kwargs.update(output_logits=True, return_dict_in_generate=True)
    # fullgraph=True proves each decoding step is one graph: with n-gram windows too (the step reads whether the cache
    # holds tokens from a host-side flag, not from cache_position's value).
    config = CompileConfig(backend="aot_eager", fullgraph=True)
    config._compile_all_devices = True  # transformers compiles automatically on accelerators only
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model.generate(input_ids=prompt, **kwargs)
        # Any recompilation raises: every decoding step, and a second generate on the reset cache, reuse the graphs.
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = model.generate(input_ids=prompt, cache_implementation="static", compile_config=config, **kwargs)
            again = model.generate(input_ids=prompt.flip(0), cache_implementation="static", compile_config=config,
                                   **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits, 1), torch.stack(eager.logits, 1), atol=1e-5, rtol=0)
    flipped = model.generate(input_ids=prompt.flip(0), **kwargs)
    torch.testing.assert_close(torch.stack(again.logits, 1), torch.stack(flipped.logits, 1), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_trainer_torch_compile_trains_like_eager(tmp_path):
    """Trainer(torch_compile=True): the same data and seed give the same adapter weights as an eager Trainer."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    data = [{"input_ids": torch.randint(3, VOCAB, (8,)).tolist()} for _ in range(8)]
    for row in data:
        row["labels"] = row["input_ids"]
    results = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _model(3, jitter_noise=0.0)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(compiled)),
            per_device_train_batch_size=4,
            max_steps=3,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=0,
            data_seed=0,
            torch_compile=compiled,
            torch_compile_backend="aot_eager" if compiled else None,
            use_cpu=True,
        )
        Trainer(model=model, args=args, train_dataset=data).train()
        results[compiled] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert results[True].keys() == results[False].keys()
    for name, value in results[False].items():
        assert not torch.equal(value, _model(3, jitter_noise=0.0).get_parameter(name)), f"{name} did not train"
        torch.testing.assert_close(results[True][name], value, atol=1e-4, rtol=1e-4, msg=name)
