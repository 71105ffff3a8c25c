"""LiME section of the model card (README.md) written by ``save_pretrained`` and ``push_to_hub``.

PeftModel writes the card itself (``PeftModel.create_or_update_model_card``, called by ``save_pretrained``) and has no
extension point for a tuner to add its own section: the tuner (LimeModel) is not consulted. So this module wraps
two PeftModel methods, once, at ``import peft_lime`` (the import is required to use LiME anyway):

- ``create_or_update_model_card``: runs PEFT's own card update, then adds or refreshes the LiME section;
- ``_upload_modified_files`` (from transformers' PushToHubMixin): ``push_to_hub`` saves the adapter to a temporary
  folder and then OVERWRITES README.md with the card loaded from the Hub (or a generic template), which would drop
  every line PEFT and LiME wrote; the wrapper re-applies the card update just before the upload.

Both wrappers delegate unchanged for models without a LiME adapter. The section sits between HTML comment markers,
so saving again replaces it instead of appending a copy, and text the user added elsewhere in the card is kept.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any, Optional

logger = logging.getLogger(__name__)

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


def _lime_configs(peft_model: Any) -> dict[str, Any]:
    from peft.utils import PeftType

    configs = getattr(peft_model, "peft_config", None) or {}
    return {name: conf for name, conf in configs.items() if getattr(conf, "peft_type", None) == PeftType.LIME}


def _base_model_id(peft_model: Any) -> Optional[str]:
    for conf in _lime_configs(peft_model).values():
        if conf.base_model_name_or_path:
            return conf.base_model_name_or_path
    return None


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
        lines += ["", f"### Adapter `{name}`", ""]
        lines.append(f"- base adapter: `{type(base).__name__}` (peft_type `{base_type}`)")
        for key, value in base_dict.items():
            lines.append(f"  - {key}: `{json.dumps(value, default=str)}`")
        lines.append(f"- number of experts: **{conf.num_experts}**")
        routing = ", ".join(f"{k}={getattr(conf, k)!r}" for k in _ROUTING_FIELDS if k != "num_experts")
        lines.append(f"- routing settings: {routing}")
        lines.append('- the full configuration (nested `base`) is in `adapter_config.json` (`"peft_type": "LIME"`)')
    where = repo_id or "<this repository or folder>"
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
        f'base = {model_class}.from_pretrained("{base_model or "<base model>"}")',
        f'model = PeftModel.from_pretrained(base, "{where}")',
        "```",
        "",
        "LiME adapters cannot be merged into the base weights (routing depends on the input): keep them unmerged.",
        END,
    ]
    return "\n".join(lines)


def update_lime_model_card(peft_model: Any, output_dir: str, repo_id: Optional[str] = None) -> bool:
    """Add or refresh the LiME section and tags of ``output_dir/README.md``; False when the model has no LiME adapter."""
    configs = _lime_configs(peft_model)
    if not configs:
        return False
    from huggingface_hub import ModelCard, ModelCardData

    filename = os.path.join(output_dir, "README.md")
    card = ModelCard.load(filename) if os.path.exists(filename) else ModelCard.from_template(ModelCardData())
    tags = list(card.data.tags or [])
    card.data.tags = tags + [t for t in TAGS if t not in tags]
    text = card.text
    section = lime_card_section(configs, repo_id=repo_id, base_model=_base_model_id(peft_model))
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    card.text = text
    card.save(filename)
    return True


def install_model_card_hooks() -> None:
    """Wrap PeftModel's card writing and Hub upload once (idempotent); see the module docstring for why."""
    from peft import PeftModel

    original_card = PeftModel.create_or_update_model_card
    if not getattr(original_card, "_peft_lime_wrapped", False):

        @functools.wraps(original_card)
        def create_or_update_model_card(self, output_dir: str):
            original_card(self, output_dir)
            update_lime_model_card(self, output_dir)

        create_or_update_model_card._peft_lime_wrapped = True
        PeftModel.create_or_update_model_card = create_or_update_model_card

    original_upload = PeftModel._upload_modified_files
    if not getattr(original_upload, "_peft_lime_wrapped", False):

        @functools.wraps(original_upload)
        def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
            if _lime_configs(self):
                # push_to_hub replaced the README written by save_pretrained with the Hub's card: update that one.
                self.create_or_update_model_card(working_dir)
                update_lime_model_card(self, working_dir, repo_id=repo_id)
            return original_upload(self, working_dir, repo_id, *args, **kwargs)

        _upload_modified_files._peft_lime_wrapped = True
        PeftModel._upload_modified_files = _upload_modified_files
