"""Cached decoding routes exactly like a full forward (spec section 3, item 2), for n_gram 1 and 3.

Tolerance 1e-4 in fp32: the cached path computes the same sums in another order (one token at a time).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import DynamicCache

from peft_lime import LimeLayer

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


# --- logits, not tokens: a wrong route must show ---------------------------------------------------------------------
# Experts far from 1 (weight = P - 1 ~ N(0, 1), shared vector on with gate 0.5): a token routed with the wrong window
# changes its logits by far more than the 1e-4 tolerance, while near-identical experts would hide it.


def _far_model(n_gram: int):
    model = _model(n_gram)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LimeLayer):
                for experts in module.lime_experts.values():
                    experts.weight.normal_(0.0, 1.0)
                    experts.shared.normal_(0.0, 1.0)
                    experts.gate.fill_(0.5)
    return model


@pytest.mark.parametrize("n_gram", [1, 3])
@pytest.mark.parametrize("cache_kwarg", ["cache", "past_key_values"])
def test_token_by_token_decoding_logits_under_either_cache_argument_name(n_gram, cache_kwarg):
    """transformers 5.24 passes the cache as ``cache=`` without ``cache_position``; older versions as
    ``past_key_values=``. Both must continue the sequence, not start a new one."""
    model = _far_model(n_gram)
    x = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        full = model(input_ids=x).logits
        cache = DynamicCache()
        steps = [model(input_ids=x[:, :4], use_cache=True, **{cache_kwarg: cache}).logits]
        for t in range(4, x.shape[1]):
            steps.append(model(input_ids=x[:, t : t + 1], use_cache=True, **{cache_kwarg: cache}).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_gram", [1, 3])
@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_step_logits_equal_a_full_forward_of_the_generated_tokens(n_gram, do_sample):
    model = _far_model(n_gram)
    prompt = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            max_new_tokens=10,
            do_sample=do_sample,
            pad_token_id=0,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full = model(input_ids=out.sequences).logits[:, prompt.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_gram", [1, 3])
def test_beam_search_scores_equal_a_full_forward_of_the_returned_beams(n_gram):
    """With length_penalty=0 a beam's score is the sum of its tokens' log-probabilities: recompute it uncached."""
    model = _far_model(n_gram)
    prompt = torch.randint(3, VOCAB, (2, 5))
    new = 6
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            num_beams=3,
            num_return_sequences=2,
            max_new_tokens=new,
            length_penalty=0.0,
            pad_token_id=0,
            eos_token_id=None,
            output_scores=True,
            return_dict_in_generate=True,
        )
        logprobs = torch.log_softmax(model(input_ids=out.sequences).logits.float(), dim=-1)
    tokens = out.sequences[:, prompt.shape[1] :]
    recomputed = logprobs[:, prompt.shape[1] - 1 : -1].gather(-1, tokens[..., None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, recomputed, atol=ATOL, rtol=0)


def test_prompt_lookup_decoding_with_ngram_windows_is_refused_up_front():
    model = _model(3)
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    with torch.no_grad(), pytest.raises(ValueError, match="n_gram=3.*prompt_lookup_num_tokens"):
        model.generate(input_ids=prompt, prompt_lookup_num_tokens=3, max_new_tokens=6, pad_token_id=0)


def test_prompt_lookup_decoding_works_with_single_token_routing():
    model = _model(1)
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assisted = model.generate(input_ids=prompt, prompt_lookup_num_tokens=3, **kwargs)
        plain = model.generate(input_ids=prompt, **kwargs)
    assert torch.equal(assisted, plain)
