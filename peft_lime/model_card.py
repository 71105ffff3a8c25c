"""LiME section of the model card (README.md), written explicitly or by an enabled LiME PeftModel.

PeftModel writes the card itself (``create_or_update_model_card``, called by ``save_pretrained``) and has no extension
point for a tuner: LimeModel is built inside ``PeftModel.__init__`` and is never handed its PeftModel, so the tuner
cannot add a section on its own. Patching PeftModel's class at ``import peft_lime`` would change every PeftModel in
the process, LiME or not, including a private method of transformers. So the section is opt-in, per model:

- ``update_lime_model_card(peft_model, output_dir, repo_id=None)`` adds or refreshes the section of a saved folder;
- ``enable_lime_model_card(peft_model)`` makes that ONE PeftModel write it from then on, like ``enable_task_ids``:
  it sets two methods on the instance (its ``__dict__``), so the class and every other PeftModel are untouched, and a
  deepcopy or pickle keeps them bound to the copy. ``create_or_update_model_card`` runs PEFT's own update, then adds
  the section.
  ``_upload_modified_files`` (transformers' PushToHubMixin) is overridden too because ``push_to_hub`` saves the adapter
  to a temporary folder, then OVERWRITES README.md with the card loaded from the Hub (or a generic template), and
  uploads right after: that call is the only point between the two where the card can be fixed. The override redoes
  PEFT's and LiME's updates on that card (with the repo id in the loading recipe) and calls the inherited method.

Without either call a LiME PeftModel saves PEFT's card only; the adapter still loads (after ``import peft_lime``).

The section sits between HTML comment markers, so saving again replaces it (and collapses duplicates) while text the
user added elsewhere is kept. User data (adapter names, repo and base-model ids, config values) is written as escaped
literals that cannot contain a newline, a backtick, ``<`` or ``>``: it can neither break out of the Python snippet or a
code span nor forge a marker.
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from typing import Any, Optional

BEGIN = "<!-- peft-lime: begin -->"
END = "<!-- peft-lime: end -->"
TAGS = ("lime", "peft-lime", "mixture-of-experts")
_ROUTING_FIELDS = (
    "num_experts",
    "top_k",
    "auto_topk",
    "auto_topk_threshold",
    "max_active_experts",
    "selection",
    "selection_temperature",
    "n_gram",
    "ngram_mode",
    "temperature",
    "routing_gamma",
    "routing_norm",
    "jitter_noise",
    "shared_expert",
    "expert_init_std",
    "importance_loss_coef",
    "kl_loss_coef",
    "balance_scope",
)
# Base-config fields worth a line in the card (the full config is in adapter_config.json).
_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
_BASE_FIELDS = ("r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora", "alpha", "rank_dropout", "target_modules")
# One LiME section; for later ones, the blank lines before them go too.
_SECTION = re.compile(f"{re.escape(BEGIN)}.*?{re.escape(END)}", re.DOTALL)
_LATER_SECTION = re.compile(f"\\n*{_SECTION.pattern}", re.DOTALL)
# Characters that JSON leaves raw but Markdown gives a meaning to (code spans, HTML comments): written as \u escapes.
_MARKDOWN_SAFE = str.maketrans({c: f"\\u{ord(c):04x}" for c in "`<>\x7f"})
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_PYTHON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _lime_configs(peft_model: Any) -> dict[str, Any]:
    from peft.utils import PeftType

    configs = getattr(peft_model, "peft_config", None) or {}
    return {name: conf for name, conf in configs.items() if getattr(conf, "peft_type", None) == PeftType.LIME}


def _base_model_id(peft_model: Any) -> Optional[str]:
    for conf in _lime_configs(peft_model).values():
        if conf.base_model_name_or_path:
            return conf.base_model_name_or_path
    return None


def _jsonable(value: Any) -> Any:
    return sorted(value, key=str) if isinstance(value, (set, frozenset)) else str(value)


def _json_literal(value: Any) -> str:
    """``value`` as JSON in printable ASCII without a backtick, ``<`` or ``>``; ``json.loads`` gives it back."""
    return json.dumps(value, default=_jsonable).translate(_MARKDOWN_SAFE)


def _python_literal(value: str) -> str:
    """``value`` as a double-quoted Python string literal in printable ASCII without a backtick, ``<`` or ``>``."""
    chars = []
    for char in value:
        code = ord(char)
        if char in _PYTHON_ESCAPES:
            chars.append(_PYTHON_ESCAPES[char])
        elif 0x20 <= code < 0x7F and char not in "`<>":
            chars.append(char)
        else:
            chars.append(f"\\x{code:02x}" if code < 0x100 else char.encode("unicode_escape").decode("ascii"))
    return '"' + "".join(chars) + '"'


def _code_span(name: str) -> str:
    """A Markdown code span showing ``name``: as is when plain, else as a JSON string literal."""
    return f"`{name if _PLAIN_NAME.fullmatch(name) else _json_literal(name)}`"


def lime_card_section(configs: dict[str, Any], repo_id: Optional[str] = None, base_model: Optional[str] = None) -> str:
    """Markdown for the LiME section: method, base adapter config, experts and routing settings, how to load."""
    lines = [BEGIN, "## LiME adapter (Lightweight Mixture of Experts)", ""]
    lines.append(
        "This adapter was trained with `peft-lime`, LiME as a PEFT tuner (LiME: Kowsher et al., 2026, "
        "arXiv:2604.02338): ONE shared adapter of the base PEFT method per wrapped layer, whose output is multiplied "
        "per token by a mix of expert vectors chosen by a router without parameters."
    )
    for name, conf in configs.items():
        base = conf.base
        base_dict = {k: v for k, v in base.to_dict().items() if k in _BASE_FIELDS and v is not None}
        base_type = getattr(base.peft_type, "value", str(base.peft_type))
        lines += ["", f"### Adapter {_code_span(name)}", ""]
        lines.append(f"- base adapter: `{type(base).__name__}` (peft_type `{base_type}`)")
        for key, value in base_dict.items():
            lines.append(f"  - {key}: `{_json_literal(value)}`")
        lines.append(f"- number of experts: **{conf.num_experts}**")
        routing = ", ".join(f"{k}={getattr(conf, k)!r}" for k in _ROUTING_FIELDS if k != "num_experts")
        lines.append(f"- routing settings: {routing.translate(_MARKDOWN_SAFE)}")
        lines.append('- the full configuration (nested `base`) is in `adapter_config.json` (`"peft_type": "LIME"`)')
    where = _python_literal(repo_id) if repo_id else '"<this repository or folder>"'
    base_model = _python_literal(base_model) if base_model else '"<base model>"'
    task_type = next((getattr(c, "task_type", None) for c in configs.values() if getattr(c, "task_type", None)), None)
    model_class = _AUTO_CLASSES.get(getattr(task_type, "value", task_type), "AutoModel")
    lines += [
        "",
        "### How to load",
        "",
        "PEFT has no plugin discovery: `import peft_lime` (pip package `peft-lime`) BEFORE "
        "`PeftModel.from_pretrained`, otherwise loading fails with `KeyError: 'LIME'`.",
        "",
        "```python",
        "import peft_lime  # registers PeftType.LIME with PEFT",
        "from peft import PeftModel",
        f"from transformers import {model_class}",
        "",
        f"base = {model_class}.from_pretrained({base_model})",
        f"model = PeftModel.from_pretrained(base, {where})",
        "```",
        "",
        "LiME adapters cannot be merged into the base weights (routing depends on the input): keep them unmerged.",
        END,
    ]
    return "\n".join(lines)


def _with_section(text: str, section: str) -> str:
    """``text`` with ``section`` in place of its first LiME section (others removed), or appended when it has none."""
    first = _SECTION.search(text)
    if first is None:
        return text.rstrip() + "\n\n" + section + "\n"
    return text[: first.start()] + section + _LATER_SECTION.sub("", text[first.end() :])


def update_lime_model_card(peft_model: Any, output_dir: str, repo_id: Optional[str] = None) -> bool:
    """Add or refresh the LiME section and tags of ``output_dir/README.md``; False when the model has no LiME adapter.

    ``repo_id`` (the Hub repository, if any) goes into the card's loading recipe.
    """
    configs = _lime_configs(peft_model)
    if not configs:
        return False
    from huggingface_hub import ModelCard, ModelCardData

    filename = os.path.join(output_dir, "README.md")
    card = ModelCard.load(filename) if os.path.exists(filename) else ModelCard.from_template(ModelCardData())
    tags = list(card.data.tags or [])
    card.data.tags = tags + [t for t in TAGS if t not in tags]
    section = lime_card_section(configs, repo_id=repo_id, base_model=_base_model_id(peft_model))
    card.text = _with_section(card.text, section)
    card.save(filename)
    return True


def _create_or_update_model_card(self: Any, output_dir: str) -> None:
    type(self).create_or_update_model_card(self, output_dir)  # PEFT's own update
    update_lime_model_card(self, output_dir)


def _upload_modified_files(self: Any, working_dir: str, repo_id: str, *args: Any, **kwargs: Any) -> Any:
    # push_to_hub replaced the README.md written by save_pretrained with the Hub's card: update that one.
    type(self).create_or_update_model_card(self, working_dir)
    update_lime_model_card(self, working_dir, repo_id=repo_id)
    return type(self)._upload_modified_files(self, working_dir, repo_id, *args, **kwargs)


def enable_lime_model_card(peft_model: Any) -> None:
    """Make ``save_pretrained`` and ``push_to_hub`` of this LiME PeftModel write the LiME section (idempotent).

    Only this instance changes (see the module docstring); without it, call ``update_lime_model_card`` after saving.
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel) or not _lime_configs(peft_model):
        raise ValueError(
            f"peft_model: no LiME adapter found in this {type(peft_model).__name__} (expected a PeftModel returned by "
            "get_peft_model with a LimeConfig, or loaded from a LiME adapter)"
        )
    for name, method in (
        ("create_or_update_model_card", _create_or_update_model_card),
        ("_upload_modified_files", _upload_modified_files),
    ):
        # A partial, not a bound method: a bound method pickles by name, which would not find these.
        peft_model.__dict__[name] = functools.partial(method, peft_model)


def install_model_card_hooks() -> None:
    """Deprecated (peft-lime 0.1.0 patched PeftModel for every model): patches nothing now.

    Call ``enable_lime_model_card(peft_model)`` on the LiME model instead (``LimeRoutingCallback`` does).
    """
    warnings.warn(
        "install_model_card_hooks no longer patches PeftModel globally and does nothing; call "
        "peft_lime.enable_lime_model_card(peft_model) on your LiME model (LimeRoutingCallback does it for you)",
        DeprecationWarning,
        stacklevel=2,
    )
