"""Issue 24, hostile-user probe: silent wrong results and obscure crashes of configs, checkpoints and the balance
window (the export faults are in test_export_safety.py). Each test failed on 4808f5a."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_lime
from peft_lime import LimeConfig, balance
from peft_lime.export import main as export_main

from ._models import VOCAB, lime, lora, scatter_experts, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
WEIGHTS = "adapter_model.safetensors"


def _saved(tmp_path, **config):
    model = get_peft_model(tiny_llama(), lime(lora(), **config))
    scatter_experts(model)
    model.save_pretrained(tmp_path)
    return load_file(str(tmp_path / WEIGHTS))


# --- checkpoints ------------------------------------------------------------------------------------------------------
def test_checkpoint_missing_base_tuner_tensors_warns_naming_them(tmp_path):
    tensors = _saved(tmp_path)
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, str(tmp_path / WEIGHTS))
    with pytest.warns(UserWarning, match=r"Found missing adapter keys while loading the checkpoint") as record:
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    message = next(str(w.message) for w in record if "missing adapter keys" in str(w.message))
    # every lora_B of the 4 wrapped layers (2 layers x q / v), nothing else
    assert sorted(re.findall(r"'([^']+)'", message.split("checkpoint: ")[1])) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{m}.base_layer.lora_B.default.weight"
        for i in (0, 1)
        for m in ("q_proj", "v_proj")
    )
    # a complete checkpoint loads without that warning
    save_file(tensors, str(tmp_path / WEIGHTS))
    with warnings.catch_warnings(record=True) as clean:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert not [w for w in clean if "missing adapter keys" in str(w.message)]


@pytest.mark.parametrize(
    "suffix, value",
    [("lime_experts.gate", float("nan")), ("lime_experts.weight", float("inf")), ("lora_B.weight", float("nan"))],
)
def test_checkpoint_with_nan_or_inf_tensor_is_refused_naming_it(tmp_path, suffix, value):
    # Before: a NaN gate or lora_B gave finite outputs, different from the saved model's (corruption hidden).
    tensors = _saved(tmp_path)
    key = next(k for k in tensors if k.endswith(suffix) and "layers.1.self_attn.v_proj" in k)
    tensors[key] = tensors[key].clone().view(-1).index_fill_(0, torch.tensor([0]), value).view_as(tensors[key])
    save_file(tensors, str(tmp_path / WEIGHTS))
    remapped = key.replace(suffix, suffix.replace(".", ".default.", 1))  # the model's name of that tensor
    with pytest.raises(ValueError, match=rf"NaN or inf in {re.escape(remapped)}"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_truncated_adapter_config_error_names_the_file(tmp_path, capsys):
    _saved(tmp_path / "lime")
    config_file = tmp_path / "lime" / "adapter_config.json"
    config_file.write_text(config_file.read_text()[:200])
    with pytest.raises(ValueError, match=re.escape(str(config_file))):
        LimeConfig.from_pretrained(str(tmp_path / "lime"))
    # the export command line reads it the same way: one line naming the file, no traceback
    save_file({"global::x": torch.ones(4)}, str(tmp_path / "routing.safetensors"))
    with pytest.raises(SystemExit):
        export_main(
            [
                "--adapter",
                str(tmp_path / "lime"),
                "--routing",
                str(tmp_path / "routing.safetensors"),
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )
    assert str(config_file) in capsys.readouterr().err


# --- configs ----------------------------------------------------------------------------------------------------------
def test_misspelled_key_of_dict_base_is_refused():
    base = {"peft_type": "LORA", "r": 4, "lora_alph": 16, "target_modules": ["q_proj"]}
    with pytest.raises(ValueError, match=r"base: unknown key\(s\) \['lora_alph'\] for LoraConfig.*'lora_alpha'"):
        LimeConfig(base=base)
    # the dict form a config saves still loads
    saved = json.loads(json.dumps(lime(lora(lora_alpha=16)).to_dict()))
    assert LimeConfig(**{k: v for k, v in saved.items() if k != "peft_type"}).base.lora_alpha == 16


def test_adalora_base_is_refused_at_config_time():
    # Before: accepted, then every forward raised AttributeError in tuner_deltas.py.
    with pytest.raises(ValueError, match=r"^base: AdaLoraConfig cannot be wrapped by LiME: .*update_and_allocate"):
        LimeConfig(base=AdaLoraConfig(target_modules=["q_proj"], total_step=10))
    with pytest.raises(ValueError, match="^base: AdaLoraConfig"):
        LimeConfig(base=AdaLoraConfig(target_modules=["q_proj"], total_step=10).to_dict())


@pytest.mark.parametrize(
    "field, value", [("temperature", 0), ("num_experts", -3), ("top_k", 10), ("selection", "hrad")]
)
def test_config_field_changed_after_construction_is_checked_when_layers_are_built(field, value):
    # Before: ZeroDivisionError / "negative dimension" deep inside, or silently used.
    config = lime()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=f"^{field}: "):
        get_peft_model(tiny_llama(), config)
    model = get_peft_model(tiny_llama(), lime())
    with pytest.raises(ValueError, match=f"^{field}: "):
        model.add_adapter("other", config)
    assert list(model.peft_config) == ["default"]  # the refused adapter left nothing behind
    assert not any("other" in name for name, _ in model.named_parameters())


# --- adapter lifecycle ------------------------------------------------------------------------------------------------
def test_forward_after_deleting_the_only_adapter_says_so():
    # Plain PEFT LoRA fails there with a bare KeyError 'default' (PeftModel reads peft_config[active_adapter]); LiME's
    # error stays a KeyError but says what happened and what to do.
    model = get_peft_model(tiny_llama(), lime())
    model.delete_adapter("default")
    with pytest.raises(KeyError, match=r"no adapter 'default', the model has no adapter left.*unload\(\)"):
        model(input_ids=IDS)
    base = model.base_model.unload()
    torch.testing.assert_close(base(input_ids=IDS).logits, tiny_llama()(input_ids=IDS).logits, atol=0, rtol=0)


# --- balance window ---------------------------------------------------------------------------------------------------
def test_global_balance_window_never_closed_warns_once(monkeypatch):
    # A loop that updates weights without torch.optim never closes the window: its token count grows forever.
    monkeypatch.setattr(balance, "MAX_WINDOW_FORWARDS", 3, raising=False)  # 1000 by default; 3 keeps the test fast
    monkeypatch.setattr(balance, "_warned_never_closed", False, raising=False)
    model = get_peft_model(tiny_llama(), lime(lora(), balance_scope="global")).train()
    layer = next(m for m in model.modules() if isinstance(m, peft_lime.LimeLayer))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def forwards(n: int, step: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as record, torch.no_grad():
            warnings.simplefilter("always")
            for _ in range(n):
                model(input_ids=IDS)
                if step:
                    optimizer.step()
        return [str(w.message) for w in record if "reset_balance_window" in str(w.message)]

    assert forwards(6, step=True) == []  # every optimizer step closes the window
    assert forwards(3, step=False) == []  # up to the limit: an accumulation window, no warning
    warned = forwards(4, step=False)  # forwards 4 to 7 of the window: one warning, at the 4th
    assert len(warned) == 1 and "4 training forwards without an optimizer step" in warned[0]
    assert balance.window_of(layer, "default").forwards == 7
    peft_lime.reset_balance_window(model)
    assert balance.window_of(layer, "default").forwards == 0
