"""Issue 3: the LiME model card written by save_pretrained and push_to_hub (network mocked)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from unittest import mock

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from peft import PeftModel, get_peft_model

import peft_lime
from peft_lime.model_card import BEGIN, END
from tests._models import lime, lora, tiny_llama


def _lime_model(**kwargs):
    base = tiny_llama(0)
    base.name_or_path = base.config._name_or_path = "org/tiny-llama"  # as if loaded from the Hub
    return get_peft_model(base, lime(num_experts=4, n_gram=2, auto_topk_threshold=0.4, **kwargs))


def _assert_lime_card(text: str, where: str) -> None:
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "LiME" in text and "Lightweight Mixture of Experts" in text
    assert "base adapter: `LoraConfig` (peft_type `LORA`)" in text
    assert "- r: `4`" in text and "target_modules" in text and "q_proj" in text
    assert "number of experts: **4**" in text
    for setting in ("top_k=2", "auto_topk=True", "auto_topk_threshold=0.4", "n_gram=2", "ngram_mode='causal'"):
        assert setting in text, setting
    assert "import peft_lime" in text and "PeftModel.from_pretrained" in text
    assert text.index("import peft_lime") < text.index("PeftModel.from_pretrained(base")
    assert f'PeftModel.from_pretrained(base, "{where}")' in text
    assert 'from_pretrained("org/tiny-llama")' in text


def test_save_pretrained_writes_lime_card(tmp_path):
    model = _lime_model()
    model.save_pretrained(str(tmp_path))
    card = ModelCard.load(str(tmp_path / "README.md"))
    _assert_lime_card(card.text, "<this repository or folder>")
    assert card.data.library_name == "peft"  # PEFT's own card update still ran
    assert {"lime", "peft-lime", "mixture-of-experts"} <= set(card.data.tags)

    # Saving again refreshes the section in place and keeps what the user wrote in the card.
    with open(tmp_path / "README.md", "a") as f:
        f.write("\n## My notes\n\nTrained on my data.\n")
    model.save_pretrained(str(tmp_path))
    text = (tmp_path / "README.md").read_text()
    assert text.count(BEGIN) == 1 and "Trained on my data." in text

    # The card's loading recipe works.
    reloaded = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path))
    assert reloaded.peft_config["default"].peft_type == "LIME"


def test_card_hooks_are_inert_for_other_methods_and_installed_once(tmp_path):
    model = get_peft_model(tiny_llama(0), lora())
    model.save_pretrained(str(tmp_path))
    assert BEGIN not in (tmp_path / "README.md").read_text()
    wrapped = PeftModel.create_or_update_model_card
    peft_lime.install_model_card_hooks()
    assert PeftModel.create_or_update_model_card is wrapped


def test_push_to_hub_uploads_adapter_and_lime_card(tmp_path):
    model = _lime_model()
    uploaded: dict[str, bytes] = {}
    original_load = ModelCard.load

    def hub_card(repo_id_or_path, *args, **kwargs):
        # A local file loads as usual; the Hub lookup of a new repo finds no card (as the real Hub answers).
        if os.path.exists(repo_id_or_path):
            return original_load(repo_id_or_path, *args, **kwargs)
        raise EntryNotFoundError(f"{repo_id_or_path} has no README.md")

    def create_commit(*args, operations, **kwargs):
        for op in operations:  # read now: push_to_hub deletes its temporary folder afterwards
            with open(op.path_or_fileobj, "rb") as f:
                uploaded[op.path_in_repo] = f.read()
        return SimpleNamespace(commit_url="https://huggingface.co/user/lime-test/commit/0")

    with (
        mock.patch.object(HfApi, "create_repo", return_value=SimpleNamespace(repo_id="user/lime-test")) as create,
        mock.patch.object(HfApi, "create_commit", side_effect=create_commit) as commit,
        mock.patch.object(ModelCard, "load", side_effect=hub_card),
    ):
        model.push_to_hub("user/lime-test")
    assert create.call_count == 1 and commit.call_count == 1
    assert set(uploaded) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}

    config = json.loads(uploaded["adapter_config.json"])
    assert config["peft_type"] == "LIME" and config["num_experts"] == 4 and config["base"]["peft_type"] == "LORA"
    assert len(uploaded["adapter_model.safetensors"]) > 1000
    readme = uploaded["README.md"].decode()
    _assert_lime_card(readme, "user/lime-test")
    assert "library_name: peft" in readme and "- lime" in readme


def test_push_to_hub_keeps_existing_hub_card_text(tmp_path):
    """An existing card on the Hub is updated (user text kept), not replaced."""
    model = _lime_model()
    uploaded: dict[str, str] = {}
    existing = ModelCard("---\nlicense: mit\n---\n\n# My LiME model\n\nHand-written description.\n")

    def create_commit(*args, operations, **kwargs):
        for op in operations:
            if op.path_in_repo == "README.md":
                with open(op.path_or_fileobj) as f:
                    uploaded["README.md"] = f.read()

    original_load = ModelCard.load
    with (
        mock.patch.object(HfApi, "create_repo", return_value=SimpleNamespace(repo_id="user/lime-test")),
        mock.patch.object(HfApi, "create_commit", side_effect=create_commit),
        mock.patch.object(
            ModelCard,
            "load",
            side_effect=lambda p, *a, **k: original_load(p, *a, **k) if os.path.exists(p) else existing,
        ),
    ):
        model.push_to_hub("user/lime-test")
    readme = uploaded["README.md"]
    assert "Hand-written description." in readme and "license: mit" in readme
    _assert_lime_card(readme, "user/lime-test")
