"""The LiME model card: written by save_pretrained / push_to_hub once enabled (network mocked), safe quoting of user
data, and no effect on other PEFT models."""

from __future__ import annotations

import ast
import copy
import inspect
import json
import os
import pickle
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from peft import PeftModel, get_peft_model
from transformers.utils import PushToHubMixin

import peft_lime
from peft_lime.model_card import BEGIN, END, lime_card_section, update_lime_model_card
from tests._models import lime, lora, tiny_llama

# User data that tries to break out of a Python string, a Markdown code span / fence, a heading line and the section
# markers.
HOSTILE = ('a"\nimport os', "x'''\n```\n## Injected", "n`<!-- peft-lime: end -->\n<!-- peft-lime: begin -->\\")


def _lime_model(adapter_name: str = "default", **kwargs):
    base = tiny_llama(0)
    base.name_or_path = base.config._name_or_path = "org/tiny-llama"  # as if loaded from the Hub
    config = lime(num_experts=4, n_gram=2, auto_topk_threshold=0.4, **kwargs)
    model = get_peft_model(base, config, adapter_name=adapter_name)
    peft_lime.enable_lime_model_card(model)
    return model


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


def _snippet_ids(section: str) -> tuple[str, str]:
    """(base model id, adapter location) passed to from_pretrained in the card's Python snippet, parsed as Python."""
    assert section.count("```python\n") == 1
    tree = ast.parse(section.split("```python\n", 1)[1].split("\n```", 1)[0])
    imports = [ast.unparse(s) for s in tree.body if isinstance(s, (ast.Import, ast.ImportFrom))]
    assert imports == [
        "import peft_lime",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
    ]
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith(".from_pretrained")]
    assert len(calls) == 2  # the base model's, then PeftModel's
    return ast.literal_eval(calls[0].args[0]), ast.literal_eval(calls[1].args[1])


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


def test_explicit_update_without_enabling(tmp_path):
    base = tiny_llama(0)
    model = get_peft_model(base, lime())
    model.save_pretrained(str(tmp_path))
    assert BEGIN not in (tmp_path / "README.md").read_text()  # not enabled: PEFT's card only
    assert update_lime_model_card(model, str(tmp_path), repo_id="user/x")
    assert (tmp_path / "README.md").read_text().count(BEGIN) == 1
    assert not update_lime_model_card(get_peft_model(tiny_llama(0), lora()), str(tmp_path))  # not LiME: no-op


@pytest.mark.parametrize("hostile", (*HOSTILE, "m\U0001f600\x00\x7f\u2028\ud800\t"))
def test_snippet_quotes_ids_as_python_literals(hostile):
    section = lime_card_section({"default": lime(task_type="CAUSAL_LM")}, repo_id=hostile, base_model=hostile[::-1])
    assert _snippet_ids(section) == (hostile[::-1], hostile)
    assert section.count(BEGIN) == 1 and section.count(END) == 1
    assert "\n## Injected" not in section


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_adapter_name_keeps_one_section(tmp_path, hostile):
    model = _lime_model(adapter_name=hostile)
    for _ in range(3):
        update_lime_model_card(model, str(tmp_path))
        text = (tmp_path / "README.md").read_text()
        assert text.count(BEGIN) == 1 and text.count(END) == 1, text
    heading = next(line for line in text.splitlines() if line.startswith("### Adapter "))
    assert heading.count("`") == 2  # one code span holding the whole name
    assert json.loads(heading[len("### Adapter `") : -1]) == hostile  # shown as a JSON string literal
    assert "\n## Injected" not in text and "\nimport os" not in text


def test_existing_duplicate_sections_collapse_to_one(tmp_path):
    model = _lime_model()
    stale = f"{BEGIN}\nold\n{END}"
    (tmp_path / "README.md").write_text(f"# Card\n\n{stale}\n\nUser text.\n\n{stale}\n")
    update_lime_model_card(model, str(tmp_path))
    text = (tmp_path / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and "\nold\n" not in text
    assert text.index("# Card") < text.index(BEGIN) < text.index("User text.")


def test_import_leaves_peft_model_classes_untouched():
    assert "_upload_modified_files" not in vars(PeftModel)
    assert PeftModel._upload_modified_files is PushToHubMixin._upload_modified_files
    card_fn = PeftModel.create_or_update_model_card
    assert not hasattr(card_fn, "__wrapped__") and card_fn.__code__.co_filename.endswith("peft_model.py")
    for cls in PeftModel.__subclasses__():
        assert "create_or_update_model_card" not in vars(cls) and "_upload_modified_files" not in vars(cls), cls


def test_enabling_is_per_instance_idempotent_and_lime_only():
    model, other = _lime_model(), get_peft_model(tiny_llama(0), lime())
    peft_lime.enable_lime_model_card(model)  # a second time: still one hook each, bound to this model
    for name in ("create_or_update_model_card", "_upload_modified_files"):
        hook = vars(model)[name]
        assert hook.func.__module__ == "peft_lime.model_card" and hook.args == (model,), name
        assert name not in vars(other), name
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert vars(copied)["create_or_update_model_card"].args[0] is copied  # a copy writes its own card
    with pytest.raises(ValueError, match="no LiME adapter"):
        peft_lime.enable_lime_model_card(get_peft_model(tiny_llama(0), lora()))
    with pytest.raises(ValueError, match="no LiME adapter"):
        peft_lime.enable_lime_model_card(model.base_model)  # the LimeModel: not a PeftModel


def _save_lora_model(folder: str) -> None:
    """Runs here and, from its source, in a process without peft_lime: imports only what it needs."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(folder)


@pytest.mark.slow
def test_lora_card_is_the_same_with_and_without_peft_lime(tmp_path):
    """A LoRA model saved by a process that never imports peft_lime, and by this one: the same README."""
    plain, with_lime = tmp_path / "plain", tmp_path / "with_lime"
    script = f"{inspect.getsource(_save_lora_model)}\n_save_lora_model({str(plain)!r})\n"
    script += "import sys\nassert not any(name.startswith('peft_lime') for name in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    _save_lora_model(str(with_lime))
    assert "peft_lime" in sys.modules
    assert (plain / "README.md").read_text() == (with_lime / "README.md").read_text()


def _mock_hub(card_on_hub):
    """Patches for push_to_hub: repo creation, the card lookup (a callable: repo id -> card) and the commit."""
    uploaded: dict[str, bytes] = {}
    original_load = ModelCard.load

    def load(repo_id_or_path, *args, **kwargs):
        if os.path.exists(repo_id_or_path):  # a local file loads as usual
            return original_load(repo_id_or_path, *args, **kwargs)
        return card_on_hub(repo_id_or_path)

    def create_commit(*args, operations, **kwargs):
        for op in operations:  # read now: push_to_hub deletes its temporary folder afterwards
            with open(op.path_or_fileobj, "rb") as f:
                uploaded[op.path_in_repo] = f.read()
        return SimpleNamespace(commit_url="https://huggingface.co/user/lime-test/commit/0")

    patches = (
        mock.patch.object(HfApi, "create_repo", return_value=SimpleNamespace(repo_id="user/lime-test")),
        mock.patch.object(HfApi, "create_commit", side_effect=create_commit),
        mock.patch.object(ModelCard, "load", side_effect=load),
    )
    return patches, uploaded


def _no_card(repo_id):
    raise EntryNotFoundError(f"{repo_id} has no README.md")  # as the real Hub answers for a new repo


def test_push_to_hub_uploads_adapter_and_lime_card():
    model = _lime_model()
    patches, uploaded = _mock_hub(_no_card)
    with patches[0] as create, patches[1] as commit, patches[2]:
        model.push_to_hub("user/lime-test")
    assert create.call_count == 1 and commit.call_count == 1
    assert set(uploaded) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}

    config = json.loads(uploaded["adapter_config.json"])
    assert config["peft_type"] == "LIME" and config["num_experts"] == 4 and config["base"]["peft_type"] == "LORA"
    assert len(uploaded["adapter_model.safetensors"]) > 1000
    readme = uploaded["README.md"].decode()
    _assert_lime_card(readme, "user/lime-test")
    assert "library_name: peft" in readme and "- lime" in readme


def test_push_to_hub_keeps_existing_hub_card_text():
    """An existing card on the Hub is updated (user text kept), not replaced."""
    model = _lime_model()
    existing = "---\nlicense: mit\n---\n\n# My LiME model\n\nHand-written description.\n"
    patches, uploaded = _mock_hub(lambda repo_id: ModelCard(existing))
    with patches[0], patches[1], patches[2]:
        model.push_to_hub("user/lime-test")
    readme = uploaded["README.md"].decode()
    assert "Hand-written description." in readme and "license: mit" in readme
    _assert_lime_card(readme, "user/lime-test")
