"""Cached decoding routes exactly like a full forward (spec section 3, item 2), for n_gram 1 and 3.

Tolerance 1e-4 in fp32: the cached path computes the same sums in another order (one token at a time).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import DynamicCache

from ._models import VOCAB, lime, lora, tiny_llama

ATOL = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(n_gram: int, **kwargs):
    torch.manual_seed(0)
    return get_peft_model(tiny_llama(seed=5), lime(lora(target_modules=TARGETS), n_gram=n_gram, **kwargs)).eval()


@pytest.mark.parametrize("n_gram", [1, 3])
def test_token_by_token_decoding_with_cache_reproduces_full_forward(n_gram):
    model = _model(n_gram)
    x = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        full = model(input_ids=x).logits
        prompt = 4
        cache = DynamicCache()
        out = model(input_ids=x[:, :prompt], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(prompt, x.shape[1]):
            out = model(input_ids=x[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_gram", [1, 3])
def test_greedy_generate_same_tokens_with_and_without_cache(n_gram):
    model = _model(n_gram)
    prompt = torch.randint(3, VOCAB, (1, 6))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=prompt, use_cache=False, **kwargs)
        again = model.generate(input_ids=prompt, use_cache=True, **kwargs)  # routing state reset between calls
    assert cached.shape[1] == 6 + 12
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, again)


@pytest.mark.parametrize("n_gram", [1, 3])
def test_left_padded_batch_generation_matches_each_prompt_alone(n_gram):
    model = _model(n_gram)
    a = torch.randint(3, VOCAB, (4,))
    b = torch.randint(3, VOCAB, (7,))
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0, 3:], mask[0, 3:] = a, 1
    ids[1], mask[1] = b, 1
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        alone_a = model.generate(input_ids=a[None], **kwargs)
        alone_b = model.generate(input_ids=b[None], **kwargs)
    assert torch.equal(batched[0, 7:], alone_a[0, 4:])
    assert torch.equal(batched[1, 7:], alone_b[0, 7:])


@pytest.mark.parametrize("n_gram", [1, 3])
def test_beam_search_windows_follow_the_reordered_cache(n_gram):
    """Beam search reorders the KV cache every step; the kept routing windows must be reordered with it."""
    model = _model(n_gram)
    prompt = torch.randint(3, VOCAB, (2, 5))
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=prompt, use_cache=False, **kwargs)
    assert cached.shape == (4, 11)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("method", ["reorder_cache", "batch_select_indices"])
def test_windows_follow_rows_selected_from_the_cache(method):
    """What beam / contrastive search do between steps, done by hand: decoding must equal the full forward."""
    model = _model(3)
    x = torch.randint(3, VOCAB, (3, 7))
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        out = model(input_ids=x[:, :6], past_key_values=DynamicCache(), use_cache=True)
        getattr(out.past_key_values, method)(order)
        step = model(input_ids=x[order, 6:7], past_key_values=out.past_key_values, use_cache=True).logits
        full = model(input_ids=x[order]).logits[:, 6:7]
    torch.testing.assert_close(step, full, atol=ATOL, rtol=0)


def test_cropped_cache_with_ngram_windows_raises_a_clear_error():
    """Assisted decoding crops the cache; the windows cannot be rebuilt, so the next step must refuse to guess."""
    model = _model(3)
    x = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        out = model(input_ids=x, past_key_values=DynamicCache(), use_cache=True)
        out.past_key_values.crop(-2)
        with pytest.raises(RuntimeError, match="cropped"):
            model(input_ids=x[:, 6:7], past_key_values=out.past_key_values, use_cache=True)
