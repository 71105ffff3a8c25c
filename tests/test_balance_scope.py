"""Issue 15: ``balance_scope="global"``: load balance over the accumulation window and all data-parallel ranks.

Data parallelism is simulated in one process by replacing ``balance.data_parallel_sum`` (the one all-reduce): rank A
is handed rank B's detached sums, recorded by a first pass. The real 2-rank DDP run (gloo, torchrun) is the slow test
at the end. Tolerances: 1e-6 where both sides run the same fp32 ops (at most reassociated); 1e-5 where a merged
batch is compared with its parts (other matmul shapes, so other summation orders through the whole model).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model

import peft_lime
from peft_lime import LimeConfig, balance, native_route, routing

from ._models import VOCAB, lime, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "up_proj"]
STRONG = dict(importance_loss_coef=1.0, kl_loss_coef=0.1)  # the balance gradient is then well above float noise


# --- helpers ----------------------------------------------------------------------------------------------------------
def _model(scope: str = "global", **overrides):
    """Tiny Llama + LiME (4 experts on q / v / up), experts far from 1 so that later layers' routes depend on them."""
    from ._models import lora, scatter_experts

    overrides = {"jitter_noise": 0.0, **STRONG, **overrides}
    model = get_peft_model(tiny_llama(seed=0), lime(lora(target_modules=TARGETS), balance_scope=scope, **overrides))
    scatter_experts(model, seed=1)
    return model.train()


def _batch(seed: int, rows: int = 2, length: int = 10, pad: int = 3) -> dict[str, torch.Tensor]:
    """Random tokens; row 0 is left-padded and the last row right-padded by ``pad`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    mask = torch.ones_like(input_ids)
    mask[0, :pad] = 0
    mask[-1, length - pad :] = 0
    return {"input_ids": input_ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _merge(*batches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _aux_only_backward(model, batch) -> None:
    """Forward and backward of a zero LM loss: every gradient is the injected balance gradient."""
    (model(**batch).logits * 0.0).sum().backward()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _lime_layers(model) -> list[peft_lime.LimeLayer]:
    return [m for m in model.modules() if isinstance(m, peft_lime.LimeLayer)]


def _window_tokens(model) -> list[float]:
    """Tokens in the balance window of every LiME layer (0 for a closed window)."""
    out = []
    for layer in _lime_layers(model):
        sums = balance.window_of(layer, "default").sums
        out.append(0.0 if sums is None else float(sums[-1]))
    return out


def _valid_tokens(*batches) -> float:
    return float(sum(b["attention_mask"].sum() for b in batches))


# --- 1. config ----------------------------------------------------------------------------------------------------
def test_config_default_and_validation():
    assert lime().balance_scope == "micro_batch"
    assert lime(balance_scope="global").balance_scope == "global"
    for bad in ("batch", "Global", "", None, 1):
        with pytest.raises(ValueError, match="balance_scope"):
            lime(balance_scope=bad)


def test_config_save_load_round_trip_and_old_config(tmp_path):
    lime(balance_scope="global").save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert saved["balance_scope"] == "global"
    assert PeftConfig.from_pretrained(tmp_path / "new").balance_scope == "global"
    # An adapter_config.json written before the field existed loads with today's behaviour.
    saved.pop("balance_scope")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(saved))
    assert LimeConfig.from_pretrained(tmp_path / "old").balance_scope == "micro_batch"
    # A whole model: the layers route with the saved scope.
    model = _model("global")
    model.save_pretrained(tmp_path / "model")
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "model")
    assert {layer.lime_routing["default"].balance_scope for layer in _lime_layers(loaded)} == {"global"}


# --- 2. micro_batch scope: today's gradients ----------------------------------------------------------------------
def test_micro_batch_scope_is_routing_balance_terms(monkeypatch):
    """The injected gradient is that of sum_layers (c_imp * importance + c_kl * kl) / layers from balance_terms.

    The reference is taken with injection switched off: a later layer's term depends on earlier layers' outputs, and
    differentiating it through their injection nodes would add their terms a second time.
    """
    batch = _batch(0)
    model = _model("micro_batch", jitter_noise=0.1)
    torch.manual_seed(3)
    _aux_only_backward(model, batch)
    got = _grads(model)

    calls = []
    balance_terms = routing.balance_terms

    def spy(probs, valid):
        calls.append((probs, valid))
        return balance_terms(probs, valid)

    monkeypatch.setattr(routing, "balance_terms", spy)
    monkeypatch.setattr(peft_lime.layer, "inject_aux_loss", lambda activations, aux, scale=1.0: activations)
    # The reference takes routing.py's ops (native library off), so balance_terms is the function spied on; the
    # model above may have taken the native kernels (native_balance.py), which must give the same gradients.
    monkeypatch.setattr(native_route, "_enabled", False)
    reference = _model("micro_batch", jitter_noise=0.1)
    torch.manual_seed(3)  # the same jitter
    reference(**batch)
    assert len(calls) == 2 * len(TARGETS)
    expected = sum((1.0 * imp + 0.1 * kl) / len(calls) for imp, kl, _ in (balance_terms(p, v) for p, v in calls))
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    want = torch.autograd.grad(expected, [reference.get_parameter(n) for n in names], allow_unused=True)
    want = {n: torch.zeros_like(reference.get_parameter(n)) if g is None else g for n, g in zip(names, want)}
    torch.testing.assert_close(peft_lime.get_aux_loss(model), expected.detach(), rtol=0, atol=1e-7)
    assert max(g.abs().max().item() for g in want.values()) > 1e-2  # the balance gradient is not trivial
    assert _max_diff(got, want) < 1e-6
    assert _window_tokens(model) == [0.0] * len(calls)  # the micro_batch scope never opens a window


# --- 3. single process, no accumulation ---------------------------------------------------------------------------
def test_global_equals_micro_batch_without_accumulation_or_ranks():
    """One process, one micro-batch per step: the global batch IS the micro-batch (jitter on: same seed, same noise)."""
    batch = _batch(0)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    grads, aux = {}, {}
    for scope in ("micro_batch", "global"):
        model = _model(scope, jitter_noise=0.1)
        torch.manual_seed(7)
        model(**batch, labels=labels).loss.backward()
        grads[scope], aux[scope] = _grads(model), peft_lime.get_aux_loss(model)
        balance.reset_balance_window(model)
    assert aux["global"] > 1e-2
    torch.testing.assert_close(aux["global"], aux["micro_batch"], rtol=0, atol=1e-6)
    assert _max_diff(grads["global"], grads["micro_batch"]) < 1e-6


# --- 4. data parallel, simulated in one process -------------------------------------------------------------------
def _fake_rank_runs(monkeypatch, batches: list[dict]) -> tuple[list[dict], list[torch.Tensor]]:
    """Aux-only gradients and logged aux of each simulated rank, every rank seeing the others' detached sums."""
    recorded: list[list[torch.Tensor]] = []
    for batch in batches:  # pass 1: each rank's local (E + 1) sums, in call order
        calls: list[torch.Tensor] = []
        monkeypatch.setattr(balance, "data_parallel_sum", lambda local, calls=calls: (calls.append(local) or local, 1))
        with torch.no_grad():
            _model("global")(**batch)
        recorded.append(calls)
    grads, aux = [], []
    for rank, batch in enumerate(batches):  # pass 2: the all-reduce returns the sum over every rank
        others = [iter(r) for i, r in enumerate(recorded) if i != rank]

        def all_reduce(local, others=others):
            return local + sum(next(it) for it in others), len(batches)

        monkeypatch.setattr(balance, "data_parallel_sum", all_reduce)
        model = _model("global")
        _aux_only_backward(model, batch)
        grads.append(_grads(model))
        aux.append(peft_lime.get_aux_loss(model))
        balance.reset_balance_window(model)
    monkeypatch.undo()
    return grads, aux


def test_data_parallel_average_equals_merged_batch(monkeypatch):
    """DDP averages the ranks' gradients: with the world-size factor that average is the merged batch's gradient."""
    batches = [_batch(10), _batch(11, pad=5)]  # different padding: ranks hold different numbers of valid tokens
    grads, aux = _fake_rank_runs(monkeypatch, batches)
    merged = _model("global")
    _aux_only_backward(merged, _merge(*batches))
    want = _grads(merged)
    averaged = {n: (grads[0][n] + grads[1][n]) / 2 for n in want}
    assert max(g.abs().max().item() for g in want.values()) > 1e-3
    assert _max_diff(averaged, want) < 1e-5
    for value in aux:  # every rank logs the global term
        torch.testing.assert_close(value, peft_lime.get_aux_loss(merged), rtol=0, atol=1e-5)
    # The micro_batch scope balances each rank on its own: its averaged gradient is not the merged batch's.
    local_grads, local_aux = [], []
    for batch in batches:
        model = _model("micro_batch")
        _aux_only_backward(model, batch)
        local_grads.append(_grads(model))
        local_aux.append(peft_lime.get_aux_loss(model))
    local_avg = {n: (local_grads[0][n] + local_grads[1][n]) / 2 for n in want}
    assert _max_diff(local_avg, want) > 1e-3
    assert min(local_aux) > peft_lime.get_aux_loss(merged) + 1e-3  # each rank alone looks less balanced


@pytest.mark.parametrize("reentrant", [True, False])
def test_one_all_reduce_per_layer_call_and_none_when_recomputing(monkeypatch, reentrant):
    """Checkpointing recomputes the forward inside backward: it reuses the forward's statistics."""
    sizes = []
    forward = balance.data_parallel_sum
    monkeypatch.setattr(balance, "data_parallel_sum", lambda local: (sizes.append(local.numel()), forward(local))[1])
    batch = _batch(0)
    grads = {}
    for ckpt in (False, True):
        model = _model("global")
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()  # reentrant checkpointing needs inputs that require grad
        sizes.clear()
        _aux_only_backward(model, batch)
        assert sizes == [4 + 1] * 2 * len(TARGETS)  # one (E + 1) all-reduce per layer call, none in the recompute
        grads[ckpt] = _grads(model)
        balance.reset_balance_window(model)
    assert _max_diff(grads[False], grads[True]) < 1e-6


# --- 5. accumulation window ---------------------------------------------------------------------------------------
def test_window_last_micro_batch_sees_the_whole_window_and_closes_at_optimizer_step():
    first, second, third = _batch(20), _batch(21, pad=1), _batch(22, pad=4)
    merged = _model("micro_batch")  # one big batch (its own micro-batch term is the global one)
    with torch.no_grad():
        merged(**_merge(first, second))
    big_batch_aux = peft_lime.get_aux_loss(merged)

    model = _model("global")
    own = _model("micro_batch")  # the same weights (same seeds): each micro-batch's own term
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    peft_lime.set_aux_loss_scale(model, 0.5)
    _aux_only_backward(model, first)
    with torch.no_grad():
        own(**first)
    torch.testing.assert_close(peft_lime.get_aux_loss(model), peft_lime.get_aux_loss(own), rtol=0, atol=1e-6)
    _aux_only_backward(model, second)
    assert _window_tokens(model)[0] == _valid_tokens(first, second)
    torch.testing.assert_close(peft_lime.get_aux_loss(model), big_batch_aux, rtol=0, atol=1e-5)
    with torch.no_grad():
        own(**second)
    assert abs(peft_lime.get_aux_loss(model) - peft_lime.get_aux_loss(own)) > 1e-3  # not the micro-batch's own term

    # The step hook was installed by the first global forward, once per process.
    hook = balance._STEP_HOOK
    balance.ensure_step_hook()
    assert hook is not None and balance._STEP_HOOK is hook
    opt.step()  # a real optimizer step closes every window
    assert _window_tokens(model) == [0.0] * 2 * len(TARGETS)
    _aux_only_backward(model, third)
    assert _window_tokens(model)[0] == _valid_tokens(third)
    # Custom loops without a torch.optim step close it by hand.
    _aux_only_backward(model, first)
    assert _window_tokens(model)[0] == _valid_tokens(third, first)
    peft_lime.reset_balance_window(model)
    assert _window_tokens(model) == [0.0] * 2 * len(TARGETS)


def test_accumulated_window_of_identical_micro_batches_equals_one_batch():
    """Per-token weights: two identical micro-batches at aux scale 1/2 give one micro-batch's gradient at scale 1.

    This is why each micro-batch's gradient is normalised by its own global token count: normalising by the window's
    count so far would give the second micro-batch half its weight (0.75 of the expected gradient in total).
    """
    batch = _batch(30)
    single = _model("global")
    _aux_only_backward(single, batch)
    balance.reset_balance_window(single)
    model = _model("global")
    peft_lime.set_aux_loss_scale(model, 0.5)
    _aux_only_backward(model, batch)
    _aux_only_backward(model, batch)
    assert _window_tokens(model)[0] == 2 * _valid_tokens(batch)
    assert _max_diff(_grads(model), _grads(single)) < 1e-6
    balance.reset_balance_window(model)


def test_inference_mode_forward_stays_out_of_the_window():
    model = _model("global")
    with torch.inference_mode():
        model(**_batch(40))
    assert _window_tokens(model) == [0.0] * 2 * len(TARGETS)
    _aux_only_backward(model, _batch(41))  # a window opened afterwards trains normally
    assert _window_tokens(model)[0] == _valid_tokens(_batch(41))
    balance.reset_balance_window(model)


def _one_task_micro_batches() -> tuple[torch.Tensor, torch.Tensor]:
    """Two micro-batches of logits (8 tokens, 4 experts): the first routes to experts 0 / 1, the second to 2 / 3,
    each symmetric in its pair, so the merged routing is exactly uniform while each micro-batch alone is not."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 4, generator=gen) + torch.tensor([2.0, 2.0, -2.0, -2.0])
    first = torch.cat([logits, logits[:, [1, 0, 3, 2]]])
    return first, first[:, [2, 3, 0, 1]].clone()


def test_single_task_micro_batches_are_balanced_over_the_window_only():
    first, second = _one_task_micro_batches()
    owner = torch.nn.Module()  # the window's key (a LiME layer in a model)
    terms = {}
    for scope in ("micro_batch", "global"):
        for name, logits in (("first", first), ("second", second)):
            logits = logits.clone().requires_grad_(True)
            probs = torch.softmax(logits, -1)
            if scope == "global":
                importance, kl = balance.global_balance_terms(owner, "default", probs, None)
            else:
                importance, kl, _ = routing.balance_terms(probs, None)
            (importance + kl).backward()
            terms[scope, name] = (importance.item(), kl.item(), logits.grad.abs().max().item())
    balance.reset_balance_window(owner)
    # Each micro-batch alone is far from uniform: the micro_batch scope pushes both hard towards uniform routing.
    for name in ("first", "second"):
        importance, kl, grad = terms["micro_batch", name]
        assert importance > 0.8 and kl > 0.5 and grad > 0.02, terms
    # Global: the first micro-batch is the whole window so far (same as micro_batch); with the second the window's
    # routing is uniform, the term is 0 and so is its push on the second micro-batch's logits.
    assert terms["global", "first"] == pytest.approx(terms["micro_batch", "first"], abs=1e-6)
    importance, kl, grad = terms["global", "second"]
    assert abs(importance) < 1e-6 and abs(kl) < 1e-6 and grad < 1e-6, terms


def test_trainer_closes_the_window_at_each_optimizer_step(tmp_path):
    """transformers' Trainer with accumulation 2: no user action; the window holds exactly the step's micro-batches."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from .test_training import _common_args, _lm_collator, _token_dataset

    model = get_peft_model(tiny_llama(0), lime(balance_scope="global", jitter_noise=0.0))
    seen: list[float] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(float(kwargs["attention_mask"].sum())) if m.training else None,
        with_kwargs=True,
    )
    windows: list[tuple[float, float, float]] = []

    class Probe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            windows.append((_window_tokens(model)[0], sum(seen)))
            seen.clear()

        def on_optimizer_step(self, args, state, control, **kwargs):
            windows[-1] += (_window_tokens(model)[0],)

    args = _common_args(str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=_token_dataset(),
        data_collator=_lm_collator(),
        callbacks=[Probe()],
    ).train()
    assert len(windows) == 2
    for before_step, step_tokens, after_step in windows:
        assert before_step == step_tokens > 0 and after_step == 0.0, windows


# --- 6. two real ranks --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_ranks_update_equals_one_rank_on_merged_batch(tmp_path):
    from .distributed_worker import BALANCE_LR, balance_batch, balance_model, balance_step, trainable_params
    from .test_distributed import TORCHRUN, launch

    if not torch.distributed.is_available() or not TORCHRUN.exists():
        pytest.skip("needs torch.distributed and torchrun")
    report = launch("balance_global", tmp_path)
    assert report["world_size"] == 2
    assert report["reduce_calls"] == [2] * report["lime_layers"]  # one all-reduce per layer call, over 2 ranks
    assert report["windows_open_after_step"] == 0
    got = torch.load(tmp_path / "balance.pt")

    merged = _merge(balance_batch(0), balance_batch(1))
    model = balance_model(seed=0)
    before = trainable_params(model)
    balance_step(model, merged)
    want = trainable_params(model)
    assert got.keys() == want.keys()
    assert _max_diff(got, before) > 1e-2  # the step moved the parameters
    assert _max_diff(got, want) < 1e-5
    aux = peft_lime.get_aux_loss(model).item()
    assert report["aux_per_rank"] == pytest.approx([aux, aux], abs=1e-5)

    # Not vacuous: per-rank balance (micro_batch scope), averaged as DDP would, gives another update.
    grads = []
    for rank in (0, 1):
        local = balance_model(seed=0, scope="micro_batch").train()
        local(**balance_batch(rank)).loss.backward()
        grads.append({n: p.grad for n, p in local.named_parameters() if p.requires_grad})
    ddp_local = {n: before[n] - BALANCE_LR * (grads[0][n] + grads[1][n]) / 2 for n in before}
    assert _max_diff(ddp_local, want) > 1e-4
