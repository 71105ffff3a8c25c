"""Issue 23: ``ngram_mode="prefix"``: every token routes with the mean logits of its sequence's opening.

Checked against a loop written from the definition, and for what every LiME route must keep: batch / padding
invariance, packed sequences, cached decoding equal to a full forward (also beam search), save / load, with the
paper's router and with the centroid router. Tolerances: 1e-4 on logits (other matmul shapes), 1e-6 for the same
ops reordered.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import peft_lime
from peft_lime.prefix_pooling import prefix_mean

from ._models import VOCAB, lime, lora, scatter_experts, tiny_llama
from ._routing_checks import assert_cached_decoding_equals_full, assert_padding_invariant, assert_trains_and_reloads

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def naive_prefix_mean(logits: torch.Tensor, n: int, valid: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """The definition: a valid token averages the first n valid tokens of its own segment up to itself; a padding
    token keeps its own logits."""
    out = logits.clone()
    B, T, _ = logits.shape
    for b in range(B):
        for t in range(T):
            if not bool(valid[b, t]):
                continue
            opening = [s for s in range(t + 1) if bool(valid[b, s]) and int(segments[b, s]) == int(segments[b, t])]
            out[b, t] = logits[b, opening[:n]].mean(0)
    return out


def _layout(B: int = 3, T: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, 4, generator=gen)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :3] = False  # left padding
    valid[1, 6:] = False  # right padding
    segments = torch.zeros(B, T, dtype=torch.long)
    if B > 2:
        segments[2, 4:] = 1  # packed sequences: a second
        segments[2, 7:] = 2  # and a third
    return logits, valid, segments


@pytest.mark.parametrize("n", [1, 2, 4, 20])
def test_prefix_mean_equals_the_definition(n):
    logits, valid, segments = _layout()
    pooled, _, _ = prefix_mean(logits, n, valid=valid, segments=segments)
    torch.testing.assert_close(pooled, naive_prefix_mean(logits, n, valid, segments), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_continuing_with_the_kept_state_equals_one_call(n):
    """Prefill then one token at a time, carrying (sum, count), gives the one-call result for every token."""
    logits, valid, _ = _layout(B=2, T=10, seed=1)
    valid[1] = True
    whole, _, _ = prefix_mean(logits, n, valid=valid)
    first, s, c = prefix_mean(logits[:, :2], n, valid=valid[:, :2])
    parts = [first]
    for t in range(2, 10):
        step, s, c = prefix_mean(logits[:, t : t + 1], n, valid=valid[:, t : t + 1], past_sum=s, past_count=c)
        parts.append(step)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=1e-6)


def _batches(n: int = 3, rows: int = 4, length: int = 10, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (rows, length), generator=gen)} for _ in range(n)]


def _model(routing_mode: str, n_gram: int = 3, **kwargs):
    torch.manual_seed(0)
    config = lime(
        lora(target_modules=TARGETS),
        routing_mode=routing_mode,
        n_gram=n_gram,
        ngram_mode="prefix",
        temperature=0.2,
        **kwargs,
    )
    model = get_peft_model(tiny_llama(seed=3), config)
    scatter_experts(model, seed=2)
    if routing_mode == "centroid":
        peft_lime.fit_routing_centroids(model, _batches())
    return model.eval()


def _capture(model):
    captured = []
    layer = next(m for m in model.modules() if isinstance(m, peft_lime.LimeLayer))
    layer._context.weights_capture = lambda lay, adapter, w, layout: captured.append((lay, w))
    return layer, captured


@pytest.mark.parametrize("routing_mode", ["token", "centroid"])
def test_tokens_after_the_opening_share_its_route(routing_mode):
    model = _model(routing_mode, n_gram=3, auto_topk=False, top_k=2)
    layer, captured = _capture(model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB, (1, 8)))
    layer._context.weights_capture = None
    for _, w in captured:
        w = w.reshape(8, -1)
        torch.testing.assert_close(w[3:], w[2:3].expand(5, -1), rtol=0, atol=1e-6)
    first = [w.reshape(8, -1) for _, w in captured]
    assert any(not torch.allclose(w[0], w[2]) for w in first)  # the opening itself pools causally


@pytest.mark.parametrize("routing_mode", ["token", "centroid"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_and_padding_invariance(routing_mode, side):
    model = _model(routing_mode)
    assert_padding_invariant(model, side)


def test_packed_sequences_route_as_separate_sequences():
    model = _model("token")
    a, b = torch.randint(3, VOCAB, (5,)), torch.randint(3, VOCAB, (6,))
    position_ids = torch.cat([torch.arange(5), torch.arange(6)])[None]
    layer, captured = _capture(model)
    with torch.no_grad():
        model(input_ids=torch.cat([a, b])[None], position_ids=position_ids)
        n = len(captured)
        model(input_ids=b[None])
    layer._context.weights_capture = None
    torch.testing.assert_close(captured[0][1][5:], captured[n][1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("routing_mode", ["token", "centroid"])
@pytest.mark.parametrize("n_gram", [1, 3, 6])
def test_cached_decoding_equals_full_forward(routing_mode, n_gram):
    model = _model(routing_mode, n_gram=n_gram)
    assert_cached_decoding_equals_full(model)


def test_beam_search_scores_equal_a_full_forward():
    """Beam search reorders the cache rows: the kept opening state must follow, so each returned sequence's scores
    equal a fresh full forward over it."""
    model = _model("token", n_gram=4)
    prompt = torch.randint(3, VOCAB, (1, 3))
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            max_new_tokens=5,
            num_beams=3,
            num_return_sequences=3,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        seqs = out.sequences
        full = torch.log_softmax(model(input_ids=seqs).logits[:, 2:-1], dim=-1)
    chosen = full.gather(-1, seqs[:, 3:, None]).squeeze(-1).sum(-1)
    scores = out.sequences_scores * (seqs.shape[1] - 3)  # length penalty 1.0: mean log-prob over the new tokens
    torch.testing.assert_close(scores, chosen, atol=1e-3, rtol=0)


def test_training_step_and_save_load(tmp_path):
    model = _model("token")
    loaded = assert_trains_and_reloads(model, tmp_path, lambda: tiny_llama(seed=3))
    assert loaded.peft_config["default"].ngram_mode == "prefix"


def test_assisted_decoding_is_refused_even_with_n_gram_1():
    model = _model("token", n_gram=1)
    with pytest.raises(ValueError, match="ngram_mode='prefix'"):
        model.generate(input_ids=torch.randint(3, VOCAB, (1, 3)), max_new_tokens=2, prompt_lookup_num_tokens=2)


def test_centroid_fit_pools_the_opening():
    """The fit clusters pooled features, the router pools logits: the cosine logits are linear in the feature, so
    pooling then projecting equals projecting then pooling (the fit's features are the router's)."""
    logits = torch.nn.functional.normalize(torch.randn(2, 7, 5), dim=-1)
    C = torch.nn.functional.normalize(torch.randn(3, 5), dim=-1)
    pooled = prefix_mean(logits, 3)[0]
    torch.testing.assert_close(pooled @ C.T, prefix_mean(logits @ C.T, 3)[0], rtol=0, atol=1e-6)
