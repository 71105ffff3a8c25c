"""Checks every LiME route must pass on a tiny causal LM, shared by the routing-mode test files.

Tolerance 1e-4 on logits (as tests/test_generation.py: other matmul shapes, other summation orders).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from ._models import VOCAB

ATOL = 1e-4


def assert_padding_invariant(model: Any, side: str) -> None:
    """A short sample padded on ``side`` inside a batch gives the logits it gives alone."""
    short, longer = torch.randint(3, VOCAB, (6,)), torch.randint(3, VOCAB, (11,))
    ids = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    if side == "left":
        ids[0, 5:], mask[0, 5:] = short, 1
    else:
        ids[0, :6], mask[0, :6] = short, 1
    ids[1], mask[1] = longer, 1
    with torch.no_grad():
        alone = model(input_ids=short[None]).logits[0]
        batched = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(batched[0][mask[0].bool()], alone, atol=ATOL, rtol=0)


def assert_cached_decoding_equals_full(model: Any) -> None:
    """A 4-token prefill then one token per cached step gives the logits of one full forward."""
    x = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        full = model(input_ids=x).logits
        out = model(input_ids=x[:, :4], past_key_values=DynamicCache(), use_cache=True)
        steps = [out.logits]
        for t in range(4, x.shape[1]):
            out = model(input_ids=x[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def assert_trains_and_reloads(model: Any, tmp_path: Any, fresh_base: Any) -> Any:
    """One training step reaches every expert tensor (finite, non-zero gradient); save / load keeps the logits (1e-5).
    ``fresh_base()`` builds the base model again; returns the loaded PeftModel."""
    from peft import PeftModel

    model.train()
    ids = torch.randint(3, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lime_experts" in n and p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh_base(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    return loaded
