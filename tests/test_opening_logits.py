"""The centroid router with prefix routing computes the opening's logits only (peft_lime/opening_logits.py).

Checked: the gathered positions against a loop over the definition; outputs, the loss and every gradient equal to
computing every token's logits (the pooled routes of valid tokens are the same numbers; 1e-5: other matmul shapes);
and the work itself, counted in rows given to the centroid logits: B x n in a training forward, none in a decoding
step once the openings are complete, one per row while an opening still fills.
"""

from __future__ import annotations

import pytest
import torch

import peft_lime
import peft_lime.layer as lime_layer
from peft_lime.opening_logits import opening_index

from ._models import VOCAB
from .test_prefix_routing import _batches, _model

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_opening(valid: torch.Tensor, n: int) -> list[list[int]]:
    return [[t for t in range(valid.shape[1]) if bool(valid[b, t])][:n] for b in range(valid.shape[0])]


@pytest.mark.parametrize("n", [1, 3, 5])
def test_opening_index_equals_the_definition(n):
    gen = torch.Generator().manual_seed(n)
    valid = torch.rand(6, 9, generator=gen) > 0.4
    valid[0] = True
    valid[1] = False  # no valid token
    valid[2, :6] = False  # left padding, fewer than n valid tokens for n = 5
    index, exists = opening_index(valid, 6, 9, n, valid.device)
    for b, opening in enumerate(naive_opening(valid, n)):
        assert index[b, : len(opening)].tolist() == opening
        assert exists[b].tolist() == [k < len(opening) for k in range(n)]


def _every_token(monkeypatch) -> None:
    monkeypatch.setattr(lime_layer, "opening_only_logits", lambda *args, **kwargs: None)


def _padded(side: str) -> dict[str, torch.Tensor]:
    ids = _batches(1, rows=3, length=11, seed=4)[0]["input_ids"]
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :4], mask[1, :9] = 0, 0  # row 1 keeps 2 valid tokens: fewer than n
    else:
        mask[0, 7:], mask[1, 2:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("side", ["left", "right"])
def test_eval_outputs_equal_computing_every_token(monkeypatch, side):
    model, batch = _model("centroid", n_gram=3), _padded(side)
    with torch.no_grad():
        fast = model(**batch).logits
        _every_token(monkeypatch)
        full = model(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(fast[valid], full[valid], rtol=0, atol=1e-5)


def test_training_loss_and_gradients_equal_computing_every_token(monkeypatch):
    model = _model("centroid", n_gram=3, jitter_noise=0.0).train()
    batch = _padded("right")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fast_loss, fast = grads()
    _every_token(monkeypatch)
    full_loss, full = grads()
    torch.testing.assert_close(fast_loss, full_loss, rtol=0, atol=1e-5)
    assert fast.keys() == full.keys() and len(fast) > 0
    for name in fast:
        torch.testing.assert_close(fast[name], full[name], rtol=0, atol=1e-5, msg=name)


def _count_rows(monkeypatch) -> list[int]:
    rows: list[int] = []
    original = lime_layer.centroid_logits

    def counted(h, *args, **kwargs):
        rows.append(h.numel() // h.shape[-1])
        return original(h, *args, **kwargs)

    monkeypatch.setattr(lime_layer, "centroid_logits", counted)
    return rows


def test_training_forward_computes_the_openings_only(monkeypatch):
    model = _model("centroid", n_gram=3, jitter_noise=0.0).train()
    layers = sum(isinstance(m, peft_lime.LimeLayer) for m in model.modules())
    rows = _count_rows(monkeypatch)
    ids = torch.randint(3, VOCAB, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert rows == [2 * 3] * layers  # B x n of B x T = 24 tokens per layer


@pytest.mark.parametrize("prompt_length, computing_steps", [(6, 0), (1, 2)])
def test_decoding_computes_nothing_once_the_openings_are_complete(monkeypatch, prompt_length, computing_steps):
    """n = 3: a 6-token prompt completes every opening; a 1-token prompt needs two decoded tokens to complete it."""
    model = _model("centroid", n_gram=3)
    layers = sum(isinstance(m, peft_lime.LimeLayer) for m in model.modules())
    prompt = torch.randint(3, VOCAB, (2, prompt_length))
    rows = _count_rows(monkeypatch)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    kwargs.update(output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(input_ids=prompt, **kwargs)
        assert rows[:layers] == [2 * min(prompt_length, 3)] * layers  # the prefill: the openings only
        assert rows[layers:] == [2] * layers * computing_steps  # one row per sequence per step while an opening fills
        full = model(input_ids=out.sequences).logits  # and the decoded logits still equal a full forward's
    decoded = torch.stack(out.logits, 1)
    torch.testing.assert_close(decoded, full[:, prompt_length - 1 : -1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_position_ids_gather_unless_rows_are_packed(monkeypatch, packed):
    """Position ids make segments: one sequence per row still gathers its opening; packed rows take every token."""
    model = _model("centroid", n_gram=3)
    layers = sum(isinstance(m, peft_lime.LimeLayer) for m in model.modules())
    ids = torch.randint(3, VOCAB, (2, 11))
    positions = torch.arange(11).expand(2, 11).clone()
    if packed:
        positions[1, 5:] = torch.arange(6)  # row 1 packs two sequences
    rows = _count_rows(monkeypatch)
    with torch.no_grad():
        fast = model(input_ids=ids, position_ids=positions).logits
        _every_token(monkeypatch)
        full = model(input_ids=ids, position_ids=positions).logits
    assert rows[:layers] == [2 * 11 if packed else 2 * 3] * layers
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)
