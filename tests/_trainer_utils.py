"""Offline building blocks for the Trainer / SFTTrainer tests: a word-level tokenizer with a chat template, data."""

from __future__ import annotations

import random

WORDS = (
    "the a cat dog bird fish sat ran flew swam on over under mat log tree pond big small red blue green "
    "what does do is where who yes no it user assistant"
).split()

# A chat template with {% generation %} markers, so TRL's assistant_only_loss can build its mask.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}assistant {% generation %}{{ message['content'] }} </s>{% endgeneration %}"
    "{% else %}user {{ message['content'] }} {% endif %}"
    "{% endfor %}"
)


def word_tokenizer():
    """A word-level fast tokenizer built offline; ids 0, 1, 2 are pad, eos, bos like tests._models.tiny_llama."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def sentences(n: int, seed: int = 0, min_len: int = 4, max_len: int = 12) -> list[str]:
    rng = random.Random(seed)
    content = WORDS[:-7]
    return [" ".join(rng.choice(content) for _ in range(rng.randint(min_len, max_len))) for _ in range(n)]


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    questions = sentences(n, seed, 3, 6)
    return [
        [
            {"role": "user", "content": q},
            {"role": "assistant", "content": " ".join(rng.choice(WORDS[:-7]) for _ in range(rng.randint(2, 5)))},
        ]
        for q in questions
    ]
