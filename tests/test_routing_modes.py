"""Issue 23: routing ablations (``routing_mode`` uniform / task / task_learned) and the balance schedule
(``balance_interval``), each against its written definition.

Tolerances: 1e-6 where both sides run the same fp32 ops in another order (the layer's fused modulation vs the
formula written out here).
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_lime
from peft_lime import LimeConfig, native_route, routing

from ._models import VOCAB, lime, lora, scatter_experts, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "up_proj"]
STRONG = dict(importance_loss_coef=1.0, kl_loss_coef=0.1)


def _model(**overrides):
    model = get_peft_model(tiny_llama(seed=0), lime(lora(target_modules=TARGETS), **overrides))
    scatter_experts(model, seed=1)
    peft_lime.enable_task_ids(model)
    return model


def _lime_layers(model) -> list[peft_lime.LimeLayer]:
    return [m for m in model.modules() if isinstance(m, peft_lime.LimeLayer)]


def _naive_output(layer: peft_lime.LimeLayer, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """h + delta * (sum_i w_i p_i + g p_s), written out: LoRA's delta, experts stored as P - 1."""
    lora_layer = layer.base_layer
    h = lora_layer.get_base_layer()(x)
    delta = lora_layer.lora_B["default"](lora_layer.lora_A["default"](x)) * lora_layer.scaling["default"]
    experts = layer.lime_experts["default"]
    P = experts.weight + 1.0
    modulation = weights @ P + experts.gate * experts.shared
    return h + delta * modulation.reshape(*h.shape[:-1], -1)


def _captured(model, task_ids: torch.Tensor, train: bool = False):
    """(layer, input, output) of every LiME layer in one forward with task ids."""
    seen = []
    hooks = [
        layer.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0].detach(), out.detach())))
        for layer in _lime_layers(model)
    ]
    model.train(train)
    input_ids = torch.randint(3, VOCAB, (len(task_ids), 7), generator=torch.Generator().manual_seed(0))
    model(input_ids=input_ids, task_ids=task_ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("mode", ["uniform", "task", "task_learned"])
@pytest.mark.parametrize("train", [False, True])
def test_mode_equals_naive_definition(mode, train):
    extra = {"num_tasks": 3} if mode == "task_learned" else {}
    model = _model(routing_mode=mode, **extra)
    E = 4
    task_ids = torch.tensor([2, 0, 1])
    if mode == "task_learned":  # far from the zero init, so that a wrong row of the table shows
        with torch.no_grad():
            for layer in _lime_layers(model):
                layer.lime_experts["default"].task_logits.normal_(generator=torch.Generator().manual_seed(5))
    seen = _captured(model, task_ids, train)
    assert len(seen) == 2 * len(TARGETS)
    for layer, x, out in seen:
        tokens = task_ids.repeat_interleave(x.shape[1])
        if mode == "uniform":
            w = torch.full((tokens.numel(), E), 1.0 / E)
        elif mode == "task":
            w = torch.eye(E)[tokens % E]
        else:
            w = torch.softmax(layer.lime_experts["default"].task_logits, -1)[tokens]
        torch.testing.assert_close(out, _naive_output(layer, x, w.detach()), rtol=0, atol=1e-6)


def test_task_modes_need_task_ids_and_valid_ids():
    model = _model(routing_mode="task")
    with pytest.raises(ValueError, match="routing_mode='task'.*enable_task_ids"):
        model(input_ids=torch.randint(3, VOCAB, (2, 5)))
    learned = _model(routing_mode="task_learned", num_tasks=2)
    with pytest.raises(ValueError, match=r"task_ids: .*num_tasks=2.*\[0, 1\]"):
        learned(input_ids=torch.randint(3, VOCAB, (2, 5)), task_ids=torch.tensor([0, 2]))


def test_task_learned_trains_saves_and_loads(tmp_path):
    model = _model(routing_mode="task_learned", num_tasks=3).train()
    input_ids = torch.randint(3, VOCAB, (2, 6))
    model(input_ids=input_ids, labels=input_ids, task_ids=torch.tensor([0, 2])).loss.backward()
    layer = _lime_layers(model)[0]
    grad = layer.lime_experts["default"].task_logits.grad
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert torch.equal(grad[1], torch.zeros(4))  # task 1 was not in the batch
    # trainable count by formula: per layer E * d (experts) + d + 1 (shared, gate) + num_tasks * E (task logits)
    lora_count = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    lime_count = sum(layer.out_features * 4 + layer.out_features + 1 + 3 * 4 for layer in _lime_layers(model))
    assert model.get_nb_trainable_parameters()[0] == lora_count + lime_count
    with torch.no_grad():
        layer.lime_experts["default"].task_logits.normal_()
    model.eval()
    task_ids = torch.tensor([1, 2])
    before = model(input_ids=input_ids, task_ids=task_ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    peft_lime.enable_task_ids(loaded)
    torch.testing.assert_close(loaded(input_ids=input_ids, task_ids=task_ids).logits, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"routing_mode": "oracle"}, "routing_mode"),
        ({"routing_mode": "task_learned"}, "num_tasks"),
        ({"routing_mode": "task_learned", "num_tasks": 0}, "num_tasks"),
        ({"balance_interval": 0}, "balance_interval"),
        ({"balance_interval": 2.5}, "balance_interval"),
        ({"balance_interval": 50, "balance_scope": "global"}, "balance_interval"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        LimeConfig(base=lora(), **kwargs)


def _aux_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (model(**batch).logits * 0.0).sum().backward()
    return {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def test_balance_interval_gradient_equals_formula(monkeypatch):
    """balance_interval=3: micro-batches 1 and 4 get the full balance gradient, 2 and 3 none."""
    batch = {"input_ids": torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))}
    model = _model(balance_interval=3, jitter_noise=0.0, **STRONG).train()
    got = [_aux_grads(model, batch) for _ in range(4)]

    calls = []
    balance_terms = routing.balance_terms

    def spy(probs, valid):
        calls.append((probs, valid))
        return balance_terms(probs, valid)

    monkeypatch.setattr(routing, "balance_terms", spy)
    monkeypatch.setattr(peft_lime.layer, "inject_aux_loss", lambda activations, aux, scale=1.0: activations)
    monkeypatch.setattr(native_route, "_enabled", False)  # the reference: routing.py's ops, balance_terms spied on
    reference = _model(jitter_noise=0.0, **STRONG).train()
    reference(**batch)
    expected = sum((1.0 * imp + 0.1 * kl) / len(calls) for imp, kl, _ in (balance_terms(p, v) for p, v in calls))
    names = list(got[0])
    want = torch.autograd.grad(expected, [reference.get_parameter(n) for n in names], allow_unused=True)
    want = {n: torch.zeros_like(reference.get_parameter(n)) if g is None else g for n, g in zip(names, want)}
    assert max(g.abs().max().item() for g in want.values()) > 1e-2
    for step, grads in enumerate(got):
        due = step % 3 == 0
        for n in names:
            torch.testing.assert_close(grads[n], want[n] if due else torch.zeros_like(want[n]), rtol=0, atol=1e-6)
