"""Regressions of issue 24, encoder-decoders: n-gram routing windows of decoder tokens during cached generation.

The encoder's tokens (input_ids / attention_mask) are not the decoder's (decoder_input_ids, their mask and cache), and
cross-attention projections run on encoder states: cached decoding must route every decoder token exactly as a
teacher-forced forward does. Tiny models (width 32, 2 + 2 layers) built offline, experts scattered far from 1.

Tolerance 1e-4 in float32: the cached path computes the same sums in another order (one token at a time).
"""

from __future__ import annotations

import pytest
import torch

from ._models import VOCAB
from .test_arch_regressions import ATOL, BOS, EOS, PAD, _lime_model, _step_logits

pytestmark = pytest.mark.usefixtures("one_thread")

_SEQ2SEQ = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=PAD, **_SEQ2SEQ)
    return _lime_model(T5ForConditionalGeneration(config).eval(), "all-linear")


def _bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        decoder_start_token_id=BOS,
        forced_eos_token_id=None,
        **_SEQ2SEQ,
    )
    return _lime_model(BartForConditionalGeneration(config).eval(), ["fc1", "fc2"])


@pytest.mark.parametrize("build", [_t5, _bart], ids=["t5-all-linear", "bart-fc"])
def test_seq2seq_cached_generation_equals_uncached_and_teacher_forcing(build):
    model = build()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB - 1, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:], ids[1, 5:] = 0, PAD  # a padded encoder row
    inputs = dict(input_ids=ids, attention_mask=mask, pad_token_id=PAD)
    cached = _step_logits(model, use_cache=True, **inputs)
    uncached = _step_logits(model, use_cache=False, **inputs)
    torch.testing.assert_close(cached, uncached, atol=ATOL, rtol=0)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, eos_token_id=None, return_dict_in_generate=True
        )
        teacher = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1]).logits
    torch.testing.assert_close(cached, teacher, atol=ATOL, rtol=0)


def test_whisper_token_by_token_decoding_equals_teacher_forcing():
    """Every step passes the audio again (the encoder runs each call): its call must not touch the decoder's windows."""
    from transformers import DynamicCache, EncoderDecoderCache, WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=64,
        decoder_start_token_id=BOS,
        begin_suppress_tokens=None,
        suppress_tokens=None,
        **_SEQ2SEQ,
    )
    model = _lime_model(WhisperForConditionalGeneration(config).eval(), ["q_proj", "k_proj", "v_proj", "fc1", "fc2"])
    g = torch.Generator().manual_seed(6)
    features = torch.randn(2, 8, 32, generator=g)
    dec = torch.cat([torch.full((2, 1), BOS), torch.randint(3, VOCAB - 1, (2, 8), generator=g)], dim=1)
    with torch.no_grad():
        full = model(input_features=features, decoder_input_ids=dec).logits
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        steps = [model(input_features=features, decoder_input_ids=dec[:, :3], past_key_values=cache).logits]
        for t in range(3, dec.shape[1]):
            steps.append(
                model(input_features=features, decoder_input_ids=dec[:, t : t + 1], past_key_values=cache).logits
            )
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
